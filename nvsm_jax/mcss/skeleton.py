"""The 17-joint Human3.6M skeleton, forward kinematics and synthetic actions.

World frame: z up (the PASCAL3D+ frame of :mod:`nvsm_jax.geometry`), units mm,
the pelvis at the origin (the subject moves "on a treadmill"; crops are
root-centred anyway). The body's rest pose faces +x with its left side at +y,
arms hanging.

Joint order (Human3.6M, 17): 0 pelvis, 1 R-hip, 2 R-knee, 3 R-foot, 4 L-hip,
5 L-knee, 6 L-foot, 7 spine, 8 thorax, 9 neck/nose, 10 head-top, 11 L-shoulder,
12 L-elbow, 13 L-wrist, 14 R-shoulder, 15 R-elbow, 16 R-wrist.

A pose is a set of local joint rotations ``angles: [..., 17, 3]`` (rx, ry, rz),
``R_local = Rz(rz) Ry(ry) Rx(rx)``; joint ``j``'s rotation moves its children:
``p[c] = p[j] + R_global[j] @ offset[c]``, ``R_global[j] = R_global[parent] R_local[j]``.
Joint 0's rotation is the global body orientation. Points rigidly attached to
a joint (eyes, toes, ...: rendering only) are ``p[j] + R_global[j] @ offset`` with
the offset in joint ``j``'s frame (:func:`attached_points`); ``R_global[j]`` is
the frame that carries ``j``'s children, so joint 9's frame is the head's, joint
7's the chest's and the ankles' (3, 6) the feet's.
"""

from __future__ import annotations

import numpy as np

__all__ = ["JOINT_NAMES", "PARENTS", "BONES", "H36M_32_TO_17", "REST_OFFSETS", "ACTIONS",
           "euler_to_matrix", "forward_kinematics", "forward_kinematics_frames", "attached_points",
           "action_angles", "sample_subject", "HAIR_PALETTE"]

JOINT_NAMES = ("pelvis", "r_hip", "r_knee", "r_foot", "l_hip", "l_knee", "l_foot", "spine",
               "thorax", "neck", "head_top", "l_shoulder", "l_elbow", "l_wrist",
               "r_shoulder", "r_elbow", "r_wrist")
PARENTS = np.array([-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15], np.int32)
BONES = np.array([(0, 1), (1, 2), (2, 3), (0, 4), (4, 5), (5, 6), (0, 7), (7, 8), (8, 9),
                  (9, 10), (8, 14), (14, 15), (15, 16), (8, 11), (11, 12), (12, 13)], np.int32)
# Human3.6M 32-joint mocap skeleton -> the 17 joints above.
H36M_32_TO_17 = np.array([0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27], np.int32)

# Offset of each joint from its parent in the parent's frame, mm (rest pose).
REST_OFFSETS = np.array([
    [0, 0, 0],          # pelvis
    [0, -130, 0],       # r_hip
    [0, 0, -450],       # r_knee
    [0, 0, -440],       # r_foot
    [0, 130, 0],        # l_hip
    [0, 0, -450],       # l_knee
    [0, 0, -440],       # l_foot
    [0, 0, 230],        # spine
    [0, 0, 250],        # thorax
    [40, 0, 110],       # neck/nose
    [0, 0, 120],        # head top
    [0, 150, -20],      # l_shoulder
    [0, 0, -280],       # l_elbow
    [0, 0, -250],       # l_wrist
    [0, -150, -20],     # r_shoulder
    [0, 0, -280],       # r_elbow
    [0, 0, -250],       # r_wrist
], np.float64)

# Body-part group of each joint's incoming bone (for per-subject bone-length scales).
_LENGTH_GROUP = np.array([0, 1, 2, 2, 1, 2, 2, 3, 3, 4, 4, 5, 6, 6, 5, 6, 6])  # 7 groups

ACTIONS = ("Walking", "Waving", "Sitting", "Bending", "JumpingJacks", "Boxing")
_PERIODS = {"Walking": 24, "Waving": 18, "Sitting": 60, "Bending": 44, "JumpingJacks": 20,
            "Boxing": 16}


def euler_to_matrix(angles, xnp=np):
    """``angles: [..., 3]`` (rx, ry, rz) -> ``Rz Ry Rx``: [..., 3, 3]."""
    rx, ry, rz = angles[..., 0], angles[..., 1], angles[..., 2]
    cx, sx, cy, sy, cz, sz = (xnp.cos(rx), xnp.sin(rx), xnp.cos(ry), xnp.sin(ry),
                              xnp.cos(rz), xnp.sin(rz))
    row0 = xnp.stack([cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx], -1)
    row1 = xnp.stack([sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx], -1)
    row2 = xnp.stack([-sy, cy * sx, cy * cx], -1)
    return xnp.stack([row0, row1, row2], -2)


