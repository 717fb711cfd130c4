"""Synthetic synchronised multi-view human motion, rendered with our rasteriser.

A *sequence* is one subject performing one action for ``T`` frames, seen by
``V`` synchronised cameras placed at random around the subject (random
azimuth, height, distance, small roll; all looking at the pelvis). Frames are
root-centred crops (the pelvis projects to the crop centre), ``image_size``
pixels, rendered as shaded capsules (one low-poly capsule per bone, a larger
one for the head, plus shoes, eyes, nose, lips, hair and a chest print placed on
points rigidly attached to the joints' frames, so the body's facing can be seen)
with per-subject clothing colours, per-view backgrounds, lighting and pixel noise.

Storage (read back by :func:`nvsm_jax.mcss.h36m.load_dataset`, the same reader
as for a preprocessed Human3.6M)::

    ROOT/meta.json                        # generator config, subjects, actions
    ROOT/S1/Walking/cam0/000000.png ...   # uint8 RGB crops, one folder per camera
    ROOT/S1/Walking/poses.npz             # joints_world [T, J, 3] mm (J = 17 or 32)
                                          # joints_cam  [V, T, J, 3] mm (camera frame)
                                          # joints_2d   [V, T, J, 2] px (in the crop)
    ROOT/S1/Walking/cameras.npz           # pose [V, 4], focal [V], principal [V, 2]

Calibration is stored for evaluation and tests only: nothing in training reads
``cameras.npz`` or the 3D joints of unlabelled frames.

Public API: :func:`capsule_template`, :func:`attached_offsets`,
:func:`render_points`, :func:`body_mesh`, :func:`render_frames` (batched, jitted;
its per-frame looks in one :class:`Appearance`),
:func:`render_subject`, :func:`sample_cameras`, :func:`generate_sequence`,
:func:`generate_dataset` (writes ``ROOT``), :func:`front_back_sheet`,
``TRAIN_SUBJECTS``, ``TEST_SUBJECTS``, ``APPEARANCE_VERSION``. A picture sheet of
every subject from the front and from behind::

    python -m nvsm_jax.mcss.data --sheet nvsm_jax/mcss/figures/front_back.png
"""

from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import rasterizer
from nvsm_jax import geometry as geo
from nvsm_jax.mcss import skeleton as sk

__all__ = ["TRAIN_SUBJECTS", "TEST_SUBJECTS", "APPEARANCE_VERSION", "ATTACHED_POINTS",
           "NUM_RENDER_POINTS", "CAPSULES", "capsule_template", "attached_offsets",
           "render_points", "body_mesh", "Appearance", "render_frames", "render_subject",
           "sample_cameras",
           "generate_sequence", "generate_dataset", "dataset_subject", "write_sequence",
           "front_back_sheet"]

TRAIN_SUBJECTS = ("S1", "S5", "S6", "S7", "S8")
TEST_SUBJECTS = ("S9", "S11")
# Bumped when the rendered people change (meta.json carries it: older folders are redrawn).
# 1: capsule bones and a plain head; 2: face, hair, feet, a chest print (issue 29).
APPEARANCE_VERSION = 2

# Points rigidly attached to a joint's frame, for rendering only (the stored 17
# joints do not include them): numbered 17, 18, ... after the joints, placed by
# :func:`attached_offsets`. (name, joint whose frame carries it): the feet hang from
# the ankles (3, 6), the face and hair from the head frame (9), the print from the
# chest frame (7).
_ATTACHED = (
    ("r_heel", 3), ("r_toe", 3), ("l_heel", 6), ("l_toe", 6),
    *((name, 9) for name in ("r_eye_in", "r_eye_out", "l_eye_in", "l_eye_out", "nose_root",
                             "nose_tip", "mouth_r", "mouth_l", "cap_low", "cap_top", "back_top",
                             "back_end")),
    *((name, 7) for name in ("band_r", "band_l", "stripe_top", "stripe_low")),
)
ATTACHED_POINTS = tuple(name for name, _ in _ATTACHED)
_P = {name: 17 + i for i, name in enumerate(ATTACHED_POINTS)}
NUM_RENDER_POINTS = 17 + len(ATTACHED_POINTS)

