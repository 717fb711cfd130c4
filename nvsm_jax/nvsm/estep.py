"""The NVSM E-step: synthesised views of the pose space matched against the pool.

* **Sources** (:class:`Sources`, :func:`round_sources`): the anchors at their labels and
  the pseudo-labelled images at theirs; with ``estep.mirror_sources`` also their mirror
  images (:func:`mirrored_sources`).
* **Views**: each source's vertex features at its pose
  (:func:`nvsm_jax.nemo.features.vertex_features`), target poses a small step away
  (:mod:`nvsm_jax.nvsm.pseudo_labels`), feature maps synthesised there
  (:mod:`nvsm_jax.nvsm.synthesis`).
* **Scores** of every view against every pool image (:func:`score_views`,
  :mod:`nvsm_jax.nvsm.matching`, the pool sharded over the devices of every process:
  :class:`Pool`, :func:`pool_features`).
* **Acceptance** (:func:`e_step`): by threshold, margin over distant poses, per-round,
  per-source and per-sector caps (:class:`nvsm_jax.nvsm.pseudo_labels.Selection`);
  accepted poses optionally refined by the NeMo pose solver (``estep.refine_steps``).
  With ``estep.novel_views_only`` a pseudo-labelled source proposes only poses away
  from its own. :func:`holdout_check` runs the same on the anchors, each held out.

The interfaces are typed: :class:`Sources`, :class:`Pool` (each image's own
intrinsics), :class:`EStepConfig` (the config's ``estep`` block).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nvsm_jax import geometry, meshes, parallel, training
from nvsm_jax.data import PoseSet, pipeline
from nvsm_jax.nemo import features as feat
from nvsm_jax.nemo import pose_solver
from nvsm_jax.nvsm import matching, pseudo_labels, synthesis
from nvsm_jax.nvsm.run_state import RoundResult
from nvsm_jax.nvsm.settings import EStepConfig

log = logging.getLogger(__name__)

__all__ = ["Sources", "Pool", "SolverInputs", "EStepConfig", "ScoreTable", "HoldoutCheck",
           "extract_features", "pool_features", "round_sources", "mirrored_sources",
           "source_vertex_mask", "score_views", "holdout_check", "e_step"]


def extract_features(feature_fn, images, batch_size: int) -> np.ndarray:
    """Feature maps of all images: uint8 [N, H, W, 3] -> float32 [N, h, w, D] (host)."""
    if len(images) == 0:
        raise ValueError("extract_features: no images")
    out = []
    for s in range(0, len(images), batch_size):
        chunk, m = parallel.pad_to_multiple(np.asarray(images[s:s + batch_size]), batch_size)
        out.append(np.asarray(feature_fn(chunk))[:m])
    return np.concatenate(out)


def pool_features(feature_fn, images, batch_size: int, mesh) -> tuple[np.ndarray, slice]:
    """This process's share of the pool's feature maps: ``(maps, rows)``.

    images: uint8 [N, H, W, 3] (an array or a lazily read
    :class:`nvsm_jax.data.loaders.ImageFiles`: only ``images[rows]`` is read).
    rows: the pool rows this process computes (:func:`nvsm_jax.parallel.local_rows`;
    all of them on one process); maps: float32 [rows, h, w, D]. ``Pool(maps, ...,
    rows=rows)`` then matches them as one array sharded over every process's devices.
    """
    rows, _ = parallel.local_rows(len(images), mesh)
    if rows.stop > rows.start:
        with training.heartbeat(f"E-step: feature maps of {rows.stop - rows.start} pool images"):
            return extract_features(feature_fn, images[rows], batch_size), rows
    shape = jax.eval_shape(feature_fn, jax.ShapeDtypeStruct((1, *images.shape[1:]), np.uint8))
    return np.zeros((0, *shape.shape[1:]), np.float32), rows


def _padded_pool(pool: "Pool", mesh):
    """The pool's feature maps padded to a multiple of the devices, sharded once:
    from all rows (``pool.rows`` None), or assembled from every process's own rows."""
    if pool.rows is None:
        padded, _ = parallel.pad_to_multiple(pool.maps, mesh.devices.size)
        return parallel.shard_batch(padded, mesh)
    rows, n_pad = parallel.local_rows(len(pool.candidates), mesh)
    if (rows.start, rows.stop) != (pool.rows.start, pool.rows.stop) or \
            len(pool.maps) != rows.stop - rows.start:
        raise ValueError(f"Pool.rows {pool.rows} with {len(pool.maps)} maps, but this process "
                         f"holds rows {rows} of the {len(pool.candidates)}-image pool")
    block = parallel.process_rows(n_pad, mesh)
    pad = (block.stop - block.start) - len(pool.maps)     # padded rows are scored, then cut
    local = np.asarray(pool.maps, np.float32)
    if pad:
        local = np.concatenate([local, np.zeros((pad, *local.shape[1:]), np.float32)])
    return parallel.shard_batch(local, mesh, process_local=True)


