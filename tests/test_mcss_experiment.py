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
    assert {("mcss", lvl) for lvl in cfg.supervision_levels} <= methods
    assert {("baseline", lvl) for lvl in cfg.supervision_levels} <= methods
    for r in saved["rows"]:
        assert set(r["retrieval"]) == {str(k) for k in cfg.eval.ks}
        assert r["mpjpe"] >= r["n_mpjpe"] - 1e-3 and r["mpjpe"] >= r["pa_mpjpe"] - 1e-3
    assert os.path.exists(os.path.join(workdir, "report.md"))
    assert os.path.exists(os.path.join(workdir, "retrieval.png"))
    # Re-running resumes from the final checkpoints: same numbers.
    res2 = exp.train_and_evaluate(cfg, workdir, log=None)
    assert res2["rows"][0]["mpjpe"] == pytest.approx(res["rows"][0]["mpjpe"], rel=1e-5)
