"""Synthetic synchronised multi-view human motion, rendered with our rasteriser.

A *sequence* is one subject performing one action for ``T`` frames, seen by
``V`` synchronised cameras placed at random around the subject (random
azimuth, height, distance, small roll; all looking at the pelvis). Frames are
root-centred crops (the pelvis projects to the crop centre), ``image_size``
pixels, rendered as shaded capsules (one low-poly capsule per bone, a larger
one for the head) with per-subject clothing colours, per-view backgrounds,
lighting and pixel noise.

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

Public API: :func:`capsule_template`, :func:`body_mesh`, :func:`render_frames`
(batched, jitted), :func:`sample_cameras`, :func:`generate_sequence`,
:func:`generate_dataset` (writes ``ROOT``), ``TRAIN_SUBJECTS``, ``TEST_SUBJECTS``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import rasterizer
from nvsm_jax import geometry as geo
from nvsm_jax.mcss import skeleton as sk

__all__ = ["TRAIN_SUBJECTS", "TEST_SUBJECTS", "CAPSULES", "capsule_template", "body_mesh",
           "render_frames", "sample_cameras", "generate_sequence", "generate_dataset",
           "write_sequence"]

TRAIN_SUBJECTS = ("S1", "S5", "S6", "S7", "S8")
TEST_SUBJECTS = ("S9", "S11")

# (joint a, joint b, radius mm, colour slot: 0 shirt, 1 trousers, 2 skin, 3 sleeve)
CAPSULES = (
    (0, 7, 115, 0), (7, 8, 125, 0), (0, 1, 75, 1), (0, 4, 75, 1),
    (1, 2, 68, 1), (2, 3, 52, 1), (4, 5, 68, 1), (5, 6, 52, 1),
    (8, 9, 45, 2), (9, 10, 95, 2),
    (8, 11, 55, 0), (11, 12, 46, 0), (12, 13, 38, 3),
    (8, 14, 55, 0), (14, 15, 46, 0), (15, 16, 38, 3),
)


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


def body_mesh(joints, radii, unit, faces):
    """Capsule mesh of a body.

    joints: [17, 3] world mm; radii: [K] mm per capsule (order of ``CAPSULES``);
    unit/faces: :func:`capsule_template`. Returns ``(verts [K * P, 3],
    normals [K * P, 3], faces [K * F, 3] int32 numpy)``.
    """
    ia = np.array([c[0] for c in CAPSULES])
    ib = np.array([c[1] for c in CAPSULES])
    a, b = joints[ia], joints[ib]                       # [K, 3]
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


@functools.partial(jax.jit, static_argnames=("image_size", "segments"))
def render_frames(joints_world, radii, colours, cam_pose, focal, principal, light, background,
                  noise_key, noise_std: float = 0.02, image_size=(64, 64), segments: int = 8):
    """Renders a batch of frames in one call.

    joints_world: [N, 17, 3] mm; radii: [N, K] mm; colours: [N, K, 3] in [0, 1];
    cam_pose: [N, 4] (azimuth, elevation, theta, distance mm) looking at the
    origin; focal: [N] px; principal: [N, 2]; light: [N, 3] unit direction
    towards the light in camera coordinates; background: [N, 2, 3] (top and
    bottom colour of a vertical gradient); noise_key: PRNG key.
    Returns uint8 images [N, H, W, 3].
    """
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

    _, _, faces = body_mesh(joints_world[0], radii[0], unit, faces_np)
    faces = jnp.asarray(faces)
    screen, vattr = jax.vmap(geometry)(joints_world, radii, colours, cam_pose, focal, principal)
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
    radii = np.array([c[2] for c in CAPSULES], np.float32) * subject["girth"]
    shirt, trousers, skin = subject["colours"]
    sleeve = shirt if subject["long_sleeves"] else skin
    slots = np.stack([shirt, trousers, skin, sleeve])
    colours = slots[[c[3] for c in CAPSULES]]
    return radii, colours.astype(np.float32)


def generate_sequence(subject: dict, action: str, num_frames: int, num_views: int,
                      rng: np.random.Generator, image_size=(64, 64), chunk: int = 256,
                      noise_std: float = 0.02) -> dict:
    """Renders one synchronised multi-view sequence.

    Returns a dict with images uint8 [V, T, H, W, 3], joints_world [T, 17, 3],
    joints_cam [V, T, 17, 3], joints_2d [V, T, 17, 2], and the cameras
    (pose [V, 4], focal [V], principal [V, 2]).
    """
    angles = sk.action_angles(action, num_frames, rng)
    joints = sk.forward_kinematics(angles.astype(np.float64), subject["offsets"]).astype(np.float32)
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
        joints_world=joints[ti], radii=np.broadcast_to(radii, (n,) + radii.shape),
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
        out = render_frames(**part, noise_key=jax.random.fold_in(jax.random.key(seed), i),
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
               joints="h36m17")
    meta_path = os.path.join(root, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == cfg:
                return root
    os.makedirs(root, exist_ok=True)
    for si, s in enumerate(subjects):
        subject = sk.sample_subject(np.random.default_rng([seed, si, 7919]))
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