# Colour slots: 0 shirt, 1 trousers, 2 skin, 3 sleeve (shirt or skin), 4 shoes,
# 5 print, 6 hair, 7 eyes, 8 nose, 9 lips.
# (point a, point b, radius mm, colour slot, radius scale: "g" girth, "h" head size)
CAPSULES = (
    (0, 7, 115, 0, "g"), (7, 8, 125, 0, "g"), (0, 1, 75, 1, "g"), (0, 4, 75, 1, "g"),
    (1, 2, 68, 1, "g"), (2, 3, 52, 1, "g"), (4, 5, 68, 1, "g"), (5, 6, 52, 1, "g"),
    (8, 9, 45, 2, "g"), (9, 10, 95, 2, "h"),
    (8, 11, 55, 0, "g"), (11, 12, 46, 0, "g"), (12, 13, 38, 3, "g"),
    (8, 14, 55, 0, "g"), (14, 15, 46, 0, "g"), (15, 16, 38, 3, "g"),
    # Feet (shoes), pointing forward from the ankles.
    (_P["r_heel"], _P["r_toe"], 40, 4, "g"), (_P["l_heel"], _P["l_toe"], 40, 4, "g"),
    # Face: eyes, nose, lips on the front of the head.
    (_P["r_eye_in"], _P["r_eye_out"], 13, 7, "h"), (_P["l_eye_in"], _P["l_eye_out"], 13, 7, "h"),
    (_P["nose_root"], _P["nose_tip"], 10, 8, "h"), (_P["mouth_r"], _P["mouth_l"], 8, 9, "h"),
    # Hair: a cap over the top and back of the head, and a back part whose length
    # is the subject's hair length (nape ... shoulders).
    (_P["cap_low"], _P["cap_top"], 100, 6, "h"), (_P["back_top"], _P["back_end"], 80, 6, "h"),
    # Chest print: a horizontal band and a vertical stripe on the front of the shirt.
    (_P["band_r"], _P["band_l"], 90, 5, "g"), (_P["stripe_top"], _P["stripe_low"], 56, 5, "g"),
)


def attached_offsets(subject: dict):
    """Where the :data:`ATTACHED_POINTS` sit on a subject, in their joints' frames.

    Returns ``(joint_ids [M] int32, offsets [M, 3] float32 mm)`` for
    :func:`skeleton.attached_points`; M = ``len(ATTACHED_POINTS)``. Sizes follow
    the subject: the head radius ``rh`` and head length (joint 9 -> 10), the chest
    radius ``rt`` and length (joint 7 -> 8), the shin length; the face sits on the
    head's front (+x), the print on the chest's front, the toes ahead of (+x) and
    slightly below the ankles; left and right mirror each other (y -> -y).
    """
    off = np.asarray(subject["offsets"], np.float64)
    rh = 95.0 * subject["head"]
    rt = 125.0 * subject["girth"]
    lh = np.linalg.norm(off[10])                 # head: joint 9 -> 10 along +z of frame 9
    lc = np.linalg.norm(off[8])                  # chest: joint 7 -> 8 along +z of frame 7
    foot = np.linalg.norm(off[3]) / 440.0        # shin-length scale
    hl = subject["hair_length"]
    ze = 0.4 * lh                                # eye height in the head frame
    pts = {
        "r_heel": (-25 * foot, 0, -45 * foot), "r_toe": (135 * foot, 0, -60 * foot),
        "r_eye_in": (0.86 * rh, -0.2 * rh, ze), "r_eye_out": (0.78 * rh, -0.42 * rh, ze),
        "nose_root": (0.92 * rh, 0, ze - 0.05 * rh), "nose_tip": (1.05 * rh, 0, ze - 0.38 * rh),
        "mouth_r": (0.9 * rh, -0.2 * rh, ze - 0.75 * rh),
        "cap_low": (-0.2 * rh, 0, 0.45 * lh), "cap_top": (-0.05 * rh, 0, lh + 0.12 * rh),
        "back_top": (-0.35 * rh, 0, 0.5 * lh),
        "back_end": (-(0.45 + 0.7 * hl) * rh, 0, (0.1 - 1.3 * hl) * lh),
        "band_r": (0.35 * rt, -0.22 * rt, 0.7 * lc),
        "stripe_top": (0.62 * rt, 0, 0.6 * lc), "stripe_low": (0.62 * rt, 0, 0.1 * lc),
    }
    mirror = {"l_heel": "r_heel", "l_toe": "r_toe", "l_eye_in": "r_eye_in",
              "l_eye_out": "r_eye_out", "mouth_l": "mouth_r", "band_l": "band_r"}
    for left, right in mirror.items():
        x, y, z = pts[right]
        pts[left] = (x, -y, z)
    offsets = np.array([pts[n] for n in ATTACHED_POINTS], np.float32)
    return np.array([j for _, j in _ATTACHED], np.int32), offsets


