"""SoftRas-style probabilistic rasterisation over the K nearest candidate faces.

SoftRas (Liu et al. 2019) lets every face influence every pixel:

* coverage ``D = sigmoid(s * d^2 / sigma)`` with ``d`` the distance from the
  pixel centre to the triangle and ``s = +1`` inside, ``-1`` outside;
* silhouette ``1 - prod_j (1 - D_j)``;
* attributes ``sum_j w_j A_j + w_b A_b`` with ``w_j ∝ D_j exp(z_j / gamma)``,
  ``z_j = (zfar - depth_j) / (zfar - znear)`` (larger = nearer) and a
  background term ``w_b ∝ exp(eps / gamma)``; ``A_b = 0`` here.

Evaluated literally that is ``P x H x W x F`` work and memory. Here it runs
only over **candidates**: a cheap, gradient-free pass (the hard rasteriser's
splatting engine, see ``_splat``) finds for every pixel the ``top_k`` nearest
faces whose edges are all within the blur radius ``r = sqrt(sigma *
logit(1 - eps_d))`` of the pixel centre (beyond it ``D < eps_d`` and SoftRas
skips the face too). It peels them nearest-first in ``top_k`` rounds of
scatter-max over packed ``(depth rank, face)`` keys. The soft terms are then
computed differentiably from the selected faces' vertices: memory
``O(P x H x W x top_k)``, gradients w.r.t. ``verts`` wherever a pixel is within
``r`` of a face, in particular at silhouette edges.

The differentiable terms are evaluated over chunks of poses under
``jax.checkpoint`` (recomputed in the backward pass), so neither direction
holds more than a chunk's ``[poses, H * W, top_k, ...]`` temporaries.
Candidate selection is approximate by design: depths are quantised into the
key's high bits (face index in the low bits), so faces within ~1e-6 of the
batch's depth range of each other may swap ranks; pixels with more than
``top_k`` candidates drop the farthest.

Units: screen pixels. ``sigma`` is in px^2; SoftRas's default ``1e-5`` in NDC
units on a 256-pixel image is ``1e-5 * (256 / 2)^2 ≈ 0.16`` px^2 (default
here 0.2: a blur radius of ~1.4 px).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from . import _sharding, _splat
from .hard import DEFAULT_BLOCK, DEFAULT_JOBS_PER_PASS, _check_image_size, _chunked

__all__ = ["SoftFragments", "SoftSettings", "soft_rasterize"]


class SoftFragments(NamedTuple):
    """Output of :func:`soft_rasterize` (a pytree).

    silhouette: [..., H, W] soft coverage in [0, 1].
    attrs: [..., H, W, C] aggregated vertex attributes, or None when no
      attributes were given.
    face_ids: [..., H, W, K] the candidate faces, nearest first; -1 pads.
    """

    silhouette: jax.Array
    attrs: jax.Array | None
    face_ids: jax.Array


class SoftSettings(NamedTuple):
    """Settings of :func:`soft_rasterize` (hashable when its fields are).

    sigma: coverage sharpness in px^2 (``D = sigmoid(s * d^2 / sigma)``).
    gamma: depth-blend temperature of the colour weights.
    top_k: candidate faces per pixel (static); the nearest are kept.
    znear, zfar: depth normalisation of the colour weights (SoftRas'
      ``(zfar - z) / (zfar - znear)``), in camera depth units.
    eps: background depth term (its weight is ``exp(eps / gamma)``).
    dist_eps: faces farther than where ``D < dist_eps`` are not candidates.
    near: faces with a vertex at ``z <= near`` are discarded, as for
      :func:`rasterize`.
    cull_backfaces: drop back faces, as for :func:`rasterize` (static).
    block: ``(by, bx)`` pixel block per job, as for :func:`rasterize`
      (static; speed only).
    jobs_per_pass: jobs per pass, as for :func:`rasterize` (static; speed
      and memory only).

    sigma, gamma, znear, zfar, eps, dist_eps and near are traced (changing them
    does not recompile; they may be tracers inside a caller's jit); the others
    are static.
    """

    sigma: float = 0.2
    gamma: float = 1e-4
    top_k: int = 8
    znear: float = 1.0
    zfar: float = 100.0
    eps: float = 1e-3
    dist_eps: float = 1e-4
    near: float = 1e-3
    cull_backfaces: bool = False
    block: Sequence[int] = DEFAULT_BLOCK
    jobs_per_pass: int = DEFAULT_JOBS_PER_PASS


def soft_rasterize(verts, faces, image_size: Sequence[int], vertex_attrs=None,
                   settings: SoftSettings = SoftSettings()) -> SoftFragments:
    """Soft silhouette and attribute aggregation over the top-K candidate faces.

    verts: [..., V, 3] screen space (x column, y row, z depth), as for
      :func:`rasterize`.
    faces: [F, 3] int.
    image_size: ``(H, W)``, static.
    vertex_attrs: optional [V, C] or [..., V, C] (batch dims broadcast).
    settings: :class:`SoftSettings` (sigma, gamma, top_k, znear, zfar, eps,
      dist_eps, near, cull_backfaces, block, jobs_per_pass).
    Returns: SoftFragments(silhouette [..., H, W], attrs [..., H, W, C] or
      None, face_ids [..., H, W, top_k]). Differentiable w.r.t. verts and
      vertex_attrs.
    """
    sigma, gamma, top_k, znear, zfar, eps, dist_eps, near, cull_backfaces, block, \
        jobs_per_pass = settings
    faces = jnp.asarray(faces, jnp.int32)
    if vertex_attrs is not None:
        vertex_attrs = jnp.asarray(vertex_attrs)
    # Continuous parameters are traced (changing them does not recompile).
    params = dict(sigma=sigma, gamma=gamma, znear=znear, zfar=zfar, eps=eps,
                  dist_eps=dist_eps, near=near)
    return _soft(verts, faces, vertex_attrs, params, _check_image_size(image_size),
                 int(top_k), bool(cull_backfaces), tuple(int(b) for b in block),
                 int(jobs_per_pass))


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _soft(verts, faces, vertex_attrs, params, image_size, top_k, cull_backfaces, block,
          jobs_per_pass):
    nb = verts.ndim - 2
    local = functools.partial(
        _soft_local, params=params, image_size=image_size, top_k=top_k,
        cull_backfaces=cull_backfaces, block=block, jobs_per_pass=jobs_per_pass)
    attrs_out = None if vertex_attrs is None else (nb, nb + 3)
    if vertex_attrs is None:
        args, nbs = (verts, faces), (nb, 0)
    else:
        args, nbs = (verts, faces, vertex_attrs), (nb, 0, vertex_attrs.ndim - 2)
    return _sharding.per_shard(local, args, nbs, verts,
                               SoftFragments((nb, nb + 2), attrs_out, (nb, nb + 3)))


def _soft_local(verts, faces, vertex_attrs=None, *, params, image_size, top_k, cull_backfaces,
                block, jobs_per_pass):
    h, w = image_size
    batch = verts.shape[:-2]
    nv = verts.shape[-2]
    sv = verts.reshape((-1, nv, 3))
    nb = sv.shape[0]
    p = {k: jnp.asarray(v, sv.dtype) for k, v in params.items()}
    radius = jnp.sqrt(p["sigma"] * jnp.log(1.0 / p["dist_eps"] - 1.0))
    ids = _candidates(lax.stop_gradient(sv), faces, image_size, radius=radius, top_k=top_k,
                      near=p["near"], cull_backfaces=cull_backfaces, block=block,
                      jobs_per_pass=jobs_per_pass)                       # [B, HW, K]
    terms = functools.partial(_soft_terms, faces=faces, image_size=image_size,
                              sigma=p["sigma"], gamma=p["gamma"], znear=p["znear"],
                              zfar=p["zfar"], eps=p["eps"])
    if vertex_attrs is None:
        sil = _chunked(lambda v, i: terms(v, i)[0], sv, ids, per_pose=h * w * top_k,
                       target=1 << 18, remat=True)
        attrs = None
    else:
        attr_batch = vertex_attrs.shape[:-2]
        if jnp.broadcast_shapes(batch, attr_batch) != batch:
            raise ValueError(f"vertex_attrs batch {attr_batch} must broadcast to {batch}")
        va = jnp.broadcast_to(vertex_attrs, batch + vertex_attrs.shape[-2:])
        va = va.reshape((nb,) + vertex_attrs.shape[-2:])

        def fn(v, i, a):
            sil, weights, bary, vidx = terms(v, i)
            return sil, _blend(a.reshape(-1, a.shape[-1]), vidx, weights, bary)

        sil, attrs = _chunked(fn, sv, ids, va, per_pose=h * w * top_k, target=1 << 18,
                              remat=True)
        attrs = attrs.reshape(batch + (h, w, attrs.shape[-1]))
    return SoftFragments(silhouette=sil.reshape(batch + (h, w)), attrs=attrs,
                         face_ids=ids.reshape(batch + (h, w, top_k)))


def _candidates(sv, faces, image_size, *, radius, top_k, near, cull_backfaces, block,
                jobs_per_pass):
    """The ``top_k`` nearest faces within ``radius`` of every pixel (no gradient).

    sv: [B, V, 3]; faces: [F, 3] -> [B, H * W, top_k] int32, nearest first, -1 pads.
    """
    h, w = image_size
    nb, nf = sv.shape[0], faces.shape[0]
    hw = h * w
    setup = _splat.face_setup(sv, faces, image_size, near=near, min_area=1e-6,
                              cull_backfaces=cull_backfaces, expand=radius)
    # A pixel is a candidate if it lies within `radius` of all three edge lines
    # (a superset of the radius-neighbourhood of the triangle).
    edges = []
    for a, b, c in setup.edges:
        slack = radius * jnp.sqrt(a * a + b * b)
        edges.append((a.reshape(-1), b.reshape(-1), (c + slack).reshape(-1)))
    plane = tuple(v.reshape(-1) for v in setup.plane)
    # Ordering key: 1/z at the pixel clamped to the face's range, quantised
    # against the batch's range into the high bits, the face index in the low.
    _, _, z = _splat.corners(sv, faces)
    ok = setup.box[1] >= 0
    iz = [jnp.where(ok, 1.0 / jnp.where(ok, zk, 1.0), 0.0) for zk in z]
    iz_lo = jnp.minimum(jnp.minimum(iz[0], iz[1]), iz[2]).reshape(-1)
    iz_hi = jnp.maximum(jnp.maximum(iz[0], iz[1]), iz[2]).reshape(-1)
    face_bits = max(1, math.ceil(math.log2(nf + 1)))
    depth_bits = 31 - face_bits
    if depth_bits < 8:
        raise ValueError(f"too many faces ({nf}) for the soft rasteriser's 32-bit keys")
    lo = jnp.min(jnp.where(ok.reshape(-1), iz_lo, jnp.inf))
    hi = jnp.max(jnp.where(ok.reshape(-1), iz_hi, -jnp.inf))
    scale = (2.0 ** depth_bits - 1) / jnp.maximum(hi - lo, 1e-30)
    table = _splat.job_table(setup.box, block)
    dy, dx, fdy, fdx = _splat.block_offsets(block, sv.dtype)
    num = int(jobs_per_pass)
    dump = nb * hw

    def candidate_keys(start):
        live = start < table.total
        jobs = _splat.pass_jobs(start, num, table, setup.box, block)
        per_job = _splat.materialize(live, dict(
            px=jobs.col.astype(sv.dtype) + 0.5, py=jobs.row.astype(sv.dtype) + 0.5,
            edges=[tuple(v[jobs.slot] for v in e) for e in edges],
            plane=tuple(v[jobs.slot] for v in plane),
            lo=iz_lo[jobs.slot], hi=iz_hi[jobs.slot], face=jobs.face,
            base=jobs.pose * hw + jobs.row * w + jobs.col, rows=jobs.rows, cols=jobs.cols))
        x = per_job["px"] + fdx
        y = per_job["py"] + fdy
        near_ = (dy < per_job["rows"]) & (dx < per_job["cols"])
        for a, b, c in per_job["edges"]:
            near_ = near_ & (a * x + b * y + c >= 0)
        pa, pb, pc = per_job["plane"]
        inv_z = jnp.clip(pa * x + pb * y + pc, per_job["lo"], per_job["hi"])
        rank = jnp.clip(((inv_z - lo) * scale).astype(jnp.int32), 0, 2 ** depth_bits - 1)
        key = jnp.where(near_, (rank << face_bits) | per_job["face"], -1)
        pix = jnp.where(near_, per_job["base"] + dy * w + dx, dump)
        return _splat.materialize(live, (key, pix))

    def one_round(r, state):
        slots, prev = state

        def body(start, best):
            key, pix = candidate_keys(start)
            key = jnp.where(key < prev.at[pix].get(mode="promise_in_bounds"), key, -1)
            return best.at[pix].max(key, mode="promise_in_bounds")

        best = _splat.run_passes(table.total, num, body,
                                 jnp.full((nb * hw + 1,), -1, jnp.int32))
        return lax.dynamic_update_index_in_dim(slots, best, r, 0), best

    # Round r keeps, per pixel, the largest key below round r - 1's: the
    # (r + 1)-th nearest candidate. Keys are unique (they hold the face index).
    init = (jnp.full((top_k, nb * hw + 1), -1, jnp.int32),
            jnp.full((nb * hw + 1,), jnp.iinfo(jnp.int32).max, jnp.int32))
    slots, _ = lax.fori_loop(0, top_k, one_round, init)
    keys = slots[:, :dump].T.reshape(nb, hw, top_k)
    return jnp.where(keys >= 0, keys & ((1 << face_bits) - 1), -1)


def _segment_dist2(px, py, ax, ay, bx, by):
    """Squared distance from points to segments (broadcasting)."""
    ex, ey = bx - ax, by - ay
    len2 = ex * ex + ey * ey
    t = ((px - ax) * ex + (py - ay) * ey) / jnp.where(len2 > 0, len2, 1.0)
    t = jnp.clip(t, 0.0, 1.0)
    dx, dy = px - ax - t * ex, py - ay - t * ey
    return dx * dx + dy * dy


def _soft_terms(sv, ids, *, faces, image_size, sigma, gamma, znear, zfar, eps):
    """Differentiable SoftRas terms of the candidates.

    sv: [B, V, 3]; ids: [B, HW, K] -> (silhouette [B, HW], weights [B, HW, K]
    of the faces' colours (the background's weight is the rest), bary [B, HW,
    K, 3] clipped perspective-correct, flat vertex indices [B, HW, K, 3] into
    ``[B * V]``).
    """
    h, w = image_size
    nb, nv = sv.shape[:2]
    hw = h * w
    valid = ids >= 0
    vidx = faces[jnp.maximum(ids, 0)] + (jnp.arange(nb, dtype=jnp.int32) * nv)[:, None, None, None]
    pts = sv.reshape(nb * nv, 3)
    dummy = (((0.0, 0.0, 1.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0)))
    tx, ty, tz = ([jnp.where(valid, pts[vidx[..., k], c], dummy[k][c]) for k in range(3)]
                  for c in range(3))                                      # each [B, HW, K]
    pix = jnp.arange(hw, dtype=jnp.int32)
    px = ((pix % w).astype(sv.dtype) + 0.5)[None, :, None]
    py = ((pix // w).astype(sv.dtype) + 0.5)[None, :, None]
    lam = []
    for k in range(3):
        i1, i2 = (k + 1) % 3, (k + 2) % 3
        lam.append((tx[i2] - tx[i1]) * (py - ty[i1]) - (ty[i2] - ty[i1]) * (px - tx[i1]))
    a2 = lam[0] + lam[1] + lam[2]
    a2 = jnp.where(jnp.abs(a2) > 0, a2, 1.0)
    lam = [v / a2 for v in lam]
    inside = (lam[0] >= 0) & (lam[1] >= 0) & (lam[2] >= 0)
    d2 = jnp.minimum(jnp.minimum(
        _segment_dist2(px, py, tx[0], ty[0], tx[1], ty[1]),
        _segment_dist2(px, py, tx[1], ty[1], tx[2], ty[2])),
        _segment_dist2(px, py, tx[2], ty[2], tx[0], ty[0]))
    cover = jnp.where(valid, jax.nn.sigmoid(jnp.where(inside, d2, -d2) / sigma), 0.0)
    sil = 1.0 - jnp.prod(1.0 - cover, axis=-1)
    # Perspective-correct barycentrics of the nearest point (clipped lambda).
    lc = [jnp.maximum(v, 0.0) for v in lam]
    lsum = lc[0] + lc[1] + lc[2]
    lsum = jnp.where(lsum > 0, lsum, 1.0)
    wz = [lc[k] / (lsum * tz[k]) for k in range(3)]
    depth = 1.0 / (wz[0] + wz[1] + wz[2])
    bary = jnp.stack([v * depth for v in wz], axis=-1)                    # [B, HW, K, 3]
    # Colour weights D_j exp(z_j / gamma) and the background's exp(eps / gamma),
    # normalised stably (a softmax over the K + 1 logits).
    zn = (zfar - depth) / (zfar - znear)
    logits = jnp.where(valid, jnp.log(jnp.maximum(cover, 1e-30)) + zn / gamma, -jnp.inf)
    top = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), eps / gamma)
    ex = jnp.where(valid, jnp.exp(logits - top), 0.0)
    weights = ex / (jnp.sum(ex, axis=-1, keepdims=True) + jnp.exp(eps / gamma - top))
    return sil, weights, bary, vidx


def _blend(table, vidx, weights, bary):
    """``sum_k weights_k sum_i bary_ki table[vidx_ki]``: [B, HW, C] without a
    [B, HW, K, 3, C] intermediate (one fused gather per term)."""
    out = 0.0
    for k in range(vidx.shape[-2]):
        for i in range(3):
            out = out + table[vidx[..., k, i]] * (weights[..., k] * bary[..., k, i])[..., None]
    return out
