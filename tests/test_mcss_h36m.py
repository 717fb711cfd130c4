"""The Human3.6M-layout loader on fixtures written here, and the supervision split."""

import os

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from nvsm_jax.data import DataError
from nvsm_jax.mcss import h36m
from nvsm_jax.mcss import train as mtrain
from nvsm_jax.mcss.skeleton import H36M_32_TO_17


def _write_h36m_fixture(root, subject, action, n_views=2, n_frames=3, size=(20, 24), seed=0,
                        with_joints_cam=False, extra_frames_cam1=0):
    rng = np.random.default_rng(seed)
    base = os.path.join(root, subject, action)
    images = rng.integers(0, 256, size=(n_views, n_frames + extra_frames_cam1, *size, 3),
                          dtype=np.uint8)
    for v in range(n_views):
        os.makedirs(os.path.join(base, f"cam{v}"))
        nt = n_frames + (extra_frames_cam1 if v == 1 else 0)
        for t in range(nt):
            Image.fromarray(images[v, t]).save(os.path.join(base, f"cam{v}", f"{t:06d}.png"))
    world = rng.normal(size=(n_frames, 32, 3)) * 500
    # Tag every mocap joint by its index so the 32->17 map is checkable.
    world[..., 0] = np.arange(32)[None] * 1000.0
    R = Rotation.random(n_views, random_state=seed).as_matrix()
    t = rng.normal(size=(n_views, 3)) * 100 + np.array([0, 0, 5000.0])
    cam = np.einsum("vij,tkj->vtki", R, world) + t[:, None, None]
    np.savez(os.path.join(base, "cameras.npz"), R=R, t=t)
    poses = {"joints_world": world}
    if with_joints_cam:
        poses["joints_cam"] = cam
    np.savez(os.path.join(base, "poses.npz"), **poses)
    return images, world, cam


