"""NVSM semi-supervised training: EM rounds of view synthesis, matching and CoKe.

``run_nvsm(config, workdir)`` composes the pieces and computes nothing itself: after
:func:`start_run` (checks, data, model) and :func:`resume`, each round is
:func:`e_step_for_round`, :func:`m_step_for_round`, :func:`record_round`; the run's
files are :mod:`nvsm_jax.run_state`'s.

* **Round 0 (initial M-step).** CoKe training (:mod:`nvsm_jax.train`) on the
  labelled images only; optionally starting from a self-supervised pre-trained
  backbone (``config.pretrain_workdir``).
* **E-step** (:func:`e_step`). Feature maps of the sources (labelled +
  pseudo-labelled images) and of the unlabelled pool; the sources' vertex
  features at their poses (:func:`nvsm_jax.features.vertex_features`); target
  poses a small step away (:mod:`nvsm_jax.pseudo_labels`); synthesised views
  (:mod:`nvsm_jax.synthesis`); scores of every view against the pool
  (:mod:`nvsm_jax.matching`, sharded over devices); acceptance by threshold,
  margin over distant poses and a per-round cap. Accepted poses may be refined
  with the NeMo pose solver (``config.estep.refine_steps``). With
  ``estep.mirror_sources`` every source also synthesises from its mirror image
  (:func:`mirrored_sources`). With ``estep.novel_views_only`` a pseudo-labelled
  source proposes only poses away from its own (its zero-offset view is its
  own fitted feature map). Pseudo-labels accumulate and pseudo-labelled
  images become sources. The E-step's interfaces are typed: :class:`Sources`,
  :class:`Pool` (each image's own intrinsics), :class:`EStepConfig` (the
  ``estep`` block, its acceptance part a :class:`nvsm_jax.pseudo_labels.Selection`).
* **M-step.** CoKe training on labelled + pseudo-labelled images, continuing the
  same TrainState (params, Adam state and the vertex/clutter memory).
* Expansion continues from the newly covered poses until ``num_rounds`` is
  reached, the pool is exhausted, or nothing new passes.

Every round is checkpointed: the TrainState with orbax at the round's last
step (and every ``checkpoint_every`` steps inside an M-step), the round's E-step
result before its M-step (``pseudo_labels/estep_XXX.npz``), the pseudo-labels as
``pseudo_labels/round_XXX.npz``, the round's ``rounds.jsonl`` entry, and
``progress.json`` (written last, each file atomically) naming the finished round and
its step. A killed run resumes at the last checkpoint, inside an M-step if it was
killed there, and ends with the same result (batches and keys are functions of
``(seed, round, step)``); no kill loses a round from ``rounds.jsonl``. A damaged
run-state file raises :class:`nvsm_jax.errors.RunStateError` naming it. The run holds
its workdir (:mod:`nvsm_jax.workdir_lock`): a second run into it is refused.

Per round ``rounds.jsonl`` logs the pseudo-label count, their precision against
the hidden truth (fraction within pi/6, computed for reporting only: the hidden
poses never reach training), pose-space coverage and test accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nvsm_jax import features as feat
from nvsm_jax import (config_checks, geometry, matching, meshes, parallel,
                      pose_solver, pseudo_labels, run_state, synthesis, train, training,
                      workdir_lock)
from nvsm_jax.data import PoseSet, fewshot, loaders, pipeline
from nvsm_jax.errors import RunStateError
from nvsm_jax.run_state import RoundResult, load_progress

log = logging.getLogger(__name__)

__all__ = ["RoundResult", "extract_features", "e_step", "holdout_check", "HoldoutCheck",
           "pool_features", "mirrored_sources", "training_set", "NVSMRun", "RunPosition",
           "start_run", "resume", "e_step_for_round", "m_step_for_round", "round_entry",
           "record_round", "run_nvsm", "load_progress"]


def extract_features(feature_fn, images, batch_size: int) -> np.ndarray:
    """Feature maps of all images: uint8 [N, H, W, 3] -> float32 [N, h, w, D] (host)."""
    if len(images) == 0:
        raise ValueError("extract_features: no images")
    out = []
    for s in range(0, len(images), batch_size):
        chunk, m = parallel.pad_to_multiple(np.asarray(images[s:s + batch_size]), batch_size)
        out.append(np.asarray(feature_fn(chunk))[:m])
    return np.concatenate(out)


def pool_features(feature_fn, images, batch_size: int, mesh_axes) -> tuple[np.ndarray, slice]:
    """This process's share of the pool's feature maps: ``(maps, rows)``.

    images: uint8 [N, H, W, 3] (an array or a lazily read
    :class:`nvsm_jax.data.loaders.ImageFiles`: only ``images[rows]`` is read).
    rows: the pool rows this process computes (:func:`nvsm_jax.parallel.local_rows`;
    all of them on one process); maps: float32 [rows, h, w, D]. ``Pool(maps, ...,
    rows=rows)`` then matches them as one array sharded over every process's devices.
    """
    rows, _ = parallel.local_rows(len(images), mesh_axes)
    if rows.stop > rows.start:
        with training.heartbeat(f"E-step: feature maps of {rows.stop - rows.start} pool images"):
            return extract_features(feature_fn, images[rows], batch_size), rows
    shape = jax.eval_shape(feature_fn, jax.ShapeDtypeStruct((1, *images.shape[1:]), np.uint8))
    return np.zeros((0, *shape.shape[1:]), np.float32), rows


def _padded_pool(pool: "Pool", mesh_axes):
    """The pool's feature maps padded to a multiple of the devices, sharded once:
    from all rows (``pool.rows`` None), or assembled from every process's own rows."""
    if pool.rows is None:
        padded, _ = parallel.pad_to_multiple(pool.maps, mesh_axes.devices.size)
        return parallel.shard_batch(padded, mesh_axes)
    rows, n_pad = parallel.local_rows(len(pool.candidates), mesh_axes)
    if (rows.start, rows.stop) != (pool.rows.start, pool.rows.stop) or \
            len(pool.maps) != rows.stop - rows.start:
        raise ValueError(f"Pool.rows {pool.rows} with {len(pool.maps)} maps, but this process "
                         f"holds rows {rows} of the {len(pool.candidates)}-image pool")
    block = parallel.process_rows(n_pad, mesh_axes)
    pad = (block.stop - block.start) - len(pool.maps)     # padded rows are scored, then cut
    local = np.asarray(pool.maps, np.float32)
    if pad:
        local = np.concatenate([local, np.zeros((pad, *local.shape[1:]), np.float32)])
    return parallel.shard_batch(local, mesh_axes, process_local=True)


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

    def maps_at(self, index, mesh_axes=None) -> np.ndarray:
        """The feature maps of pool rows ``index`` [M] -> [M, h, w, D], on every process
        (gathered from the processes that hold them; all must call this together)."""
        index = np.asarray(index, np.int64)
        if self.rows is None:
            return np.asarray(self.maps)[index]
        if self.rows.start == 0 and self.rows.stop == len(self.candidates):
            return np.asarray(self.maps)[index]
        pool = _padded_pool(self, mesh_axes)
        picked = _take_rows(pool, parallel.replicate(index, mesh_axes),
                            parallel.replicated(mesh_axes))
        return parallel.host_array(picked)


