"""Human3.6M archive preparation (nvsm_jax.mcss.h36m_archives, experiments.prepare_h36m).

Each test writes a tiny fake release: D3_Positions / D3_Positions_mono /
D2_Positions CDFs made from one world motion seen by synthetic cameras, and
videos (mp4 through ffmpeg, or frame folders) in which the root joint is drawn
as a green blob and the head-top joint as a red one at their D2 positions.
The prepared folders are read back with ``nvsm_jax.mcss.h36m``; the oracles
are the CDF values themselves and the blobs' centroids in the crops.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

from nvsm_jax.data import DataError
from nvsm_jax.mcss import h36m_archives as ha
from nvsm_jax.mcss import h36m

W, H = 96, 80                          # video frames (multiples of 16 for the encoder)
FOCAL, CX, CY = 150.0, 48.0, 40.0
HEAD_32, HEAD_17 = 15, 10              # head top, in the 32- and 17-joint orders
CAMS2 = ("54138969", "55011271")


def _write_cdf(path, pose):
    from cdflib.cdfwrite import CDF
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.remove(path)
    t, d = pose.shape[0], pose.shape[1] * pose.shape[2]
    cdf = CDF(path)
    cdf.write_var({"Variable": "Pose", "Data_Type": CDF.CDF_FLOAT, "Num_Elements": 1,
                   "Rec_Vary": True, "Dim_Sizes": [t, d], "Compress": 0},
                  var_data=pose.reshape(1, t, d).astype(np.float32))
    cdf.close()


def _camera(k):
    """World (z up) -> camera (x right, y down, z forward) for camera k, 4 m away."""
    a = np.pi / 2 * k + 0.3
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    base = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])
    return base @ rz, np.array([0.0, 0.0, 4000.0])


def _world_motion(t_len, seed=0):
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-450, 450, (32, 3))
    offsets[0] = 0
    t = np.arange(t_len)[:, None]
    root = np.concatenate([60 * np.sin(0.3 * t), 50 * np.cos(0.2 * t), 40 * np.sin(0.1 * t)], 1)
    return (root[:, None] + offsets[None]).astype(np.float64)


def _blob(img, center, channel, sigma=1.5, amp=250.0):
    """Adds a Gaussian blob centred on pixel-centre coordinates ``center``."""
    yy, xx = np.mgrid[0:H, 0:W]
    g = amp * np.exp(-((xx - center[0]) ** 2 + (yy - center[1]) ** 2) / (2 * sigma ** 2))
    img[..., channel] = np.clip(img[..., channel] + g, 0, 255)


def _frames(uv, n_frames):
    out = []
    for t in range(n_frames):
        img = np.zeros((H, W, 3), np.float64)
        _blob(img, uv[t, 0], 1)                 # root: green
        _blob(img, uv[t, HEAD_32], 0)           # head top: red
        out.append(np.round(img).astype(np.uint8))
    return out


def _write_mp4(path, frames):
    import imageio_ffmpeg
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w = imageio_ffmpeg.write_frames(path, (W, H), fps=50, codec="libx264", pix_fmt_out="yuv444p",
                                    output_params=["-crf", "0", "-preset", "ultrafast"],
                                    macro_block_size=16)
    w.send(None)
    for f in frames:
        w.send(np.ascontiguousarray(f).tobytes())
    w.close()


def _write_folder(path, frames):
    from nvsm_jax.data.format import save_png
    for i, f in enumerate(frames):
        save_png(os.path.join(path, f"img_{i + 1:06d}.png"), f)


def make_archive(root, subject="S1", action="Walking 1", t_len=23, cams=CAMS2, video="mp4",
                 video_frames=None, seed=0):
    """Writes one action of a fake release; returns the truth (world, mono, uv per camera)."""
    world = _world_motion(t_len, seed)
    feats = os.path.join(root, subject, "MyPoseFeatures")
    _write_cdf(os.path.join(feats, "D3_Positions", action + ".cdf"), world)
    truth = {"world": world, "mono": {}, "uv": {}}
    for cam in cams:
        r, t = _camera(ha.CAMERA_IDS.index(cam))
        mono = world @ r.T + t
        uv = np.stack([FOCAL * mono[..., 0] / mono[..., 2] + CX,
                       FOCAL * mono[..., 1] / mono[..., 2] + CY], -1)
        base = f"{action}.{cam}"
        _write_cdf(os.path.join(feats, "D3_Positions_mono", base + ".cdf"), mono)
        _write_cdf(os.path.join(feats, "D2_Positions", base + ".cdf"), uv)
        frames = _frames(uv, t_len if video_frames is None else video_frames)
        vpath = os.path.join(root, subject, "Videos", base)
        if video == "mp4":
            _write_mp4(vpath + ".mp4", frames)
        else:
            _write_folder(vpath, frames)
        truth["mono"][cam], truth["uv"][cam] = mono, uv
    return truth


def _mp4_works(tmp_path_factory):
    try:
        _write_mp4(str(tmp_path_factory.mktemp("probe") / "p.mp4"), [np.zeros((H, W, 3), np.uint8)])
        return True
    except Exception:   # no libx264 in this ffmpeg build
        return False


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    if not _mp4_works(tmp_path_factory):
        pytest.skip("this ffmpeg cannot encode H.264 test videos; frame folders are tested")
    return "mp4"


def _centroid(channel_img):
    """Intensity-weighted centroid in screen coordinates (pixel centres at +0.5)."""
    m = channel_img.astype(np.float64)
    m = np.where(m > 8, m, 0.0)
    yy, xx = np.mgrid[0:m.shape[0], 0:m.shape[1]]
    return np.array([(m * xx).sum() / m.sum() + 0.5, (m * yy).sum() / m.sum() + 0.5])


def _check_prepared(out, truth, cams, size, step, t_len, subject="S1", action="Walking 1"):
    frames = np.arange(0, t_len, step)
    seq_dir = os.path.join(out, subject, action)
    assert sorted(os.listdir(os.path.join(seq_dir, "cam0"))) == [f"{t:06d}.png" for t in frames]
    seq = h36m.load_sequence(seq_dir)
    np.testing.assert_allclose(seq["joints_world"], h36m.to_17_joints(truth["world"][frames]),
                               atol=1e-3)
    data = h36m.load_dataset(out, [subject])
    assert data.actions == [action] and data.seq_views.tolist() == [len(cams)]
    assert data.seq_frames.tolist() == [len(frames)]
    assert data.images.shape == (len(cams) * len(frames), size, size, 3)
    for v, cam in enumerate(cams):
        idx = data.index(0, v, np.arange(len(frames)))
        np.testing.assert_allclose(data.joints_cam[idx],
                                   h36m.to_17_joints(truth["mono"][cam][frames]), atol=1e-2)
        for i, t in zip(idx, frames):
            img = data.images[i]
            # the root blob lands on the crop centre ...
            np.testing.assert_allclose(_centroid(img[..., 1]), [size / 2, size / 2], atol=0.3)
            # ... and the head-top blob where joints_2d says
            np.testing.assert_allclose(_centroid(img[..., 0]), data.joints_2d[i, HEAD_17],
                                       atol=0.3)
    # the whole 32-joint skeleton is inside every crop, the farthest joint at the margin
    with np.load(os.path.join(seq_dir, "poses.npz")) as z:
        j2d = z["joints_2d"] - size / 2
    np.testing.assert_allclose(np.abs(j2d).max(axis=(-1, -2)), size / 2 / 1.2, rtol=1e-4)
    return data


def test_mp4_archive_end_to_end(tmp_path, mp4, caplog):
    truth = make_archive(str(tmp_path / "h36m"), video=mp4)
    out = str(tmp_path / "out")
    caplog.set_level(logging.WARNING)
    counts = ha.prepare_h36m(str(tmp_path / "h36m"), out, ["S1"], options=ha.PrepareOptions(
        size=32, frame_step=5, cameras=CAMS2, skip_bad=False))
    assert counts == {"written": ["S1/Walking 1"], "existing": [], "skipped": [], "frames": 10}
    assert not caplog.records
    _check_prepared(out, truth, CAMS2, 32, 5, 23)
    with np.load(os.path.join(out, "S1", "Walking 1", "poses.npz")) as z:
        assert sorted(z.files) == ["joints_2d", "joints_cam", "joints_world"]
        assert z["joints_world"].shape == (5, 32, 3) and z["joints_cam"].shape == (2, 5, 32, 3)
    meta = json.load(open(os.path.join(out, "S1", "Walking 1", "prepare.json")))
    assert meta["cameras"] == list(CAMS2) and meta["fps"] == 10.0

    # idempotent: a second run leaves the finished action alone
    png = os.path.join(out, "S1", "Walking 1", "cam1", "000010.png")
    stamp = os.stat(png).st_mtime_ns
    again = ha.prepare_h36m(str(tmp_path / "h36m"), out, ["S1"], options=ha.PrepareOptions(
        size=32, frame_step=5, cameras=CAMS2))
    assert again["existing"] == ["S1/Walking 1"] and again["written"] == []
    assert os.stat(png).st_mtime_ns == stamp
    with pytest.raises(DataError, match=r"prepare\.json.*size 32, now 48"):
        ha.prepare_h36m(str(tmp_path / "h36m"), out, ["S1"], options=ha.PrepareOptions(
            size=48, frame_step=5, cameras=CAMS2))


def test_frame_folders_and_action_filter(tmp_path):
    root = str(tmp_path / "h36m")
    truth = make_archive(root, action="Walking 1", video="folder")
    make_archive(root, action="Eating", video="folder", t_len=7, seed=1)
    out = str(tmp_path / "out")
    counts = ha.prepare_h36m(root, out, ["S1"], actions=["Walking"], options=ha.PrepareOptions(
        size=24, frame_step=3, cameras=CAMS2, skip_bad=False))
    assert counts["written"] == ["S1/Walking 1"] and counts["frames"] == 2 * 8
    assert sorted(os.listdir(os.path.join(out, "S1"))) == ["Walking 1"]
    _check_prepared(out, truth, CAMS2, 24, 3, 23)


def test_pluggable_reader_and_intrinsics_without_d2(tmp_path):
    """No D2_Positions: the 2-D joints come from the mono joints and intrinsics."""
    root = str(tmp_path / "h36m")
    truth = make_archive(root, video="folder")
    d2 = os.path.join(root, "S1", "MyPoseFeatures", "D2_Positions")
    for f in os.listdir(d2):
        os.remove(os.path.join(d2, f))
    calls = []

    def reader(path, step):
        calls.append(os.path.basename(path))
        return ha.read_video_frames(path, step)

    out = str(tmp_path / "out")
    ha.prepare_h36m(root, out, ["S1"], options=ha.PrepareOptions(
        size=32, frame_step=5, cameras=CAMS2, skip_bad=False,
        intrinsics={c: (FOCAL, FOCAL, CX, CY) for c in CAMS2}, frame_reader=reader))
    assert calls == [f"Walking 1.{c}" for c in CAMS2]
    _check_prepared(out, truth, CAMS2, 32, 5, 23)


def test_cli_all_four_cameras(tmp_path, capsys):
    from experiments import prepare_h36m
    root = str(tmp_path / "h36m")
    make_archive(root, subject="S5", action="Walking", t_len=11, cams=ha.CAMERA_IDS,
                 video="folder")
    out = str(tmp_path / "out")
    prepare_h36m.main(["--root", root, "--out", out, "--subjects", "S5", "--size", "16",
                       "--frame_step", "5", "--strict"])
    counts = json.loads(capsys.readouterr().out)
    assert counts["written"] == ["S5/Walking"] and counts["frames"] == 4 * 3
    data = h36m.load_dataset(out, ["S5"])
    assert data.seq_views.tolist() == [4] and data.images.shape[1:] == (16, 16, 3)


# --- bad input ----------------------------------------------------------------------------

def _prepare(root, out, **kw):
    kw.setdefault("cameras", CAMS2)
    return ha.prepare_h36m(root, out, ["S1"],
                           options=ha.PrepareOptions(size=16, frame_step=5, **kw))


def test_truncated_cdf_names_the_file(tmp_path, caplog):
    root = str(tmp_path / "h36m")
    make_archive(root, video="folder")
    path = os.path.join(root, "S1", "MyPoseFeatures", "D3_Positions", "Walking 1.cdf")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"D3_Positions/Walking 1\.cdf: .*truncated"):
        _prepare(root, str(tmp_path / "out"), skip_bad=False)
    caplog.set_level(logging.WARNING)
    counts = _prepare(root, str(tmp_path / "out"))
    assert counts["skipped"] == ["S1/Walking 1"] and counts["written"] == []
    assert any("D3_Positions/Walking 1.cdf" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(os.path.join(tmp_path, "out", "S1", "Walking 1"))
    open(path, "wb").write(b"not a cdf")
    with pytest.raises(DataError, match=r"Walking 1\.cdf: not a readable CDF"):
        _prepare(root, str(tmp_path / "out"), skip_bad=False)


def test_missing_camera_cdf(tmp_path, caplog):
    root = str(tmp_path / "h36m")
    truth = make_archive(root, video="folder")
    missing = os.path.join(root, "S1", "MyPoseFeatures", "D3_Positions_mono",
                           f"Walking 1.{CAMS2[0]}.cdf")
    os.remove(missing)
    with pytest.raises(DataError, match=f"{missing}: not found"):
        _prepare(root, str(tmp_path / "out"), skip_bad=False)
    caplog.set_level(logging.WARNING)
    assert _prepare(root, str(tmp_path / "out"))["skipped"] == ["S1/Walking 1"]
    msgs = [r.getMessage() for r in caplog.records]
    assert any(missing in m and "camera 54138969 dropped" in m for m in msgs)
    assert any("min_cameras=2" in m for m in msgs)
    # with one camera enough, the other is written (as cam1: k is the camera's index)
    counts = _prepare(root, str(tmp_path / "out"), min_cameras=1)
    assert counts["written"] == ["S1/Walking 1"]
    assert sorted(os.listdir(os.path.join(tmp_path, "out", "S1", "Walking 1"))) == [
        "cam1", "crops.npz", "poses.npz", "prepare.json"]
    data = h36m.load_dataset(str(tmp_path / "out"), ["S1"])
    np.testing.assert_allclose(data.joints_cam,
                               h36m.to_17_joints(truth["mono"][CAMS2[1]][::5]), atol=1e-2)


def test_missing_video_names_the_file(tmp_path):
    root = str(tmp_path / "h36m")
    make_archive(root, video="folder")
    shutil.rmtree(os.path.join(root, "S1", "Videos", f"Walking 1.{CAMS2[1]}"))
    with pytest.raises(DataError, match=rf"Videos/Walking 1\.{CAMS2[1]}\.mp4: not found"):
        _prepare(root, str(tmp_path / "out"), skip_bad=False)


def test_short_video(tmp_path, mp4, caplog):
    root = str(tmp_path / "h36m")
    make_archive(root, video=mp4, video_frames=8)          # 8 video frames, 23 poses
    video = os.path.join(root, "S1", "Videos", f"Walking 1.{CAMS2[0]}.mp4")
    with pytest.raises(DataError, match=rf"{video}: holds 2 of the 5 frames .* 23"):
        _prepare(root, str(tmp_path / "out"), skip_bad=False)
    assert not any(n.endswith(".partial") for n in os.listdir(tmp_path / "out" / "S1"))
    caplog.set_level(logging.WARNING)
    assert _prepare(root, str(tmp_path / "out"))["skipped"] == ["S1/Walking 1"]
    assert any(video in r.getMessage() for r in caplog.records)


def test_video_a_few_frames_short_is_cut(tmp_path):
    """Within max_frame_gap the views are cut to the shortest, all the same length."""
    root = str(tmp_path / "h36m")
    truth = make_archive(root, video="folder")
    folder = os.path.join(root, "S1", "Videos", f"Walking 1.{CAMS2[1]}")
    for name in sorted(os.listdir(folder))[20:]:            # 20 of 23 frames left
        os.remove(os.path.join(folder, name))
    out = str(tmp_path / "out")
    assert _prepare(root, out, skip_bad=False)["frames"] == 2 * 4
    _check_prepared(out, truth, CAMS2, 16, 5, 20)
    with pytest.raises(DataError, match=r"more than max_frame_gap=2 frames short"):
        _prepare(root, str(tmp_path / "out2"), skip_bad=False, max_frame_gap=2)


def test_bad_pose_shapes_and_values(tmp_path):
    path = str(tmp_path / "x.cdf")
    _write_cdf(path, np.zeros((4, 17, 3)))
    with pytest.raises(DataError, match=r"x\.cdf: 'Pose' must be numbers of shape \[1, T, 96\]"):
        ha.read_pose_cdf(path, 3)
    bad = np.zeros((4, 32, 3))
    bad[2, 7, 1] = np.nan
    _write_cdf(path, bad)
    with pytest.raises(DataError, match=r"x\.cdf: .*non-finite.*frame 2, joint 7"):
        ha.read_pose_cdf(path, 3)
    with pytest.raises(DataError, match=r"S2: subject folder not found"):
        ha.prepare_h36m(str(tmp_path), str(tmp_path / "o"), ["S2"],
                        options=ha.PrepareOptions(skip_bad=False))


def test_crop_geometry():
    """crop_frame's pixels against a direct resampling of a linear ramp."""
    yy, xx = np.mgrid[0:60, 0:80]
    frame = np.stack([xx * 3, yy * 4, np.full_like(xx, 200)], -1).astype(np.uint8)
    crop = ha.crop_frame(frame, (40.0, 30.0), 20.0, 10)
    # crop pixel (i, j) covers source screen x in [30 + 2j, 32 + 2j): mean column 30.5 + 2j
    np.testing.assert_allclose(crop[0, :, 0], 3 * (30.5 + 2 * np.arange(10)), atol=1)
    np.testing.assert_allclose(crop[:, 0, 1], 4 * (20.5 + 2 * np.arange(10)), atol=1)
    edge = ha.crop_frame(frame, (0.0, 0.0), 20.0, 10)       # half outside: black there
    assert edge[:4, :4].max() == 0 and edge[6:, 6:, 2].min() == 200
    center, side = ha.crop_boxes(np.array([[[10.0, 10.0]] + [[14.0, 7.0]] * 31]), margin=0.5)
    np.testing.assert_allclose(center, [[10, 10]])
    np.testing.assert_allclose(side, [12.0])


def test_implausible_2d_joints_name_the_file(tmp_path):
    root = str(tmp_path / "h36m")
    truth = make_archive(root, video="folder")
    uv = truth["uv"][CAMS2[1]].copy()
    uv[4, 9] = [1e6, 0]
    d2 = os.path.join(root, "S1", "MyPoseFeatures", "D2_Positions", f"Walking 1.{CAMS2[1]}.cdf")
    _write_cdf(d2, uv)
    with pytest.raises(DataError, match=rf"{d2}: the 2-D joints of frame 4 span"):
        _prepare(root, str(tmp_path / "out"), skip_bad=False)
