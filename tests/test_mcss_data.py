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


# --- Issue 29: people whose facing can be seen -------------------------------------------
# Every render below is one batch of 2 images at 64 px (one compilation of render_frames).
# The body faces +x in the all-zero pose; a camera at azimuth a sits at d (sin a, -cos a, .),
# so a = pi/2 looks at the front, -pi/2 at the back, 0 at the body's right side.
_SIZE, _FILL, _DIST = (64, 64), 0.85, 4500.0
_FRONT_BACK = (np.pi / 2, -np.pi / 2)


def _plain_subject(**colours):
    """Subject S1's body (seed 0) in fixed, test-chosen colours and sizes."""
    subj = sk.sample_subject(np.random.default_rng([0, 0, 7919]))
    named = dict(shirt=(0.55, 0.55, 0.6), trousers=(0.2, 0.2, 0.35), skin=(0.85, 0.64, 0.5),
                 shoes=(0.85, 0.1, 0.85), print=(0.1, 0.85, 0.15), hair=(0.25, 0.15, 0.08))
    named.update(colours)
    subj["colours"] = np.array([named[k] for k in ("shirt", "trousers", "skin", "shoes", "print",
                                                   "hair")], np.float32)
    subj.update(long_sleeves=True, hair_length=0.1, girth=1.0, head=1.0)
    return subj


def _render_pair(subj, azimuths, angles=None, fill=_FILL, principal=None):
    """Two noise-free images under a light from the camera -> (images float [2, H, W, 3],
    screen points [2, NUM_RENDER_POINTS, 3], focal px)."""
    angles = np.zeros((2, 17, 3), np.float32) if angles is None else angles
    pose = np.stack([np.asarray(azimuths, np.float32), np.zeros(2), np.zeros(2),
                     np.full(2, _DIST)], -1).astype(np.float32)
    img, pts = mdata.render_subject(subj, angles, pose, _SIZE, fill=fill, light=(0, 0, -1),
                                    principal=principal)
    focal = fill * _SIZE[0] / 2 * _DIST / 1000.0
    pp = np.array([_SIZE[1] / 2, _SIZE[0] / 2]) if principal is None else np.asarray(principal)
    uv = geo.project_to_screen(pts.astype(np.float64), pose.astype(np.float64), focal, pp)
    return img.astype(np.float64), uv, focal


def _head_and_chest(uv, focal):
    """Pixel boxes (rows, cols) of the head (top down to the neck joint) and the chest,
    columns symmetric about the crop centre. uv: [P, 3] screen points of a front view."""
    px = focal / _DIST                                   # px per mm at the pelvis depth
    def cols(half_mm):
        c0 = int(round(_SIZE[1] / 2 - half_mm * px))
        return slice(c0, _SIZE[1] - c0)
    head = slice(int(np.floor(uv[10, 1] - 100 * px)), int(np.ceil(uv[9, 1] + 1)))
    chest = slice(int(np.floor(uv[8, 1] - 20 * px)), int(np.ceil(uv[7, 1] + 20 * px)))
    return (head, cols(110)), (chest, cols(130))


def _P(name):
    """Index of an attached point among the render points."""
    return 17 + mdata.ATTACHED_POINTS.index(name)


def _is_colour(img, rgb, tol=0.08):
    """Pixels whose chromaticity (colour / its sum) is within tol of ``rgb``'s: [H, W] bool.
    Shading scales a surface colour, so its chromaticity survives the light."""
    rgb = np.asarray(rgb, np.float64)
    chroma = img / np.maximum(img.sum(-1, keepdims=True), 1e-6)
    return (np.abs(chroma - rgb / rgb.sum()).max(-1) < tol) & (img.sum(-1) > 30)