class SolverInputs(NamedTuple):
    """What the E-step's solver checks need: the vertex memory [V, D], the clutter
    prototype [D] and the :class:`nvsm_jax.pose_solver.SolverConfig`."""

    vertex_memory: Any
    clutter: Any
    config: pose_solver.SolverConfig


@dataclasses.dataclass(frozen=True)
class EStepConfig(training.DataclassConfig):
    """The ``estep`` config block (the package's ``nvsm`` config documents each field).

    Proposals: ``azimuth_steps`` / ``elevation_steps`` offsets of ``azimuth_step`` /
    ``elevation_step`` radians around every source, elevations clipped to
    [``min_elevation``, ``max_elevation``]. Synthesis: a pixel is valid when
    ``min_weight`` of its face was seen; ``source_chunk`` sources per call.
    Acceptance: ``threshold`` / ``margin`` / ``margin_angle`` / ``max_new`` and the
    flip check and caps ``flip_margin`` / ``flip_window`` / ``max_per_source`` /
    ``max_per_sector`` (:class:`nvsm_jax.pseudo_labels.Selection`), then
    ``agree_angle`` (> 0: the NeMo grid search must agree) and ``refine_steps``
    (> 0: refine accepted poses by render-and-compare, from the matched pose).
    The label-free safeguard (issue 9): ``agreement_rate`` > 0 runs the current
    model's own render-and-compare (the ``solver`` config) on the ``max_new``
    best-scoring candidates and accepts the longest score-ranked prefix in which
    at least that fraction of matches lies within ``agreement_angle`` of the
    solver's pose (prefixes shorter than ``agreement_min_count`` do not count);
    none -> the round accepts nothing and the run stops
    (:func:`nvsm_jax.pseudo_labels.agreement_cut`).
    Sources: ``mirror_sources`` adds their mirror images; ``novel_views_only``
    drops a pseudo-labelled source's own pose.
    Which source vertices carry features into the synthesised views (issue 9):
    visibility from a render at ``H / source_render_stride`` (None: at the
    feature map's stride); ``min_view_cos`` drops grazing vertices (|n . v|
    below it); ``source_object="mask"`` keeps a labelled source's vertex only
    inside its object mask; ``pseudo_object="memory"`` keeps a pseudo-labelled
    source's vertex only where its feature is closer to the vertex's memory than
    to the clutter prototype. ``distance_scales``: the proposals' distances are
    the source's times each factor (the object's scale varies between images).
    """

    azimuth_step: float = float(np.radians(15.0))
    azimuth_steps: int = 2
    elevation_step: float = float(np.radians(10.0))
    elevation_steps: int = 1
    min_elevation: float = float(np.radians(-20.0))
    max_elevation: float = float(np.radians(60.0))
    min_weight: float = 0.5
    threshold: float = -1.0
    margin: float = -1.0
    margin_angle: float = float(np.pi / 6)
    max_new: int | None = 30
    source_chunk: int = 8
    agree_angle: float = 0.0
    refine_steps: int = 0
    agreement_rate: float = 0.0
    agreement_angle: float = float(np.pi / 6)
    agreement_min_count: int = 5
    mirror_sources: bool = True
    novel_views_only: bool = False
    source_render_stride: int | None = 2     # the training render's stride (issue 9)
    min_view_cos: float = 0.0
    source_object: str = "mask"
    pseudo_object: str = "none"
    distance_scales: tuple = (1.0,)
    flip_margin: float | None = None
    flip_window: float = float(np.radians(20.0))
    max_per_source: int | None = None
    max_per_sector: int | None = None

    def __post_init__(self):
        if self.source_object not in ("none", "mask"):
            raise ValueError(f"estep.source_object={self.source_object!r} "
                             "(expected 'none' or 'mask')")
        if self.pseudo_object not in ("none", "memory"):
            raise ValueError(f"estep.pseudo_object={self.pseudo_object!r} "
                             "(expected 'none' or 'memory')")
        if not 0.0 <= self.min_view_cos < 1.0:
            raise ValueError(f"estep.min_view_cos={self.min_view_cos} (expected in [0, 1))")
        if not 0.0 <= self.agreement_rate <= 1.0:
            raise ValueError(f"estep.agreement_rate={self.agreement_rate} (expected in [0, 1])")
        if self.agreement_rate > 0 and not self.max_new:
            raise ValueError("estep.agreement_rate > 0 needs estep.max_new (how many "
                             f"candidates the solver checks), got max_new={self.max_new}")
        if self.agreement_min_count < 1:
            raise ValueError(f"estep.agreement_min_count={self.agreement_min_count} "
                             "(expected >= 1)")

    @property
    def selection(self) -> pseudo_labels.Selection:
        return pseudo_labels.Selection(
            self.threshold, self.margin, self.margin_angle, self.max_new,
            flip_margin=self.flip_margin, flip_window=self.flip_window,
            max_per_source=self.max_per_source, max_per_sector=self.max_per_sector)


