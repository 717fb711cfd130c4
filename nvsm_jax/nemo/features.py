"""Vertex features read off a dense feature map, and NeMo's memory banks.

Pure functions over explicit state; everything works under jit/vmap and on a
batch sharded over the mesh ``data`` axis.

* :func:`bilinear_sample` reads ``[h, w, D]`` maps at screen points (x = column,
  y = row, pixel centres at +0.5, the convention of :mod:`nvsm_jax.geometry`).
* :func:`vertex_features` projects the model mesh at a pose onto a map of a
  given stride, samples it, and returns visibility (from the rasteriser) and
  NeMo's per-vertex weights ``visibility * |normal . view_dir|``.
* :class:`MemoryBank` + :func:`init_memory`, :func:`update_vertex_memory`,
  :func:`enqueue_clutter`: the vertex memory ``[V, D]`` with its momentum update
  ``mem <- normalize(m * mem + (1 - m) * batch_mean(feature * weight))`` and the
  clutter FIFO ring ``[K, D]``.
* :func:`sample_clutter` draws background features away from the object.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nvsm_jax import geometry
from rasterizer import rasterize, vertex_visibility

__all__ = ["bilinear_sample", "l2_normalize", "render_fragments", "silhouette_mask",
           "VertexFeatures", "vertex_features", "view_weights", "MemoryBank", "init_memory",
           "update_vertex_memory", "enqueue_clutter", "sample_clutter", "clutter_prototype"]


def l2_normalize(x, axis=-1, eps=1e-12):
    return x / jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def bilinear_sample(feature_map, xy):
    """Bilinear interpolation with border clamping.

    feature_map: [h, w, D]; xy: [..., 2] screen points (column, row; pixel
    ``(r, c)`` centred at ``(c + 0.5, r + 0.5)``) -> ([..., D], inside: [...] bool)
    where ``inside`` says the point lies within the map.
    """
    h, w = feature_map.shape[:2]
    x = xy[..., 0] - 0.5
    y = xy[..., 1] - 0.5
    inside = (xy[..., 0] >= 0) & (xy[..., 0] <= w) & (xy[..., 1] >= 0) & (xy[..., 1] <= h)
    x = jnp.clip(x, 0.0, w - 1.0)
    y = jnp.clip(y, 0.0, h - 1.0)
    x0 = jnp.clip(jnp.floor(x), 0, max(w - 2, 0)).astype(jnp.int32)
    y0 = jnp.clip(jnp.floor(y), 0, max(h - 2, 0)).astype(jnp.int32)
    x1 = jnp.minimum(x0 + 1, w - 1)
    y1 = jnp.minimum(y0 + 1, h - 1)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    f00, f01 = feature_map[y0, x0], feature_map[y0, x1]
    f10, f11 = feature_map[y1, x0], feature_map[y1, x1]
    top = f00 * (1 - fx) + f01 * fx
    bottom = f10 * (1 - fx) + f11 * fx
    return top * (1 - fy) + bottom * fy, inside


def render_fragments(verts, faces, pose, focal, principal, image_hw):
    """Rasterises the mesh at ``pose`` into an ``image_hw`` map.

    verts: [V, 3] world; faces: [F, 3]; pose: [..., 4]; focal: [...];
    principal: [..., 2] (all for the ``image_hw`` map) -> (Fragments, screen [..., V, 3]).
    """
    screen = geometry.project_to_screen(jnp.asarray(verts), pose, focal, principal)
    return rasterize(screen, jnp.asarray(faces), image_size=tuple(image_hw)), screen


def silhouette_mask(fragments):
    """``face_id >= 0``: [..., H, W] bool."""
    return fragments.face_id >= 0


def view_weights(verts, normals, pose):
    """``|normal . view_dir|`` per vertex. verts/normals: [V, 3]; pose: [..., 4] -> [..., V]."""
    centre = geometry.camera_center(pose[..., 0], pose[..., 1], pose[..., 3])
    view = l2_normalize(centre[..., None, :] - verts)
    return jnp.abs(jnp.sum(view * normals, axis=-1))


class VertexFeatures(NamedTuple):
    """Per-image vertex readings.

    features: [B, V, D] sampled features; visible: [B, V] bool; weights: [B, V]
    (visible * |n . v|); xy: [B, V, 2] projections in **input-image** pixels;
    silhouette: [B, h, w] bool object mask at the feature-map resolution.
    """

    features: jax.Array
    visible: jax.Array
    weights: jax.Array
    xy: jax.Array
    silhouette: jax.Array


def vertex_features(feature_map, verts, faces, normals, pose, focal, principal, *,
                    stride: int, render_stride: int | None = None) -> VertexFeatures:
    """Reads the features of every mesh vertex at its projection.

    feature_map: [B, h, w, D] with ``h = H / stride``; verts: [V, 3]; faces:
    [F, 3]; normals: [V, 3]; pose: [B, 4]; focal: [B]; principal: [B, 2]
    (intrinsics of the **input image**, H x W). Visibility comes from the
    rasteriser on a render at ``H / render_stride`` (default ``stride``) and
    requires the projection to lie inside the image; it carries no gradient.
    """
    b, h, w, _ = feature_map.shape
    render_stride = render_stride or stride
    big_h, big_w = h * stride, w * stride
    rh, rw = big_h // render_stride, big_w // render_stride
    verts = jnp.asarray(verts, jnp.float32)
    pose = jax.lax.stop_gradient(pose)
    frags, screen_r = render_fragments(verts, faces, pose, focal / render_stride,
                                       principal / render_stride, (rh, rw))
    visible = vertex_visibility(frags, jnp.asarray(faces), verts.shape[0])
    xy = screen_r[..., :2] * render_stride                        # input pixels
    feats, inside = jax.vmap(bilinear_sample)(feature_map, xy / stride)
    visible = jax.lax.stop_gradient(visible & inside & (screen_r[..., 2] > 0))
    weights = visible.astype(feature_map.dtype) * view_weights(verts, jnp.asarray(normals), pose)
    sil = silhouette_mask(frags)                                   # [B, rh, rw]
    k = stride // render_stride
    if k > 1:
        sil = sil.reshape(b, h, k, w, k).any(axis=(2, 4))
    return VertexFeatures(feats, visible, weights, jax.lax.stop_gradient(xy), sil)


class MemoryBank(NamedTuple):
    """vertex: [V, D] unit rows; clutter: [K, D] FIFO ring; clutter_ptr: [] int32 next slot."""

    vertex: jax.Array
    clutter: jax.Array
    clutter_ptr: jax.Array


def init_memory(key, num_verts: int, dim: int, clutter_size: int) -> MemoryBank:
    """Random unit rows (as NeMo's randomly initialised memory)."""
    kv, kc = jax.random.split(key)
    return MemoryBank(l2_normalize(jax.random.normal(kv, (num_verts, dim))),
                      l2_normalize(jax.random.normal(kc, (clutter_size, dim))),
                      jnp.zeros((), jnp.int32))


def update_vertex_memory(vertex_memory, features, weights, momentum: float = 0.9):
    """``normalize(momentum * mem + (1 - momentum) * mean_b(features * weights))``.

    vertex_memory: [V, D]; features: [B, V, D]; weights: [B, V]. The mean is
    over the (global) batch, invisible vertices contributing zeros, as NeMo.
    """
    batch = jnp.mean(features * weights[..., None], axis=0)
    return l2_normalize(momentum * vertex_memory + (1.0 - momentum) * batch)


def enqueue_clutter(memory: MemoryBank, new) -> MemoryBank:
    """Writes ``new: [N, D]`` into the ring at ``clutter_ptr`` (wrapping), oldest out."""
    k = memory.clutter.shape[0]
    new = new.reshape(-1, new.shape[-1])[-k:]
    idx = (memory.clutter_ptr + jnp.arange(new.shape[0])) % k
    clutter = memory.clutter.at[idx].set(new.astype(memory.clutter.dtype))
    return memory._replace(clutter=clutter,
                           clutter_ptr=((memory.clutter_ptr + new.shape[0]) % k).astype(jnp.int32))


def sample_clutter(key, feature_map, object_mask, num: int, *, dilate: int = 1):
    """``num`` random background features per image, away from the object.

    feature_map: [B, h, w, D]; object_mask: [B, h, w] bool (True on the object)
    which is dilated by ``dilate`` cells before sampling. Sampling is uniform
    without replacement over the remaining cells (Gumbel top-k); an image with
    too few background cells falls back to any cells. -> [B, num, D]
    """
    b, h, w, d = feature_map.shape
    m = object_mask.astype(jnp.float32)
    if dilate > 0:
        m = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, 2 * dilate + 1, 2 * dilate + 1),
                                  (1, 1, 1), "SAME")
    bg = (m < 0.5).reshape(b, h * w)
    enough = jnp.sum(bg, axis=-1, keepdims=True) >= num
    bg = jnp.where(enough, bg, True)
    g = jax.random.gumbel(key, (b, h * w))
    _, idx = jax.lax.top_k(jnp.where(bg, g, -jnp.inf), num)
    flat = feature_map.reshape(b, h * w, d)
    return jnp.take_along_axis(flat, idx[..., None], axis=1)


def clutter_prototype(clutter):
    """NeMo's clutter model: the normalised mean of the clutter bank. [K, D] -> [D]."""
    return l2_normalize(jnp.mean(clutter, axis=0))
