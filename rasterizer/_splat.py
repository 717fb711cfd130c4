"""Face set-up and block splatting: the visibility engine shared by the hard and soft passes.

Why splatting and not per-pixel loops
-------------------------------------
A brute-force rasteriser tests every pixel against every face: ``P x H x W x F``
inside tests (32 M per pose at 128 x 128 with 2,000 faces). Even at the CPU's
vector ceiling that caps a 2-core machine at a few hundred frames/s, and tiling
in pure ``jnp`` struggles because building per-tile face lists (scatter, top_k
or cumsum over ``[tiles, faces]``) costs about as much as the raster itself.

We go the other way round, from faces to pixels:

1. **Set-up** (per face and pose, ``[F, B]``): edge-function coefficients
   ``E_k(x, y) = a_k x + b_k y + c_k`` oriented so that the inside is
   ``E_0, E_1, E_2 >= 0``, the plane of ``1 / z`` in screen space (nearest =
   largest ``1 / z``), and the pixel-centre bounding box clipped to the screen.
   Faces behind the near plane, edge-on (``|2 * area| <= min_area``),
   off-screen or (optionally) back-facing get an empty box.
2. **Jobs**: each face's box is cut into ``by x bx`` pixel blocks; one block of
   one face is a *job*. Jobs of all poses are numbered through one cumsum
   over the flattened ``[F * B]`` block counts; a pass maps its window of job
   numbers back to faces with a scatter of first-job marks and a running max
   (see ``pass_jobs``). No ``[tiles, faces]`` tensor, no sort, no top_k.
3. **Passes**: jobs are processed ``jobs_per_pass`` at a time in a
   ``lax.while_loop`` until every job of every pose is done. A pass evaluates
   its ``[by, bx, jobs]`` candidates (job index innermost, so the per-job
   coefficients are contiguous vectors and the inner loop vectorises) and
   merges them into per-pixel buffers with ``scatter``-max, which XLA:CPU runs
   at a couple of ns per update. There is no static per-tile cap that could
   overflow: a big face or a crowded image just takes more passes, and the
   result does not depend on ``jobs_per_pass`` or ``block`` (tests force tiny
   values).

Measured on the 2-core CPU (XLA:CPU, jax 0.10), and why the code looks the
way it does:

* A pass costs ~10 ns of CPU per candidate (two scatters, one gather, ~20
  flops). For NeMo-sized faces (a few pixels) blocks from 2 x 2 to 4 x 8 and
  4k to 32k jobs per pass were within noise of each other and 8 x 8 blocks
  were 1.7x slower; per-pass overhead is small, so the pass size mostly
  bounds memory. Defaults: 4 x 4, 8,192.
* XLA fuses cheap producers into every consumer. Per-job values (integer
  divisions, gathers) would be recomputed for each of a block's pixels, and a
  strided ``[B, F, 3, 3]`` corner tensor re-read by every set-up fusion (10x
  slower set-up). Hence the face-major ``[F, B]`` layout from contiguous
  vertex slabs (:func:`corners`), and :func:`materialize`: XLA:CPU removes
  ``optimization_barrier`` before fusion, a conditional is a real boundary.
* Scatter-max on int32 bit patterns of positive ``1 / z`` was 2-3x cheaper
  than a (NaN-aware) float max in profiles, and a spare "dump" slot keeps every index in bounds
  (``promise_in_bounds``).
* Flat indices over the whole batch: the batched scatter that ``vmap``
  produces ran ~4x slower.

Watertightness: every edge is evaluated from its two vertices in a canonical
order (lower vertex index first) and negated for the face that sees it the
other way round, so the two faces sharing an edge compute bit-identical edge
values with opposite signs. With the inclusive test ``E >= 0`` a pixel centre
exactly on a shared edge is inside both faces (the depth test then picks one)
and never falls through a crack.

All functions here are internal and work on a flat batch ``B`` of poses.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class FaceSetup(NamedTuple):
    """Per face and pose quantities, each face-major ``[F, B]``.

    edges: 3 x (a, b, c) oriented edge coefficients; inside is all ``>= 0``.
    plane: (pa, pb, pc) of ``1 / z`` as a function of screen (x, y).
    box: (c0, c1, r0, r1) int32 inclusive pixel ranges of candidate centres;
      empty (``c1 < c0``) for culled faces.
    """

    edges: tuple
    plane: tuple
    box: tuple


def corners(sv, faces):
    """Screen coordinates of the face corners, face-major.

    sv: [B, V, 3]; faces: [F, 3] -> (x, y, z), each a list of 3 arrays [F, B]
    (corner k of every face, for every pose). Gathering whole ``[3, B]``
    vertex slabs from a ``[V, 3, B]`` transpose is a contiguous copy, and the
    ``[F, B]`` slices stay contiguous along B. (Indexing ``sv[:, faces]``
    instead makes XLA:CPU read a strided ``[B, F, 3, 3]`` tensor in every
    consumer, which was 10x slower.)
    """
    slabs = jnp.transpose(sv, (1, 2, 0))[faces]                # [F, 3 corners, 3 xyz, B]
    return tuple([slabs[:, k, c] for k in range(3)] for c in range(3))


def face_setup(sv, faces, image_size, *, near, min_area, cull_backfaces, expand=0.0):
    """Edge functions, depth plane and pixel boxes of every face.

    sv: [B, V, 3] screen vertices (x column, y row, z depth); faces: [F, 3] int32.
    expand: grow each box by this many pixels (the soft pass's blur radius).
    Returns a FaceSetup of face-major [F, B] arrays in sv's dtype (boxes int32).
    """
    h, w = image_size
    dtype = sv.dtype
    x, y, z = corners(sv, faces)                              # each [3][F, B]
    a2 = (x[1] - x[0]) * (y[2] - y[0]) - (y[1] - y[0]) * (x[2] - x[0])
    finite = jnp.isfinite(a2) & jnp.isfinite(z[0]) & jnp.isfinite(z[1]) & jnp.isfinite(z[2])
    valid = finite & (z[0] > near) & (z[1] > near) & (z[2] > near) & (jnp.abs(a2) > min_area)
    if cull_backfaces:
        # Outward normals (right-handed winding) facing the camera project to
        # a negative signed area in (x right, y down) screen coordinates.
        valid = valid & (a2 < 0)
    orient = jnp.where(a2 > 0, 1.0, -1.0).astype(dtype)

    edges = []
    for k in range(3):
        i1, i2 = (k + 1) % 3, (k + 2) % 3
        canon = (faces[:, i1] < faces[:, i2])[:, None]        # [F, 1]
        px = jnp.where(canon, x[i1], x[i2])
        py = jnp.where(canon, y[i1], y[i2])
        qx = jnp.where(canon, x[i2], x[i1])
        qy = jnp.where(canon, y[i2], y[i1])
        a = py - qy
        b = qx - px
        c = px * qy - py * qx            # E(x, y) = a x + b y + c, zero on the edge
        # Face orientation: E_k(v_k) = a2; then normalise so inside is >= 0.
        s = jnp.where(canon, orient, -orient)
        edges.append((a * s, b * s, c * s))

    safe_a2 = jnp.where(valid, jnp.abs(a2), 1.0)
    inv = [1.0 / (safe_a2 * jnp.where(valid, z[k], 1.0)) for k in range(3)]
    plane = tuple(sum(edges[k][m] * inv[k] for k in range(3)) for m in range(3))

    def clip(v, hi):
        return jnp.clip(jnp.where(valid, v, -2.0), -2.0, hi + 2.0)

    xs, ys = [clip(v, w) for v in x], [clip(v, h) for v in y]
    xmin, xmax = jnp.minimum(jnp.minimum(xs[0], xs[1]), xs[2]), jnp.maximum(jnp.maximum(xs[0], xs[1]), xs[2])
    ymin, ymax = jnp.minimum(jnp.minimum(ys[0], ys[1]), ys[2]), jnp.maximum(jnp.maximum(ys[0], ys[1]), ys[2])
    c0 = jnp.maximum(jnp.ceil(xmin - expand - 0.5), 0).astype(jnp.int32)
    c1 = jnp.minimum(jnp.floor(xmax + expand - 0.5), w - 1).astype(jnp.int32)
    r0 = jnp.maximum(jnp.ceil(ymin - expand - 0.5), 0).astype(jnp.int32)
    r1 = jnp.minimum(jnp.floor(ymax + expand - 0.5), h - 1).astype(jnp.int32)
    c1 = jnp.where(valid, c1, -1)
    return FaceSetup(edges=tuple(edges), plane=plane, box=(c0, c1, r0, r1))


class Jobs(NamedTuple):
    """One pass's jobs (each ``[J]``): a ``by x bx`` block of one face of one pose.

    face, pose: indices; slot: ``face * B + pose``, the job's entry in the
    flattened face-major set-up arrays; row, col: the block's top-left pixel;
    rows, cols: how many of its rows / columns lie inside the face's box (<= 0:
    no job).
    """

    face: jax.Array
    pose: jax.Array
    slot: jax.Array
    row: jax.Array
    col: jax.Array
    rows: jax.Array
    cols: jax.Array


class JobTable(NamedTuple):
    """Job numbering of a batch. Jobs run face-major (face, then pose, then
    block), the layout of the set-up arrays; consecutive faces of a mesh are
    usually neighbours, so a pass's scatters still hit a small region of
    each image.

    first, last: per (face, pose) with jobs (compacted), its first job and one
      past its last; padded with ``total``. slots: their index ``face * B +
      pose``, padded with the last index. total: [] int32.
    """

    first: jax.Array
    last: jax.Array
    slots: jax.Array
    total: jax.Array


def _block_counts(box, block):
    c0, c1, r0, r1 = box
    by, bx = block
    ok = (c1 >= c0) & (r1 >= r0)
    nbx = jnp.where(ok, (c1 - c0 + bx) // bx, 0)
    nby = jnp.where(ok, (r1 - r0 + by) // by, 0)
    return ok, nbx, nby


def job_table(box, block) -> JobTable:
    """Numbers the jobs: box (c0, c1, r0, r1) each [F, B] int32; block (by, bx)."""
    ok, nbx, nby = _block_counts(box, block)
    ok, counts = ok.reshape(-1), (nbx * nby).reshape(-1)              # [F * B]
    nq = counts.shape[0]
    incl = jnp.cumsum(counts)
    total = incl[-1]
    # Compact the faces that have jobs (a scatter to their rank).
    rank = jnp.cumsum(ok.astype(jnp.int32)) - 1
    slots = jnp.full((nq,), nq - 1, jnp.int32).at[jnp.where(ok, rank, nq)].set(
        jnp.arange(nq, dtype=jnp.int32), mode="drop")
    live = jnp.arange(nq) <= rank[-1]
    last = jnp.where(live, incl[slots], total)
    first = jnp.where(live, last - counts[slots], total)
    return JobTable(first=first, last=last, slots=slots, total=total)


def pass_jobs(start, num, table: JobTable, box, block):
    """The jobs ``start .. start + num - 1`` of the enumeration (see module doc).

    Job -> face without a per-job binary search: the faces (with jobs) whose
    first job falls in this window are a run ``k_lo, k_lo + 1, ...`` of the
    compacted list, at most ``num`` long. Each marks its first job's slot with
    its offset in the run, and a running max fills the slots in between.
    """
    npose = box[0].shape[1]
    c0, c1, r0, r1 = (v.reshape(-1) for v in box)
    _, nbx, _ = _block_counts(box, block)
    nbx = nbx.reshape(-1)
    nq = table.slots.shape[0]
    by, bx = block
    i = jnp.arange(num, dtype=jnp.int32)
    k_lo = jnp.searchsorted(table.last, start, side="right").astype(jnp.int32)
    kk = jnp.minimum(k_lo + i, nq - 1)
    pos = jnp.where(i == 0, 0, table.first[kk] - start)
    keep = (pos < num) & (k_lo + i < nq)
    marks = jnp.zeros((num + 1,), jnp.int32).at[jnp.where(keep, pos, num)].max(
        i, mode="promise_in_bounds")
    k = jnp.minimum(k_lo + lax.cummax(marks[:num]), nq - 1)
    slot = table.slots[k]
    face, pose = slot // npose, slot % npose
    j = start + i
    local = j - table.first[k]
    n = jnp.maximum(nbx[slot], 1)
    brow = local // n
    bcol = local - brow * n
    row = r0[slot] + brow * by
    col = c0[slot] + bcol * bx
    live = j < table.total
    rows = jnp.where(live, r1[slot] - row + 1, 0)
    cols = jnp.where(live, c1[slot] - col + 1, 0)
    return Jobs(face=face, pose=pose, slot=slot, row=row, col=col, rows=rows, cols=cols)


def block_offsets(block, dtype):
    """Static in-block offsets: (dy [by, 1, 1] int32, dx [1, bx, 1] int32, float versions)."""
    by, bx = block
    dy = jnp.arange(by, dtype=jnp.int32)[:, None, None]
    dx = jnp.arange(bx, dtype=jnp.int32)[None, :, None]
    return dy, dx, dy.astype(dtype), dx.astype(dtype)


def materialize(live, tree):
    """``tree`` computed once into buffers if ``live``, else zeros of the same shapes.

    Callers pass a runtime predicate under which zeros are the right answer
    anyway (inside a pass: "this pass has jobs", always true; for the depth
    map: "some face has a candidate pixel").

    XLA fuses cheap elementwise producers into every consumer. For the
    per-job values (integer divisions, gathers) feeding the ``[by, bx, J]``
    candidate loops that means recomputing them once per pixel of the block,
    and XLA:CPU drops ``optimization_barrier`` before fusion. A conditional
    on a runtime predicate is a fusion boundary, so its outputs are
    materialised. It also guarantees that every consumer of the candidate
    depths sees the very same bits.
    """
    return lax.cond(live, lambda t: t, lambda t: jax.tree.map(jnp.zeros_like, t), tree)


def run_passes(total, jobs_per_pass, body, init):
    """``while start < total: state = body(start, state); start += jobs_per_pass``."""
    def cond(carry):
        return carry[0] < total

    def step(carry):
        start, state = carry
        return start + jobs_per_pass, body(start, state)

    return lax.while_loop(cond, step, (jnp.int32(0), init))[1]