@dataclasses.dataclass(frozen=True)
class Sources:
    """The E-step's sources, one row per source image with a pose (host arrays).

    maps: [S, h, w, D] feature maps; poses: [S, 4]; focal: [S] and principal:
    [S, 2] the input image's intrinsics; ids: [S] int, recorded as the
    pseudo-labels' ``source`` (an index into the labelled set or the pool, as
    ``is_labelled`` [S] bool says). masks: [S, H, W] bool object masks of the
    input images (all True where none is known, e.g. pseudo-labelled rows), or
    None for a dataset without masks.
    """

    maps: np.ndarray
    poses: np.ndarray
    focal: np.ndarray
    principal: np.ndarray
    ids: np.ndarray
    is_labelled: np.ndarray
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.poses)

    def take(self, rows) -> "Sources":
        """The rows ``rows`` (indices or a bool mask) as new Sources."""
        return Sources(*(None if getattr(self, f.name) is None
                         else np.asarray(getattr(self, f.name))[rows]
                         for f in dataclasses.fields(self)))

    @staticmethod
    def concat(*parts: "Sources") -> "Sources":
        cols = []
        for f in dataclasses.fields(Sources):
            vals = [getattr(p, f.name) for p in parts]
            cols.append(None if any(v is None for v in vals) else np.concatenate(vals))
        return Sources(*cols)


class Pool(NamedTuple):
    """The unlabelled images the E-step matches against (host arrays).

    maps: [N, h, w, D] feature maps; focal: [N] and principal: [N, 2] each
    image's own intrinsics (input image; real crops differ); candidates: [N] bool,
    the images still without a pseudo-label. rows: None when ``maps`` holds all N
    rows; on a multi-process run the slice of rows this process computed
    (:func:`pool_features`), ``maps`` then being [rows, h, w, D].
    """

    maps: np.ndarray
    focal: np.ndarray
    principal: np.ndarray
    candidates: np.ndarray
    rows: slice | None = None

    def maps_at(self, index, mesh=None) -> np.ndarray:
        """The feature maps of pool rows ``index`` [M] -> [M, h, w, D], on every process
        (gathered from the processes that hold them; all must call this together)."""
        index = np.asarray(index, np.int64)
        if self.rows is None:
            return np.asarray(self.maps)[index]
        if self.rows.start == 0 and self.rows.stop == len(self.candidates):
            return np.asarray(self.maps)[index]
        pool = _padded_pool(self, mesh)
        picked = _take_rows(pool, parallel.replicate(index, mesh),
                            parallel.replicated(mesh))
        return parallel.host_array(picked)


class SolverInputs(NamedTuple):
    """What the E-step's solver checks need: the vertex memory [V, D], the clutter
    prototype [D] and the :class:`nvsm_jax.nemo.pose_solver.SolverConfig`."""

    vertex_memory: Any
    clutter: Any
    solver_cfg: pose_solver.SolverConfig


@functools.partial(jax.jit, static_argnums=2)
def _take_rows(x, index, out_sharding):
    return jax.lax.with_sharding_constraint(jnp.take(x, index, axis=0), out_sharding)