def render_points(subject: dict, angles):
    """Joints and attached points of a subject in poses ``angles: [T, 17, 3]``.

    Returns ``(joints [T, 17, 3], points [T, NUM_RENDER_POINTS, 3])`` float32 mm;
    ``joints`` is exactly :func:`skeleton.forward_kinematics` of the angles and
    ``points[:, :17]`` equals it.
    """
    joints, rot = sk.forward_kinematics_frames(np.asarray(angles, np.float64), subject["offsets"])
    ids, offs = attached_offsets(subject)
    extra = sk.attached_points(joints, rot, ids, offs.astype(np.float64))
    return (joints.astype(np.float32),
            np.concatenate([joints, extra], axis=-2).astype(np.float32))


def capsule_template(segments: int = 8, rings: int = 2):
    """A unit capsule: points ``(rho cos, rho sin, end, h)`` and faces.

    A capsule vertex is ``a + end * (b - a) + r * R (rho cos u, rho sin u, h)``
    with outward normal ``R (rho cos u, rho sin u, h)``; ``end`` in {0, 1} picks
    the bottom or top hemisphere. Returns ``(unit [P, 4] float32, faces [F, 3]
    int32)``; faces wind counter-clockwise seen from outside.
    """
    pts = [(0.0, 0.0, 0.0, -1.0)]
    lat = []
    for k in range(1, rings + 1):          # bottom hemisphere, pole -> equator
        lat.append((0.0, -np.pi / 2 + k * (np.pi / 2) / rings))
    for k in range(0, rings):              # top hemisphere, equator -> pole
        lat.append((1.0, k * (np.pi / 2) / rings))
    for end, la in lat:
        for s in range(segments):
            u = 2 * np.pi * s / segments
            pts.append((np.cos(la) * np.cos(u), np.cos(la) * np.sin(u), end, np.sin(la)))
    pts.append((0.0, 0.0, 1.0, 1.0))
    n_ring = len(lat)
    faces = []
    ring = lambda r, s: 1 + r * segments + (s % segments)
    for s in range(segments):
        faces.append((0, ring(0, s + 1), ring(0, s)))
    for r in range(n_ring - 1):
        for s in range(segments):
            a, b = ring(r, s), ring(r, s + 1)
            c, d = ring(r + 1, s), ring(r + 1, s + 1)
            faces.append((a, b, d))
            faces.append((a, d, c))
    top = len(pts) - 1
    for s in range(segments):
        faces.append((top, ring(n_ring - 1, s), ring(n_ring - 1, s + 1)))
    return np.asarray(pts, np.float32), np.asarray(faces, np.int32)


def _bone_frame(d):
    """Unit bone direction ``d: [..., 3]`` -> rotation [..., 3, 3] with z = d."""
    helper = jnp.where(jnp.abs(d[..., 2:3]) < 0.9, jnp.array([0.0, 0.0, 1.0]),
                       jnp.array([1.0, 0.0, 0.0]))
    x = jnp.cross(helper, d)
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    y = jnp.cross(d, x)
    return jnp.stack([x, y, d], axis=-1)


