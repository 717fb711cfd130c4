"""Multi-view pseudo-labels against scipy rotations and hand-built sequences."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from nvsm_jax.mcss import fusion


def _sequence(rng, views=4, times=10, joints=17):
    """A pose per instant seen by ``views`` cameras: view v = R_v^T world."""
    world = rng.normal(size=(times, joints, 3))
    world -= world[:, :1]
    rots = Rotation.random(views, random_state=1).as_matrix()          # camera v -> world
    cams = np.einsum("vji,tkj->vtki", rots, world)                     # R_v^T p
    return world, rots, cams


def test_kabsch_recovers_a_scipy_rotation_and_keeps_det_one():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 3))
    r = Rotation.from_euler("xyz", [30, -50, 110], degrees=True).as_matrix()
    np.testing.assert_allclose(fusion.kabsch(a, a @ r.T), r, atol=1e-10)
    # a mirrored cloud: the best proper rotation, never a reflection
    m = fusion.kabsch(a, a * np.array([1, 1, -1]))
    assert np.linalg.det(m) == pytest.approx(1.0)


def test_view_rotations_map_every_camera_into_view_0():
    rng = np.random.default_rng(1)
    _, rots, cams = _sequence(rng)
    r = fusion.view_rotations(cams)
    want = np.einsum("ji,vjk->vik", rots[0], rots)                    # R_0^T R_v
    np.testing.assert_allclose(r, want, atol=1e-9)
    with pytest.raises(ValueError, match="no instants"):
        fusion.view_rotations(cams, np.zeros(cams.shape[1], bool))


def test_pseudo_labels_fuse_noisy_views_and_keep_true_labels():
    rng = np.random.default_rng(2)
    world, rots, cams = _sequence(rng, times=12)
    noisy = cams + 0.1 * rng.normal(size=cams.shape)
    noisy[2, 5] = -cams[2, 5]                     # one view's instant badly wrong
    labelled = np.zeros(12, bool)
    labelled[[0, 7]] = True
    out = fusion.sequence_pseudo_labels(noisy, cams, labelled)
    np.testing.assert_allclose(out[:, labelled], cams[:, labelled])
    err_fused = np.linalg.norm(out - cams, axis=-1)[:, ~labelled].mean()
    err_single = np.linalg.norm(noisy - cams, axis=-1)[:, ~labelled].mean()
    assert err_fused < 0.75 * err_single
    # the flipped view's instant is repaired by the other three (median)
    assert np.linalg.norm(out[2, 5] - cams[2, 5], axis=-1).mean() < 0.2
    # without labels the rotations come from the predictions themselves
    free = fusion.sequence_pseudo_labels(cams + 0.01 * rng.normal(size=cams.shape))
    np.testing.assert_allclose(free, cams, atol=0.05)


def test_flat_pseudo_labels_follow_the_frame_layout():
    rng = np.random.default_rng(3)
    seqs = [_sequence(rng, views=3, times=5)[2], _sequence(rng, views=2, times=4)[2]]
    flat = np.concatenate([s.reshape(-1, 17, 3) for s in seqs])
    offset, views, frames = np.array([0, 15]), np.array([3, 2]), np.array([5, 4])
    lab = np.array([0 * 5 + 2, 1 * 5 + 2, 2 * 5 + 2, 15 + 1])   # seq 0 instant 2 in all views;
    pred = flat + 0.05 * rng.normal(size=flat.shape)             # seq 1 instant 1 in view 0 only
    out = fusion.pseudo_labels(pred, offset, views, frames, lab, flat[lab])
    np.testing.assert_allclose(out[lab], flat[lab], atol=1e-6)
    assert np.abs(out - flat).mean() < np.abs(pred - flat).mean()
