"""The few-shot experiment end to end on its tiny config: every row, every level, rerun = resume."""

import json
import os

import pytest

from experiments.configs import nvsm as nvsm_config
from nvsm_jax import experiment, pretrain


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fewshot"))
    c = nvsm_config.get_config("tiny")
    c.pretrain_steps = 2
    c.pretrain_batch = 8
    report = experiment.train_and_evaluate(c, workdir)
    return c, workdir, report


def test_every_method_and_level_is_reported(tiny_run):
    c, workdir, report = tiny_run
    rows = json.load(open(os.path.join(workdir, "results.json")))["rows"]
    cells = {(r["method"], r["category"], str(r["annotations"]), r["occlusion"]) for r in rows}
    for method in c.methods:
        ann = "all" if method == "nemo_full" else "7"
        for occ in c.eval_occlusions:
            assert (method, "car", ann, occ) in cells
    for r in rows:
        assert 0.0 <= r["acc_pi_6"] <= 100.0 and r["acc_pi_18"] <= r["acc_pi_6"]
    assert "| nvsm |" in report and os.path.exists(os.path.join(workdir, "report.md"))


def test_rows_start_from_the_pretrained_backbone_and_rerun_resumes(tiny_run):
    c, workdir, report = tiny_run
    pre = os.path.join(workdir, "pretrain_car")
    assert os.path.exists(os.path.join(pre, pretrain.PARAMS_FILE))
    for cell in ("nemo_car_7", "nvsm_car_7", "nemo_full_car_all"):
        saved = json.load(open(os.path.join(workdir, cell, "config.json")))
        assert saved["pretrain_workdir"] == pre, cell
    stamp = {cell: os.path.getmtime(os.path.join(workdir, cell, "rows.json"))
             for cell in ("nemo_car_7", "nvsm_car_7")}
    assert experiment.train_and_evaluate(c, workdir) == report   # every cell loaded, not rerun
    for cell, t in stamp.items():
        assert os.path.getmtime(os.path.join(workdir, cell, "rows.json")) == t