def body_mesh(points, radii, unit, faces):
    """Capsule mesh of a body.

    points: [NUM_RENDER_POINTS, 3] world mm (the 17 joints, then the attached
    points); radii: [K] mm per capsule (order of ``CAPSULES``); unit/faces:
    :func:`capsule_template`. Returns ``(verts [K * P, 3], normals [K * P, 3],
    faces [K * F, 3] int32 numpy)``.
    """
    ia = np.array([c[0] for c in CAPSULES])
    ib = np.array([c[1] for c in CAPSULES])
    a, b = points[ia], points[ib]                       # [K, 3]
    vec = b - a
    length = jnp.linalg.norm(vec, axis=-1, keepdims=True)
    d = vec / jnp.maximum(length, 1e-6)
    rot = _bone_frame(d)                                # [K, 3, 3]
    local = unit[None, :, (0, 1, 3)]                    # [1, P, 3]
    normals = jnp.einsum("kij,kpj->kpi", rot, jnp.broadcast_to(local, (len(ia),) + local.shape[1:]))
    verts = (a[:, None] + unit[None, :, 2:3] * vec[:, None]
             + radii[:, None, None] * normals)
    k, p = len(ia), unit.shape[0]
    all_faces = (faces[None] + p * np.arange(k)[:, None, None]).reshape(-1, 3).astype(np.int32)
    return verts.reshape(-1, 3), normals.reshape(-1, 3), all_faces


class Appearance(NamedTuple):
    """What a batch of :func:`render_frames` frames looks like (a pytree of arrays).

    radii: [N, K] capsule radii, mm; colours: [N, K, 3] capsule colours in [0, 1]
    (K = ``len(CAPSULES)``, its order); light: [N, 3] unit direction towards the
    light in camera coordinates; background: [N, 2, 3] top and bottom colour of a
    vertical gradient in [0, 1].
    """

    radii: jax.Array
    colours: jax.Array
    light: jax.Array
    background: jax.Array


@functools.partial(jax.jit, static_argnames=("image_size", "segments"))
def render_frames(points_world, appearance: Appearance, cam_pose, focal, principal, noise_key,
                  noise_std: float = 0.02, image_size=(64, 64), segments: int = 8):
    """Renders a batch of frames in one call.

    points_world: [N, NUM_RENDER_POINTS, 3] mm (:func:`render_points`); appearance:
    :class:`Appearance` (radii [N, K] mm, colours [N, K, 3], light [N, 3],
    background [N, 2, 3]); cam_pose: [N, 4] (azimuth, elevation, theta, distance
    mm) looking at the origin; focal: [N] px; principal: [N, 2]; noise_key: PRNG
    key; noise_std: pixel noise in [0, 1] units; image_size: (H, W) and segments
    (capsule template resolution) are static.
    Returns uint8 images [N, H, W, 3].
    """
    radii, colours, light, background = appearance
    unit_np, faces_np = capsule_template(segments)
    unit = jnp.asarray(unit_np)
    h, w = image_size

    def geometry(j, r, c, pose, f, pp):
        verts, normals, _ = body_mesh(j, r, unit, faces_np)
        screen = geo.project_to_screen(verts, pose, f, pp)
        r_cv, _ = geo.world_to_camera(pose)
        n_cam = jnp.matmul(normals, r_cv.T, precision=jax.lax.Precision.HIGHEST)
        vcol = jnp.repeat(c, unit.shape[0], axis=0)
        return screen, jnp.concatenate([n_cam, vcol], axis=-1)

    _, _, faces = body_mesh(points_world[0], radii[0], unit, faces_np)
    faces = jnp.asarray(faces)
    screen, vattr = jax.vmap(geometry)(points_world, radii, colours, cam_pose, focal, principal)
    frags = rasterizer.rasterize(screen, faces, image_size=(h, w))       # batched [N, H, W]
    attrs = rasterizer.interpolate(frags, faces, vattr)                  # [N, H, W, 6]
    n = attrs[..., :3]
    n = n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-6)
    shade = 0.35 + 0.65 * jnp.maximum(jnp.sum(n * light[:, None, None], axis=-1, keepdims=True), 0.0)
    fg = attrs[..., 3:] * shade
    rows = (jnp.arange(h, dtype=jnp.float32) + 0.5)[None, :, None, None] / h
    back = background[:, None, None, 0] * (1 - rows) + background[:, None, None, 1] * rows
    mask = (frags.face_id >= 0)[..., None]
    imgs = jnp.where(mask, fg, back)
    imgs = imgs + noise_std * jax.random.normal(noise_key, imgs.shape)
    return jnp.clip(jnp.round(imgs * 255.0), 0, 255).astype(jnp.uint8)