@functools.partial(jax.jit, static_argnums=2)
def _take_rows(x, index, out_sharding):
    return jax.lax.with_sharding_constraint(jnp.take(x, index, axis=0), out_sharding)


def _solver_poses(maps, solver: SolverInputs, verts, faces, focal, principal, stride: int,
                  batch: int) -> np.ndarray:
    """The current model's render-and-compare pose (``solver.config``: grid, then Adam;
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
                                    verts, faces, fo, pr, stride=stride, cfg=solver.config)
            out.append(np.asarray(res.pose)[:m])
    return np.concatenate(out) if out else np.zeros((0, 4), np.float32)


def source_vertex_mask(vf: feat.VertexFeatures, normals_cos, object_masks, is_labelled, *,
                       min_view_cos: float = 0.0, memory=None, clutter=None):
    """Which vertices of each source carry features into its synthesised views.

    vf: the sources' :class:`nvsm_jax.features.VertexFeatures` ([S, V] visible,
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
                 model_mesh: meshes.Mesh, *, stride: int, mesh_axes,
                 solver: "SolverInputs | None" = None) -> np.ndarray:
    """Scores of every synthesised view against the pool: targets [S, K, 4] -> [S*K, N].

    pool_shard: the pool's normalised maps [Np, h, w, D] (padded; the first ``n`` real).
    """
    k = targets.shape[1]
    map_hw = tuple(pool_shard.shape[1:3])
    verts = jnp.asarray(model_mesh.verts, jnp.float32)
    faces = jnp.asarray(model_mesh.faces, jnp.int32)
    normals = jnp.asarray(meshes.vertex_normals(model_mesh.verts, model_mesh.faces))
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
        scores.append(matching.match_scores_sharded(syn, mask, pool_shard, mesh_axes,
                                                    normalized=True)[:, :n])
    return np.concatenate(scores)


