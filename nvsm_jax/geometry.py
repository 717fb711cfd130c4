"""Camera geometry in the PASCAL3D+ convention.

One convention everywhere in nvsm_jax:

* The **world frame** is PASCAL3D+'s: meshes are stored in it, z points up.
* A **pose** is an array ``pose: [..., 4] = (azimuth, elevation, theta, distance)``,
  angles in radians. ``theta`` is the in-plane rotation.
* The **camera** is the PASCAL3D+ toolkit's (``project_3d.m``): camera centre
  ``C = d (cos e sin a, -cos e cos a, sin e)``, rotation
  ``R = Rz(theta) Rx(-(pi/2 - e)) Rz(-a)`` (the *evaluation rotation*), and the
  toolkit's image flip. We express it as an OpenCV-style camera
  ``x_cam = R_cv X + t_cv`` with ``R_cv = diag(1, -1, -1) R`` and ``t_cv = -R_cv C``:
  x to the right, y down, z (= depth) forward. A point then lands at pixel
  ``principal + focal * x_cam[:2] / x_cam[2]``, which equals the toolkit's
  projection exactly (tests/test_geometry.py checks this against a line-by-line
  transcription of the toolkit).
* **Screen space** (what the rasteriser takes): ``x`` = column and ``y`` = row in
  pixels, continuous, with pixel ``(r, c)`` centred at ``(c + 0.5, r + 0.5)``;
  ``z`` = camera depth (> 0 in front of the camera).
* ``focal`` is in pixels: PASCAL3D+'s ``focal * viewport`` (``1 * 3000`` for the
  NeMo camera). A feature map of stride ``s`` sees ``focal / s`` and
  ``principal / s``.

NeMo's PyTorch3D look-at camera (``C = d (cos e sin a, sin e, cos e cos a)``, up
= +y) is the same camera once mesh axes (x, y, z) are mapped to (x, z, -y); we
never need it because we never leave the PASCAL3D+ frame.

Every function is pure and works on numpy arrays (data pipelines) or jax arrays
(jit/vmap/grad); the array module is picked from the inputs, or passed as
``xnp``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Intrinsics",
    "nemo_intrinsics",
    "scale_intrinsics",
    "make_pose",
    "camera_center",
    "rotation_pascal",
    "world_to_camera",
    "transform_points",
    "project_to_screen",
    "project_pascal",
    "rotation_to_pose",
    "rotation_error",
    "pose_error",
    "azimuth_sector",
    "nemo_pose_grid",
    "sample_poses_at_angle",
    "rotation_about_axis",
    "wrap_angle",
]

NEMO_VIEWPORT = 3000.0
NEMO_DISTANCE = 5.0


def _xnp(*arrays):
    """Picks jax.numpy if any input is a jax array (or tracer), else numpy."""
    for a in arrays:
        if isinstance(a, jax.Array):
            return jnp
    return np


class Intrinsics(NamedTuple):
    """Pinhole intrinsics in pixels.

    focal: [] or [...] focal length in pixels (PASCAL3D+ ``focal * viewport``).
    principal: [..., 2] principal point ``(px, py)`` in screen coordinates
      (x = column, y = row, pixel centres at +0.5).
    """

    focal: float | np.ndarray | jax.Array
    principal: np.ndarray | jax.Array


def nemo_intrinsics(image_hw: Sequence[int], stride: int = 1,
                    viewport: float = NEMO_VIEWPORT, focal: float = 1.0) -> Intrinsics:
    """The NeMo camera: focal ``focal * viewport / stride``, principal at the centre.

    image_hw: ``(H, W)`` of the **input image**; the returned intrinsics are for
      the map of the given ``stride`` (``H / stride`` x ``W / stride``).
    """
    h, w = image_hw
    return Intrinsics(focal=float(focal * viewport) / stride,
                      principal=np.array([w / 2.0, h / 2.0], np.float32) / stride)


def scale_intrinsics(intrinsics: Intrinsics, scale: float) -> Intrinsics:
    """Intrinsics of an image resized by ``scale`` (e.g. ``1 / stride``)."""
    return Intrinsics(focal=intrinsics.focal * scale,
                      principal=intrinsics.principal * scale)


def make_pose(azimuth, elevation, theta, distance=NEMO_DISTANCE, *, xnp=None):
    """Stacks pose fields into ``pose: [..., 4]`` (broadcasting the inputs)."""
    xnp = xnp or _xnp(azimuth, elevation, theta, distance)
    values = (azimuth, elevation, theta, distance)
    # float32 unless an input is already float64 (Python scalars are weakly typed).
    dtype = xnp.result_type(xnp.float32, *values)
    fields = xnp.broadcast_arrays(*(xnp.asarray(v, dtype=dtype) for v in values))
    return xnp.stack(fields, axis=-1)


def wrap_angle(angle, *, xnp=None):
    """Wraps angles to [0, 2 pi)."""
    xnp = xnp or _xnp(angle)
    return xnp.mod(angle, 2 * np.pi)


def _rz(a, xnp):
    c, s = xnp.cos(a), xnp.sin(a)
    z, o = xnp.zeros_like(a), xnp.ones_like(a)
    return xnp.stack([xnp.stack([c, -s, z], -1),
                      xnp.stack([s, c, z], -1),
                      xnp.stack([z, z, o], -1)], -2)


def _rx(a, xnp):
    c, s = xnp.cos(a), xnp.sin(a)
    z, o = xnp.zeros_like(a), xnp.ones_like(a)
    return xnp.stack([xnp.stack([o, z, z], -1),
                      xnp.stack([z, c, -s], -1),
                      xnp.stack([z, s, c], -1)], -2)


def _matmul(a, b, xnp):
    if xnp is jnp:
        return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    return np.matmul(a, b)


def camera_center(azimuth, elevation, distance, *, xnp=None):
    """Camera centre in the world frame: ``d (cos e sin a, -cos e cos a, sin e)``.

    azimuth, elevation, distance: [...] -> [..., 3]
    """
    xnp = xnp or _xnp(azimuth, elevation, distance)
    ce = xnp.cos(elevation)
    return xnp.stack([distance * ce * xnp.sin(azimuth),
                      -distance * ce * xnp.cos(azimuth),
                      distance * xnp.sin(elevation)], axis=-1)


def rotation_pascal(azimuth, elevation, theta, *, xnp=None):
    """The PASCAL3D+ evaluation rotation ``Rz(theta) Rx(-(pi/2 - e)) Rz(-a)``.

    azimuth, elevation, theta: [...] radians -> [..., 3, 3]
    """
    xnp = xnp or _xnp(azimuth, elevation, theta)
    azimuth, elevation, theta = (xnp.asarray(v) for v in (azimuth, elevation, theta))
    r = _matmul(_rx(-(np.pi / 2 - elevation), xnp), _rz(-azimuth, xnp), xnp)
    return _matmul(_rz(theta, xnp), r, xnp)


def world_to_camera(pose, *, xnp=None):
    """OpenCV-style extrinsics of a pose (x right, y down, z forward).

    pose: [..., 4] -> (R_cv: [..., 3, 3], t_cv: [..., 3]) with
    ``x_cam = R_cv @ X + t_cv``.
    """
    xnp = xnp or _xnp(pose)
    a, e, t, d = (pose[..., i] for i in range(4))
    flip = xnp.asarray([1.0, -1.0, -1.0], dtype=pose.dtype)
    r_cv = flip[:, None] * rotation_pascal(a, e, t, xnp=xnp)
    c = camera_center(a, e, d, xnp=xnp)
    t_cv = -_matmul(r_cv, c[..., None], xnp)[..., 0]
    return r_cv, t_cv


def transform_points(points, rotation, translation, *, xnp=None):
    """``points @ R^T + t``.

    points: [..., V, 3]; rotation: [..., 3, 3]; translation: [..., 3] -> [..., V, 3]
    """
    xnp = xnp or _xnp(points, rotation, translation)
    return _matmul(points, xnp.swapaxes(rotation, -1, -2), xnp) + translation[..., None, :]


def project_to_screen(points, pose, focal, principal, *, min_depth: float = 1e-6,
                      xnp=None):
    """Projects world points into the rasteriser's screen space.

    points: [V, 3] or [..., V, 3] world (PASCAL3D+) coordinates.
    pose: [..., 4] (azimuth, elevation, theta, distance).
    focal: [] or [...] pixels; principal: [2] or [..., 2] ``(px, py)``.
    Returns: [..., V, 3] = (x column, y row, z depth). Points at or behind the
      camera keep their true (non-positive) depth ``z``; their ``x, y`` are
      computed with the depth clamped to ``min_depth`` so they stay finite (the
      rasteriser discards faces that reach behind its near plane).
    """
    xnp = xnp or _xnp(points, pose, focal, principal)
    r_cv, t_cv = world_to_camera(pose, xnp=xnp)
    cam = transform_points(points, r_cv, t_cv, xnp=xnp)
    z = cam[..., 2]
    z_safe = xnp.where(z > min_depth, z, min_depth)
    focal = xnp.asarray(focal, dtype=cam.dtype)[..., None, None]
    principal = xnp.asarray(principal, dtype=cam.dtype)[..., None, :]
    xy = principal + focal * cam[..., :2] / z_safe[..., None]
    return xnp.concatenate([xy, z[..., None]], axis=-1)


def project_pascal(points, azimuth, elevation, theta, distance, focal, viewport,
                   principal, *, xnp=None):
    """PASCAL3D+ annotation fields -> pixel coordinates ``[..., V, 2]``.

    The annotation's own parametrisation (``focal`` and ``viewport`` separate,
    angles in radians) of :func:`project_to_screen`.
    """
    pose = make_pose(azimuth, elevation, theta, distance, xnp=xnp)
    xnp = xnp or _xnp(pose)
    return project_to_screen(points, pose, xnp.asarray(focal) * xnp.asarray(viewport),
                             principal, xnp=xnp)[..., :2]


def rotation_to_pose(rotation, *, xnp=None):
    """Inverse of :func:`rotation_pascal`: [..., 3, 3] -> (azimuth, elevation, theta).

    Azimuth in [0, 2 pi), elevation in [-pi/2, pi/2], theta in (-pi, pi]. At the
    poles (elevation = +-pi/2) azimuth and theta are not separable; theta is then
    set to 0.
    """
    xnp = xnp or _xnp(rotation)
    # R = Rz(t) Rx(b) Rz(c) with b = e - pi/2 in [-pi, 0] and c = -a.
    cos_b = xnp.clip(rotation[..., 2, 2], -1.0, 1.0)
    sin_b_abs = xnp.sqrt(xnp.maximum(rotation[..., 2, 0] ** 2 + rotation[..., 2, 1] ** 2, 0.0))
    b = -xnp.arctan2(sin_b_abs, cos_b)          # in [-pi, 0]
    degenerate = sin_b_abs < 1e-7
    # Row 2 of R is (sin b sin c, sin b cos c, cos b) and column 2 is
    # (sin t sin b, -cos t sin b, cos b); sin b < 0 away from the poles.
    c = xnp.arctan2(-rotation[..., 2, 0], -rotation[..., 2, 1])
    t = xnp.arctan2(-rotation[..., 0, 2], rotation[..., 1, 2])
    # At a pole R = Rz(t + c) (b = 0) or Rz(t) diag(1,-1,-1) Rz(c) (b = -pi).
    c_pole = xnp.arctan2(rotation[..., 1, 0], rotation[..., 0, 0])
    c = xnp.where(degenerate, xnp.where(cos_b > 0, c_pole, -c_pole), c)
    t = xnp.where(degenerate, 0.0, t)
    azimuth = wrap_angle(-c, xnp=xnp)
    elevation = b + np.pi / 2
    return azimuth, elevation, t


def rotation_error(r1, r2, *, xnp=None):
    """Geodesic angle ``||logm(R1^T R2)||_F / sqrt(2)`` in radians.

    r1, r2: [..., 3, 3] -> [...]. Computed as ``atan2(|vee(M - M^T)| / 2,
    (tr M - 1) / 2)`` with ``M = R1^T R2``, which is exact and well conditioned
    near 0 and pi. NaN or Inf inputs give pi/2, as the PASCAL3D+ evaluation does.
    Differentiable everywhere under jax: where ``|vee|`` is exactly 0 (no error, or
    exactly pi) the square root is taken of a safe value, so the gradient there is
    0 (a subgradient of the kink at 0) instead of NaN.
    """
    xnp = xnp or _xnp(r1, r2)
    m = _matmul(xnp.swapaxes(r1, -1, -2), r2, xnp)
    cos = (m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2] - 1.0) / 2.0
    skew = xnp.stack([m[..., 2, 1] - m[..., 1, 2],
                      m[..., 0, 2] - m[..., 2, 0],
                      m[..., 1, 0] - m[..., 0, 1]], axis=-1)
    s2 = xnp.sum(skew ** 2, axis=-1)
    pos = s2 > 0
    sin = xnp.where(pos, xnp.sqrt(xnp.where(pos, s2, 1.0)), 0.0) / 2.0
    angle = xnp.arctan2(sin, cos)
    return xnp.where(xnp.isfinite(angle), angle, np.pi / 2)


def pose_error(pose_pred, pose_gt, *, xnp=None):
    """Geodesic rotation error between poses (distance plays no part).

    pose_pred, pose_gt: [..., >=3] (azimuth, elevation, theta, ...) -> [...] radians.
    """
    xnp = xnp or _xnp(pose_pred, pose_gt)
    r1 = rotation_pascal(pose_pred[..., 0], pose_pred[..., 1], pose_pred[..., 2], xnp=xnp)
    r2 = rotation_pascal(pose_gt[..., 0], pose_gt[..., 1], pose_gt[..., 2], xnp=xnp)
    return rotation_error(r1, r2, xnp=xnp)


def azimuth_sector(azimuth, bins: int) -> np.ndarray:
    """Sector index in ``[0, bins)`` of azimuths (radians, any range): [M] -> [M] int.

    Sector k covers ``[2 pi k / bins, 2 pi (k + 1) / bins)``; add half a sector
    to the azimuths for sectors centred on multiples of ``2 pi / bins``.
    """
    a = np.mod(np.asarray(azimuth, np.float64), 2 * np.pi)
    return np.minimum((a / (2 * np.pi) * bins).astype(np.int64), bins - 1)


def nemo_pose_grid(num_azimuth: int = 12,
                   elevations: Sequence[float] | None = None,
                   thetas: Sequence[float] | None = None,
                   distance: float = NEMO_DISTANCE) -> np.ndarray:
    """NeMo's initial pose grid (default 12 x 4 x 3 = 144 poses).

    Azimuths ``2 pi k / num_azimuth``; elevations ``linspace(-pi/6, pi/3, 4)``;
    thetas ``linspace(-pi/6, pi/6, 3)``. Returns ``[N, 4]`` float32, azimuth
    slowest.
    """
    if elevations is None:
        elevations = np.linspace(-np.pi / 6, np.pi / 3, 4)
    if thetas is None:
        thetas = np.linspace(-np.pi / 6, np.pi / 6, 3)
    a, e, t = np.meshgrid(np.arange(num_azimuth) * 2 * np.pi / num_azimuth,
                          np.asarray(elevations, np.float64),
                          np.asarray(thetas, np.float64), indexing="ij")
    return make_pose(a.ravel(), e.ravel(), t.ravel(), distance, xnp=np)


def rotation_about_axis(axis, angle, *, xnp=None):
    """Rodrigues: unit ``axis: [..., 3]``, ``angle: [...]`` -> [..., 3, 3]."""
    xnp = xnp or _xnp(axis, angle)
    axis = axis / xnp.linalg.norm(axis, axis=-1, keepdims=True)
    x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
    zero = xnp.zeros_like(x)
    k = xnp.stack([xnp.stack([zero, -z, y], -1),
                   xnp.stack([z, zero, -x], -1),
                   xnp.stack([-y, x, zero], -1)], -2)
    s, c = xnp.sin(angle)[..., None, None], xnp.cos(angle)[..., None, None]
    eye = xnp.eye(3, dtype=k.dtype)
    return eye + s * k + (1 - c) * _matmul(k, k, xnp)


def sample_poses_at_angle(rng: np.random.Generator | jax.Array, pose, angle, num: int):
    """Poses whose rotation is exactly ``angle`` (geodesic) away from ``pose``.

    rng: a numpy Generator (numpy path) or a jax PRNG key (jax path).
    pose: [4]; angle: [] radians; returns [num, 4] (distance copied).
    The rotation axes are uniform on the sphere.
    """
    if isinstance(rng, np.random.Generator):
        xnp = np
        axes = rng.normal(size=(num, 3))
    else:
        xnp = jnp
        axes = jax.random.normal(rng, (num, 3))
    pose = xnp.asarray(pose, dtype=xnp.float32)
    r0 = rotation_pascal(pose[0], pose[1], pose[2], xnp=xnp)
    delta = rotation_about_axis(axes, xnp.full((num,), angle), xnp=xnp)
    r = _matmul(delta, r0, xnp)
    a, e, t = rotation_to_pose(r, xnp=xnp)
    return make_pose(a, e, t, xnp.broadcast_to(pose[3], a.shape), xnp=xnp)
