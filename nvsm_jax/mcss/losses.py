"""MCSS losses: multi-view consistency with temporal hard-negative mining, and
the supervised pose loss. Pure functions on the *global* batch (under ``jit``
with the batch sharded over ``data``, XLA inserts the communication).

A multi-view batch is flat: ``emb [B, D]`` with per-row ``seq [B]`` (sequence
id), ``time [B]`` (frame index) and ``view [B]``.

* positives of row ``i``: same sequence, same time, another view;
* negatives of row ``i``: same sequence, ``|time_i - time_j| >= dt_min`` (any
  view; with ``cross_sequence=True`` rows of other sequences count as well);
* hard mining: the valid negative closest to ``i`` in embedding space.

>>> import jax.numpy as jnp
>>> emb = jnp.eye(4)
>>> idx, ok = mine_hard_negatives(emb, jnp.zeros(4, int), jnp.arange(4), dt_min=2)
>>> idx.tolist(), ok.tolist()
([2, 3, 0, 0], [True, True, True, True])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["pairwise_distance", "positive_mask", "negative_mask", "mine_hard_negatives",
           "triplet_loss", "contrastive_loss", "multiview_loss", "pose_loss",
           "bone_distance_matrix", "pose_consistency_loss"]

_HI = jax.lax.Precision.HIGHEST


def pairwise_distance(emb, squared: bool = True):
    """emb: [B, D] -> [B, B] (squared) Euclidean distances, exact zeros on the diagonal."""
    sq = jnp.sum(emb * emb, axis=-1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(emb, emb.T, precision=_HI)
    d2 = jnp.maximum(d2, 0.0) * (1.0 - jnp.eye(emb.shape[0], dtype=emb.dtype))
    if squared:
        return d2
    # Safe sqrt: finite gradient at 0.
    safe = jnp.where(d2 > 1e-12, d2, 1.0)
    return jnp.where(d2 > 1e-12, jnp.sqrt(safe), 0.0)


def positive_mask(seq, time, view):
    """[B, B] bool: same sequence and time, different view."""
    return (seq[:, None] == seq[None, :]) & (time[:, None] == time[None, :]) & \
        (view[:, None] != view[None, :])


def negative_mask(seq, time, dt_min: int, cross_sequence: bool = False):
    """[B, B] bool: same sequence at least ``dt_min`` frames apart (or another sequence)."""
    same = seq[:, None] == seq[None, :]
    far = jnp.abs(time[:, None] - time[None, :]) >= dt_min
    neg = same & far
    if cross_sequence:
        neg = neg | ~same
    return neg


def mine_hard_negatives(emb, seq, time, dt_min: int, cross_sequence: bool = False,
                        squared: bool = True):
    """Closest valid negative per row.

    Returns ``(idx [B] int32, valid [B] bool)``; rows without any valid
    negative get ``valid=False`` (and an arbitrary idx).
    """
    d = jax.lax.stop_gradient(pairwise_distance(emb, squared))
    neg = negative_mask(seq, time, dt_min, cross_sequence)
    d = jnp.where(neg, d, jnp.inf)
    return jnp.argmin(d, axis=-1).astype(jnp.int32), jnp.any(neg, axis=-1)


def triplet_loss(emb, seq, time, view, *, dt_min: int, margin: float = 0.2,
                 squared: bool = True, cross_sequence: bool = False):
    """Mean over (anchor, positive) pairs of ``relu(d(a, p) - d(a, n*) + margin)``.

    ``n*`` is the anchor's hard negative. Returns ``(loss, aux)`` with the
    fraction of active triplets and mean positive / negative distances.
    """
    d = pairwise_distance(emb, squared)
    pos = positive_mask(seq, time, view)
    idx, has_neg = mine_hard_negatives(emb, seq, time, dt_min, cross_sequence, squared)
    d_neg = jnp.take_along_axis(d, idx[:, None], axis=1)          # [B, 1]
    valid = pos & has_neg[:, None]
    hinge = jnp.maximum(d - d_neg + margin, 0.0)
    n = jnp.maximum(jnp.sum(valid), 1)
    loss = jnp.sum(jnp.where(valid, hinge, 0.0)) / n
    aux = {"active": jnp.sum(valid & (hinge > 0)) / n,
           "d_pos": jnp.sum(jnp.where(valid, d, 0.0)) / n,
           "d_neg": jnp.sum(jnp.where(has_neg, d_neg[:, 0], 0.0)) / jnp.maximum(jnp.sum(has_neg), 1)}
    return loss, aux


def contrastive_loss(emb, seq, time, view, *, dt_min: int, temperature: float = 0.1,
                     cross_sequence: bool = False):
    """InfoNCE variant: each (anchor, positive) against all valid negatives.

    Similarity = cosine / temperature; rows within ``dt_min`` of the anchor
    that are not its positives are excluded from the denominator.
    """
    sim = jnp.matmul(emb, emb.T, precision=_HI) / temperature
    pos = positive_mask(seq, time, view)
    neg = negative_mask(seq, time, dt_min, cross_sequence)
    neg_lse = jax.nn.logsumexp(jnp.where(neg, sim, -jnp.inf), axis=-1, keepdims=True)
    has_neg = jnp.any(neg, axis=-1, keepdims=True)
    neg_lse = jnp.where(has_neg, neg_lse, -jnp.inf)
    # -log(e^s_ip / (e^s_ip + sum_n e^s_in))
    per_pair = jnp.logaddexp(sim, neg_lse) - sim
    valid = pos & has_neg
    n = jnp.maximum(jnp.sum(valid), 1)
    loss = jnp.sum(jnp.where(valid, per_pair, 0.0)) / n
    return loss, {"d_pos": jnp.sum(jnp.where(valid, 2 - 2 * sim * temperature, 0.0)) / n}


def multiview_loss(emb, seq, time, view, *, kind: str = "triplet", dt_min: int, margin: float = 0.2,
                   temperature: float = 0.1, squared: bool = True, cross_sequence: bool = False):
    """Dispatches to :func:`triplet_loss` or :func:`contrastive_loss`."""
    if kind == "triplet":
        return triplet_loss(emb, seq, time, view, dt_min=dt_min, margin=margin, squared=squared,
                            cross_sequence=cross_sequence)
    if kind == "contrastive":
        return contrastive_loss(emb, seq, time, view, dt_min=dt_min, temperature=temperature,
                                cross_sequence=cross_sequence)
    raise ValueError(f"unknown multiview loss {kind!r}: expected 'triplet' or 'contrastive'")


def pose_loss(pred, target, mask=None, kind: str = "mpjpe"):
    """Supervised 3D loss on root-relative poses.

    pred, target: [B, J, 3] (same units); mask: [B] weights or None.
    kind: ``"mpjpe"`` (per-joint Euclidean), ``"l1"`` or ``"mse"``.
    """
    if kind == "mpjpe":
        err = jnp.mean(jnp.sqrt(jnp.sum((pred - target) ** 2, axis=-1) + 1e-9), axis=-1)
    elif kind == "l1":
        err = jnp.mean(jnp.abs(pred - target), axis=(-2, -1))
    elif kind == "mse":
        err = jnp.mean((pred - target) ** 2, axis=(-2, -1))
    else:
        raise ValueError(f"unknown pose loss {kind!r}")
    if mask is None:
        return jnp.mean(err)
    mask = mask.astype(err.dtype)
    return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def bone_distance_matrix(pose):
    """[..., J, 3] -> [..., J, J] distances between all joints: unchanged by any rotation
    or translation of the pose, so two cameras' views of one instant share it."""
    d = pose[..., :, None, :] - pose[..., None, :, :]
    d2 = jnp.sum(d * d, axis=-1)
    safe = jnp.where(d2 > 1e-12, d2, 1.0)
    return jnp.where(d2 > 1e-12, jnp.sqrt(safe), 0.0)


def pose_consistency_loss(pose, seq, time, view):
    """Multi-view consistency of the *predicted* poses, without calibration: the mean
    over positive pairs (same sequence and time, another view) of the mean absolute
    difference of their joint-distance matrices (metres; 0 when there are no pairs).

    pose: [B, J, 3] camera-frame poses; the camera rotation between the views is
    unknown, so only rotation-invariant quantities are compared.
    """
    m = positive_mask(seq, time, view).astype(pose.dtype)
    dm = bone_distance_matrix(pose)                                     # [B, J, J]
    j = pose.shape[-2]
    diff = jnp.abs(dm[:, None] - dm[None, :]).sum(axis=(-1, -2)) / (j * (j - 1))   # [B, B]
    return jnp.sum(m * diff) / jnp.maximum(jnp.sum(m), 1.0)
