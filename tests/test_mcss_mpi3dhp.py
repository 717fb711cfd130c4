"""The MPI-INF-3DHP loader on a small fixture written here with scipy.io.savemat."""

import os

import numpy as np
import pytest
import scipy.io
from PIL import Image

from nvsm_jax.data import DataError
from nvsm_jax.mcss import mpi_inf_3dhp as mpi

# The 28 -> 17 map as the dataset's documentation gives it (independent of the module).
MAP = [4, 23, 24, 25, 18, 19, 20, 3, 5, 7, 6, 9, 10, 11, 14, 15, 16]
FULL = (60, 80)          # full frame H, W
BOX = (20, 30, 40, 50)   # x0, y0, x1, y1 of the 2D joints in every frame (a 20 px square)


def _cells(arrays):
    c = np.empty((len(arrays), 1), dtype=object)
    for i, a in enumerate(arrays):
        c[i, 0] = a
    return c


def _annot(n_frames, seed=0, n_cams=14, short_cam=None):
    """annot2 / annot3 / univ_annot3 cells; joint j of camera c at frame t is tagged
    (x = 1000 j, y = 10 c + t) in annot3, and univ_annot3 = annot3 / 2."""
    rng = np.random.default_rng(seed)
    a2, a3, u3 = [], [], []
    for c in range(n_cams):
        t_len = n_frames - 1 if c == short_cam else n_frames
        j3 = rng.normal(size=(t_len, 28, 3)) * 100
        j3[..., 0] = np.arange(28)[None] * 1000.0
        j3[..., 1] = 10 * c + np.arange(t_len)[:, None]
        j2 = np.empty((t_len, 28, 2))
        j2[..., 0] = rng.uniform(BOX[0], BOX[2], size=(t_len, 28))
        j2[..., 1] = rng.uniform(BOX[1], BOX[3], size=(t_len, 28))
        # The 17 kept joints span the box exactly.
        j2[:, MAP[0]] = (BOX[0], BOX[1])
        j2[:, MAP[1]] = (BOX[2], BOX[3])
        a2.append(j2.reshape(t_len, 56))
        a3.append(j3.reshape(t_len, 84))
        u3.append(j3.reshape(t_len, 84) / 2)
    return {"annot2": _cells(a2), "annot3": _cells(a3), "univ_annot3": _cells(u3),
            "cameras": np.arange(n_cams)[None], "frames": np.arange(n_frames)[:, None]}


def _frame(c, t):
    """A full frame whose box region holds a pattern unique to (c, t)."""
    img = np.zeros((*FULL, 3), np.uint8)
    yy, xx = np.mgrid[0:20, 0:20]
    img[BOX[1]:BOX[3], BOX[0]:BOX[2], 0] = 10 * xx
    img[BOX[1]:BOX[3], BOX[0]:BOX[2], 1] = 10 * yy
    img[BOX[1]:BOX[3], BOX[0]:BOX[2], 2] = 20 * c + 5 * t
    return img


def write_fixture(root, subject="S1", seq="Seq1", n_frames=6, cameras=(0, 2, 5), **kw):
    d = os.path.join(root, subject, seq)
    os.makedirs(d, exist_ok=True)
    scipy.io.savemat(os.path.join(d, "annot.mat"), _annot(n_frames, **kw))
    for c in cameras:
        fd = os.path.join(d, "imageFrames", f"video_{c}")
        os.makedirs(fd, exist_ok=True)
        for t in range(n_frames):
            Image.fromarray(_frame(c, t)).save(os.path.join(fd, f"frame_{t + 1:06d}.png"))
    return d


def test_joint_map_cameras_frames_and_crops(tmp_path):
    d = write_fixture(str(tmp_path))
    seq = mpi.load_sequence(d, cameras=(5, 0), image_size=(20, 20), frame_step=2, crop_scale=1.0)
    assert seq["images"].shape == (2, 3, 20, 20, 3)
    np.testing.assert_array_equal(seq["frames"], [0, 2, 4])
    jc = seq["joints_cam"]
    assert jc.shape == (2, 3, 17, 3)
    np.testing.assert_array_equal(jc[..., 0], np.broadcast_to(np.array(MAP) * 1000.0, (2, 3, 17)))
    for vi, c in enumerate((5, 0)):
        for ti, t in enumerate((0, 2, 4)):
            np.testing.assert_allclose(jc[vi, ti, :, 1], 10 * c + t)
            # crop_scale 1 and a 20 px box -> the crop is the box region itself
            want = _frame(c, t)[BOX[1]:BOX[3], BOX[0]:BOX[2]].astype(int)
            np.testing.assert_allclose(seq["images"][vi, ti].astype(int), want, atol=6)
    # 2D joints in the crop: the box corners map to the crop corners.
    np.testing.assert_allclose(seq["joints_2d"][:, :, 0], 0.0, atol=1e-4)
    np.testing.assert_allclose(seq["joints_2d"][:, :, 1], 20.0, atol=1e-4)
    uni = mpi.load_sequence(d, cameras=(5, 0), image_size=(20, 20), frame_step=2,
                            joints="univ_annot3", load_images=False)
    np.testing.assert_allclose(uni["joints_cam"], jc / 2, rtol=1e-6)


