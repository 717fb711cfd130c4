"""3D pose metrics (mm in, mm out). Pure; numpy or jax arrays.

* MPJPE: mean per-joint Euclidean error after root-centring (joint 0).
* N-MPJPE: the prediction scaled by ``s = <p, g> / <p, p>`` (root-centred,
  flattened pose) first.
* PA-MPJPE: after a similarity Procrustes alignment (rotation, translation,
  scale) of the prediction onto the ground truth.

>>> import numpy as np
>>> g = np.random.default_rng(0).normal(size=(17, 3))
>>> float(pa_mpjpe(3 * g + 1, g)) < 1e-6
True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["root_centre", "mpjpe", "n_mpjpe", "optimal_rotation", "procrustes_align", "pa_mpjpe"]


def _xnp(*arrays):
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def root_centre(pose, root: int = 0):
    """[..., J, 3] -> the same minus joint ``root``."""
    return pose - pose[..., root:root + 1, :]


def mpjpe(pred, gt, root_centred: bool = True):
    """pred, gt: [..., J, 3] -> [...] mean joint error."""
    xnp = _xnp(pred, gt)
    if root_centred:
        pred, gt = root_centre(pred), root_centre(gt)
    return xnp.mean(xnp.linalg.norm(pred - gt, axis=-1), axis=-1)


def n_mpjpe(pred, gt):
    """MPJPE after the least-squares scale of the root-centred prediction."""
    xnp = _xnp(pred, gt)
    pred, gt = root_centre(pred), root_centre(gt)
    s = xnp.sum(pred * gt, axis=(-2, -1)) / xnp.maximum(xnp.sum(pred * pred, axis=(-2, -1)), 1e-12)
    return mpjpe(s[..., None, None] * pred, gt, root_centred=False)


def optimal_rotation(p, g):
    """The rotation minimising ``|p @ rot - g|^2`` (reflections excluded; Kabsch) for
    centred point sets p, g: [..., N, 3] -> (rot [..., 3, 3] applied as ``p @ rot``,
    the trace of the fixed singular values [...], which Umeyama's scale needs)."""
    xnp = _xnp(p, g)
    cov = xnp.einsum("...ji,...jk->...ik", p, g)          # [..., 3, 3] = P^T G
    u, s, vt = xnp.linalg.svd(cov)
    # Rotation R = U diag(1, 1, d) V^T applied as p @ R, d fixing reflections.
    d = xnp.sign(xnp.linalg.det(xnp.einsum("...ij,...jk->...ik", u, vt)))
    d = xnp.where(d == 0, 1.0, d)
    ones = xnp.ones_like(d)
    fix = xnp.stack([ones, ones, d], axis=-1)
    rot = xnp.einsum("...ij,...j,...jk->...ik", u, fix, vt)
    return rot, xnp.sum(s * fix, axis=-1)


def procrustes_align(pred, gt):
    """Similarity transform of ``pred`` onto ``gt`` (Umeyama, reflections excluded).

    pred, gt: [..., J, 3] -> aligned pred [..., J, 3].
    """
    xnp = _xnp(pred, gt)
    mu_p = xnp.mean(pred, axis=-2, keepdims=True)
    mu_g = xnp.mean(gt, axis=-2, keepdims=True)
    p, g = pred - mu_p, gt - mu_g
    rot, trace = optimal_rotation(p, g)
    scale = trace / xnp.maximum(xnp.sum(p * p, axis=(-2, -1)), 1e-12)
    return scale[..., None, None] * xnp.einsum("...ij,...jk->...ik", p, rot) + mu_g


def pa_mpjpe(pred, gt):
    """MPJPE after similarity Procrustes alignment: [..., J, 3] -> [...]."""
    return mpjpe(procrustes_align(pred, gt), gt, root_centred=False)