def sample_cameras(rng: np.random.Generator, num_views: int, image_size=(64, 64),
                   fill: float = 0.85):
    """Random synchronised cameras around the subject, looking at the pelvis.

    Azimuths spread around the circle (evenly spaced plus jitter), elevation in
    [-3, 20] degrees, distance 3.5-6 m, roll within +-3 degrees; the focal is
    chosen so a ~1 m radius around the pelvis fills ``fill`` of the crop half
    size (+-10 %). Returns ``(pose [V, 4], focal [V], principal [V, 2])``.
    """
    h, w = image_size
    az = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(num_views) / num_views
    az = az + rng.uniform(-0.35, 0.35, num_views)
    el = rng.uniform(np.deg2rad(-3), np.deg2rad(20), num_views)
    th = rng.uniform(np.deg2rad(-3), np.deg2rad(3), num_views)
    dist = rng.uniform(3500, 6000, num_views)
    pose = geo.make_pose(geo.wrap_angle(az, xnp=np), el, th, dist, xnp=np)
    focal = fill * (min(h, w) / 2) * dist / 1000.0 * rng.uniform(0.9, 1.1, num_views)
    principal = np.tile(np.array([w / 2, h / 2], np.float32), (num_views, 1))
    return pose.astype(np.float32), focal.astype(np.float32), principal


def _capsule_style(subject: dict):
    """Per-capsule radii [K] mm and colours [K, 3] of a subject (order of ``CAPSULES``)."""
    scale = {"g": subject["girth"], "h": subject["head"]}
    radii = np.array([c[2] * scale[c[4]] for c in CAPSULES], np.float32)
    shirt, trousers, skin, shoes, print_, hair = subject["colours"]
    sleeve = shirt if subject["long_sleeves"] else skin
    eyes = np.array([0.07, 0.05, 0.05])
    lips = skin * np.array([0.8, 0.45, 0.45])
    slots = np.stack([shirt, trousers, skin, sleeve, shoes, print_, hair, eyes, skin * 0.85, lips])
    colours = slots[[c[3] for c in CAPSULES]]
    return radii, colours.astype(np.float32)


def render_subject(subject: dict, angles, cam_pose, image_size=(64, 64), *, fill: float = 0.85,
                   light=(0.0, -0.6, -1.0), background=((0.75, 0.75, 0.75), (0.55, 0.55, 0.55)),
                   principal=None, noise_std: float = 0.0, seed: int = 0):
    """Renders a subject in given poses from given cameras (one image each).

    angles: [N, 17, 3] radians; cam_pose: [N, 4] (azimuth, elevation, theta,
    distance mm) looking at the pelvis; the focal is that of :func:`sample_cameras`
    at ``fill`` (1 m around the pelvis fills ``fill`` of the half crop); principal:
    [2] (column, row) where the pelvis projects, the crop centre by default (move
    it to frame a close-up of another part); light: [3] direction towards the light
    in camera coordinates (the default comes from above the camera); background:
    top and bottom colour [2, 3]. Returns ``(images uint8 [N, H, W, 3], points [N,
    NUM_RENDER_POINTS, 3] mm)``.
    """
    h, w = image_size
    cam_pose = np.asarray(cam_pose, np.float32)
    n = len(cam_pose)
    _, points = render_points(subject, angles)
    radii, colours = _capsule_style(subject)
    light = np.asarray(light, np.float32) / np.linalg.norm(light)
    look = Appearance(np.broadcast_to(radii, (n,) + radii.shape),
                      np.broadcast_to(colours, (n,) + colours.shape), np.tile(light, (n, 1)),
                      np.broadcast_to(np.asarray(background, np.float32), (n, 2, 3)))
    out = render_frames(
        points, look,
        cam_pose, (fill * min(h, w) / 2 * cam_pose[:, 3] / 1000.0).astype(np.float32),
        np.tile(np.asarray((w / 2, h / 2) if principal is None else principal, np.float32), (n, 1)),
        jax.random.key(seed), noise_std=noise_std, image_size=(h, w))
    return np.asarray(out), points


