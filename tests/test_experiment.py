"""The few-shot experiment end to end on its tiny config: rows, levels, rerun = resume.

CI runs the NeMo and NVSM rows on L0 (with the shared pre-training); the run with
every method and every occlusion level is marked slow (``make test-slow``).
"""

import json
import os

import numpy as np
import pytest

from experiments.configs import nvsm as nvsm_config
from nvsm_jax.nvsm import experiment
from nvsm_jax.baselines import pretrain
from nvsm_jax import training


def _tiny(**overrides):
    c = nvsm_config.get_config("tiny")
    c.pretrain_steps = 2
    c.pretrain_batch = 8
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fewshot_quick"))
    c = _tiny(methods=("nemo", "nvsm"), eval_occlusions=("L0",), eval_every_round=False,
              results_dir=os.path.join(workdir, "tracked"))
    return c, workdir, experiment.train_and_evaluate(c, workdir)


def _check_rows(c, workdir, report):
    rows = json.load(open(os.path.join(workdir, "results.json")))["rows"]
    cells = {(r["method"], r["category"], str(r["annotations"]), r["occlusion"]) for r in rows}
    for method in c.methods:
        ann = "all" if method == "nemo_full" else "7"
        for occ in c.eval_occlusions:
            assert (method, "car", ann, occ) in cells
    for r in rows:   # each row is its cell's stored per-image errors, recounted here
        if r["category"] == "Mean":            # one category: the mean row is the car row
            car = next(q for q in rows if q["category"] == "car" and all(
                q[k] == r[k] for k in ("method", "annotations", "occlusion")))
            assert r["acc_pi_6"] == pytest.approx(car["acc_pi_6"])
            continue
        cell = os.path.join(workdir, f"{r['method']}_{r['category']}_{r['annotations']}")
        err = np.load(os.path.join(cell, "errors.npz"))[r["occlusion"]]
        assert len(err) == r["num_images"] == c.data.num_test
        assert np.all((err >= 0) & (err <= np.pi + 1e-6))
        assert r["acc_pi_6"] == pytest.approx(100.0 * np.sum(err < np.pi / 6) / len(err))
        assert r["acc_pi_18"] == pytest.approx(100.0 * np.sum(err < np.pi / 18) / len(err))
        assert r["med_err_deg"] == pytest.approx(np.degrees(np.median(err)))
    assert "| nvsm |" in report and os.path.exists(os.path.join(workdir, "report.md"))
    # per-azimuth accuracy: every image in one sector, sectors add up to the row
    by_az = json.load(open(os.path.join(workdir, "results.json")))["by_azimuth"]
    assert {e["method"] for e in by_az} == set(c.methods)
    for e in by_az:
        row = next(r for r in rows if (r["method"], r["category"], r["occlusion"])
                   == (e["method"], e["category"], e["occlusion"]))
        counts = np.asarray(e["counts"])
        assert counts.sum() == row["num_images"]
        hits = np.nansum(np.asarray(e["acc"], float) * counts) / 100.0
        assert np.isclose(100.0 * hits / counts.sum(), row["acc_pi_6"])
    assert "by ground-truth azimuth" in report


def test_nemo_and_nvsm_rows_are_reported(quick_run):
    _check_rows(*quick_run)


def test_each_finished_cell_is_recorded_in_the_results_folder(quick_run):
    from nvsm_jax import results
    c, workdir, experiment_report = quick_run
    assert "NVSM pseudo-labels per round" in experiment_report    # the workdir's own report
    cells = {(x["method"], x["seed"]): x for x in results.load_cells(c.results_dir)}
    assert set(cells) == {("nemo", c.seed), ("nvsm", c.seed)}
    rows = json.load(open(os.path.join(workdir, "results.json")))["rows"]
    for method in ("nemo", "nvsm"):
        rec = cells[(method, c.seed)]
        assert rec["rows"] == [r for r in rows if r["method"] == method and r["category"] == "car"]
        err = np.load(os.path.join(workdir, f"{method}_car_7", "errors.npz"))["L0"]
        np.testing.assert_allclose(rec["errors_deg"]["L0"], np.degrees(err), atol=6e-3)
        assert rec["config"]["category"] == "car" and rec["config"]["seed"] == c.seed
    rounds = cells[("nvsm", c.seed)]["rounds"]
    assert [r["round"] for r in rounds] == list(range(c.num_rounds + 1))
    assert all(r["agreement"] is not None for r in rounds[1:] if r["num_new"])
    report = results.format_report(list(cells.values()))
    assert "NVSM - NeMo" in report and "pseudo-labels per round" in report


def test_rows_start_from_the_pretrained_backbone_and_rerun_resumes(quick_run):
    c, workdir, report = quick_run
    pre = os.path.join(workdir, "pretrain_car")
    assert os.path.exists(os.path.join(pre, pretrain.PARAMS_FILE))
    for cell in ("nemo_car_7", "nvsm_car_7"):
        saved = json.load(open(os.path.join(workdir, cell, "config.json")))
        assert saved["pretrain_workdir"] == pre, cell
    stamp = {cell: os.path.getmtime(os.path.join(workdir, cell, "rows.json"))
             for cell in ("nemo_car_7", "nvsm_car_7")}
    assert experiment.train_and_evaluate(c, workdir) == report   # every cell loaded, not rerun
    for cell, t in stamp.items():
        assert os.path.getmtime(os.path.join(workdir, cell, "rows.json")) == t


def test_rerun_with_a_changed_config_is_refused(quick_run):
    c, workdir, _ = quick_run
    saved = json.load(open(os.path.join(workdir, "config.json")))   # the run's own record
    assert saved["fewshot_steps"] == c.fewshot_steps
    changed = _tiny(methods=("nemo", "nvsm"), eval_occlusions=("L0",), eval_every_round=False)
    changed.fewshot_steps = 3
    changed.model.feature_dim = 16
    with pytest.raises(training.ConfigMismatchError, match="fewshot_steps: 2 -> 3"):
        experiment.train_and_evaluate(changed, workdir)
    assert json.load(open(os.path.join(workdir, "config.json"))) == saved


@pytest.mark.slow
def test_every_method_and_level_is_reported(tmp_path):
    c = _tiny()
    report = experiment.train_and_evaluate(c, str(tmp_path))
    _check_rows(c, str(tmp_path), report)
    saved = json.load(open(os.path.join(str(tmp_path), "nemo_full_car_all", "config.json")))
    assert saved["pretrain_workdir"] == os.path.join(str(tmp_path), "pretrain_car")


def test_seed_table_marks_missing_cells_and_averages_the_known_ones():
    rows = [{"method": "nemo", "category": "Mean", "annotations": 7, "occlusion": "L0",
             "acc_pi_6": 40.0, "acc_pi_18": 10.0, "med_err_deg": 30.0}]
    table = experiment._seed_table(rows, (7, 20))
    line = next(x for x in table.splitlines() if x.startswith("| nemo |"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    # per metric: 7, 20, mean -> the missing 20-annotation cell is "-", the mean is 7's
    assert cells == ["40.0", "-", "40.0", "10.0", "-", "10.0", "30.0", "-", "30.0"]