def forward_kinematics_frames(angles, offsets, xnp=np):
    """Local rotations -> world joint positions and global joint rotations.

    angles: [..., 17, 3] radians; offsets: [17, 3] or [..., 17, 3] mm.
    Returns ``(positions [..., 17, 3] with the pelvis at the origin,
    rotations [..., 17, 3, 3])``; ``rotations[..., j, :, :]`` is ``R_global[j]``.
    """
    rl = euler_to_matrix(angles, xnp)
    offsets = xnp.broadcast_to(offsets, angles.shape)
    rg = [rl[..., 0, :, :]]
    pos = [xnp.zeros_like(angles[..., 0, :])]
    for j in range(1, 17):
        p = PARENTS[j]
        pos.append(pos[p] + xnp.einsum("...ij,...j->...i", rg[p], offsets[..., j, :]))
        rg.append(xnp.einsum("...ij,...jk->...ik", rg[p], rl[..., j, :, :]))
    return xnp.stack(pos, axis=-2), xnp.stack(rg, axis=-3)


def forward_kinematics(angles, offsets, xnp=np):
    """Local rotations -> world joint positions.

    angles: [..., 17, 3] radians; offsets: [17, 3] or [..., 17, 3] mm.
    Returns: [..., 17, 3] with the pelvis at the origin.
    """
    return forward_kinematics_frames(angles, offsets, xnp)[0]


def attached_points(positions, rotations, joint_ids, local_offsets, xnp=np):
    """Points rigidly attached to joints: ``p[j] + R_global[j] @ offset``.

    positions: [..., 17, 3]; rotations: [..., 17, 3, 3] (from
    :func:`forward_kinematics_frames`); joint_ids: [M] int (static); local_offsets:
    [M, 3] or [..., M, 3] mm in each joint's frame. Returns: [..., M, 3].
    """
    ids = np.asarray(joint_ids, np.int64)
    return positions[..., ids, :] + xnp.einsum("...mij,...mj->...mi", rotations[..., ids, :, :],
                                               local_offsets)


# Natural hair colours (black, dark brown, brown, auburn, blond, grey), jittered per subject.
HAIR_PALETTE = np.array([[0.06, 0.05, 0.05], [0.2, 0.12, 0.07], [0.38, 0.24, 0.12],
                         [0.5, 0.2, 0.08], [0.82, 0.68, 0.42], [0.62, 0.62, 0.6]])


def _hsv(rng, sat, val):
    """One colour of uniform hue, saturation in ``sat``, value in ``val``: [3] in [0, 1]."""
    h, s, v = rng.uniform(0, 1), rng.uniform(*sat), rng.uniform(*val)
    k = (np.array([5.0, 3.0, 1.0]) + 6 * h) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def _contrasting(rng, draw, other, min_dist, tries=20):
    """``draw(rng)`` redrawn until its RGB distance to ``other`` is at least ``min_dist``."""
    c = draw(rng)
    for _ in range(tries):
        if np.linalg.norm(c - other) >= min_dist:
            break
        c = draw(rng)
    return c


def sample_subject(rng: np.random.Generator) -> dict:
    """A subject: body shape and appearance (appearance version 2).

    Returns a dict with ``offsets`` [17, 3] mm (bone lengths: height x0.86-1.1,
    7 bone-group scales x0.9-1.1; drawn first, so a seed gives the same skeleton
    as appearance version 1), ``girth`` (body capsule radius scale, 0.8-1.3),
    ``head`` (head radius scale, 0.9-1.1), ``colours`` [6, 3] in [0, 1] = (shirt,
    trousers, skin, shoes, print, hair), ``long_sleeves`` and ``hair_length``
    (0-0.3 short, down to the nape; 0.65-1 long, down the back to the shoulders).
    Colours: skin one base tone x0.4-1.12 (dark to light); shirt, trousers and
    shoes of any hue, saturation and brightness (trousers darker on average);
    the chest print at RGB distance >= 0.5 from the shirt and the shoes >= 0.3
    from the trousers (redrawn until so, at most 20 times); hair from
    :data:`HAIR_PALETTE` (x0.8-1.2) or, one subject in ten, any hue, at least 0.35
    from the skin.
    """
    height = rng.uniform(0.86, 1.1)
    groups = rng.uniform(0.9, 1.1, size=7)
    offsets = REST_OFFSETS * (height * groups[_LENGTH_GROUP])[:, None]
    girth = rng.uniform(0.8, 1.3)
    head = rng.uniform(0.9, 1.1)
    skin = np.clip(np.array([0.87, 0.66, 0.5]) * rng.uniform(0.4, 1.12), 0, 1)
    shirt = _hsv(rng, (0.0, 1.0), (0.12, 0.97))
    trousers = _hsv(rng, (0.0, 0.8), (0.06, 0.8))
    shoes = _contrasting(rng, lambda r: _hsv(r, (0.0, 0.9), (0.04, 0.97)), trousers, 0.3)
    print_ = _contrasting(rng, lambda r: _hsv(r, (0.3, 1.0), (0.15, 1.0)), shirt, 0.5)

    def hair_colour(r):
        if r.uniform() < 0.1:
            return _hsv(r, (0.4, 1.0), (0.2, 0.9))
        return np.clip(HAIR_PALETTE[r.integers(len(HAIR_PALETTE))] * r.uniform(0.8, 1.2), 0, 1)
    hair = _contrasting(rng, hair_colour, skin, 0.35)
    long_hair = rng.uniform() < 0.5
    hair_length = rng.uniform(0.65, 1.0) if long_hair else rng.uniform(0.0, 0.3)
    colours = np.stack([shirt, trousers, skin, shoes, print_, hair])
    return {"offsets": offsets.astype(np.float32), "girth": float(girth), "head": float(head),
            "colours": np.clip(colours, 0, 1).astype(np.float32),
            "long_sleeves": bool(rng.uniform() < 0.5), "hair_length": float(hair_length)}


