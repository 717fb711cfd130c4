"""Metrics, results rows/markdown/json and the error plot."""

import json

import numpy as np
import pytest

from nvsm_jax import evaluation, geometry


def test_accuracy_and_median():
    e = np.radians([1.0, 5.0, 12.0, 25.0, 40.0, np.nan])   # NaN counts as 90 deg
    assert np.isclose(evaluation.accuracy_at(e, np.pi / 6), 100 * 4 / 6)
    assert np.isclose(evaluation.accuracy_at(e, np.pi / 18), 100 * 2 / 6)
    assert np.isclose(evaluation.median_error_deg(e), (12 + 25) / 2)


def test_metrics_on_hand_written_errors():
    """ACC@pi/6, ACC@pi/18 and MedErr on hand-written error lists.

    Oracles written out by hand: the thresholds are exclusive (NeMo counts
    ``error < pi / 6``), an error one ulp below a threshold counts, the median of
    an even count is the mean of the middle two, errors come in radians and the
    median goes out in degrees, and NaN / Inf errors count as 90 degrees (so they
    move the median, not only the accuracies).
    """
    at_30, at_10 = np.pi / 6, np.pi / 18
    below_30, below_10 = np.nextafter(at_30, 0.0), np.nextafter(at_10, 0.0)
    e = np.array([at_30, at_10, below_30, below_10])
    # pi/6: below_30, at_10, below_10 -> 3 of 4; pi/18: only below_10 -> 1 of 4
    assert evaluation.accuracy_at(e, np.pi / 6) == 75.0
    assert evaluation.accuracy_at(e, np.pi / 18) == 25.0
    assert evaluation.accuracy_at(e) == 75.0                      # default threshold pi/6
    # median, even count: (20 + 30) / 2 degrees; odd count: the middle one
    assert np.isclose(evaluation.median_error_deg(np.radians([40.0, 10.0, 30.0, 20.0])), 25.0)
    assert np.isclose(evaluation.median_error_deg(np.radians([30.0, 10.0, 20.0])), 20.0)
    # two non-finite errors out of three: the median is 90 degrees
    assert np.isclose(evaluation.median_error_deg([np.nan, np.inf, np.radians(10.0)]), 90.0)
    assert np.isclose(evaluation.median_error_deg([-np.inf, np.nan, np.radians(10.0)]), 90.0)
    # empty input: NaN, not 0
    assert np.isnan(evaluation.accuracy_at([])) and np.isnan(evaluation.median_error_deg([]))
    # one row: 5, 15, 25, 35 degrees and a failed (NaN) prediction
    row = evaluation.make_row("m", "car", 7, "L0", np.radians([5.0, 15.0, 25.0, 35.0, np.nan]))
    assert row["acc_pi_6"] == 60.0 and row["acc_pi_18"] == 20.0
    assert np.isclose(row["med_err_deg"], 25.0) and row["num_images"] == 5
    # rotation_errors: a prediction with an infinite angle counts as pi / 2
    gt = np.array([[0.3, 0.2, 0.1, 5.0], [0.3, 0.2, 0.1, 5.0]])
    pred = np.array([[0.3, 0.2, 0.1, 9.0], [np.inf, 0.2, 0.1, 5.0]])
    with np.errstate(invalid="ignore"):                          # sin(inf) inside
        errors = evaluation.rotation_errors(pred, gt)
    np.testing.assert_allclose(errors, [0.0, np.pi / 2], atol=1e-7)


