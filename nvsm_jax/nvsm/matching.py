"""Matching synthesised feature maps against real ones (NVSM's E-step score).

The poster's score for a synthesised view ``F_syn`` (with validity mask ``M``) and
an observed feature map ``F_m`` is

    S(F_syn, F_m) = 1/|M| sum_{(h,w) in M} [1 - d(F_syn(h,w), F_m(h,w))]

with the cosine distance ``d = 1 - cos``, i.e. the mean cosine similarity over
the valid pixels. Writing ``A_k = M_k * normalize(F_syn_k) / |M_k|`` and
``B_n = normalize(F_m_n)``, both flattened to ``[h*w*D]``, the score of every
(view, image) pair is one matrix product ``S = A @ B^T``: a ``[K, N]`` table at
matmul speed. Images are processed in chunks so memory stays bounded, and the
image axis is sharded over the mesh's ``data`` axis (each device scores its own
images against all views; no communication until the result is gathered).

Normalising ``B`` is memory-bound and, for a few dozen views, costs more than
the product itself; the E-step matches the same pool against many batches of
views, so it normalises the pool once (:func:`normalize_images`) and passes
``normalized=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nvsm_jax import parallel
from nvsm_jax.nemo.features import l2_normalize as normalize

__all__ = ["prepare_views", "normalize_images", "match_scores", "match_scores_sharded"]


def prepare_views(syn_feats, syn_mask):
    """Folds the mask, normalisation and 1/|M| into the view matrix.

    syn_feats: [K, h, w, D]; syn_mask: [K, h, w] bool or float in [0, 1]
    -> [K, h*w*D] float32. Views with an empty mask become all-zero rows
    (score 0 against every image).
    """
    k = syn_feats.shape[0]
    mask = syn_mask.astype(jnp.float32)
    count = jnp.sum(mask, axis=(1, 2))
    scale = jnp.where(count > 0, 1.0 / jnp.maximum(count, 1.0), 0.0)
    a = normalize(syn_feats.astype(jnp.float32)) * (mask * scale[:, None, None])[..., None]
    return a.reshape(k, -1)


@jax.jit
def normalize_images(image_feats):
    """Per-pixel L2 normalisation, float32. image_feats: [N, h, w, D] -> [N, h, w, D].

    Keeps the input's sharding; do it once per pool and match with ``normalized=True``.
    """
    return normalize(image_feats.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("chunk", "normalized"))
def match_scores(syn_feats, syn_mask, image_feats, chunk: int = 256, normalized: bool = False):
    """Scores of every synthesised view against every image.

    syn_feats: [K, h, w, D]; syn_mask: [K, h, w]; image_feats: [N, h, w, D]
    (normalised per pixel if ``normalized``, else normalised here).
    Returns [K, N] float32 in [-1, 1]. Raw images are scanned in chunks of
    ``chunk`` so at most ``chunk * h*w*D`` normalised features are live at once;
    normalised ones need no copy and go through one product.
    """
    a = prepare_views(syn_feats, syn_mask)
    n = image_feats.shape[0]
    if normalized:  # no intermediate to bound: one product straight from the input buffer
        b = image_feats.astype(jnp.float32).reshape(n, -1)
        return jnp.einsum("kp,np->kn", a, b, precision=jax.lax.Precision.DEFAULT)
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    feats = jnp.pad(image_feats, ((0, pad),) + ((0, 0),) * 3)
    feats = feats.reshape(-1, chunk, *image_feats.shape[1:])

    def one(_, block):
        b = normalize(block.astype(jnp.float32)).reshape(chunk, -1)
        return None, jnp.einsum("kp,np->kn", a, b, precision=jax.lax.Precision.DEFAULT)

    _, scores = jax.lax.scan(one, None, feats)          # [num_chunks, K, chunk]
    scores = jnp.moveaxis(scores, 1, 0).reshape(a.shape[0], -1)
    return scores[:, :n]


def match_scores_sharded(syn_feats, syn_mask, image_feats, mesh: Mesh | None = None,
                         chunk: int = 256, normalized: bool = False):
    """:func:`match_scores` with the image axis sharded over ``data``.

    Host or device arrays in; a [K, N] numpy array out. N is padded to a
    multiple of the device count and cut back. ``image_feats`` may be a global
    array sharded over several processes' devices (each process computed its own
    rows); every process then gets the whole table.
    """
    mesh = mesh or parallel.make_mesh()
    n = image_feats.shape[0]
    if n == 0:
        raise ValueError("match_scores_sharded: no images to match against (empty pool)")
    if syn_feats.shape[0] == 0:
        raise ValueError("match_scores_sharded: no synthesised views")
    n_dev = mesh.devices.size
    pad = (-n) % n_dev
    if pad:
        image_feats = jnp.concatenate([jnp.asarray(image_feats),
                                       jnp.zeros((pad,) + image_feats.shape[1:], image_feats.dtype)])
    images = jax.device_put(image_feats, NamedSharding(mesh, P(parallel.DATA)))
    views = jax.device_put((syn_feats, syn_mask), NamedSharding(mesh, P()))
    per_device = -(-images.shape[0] // n_dev)
    fn = _sharded_fn(mesh, min(chunk, per_device), bool(normalized))
    return parallel.host_array(fn(*views, images))[:, :n]    # from every process


@functools.lru_cache(maxsize=16)
def _sharded_fn(mesh: Mesh, chunk: int, normalized: bool):
    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(P(), P(), P(parallel.DATA)), out_specs=P(None, parallel.DATA))
    def fn(syn_feats, syn_mask, image_feats):
        return match_scores(syn_feats, syn_mask, image_feats, chunk=chunk, normalized=normalized)
    return fn