def _solver_poses(maps, solver: SolverInputs, verts, faces, focal, principal, stride: int,
                  batch: int) -> np.ndarray:
    """The current model's render-and-compare pose (``solver.solver_cfg``: grid, then Adam;
    ``steps=0``: the grid search's best pose) of each map. maps: [M, h, w, D] at
    ``stride``; focal [M], principal [M, 2] of the input images -> [M, 4]. Chunks
    are padded to ``batch`` (one compilation)."""
    out = []
    for s0 in range(0, len(maps), batch):
        (chunk, fo, pr), m = parallel.pad_to_multiple(
            (np.asarray(maps[s0:s0 + batch]), np.asarray(focal[s0:s0 + batch], np.float32),
             np.asarray(principal[s0:s0 + batch], np.float32)), batch)
        with training.heartbeat(f"E-step: solving images {s0 + 1}-{s0 + m} of {len(maps)}"):
            res = pose_solver.solve(jnp.asarray(chunk), solver.vertex_memory, solver.clutter,
                                    verts, faces, fo, pr, stride=stride,
                                    solver_cfg=solver.solver_cfg)
            out.append(np.asarray(res.pose)[:m])
    return np.concatenate(out) if out else np.zeros((0, 4), np.float32)


def source_vertex_mask(vf: feat.VertexFeatures, normals_cos, object_masks, is_labelled, *,
                       min_view_cos: float = 0.0, memory=None, clutter=None):
    """Which vertices of each source carry features into its synthesised views.

    vf: the sources' :class:`nvsm_jax.nemo.features.VertexFeatures` ([S, V] visible,
    [S, V, 2] xy in input pixels, [S, V, D] features); normals_cos: [S, V]
    |n . v|; object_masks: [S, H, W] bool or None (labelled rows only are
    checked); is_labelled: [S] bool; memory: [V, D] and clutter: [D] unit
    vectors, or None (then pseudo-labelled rows are not checked).
    Returns [S, V] bool: visible, not grazing, inside the object.
    """
    valid = vf.visible
    if min_view_cos > 0:
        valid = valid & (normals_cos >= min_view_cos)
    labelled = jnp.asarray(is_labelled, bool)[:, None]
    if object_masks is not None:
        m = jnp.asarray(object_masks, bool)
        h, w = m.shape[1:3]
        x = jnp.clip(jnp.floor(vf.xy[..., 0]).astype(jnp.int32), 0, w - 1)
        y = jnp.clip(jnp.floor(vf.xy[..., 1]).astype(jnp.int32), 0, h - 1)
        inside = jax.vmap(lambda mk, yy, xx: mk[yy, xx])(m, y, x)          # [S, V]
        valid = valid & (inside | ~labelled)
    if memory is not None:
        fv = feat.l2_normalize(vf.features)
        own = jnp.sum(fv * jnp.asarray(memory)[None], axis=-1)              # [S, V]
        background = fv @ jnp.asarray(clutter)                              # [S, V]
        valid = valid & ((own > background) | labelled)
    return valid


def _score_table(cfg: EStepConfig, sources: Sources, targets, pool_shard, n: int,
                 object_mesh: meshes.Mesh, *, stride: int, mesh,
                 solver: "SolverInputs | None" = None) -> np.ndarray:
    """Scores of every synthesised view against the pool: targets [S, K, 4] -> [S*K, N].

    pool_shard: the pool's normalised maps [Np, h, w, D] (padded; the first ``n`` real).
    """
    k = targets.shape[1]
    map_hw = tuple(pool_shard.shape[1:3])
    verts = jnp.asarray(object_mesh.verts, jnp.float32)
    faces = jnp.asarray(object_mesh.faces, jnp.int32)
    normals = jnp.asarray(meshes.vertex_normals(object_mesh.verts, object_mesh.faces))
    scores = []
    chunk = max(1, int(cfg.source_chunk))
    use_masks = cfg.source_object == "mask" and sources.masks is not None
    use_memory = cfg.pseudo_object == "memory" and solver is not None
    for s0 in range(0, len(sources), chunk):
        s1 = min(s0 + chunk, len(sources))
        log.info("E-step: synthesising %d views from sources %d-%d of %d, scoring them "
                 "against %d pool images%s", (s1 - s0) * k, s0 + 1, s1, len(sources), n,
                 " (first chunk: compiling)" if s0 == 0 else "")
        idx, m = parallel.pad_to_multiple(np.arange(s0, s1), chunk)
        src = sources.take(idx)
        focal, principal = jnp.asarray(src.focal), jnp.asarray(src.principal)
        vf = feat.vertex_features(jnp.asarray(src.maps), verts, faces, normals,
                                  jnp.asarray(src.poses), focal, principal, stride=stride,
                                  render_stride=cfg.source_render_stride or stride)
        valid = source_vertex_mask(
            vf, feat.view_weights(verts, normals, jnp.asarray(src.poses)),
            src.masks if use_masks else None, src.is_labelled, min_view_cos=cfg.min_view_cos,
            memory=solver.vertex_memory if use_memory else None,
            clutter=solver.clutter if use_memory else None)
        syn, mask = synthesis.synthesize_many(
            vf.features, valid, verts, faces, jnp.asarray(targets[idx]), focal / stride,
            principal / stride, map_hw, min_weight=cfg.min_weight)
        syn = syn[:m].reshape(m * k, *map_hw, -1)
        mask = mask[:m].reshape(m * k, *map_hw)
        scores.append(matching.match_scores_sharded(syn, mask, pool_shard, mesh,
                                                    normalized=True)[:, :n])
    return np.concatenate(scores)


