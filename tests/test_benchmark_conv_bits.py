"""benchmarks.conv_bits: one fresh process per device count, the 1-device row as the
reference, and the gradient it compares is the convolution's weight gradient."""

import json

import numpy as np

from benchmarks import conv_bits


def test_rows_and_reference(tmp_path):
    out = tmp_path / "c.json"
    result = conv_bits.main(["--counts", "2", "--shape", "1,8,2,3,3,1", "--json", str(out)])
    assert json.load(open(out)) == result
    rows = {r["devices"]: r for r in result["rows"]}
    assert sorted(rows) == [1, 2]                   # the 1-device reference is always run
    assert rows[1]["same_bits_as_1"] and rows[1]["elements_differing"] == 0
    assert rows[1]["elements"] == 3 * 3 * 2 * 3 and rows[1]["max_abs_gradient"] > 0


def test_gradient_is_the_weight_gradient(tmp_path):
    """Against a direct sum: d/dw sum(conv(x, w) * c) = sum over positions of x-patch * c."""
    path = str(tmp_path / "g.npy")
    conv_bits._gradient((1, 5, 2, 3, 3, 1), path)
    g = np.load(path)
    rng = np.random.default_rng(0)                  # the draws _gradient makes, in order
    x = rng.standard_normal((1, 5, 5, 2)).astype(np.float64)
    rng.standard_normal((3, 3, 2, 3))
    c = rng.standard_normal((1, 5, 5, 3)).astype(np.float64)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((3, 3, 2, 3))
    for i in range(3):
        for j in range(3):
            want[i, j] = np.einsum("bhwi,bhwo->io", xp[:, i:i + 5, j:j + 5], c)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
