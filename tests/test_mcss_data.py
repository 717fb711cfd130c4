"""Synthetic multi-view generator: synchronisation, projection, storage round trip."""

import numpy as np
import pytest

from nvsm_jax import geometry as geo
from nvsm_jax.mcss import data as mdata
from nvsm_jax.mcss import h36m, metrics
from nvsm_jax.mcss import skeleton as sk


def test_forward_kinematics_keeps_bone_lengths():
    rng = np.random.default_rng(0)
    subj = sk.sample_subject(rng)
    ang = sk.action_angles("JumpingJacks", 30, rng).astype(np.float64)
    j = sk.forward_kinematics(ang, subj["offsets"])
    rest = np.linalg.norm(subj["offsets"], axis=-1)
    for a, b in sk.BONES:
        np.testing.assert_allclose(np.linalg.norm(j[:, b] - j[:, a], axis=-1), rest[b], rtol=1e-5)
    np.testing.assert_allclose(j[:, 0], 0.0)
    # Periodic motion: some later frame revisits frame 0's pose closely.
    later = metrics.mpjpe(j[10:], j[:1])
    assert later.min() < 0.5 * later.max()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mcss_data"))
    mdata.generate_dataset(root, subjects=("S1", "S9"), actions=("Walking", "Boxing"), num_frames=6,
                           num_views=4, image_size=(32, 32), seed=3, log=None)
    return root


def test_views_are_synchronised_and_2d_is_projection(tiny_root):
    seq = h36m.load_sequence(f"{tiny_root}/S1/Walking")
    cams = np.load(f"{tiny_root}/S1/Walking/cameras.npz")
    world = seq["joints_world"]                           # [T, 17, 3]
    jc, j2d = seq["joints_cam"], seq["joints_2d"]         # [V, T, 17, *]
    assert seq["images"].shape == (4, 6, 32, 32, 3)
    r, t = geo.world_to_camera(cams["pose"].astype(np.float64))
    for v in range(4):
        # Camera frame -> world gives the same 3D pose in every view at each index.
        back = np.einsum("ji,tkj->tki", r[v], jc[v] - t[v])
        np.testing.assert_allclose(back, world, atol=0.05)
        # 2D = pinhole projection of the camera-frame 3D joints.
        proj = cams["principal"][v] + cams["focal"][v] * jc[v, ..., :2] / jc[v, ..., 2:3]
        np.testing.assert_allclose(j2d[v], proj, atol=1e-2)
        # The root projects to the crop centre and joints stay inside the crop.
        np.testing.assert_allclose(j2d[v, :, 0], 16.0, atol=1e-3)
        assert np.all((j2d[v] > 0) & (j2d[v] < 32))
    # Root-relative poses of one instant agree across views up to rotation;
    # different instants do not.
    rel = jc - jc[:, :, :1]
    same = metrics.pa_mpjpe(rel[1:, 2], np.broadcast_to(rel[0, 2], rel[1:, 2].shape))
    assert same.max() < 1e-3
    diff = metrics.pa_mpjpe(rel[0, 0], rel[0, 3])
    assert diff > 5.0
    # Views differ as images (different cameras and backgrounds), the subject is drawn.
    imgs = seq["images"].astype(float)
    assert np.abs(imgs[0, 0] - imgs[1, 0]).mean() > 5
    assert imgs.std() > 10


def test_dataset_round_trip_and_regeneration_skipped(tiny_root):
    data = h36m.load_dataset(tiny_root, ["S1", "S9"])
    assert data.subjects == ["S1", "S1", "S9", "S9"] and data.actions == ["Boxing", "Walking"] * 2
    assert len(data) == 4 * 4 * 6 and data.images.dtype == np.uint8
    # Synchronisation in the flat index: frame t of every view shares the pose.
    for s in range(4):
        idx = data.index(s, np.arange(4), 5)
        rel = data.pose3d[idx]
        assert metrics.pa_mpjpe(rel[1:], np.broadcast_to(rel[0], rel[1:].shape)).max() < 1e-3
    # Same config -> no re-rendering (meta.json matches).
    import os
    mtime = os.path.getmtime(f"{tiny_root}/S1/Walking/poses.npz")
    mdata.generate_dataset(tiny_root, subjects=("S1", "S9"), actions=("Walking", "Boxing"),
                           num_frames=6, num_views=4, image_size=(32, 32), seed=3, log=None)
    assert os.path.getmtime(f"{tiny_root}/S1/Walking/poses.npz") == mtime