class ScoreTable(NamedTuple):
    """One E-step's views against the pool. scores: [K, N]; view_poses: [K, 4];
    view_source: [K] source ids; view_labelled: [K] bool."""

    scores: np.ndarray
    view_poses: np.ndarray
    view_source: np.ndarray
    view_labelled: np.ndarray


def score_views(cfg: EStepConfig, sources: Sources, pool: Pool, *, model_mesh: meshes.Mesh,
                stride: int, mesh_axes, solver: SolverInputs | None = None) -> ScoreTable:
    """The E-step's score table: proposals around every source, their synthesised
    views, each view's score against every pool image (``cfg.novel_views_only``
    drops pseudo-labelled sources' own poses)."""
    offsets = pseudo_labels.offset_grid(cfg.azimuth_step, cfg.azimuth_steps, cfg.elevation_step,
                                        cfg.elevation_steps)
    targets = pseudo_labels.propose_targets(sources.poses, offsets,
                                            (cfg.min_elevation, cfg.max_elevation),
                                            cfg.distance_scales)              # [S, K, 4]
    k = targets.shape[1]
    pool_shard = matching.normalize_images(_padded_pool(pool, mesh_axes))  # once per round
    with training.heartbeat("E-step: scoring views"):       # a chunk's first call compiles
        scores = _score_table(cfg, sources, targets, pool_shard, len(pool.candidates),
                              model_mesh, stride=stride, mesh_axes=mesh_axes,
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


def holdout_check(cfg: EStepConfig, sources: Sources, *, model_mesh: meshes.Mesh, stride: int,
                  mesh_axes, solver: SolverInputs | None = None,
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
                        model_mesh=model_mesh, stride=stride, mesh_axes=mesh_axes, solver=solver)
    own = (table.view_labelled[:, None]
           & (table.view_source[:, None] == np.asarray(held.ids)[None, :]))    # [K, M]
    scores = np.where(own, -np.inf, table.scores)
    best = np.argmax(scores, axis=0)
    best_score = scores[best, np.arange(len(lab))]
    err = geometry.pose_error(table.view_poses[best].astype(np.float64),
                              np.asarray(held.poses, np.float64))
    right = np.isfinite(best_score) & (err < correct_angle)
    return HoldoutCheck(right, best_score.astype(np.float32), (~own).sum(axis=0))


def e_step(cfg: EStepConfig, sources: Sources, pool: Pool, *, model_mesh: meshes.Mesh,
           stride: int, round_index: int, mesh_axes,
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
        cfg, sources, pool, model_mesh=model_mesh, stride=stride, mesh_axes=mesh_axes,
        solver=solver)
    verts = jnp.asarray(model_mesh.verts, jnp.float32)
    faces = jnp.asarray(model_mesh.faces, jnp.int32)
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
        grid_only = solver._replace(config=dataclasses.replace(solver.config, steps=0, top_k=1))
        grid_best = _solver_poses(pool.maps_at(new.index, mesh_axes), grid_only, verts, faces,
                                  pool.focal[new.index], pool.principal[new.index], stride, 32)
        new = new.take(pseudo_labels.agree_with_solver(new.poses, grid_best, agree))
        if cfg.max_new is not None:
            new = new.take(slice(0, int(cfg.max_new)))
    agreement = None
    if len(new) and gate > 0:
        log.info("E-step: solving %d matched images for the agreement safeguard", len(new))
        solved = _solver_poses(pool.maps_at(new.index, mesh_axes), solver, verts, faces,
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
        solver_cfg = dataclasses.replace(solver.config, steps=int(cfg.refine_steps))
        with training.heartbeat(f"E-step: refining {len(new)} accepted poses"):
            poses, _, _ = pose_solver.refine(jnp.asarray(pool.maps_at(new.index, mesh_axes)),
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


def training_set(labelled: PoseSet, unlabelled, pl: pseudo_labels.PseudoLabels,
                 labelled_min_fraction: float = 0.0) -> PoseSet:
    """Labelled rows (repeated to make up ``labelled_min_fraction`` of the set)
    followed by the pseudo-labelled rows at their pseudo poses."""
    reps = 1
    if labelled_min_fraction > 0 and len(pl):
        want = labelled_min_fraction * len(pl) / max(1e-9, 1 - labelled_min_fraction)
        reps = max(1, int(np.ceil(want / len(labelled))))
    lab = labelled.subset(np.tile(np.arange(len(labelled)), reps))
    if len(pl) == 0:
        return lab
    idx = pl.index
    return PoseSet(labelled.category,
                   lab.names + tuple(unlabelled.names[i] for i in idx),
                   np.concatenate([lab.images, unlabelled.images[idx]]),
                   np.concatenate([lab.poses, pl.poses.astype(np.float32)]),
                   np.concatenate([lab.focal, unlabelled.focal[idx]]),
                   np.concatenate([lab.principal, unlabelled.principal[idx]]))


def _m_step(run: "NVSMRun", state, data: PoseSet, round_index: int, round_start: int,
            begin: int, end: int, round_end: int):
    """CoKe steps ``begin .. end - 1`` of round ``round_index``'s M-step, which spans
    ``round_start .. round_end - 1``, on ``data``; batches are keyed by (seed, round,
    step in the round), so a resumed M-step sees the batches it would have seen."""
    config = run.config
    log.info("round %d M-step: steps %d -> %d on %d images", round_index, begin, end, len(data))
    augment = pipeline.augment_from_config(config.augment)
    batches = pipeline.BatchIterator(data, config.batch_size, seed=config.seed * 1000 + round_index,
                                     augment=augment)
    keys = ("image", "pose", "focal", "principal")
    return training.fit(          # each process reads only its rows of every batch
        state, run.train_step,
        lambda s, rows: {k: v for k, v in batches.batch(s - round_start, rows).items()
                         if k in keys},
        run.mesh_axes, start=begin, end=end, num_steps=round_end, seed=config.seed,
        batch_size=config.batch_size, log_every=config.log_every, writer=run.writer,
        ckpt=run.ckpt, progress=run.progress, desc=f"round {round_index} M-step",
        extra={"round": round_index}, process_local=True)


def round_sources(config, fn, labelled: PoseSet, unlabelled, pool_maps,
                   pl: pseudo_labels.PseudoLabels, mesh_axes=None) -> Sources:
    """The E-step's sources: the anchors, then the pseudo-labelled images ``pl``,
    then (``estep.mirror_sources``) their mirror images. pool_maps: all pool
    maps [N, h, w, D], or a :class:`Pool` (its rows may be spread over processes)."""
    pl_maps = (pool_maps.maps_at(pl.index, mesh_axes) if isinstance(pool_maps, Pool)
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


def schedule_steps(config) -> int:
    """Optimiser steps of a whole NVSM run, the learning-rate schedule's horizon:
    round 0 (``initial_steps``) plus ``num_rounds`` M-steps of ``steps_per_round``."""
    return int(config.initial_steps) + int(config.num_rounds) * int(config.steps_per_round)


@dataclasses.dataclass
class NVSMRun:
    """What every round of one NVSM run shares, set up once by :func:`start_run`."""

    config: Any                     # the run's config (``num_steps`` = the whole schedule)
    workdir: str
    estep_cfg: EStepConfig
    solver_cfg: pose_solver.SolverConfig
    labelled: PoseSet               # the anchors, at their labels
    unlabelled: PoseSet             # the pool (its poses are never read)
    hidden: np.ndarray              # the pool's hidden poses [N, 4]: reports and oracle rows only
    test_sets: dict                 # {"L0": PoseSet, ...}
    model_mesh: meshes.Mesh
    mesh_axes: Any                  # the device mesh
    model: Any
    train_step: Any
    ckpt: training.Checkpointer
    writer: training.MetricsWriter      # metrics.jsonl (per step)
    round_log: training.MetricsWriter   # rounds.jsonl (per round)
    progress: bool


@dataclasses.dataclass
class RunPosition:
    """Where a run stands between rounds: changed by each round's E-, M- and record step."""

    state: Any                      # the TrainState
    pl: pseudo_labels.PseudoLabels  # every pseudo-label so far
    step: int                       # the optimiser step the next M-step starts at
    rounds: list                    # the rounds.jsonl entries so far
    next_round: int
    mid_round: int | None           # a checkpoint inside next_round's M-step to go on from


def start_run(config, workdir, *, train_set: PoseSet | None = None, model_mesh=None,
              test_sets: dict | None = None, num_devices: int | None = None,
              progress: bool = True) -> tuple[NVSMRun, Any]:
    """Checks ``config``, loads the data (unless given), records ``config.json`` and
    builds the model, its fresh TrainState, the checkpointer and the logs ->
    ``(run, state)``."""
    config_checks.check_config(config)
    workdir = os.fspath(workdir)
    config = copy.deepcopy(config)
    config.num_steps = schedule_steps(config)   # the learning-rate schedule spans the whole run
    if train_set is None:
        train_set = loaders.load_pose_set(config.data_root, config.category, "L0",
                                          lazy_images=jax.process_count() > 1)  # own rows only
        model_mesh = loaders.load_model_mesh(config.data_root, config.category,
                                             pose_set=train_set)
    if test_sets is None:
        test_sets = {}
        if config.test_root:
            for occ in config.eval_occlusions:
                test_sets[occ] = loaders.load_pose_set(config.test_root, config.category, occ,
                                                       limit=config.eval_limit)
    split = fewshot.split_from_config(train_set, int(config.num_labelled), config)
    hidden = fewshot.hidden_poses(train_set, split.unlabelled.names)   # reporting only
    # the record, once the config and data are good (a failed run never blocks its rerun)
    training.save_config(config, workdir, has_work=train.holds_work(workdir))
    os.makedirs(os.path.join(workdir, "pseudo_labels"), exist_ok=True)

    mesh_axes = parallel.make_mesh(num_devices or config.num_devices)
    model = train.build_model(config)
    image_hw = train_set.image_size
    state = train.init_state(config, model, len(model_mesh.verts), image_hw, mesh_axes)
    state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
    run = NVSMRun(
        config=config, workdir=workdir, estep_cfg=EStepConfig.from_config(config.estep),
        solver_cfg=pose_solver.SolverConfig.from_dict(config.solver.to_dict()),
        labelled=split.labelled, unlabelled=split.unlabelled, hidden=hidden,
        test_sets=test_sets, model_mesh=model_mesh, mesh_axes=mesh_axes, model=model,
        train_step=train.make_train_step(config, model, model_mesh, image_hw, state_sharding,
                                         mesh_axes),
        ckpt=training.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                                   max_to_keep=max(1, int(config.keep_checkpoints))),
        writer=training.MetricsWriter(workdir),
        round_log=training.MetricsWriter(workdir, "rounds.jsonl"), progress=progress)
    return run, state


def resume(run: NVSMRun, state) -> RunPosition:
    """Where the run in ``run.workdir`` stopped (:mod:`nvsm_jax.run_state`): after a
    finished round, inside an M-step, or nowhere yet; ``state`` (fresh) is restored
    from the matching checkpoint."""
    done = run_state.load_progress(run.workdir)
    rounds = run_state.round_log_entries(run.round_log.path, done)
    next_round, step, mid_round = run_state.resume_point(run.config, done, run.ckpt.latest_step(),
                                                         run.ckpt.directory)
    pl = pseudo_labels.PseudoLabels.empty()
    if done and done["round"] > 0:
        pl = run_state.load_round(run.workdir, done["round"])
    if mid_round is not None:       # killed inside round next_round's M-step
        state = run.ckpt.restore(state, step=mid_round)
        log.info("resuming round %d's M-step at step %d", next_round, mid_round)
    elif done:
        state = run.ckpt.restore(state, step=step)
        log.info("resuming after round %d (step %d, %d pseudo-labels)", done["round"], step, len(pl))
    return RunPosition(state, pl, step, rounds, next_round, mid_round)


def e_step_for_round(run: NVSMRun, at: RunPosition, r: int) -> RoundResult:
    """Round ``r``'s E-step (none in round 0): the stored one if the run was killed in
    its M-step, else computed on the current model and stored before the M-step.
    Its new pseudo-labels join ``at.pl``."""
    if r == 0:
        return RoundResult(pseudo_labels.PseudoLabels.empty(), 0, 0.0)
    config, labelled, unlabelled, pl = run.config, run.labelled, run.unlabelled, at.pl
    result = run_state.load_staged_estep(run.workdir, r)
    if result is None and at.mid_round is not None:
        raise RunStateError(f"{run.workdir}: checkpoint {at.mid_round} lies inside round {r}, "
                            f"whose E-step is not stored ({run_state.staged_path(run.workdir, r)})"
                            f"; delete checkpoints/{at.mid_round} to redo the round")
    if result is None:
        nemo = train.nemo_model(config, run.model, at.state, run.model_mesh)
        fn = train.feature_fn(nemo)
        log.info("round %d E-step: feature maps of %d pool images", r, len(unlabelled))
        # each process: the feature maps of its own rows of the pool
        pool_maps, rows = pool_features(fn, unlabelled.images, config.eval_batch_size,
                                        run.mesh_axes)
        candidates = np.ones(len(unlabelled), bool)
        candidates[pl.index] = False
        pool = Pool(pool_maps, unlabelled.focal, unlabelled.principal, candidates, rows)
        result = e_step(run.estep_cfg, round_sources(config, fn, labelled, unlabelled, pool, pl,
                                                     run.mesh_axes),
                        pool, model_mesh=run.model_mesh, stride=config.model.stride,
                        round_index=r, mesh_axes=run.mesh_axes,
                        solver=SolverInputs(at.state.aux.vertex,
                                            feat.clutter_prototype(at.state.aux.clutter),
                                            run.solver_cfg))
        del pool_maps, pool
        oracle = str(config.get("nvsm_oracle", "none"))    # checked by check_config
        if oracle != "none":    # a diagnosis row: hidden poses change the round
            result = dataclasses.replace(result, new=pseudo_labels.oracle_labels(
                oracle, result.new, run.hidden, candidates,
                np.random.default_rng([int(config.seed), r])))
        if parallel.is_main_process():      # the same result on every process
            run_state.stage_estep(run.workdir, r, result)
        parallel.sync(f"nvsm round {r} E-step stored")
    at.pl = pl.extend(result.new)
    if len(result.new) == 0:
        log.info("round %d: nothing new passes; stopping", r)
    return result


def m_step_for_round(run: NVSMRun, at: RunPosition, r: int, result: RoundResult,
                     max_steps: int | None = None) -> int | None:
    """Round ``r``'s M-step (none after an E-step that found nothing): CoKe on the
    anchors and every pseudo-label so far, from ``at.step`` (or the checkpoint inside
    it), at most ``max_steps`` steps -> the steps run, or None when it stopped short
    of the round's end (a simulated kill)."""
    if r > 0 and len(result.new) == 0:
        return 0
    config, labelled, unlabelled, pl, step = run.config, run.labelled, run.unlabelled, at.pl, at.step
    data = training_set(labelled, unlabelled, pl, config.labelled_min_fraction)
    n_steps = config.initial_steps if r == 0 else config.steps_per_round
    begin = at.mid_round if at.mid_round is not None else step
    end = step + n_steps if max_steps is None else min(step + n_steps, begin + max_steps)
    at.state = _m_step(run, at.state, data, r, step, begin, end, step + n_steps)
    at.mid_round = None
    if end < step + n_steps:        # stopped inside the M-step (a simulated kill)
        run.ckpt.wait()
        return None
    at.step = step + n_steps
    return end - begin


def round_entry(run: NVSMRun, at: RunPosition, r: int, result: RoundResult) -> dict:
    """Round ``r``'s ``rounds.jsonl`` entry without its time and test scores: the
    pseudo-labels' count, and their quality against the hidden poses (reporting only)."""
    pl, new, hidden = at.pl, result.new, run.hidden
    quality = pseudo_labels.label_quality(pl.poses, hidden[pl.index])
    quality_new = pseudo_labels.label_quality(new.poses, hidden[new.index])
    return {"round": r, "step": at.step, "num_pseudo": len(pl), "num_new": len(new),
            "precision": quality["acc_pi_6"], "precision_new": quality_new["acc_pi_6"],
            "median_err_deg": quality["median_err_deg"], "flip_rate": quality["flip_rate"],
            "sectors_covered": quality["sectors_covered"],
            "median_err_new_deg": quality_new["median_err_deg"],
            "flip_rate_new": quality_new["flip_rate"],
            "matched_median_err_new_deg": (
                None if result.matched_poses is None or not len(new) else
                pseudo_labels.label_quality(result.matched_poses,
                                            hidden[new.index])["median_err_deg"]),
            "coverage": pseudo_labels.coverage(np.concatenate([run.labelled.poses, pl.poses])),
            "num_views": result.num_views, "estep_seconds": result.seconds,
            "agreement": result.agreement}


def record_round(run: NVSMRun, at: RunPosition, r: int, result: RoundResult,
                 started: float) -> bool:
    """Finishes round ``r`` (begun at time ``started``): its entry (and L0 test scores
    with ``eval_every_round``), the checkpoint, then the run state
    (:func:`nvsm_jax.run_state.record_round`). Returns True when the run stops here:
    nothing new passed, or the pool is used up."""
    config = run.config
    entry = {**round_entry(run, at, r, result), "round_seconds": time.time() - started}
    if config.eval_every_round and "L0" in run.test_sets:
        res = train.evaluate_nemo(train.nemo_model(config, run.model, at.state, run.model_mesh),
                                  {"L0": run.test_sets["L0"]}, run.solver_cfg,
                                  config.eval_batch_size)
        entry.update({f"test_{k}": v for k, v in res["L0"].items()
                      if k in ("acc_pi_6", "acc_pi_18", "med_err_deg")})
    stopped = r > 0 and (len(result.new) == 0 or len(at.pl) == len(run.unlabelled))
    run.ckpt.maybe_save(at.step, at.state, force=True)
    run.ckpt.wait()
    run_state.record_round(run.workdir, run.round_log, r, at.step, at.pl, entry, stopped=stopped)
    parallel.sync(f"nvsm round {r} recorded")
    at.rounds.append({**entry})
    log.info("round %d: %s", r, _round_summary(entry))
    return stopped


@workdir_lock.locked
def run_nvsm(config, workdir, *, train_set: PoseSet | None = None, model_mesh=None,
             test_sets: dict | None = None, num_devices: int | None = None,
             stop_after_rounds: int | None = None, stop_after_steps: int | None = None,
             progress: bool = True) -> dict:
    """NVSM per ``config`` into ``workdir``; resumes from ``progress.json`` and the
    latest checkpoint, also from inside a round's M-step. Holds the workdir
    (:func:`nvsm_jax.workdir_lock.hold`: another live run there is refused).

    train_set / model_mesh / test_sets ({"L0": PoseSet, ...}): given directly
    (tests, notebooks) or loaded from ``config.data_root`` / ``config.test_root``.
    The learning-rate schedule spans the run (:func:`schedule_steps`; the recorded
    ``config.json`` holds that as ``num_steps``). Checkpoints: every
    ``config.checkpoint_every`` steps and at the end of every round, the last
    ``config.keep_checkpoints`` kept.
    stop_after_rounds / stop_after_steps: stop after finishing this many rounds,
    or optimiser steps, in this call (simulates a kill). Returns ``{"rounds":
    [...], "pseudo_labels": PseudoLabels, "state": TrainState, "test": {occ: metrics}}``.
    """
    run, state = start_run(config, workdir, train_set=train_set, model_mesh=model_mesh,
                           test_sets=test_sets, num_devices=num_devices, progress=progress)
    at = resume(run, state)
    rounds_done, steps_done = 0, 0
    for r in range(at.next_round, run.config.num_rounds + 1):
        if stop_after_rounds is not None and rounds_done >= stop_after_rounds:
            break
        started = time.time()
        result = e_step_for_round(run, at, r)
        steps = m_step_for_round(run, at, r, result, None if stop_after_steps is None
                                 else stop_after_steps - steps_done)
        if steps is None:           # stopped inside the M-step
            break
        steps_done += steps
        rounds_done += 1
        if record_round(run, at, r, result, started):
            break
    run.ckpt.close()
    out = {"rounds": at.rounds, "pseudo_labels": at.pl, "state": at.state,
           "labelled": run.labelled, "unlabelled": run.unlabelled, "hidden": run.hidden}
    if stop_after_rounds is None and stop_after_steps is None and run.test_sets:
        out["test"] = train.evaluate_nemo(
            train.nemo_model(run.config, run.model, at.state, run.model_mesh), run.test_sets,
            run.solver_cfg, run.config.eval_batch_size)
    return out


def _round_summary(entry: dict) -> str:
    """One short line: ``+30 -> 60 pseudo-labels, precision 0.83 (new 0.80), median
    error 12.1 deg, flips 0.03, 9 / 12 sectors, coverage 0.42, L0 41.7 / 12.0 / 38.5
    deg, 95 s`` (the pseudo-labels' quality from the hidden poses, reporting only)."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    text = (f"+{entry['num_new']} -> {entry['num_pseudo']} pseudo-labels, precision "
            f"{f(entry['precision'], '.2f')} (new {f(entry['precision_new'], '.2f')}), "
            f"median error {f(entry.get('median_err_deg'), '.1f')} deg, flips "
            f"{f(entry.get('flip_rate'), '.2f')}, {entry.get('sectors_covered', 0)} / 12 "
            f"sectors, coverage {entry['coverage']:.2f}")
    if entry.get("agreement") is not None:
        text += f", solver agreement {entry['agreement']:.2f}"
    if "test_acc_pi_6" in entry:
        text += (f", L0 {100 * entry['test_acc_pi_6']:.1f} / {100 * entry['test_acc_pi_18']:.1f}"
                 f" / {entry['test_med_err_deg']:.1f} deg")
    return text + f", {entry['round_seconds']:.0f} s"
