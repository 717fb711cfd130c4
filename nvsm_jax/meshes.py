"""Triangle meshes: loading with validation, and NeMo's cuboid model mesh.

A mesh is a plain pair ``(verts: [V, 3] float32, faces: [F, 3] int32)`` in the
PASCAL3D+ world frame, faces wound counter-clockwise seen from outside (outward
normals by the right-hand rule).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import numpy as np

from nvsm_jax.errors import InputError

__all__ = ["Mesh", "MeshError", "load_mesh", "validate_mesh", "check_camera_outside", "save_off",
           "cuboid_mesh", "cuboid_for_points", "vertex_normals"]

log = logging.getLogger(__name__)


class MeshError(InputError):
    """A mesh that cannot be used, with the file (or source) it came from."""


class Mesh(NamedTuple):
    """verts: [V, 3] float32; faces: [F, 3] int32."""

    verts: np.ndarray
    faces: np.ndarray


def validate_mesh(verts, faces, *, source: str = "<array>", remove_degenerate: bool = True,
                  degenerate_area: float = 1e-12) -> Mesh:
    """Checks a mesh and returns it as float32/int32 arrays.

    Raises MeshError naming ``source`` when the mesh is empty, not triangular,
    has non-finite vertices or out-of-range indices, or has nothing left after
    removing degenerate faces (zero area or repeated indices), which are dropped
    with a warning that counts them when ``remove_degenerate`` (else reported as
    an error).
    """
    verts = np.asarray(verts)
    faces = np.asarray(faces)
    if verts.ndim != 2 or verts.shape[-1] != 3 or len(verts) == 0:
        raise MeshError(f"{source}: expected vertices of shape [V, 3] with V > 0, got {verts.shape}")
    if faces.ndim != 2 or len(faces) == 0:
        raise MeshError(f"{source}: expected faces of shape [F, 3] with F > 0, got {faces.shape}")
    if faces.shape[1] != 3:
        raise MeshError(f"{source}: faces must be triangles, got {faces.shape[1]} vertices per face")
    if not np.all(np.isfinite(verts)):
        bad = np.argwhere(~np.isfinite(verts))[0, 0]
        raise MeshError(f"{source}: vertex {bad} is not finite: {verts[bad]}")
    if not np.issubdtype(faces.dtype, np.integer):
        if not np.all(np.equal(np.mod(faces, 1), 0)):
            raise MeshError(f"{source}: face indices must be integers")
        faces = faces.astype(np.int64)
    if faces.min() < 0 or faces.max() >= len(verts):
        raise MeshError(f"{source}: face index out of range [0, {len(verts)}): "
                        f"min {faces.min()}, max {faces.max()}")
    tri = verts[faces].astype(np.float64)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)
    degenerate = (area <= degenerate_area) | (faces[:, 0] == faces[:, 1]) | \
        (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2])
    if degenerate.any():
        if not remove_degenerate:
            raise MeshError(f"{source}: {int(degenerate.sum())} degenerate faces "
                            f"(first: face {int(np.argmax(degenerate))})")
        if degenerate.all():
            raise MeshError(f"{source}: every one of its {len(faces)} faces is degenerate "
                            "(zero area or repeated vertices); is the mesh flattened?")
        log.warning("%s: dropped %d of %d degenerate faces (zero area or repeated vertices); "
                    "is the mesh flattened?", source, int(degenerate.sum()), len(faces))
        faces = faces[~degenerate]
    return Mesh(verts.astype(np.float32), faces.astype(np.int32))


def load_mesh(path: str | os.PathLike, **kwargs) -> Mesh:
    """Loads an OFF/OBJ/PLY (anything trimesh reads) and validates it.

    Vertices are kept as stored (no merging, no reordering) so vertex indices
    match the file. Raises MeshError naming the file on missing or bad input
    (an ``.off`` / ``.obj`` that is not UTF-8 text is refused before trimesh
    tries to guess its encoding).
    """
    import trimesh

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MeshError(f"{path}: mesh file not found")
    if os.path.splitext(path)[1].lower() in (".off", ".obj"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise MeshError(f"{path}: not a text mesh file (byte {err.start} is not UTF-8 text); "
                            "an .off or .obj mesh is text: is this the right file?") from None
    try:
        mesh = trimesh.load(path, force="mesh", process=False, maintain_order=True)
    except Exception as err:  # trimesh raises many types on corrupt files
        raise MeshError(f"{path}: cannot be read as a mesh ({type(err).__name__}: {err})") from err
    verts = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))))
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))))
    return validate_mesh(verts, faces, source=path, **kwargs)


def check_camera_outside(object_mesh: Mesh, poses, *, source: str = "<mesh>",
                         names=None) -> None:
    """Refuses a mesh whose box holds the camera for most images: its scale does not
    match the data (a mesh scaled x100 leaves a fraction of a percent of its vertices
    visible); warns when it does for a few (those annotations or the mesh may be off).

    object_mesh: Mesh; poses: [N, 4] the images' poses (the camera centre from azimuth,
    elevation and distance, :func:`nvsm_jax.geometry.camera_center`); names: [N] image
    names (for the message) or None. The test is the mesh's axis-aligned bounding box,
    so a long or off-centre mesh seen from close by passes. Raises MeshError naming
    ``source``.
    """
    from nvsm_jax import geometry

    p = np.asarray(poses, np.float64).reshape(-1, 4)
    if len(p) == 0:
        return
    centre = np.asarray(geometry.camera_center(p[:, 0], p[:, 1], p[:, 3], xnp=np))   # [N, 3]
    lo = object_mesh.verts.min(0).astype(np.float64)
    hi = object_mesh.verts.max(0).astype(np.float64)
    inside = np.all((centre >= lo) & (centre <= hi), axis=-1)
    if not inside.any():
        return
    k = int(np.flatnonzero(inside)[np.argmin(p[inside, 3])])
    which = f" (image {names[k]}, distance {p[k, 3]:.4g})" if names is not None else \
        f" (distance {p[k, 3]:.4g})"
    text = (f"{source}: the camera is inside the mesh's bounding box ({np.round(lo, 3)} .. "
            f"{np.round(hi, 3)}) for {int(inside.sum())} of {len(p)} images{which}")
    if inside.mean() > 0.5:
        raise MeshError(text + "\nthe mesh's scale does not match the annotations' distances: "
                        "rescale the mesh (or fix those annotations)")
    log.warning("%s; those images see the mesh from inside", text)


def save_off(path: str | os.PathLike, verts, faces) -> None:
    """Writes an OFF file (the format of PASCAL3D+'s CAD meshes)."""
    verts = np.asarray(verts, np.float64)
    faces = np.asarray(faces, np.int64)
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(f"OFF\n{len(verts)} {len(faces)} 0\n")
        np.savetxt(f, verts, fmt="%.6f")
        np.savetxt(f, np.concatenate([np.full((len(faces), 1), 3), faces], 1), fmt="%d")


def _grid_face(origin, u, v, nu, nv):
    """A regular (nu x nv)-vertex grid on origin + s u + t v, s, t in [0, 1]."""
    s, t = np.meshgrid(np.linspace(0, 1, nu), np.linspace(0, 1, nv), indexing="ij")
    verts = origin + s[..., None] * u + t[..., None] * v
    idx = np.arange(nu * nv).reshape(nu, nv)
    a, b = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel()
    c, d = idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    # counter-clockwise seen from the side u x v points to
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    return verts.reshape(-1, 3), faces


def cuboid_mesh(lower, upper, num_vertices: int = 1000) -> Mesh:
    """NeMo's cuboid: six regular grids on the box ``[lower, upper]``.

    Edge vertices are duplicated between faces (not merged), as in NeMo, so each
    vertex belongs to exactly one side and has that side's normal. The grid
    spacing is the same on every side and chosen so the total vertex count is
    as close to ``num_vertices`` as the box allows (at least 2 per edge).

    lower, upper: [3] -> Mesh with outward-facing, counter-clockwise faces.
    """
    lower = np.asarray(lower, np.float64)
    upper = np.asarray(upper, np.float64)
    size = upper - lower
    if lower.shape != (3,) or upper.shape != (3,) or np.any(size <= 0) or not np.all(np.isfinite(size)):
        raise MeshError(f"cuboid: need finite lower < upper on every axis, got {lower} and {upper}")

    def counts(spacing):
        return np.maximum(2, np.round(size / spacing).astype(int) + 1)

    def total(n):
        return 2 * (n[0] * n[1] + n[1] * n[2] + n[0] * n[2])

    lo, hi = 1e-6 * size.max(), size.max()
    for _ in range(60):  # bisection on the spacing
        mid = np.sqrt(lo * hi)
        if total(counts(mid)) > num_vertices:
            lo = mid
        else:
            hi = mid
    n = min((counts(lo), counts(hi)), key=lambda c: abs(total(c) - num_vertices))
    ex, ey, ez = np.diag(size)
    x0, x1 = lower, lower + ex
    sides = [  # (origin, u, v, nu, nv) with u x v pointing outwards
        (x0, ey, ex, n[1], n[0]),                  # z = lower (normal -z)
        (x0 + ez, ex, ey, n[0], n[1]),             # z = upper (+z)
        (x0, ex, ez, n[0], n[2]),                  # y = lower (-y)
        (x0 + ey, ez, ex, n[2], n[0]),             # y = upper (+y)
        (x0, ez, ey, n[2], n[1]),                  # x = lower (-x)
        (x1, ey, ez, n[1], n[2]),                  # x = upper (+x)
    ]
    verts, faces, offset = [], [], 0
    for origin, u, v, nu, nv in sides:
        vs, fs = _grid_face(origin, u, v, nu, nv)
        verts.append(vs)
        faces.append(fs + offset)
        offset += len(vs)
    return Mesh(np.concatenate(verts).astype(np.float32), np.concatenate(faces).astype(np.int32))


def cuboid_for_points(points, coverage: float = 0.99, num_vertices: int = 1000,
                      symmetric_axes=()) -> Mesh:
    """The cuboid spanning, per axis, the interval that covers ``coverage`` of points.

    points: [N, 3] (e.g. all vertices of a category's CAD models).
    symmetric_axes: axes (0, 1, 2) whose interval is made symmetric about 0
      (PASCAL3D+ models are centred; a car is left-right symmetric in x).
    """
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise MeshError(f"cuboid_for_points: expected points [N, 3], got {points.shape}")
    tail = (1.0 - coverage) / 2.0 * 100.0
    lower = np.percentile(points, tail, axis=0)
    upper = np.percentile(points, 100.0 - tail, axis=0)
    for axis in symmetric_axes:
        half = max(abs(lower[axis]), abs(upper[axis]))
        lower[axis], upper[axis] = -half, half
    return cuboid_mesh(lower, upper, num_vertices)


def vertex_normals(verts, faces) -> np.ndarray:
    """Area-weighted unit vertex normals. verts: [V, 3], faces: [F, 3] -> [V, 3]."""
    verts = np.asarray(verts, np.float64)
    tri = verts[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    vn = np.zeros_like(verts)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    norm = np.linalg.norm(vn, axis=-1, keepdims=True)
    return (vn / np.maximum(norm, 1e-12)).astype(np.float32)