def test_loader_reads_h36m_layout(tmp_path):
    root = str(tmp_path)
    img_a, world_a, cam_a = _write_h36m_fixture(root, "S9", "Walking 1", extra_frames_cam1=2)
    img_b, world_b, cam_b = _write_h36m_fixture(root, "S9", "Sitting", n_views=2, n_frames=4, seed=1,
                                                with_joints_cam=True)
    _write_h36m_fixture(root, "S11", "Walking", seed=2)
    data = h36m.load_dataset(root, ["S9"])
    # Actions sorted; cam1's extra frames cut to the synchronised length.
    assert data.actions == ["Sitting", "Walking 1"] and data.subjects == ["S9", "S9"]
    assert list(data.seq_frames) == [4, 3] and list(data.seq_views) == [2, 2]
    assert len(data) == 2 * 4 + 2 * 3 and data.images.shape[1:] == (20, 24, 3)
    # Flat index = offset + view * T + t.
    i = data.index(1, 1, 2)
    assert (data.seq_id[i], data.view[i], data.frame[i]) == (1, 1, 2)
    np.testing.assert_array_equal(data.images[i], img_a[1, 2])
    # 32 -> 17 map and camera frame from R, t (sequence "Walking 1").
    np.testing.assert_allclose(data.joints_cam[i], cam_a[1, 2, H36M_32_TO_17], rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(data.joints_cam[data.index(0, 0, 3)], cam_b[0, 3, H36M_32_TO_17],
                               rtol=1e-5, atol=1e-2)
    # The 17 joints are mocap joints [0,1,2,3,6,7,8,12,13,14,15,17,18,19,25,26,27].
    assert list(H36M_32_TO_17) == [0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27]
    # Root-relative target.
    np.testing.assert_allclose(data.pose3d[:, 0], 0.0, atol=1e-3)
    # Resizing on load.
    small = h36m.load_dataset(root, ["S11"], image_size=(8, 8))
    assert small.images.shape == (6, 8, 8, 3)
    with pytest.raises(FileNotFoundError):
        h36m.load_dataset(root, ["S1"])


def test_supervision_split_hides_unlabelled_poses(tmp_path):
    root = str(tmp_path)
    for s, seed in (("S1", 0), ("S5", 1)):
        _write_h36m_fixture(root, s, "Walking", n_views=2, n_frames=10, seed=seed)
    data = h36m.load_dataset(root, ["S1", "S5"])
    mask = mtrain.supervision_mask(data, "S1")
    assert mask.sum() == 20 and np.all(data.subject_of_frame[mask] == "S1")
    ts = mtrain.make_train_set(data, mask)
    assert not hasattr(ts, "joints_cam") and not hasattr(ts, "pose3d")
    assert len(ts.labelled_pose) == 20
    np.testing.assert_allclose(ts.labelled_pose * 1000, data.pose3d[mask], rtol=1e-5, atol=1e-2)
    # Fractions label whole instants (all views).
    fmask = mtrain.supervision_mask(data, "frac:0.2", seed=3)
    assert fmask.sum() == 2 * 2 * 2
    for s in range(2):
        for t in range(10):
            views = fmask[data.index(s, np.arange(2), t)]
            assert views.all() or not views.any()
    with pytest.raises(ValueError):
        mtrain.supervision_mask(data, "S9")


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _rewrite_poses(base, **changes):
    with np.load(os.path.join(base, "poses.npz")) as z:
        poses = {k: z[k] for k in z.files}
    poses.update(changes)
    for k in [k for k, v in poses.items() if v is None]:
        del poses[k]
    np.savez(os.path.join(base, "poses.npz"), **poses)


def _nan_joint(base):
    with np.load(os.path.join(base, "poses.npz")) as z:
        world = z["joints_world"].copy()
    world[2, 13, 1] = np.nan          # mocap joint 13 = joint 8 of the 17 kept
    _rewrite_poses(base, joints_world=world)


@pytest.mark.parametrize("damage,culprit,message", [
    (lambda b: _truncate(os.path.join(b, "cam1", "000001.png")), "cam1/000001.png",
     r"cannot decode image"),
    (lambda b: _truncate(os.path.join(b, "poses.npz")), "poses.npz", r"cannot read"),
    (lambda b: _truncate(os.path.join(b, "cameras.npz")), "cameras.npz", r"cannot read"),
    (lambda b: _rewrite_poses(b, joints_world=None, other=np.zeros(3)), "poses.npz",
     r"no 'joints_world' \(keys: \['other'\]\)"),
    (lambda b: [os.remove(os.path.join(b, "cam1", f)) for f in os.listdir(os.path.join(b, "cam1"))],
     "cam1", r"camera folder holds no \.png/\.jpg frames"),
    (_nan_joint, "poses.npz", r"'joints_world' holds 1 non-finite joint\(s\), first at frame 2, "
                              r"joint 8"),
    (lambda b: _rewrite_poses(b, joints_world=np.zeros((3, 32, 2))), "poses.npz",
     r"'joints_world' must be a number array of shape \[\.\.\., 17 or 32, 3\], got float64 "
     r"\(3, 32, 2\)"),
    (lambda b: np.savez(os.path.join(b, "cameras.npz"), R=np.eye(3)[None], t=np.zeros((1, 3))),
     "cameras.npz", r"for the 2 cam\* folders"),
])
def test_bad_sequence_files_are_named(tmp_path, damage, culprit, message):
    _write_h36m_fixture(str(tmp_path), "S9", "Walking", n_views=2, n_frames=3)
    base = os.path.join(str(tmp_path), "S9", "Walking")
    damage(base)
    with pytest.raises(DataError, match=message) as err:
        h36m.load_dataset(str(tmp_path), ["S9"])
    assert str(err.value).startswith(os.path.join(base, culprit))


def test_nan_in_dropped_mocap_joint_is_harmless_and_joints_cam_checked(tmp_path):
    _, world, _ = _write_h36m_fixture(str(tmp_path), "S9", "Walking", with_joints_cam=True)
    base = os.path.join(str(tmp_path), "S9", "Walking")
    w = world.copy()
    w[0, 4] = np.nan                   # mocap joint 4 is not among the 17
    _rewrite_poses(base, joints_world=w)
    assert len(h36m.load_dataset(str(tmp_path), ["S9"])) == 6
    with np.load(os.path.join(base, "poses.npz")) as z:
        cam = z["joints_cam"].copy()
    cam[1, 2, 0, 2] = np.inf
    _rewrite_poses(base, joints_cam=cam)
    with pytest.raises(DataError, match=r"'joints_cam' holds 1 non-finite joint\(s\), "
                                             r"first at view 1, frame 2, joint 0"):
        h36m.load_dataset(str(tmp_path), ["S9"])


def test_cameras_of_different_lengths_are_cut_with_a_warning(tmp_path, caplog):
    img, _, cam = _write_h36m_fixture(str(tmp_path), "S9", "Walking", n_frames=3,
                                      extra_frames_cam1=2)
    data = h36m.load_dataset(str(tmp_path), ["S9"])
    assert list(data.seq_frames) == [3]
    np.testing.assert_array_equal(data.images[data.index(0, 1, 2)], img[1, 2])
    base = os.path.join(str(tmp_path), "S9", "Walking")
    assert f"{base}: cameras hold cam0 3, cam1 5 frames and joints_world 3; all cut to the " \
           "first 3" in caplog.text
