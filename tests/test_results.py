"""The tracked results folder: records, aggregation over seeds, paired differences."""

import json
import os

import numpy as np
import pytest

from nvsm_jax import evaluation, results


def _record(root, method, seed, errors_deg, category="car", config=None, rounds=None):
    err = {"L0": np.radians(np.asarray(errors_deg, np.float64))}
    rows = [evaluation.make_row(method, category, 7, "L0", err["L0"])]
    return results.record_cell(root, method=method, category=category, annotations=7,
                               seed=seed, rows=rows, errors=err,
                               config=config or {"fewshot_steps": 200, "seed": seed,
                                                 "cls": {"seed": seed, "num_steps": 200},
                                                 "data_root": f"/runs/s{seed}"},
                               rounds=rounds)


def test_seeds_average_with_their_standard_error_and_pair_on_the_same_images(tmp_path):
    root = str(tmp_path)
    nemo = {0: [10, 40, 50, 60], 1: [10, 20, 50, 60], 2: [5, 40, 50, 70]}   # 25 / 50 / 25 %
    nvsm = {0: [10, 20, 25, 60], 1: [10, 20, 50, 60], 2: [5, 20, 25, 10]}   # 75 / 50 / 100 %
    for seed in nemo:
        _record(root, "nemo", seed, nemo[seed])
        _record(root, "nvsm", seed, nvsm[seed],
                rounds=[{"round": 0, "num_pseudo": 0, "precision": None},
                        {"round": 1, "num_pseudo": 15, "precision": 0.8, "agreement": 0.9}])
    cells = results.load_cells(root)
    assert len(cells) == 6
    rows = {(r["method"], r["category"]): r for r in results.aggregate(cells)}
    nv = rows[("nvsm", "car")]
    assert nv["seeds"] == 3 and nv["acc_pi_6"] == pytest.approx(75.0)
    assert nv["acc_pi_6_se"] == pytest.approx(np.std([75, 50, 100], ddof=1) / np.sqrt(3))
    assert nv["med_err_deg"] == pytest.approx(np.mean([22.5, 35.0, 15.0]))
    assert rows[("nvsm", "Mean")]["acc_pi_6"] == pytest.approx(75.0)
    (d,) = results.paired_differences(cells)
    np.testing.assert_allclose(d["per_seed"], [50.0, 0.0, 75.0])
    assert d["diff"] == pytest.approx(125.0 / 3)
    assert d["se"] == pytest.approx(np.std([50, 0, 75], ddof=1) / np.sqrt(3))
    report = results.format_report(cells)
    assert "75.0 ± " in report and "+41.7 ±" in report
    assert "15 @ 0.80 (agree 0.90)" in report


def test_one_seed_reports_the_binomial_and_paired_image_errors(tmp_path):
    root = str(tmp_path)
    _record(root, "nemo", 0, [10, 40, 50, 60, 70])       # 1 / 5 right
    _record(root, "nvsm", 0, [10, 20, 50, 60, 25])       # 3 / 5
    cells = results.load_cells(root)
    nv = next(r for r in results.aggregate(cells) if r["method"] == "nvsm")
    assert nv["acc_pi_6_se"] == pytest.approx(100 * np.sqrt(0.6 * 0.4 / 5))
    (d,) = results.paired_differences(cells)
    diff = np.array([0, 1, 0, 0, 1], float)
    assert d["diff"] == pytest.approx(40.0)
    assert d["se"] == pytest.approx(100 * np.std(diff, ddof=1) / np.sqrt(5))


def test_cells_with_other_settings_are_not_averaged(tmp_path):
    root = str(tmp_path)
    _record(root, "nvsm", 0, [10, 20], config={"fewshot_steps": 200, "seed": 0})
    _record(root, "nvsm", 1, [10, 20], config={"fewshot_steps": 600, "seed": 1})
    with pytest.raises(ValueError, match="fewshot_steps: 200 -> 600"):
        results.aggregate(results.load_cells(root))


def test_a_damaged_record_is_named(tmp_path):
    path = _record(str(tmp_path), "nemo", 0, [10])
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=os.path.basename(os.path.dirname(path))):
        results.load_cells(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing"):
        results.load_cells(str(tmp_path / "missing"))
    with open(path, "w") as f:
        json.dump({"method": "nemo"}, f)
    with pytest.raises(ValueError, match="not a cell record"):
        results.load_cells(str(tmp_path))


def test_oracle_rows_are_recorded_apart_and_paired_with_nemo(tmp_path):
    assert results.recorded_method("nvsm", "random_true") == "nvsm_random_true"
    assert results.recorded_method("nvsm", "none") == "nvsm"
    assert results.recorded_method("nemo", "random_true") == "nemo"
    root = str(tmp_path)
    _record(root, "nemo", 0, [10, 40, 50, 60, 70])                      # 1 / 5
    _record(root, "nvsm", 0, [10, 20, 50, 60, 25],                      # 3 / 5
            rounds=[{"round": 1, "num_pseudo": 15, "precision": 0.8, "median_err_deg": 11.04,
                     "flip_rate": 0.0667, "sectors_covered": 9}])
    _record(root, results.recorded_method("nvsm", "random_true"), 0, [10, 20, 25, 5, 25])
    cells = results.load_cells(root)
    report = results.format_report(cells)
    assert "| nvsm | car | 7 | L0 | +40.0 ±" in report
    assert "| nvsm_random_true | car | 7 | L0 | +80.0 ±" in report
    assert "| 15 @ 0.80 | 11.0 | 6.7 % | 9 |" in report


def test_a_row_that_ran_fewer_categories_says_so_in_the_mean_table(tmp_path):
    root = str(tmp_path)
    for cat in ("car", "sofa"):
        _record(root, "nemo", 0, [10, 40, 50, 60], category=cat)
    _record(root, results.recorded_method("nvsm", "true_poses"), 0, [10, 20, 50, 60])
    report = results.format_report(results.load_cells(root))
    assert "## L0, mean over the 2 categories" in report
    assert "| nemo | 25.0 ± " in report
    assert "| nvsm_true_poses (mean of 1) | 50.0 ± " in report
