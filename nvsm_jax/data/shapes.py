"""Procedural object families for the 12 PASCAL3D+ categories.

Every instance is a union (concatenation, no booleans) of trimesh primitives
(boxes, cylinders, spheres/ellipsoids, tori) whose proportions are drawn per
instance (most part sizes vary by +-15 % to +-30 %, plus a global scale jitter).

Object frame (PASCAL3D+ world frame, one convention for **all** categories):

* ``z`` points up, the object stands on / is centred around the origin (every
  instance is re-centred on its axis-aligned bounding-box centre);
* the object's **front points to -y**: at azimuth 0 (camera at ``(0, -d, 0)``)
  the camera sees the front (car/bus/train headlights, aeroplane nose, boat bow,
  chair/sofa seat opening, tv screen, bicycle/motorbike handlebar), at azimuth
  pi it sees the back (tail lights, tail fin, seat back, tv back with stand);
* ``+x`` is the object's left side (the driver's left when facing -y); shapes
  are left-right symmetric in x, as real objects nearly are;
* the longest dimension is about 1 to 1.5 units.

Near-symmetries that real objects have are kept: a bottle is rotationally
symmetric (no front cue at all), a dining table is symmetric up to small
details (a drawer on its front side). Every other category carries colour or
geometry cues that tell front from back.

The topology (faces) of a category does not depend on the instance: every
instance has the same parts in the same order (optional parts are scaled to
zero, leaving degenerate faces), so a batch of instances of one category
renders with one ``faces`` array and only the vertices change.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import numpy as np

from nvsm_jax import meshes
from nvsm_jax.data.format import CATEGORIES

__all__ = ["CATEGORIES", "GROUPS", "Instance", "sample_instance", "category_topology",
           "model_mesh_points"]


# Material groups. Each instance draws a colour per group; ``TEXTURED`` groups
# also get the procedural surface pattern.
GROUPS = ("body", "body2", "glass", "dark", "metal", "head", "tail", "accent", "wood", "fabric")
G = {name: i for i, name in enumerate(GROUPS)}
TEXTURED = np.array([1, 1, 0, 0, 0, 0, 0, 0.5, 1, 1], np.float32)


class Instance(NamedTuple):
    """verts: [V, 3] float32; faces: [F, 3] int32; normals: [V, 3]; group: [V] int32."""

    verts: np.ndarray
    faces: np.ndarray
    normals: np.ndarray
    group: np.ndarray


# --------------------------------------------------------------------------- primitives

@functools.lru_cache(maxsize=None)
def _unit(kind: str):
    """Unit primitive (verts, faces), vertices split at sharp edges for flat shading."""
    import trimesh
    from trimesh import creation
    if kind == "box":            # [-0.5, 0.5]^3, every side flat-shaded
        m = creation.box(extents=(1, 1, 1)).smooth_shaded
    elif kind == "cyl":          # radius 1, z in [-0.5, 0.5], rims split
        m = creation.cylinder(radius=1.0, height=1.0, sections=16).smooth_shaded
    elif kind == "sphere":       # unit sphere, smooth
        m = creation.icosphere(subdivisions=1)
    elif kind == "torus":        # major radius 1, minor 0.12, axis z, smooth
        m = creation.torus(1.0, 0.12, major_sections=20, minor_sections=6)
    else:
        raise ValueError(kind)
    assert isinstance(m, trimesh.Trimesh)
    return np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int32)


def _rot_to(axis: str):
    """Rotation taking the primitive's z axis to the given world axis."""
    if axis == "z":
        return np.eye(3)
    if axis == "x":
        return np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], np.float64)
    if axis == "y":
        return np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], np.float64)
    raise ValueError(axis)


