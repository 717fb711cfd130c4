"""Neural view synthesis: feature maps for poses nobody labelled.

Given the feature map ``F_A`` of an image with a known pose ``theta_A`` and the
object's model mesh:

1. project the mesh at ``theta_A`` and read ``F_A`` at the vertices visible
   under ``theta_A`` (:func:`nvsm_jax.nemo.features.vertex_features`), giving
   vertex features ``[V, D]`` and a validity mask ``[V]``;
2. rasterise the mesh under each target pose ``theta_A + dtheta``;
3. interpolate the valid vertex features with the barycentrics of the winning
   face; vertices unseen under ``theta_A`` contribute nothing.

A pixel's validity weight is the barycentric mass of its face's *valid*
vertices (1 when all three were seen under ``theta_A``); the feature there is
the valid vertices' features averaged with the renormalised barycentrics, and
the pixel counts as valid when the weight reaches ``min_weight``. The output
is what :mod:`nvsm_jax.nvsm.matching` compares against unlabelled images.

Everything is pure and jit-compiled; :func:`synthesize_views` renders K target
poses of one anchor in one call and vmaps over anchors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import rasterizer
from nvsm_jax import geometry

__all__ = ["synthesize_views", "synthesize_many"]


@functools.partial(jax.jit, static_argnames=("map_hw", "min_weight"))
def synthesize_views(vertex_feats, vertex_valid, verts, faces, target_poses, focal,
                     principal, map_hw, min_weight: float = 0.5):
    """Synthesised feature maps of one anchor under K target poses.

    vertex_feats: [V, D] features read from the anchor's map.
    vertex_valid: [V] bool, vertices visible under the anchor's pose.
    verts: [V, 3] model mesh (world frame); faces: [F, 3] int32.
    target_poses: [K, 4]; focal: [] and principal: [2] at the feature map's
      resolution (``map_hw = (h, w)``, static).
    Returns ``(feats [K, h, w, D], mask [K, h, w] bool)``; feats are zero where
    the mask is False.
    """
    screen = geometry.project_to_screen(verts, target_poses, focal, principal)
    frags = rasterizer.rasterize(screen, faces, map_hw)
    valid = vertex_valid.astype(vertex_feats.dtype)
    weighted = jnp.concatenate([vertex_feats * valid[:, None], valid[:, None]], axis=-1)
    out = rasterizer.interpolate(frags, faces, weighted)           # [K, h, w, D + 1]
    weight = out[..., -1]
    mask = (frags.face_id >= 0) & (weight >= min_weight)
    feats = out[..., :-1] / jnp.maximum(weight, 1e-6)[..., None]
    return jnp.where(mask[..., None], feats, 0.0), mask


@functools.partial(jax.jit, static_argnames=("map_hw", "min_weight"))
def synthesize_many(vertex_feats, vertex_valid, verts, faces, target_poses, focal,
                    principal, map_hw, min_weight: float = 0.5):
    """:func:`synthesize_views` vmapped over anchors.

    vertex_feats: [A, V, D]; vertex_valid: [A, V]; target_poses: [A, K, 4];
    focal: [A]; principal: [A, 2] -> (feats [A, K, h, w, D], mask [A, K, h, w]).
    """
    fn = functools.partial(synthesize_views, verts=verts, faces=faces, map_hw=map_hw,
                           min_weight=min_weight)
    return jax.vmap(lambda f, v, p, fo, pr: fn(f, v, target_poses=p, focal=fo, principal=pr))(
        vertex_feats, vertex_valid, target_poses, focal, principal)
