"""MCSS pose metrics against hand-computed cases and scipy oracles."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.transform import Rotation

from nvsm_jax.mcss import metrics


def _pose(seed=0, n=17):
    return np.random.default_rng(seed).normal(size=(n, 3)) * 300


def test_mpjpe_hand_case():
    gt = np.zeros((17, 3))
    pred = np.zeros((17, 3))
    pred[1:, 0] = 10.0          # root stays, 16 joints off by 10 mm
    assert metrics.mpjpe(pred, gt) == pytest.approx(10.0 * 16 / 17)
    # Root-centring removes a global translation.
    assert metrics.mpjpe(gt + 5.0, gt) == pytest.approx(0.0)
    # 3-4-5 triangle.
    pred2 = gt.copy()
    pred2[3] = [3.0, 4.0, 0.0]
    assert metrics.mpjpe(pred2, gt) == pytest.approx(5.0 / 17)


def test_n_mpjpe_removes_scale_only():
    g = _pose(1)
    g = g - g[:1]
    assert metrics.n_mpjpe(2.5 * g, g) == pytest.approx(0.0, abs=1e-9)
    rot = Rotation.from_euler("xyz", [0.3, -0.2, 0.9]).as_matrix()
    assert metrics.n_mpjpe(g @ rot.T, g) > 10.0


@pytest.mark.parametrize("xnp", [np, jnp])
def test_pa_mpjpe_zero_for_similarity_copy(xnp):
    g = _pose(2)
    rot = Rotation.from_euler("zyx", [1.1, -0.4, 2.0]).as_matrix()
    pred = 0.37 * g @ rot.T + np.array([100.0, -40.0, 7.0])
    err = metrics.pa_mpjpe(xnp.asarray(pred, xnp.float32 if xnp is jnp else np.float64),
                           xnp.asarray(g, pred.dtype if xnp is np else xnp.float32))
    assert float(err) == pytest.approx(0.0, abs=1e-2 if xnp is jnp else 1e-8)
    # ... but not for a reflected copy.
    assert float(metrics.pa_mpjpe(g * np.array([1, 1, -1.0]), g)) > 1.0


def test_procrustes_matches_scipy_oracle():
    rng = np.random.default_rng(3)
    for _ in range(5):
        g = _pose(int(rng.integers(1000)))
        p = g + rng.normal(size=g.shape) * 80 + 30
        aligned = metrics.procrustes_align(p, g)
        # Oracle: centre, scipy rotation, then least-squares scale.
        pc, gc = p - p.mean(0), g - g.mean(0)
        r, s = orthogonal_procrustes(pc, gc)        # pc @ r ~ gc, s = trace of sigma
        assert np.linalg.det(r) > 0                 # no reflection for these noisy copies
        scale = s / np.sum(pc ** 2)
        oracle = scale * pc @ r + g.mean(0)
        np.testing.assert_allclose(aligned, oracle, atol=1e-6)
        # Alignment never increases the error.
        assert metrics.pa_mpjpe(p, g) <= metrics.mpjpe(p, g, root_centred=False) + 1e-9


def test_batched_shapes():
    g = np.stack([_pose(i) for i in range(6)]).reshape(2, 3, 17, 3)
    assert metrics.pa_mpjpe(g, g).shape == (2, 3)
    assert metrics.mpjpe(jnp.asarray(g), jnp.asarray(g)).shape == (2, 3)