def generate_sequence(subject: dict, action: str, num_frames: int, num_views: int,
                      rng: np.random.Generator, image_size=(64, 64), chunk: int = 256,
                      noise_std: float = 0.02) -> dict:
    """Renders one synchronised multi-view sequence.

    Returns a dict with images uint8 [V, T, H, W, 3], joints_world [T, 17, 3],
    joints_cam [V, T, 17, 3], joints_2d [V, T, 17, 2], and the cameras
    (pose [V, 4], focal [V], principal [V, 2]).
    """
    angles = sk.action_angles(action, num_frames, rng)
    joints, points = render_points(subject, angles)
    pose, focal, principal = sample_cameras(rng, num_views, image_size)
    r_cv, t_cv = geo.world_to_camera(pose.astype(np.float64))
    joints_cam = geo.transform_points(joints[None].astype(np.float64), r_cv[:, None],
                                      t_cv[:, None])                         # [V, T, 17, 3]
    joints_2d = geo.project_to_screen(joints.astype(np.float64), pose[:, None].astype(np.float64),
                                      focal[:, None], principal[:, None])[..., :2]
    radii, colours = _capsule_style(subject)
    light = rng.normal(size=(num_views, 3)) * 0.4 + np.array([0.0, -0.6, -1.0])
    light /= np.linalg.norm(light, axis=-1, keepdims=True)
    background = rng.uniform(0.0, 1.0, size=(num_views, 2, 3))
    # Flatten (view, time) and render in chunks of one jitted call each.
    n = num_views * num_frames
    vi = np.repeat(np.arange(num_views), num_frames)
    ti = np.tile(np.arange(num_frames), num_views)
    fields = dict(
        points_world=points[ti], radii=np.broadcast_to(radii, (n,) + radii.shape),
        colours=np.broadcast_to(colours, (n,) + colours.shape), cam_pose=pose[vi],
        focal=focal[vi], principal=principal[vi], light=light[vi].astype(np.float32),
        background=background[vi].astype(np.float32))
    seed = int(rng.integers(0, 2 ** 31 - 1))
    images = []
    for i, start in enumerate(range(0, n, chunk)):
        part = {k: np.asarray(v[start:start + chunk], np.float32) for k, v in fields.items()}
        m = len(part["focal"])
        if m < chunk and n > chunk:   # pad so every call has the same shape (one trace)
            part = {k: np.concatenate([v, np.repeat(v[-1:], chunk - m, 0)]) for k, v in part.items()}
        look = Appearance(**{k: part.pop(k) for k in Appearance._fields})
        out = render_frames(**part, appearance=look,
                            noise_key=jax.random.fold_in(jax.random.key(seed), i),
                            noise_std=noise_std, image_size=tuple(image_size))
        images.append(np.asarray(out)[:m])
    images = np.concatenate(images).reshape(num_views, num_frames, *image_size, 3)
    return {"images": images, "joints_world": joints, "joints_cam": joints_cam.astype(np.float32),
            "joints_2d": joints_2d.astype(np.float32), "pose": pose, "focal": focal,
            "principal": principal}


def write_sequence(root: str, subject: str, action: str, seq: dict) -> None:
    """Writes one sequence in the on-disk layout of the module docstring."""
    from PIL import Image

    base = os.path.join(root, subject, action)
    for v in range(seq["images"].shape[0]):
        cam_dir = os.path.join(base, f"cam{v}")
        os.makedirs(cam_dir, exist_ok=True)
        for t in range(seq["images"].shape[1]):
            Image.fromarray(seq["images"][v, t]).save(os.path.join(cam_dir, f"{t:06d}.png"),
                                                       compress_level=1)
    np.savez(os.path.join(base, "poses.npz"), joints_world=seq["joints_world"],
             joints_cam=seq["joints_cam"], joints_2d=seq["joints_2d"])
    np.savez(os.path.join(base, "cameras.npz"), pose=seq["pose"], focal=seq["focal"],
             principal=seq["principal"])


def dataset_subject(seed: int, index: int) -> dict:
    """Subject ``index`` (its place in the subject list) of the benchmark of data seed
    ``seed``, as :func:`generate_dataset` draws it: :func:`skeleton.sample_subject` of
    ``default_rng([seed, index, 7919])``."""
    return sk.sample_subject(np.random.default_rng([seed, index, 7919]))