def test_accuracy_by_azimuth_centres_sector_zero_on_the_front_view():
    az = np.radians([-10.0, 10.0, 350.0, 14.9, 15.1, 180.0, 190.0, 196.0, 720.0])
    err = np.radians([5.0, 40.0, 1.0, 29.0, 2.0, 179.0, np.nan, 3.0, 0.0])
    acc, counts = evaluation.accuracy_by_azimuth(err, az, 12)
    # by hand: sector 0 = [-15, 15): -10, 10, 350, 14.9, 720 (4 of 5 under 30 deg);
    # sector 1 = [15, 45): 15.1; sector 6 = [165, 195): 180, 190 (NaN = miss); sector 7: 196
    expect_counts = np.zeros(12, int)
    expect_counts[[0, 1, 6, 7]] = [5, 1, 2, 1]
    np.testing.assert_array_equal(counts, expect_counts)
    np.testing.assert_allclose(acc[[0, 1, 6, 7]], [80.0, 100.0, 0.0, 100.0])
    assert np.isnan(acc[[2, 3, 4, 5, 8, 9, 10, 11]]).all()
    table = evaluation.azimuth_table([{"label": "nemo (7)", "acc": acc, "counts": counts}])
    assert "| images | 5 | 1 | 0 |" in table and "| nemo (7) | 80 | 100 | - |" in table
    with pytest.raises(ValueError, match="3 errors but 2 azimuths"):
        evaluation.accuracy_by_azimuth(np.zeros(3), np.zeros(2))


def test_rotation_errors_and_rows(tmp_path):
    gt = geometry.make_pose(np.array([0.1, 1.0, 2.0]), np.array([0.2, 0.3, 0.0]),
                            np.zeros(3), 5.0, xnp=np)
    pred = gt.copy()
    pred[1, 0] += np.radians(20)
    pred[2, :3] = np.nan
    e = evaluation.rotation_errors(pred, gt)
    np.testing.assert_allclose(np.degrees(e), [0, 20, 90], atol=1e-3)
    rows = [evaluation.make_row("NeMo", "car", 7, "L0", e),
            evaluation.make_row("NeMo", "bus", 7, "L0", np.radians([1.0]))]
    mean = evaluation.mean_rows(rows, {("NeMo", "car", 7, "L0"): e,
                                       ("NeMo", "bus", 7, "L0"): np.radians([1.0])})
    assert len(mean) == 1 and mean[0]["num_images"] == 4
    assert np.isclose(mean[0]["acc_pi_6"], 75.0)          # weighted by image count
    assert np.isclose(mean[0]["med_err_deg"], 10.5, atol=1e-3)  # pooled median of 0,1,20,90
    jpath, mpath = evaluation.write_results(tmp_path, rows + mean)
    data = json.load(open(jpath))
    assert {"method", "category", "annotations", "occlusion", "acc_pi_6", "acc_pi_18",
            "med_err_deg"} <= set(data["rows"][0])
    assert "| NeMo | Mean |" in open(mpath).read()
    png = evaluation.plot_error_distribution({"L0": e}, tmp_path / "err.png")
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_evaluate_cli_rows_files_and_top_k(tmp_path):
    """``nemo_evaluate.evaluate_workdir`` (the ``experiments.evaluate`` CLI) on a test root: a row
    per level plus the mean, the predictions of every image, the solver actually used
    (``--top_k`` override)."""
    import os

    from experiments.configs import nemo as nemo_config
    from nvsm_jax import meshes, parallel
    from nvsm_jax.nemo import train as nemo_train
    from nvsm_jax.nemo import evaluate as nemo_evaluate
    from nvsm_jax.data.testing import write_tiny_root

    root = str(tmp_path / "test")
    write_tiny_root(root, "car", num=3, size=(32, 32), occlusion="L0")
    cfg = nemo_config.get_config("tiny")
    cfg.eval_batch_size = 4
    model = nemo_train.build_model(cfg.model)
    object_mesh = meshes.cuboid_mesh([-0.5, -1.0, -0.4], [0.5, 1.0, 0.4], 100)
    state = nemo_train.init_state(cfg, model, len(object_mesh.verts), (32, 32), parallel.make_mesh(1))
    nemo = nemo_train.nemo_model(cfg, model, state, object_mesh)
    out = str(tmp_path / "eval")
    rows = nemo_evaluate.evaluate_workdir(str(tmp_path), root, nemo=nemo, out_dir=out,
                                         occlusions=["L0", "L3"], top_k=2)
    assert (rows[0]["method"], rows[0]["occlusion"]) == ("NeMo", "L0")
    assert not any(r["occlusion"] == "L3" for r in rows)   # missing level: skipped, not fatal
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["solver"]["top_k"] == 2 and saved["timing"]["L0"]["images"] == 3
    pred = np.load(os.path.join(out, "predictions_L0.npz"))
    assert pred["pred"].shape == (3, 4) and np.isfinite(pred["error"]).all()
    assert os.path.exists(os.path.join(out, "error_distribution.png"))
    with np.testing.assert_raises(ValueError):
        nemo_evaluate.evaluate_workdir(str(tmp_path), root, nemo=nemo, out_dir=out, top_k=0)