class ScoreTable(NamedTuple):
    """One E-step's views against the pool. scores: [K, N]; view_poses: [K, 4];
    view_source: [K] source ids; view_labelled: [K] bool."""

    scores: np.ndarray
    view_poses: np.ndarray
    view_source: np.ndarray
    view_labelled: np.ndarray


def score_views(cfg: EStepConfig, sources: Sources, pool: Pool, *, object_mesh: meshes.Mesh,
                stride: int, mesh, solver: SolverInputs | None = None) -> ScoreTable:
    """The E-step's score table: proposals around every source, their synthesised
    views, each view's score against every pool image (``cfg.novel_views_only``
    drops pseudo-labelled sources' own poses)."""
    offsets = pseudo_labels.offset_grid(cfg.azimuth_step, cfg.azimuth_steps, cfg.elevation_step,
                                        cfg.elevation_steps)
    targets = pseudo_labels.propose_targets(sources.poses, offsets,
                                            (cfg.min_elevation, cfg.max_elevation),
                                            cfg.distance_scales)              # [S, K, 4]
    k = targets.shape[1]
    pool_shard = matching.normalize_images(_padded_pool(pool, mesh))  # once per round
    with training.heartbeat("E-step: scoring views"):       # a chunk's first call compiles
        scores = _score_table(cfg, sources, targets, pool_shard, len(pool.candidates),
                              object_mesh, stride=stride, mesh=mesh,
                              solver=solver)                                  # [S*K, N]
    table = ScoreTable(scores, targets.reshape(-1, 4), np.repeat(np.asarray(sources.ids), k),
                       np.repeat(np.asarray(sources.is_labelled, bool), k))
    if cfg.novel_views_only:
        keep = pseudo_labels.novel_views(offsets, sources.is_labelled, cfg.distance_scales)
        table = ScoreTable(*(a[keep] for a in table))
    return table


class HoldoutCheck(NamedTuple):
    """The E-step run on its own labelled sources, each held out in turn (host arrays).

    right: [M] bool, the held-out anchor's best view (among views synthesised from
    the *other* sources) lies within the check's angle of its label; best_score:
    [M] that view's score; views: the number of views each anchor was scored
    against. ``accuracy`` is the label-free estimate of how often the E-step's
    best view is right.
    """

    right: np.ndarray
    best_score: np.ndarray
    views: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.right)) if len(self.right) else 0.0