def generate_dataset(root: str, *, subjects: Sequence[str] = TRAIN_SUBJECTS + TEST_SUBJECTS,
                     actions: Sequence[str] = sk.ACTIONS, num_frames: int = 64,
                     num_views: int = 4, image_size=(64, 64), seed: int = 0,
                     noise_std: float = 0.02, log=print) -> str:
    """Generates and writes the whole synthetic benchmark; skips if complete.

    Deterministic given ``seed``: subject ``s`` and sequence ``(s, a)`` use
    their own generators seeded from ``(seed, s, a)``.
    """
    cfg = dict(subjects=list(subjects), actions=list(actions), num_frames=num_frames,
               num_views=num_views, image_size=list(image_size), seed=seed, noise_std=noise_std,
               joints="h36m17", appearance=APPEARANCE_VERSION)
    meta_path = os.path.join(root, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == cfg:
                return root
    os.makedirs(root, exist_ok=True)
    for si, s in enumerate(subjects):
        subject = dataset_subject(seed, si)
        for ai, a in enumerate(actions):
            rng = np.random.default_rng([seed, si, ai])
            seq = generate_sequence(subject, a, num_frames, num_views, rng, image_size,
                                    noise_std=noise_std)
            write_sequence(root, s, a, seq)
        if log:
            log(f"[mcss data] wrote {s}: {len(actions)} actions x {num_views} views x {num_frames} frames")
    with open(meta_path, "w") as f:
        json.dump(cfg, f)
    return root


def front_back_sheet(seed: int = 0, subjects: Sequence[str] = TRAIN_SUBJECTS + TEST_SUBJECTS,
                     image_size=(64, 64), *, upscale: int = 2, per_row: int = 4,
                     oblique: float = 0.4, noise_std: float = 0.02) -> np.ndarray:
    """A picture sheet of every subject seen from the front and from behind.

    Subject ``s`` (index ``si`` in ``subjects``) is drawn as :func:`generate_dataset`
    draws it (:func:`dataset_subject`), in the first frame of a Walking
    sequence turned to face +x (global rotation zeroed), and rendered twice from
    cameras ``pi`` apart in azimuth (front: the camera on the body's +x side, turned
    by ``oblique`` radians; back: opposite), 10 degrees above the pelvis, 4.5 m away,
    with ``noise_std`` pixel noise (the generator's by default). Each pair is
    labelled; pairs are laid out ``per_row`` to a row, tiles nearest-upscaled ``upscale`` times.
    Returns a uint8 image [rows * (12 + H * upscale), ..., 3].
    """
    from PIL import Image, ImageDraw

    h, w = image_size
    front = np.pi / 2 + oblique        # camera centre d (sin a, -cos a, .): a = pi/2 is +x
    pose = np.array([[front, np.deg2rad(10), 0, 4500], [front + np.pi, np.deg2rad(10), 0, 4500]],
                    np.float32)
    th, tw, gap, label = h * upscale, w * upscale, 6, 12
    rows = -(-len(subjects) // per_row)
    sheet = Image.new("RGB", (per_row * (2 * tw + gap) - gap, rows * (label + th)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for si, name in enumerate(subjects):
        subject = dataset_subject(seed, si)
        angles = sk.action_angles("Walking", 1, np.random.default_rng([seed, si, 0]))
        angles[:, 0] = 0.0
        images, _ = render_subject(subject, np.repeat(angles, 2, 0), pose, image_size,
                                   noise_std=noise_std, seed=si)
        pair = np.concatenate(list(images), axis=1).repeat(upscale, 0).repeat(upscale, 1)
        x, y = (si % per_row) * (2 * tw + gap), (si // per_row) * (label + th)
        sheet.paste(Image.fromarray(pair), (x, y + label))
        draw.text((x + 2, y), f"{name} front", fill=(0, 0, 0))
        draw.text((x + tw + 2, y), "back", fill=(0, 0, 0))
    return np.asarray(sheet)


def _main(argv=None) -> None:
    import argparse

    from PIL import Image

    parser = argparse.ArgumentParser(
        description="Front/back picture sheet of the synthetic subjects.")
    parser.add_argument("--sheet", required=True, help="output PNG path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="tile size in pixels")
    parser.add_argument("--upscale", type=int, default=2)
    args = parser.parse_args(argv)
    img = front_back_sheet(args.seed, image_size=(args.size, args.size), upscale=args.upscale)
    os.makedirs(os.path.dirname(os.path.abspath(args.sheet)), exist_ok=True)
    Image.fromarray(img).save(args.sheet)


if __name__ == "__main__":
    _main()
