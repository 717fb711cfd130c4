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
Joint 0's rotation is the global body orientation.
"""

from __future__ import annotations

import numpy as np

__all__ = ["JOINT_NAMES", "PARENTS", "BONES", "H36M_32_TO_17", "REST_OFFSETS", "ACTIONS",
           "euler_to_matrix", "forward_kinematics", "action_angles", "sample_subject"]

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


def forward_kinematics(angles, offsets, xnp=np):
    """Local rotations -> world joint positions.

    angles: [..., 17, 3] radians; offsets: [17, 3] or [..., 17, 3] mm.
    Returns: [..., 17, 3] with the pelvis at the origin.
    """
    rl = euler_to_matrix(angles, xnp)
    offsets = xnp.broadcast_to(offsets, angles.shape)
    rg = [rl[..., 0, :, :]]
    pos = [xnp.zeros_like(angles[..., 0, :])]
    for j in range(1, 17):
        p = PARENTS[j]
        pos.append(pos[p] + xnp.einsum("...ij,...j->...i", rg[p], offsets[..., j, :]))
        rg.append(xnp.einsum("...ij,...jk->...ik", rg[p], rl[..., j, :, :]))
    return xnp.stack(pos, axis=-2)


def sample_subject(rng: np.random.Generator) -> dict:
    """A subject: bone offsets [17, 3] mm, limb-radius scale, clothing colours [3, 3].

    Colours are (shirt, trousers, skin) in [0, 1].
    """
    height = rng.uniform(0.86, 1.1)
    groups = rng.uniform(0.9, 1.1, size=7)
    offsets = REST_OFFSETS * (height * groups[_LENGTH_GROUP])[:, None]
    def colour(lo, hi):
        return np.clip(rng.uniform(lo, hi, size=3), 0, 1)
    shirt = colour(0.1, 0.95)
    trousers = colour(0.05, 0.7)
    skin = np.array([0.85, 0.65, 0.5]) * rng.uniform(0.55, 1.1)
    return {"offsets": offsets.astype(np.float32), "girth": float(rng.uniform(0.85, 1.2)),
            "colours": np.stack([shirt, trousers, np.clip(skin, 0, 1)]).astype(np.float32),
            "long_sleeves": bool(rng.uniform() < 0.5)}


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
