"""benchmarks.features on a tiny root: one record per backbone x stride x level, fields as
documented, and a query identical to a reference retrieves that reference's pose."""

import json

import numpy as np

from benchmarks import features as bench
from nvsm_jax.data.testing import write_tiny_root


def test_feature_retrieval_records(tmp_path, monkeypatch):
    monkeypatch.setenv("NVSM_JAX_CACHE", str(tmp_path / "cache"))
    write_tiny_root(str(tmp_path / "d" / "train"), "car", num=6, size=(32, 32))
    # the test images are the first training images: retrieval must be exact
    write_tiny_root(str(tmp_path / "d" / "test"), "car", num=3, size=(32, 32))
    out = tmp_path / "f.json"
    bench.main(["--data", str(tmp_path / "d"), "--backbones", "pixels,efficientnet_lite0",
                "--strides", "8", "--levels", "L0", "--references", "6", "--queries", "3",
                "--json", str(out)])
    records = json.load(open(out))
    assert records[0]["name"] == "machine"
    rows = records[1:]
    assert [(r["backbone"], r["stride"], r["level"]) for r in rows] == [
        ("pixels", 8, "L0"), ("efficientnet_lite0", 8, "L0")]
    for r in rows:
        assert r["category"] == "car" and r["references"] == 6 and r["queries"] == 3
        assert r["retrieval_acc_pi_6"] == 100.0 and r["median_err_deg"] < 1e-3
        assert r["flip_rate"] == 0.0 and r["images_per_s"] > 0


def test_cell_masks_and_area_downsample():
    m = np.zeros((1, 8, 8), bool)
    m[0, :4, :6] = True
    cells = bench.cell_masks(m, 4)
    np.testing.assert_array_equal(cells[0], [[True, True], [False, False]])
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    np.testing.assert_allclose(bench._area_downsample(x, 2)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
