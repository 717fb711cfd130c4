"""Metrics, results rows/markdown/json and the error plot."""

import json

import numpy as np

from nvsm_jax import evaluation, geometry


def test_accuracy_and_median():
    e = np.radians([1.0, 5.0, 12.0, 25.0, 40.0, np.nan])   # NaN counts as 90 deg
    assert np.isclose(evaluation.accuracy_at(e, np.pi / 6), 100 * 4 / 6)
    assert np.isclose(evaluation.accuracy_at(e, np.pi / 18), 100 * 2 / 6)
    assert np.isclose(evaluation.median_error_deg(e), (12 + 25) / 2)


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