def test_train_nemo_cli_evaluates_after_training(tmp_path):
    """``train_nemo --evaluate`` trains, then evaluates in the same process (it used to
    die with absl's DuplicateFlagError: the library imported the evaluate binary)."""
    import os
    import subprocess
    import sys

    from nvsm_jax.data.testing import write_tiny_root

    train_root, test_root = str(tmp_path / "train"), str(tmp_path / "test")
    write_tiny_root(train_root, "car", num=8, size=(32, 32))
    write_tiny_root(test_root, "car", num=2, size=(32, 32), seed=1)
    work = str(tmp_path / "work")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "experiments.train_nemo",
           "--config", os.path.join(repo, "experiments", "configs", "nemo.py") + ":tiny",
           "--workdir", work, f"--config.data_root={train_root}",
           f"--config.test_root={test_root}", "--config.eval_occlusions=('L0',)",
           "--config.num_steps=2", "--evaluate"]
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(os.path.join(work, "results.json")))["rows"]
    assert rows[0]["occlusion"] == "L0" and rows[0]["num_images"] == 2


def test_error_distribution_labels_thresholds_on_a_log_axis(tmp_path, monkeypatch):
    """The error CDF: a log x axis from 0.5 deg (an error of 0 drawn there, no "0" tick),
    both threshold lines labelled with their angle, one legend entry per level with its
    image count, and the curve's y values the percent of images at or below each error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    e = np.radians([0.0, 5.0, 20.0, 100.0])
    evaluation.plot_error_distribution({"L0": e, "L1": e[1:]}, tmp_path / "err.png")
    (fig,) = kept
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlim() == (0.5, 180)
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["1", "3", "10", "30", "90", "180"]
    texts = {t.get_text(): t.get_position()[0] for t in ax.texts}
    assert set(texts) == {"π/18 = 10°", "π/6 = 30°"}
    assert 10 < texts["π/18 = 10°"] < 12 and 30 < texts["π/6 = 30°"] < 35
    assert sorted(line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--") \
        == [10, 30]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["L0 (n=4)", "L1 (n=3)"]
    curve = ax.lines[0]
    np.testing.assert_allclose(curve.get_xdata(), [0.5, 5.0, 20.0, 100.0], atol=1e-9)
    np.testing.assert_allclose(curve.get_ydata(), [25.0, 50.0, 75.0, 100.0])
    plt.close(fig)


def test_load_model_names_a_folder_without_a_checkpoint_and_creates_nothing(tmp_path):
    """A workdir with a config record but no checkpoint (a run that failed before its
    first save, or a few-shot top folder): a RunStateError naming it, before any model
    is built, and no ``checkpoints/`` folder made."""
    import json

    import pytest

    from nvsm_jax.errors import RunStateError
    from nvsm_jax.nemo import train as nemo_train

    (tmp_path / "config.json").write_text(json.dumps({"category": "car"}))
    with pytest.raises(RunStateError, match=r"no checkpoint in .*checkpoints; is .* a trained"):
        nemo_train.load_model(tmp_path)
    assert not (tmp_path / "checkpoints").exists()