def test_front_and_back_views_differ_at_head_and_chest():
    subj = _plain_subject()
    (front, back), uv, focal = _render_pair(subj, _FRONT_BACK)
    for region, min_diff in zip(_head_and_chest(uv[0], focal), (30.0, 15.0)):
        # A body without facing cues seen from behind looks like its front view mirrored
        # (here also like the front view itself: the pose and the body are symmetric).
        diff = np.abs(front[region] - back[region]).mean()             # measured 66.5, 31.0
        diff_mirrored = np.abs(front[region][:, ::-1] - back[region]).mean()
        floor = np.abs(front[region] - front[region][:, ::-1]).mean()  # measured 0.0
        assert min(diff, diff_mirrored) > min_diff and min(diff, diff_mirrored) > 10 * floor + 5
    # The print (pure green here; no other part is green) shows in front only.
    on_front, on_back = _is_colour(front, (0.1, 0.85, 0.15)), _is_colour(back, (0.1, 0.85, 0.15))
    assert on_front.sum() >= 12 and on_back.sum() == 0                 # measured 24 and 0
    chest_rows = _head_and_chest(uv[0], focal)[1][0]
    assert on_front[chest_rows].sum() == on_front.sum()               # and on the chest
    # The subjects of the benchmark (seed 0): each shows its facing at head + chest.
    for si in range(7):
        subj = sk.sample_subject(np.random.default_rng([0, si, 7919]))
        (front, back), uv, focal = _render_pair(subj, _FRONT_BACK)
        diff = sum(np.abs(front[r] - back[r]).mean() for r in _head_and_chest(uv[0], focal))
        assert diff > 30.0, (si, diff)                                 # measured 60-102


_MIRROR_JOINT = np.array([0, 4, 5, 6, 1, 2, 3, 7, 8, 9, 10, 14, 15, 16, 11, 12, 13])


def test_subject_appearance_ranges():
    subs = [sk.sample_subject(np.random.default_rng([0, i, 7919])) for i in range(300)]
    col = np.stack([s["colours"] for s in subs])     # shirt, trousers, skin, shoes, print, hair

    def dist(a, b):
        return np.linalg.norm(col[:, a] - col[:, b], axis=-1)
    # The facing cues contrast with what they sit on (redrawn until so, 20 tries at most).
    assert np.mean(dist(4, 0) >= 0.5) > 0.99 and np.mean(dist(5, 2) >= 0.35) > 0.99
    assert np.mean(dist(3, 1) >= 0.3) > 0.99
    # Wide ranges: shirts of all hues and brightness, both hair styles, girth 0.8-1.3.
    assert col[:, 0].min(0).max() < 0.15 and col[:, 0].max(0).min() > 0.85
    hl = np.array([s["hair_length"] for s in subs])
    assert 0.3 < np.mean(hl > 0.5) < 0.7 and not np.any((hl > 0.3) & (hl < 0.65))
    girth = np.array([s["girth"] for s in subs])
    assert girth.min() < 0.82 and girth.max() > 1.28 and np.all((girth >= 0.8) & (girth <= 1.3))
    # Bone lengths come first from the generator: the same skeleton as appearance version 1.
    rng = np.random.default_rng([0, 5, 7919])
    height, groups = rng.uniform(0.86, 1.1), rng.uniform(0.9, 1.1, size=7)
    lengths = sk.REST_OFFSETS * (height * groups[sk._LENGTH_GROUP])[:, None]
    np.testing.assert_allclose(subs[5]["offsets"], lengths, rtol=1e-6)
    # Test subjects (S9, S11: indices 5, 6) are new people.
    for test_i in (5, 6):
        assert min(np.abs(col[test_i] - col[i]).max() for i in range(5)) > 0.05


def test_appearance_is_left_right_symmetric():
    ids, offs = mdata.attached_offsets(sk.sample_subject(np.random.default_rng(4)))
    names = list(mdata.ATTACHED_POINTS)
    for i, name in enumerate(names):
        twin = name.replace("r_", "l_", 1) if name.startswith("r_") else \
            name.replace("_r", "_l") if name.endswith("_r") else None
        if twin is None and not name.startswith("l_") and not name.endswith("_l"):
            assert offs[i, 1] == 0.0, name                             # on the mid-plane
        elif twin is not None:
            j = names.index(twin)
            np.testing.assert_array_equal(offs[j], offs[i] * [1, -1, 1])
            assert ids[j] == _MIRROR_JOINT[ids[i]], name
    for subj in (_plain_subject(), sk.sample_subject(np.random.default_rng([0, 2, 7919]))):
        (front, _), _, _ = _render_pair(subj, _FRONT_BACK)
        asym = np.abs(front - front[:, ::-1]).mean()                   # measured 0.0
        assert asym < 0.5
        body = np.abs(front - front[:, :1]).sum(-1) > 20               # pixels off the background
        assert np.abs(front - front[:, ::-1])[body].mean() < 2.0