def _rz(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _rx(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


class _Builder:
    """Collects transformed primitives: (kind, 3x3 linear map, translation, group)."""

    def __init__(self):
        self.parts = []

    def add(self, kind, linear, center, group):
        self.parts.append((kind, np.asarray(linear, np.float64), np.asarray(center, np.float64),
                           G[group]))

    def box(self, center, size, group, rot=None):
        lin = np.diag(np.asarray(size, np.float64))
        if rot is not None:
            lin = rot @ lin
        self.add("box", lin, center, group)

    def cyl(self, center, radius, length, axis, group, rot=None, radius2=None):
        r2 = radius if radius2 is None else radius2
        lin = _rot_to(axis) @ np.diag([radius, r2, length])
        if rot is not None:
            lin = rot @ lin
        self.add("cyl", lin, center, group)

    def sphere(self, center, radii, group):
        radii = np.broadcast_to(np.asarray(radii, np.float64), (3,))
        self.add("sphere", np.diag(radii), center, group)

    def torus(self, center, radius, axis, group, thickness=1.0):
        # minor radius of the unit torus is 0.12 * radius * thickness
        lin = _rot_to(axis) @ np.diag([radius, radius, radius * thickness])
        self.add("torus", lin, center, group)

    def tube(self, p0, p1, radius, group):
        """A cylinder from p0 to p1."""
        p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
        d = p1 - p0
        length = np.linalg.norm(d)
        z = d / max(length, 1e-9)
        a = np.array([1.0, 0, 0]) if abs(z[0]) < 0.9 else np.array([0, 1.0, 0])
        x = np.cross(a, z)
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        rot = np.stack([x, y, z], axis=1)
        self.add("cyl", rot @ np.diag([radius, radius, length]), (p0 + p1) / 2, group)

    def build(self):
        verts, faces, group, offset = [], [], [], 0
        for kind, lin, center, g in self.parts:
            v, f = _unit(kind)
            verts.append(v @ lin.T + center)
            faces.append(f + offset)
            group.append(np.full(len(v), g, np.int32))
            offset += len(v)
        return np.concatenate(verts), np.concatenate(faces).astype(np.int32), np.concatenate(group)


# --------------------------------------------------------------------------- categories
# Each builder gets a numpy Generator and returns a _Builder. ``j(x, r)`` draws
# x * U(1 - r, 1 + r).

def _jit(rng):
    return lambda x, r=0.15: float(x) * rng.uniform(1 - r, 1 + r)


def _car(rng):
    j, b = _jit(rng), _Builder()
    L, W, H = j(1.0, 0.12), j(0.44, 0.12), j(0.17, 0.2)
    clear, wr = j(0.06, 0.2), j(0.085, 0.15)
    b.box((0, 0, clear + H / 2), (W, L, H), "body")
    cab_l = L * j(0.48, 0.2)
    cab_h = j(0.15, 0.25)
    cab_y = L * j(0.08, 0.6)                          # cabin sits towards the rear
    b.box((0, cab_y, clear + H + cab_h / 2), (W * 0.86, cab_l, cab_h), "glass")
    b.box((0, cab_y, clear + H + cab_h), (W * 0.88, cab_l * 0.9, 0.02), "body")
    for sx in (-1, 1):
        for sy, yy in ((-1, -L * 0.32), (1, L * 0.32)):
            b.cyl((sx * (W / 2 - 0.03), yy, wr), wr, 0.07, "x", "dark")
        b.box((sx * W * 0.33, -L / 2 - 0.008, clear + H * 0.7), (W * 0.18, 0.02, H * 0.22), "head")
        b.box((sx * W * 0.36, L / 2 + 0.008, clear + H * 0.72), (W * 0.14, 0.02, H * 0.2), "tail")
    b.box((0, -L / 2 - 0.006, clear + H * 0.4), (W * 0.4, 0.015, H * 0.3), "dark")   # grille
    b.box((0, L / 2 + 0.006, clear + H * 0.35), (W * 0.3, 0.015, H * 0.2), "metal")  # plate
    return b


def _bus(rng):
    j, b = _jit(rng), _Builder()
    L, W, H = j(1.3, 0.12), j(0.32, 0.1), j(0.42, 0.15)
    clear, wr = j(0.05, 0.2), j(0.07, 0.15)
    b.box((0, 0, clear + H / 2), (W, L, H), "body")
    b.box((0, 0, clear + H * 0.62), (W * 1.02, L * 0.86, H * j(0.28, 0.2)), "glass")   # side windows
    b.box((0, -L / 2 - 0.005, clear + H * 0.62), (W * 0.9, 0.02, H * 0.42), "glass")  # windscreen
    b.box((0, -L / 2 - 0.008, clear + H * 0.92), (W * 0.7, 0.02, H * 0.08), "accent")  # sign
    b.box((0, L / 2 + 0.005, clear + H * 0.7), (W * 0.6, 0.02, H * 0.2), "glass")     # small rear window
    b.box((0, 0, clear + H + 0.01), (W * 0.8, L * 0.4, j(0.03, 0.5)), "body2")         # roof unit
    for sx in (-1, 1):
        for yy in (-L * 0.33, L * 0.3):
            b.cyl((sx * (W / 2 - 0.02), yy, wr), wr, 0.05, "x", "dark")
        b.box((sx * W * 0.34, -L / 2 - 0.008, clear + H * 0.15), (W * 0.18, 0.02, H * 0.07), "head")
        b.box((sx * W * 0.38, L / 2 + 0.008, clear + H * 0.2), (W * 0.12, 0.02, H * 0.14), "tail")
    return b


def _train(rng):
    j, b = _jit(rng), _Builder()
    L, W, H = j(1.45, 0.1), j(0.24, 0.1), j(0.3, 0.15)
    clear = j(0.06, 0.2)
    b.box((0, L * 0.05, clear + H / 2), (W, L * 0.9, H), "body")
    nose = L * j(0.1, 0.3)
    # a sloped nose: a box rotated about x at the front
    b.box((0, -L * 0.4 - nose * 0.3, clear + H * 0.35), (W * 0.98, nose * 1.4, H * 0.7), "body2",
          rot=_rx(np.deg2rad(j(25, 0.3))))
    b.box((0, -L * 0.4 + 0.01, clear + H * 0.78), (W * 0.9, 0.04, H * 0.3), "glass")     # cab window
    b.box((0, L * 0.05, clear + H * 0.68), (W * 1.02, L * 0.7, H * 0.2), "glass")        # windows
    b.cyl((0, L * 0.05, clear + H), W * 0.45, L * 0.8, "y", "body2", radius2=W * 0.12)  # roof
    b.sphere((0, -L * 0.5 - nose * 0.5, clear + H * 0.25), W * 0.08, "head")            # headlight
    b.box((0, L / 2 + 0.005, clear + H * 0.3), (W * 0.5, 0.03, H * 0.25), "tail")
    for sx in (-1, 1):
        for yy in np.linspace(-L * 0.3, L * 0.4, 4):
            b.cyl((sx * W * 0.45, yy, clear * 0.9), clear * 0.9, 0.03, "x", "dark")
    return b


def _aeroplane(rng):
    j, b = _jit(rng), _Builder()
    L, R = j(1.25, 0.12), j(0.065, 0.2)
    span, chord = j(1.15, 0.15), j(0.2, 0.2)
    b.cyl((0, 0, 0), R, L * 0.8, "y", "body")
    b.sphere((0, -L * 0.4, 0), (R, R * 2.2, R), "body")                  # nose
    b.sphere((0, -L * 0.38, R * 0.55), (R * 0.7, R * 1.6, R * 0.6), "glass")   # cockpit
    b.cyl((0, L * 0.45, R * 0.2), R, L * 0.12, "y", "body", radius2=R * 0.5)   # tail cone
    wing_y = L * j(0.02, 2.0)
    b.box((0, wing_y, -R * 0.3), (span, chord, R * 0.35), "body2",
          rot=None)
    b.box((0, L * 0.47, R * 0.4), (span * j(0.35, 0.2), chord * 0.6, R * 0.25), "body2")  # tailplane
    fin_h = j(0.22, 0.2)
    b.box((0, L * 0.46, R + fin_h / 2), (R * 0.25, chord * 0.8, fin_h), "accent",
          rot=_rx(np.deg2rad(-20)))                                       # tail fin leans back
    for sx in (-1, 1):
        b.cyl((sx * span * 0.25, wing_y - chord * 0.3, -R * 1.2), R * 0.5, chord * 1.1, "y", "metal")
        b.box((sx * span * 0.5, wing_y, -R * 0.3), (0.02, chord * 0.5, R * 0.4), "tail")  # wing tips
    return b


def _wheel(b, center, radius, thickness=1.0):
    b.torus(center, radius, "x", "dark", thickness)
    b.cyl(center, radius * 0.15, 0.04, "x", "metal")


def _bicycle(rng):
    j, b = _jit(rng), _Builder()
    wr = j(0.26, 0.12)
    wb = j(0.68, 0.12)                     # wheelbase
    tube = j(0.016, 0.25)
    front, rear = np.array([0, -wb / 2, wr]), np.array([0, wb / 2, wr])
    crank = np.array([0, wb * 0.08, wr * 0.9])
    seat = np.array([0, wb * 0.2, wr + j(0.36, 0.15)])
    head = np.array([0, -wb * 0.3, wr + j(0.38, 0.15)])
    _wheel(b, front, wr)
    _wheel(b, rear, wr)
    for p0, p1 in ((crank, seat), (crank, head), (seat, head), (crank, rear), (seat, rear),
                   (front, head)):
        b.tube(p0, p1, tube, "body")
    bar_w = j(0.42, 0.15)
    b.tube(head, head + np.array([0, 0, 0.06]), tube, "body")
    b.cyl(head + np.array([0, 0, 0.06]), tube * 1.3, bar_w, "x", "metal")         # handlebar
    for sx in (-1, 1):
        b.cyl(head + np.array([sx * bar_w / 2, 0, 0.06]), tube * 2, 0.08, "x", "dark")  # grips
    b.box(seat + np.array([0, 0.02, 0.03]), (0.08, 0.2, 0.035), "dark")            # saddle
    b.box((0, wb * 0.2, wr * 0.85), (0.03, 0.16, 0.05), "accent")                 # chain guard
    b.sphere(head + np.array([0, -0.05, -0.05]), 0.03, "head")                    # lamp
    return b


def _motorbike(rng):
    j, b = _jit(rng), _Builder()
    wr = j(0.23, 0.12)
    wb = j(0.75, 0.12)
    front, rear = np.array([0, -wb / 2, wr]), np.array([0, wb / 2, wr])
    _wheel(b, front, wr, thickness=2.0)
    _wheel(b, rear, wr, thickness=2.0)
    eh = j(0.2, 0.2)
    b.box((0, 0, wr + 0.03), (j(0.2, 0.2), j(0.32, 0.2), eh), "metal")                  # engine
    b.sphere((0, -wb * 0.1, wr + eh * 0.5 + 0.1), (0.12, j(0.2, 0.2), 0.09), "body")    # tank
    b.box((0, wb * 0.22, wr + eh * 0.5 + 0.07), (0.16, j(0.34, 0.2), 0.06), "dark")     # seat
    head = np.array([0, -wb * 0.36, wr + j(0.5, 0.15)])
    b.tube(front, head, 0.025, "metal")
    b.cyl(head, 0.02, j(0.55, 0.15), "x", "metal")                                      # handlebar
    b.sphere(head + np.array([0, -0.07, -0.08]), j(0.06, 0.2), "head")                  # headlight
    b.box((0, -wb * 0.28, wr + 0.2), (0.16, 0.12, 0.1), "body")                         # fairing
    b.box((0, wb / 2 + 0.02, wr + eh * 0.5 + 0.09), (0.12, 0.06, 0.05), "tail")         # tail light
    b.cyl((0.12, wb * 0.25, wr * 0.7), 0.035, j(0.45, 0.2), "y", "metal")               # exhaust
    return b


def _boat(rng):
    j, b = _jit(rng), _Builder()
    L, W, H = j(1.3, 0.12), j(0.38, 0.15), j(0.18, 0.2)
    b.box((0, L * 0.1, H / 2), (W, L * 0.8, H), "body")                     # hull (stern part)
    bow = L * 0.3
    # pointed bow: a square prism rotated 45 deg, squashed in x
    b.box((0, -L * 0.3, H / 2), (W / np.sqrt(2), W / np.sqrt(2), H), "body",
          rot=np.diag([1.0, bow / (W / 2), 1.0]) @ _rz(np.pi / 4))
    b.box((0, L * 0.1, H + 0.01), (W * 1.02, L * 0.8, 0.03), "body2")        # gunwale stripe
    cab_l, cab_h = L * j(0.3, 0.25), j(0.14, 0.25)
    cy = L * j(0.15, 0.5)
    b.box((0, cy, H + cab_h / 2), (W * 0.7, cab_l, cab_h), "wood")           # cabin
    b.box((0, cy - cab_l / 2 - 0.005, H + cab_h * 0.6), (W * 0.6, 0.02, cab_h * 0.4), "glass")
    mh = j(0.4, 0.3)
    b.cyl((0, cy - cab_l * 0.2, H + cab_h + mh / 2), 0.015, mh, "z", "metal")  # mast
    b.box((0.05, L * 0.5 + 0.01, H * 0.9), (0.1, 0.04, 0.07), "tail")       # stern light
    return b


def _bottle(rng):
    j, b = _jit(rng), _Builder()
    R, Hb = j(0.17, 0.2), j(0.55, 0.2)
    b.cyl((0, 0, Hb / 2), R, Hb, "z", "body")
    b.sphere((0, 0, Hb), (R, R, R * j(0.8, 0.25)), "body")                 # shoulder
    nr, nh = R * j(0.38, 0.15), j(0.25, 0.25)
    b.cyl((0, 0, Hb + nh / 2), nr, nh, "z", "body")                        # neck
    b.cyl((0, 0, Hb + nh + 0.025), nr * 1.15, 0.05, "z", "accent")         # cap
    b.cyl((0, 0, Hb * j(0.5, 0.2)), R * 1.01, Hb * j(0.35, 0.25), "z", "body2")   # label
    return b


def _chair(rng):
    j, b = _jit(rng), _Builder()
    W, D, Hs = j(0.48, 0.12), j(0.46, 0.12), j(0.45, 0.12)
    t = j(0.05, 0.3)
    leg = j(0.035, 0.25)
    b.box((0, 0, Hs), (W, D, t), "fabric")
    for sx in (-1, 1):
        for sy in (-1, 1):
            b.box((sx * (W / 2 - leg), sy * (D / 2 - leg), Hs / 2), (leg, leg, Hs), "wood")
    bh = j(0.5, 0.2)
    tilt = np.deg2rad(j(10, 0.6))
    b.box((0, D / 2 - t / 2 + np.sin(tilt) * bh / 2, Hs + bh / 2), (W, t, bh), "fabric", rot=_rx(-tilt))
    b.box((0, D / 2 - t / 2 + np.sin(tilt) * bh, Hs + bh + 0.02), (W * 1.04, t * 1.3, 0.05), "wood")
    return b


def _diningtable(rng):
    j, b = _jit(rng), _Builder()
    L, W, H = j(1.25, 0.15), j(0.75, 0.2), j(0.5, 0.15)
    t = j(0.05, 0.25)
    leg = j(0.06, 0.25)
    b.box((0, 0, H), (L, W, t), "wood")
    b.box((0, 0, H - t), (L * 0.92, W * 0.9, t * 1.2), "body2")             # apron
    for sx in (-1, 1):
        for sy in (-1, 1):
            b.box((sx * (L / 2 - leg * 1.2), sy * (W / 2 - leg * 1.2), H / 2), (leg, leg, H), "wood")
    b.box((0, -W * 0.45 - 0.005, H - t), (L * 0.3, 0.02, t * 0.8), "metal")   # drawer (front)
    return b


def _sofa(rng):
    j, b = _jit(rng), _Builder()
    L, D, Hs = j(1.3, 0.15), j(0.55, 0.15), j(0.22, 0.2)
    arm_w, arm_h = j(0.13, 0.25), j(0.2, 0.25)
    back_t, back_h = j(0.14, 0.2), j(0.32, 0.2)
    b.box((0, 0, 0.05 + Hs / 2), (L, D, Hs), "fabric")                      # base
    for k in range(3):                                                      # seat cushions
        cw = (L - 2 * arm_w) / 3
        b.box((-(L / 2 - arm_w) + cw * (k + 0.5), -back_t / 2, 0.05 + Hs + 0.04),
              (cw * 0.96, D - back_t, 0.08), "body2")
    b.box((0, D / 2 - back_t / 2, 0.05 + Hs + back_h / 2), (L, back_t, back_h), "fabric")
    for sx in (-1, 1):
        b.box((sx * (L / 2 - arm_w / 2), 0, 0.05 + Hs + arm_h / 2), (arm_w, D, arm_h), "fabric")
        for sy in (-1, 1):
            b.cyl((sx * (L / 2 - 0.06), sy * (D / 2 - 0.06), 0.025), 0.025, 0.05, "z", "wood")
    return b


def _tvmonitor(rng):
    j, b = _jit(rng), _Builder()
    W, H, T = j(0.95, 0.15), j(0.6, 0.15), j(0.06, 0.3)
    z0 = j(0.2, 0.3)
    b.box((0, 0, z0 + H / 2), (W, T, H), "body")
    b.box((0, -T / 2 - 0.004, z0 + H / 2 + 0.01), (W * 0.9, 0.01, H * 0.85), "glass")      # screen
    b.box((0, T / 2 + j(0.08, 0.3) / 2, z0 + H * 0.5), (W * 0.5, j(0.08, 0.3), H * 0.5), "dark")  # back box
    b.box((0, T * 0.5 + 0.03, z0 / 2 + 0.01), (0.08, 0.04, z0), "metal")                   # neck (behind)
    b.box((0, 0.02, 0.01), (W * j(0.45, 0.2), j(0.28, 0.2), 0.02), "metal")               # base
    b.sphere((W * 0.4, -T / 2 - 0.01, z0 + 0.025), 0.012, "head")                          # power LED
    return b


_BUILDERS: dict[str, Callable] = {
    "aeroplane": _aeroplane, "bicycle": _bicycle, "boat": _boat, "bottle": _bottle,
    "bus": _bus, "car": _car, "chair": _chair, "diningtable": _diningtable,
    "motorbike": _motorbike, "sofa": _sofa, "train": _train, "tvmonitor": _tvmonitor,
}


def _check(category):
    if category not in _BUILDERS:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def sample_instance(category: str, rng: np.random.Generator) -> Instance:
    """Draws one instance of ``category`` (a new shape for every call)."""
    _check(category)
    scale = rng.uniform(0.93, 1.07)
    verts, faces, group = _BUILDERS[category](rng).build()
    lo, hi = verts.min(0), verts.max(0)
    verts = (verts - (lo + hi) / 2) * scale                 # centred on its box centre
    normals = meshes.vertex_normals(verts, faces)
    return Instance(verts.astype(np.float32), faces, normals, group)


@functools.lru_cache(maxsize=None)
def category_topology(category: str) -> tuple[int, np.ndarray]:
    """(num_verts, faces) shared by every instance of the category."""
    inst = sample_instance(category, np.random.default_rng(0))
    return len(inst.verts), inst.faces


def model_mesh_points(category: str, seed: int, num_instances: int = 200) -> np.ndarray:
    """Vertices of ``num_instances`` instances (for the category's cuboid)."""
    rng = np.random.default_rng([seed, CATEGORIES.index(category), 99])
    return np.concatenate([sample_instance(category, rng).verts for _ in range(num_instances)])