def action_angles(action: str, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth periodic joint-angle trajectory: [T, 17, 3] radians.

    Each action is a motion profile on a period (so poses recur and temporal
    negatives are sometimes false); amplitude, period and phase vary per call,
    plus a slow random style wobble and a slowly turning body yaw.
    """
    t = np.arange(num_frames, dtype=np.float64)
    period = _PERIODS[action] * rng.uniform(0.85, 1.15)
    phi = 2 * np.pi * t / period + rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(0.8, 1.2)
    s = 0.5 * (1 - np.cos(phi))  # 0..1 cycle
    a = np.zeros((num_frames, 17, 3))
    RX, RY, RZ = 0, 1, 2
    if action == "Walking":
        a[:, 1, RY] = -0.45 * amp * np.sin(phi)
        a[:, 4, RY] = 0.45 * amp * np.sin(phi)
        a[:, 2, RY] = 0.1 + 0.35 * amp * (1 - np.cos(phi))
        a[:, 5, RY] = 0.1 + 0.35 * amp * (1 + np.cos(phi))
        a[:, 14, RY] = 0.4 * amp * np.sin(phi)
        a[:, 11, RY] = -0.4 * amp * np.sin(phi)
        a[:, 12, RY] = a[:, 15, RY] = -0.35
        a[:, 7, RZ] = 0.12 * np.sin(phi)
    elif action == "Waving":
        a[:, 14, RX] = -2.3 * amp
        a[:, 15, RX] = -0.7 + 0.55 * np.sin(phi)
        a[:, 11, RX] = 0.1
        a[:, 7, RX] = 0.06 * np.sin(phi)
    elif action == "Sitting":
        a[:, 1, RY] = a[:, 4, RY] = -1.45 * amp * s
        a[:, 2, RY] = a[:, 5, RY] = 1.55 * amp * s
        a[:, 7, RY] = 0.45 * s
        a[:, 11, RY] = a[:, 14, RY] = -0.6 * s
        a[:, 12, RY] = a[:, 15, RY] = -0.5 * s
    elif action == "Bending":
        a[:, 7, RY] = 0.9 * amp * s
        a[:, 8, RY] = 0.45 * amp * s
        a[:, 1, RY] = a[:, 4, RY] = -0.25 * s
        a[:, 2, RY] = a[:, 5, RY] = 0.35 * s
        a[:, 11, RY] = a[:, 14, RY] = -0.9 * s
        a[:, 9, RY] = -0.35 * s
    elif action == "JumpingJacks":
        a[:, 11, RX] = 2.6 * amp * s
        a[:, 14, RX] = -2.6 * amp * s
        a[:, 4, RX] = 0.35 * s
        a[:, 1, RX] = -0.35 * s
        a[:, 2, RY] = a[:, 5, RY] = 0.2 * s
    elif action == "Boxing":
        ext_r = 0.5 * (1 + np.sin(phi))
        ext_l = 0.5 * (1 - np.sin(phi))
        a[:, 14, RY] = -1.2 - 0.3 * ext_r
        a[:, 15, RY] = -1.8 * (1 - ext_r)
        a[:, 11, RY] = -1.2 - 0.3 * ext_l
        a[:, 12, RY] = -1.8 * (1 - ext_l)
        a[:, 7, RZ] = 0.3 * np.sin(phi)
        a[:, 1, RY] = a[:, 4, RY] = -0.25
        a[:, 2, RY] = a[:, 5, RY] = 0.4
    else:
        raise ValueError(f"unknown action {action!r}; known: {ACTIONS}")
    # Per-sequence style: a constant offset plus a slow wobble on every joint.
    style = rng.normal(0, 0.08, size=(17, 3))
    wobble_f = rng.uniform(0.2, 0.6, size=(17, 3)) * 2 * np.pi / max(period, 1.0)
    wobble = 0.05 * np.sin(t[:, None, None] * wobble_f + rng.uniform(0, 2 * np.pi, (17, 3)))
    a[:, 1:] += style[1:] + wobble[:, 1:]
    # Global orientation: random yaw that turns slowly, slight lean.
    a[:, 0, RZ] = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.01, 0.01) * t
    a[:, 0, RX] = rng.normal(0, 0.04)
    a[:, 0, RY] = rng.normal(0, 0.04)
    return a.astype(np.float32)
