"""A differentiable triangle rasteriser in pure JAX (CPU, GPU, TPU).

Public API (all jit-able and vmap-able; batch poses as leading dims):

* :func:`rasterize` -> :class:`Fragments` (face_id, perspective-correct bary,
  depth): hard visibility, differentiable barycentrics.
* :func:`interpolate`: vertex attributes -> per-pixel attributes.
* :func:`interpolate_score`: per-pixel blend of a ``[V, H*W]`` score table
  (NeMo's feature folding; 3 gathers per pixel whatever the feature width).
* :func:`vertex_visibility`: vertices of faces that win a pixel.
* :func:`soft_rasterize`: SoftRas-style soft silhouette and attribute
  aggregation over the K nearest candidate faces per pixel, configured by one
  :class:`SoftSettings`.

Screen space everywhere: x = column, y = row in pixels (pixel ``(r, c)`` is
centred at ``(c + 0.5, r + 0.5)``), z = camera depth. This package depends
on jax only.
"""

from .hard import (DEFAULT_BLOCK, DEFAULT_JOBS_PER_PASS, Fragments, interpolate,
                   interpolate_score, rasterize, vertex_visibility)
from .soft import SoftFragments, SoftSettings, soft_rasterize

__all__ = [
    "Fragments",
    "rasterize",
    "interpolate",
    "interpolate_score",
    "vertex_visibility",
    "SoftFragments",
    "SoftSettings",
    "soft_rasterize",
    "DEFAULT_BLOCK",
    "DEFAULT_JOBS_PER_PASS",
]