def test_face_on_the_front_of_the_head_and_hair_behind():
    # Close-up of the head: 4x zoom, the pelvis projected far below the crop.
    subj = _plain_subject(hair=(0.9, 0.8, 0.1))
    fill, head_mm = 3.4, 650.0
    pp = (_SIZE[1] / 2, _SIZE[0] / 2 + fill * _SIZE[0] / 2 * head_mm / 1000.0)
    (front, back), uv, _ = _render_pair(subj, _FRONT_BACK, fill=fill, principal=pp)
    eyes_f, eyes_b = front.sum(-1) < 60, back.sum(-1) < 60             # the eyes: near black
    c = _SIZE[1] // 2
    assert eyes_f[:, :c].sum() >= 2 and eyes_f[:, c:].sum() >= 2 and eyes_b.sum() == 0
    assert np.all(np.nonzero(eyes_f)[0] < uv[0, _P("nose_tip"), 1])    # above the nose tip
    # Between the eyes' and the nose tip's height, the middle of the head: skin in front, hair
    # behind.
    rows = slice(int(uv[0, _P("r_eye_in"), 1]), int(np.ceil(uv[0, _P("nose_tip"), 1])) + 1)
    cols = slice(c - 4, c + 4)
    hair, skin = (0.9, 0.8, 0.1), (0.85, 0.64, 0.5)
    assert _is_colour(front[rows, cols], skin, 0.03).mean() > 0.6          # measured 0.85
    assert _is_colour(back[rows, cols], hair, 0.03).mean() > 0.8           # measured 1.0
    assert _is_colour(front[rows, cols], hair, 0.03).mean() < 0.1          # measured 0.0
    # The face turns with the head: nose ahead of the head axis along the head frame's +x.
    ang = sk.action_angles("Bending", 20, np.random.default_rng(1)).astype(np.float64)
    pos, rot = sk.forward_kinematics_frames(ang, subj["offsets"])
    _, pts = mdata.render_points(subj, ang)
    fwd = np.einsum("tij,ti->tj", rot[:, 9], pts[:, _P("nose_tip")] - pos[:, 9])
    assert np.all(fwd[:, 0] > 0.9 * 95.0)
    np.testing.assert_allclose(fwd[:, 1], 0.0, atol=1e-3)
    world_fwd = pts[:, _P("nose_tip")] - pts[:, _P("cap_top")]
    assert np.corrcoef(world_fwd[:, 2], ang[:, 9, 1] + ang[:, 7, 1] + ang[:, 8, 1])[0, 1] < -0.5


def test_feet_point_forward():
    subj = _plain_subject()
    # In the shin's frame the toes lie ~13 cm ahead of the ankle, in every action.
    for ai, action in enumerate(sk.ACTIONS):
        ang = sk.action_angles(action, 24, np.random.default_rng(ai)).astype(np.float64)
        pos, rot = sk.forward_kinematics_frames(ang, subj["offsets"])
        _, pts = mdata.render_points(subj, ang)
        for knee, ankle, toe in ((2, 3, "r_toe"), (5, 6, "l_toe")):
            d = np.einsum("tij,ti->tj", rot[:, knee], pts[:, _P(toe)] - pos[:, ankle])
            assert np.all(d[:, 0] > 100.0) and np.all(np.abs(d[:, 1]) < 40.0), action
    # Side view (camera at the body's right), body facing +x, then turned to face -x: the
    # shoes (magenta) lie on the body's forward side of the ankles in the image.
    ang = np.zeros((2, 17, 3), np.float32)
    ang[1, 0, 2] = np.pi
    imgs, uv, _ = _render_pair(subj, (0.0, 0.0), angles=ang)
    for k, yaw in enumerate((0.0, np.pi)):
        shoe = _is_colour(imgs[k], (0.85, 0.1, 0.85))
        assert shoe.sum() >= 8                                         # measured 21
        forward_px = np.cos(yaw) * np.sign(uv[k, _P("r_toe"), 0] - uv[k, 3, 0])
        ahead = (np.nonzero(shoe)[1].mean() + 0.5 - uv[k, 3, 0]) * np.sign(np.cos(yaw))
        assert ahead > 1.0, (k, ahead)                                 # measured 2.2, 2.2
        assert forward_px > 0


