"""End-to-end tiny MCSS experiment (data -> train -> eval -> results.json); slow."""

import json
import os

import pytest


@pytest.mark.slow
def test_tiny_experiment_end_to_end_and_resume(tmp_path):
    from nvsm_jax.mcss import experiment as exp
    from experiments.configs import mcss as mcss_config

    cfg = mcss_config.get_config("tiny")
    workdir = str(tmp_path / "w")
    res = exp.train_and_evaluate(cfg, workdir, log=None)
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    methods = {(r["method"], r["supervision"]) for r in saved["rows"]}
    assert ("random", "none") in methods
    assert {("mean pose", lvl) for lvl in cfg.supervision_levels} <= methods
    assert {("mcss", lvl) for lvl in cfg.supervision_levels} <= methods
    assert {("baseline", lvl) for lvl in cfg.supervision_levels} <= methods
    for r in saved["rows"]:
        assert set(r["retrieval"]) == {str(k) for k in cfg.eval.ks}
        if r["method"] != "mean pose":     # least-squares scale need not lower a constant's
            assert r["mpjpe"] >= r["n_mpjpe"] - 1e-3 and r["mpjpe"] >= r["pa_mpjpe"] - 1e-3
    # The mean-pose row against numpy: the mean labelled training pose for every test frame.
    import numpy as np
    from nvsm_jax.mcss import train as mtrain

    train, test = exp.load_data(cfg, os.path.join(workdir, "data"))
    for level in cfg.supervision_levels:
        mask = mtrain.supervision_mask(train, level, cfg.seed)
        mean = train.pose3d[mask].astype(np.float64).mean(0)
        want = np.linalg.norm(test.pose3d - mean[None], axis=-1).mean()
        row = [r for r in saved["rows"] if r["method"] == "mean pose" and r["supervision"] == level]
        assert len(row) == 1 and row[0]["mpjpe"] == pytest.approx(want, rel=1e-4)
    assert os.path.exists(os.path.join(workdir, "report.md"))
    assert os.path.exists(os.path.join(workdir, "retrieval.png"))
    # Re-running resumes from the final checkpoints: same numbers.
    res2 = exp.train_and_evaluate(cfg, workdir, log=None)
    assert res2["rows"][0]["mpjpe"] == pytest.approx(res["rows"][0]["mpjpe"], rel=1e-5)


def test_mean_pose_rows_in_the_report():
    """report.md lists the mean-pose row in both tables (no training: a results dict)."""
    from nvsm_jax.mcss import experiment as exp
    from experiments.configs import mcss as mcss_config

    cfg = mcss_config.get_config("tiny")
    ret = {"retrieval": {"1": 150.0, "5": 140.0}, "hit": {"1": 0.05, "5": 0.2}}
    rows = [dict(method="mean pose", supervision="S1", labelled_frames=10, mpjpe=206.0,
                 n_mpjpe=200.0, pa_mpjpe=183.3, **ret),
            dict(method="mcss", supervision="S1", labelled_frames=10, mpjpe=150.0,
                 n_mpjpe=140.0, pa_mpjpe=100.0, **ret,
                 bootstrap=[dict(round=1, test_mpjpe_before=170.0, pseudo_labels=90,
                                 pseudo_mpjpe=80.0, single_view_mpjpe=100.0)])]
    text = exp.report_markdown({"rows": rows, "train_frames": 1, "test_frames": 1, "devices": 1,
                                "total_seconds": 1.0, "data_seconds": 0.0}, cfg)
    assert "| mean pose | S1 | 10 | 206.0 | 200.0 | 183.3 |" in text
    assert "| mean pose | S1 | 150.0 | 140.0 | 0.05 | 0.20 |" in text
    assert "| S1 | 1 | 170.0 | 150.0 | 90 | 80.0 | 100.0 |" in text