def test_crop_scale_pads_with_black(tmp_path):
    d = write_fixture(str(tmp_path), n_frames=1, cameras=(0,))
    seq = mpi.load_sequence(d, cameras=(0,), image_size=(40, 40), crop_scale=2.0)
    img = seq["images"][0, 0].astype(int)
    # side 40 around the box centre (30, 40): the box is the middle 20 x 20
    want = _frame(0, 0)[BOX[1]:BOX[3], BOX[0]:BOX[2]].astype(int)
    np.testing.assert_allclose(img[10:30, 10:30], want, atol=6)
    assert img[:10].max() == 0 and img[30:].max() == 0   # rows outside the box: black


def test_dataset_flattening_and_the_shortest_camera_cut(tmp_path, caplog):
    root = str(tmp_path)
    write_fixture(root, "S1", "Seq1", n_frames=5)
    write_fixture(root, "S2", "Seq1", n_frames=4, short_cam=2)
    data = mpi.load_dataset(root, ("S1", "S2"), sequences=("Seq1",), cameras=(0, 2),
                            image_size=(16, 16))
    assert "cut to the first 3" in caplog.text
    assert data.subjects == ["S1", "S2"] and data.actions == ["Seq1", "Seq1"]
    np.testing.assert_array_equal(data.seq_frames, [5, 3])
    assert len(data) == 2 * 5 + 2 * 3
    i = data.index(1, 1, 2)                   # S2, camera 2, frame 2
    assert data.view[i] == 1 and data.frame[i] == 2 and data.seq_id[i] == 1
    np.testing.assert_allclose(data.joints_cam[i, :, 1], 10 * 2 + 2)
    assert data.pose3d.shape == (len(data), 17, 3)
    np.testing.assert_allclose(data.pose3d[:, 0], 0.0)


def test_bad_inputs_name_the_file(tmp_path):
    root = str(tmp_path)
    d = write_fixture(root, n_frames=3, cameras=(0,))
    mat = os.path.join(d, "annot.mat")
    with pytest.raises(DataError, match="camera 14 was asked"):
        mpi.load_sequence(d, cameras=(14,), load_images=False)
    with pytest.raises(DataError, match=r"video_2.*frame_000001.*not found"):
        mpi.load_sequence(d, cameras=(2,))
    # wrong shapes
    a = _annot(3)
    a["annot3"][1, 0] = a["annot3"][1, 0][:, :83]
    scipy.io.savemat(mat, a)
    with pytest.raises(DataError, match=r"annot\.mat.*'annot3' of camera 1 must be \[T, 84\]"):
        mpi.load_sequence(d, cameras=(0, 1), load_images=False)
    # non-finite joints
    a = _annot(3)
    a["annot2"][0, 0][2, 5] = np.nan
    scipy.io.savemat(mat, a)
    with pytest.raises(DataError, match=r"annot\.mat.*non-finite.*frame 2"):
        mpi.load_sequence(d, cameras=(0,), load_images=False)
    # a missing key
    a = _annot(3)
    del a["annot3"]
    scipy.io.savemat(mat, a)
    with pytest.raises(DataError, match=r"annot\.mat: no 'annot3'"):
        mpi.load_sequence(d, cameras=(0,), load_images=False)
    # not a MATLAB file
    with open(mat, "wb") as f:
        f.write(b"not a mat file")
    with pytest.raises(DataError, match=r"annot\.mat: cannot read"):
        mpi.load_sequence(d, cameras=(0,), load_images=False)
    os.remove(mat)
    with pytest.raises(DataError, match=r"annot\.mat: not found"):
        mpi.load_sequence(d, cameras=(0,), load_images=False)
    # a corrupt frame image
    d2 = write_fixture(os.path.join(root, "b"), n_frames=2, cameras=(0,))
    bad = os.path.join(d2, "imageFrames", "video_0", "frame_000002.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"frame_000002\.png: cannot decode"):
        mpi.load_sequence(d2, cameras=(0,))


def test_experiment_reads_3dhp_through_the_config(tmp_path):
    from experiments.configs import mcss as mcss_config
    from nvsm_jax.mcss import experiment as exp

    root = str(tmp_path)
    for s in ("S1", "S2", "S3"):
        write_fixture(root, s, "Seq1", n_frames=4, cameras=(0, 1))
    cfg = mcss_config.get_config("tiny")
    cfg.data.format = "3dhp"
    cfg.data.root = root
    cfg.data.mpi.update(train_subjects=("S1", "S2"), test_subjects=("S3",), sequences=("Seq1",),
                        cameras=(0, 1), frame_step=1)
    train, test = exp.load_data(cfg, root)
    assert train.subjects == ["S1", "S2"] and test.subjects == ["S3"]
    assert train.images.shape[1:] == (*cfg.data.image_size, 3)
    cfg.data.root = ""
    with pytest.raises(ValueError, match="data.root"):
        exp.train_and_evaluate(cfg, str(tmp_path / "w"), log=None)