def test_stored_joints_are_the_skeleton_joints(tiny_root):
    # generate_dataset draws subject si from [seed, si, 7919], sequence (si, ai) from
    # [seed, si, ai]; the first draw of a sequence is its joint angles.
    for si, s in enumerate(("S1", "S9")):
        subj = sk.sample_subject(np.random.default_rng([3, si, 7919]))
        for ai, action in enumerate(("Walking", "Boxing")):
            ang = sk.action_angles(action, 6, np.random.default_rng([3, si, ai]))
            want = sk.forward_kinematics(ang.astype(np.float64), subj["offsets"]).astype(np.float32)
            poses = np.load(f"{tiny_root}/{s}/{action}/poses.npz")
            np.testing.assert_array_equal(poses["joints_world"], want)
            assert poses["joints_cam"].shape == (4, 6, 17, 3)
            assert poses["joints_2d"].shape == (4, 6, 17, 2)
            joints, pts = mdata.render_points(subj, ang)
            np.testing.assert_array_equal(joints, want)
            np.testing.assert_array_equal(pts[:, :17], want)
            assert pts.shape == (6, mdata.NUM_RENDER_POINTS, 3)
    # Forward kinematics with frames: the same positions; each child hangs off its parent's frame.
    ang = sk.action_angles("Sitting", 5, np.random.default_rng(2)).astype(np.float64)
    offsets = sk.sample_subject(np.random.default_rng(2))["offsets"]
    pos, rot = sk.forward_kinematics_frames(ang, offsets)
    np.testing.assert_array_equal(pos, sk.forward_kinematics(ang, offsets))
    np.testing.assert_allclose(sk.attached_points(pos, rot, sk.PARENTS[1:], offsets[1:]),
                               pos[:, 1:], atol=1e-9)
    np.testing.assert_allclose(np.einsum("...ji,...jk->...ik", rot, rot),
                               np.broadcast_to(np.eye(3), rot.shape), atol=1e-12)


def test_data_of_an_older_appearance_is_regenerated(tiny_root):
    import json
    import os

    meta_path = f"{tiny_root}/meta.json"
    with open(meta_path) as f:
        meta = json.load(f)
    assert meta["appearance"] == mdata.APPEARANCE_VERSION >= 2
    del meta["appearance"]                   # as written before the appearance field existed
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    os.remove(f"{tiny_root}/S9/Boxing/poses.npz")
    mdata.generate_dataset(tiny_root, subjects=("S1", "S9"), actions=("Walking", "Boxing"),
                           num_frames=6, num_views=4, image_size=(32, 32), seed=3, log=None)
    assert os.path.exists(f"{tiny_root}/S9/Boxing/poses.npz")
    with open(meta_path) as f:
        assert json.load(f)["appearance"] == mdata.APPEARANCE_VERSION


def test_front_back_sheet():
    sheet = mdata.front_back_sheet(0, ("S1", "S9"), _SIZE, upscale=1, per_row=2, noise_std=0.0)
    assert sheet.dtype == np.uint8 and sheet.shape == (12 + 64, 2 * 2 * 64 + 6, 3)
    for x0 in (0, 2 * 64 + 6):                         # each pair: front, back
        pair = sheet[12:, x0:x0 + 128].astype(float)
        front, back = pair[:, :64], pair[:, 64:]
        assert front.std() > 5
        # Noise-free: a back view equal to the front (or its mirror) gives 0; measured 3.4, 4.1.
        assert min(np.abs(front - back).mean(), np.abs(front[:, ::-1] - back).mean()) > 2.0
