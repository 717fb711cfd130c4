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
    assert ("untrained", "none") in methods and ("ceiling", "all") in methods
    assert {("mean pose", lvl) for lvl in cfg.supervision_levels} <= methods
    assert {("mcss", lvl) for lvl in cfg.supervision_levels} <= methods
    assert {(exp.BOOTSTRAP, lvl) for lvl in cfg.supervision_levels} <= methods
    assert {("baseline", lvl) for lvl in cfg.supervision_levels} <= methods
    ceiling = [r for r in saved["rows"] if r["method"] == "ceiling"][0]
    assert ceiling["labelled_frames"] == saved["train_frames"]
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


def test_cross_subject_retrieval_reads_pose_not_appearance():
    """Two subjects perform the same 6 poses in 2 views. An embedding of appearance
    only (the subject) finds a right pose within the subject by chance, and across
    subjects never better than chance; an embedding of the pose finds the same pose
    in the other subject at PA-MPJPE 0 (Hit@1 = 1)."""
    import numpy as np
    from nvsm_jax.mcss import retrieval

    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 17, 3)) * 300.0
    pose = np.concatenate([base] * 4)                        # subject-major, then view
    subject = np.repeat(["S9", "S11"], 12)
    view = np.tile(np.repeat([0, 1], 6), 2)
    pid = np.tile(np.arange(6), 4)
    by_pose = np.eye(6)[pid] * 10.0
    xs = retrieval.cross_subject_scores(by_pose, pose, view, subject, ks=(1,), threshold=1.0)
    assert xs["hit"]["1"] == 1.0 and xs["pa_mpjpe"]["1"] < 1e-3
    assert len(xs["queries"]) == 12
    # every neighbour comes from the other subject
    assert np.all(subject[xs["neighbours"][:, 0]] != subject[xs["queries"]])
    # appearance only: the subject plus noise; within-subject retrieval may hit, across never
    by_subject = (subject == "S9")[:, None] * 10.0 + rng.normal(size=(24, 4)) * 0.01
    xs = retrieval.cross_subject_scores(by_subject, pose, view, subject, ks=(1,), threshold=1.0)
    assert np.all(subject[xs["neighbours"][:, 0]] != subject[xs["queries"]])
    assert xs["hit"]["1"] < 0.5
    assert retrieval.cross_subject_scores(by_pose[:12], pose[:12], view[:12], subject[:12]) is None


def test_claims_and_seed_aggregate_by_hand():
    """The protocol's comparisons: baseline 200, ceiling 100, MCSS 170 -> 15 % below
    the baseline, 30 % of the gap closed; over two seeds mean and SE by hand."""
    import numpy as np
    from nvsm_jax.mcss import experiment as exp
    from experiments.configs import mcss as mcss_config

    cfg = mcss_config.get_config("tiny")
    cfg.supervision_levels = ("S1",)
    ret = {"retrieval": {"1": 150.0, "5": 140.0}, "hit": {"1": 0.05, "5": 0.2},
           "retrieval_xs": {"1": 160.0, "5": 150.0}, "hit_xs": {"1": 0.02, "5": 0.1}}

    def rows(mcss, base, ceil):
        return [dict(method="mcss", supervision="S1", mpjpe=mcss, pa_mpjpe=mcss / 2, **ret),
                dict(method="baseline", supervision="S1", mpjpe=base, pa_mpjpe=base / 2, **ret),
                dict(method="baseline", supervision="frac:0.1", mpjpe=1.0, pa_mpjpe=1.0, **ret),
                dict(method="ceiling", supervision="all", mpjpe=ceil, pa_mpjpe=ceil / 2, **ret),
                dict(method="untrained", supervision="none", mpjpe=400.0, pa_mpjpe=300.0, **ret)]

    c = exp.claims(rows(170.0, 200.0, 100.0), cfg)["mcss"]
    assert c["below_baseline"] == pytest.approx(0.15) and c["gap_closed"] == pytest.approx(0.30)
    summary = exp.aggregate([{"rows": rows(170.0, 200.0, 100.0)},
                             {"rows": rows(150.0, 200.0, 100.0)}], cfg)
    mean, se, n = summary["rows"]["mcss"]["mpjpe"]
    assert (mean, n) == (160.0, 2) and se == pytest.approx(np.std([170, 150], ddof=1) / np.sqrt(2))
    assert summary["rows"]["baseline"]["mpjpe"][0] == 200.0          # the S1 row, not frac:0.1
    assert summary["claims"]["mcss"]["gap_closed"][0] == pytest.approx(0.40)
    assert summary["rows"]["mcss"]["hit_xs"][0] == pytest.approx(0.02)
    text = exp.aggregate_markdown(summary, cfg)
    assert "| mcss | 160.0 ± 10.0 | 80.0 ± 5.0 |" in text
    assert "closes 40 ± 10 % of the gap" in text