def holdout_check(cfg: EStepConfig, sources: Sources, *, object_mesh: meshes.Mesh, stride: int,
                  mesh, solver: SolverInputs | None = None,
                  correct_angle: float = float(np.pi / 6)) -> HoldoutCheck:
    """Matches every labelled source (anchors and their mirror images) against the
    views synthesised from all other sources, as the E-step matches a pool image.

    A held-out anchor never sees views from itself or its mirror image (the same
    source id); its label says whether the best of the remaining views is right.
    Needs no hidden label: it is the E-step's accuracy on the images whose poses
    are known. A diagnostic (``benchmarks.estep --holdout``), not an acceptance
    rule: on round-1 tables of the ImageNet encoder it read 0.86 on car and 0.93 on
    aeroplane while the pool's top-100 precision was 0.94 and 0.60 (WORKSPACE,
    "label-free checks"): the anchors are the round-0 model's training images, so
    their features match better than an unseen pool image's: no pool image's best
    score reaches the lower quartile (0.70-0.73) of the right anchors' scores.
    """
    lab = np.flatnonzero(np.asarray(sources.is_labelled, bool))
    if len(lab) == 0:
        raise ValueError("holdout_check: no labelled sources")
    held = sources.take(lab)
    table = score_views(cfg, sources, Pool(held.maps, held.focal, held.principal,
                                           np.ones(len(lab), bool)),
                        object_mesh=object_mesh, stride=stride, mesh=mesh, solver=solver)
    own = (table.view_labelled[:, None]
           & (table.view_source[:, None] == np.asarray(held.ids)[None, :]))    # [K, M]
    scores = np.where(own, -np.inf, table.scores)
    best = np.argmax(scores, axis=0)
    best_score = scores[best, np.arange(len(lab))]
    err = geometry.pose_error(table.view_poses[best].astype(np.float64),
                              np.asarray(held.poses, np.float64))
    right = np.isfinite(best_score) & (err < correct_angle)
    return HoldoutCheck(right, best_score.astype(np.float32), (~own).sum(axis=0))


def e_step(cfg: EStepConfig, sources: Sources, pool: Pool, *, object_mesh: meshes.Mesh,
           stride: int, round_index: int, mesh,
           solver: SolverInputs | None = None) -> RoundResult:
    """One expansion: synthesise around every source, match against the pool, accept.

    cfg: :class:`EStepConfig`; sources: :class:`Sources`; pool: :class:`Pool`
    (feature maps at ``stride``, intrinsics of the input images). ``solver``
    enables the solver-agreement rule (``cfg.agree_angle > 0``: keep a match only
    if the NeMo grid search's best pose lies within that angle) and refinement of
    accepted poses (``cfg.refine_steps > 0``), each with the pool image's own camera,
    and the safeguard (``cfg.agreement_rate > 0``, see :class:`EStepConfig`).
    """
    start = time.time()
    if len(sources) == 0:
        raise ValueError("e_step: no sources (need at least one labelled image)")
    candidates = np.asarray(pool.candidates, bool)
    if not np.any(candidates):
        return RoundResult(pseudo_labels.PseudoLabels.empty(), 0, 0.0)
    scores, view_poses, view_source, view_labelled = score_views(
        cfg, sources, pool, object_mesh=object_mesh, stride=stride, mesh=mesh,
        solver=solver)
    verts = jnp.asarray(object_mesh.verts, jnp.float32)
    faces = jnp.asarray(object_mesh.faces, jnp.int32)
    agree = float(cfg.agree_angle) if solver is not None else 0.0
    gate = float(cfg.agreement_rate) if solver is not None else 0.0
    if cfg.agreement_rate > 0 and solver is None:
        raise ValueError("e_step: estep.agreement_rate > 0 needs the solver inputs")
    selection = cfg.selection
    if agree > 0:           # the cap applies after the solver check
        selection = dataclasses.replace(selection, max_new=None)
    new = pseudo_labels.select(scores, view_poses, view_source, view_labelled, selection,
                               round_index=round_index, candidates=candidates)
    focal = np.asarray(pool.focal, np.float32) / stride               # the feature map's camera
    principal = np.asarray(pool.principal, np.float32) / stride
    if len(new) and agree > 0:
        log.info("E-step: checking %d matches against the solver's grid search", len(new))
        grid_only = solver._replace(
            solver_cfg=dataclasses.replace(solver.solver_cfg, steps=0, top_k=1))
        grid_best = _solver_poses(pool.maps_at(new.index, mesh), grid_only, verts, faces,
                                  pool.focal[new.index], pool.principal[new.index], stride, 32)
        new = new.take(pseudo_labels.agree_with_solver(new.poses, grid_best, agree))
        if cfg.max_new is not None:
            new = new.take(slice(0, int(cfg.max_new)))
    agreement = None
    if len(new) and gate > 0:
        log.info("E-step: solving %d matched images for the agreement safeguard", len(new))
        solved = _solver_poses(pool.maps_at(new.index, mesh), solver, verts, faces,
                               pool.focal[new.index], pool.principal[new.index], stride,
                               int(cfg.max_new))
        agrees = pseudo_labels.agree_with_solver(new.poses, solved, cfg.agreement_angle)
        agreement = float(np.mean(agrees))
        new = new.take(slice(0, pseudo_labels.agreement_cut(agrees, gate,
                                                            cfg.agreement_min_count)))
    matched = None
    if len(new) and cfg.refine_steps > 0 and solver is not None:
        matched = np.array(new.poses, np.float32)
        log.info("E-step: refining %d accepted poses", len(new))
        solver_cfg = dataclasses.replace(solver.solver_cfg, steps=int(cfg.refine_steps))
        with training.heartbeat(f"E-step: refining {len(new)} accepted poses"):
            poses, _, _ = pose_solver.refine(jnp.asarray(pool.maps_at(new.index, mesh)),
                                             solver.vertex_memory,
                                             solver.clutter, verts, faces, focal[new.index],
                                             principal[new.index],
                                             jnp.asarray(new.poses)[:, None], solver_cfg)
            new.poses = np.asarray(poses[:, 0], np.float32)
    return RoundResult(new, int(scores.shape[0]), time.time() - start, agreement, matched)


