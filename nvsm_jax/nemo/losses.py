"""NeMo's CoKe contrastive loss over the vertex + clutter memory.

For every visible vertex ``i`` of image ``b`` with (unit) feature ``f``:

    logits_j = f . vertex_memory_j / T                       (j over the V vertices)
    logits_k = f . clutter_memory_k / T + log(clutter_weight) (k over the K clutter rows)
    ce = -log softmax(logits)_i

where vertices ``j != i`` whose projections lie within ``neighbor_radius``
input pixels of vertex ``i``'s are removed from the softmax (neighbours are not
negatives). The shift ``log(clutter_weight)`` is added *after* the temperature
division, as in NeMo (its mask subtracts ``-log(weight_noise)`` from the scaled
similarities). The total is

    mean_{visible (b, i)} ce  +  reg_weight * mean(clutter_features . vertex_memory)

The memories are constants (stop_gradient): they move by momentum only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CokeWeights", "CokeLoss", "coke_loss", "neighbor_mask", "sample_vertices"]


class CokeWeights(NamedTuple):
    """The loss's constants (module docstring), Python floats: temperature ``T``,
    neighbor_radius (input pixels), clutter_weight and reg_weight."""

    temperature: float = 0.07
    neighbor_radius: float = 48.0
    clutter_weight: float = 0.005
    reg_weight: float = 0.1


class CokeLoss(NamedTuple):
    """total, contrastive (the CE term) and reg (the clutter term), all scalars."""

    total: jax.Array
    contrastive: jax.Array
    reg: jax.Array


def _squared_distances(p, q):
    """p: [..., N, 2], q: [..., M, 2] -> [..., N, M] squared distances, written
    per coordinate: XLA:CPU ran the sum over the trailing axis of 2 of the
    [..., N, M, 2] differences as a separate 18 ms reduction per 128 px train
    step; written out, it fuses into the mask that reads it (WORKSPACE.md)."""
    dx = p[..., :, None, 0] - q[..., None, :, 0]
    dy = p[..., :, None, 1] - q[..., None, :, 1]
    return dx * dx + dy * dy


def neighbor_mask(xy, radius: float, vertex_ids=None):
    """``[..., V, V]`` True where vertices i != j project within ``radius`` pixels.

    xy: [..., V, 2]. vertex_ids: optional [..., N] vertex ids: only their rows,
    ``[..., N, V]`` (row n is vertex ``vertex_ids[..., n]``'s neighbours), the mask
    :func:`coke_loss` removes from the softmax.
    """
    v = xy.shape[-2]
    if vertex_ids is None:
        rows, ids = xy, jnp.arange(v)
    else:
        rows, ids = jnp.take_along_axis(xy, vertex_ids[..., None], axis=-2), vertex_ids
    return (_squared_distances(rows, xy) <= radius ** 2) & (ids[..., :, None] != jnp.arange(v))


def sample_vertices(key, visible, num: int):
    """``num`` distinct visible vertex ids per image, uniformly (Gumbel top-k).

    visible: [B, V] bool -> [B, num] int32. Where an image has fewer than
    ``num`` visible vertices the remaining picks are invisible ones (the loss
    masks them out).
    """
    g = jax.random.gumbel(key, visible.shape)
    _, idx = jax.lax.top_k(jnp.where(visible, g, g - 1e4), num)
    return idx.astype(jnp.int32)


def coke_loss(features, visible, xy, vertex_memory, clutter_memory, clutter_features=None, *,
              vertex_ids=None, weights: CokeWeights = CokeWeights()) -> CokeLoss:
    """The CoKe loss (module docstring) with the constants ``weights``.

    features: [B, V, D] vertex features (unit); visible: [B, V] bool; xy: [B, V, 2]
    vertex projections in input pixels; vertex_memory: [V, D]; clutter_memory:
    [K, D]; clutter_features: [B, M, D] background features of these images
    (for the regulariser; None skips it). vertex_ids: optional [B, N] vertex ids
    (:func:`sample_vertices`): the cross-entropy is then averaged over these
    (visible) vertices only, a uniform subsample that cuts the [B, V, V + K] logits
    to [B, N, V + K]; negatives are still all V vertices and K clutter rows.
    """
    temperature, neighbor_radius, clutter_weight, reg_weight = weights
    vm = jax.lax.stop_gradient(vertex_memory)
    cm = jax.lax.stop_gradient(clutter_memory)
    b, v = visible.shape
    if vertex_ids is None:
        vertex_ids = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), (b, v))
    fa = jnp.take_along_axis(features, vertex_ids[..., None], axis=1)    # [B, N, D]
    va = jnp.take_along_axis(visible, vertex_ids, axis=1)                # [B, N]
    hp = jax.lax.Precision.HIGHEST
    lv = jnp.einsum("bnd,ud->bnu", fa, vm, precision=hp) / temperature  # [B, N, V]
    is_self = vertex_ids[..., None] == jnp.arange(v)
    target = jnp.sum(jnp.where(is_self, lv, 0.0), axis=-1)              # [B, N]
    lv = jnp.where(neighbor_mask(xy, neighbor_radius, vertex_ids), -jnp.inf, lv)  # [B, N, V]
    lc = jnp.einsum("bnd,kd->bnk", fa, cm, precision=hp) / temperature + np.log(clutter_weight)
    lse = jnp.logaddexp(jax.nn.logsumexp(lv, axis=-1), jax.nn.logsumexp(lc, axis=-1))
    ce = lse - target
    vis = va.astype(features.dtype)
    contrastive = jnp.sum(jnp.where(va, ce, 0.0)) / jnp.maximum(jnp.sum(vis), 1.0)
    if clutter_features is None:
        reg = jnp.zeros((), features.dtype)
    else:
        reg = reg_weight * jnp.mean(jnp.einsum("bmd,vd->bmv", clutter_features, vm, precision=hp))
    return CokeLoss(contrastive + reg, contrastive, reg)