def mirrored_sources(feature_fn, batch_size, images, sources: Sources) -> Sources:
    """The sources followed by their mirror images (``pipeline.flip_pose``).

    images: uint8 [S, H, W, 3], the sources' images. Returns :class:`Sources`
    with 2S rows (a mirrored source keeps its id). Exact for objects symmetric
    about their x = 0 plane (cars, most PASCAL3D+ classes): the mirror of an
    image at ``(a, e, t)`` shows the object at ``(2 pi - a, e, -t)``, a free
    second view.
    """

    width = images.shape[2]
    flipped = np.ascontiguousarray(images[:, :, ::-1])
    f_poses, f_principal = pipeline.flip_pose(sources.poses, sources.principal, width)
    f_maps = extract_features(feature_fn, flipped, batch_size)
    f_masks = None if sources.masks is None else np.ascontiguousarray(sources.masks[:, :, ::-1])
    mirrored = dataclasses.replace(sources, maps=f_maps, poses=f_poses,
                                   principal=f_principal, masks=f_masks)
    return Sources.concat(sources, mirrored)


def round_sources(config, fn, labelled: PoseSet, unlabelled, pool_maps,
                   pl: pseudo_labels.PseudoLabels, mesh=None) -> Sources:
    """The E-step's sources: the anchors, then the pseudo-labelled images ``pl``,
    then (``estep.mirror_sources``) their mirror images. pool_maps: all pool
    maps [N, h, w, D], or a :class:`Pool` (its rows may be spread over processes)."""
    pl_maps = (pool_maps.maps_at(pl.index, mesh) if isinstance(pool_maps, Pool)
               else pool_maps[pl.index])
    sources = Sources(
        maps=np.concatenate([extract_features(fn, labelled.images, config.eval_batch_size),
                             pl_maps]),
        poses=np.concatenate([labelled.poses, pl.poses]),
        focal=np.concatenate([labelled.focal, unlabelled.focal[pl.index]]),
        principal=np.concatenate([labelled.principal, unlabelled.principal[pl.index]]),
        ids=np.concatenate([np.arange(len(labelled)), pl.index]),
        is_labelled=np.concatenate([np.ones(len(labelled), bool), np.zeros(len(pl), bool)]),
        masks=None if labelled.object_mask is None else np.concatenate(
            [labelled.object_mask.astype(bool),
             np.ones((len(pl), *labelled.object_mask.shape[1:]), bool)]))
    if config.estep.mirror_sources:
        images = np.concatenate([labelled.images, unlabelled.images[pl.index]])
        return mirrored_sources(fn, config.eval_batch_size, images, sources)
    return sources
