"""NVSM semi-supervised training: EM rounds of view synthesis, matching and CoKe.

``run_nvsm(config, workdir)`` composes the pieces; it computes nothing itself:

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
  own fitted feature map). By default pseudo-labels accumulate and
  pseudo-labelled images become sources; with ``estep.reselect`` only the
  anchors synthesise, every pool image competes again each round, and the best
  ``max_new * round`` replace the set, so the improved features can drop an
  earlier mistake.
* **M-step.** CoKe training on labelled + pseudo-labelled images, continuing the
  same TrainState (params, Adam state and the vertex/clutter memory).
* Expansion continues from the newly covered poses until ``num_rounds`` is
  reached, the pool is exhausted, or nothing new passes.

Every round is checkpointed: the TrainState with orbax at the round's last
step, the pseudo-labels as ``pseudo_labels/round_XXX.npz``, and
``progress.json`` (written last) naming the finished round and its step. A
killed run resumes at the last finished round and ends with the same result
(batches and keys are functions of ``(seed, round, step)``).

Per round ``rounds.jsonl`` logs the pseudo-label count, their precision against
the hidden truth (fraction within pi/6, computed for reporting only: the hidden
poses never reach training), pose-space coverage and test accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from nvsm_jax import features as feat
from nvsm_jax import (config_checks, evaluation, matching, meshes, parallel, pose_solver,
                      pseudo_labels, synthesis, train, training)
from nvsm_jax.data import PoseSet, fewshot, loaders, pipeline

log = logging.getLogger(__name__)

__all__ = ["RoundResult", "extract_features", "e_step", "mirrored_sources", "training_set",
           "run_nvsm", "load_progress"]


@dataclasses.dataclass
class RoundResult:
    """What one E-step produced (host arrays)."""

    new: pseudo_labels.PseudoLabels
    num_views: int
    seconds: float


def extract_features(feature_fn, images, batch_size: int) -> np.ndarray:
    """Feature maps of all images: uint8 [N, H, W, 3] -> float32 [N, h, w, D] (host)."""
    if len(images) == 0:
        raise ValueError("extract_features: no images")
    out = []
    for s in range(0, len(images), batch_size):
        chunk, m = parallel.pad_to_multiple(np.asarray(images[s:s + batch_size]), batch_size)
        out.append(np.asarray(feature_fn(chunk))[:m])
    return np.concatenate(out)


def _padded_pool(pool_feats: np.ndarray, mesh_axes):
    """The pool's feature maps padded to a multiple of the devices, sharded once."""
    n_dev = mesh_axes.devices.size
    padded, _ = parallel.pad_to_multiple(pool_feats, n_dev)
    return parallel.shard_batch(padded, mesh_axes)


def _solver_grid_poses(maps, memory, clutter, verts, faces, focal, principal, grid,
                       batch: int = 32) -> np.ndarray:
    """The NeMo grid search's best pose per map. maps: [M, h, w, D]; focal: scalar and
    principal: [2] on the feature map; grid: [G, 4] -> [M, 4]. Chunks are padded to
    ``batch`` so every call has one shape."""
    out = []
    for s0 in range(0, len(maps), batch):
        chunk, m = parallel.pad_to_multiple(np.asarray(maps[s0:s0 + batch]), batch)
        losses = pose_solver.grid_losses(jnp.asarray(chunk), memory, clutter, verts, faces,
                                         jnp.full(batch, focal), jnp.broadcast_to(principal, (batch, 2)),
                                         grid)
        out.append(np.asarray(grid)[np.argmin(np.asarray(losses)[:m], axis=1)])
    return np.concatenate(out) if out else np.zeros((0, 4), np.float32)


def bin_quota(cfg, round_index: int) -> int | None:
    """Pseudo-labels allowed per azimuth sector in a round: ``cfg.bin_quota``
    in round 1, growing by ``cfg.bin_quota_growth`` per round (None = no quota)."""
    q = cfg.get("bin_quota")
    if q is None:
        return None
    return int(q + (cfg.get("bin_quota_growth") or 0) * max(0, round_index - 1))


def e_step(cfg, *, source_maps, source_poses, source_focal, source_principal, source_ids,
           source_is_labelled, pool_maps, candidates, model_mesh: meshes.Mesh, stride: int,
           round_index: int, mesh_axes, solver_inputs=None) -> RoundResult:
    """One expansion: synthesise around every source, match, accept.

    source_maps: [S, h, w, D] feature maps of the sources; source_poses: [S, 4];
    source_focal: [S]; source_principal: [S, 2] (input-image intrinsics);
    source_ids: [S] ids recorded as the pseudo-labels' ``source``;
    source_is_labelled: [S] bool; pool_maps: [N, h, w, D] of the unlabelled
    pool; candidates: [N] bool (still unlabelled). ``cfg`` is the ``estep``
    config block. ``solver_inputs`` = (vertex_memory, clutter, SolverConfig)
    enables the solver-agreement rule (``cfg.agree_angle > 0``: keep a match only
    if the NeMo grid search's best pose lies within that angle) and refinement of
    accepted poses (``cfg.refine_steps > 0``).
    """
    start = time.time()
    s_count = len(source_poses)
    if s_count == 0:
        raise ValueError("e_step: no sources (need at least one labelled image)")
    if not np.any(candidates):
        return RoundResult(pseudo_labels.PseudoLabels.empty(), 0, 0.0)
    h, w = pool_maps.shape[1:3]
    verts = jnp.asarray(model_mesh.verts, jnp.float32)
    faces = jnp.asarray(model_mesh.faces, jnp.int32)
    normals = jnp.asarray(meshes.vertex_normals(model_mesh.verts, model_mesh.faces))
    offsets = pseudo_labels.offset_grid(cfg.azimuth_step, cfg.azimuth_steps, cfg.elevation_step,
                                        cfg.elevation_steps)
    targets = pseudo_labels.propose_targets(source_poses, offsets,
                                            (cfg.min_elevation, cfg.max_elevation))  # [S, K, 4]
    k = targets.shape[1]
    pool = matching.normalize_images(_padded_pool(pool_maps, mesh_axes))  # once per round
    n = len(pool_maps)
    scores = []
    chunk = max(1, int(cfg.source_chunk))
    for s0 in range(0, s_count, chunk):
        sl = slice(s0, min(s0 + chunk, s_count))
        idx, m = parallel.pad_to_multiple(np.arange(s0, sl.stop), chunk)
        vf = feat.vertex_features(jnp.asarray(source_maps[idx]), verts, faces, normals,
                                  jnp.asarray(source_poses[idx]), jnp.asarray(source_focal[idx]),
                                  jnp.asarray(source_principal[idx]), stride=stride)
        syn, mask = synthesis.synthesize_many(
            vf.features, vf.visible, verts, faces, jnp.asarray(targets[idx]),
            jnp.asarray(source_focal[idx]) / stride, jnp.asarray(source_principal[idx]) / stride,
            (h, w), min_weight=cfg.min_weight)
        syn = syn[:m].reshape(m * k, h, w, -1)
        mask = mask[:m].reshape(m * k, h, w)
        scores.append(matching.match_scores_sharded(syn, mask, pool, mesh_axes,
                                                    normalized=True)[:, :n])
    scores = np.concatenate(scores)                                        # [S*K, N]
    view_poses = targets.reshape(-1, 4)
    view_source = np.repeat(np.asarray(source_ids), k)
    view_labelled = np.repeat(np.asarray(source_is_labelled, bool), k)
    if cfg.get("novel_views_only"):
        keep = pseudo_labels.novel_views(offsets, source_is_labelled)
        scores, view_poses, view_source, view_labelled = (
            a[keep] for a in (scores, view_poses, view_source, view_labelled))
    agree = float(cfg.get("agree_angle") or 0.0) if solver_inputs is not None else 0.0
    new = pseudo_labels.select(scores, view_poses, view_source, view_labelled,
                               threshold=cfg.threshold, margin=cfg.margin,
                               margin_angle=cfg.margin_angle,
                               max_new=None if agree > 0 else cfg.get("max_new"),
                               round_index=round_index, candidates=candidates,
                               rule=cfg.get("rule", "image_best"), per_view=cfg.get("per_view", 1),
                               z_threshold=cfg.get("z_threshold"),
                               bin_quota=bin_quota(cfg, round_index),
                               quota_bins=int(cfg.get("quota_bins") or 12),
                               view_cap=cfg.get("view_cap"),
                               view_cell=(cfg.azimuth_step, cfg.elevation_step))
    # The pool's intrinsics on the feature map (the synthetic and NeMo-format crops share one camera).
    fo = float(source_focal[0]) / stride
    pr = np.asarray(source_principal[0], np.float32) / stride
    if len(new) and agree > 0:
        memory, clutter, solver_cfg = solver_inputs
        grid_best = _solver_grid_poses(pool_maps[new.index], memory, clutter, verts, faces, fo, pr,
                                       solver_cfg.grid())
        new = new.take(pseudo_labels.agree_with_solver(new.poses, grid_best, agree))
        if cfg.get("max_new") is not None:
            new = new.take(slice(0, int(cfg.max_new)))
    if len(new) and cfg.refine_steps > 0 and solver_inputs is not None:
        memory, clutter, solver_cfg = solver_inputs
        solver_cfg = dataclasses.replace(solver_cfg, steps=int(cfg.refine_steps))
        maps = jnp.asarray(pool_maps[new.index])
        poses, _, _ = pose_solver.refine(maps, memory, clutter, verts, faces,
                                         jnp.full(len(new), fo), jnp.broadcast_to(pr, (len(new), 2)),
                                         jnp.asarray(new.poses)[:, None], solver_cfg)
        new.poses = np.asarray(poses[:, 0], np.float32)
    return RoundResult(new, int(scores.shape[0]), time.time() - start)


def mirrored_sources(feature_fn, batch_size, images, maps, poses, focal, principal, ids,
                     is_labelled):
    """The sources followed by their mirror images (``pipeline.flip_pose``).

    images: uint8 [S, H, W, 3]; maps: [S, h, w, D]; poses: [S, 4]; focal: [S];
    principal: [S, 2]; ids, is_labelled: [S]. Returns the six source arrays with
    2S rows (a mirrored source keeps its id). Exact for objects symmetric about
    their x = 0 plane (cars, most PASCAL3D+ classes): the mirror of an image at
    ``(a, e, t)`` shows the object at ``(2 pi - a, e, -t)``, a free second view.
    """

    width = images.shape[2]
    flipped = np.ascontiguousarray(images[:, :, ::-1])
    f_poses, f_principal = pipeline.flip_pose(poses, principal, width)
    f_maps = extract_features(feature_fn, flipped, batch_size)
    return (np.concatenate([maps, f_maps]), np.concatenate([poses, f_poses]),
            np.concatenate([focal, focal]), np.concatenate([principal, f_principal]),
            np.concatenate([ids, ids]), np.concatenate([is_labelled, is_labelled]))


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


def load_progress(workdir) -> dict | None:
    """``{"round": r, "step": s}`` of the last finished round, or None."""
    path = os.path.join(os.fspath(workdir), "progress.json")
    if not os.path.exists(path):
        return None
    done = training.read_json(path, "record of the last finished NVSM round",
                              "delete it to restart the NVSM run from round 0, or restore it")
    if not isinstance(done, dict) or not {"round", "step"} <= set(done):
        raise ValueError(f"{path}: expected {{'round': r, 'step': s}}, got {done!r}; delete it "
                         "to restart the NVSM run from round 0")
    return done


def _write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _round_path(workdir, r):
    return os.path.join(workdir, "pseudo_labels", f"round_{r:03d}.npz")


def _m_step(config, state, train_step, data: PoseSet, start: int, num_steps: int, round_index,
            mesh_axes, writer, progress: bool):
    """CoKe steps ``start .. start + num_steps`` on ``data`` (batches keyed by round)."""

    augment = pipeline.augment_from_config(config.get("augment"))
    batches = pipeline.BatchIterator(data, config.batch_size, seed=config.seed * 1000 + round_index,
                                     augment=augment)
    keys = ("image", "pose", "focal", "principal")
    steps = range(start, start + num_steps)
    if progress:
        steps = training.progress_bar(steps, desc=f"round {round_index} M-step")
    timer = training.Throughput()
    for s in steps:
        batch = {k: v for k, v in batches.batch(s - start).items() if k in keys}
        state, metrics = train_step(state, parallel.shard_batch(batch, mesh_axes),
                                    training.step_key(config.seed, s))
        parallel.wait_if_cpu_collectives((state, metrics), mesh_axes)
        if (s + 1) % config.log_every == 0:
            writer.write(s + 1, round=round_index, images_per_s=timer.tick(config.log_every * config.batch_size),
                         **jax.device_get(metrics))
    return state


def _round_sources(config, fn, labelled: PoseSet, unlabelled, pool_maps, pl, round_index: int):
    """The E-step's sources: the anchors, then the pseudo-labelled images ``pl``
    (only last round's with ``estep.frontier_only``), then their mirror images
    with ``estep.mirror_sources``. Returns (maps, poses, focal, principal, ids,
    is_labelled) with one row per source."""
    maps = np.concatenate([extract_features(fn, labelled.images, config.eval_batch_size),
                           pool_maps[pl.index]])
    poses = np.concatenate([labelled.poses, pl.poses])
    focal = np.concatenate([labelled.focal, unlabelled.focal[pl.index]])
    principal = np.concatenate([labelled.principal, unlabelled.principal[pl.index]])
    ids = np.concatenate([np.arange(len(labelled)), pl.index])
    is_labelled = np.concatenate([np.ones(len(labelled), bool), np.zeros(len(pl), bool)])
    images = np.concatenate([labelled.images, unlabelled.images[pl.index]])
    if config.estep.frontier_only and round_index > 1:
        keep = np.concatenate([np.zeros(len(labelled), bool), pl.round == round_index - 1])
        if keep.any():
            maps, poses, focal, principal, ids, is_labelled, images = (
                a[keep] for a in (maps, poses, focal, principal, ids, is_labelled, images))
    if config.estep.get("mirror_sources"):
        return mirrored_sources(fn, config.eval_batch_size, images, maps, poses, focal,
                                principal, ids, is_labelled)
    return maps, poses, focal, principal, ids, is_labelled


def schedule_steps(config) -> int:
    """Optimiser steps of a whole NVSM run, the learning-rate schedule's horizon:
    round 0 (``initial_steps``) plus ``num_rounds`` M-steps of ``steps_per_round``."""
    return int(config.initial_steps) + int(config.num_rounds) * int(config.steps_per_round)


def run_nvsm(config, workdir, *, train_set: PoseSet | None = None, model_mesh=None,
             test_sets: dict | None = None, num_devices: int | None = None,
             stop_after_rounds: int | None = None, progress: bool = True) -> dict:
    """NVSM per ``config`` into ``workdir``; resumes from ``progress.json``.

    train_set / model_mesh / test_sets ({"L0": PoseSet, ...}): given directly
    (tests, notebooks) or loaded from ``config.data_root`` / ``config.test_root``.
    The learning-rate schedule spans the run (:func:`schedule_steps`), not
    ``config.num_steps``.
    stop_after_rounds: stop after finishing this many rounds in this call
    (simulates a kill). Returns ``{"rounds": [...], "pseudo_labels":
    PseudoLabels, "state": TrainState, "test": {occ: metrics}}``.
    """
    config_checks.check_config(config)
    workdir = os.fspath(workdir)
    os.makedirs(os.path.join(workdir, "pseudo_labels"), exist_ok=True)
    config = copy.deepcopy(config)
    config.num_steps = schedule_steps(config)   # the learning-rate schedule spans the whole run
    training.save_config(config, workdir)
    if train_set is None:
        train_set = loaders.load_pose_set(config.data_root, config.category, "L0")
        model_mesh = loaders.load_model_mesh(config.data_root, config.category)
    if test_sets is None:
        test_sets = {}
        if config.get("test_root"):
            for occ in config.eval_occlusions:
                test_sets[occ] = loaders.load_pose_set(config.test_root, config.category, occ,
                                                       limit=config.get("eval_limit"))
    split = fewshot.split_from_config(train_set, int(config.num_labelled), config)
    labelled, unlabelled = split.labelled, split.unlabelled
    hidden = fewshot.hidden_poses(train_set, unlabelled.names)   # reporting only

    mesh_axes = parallel.make_mesh(num_devices or config.get("num_devices"))
    model = train.build_model(config)
    image_hw = train_set.image_size
    state = train.init_state(config, model, len(model_mesh.verts), image_hw, mesh_axes)
    ckpt = training.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=10 ** 9,
                                 max_to_keep=3)
    state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
    train_step = train.make_train_step(config, model, model_mesh, image_hw, state_sharding,
                                       mesh_axes)
    writer = training.MetricsWriter(workdir)
    round_log = training.MetricsWriter(workdir, "rounds.jsonl")
    stride = config.model.stride
    solver_cfg = pose_solver.SolverConfig.from_dict(config.solver.to_dict())

    done = load_progress(workdir)
    pl = pseudo_labels.PseudoLabels.empty()
    rounds = [r for r in round_log.read()] if done else []
    if done:
        state = ckpt.restore(state, step=done["step"])
        if done["round"] > 0:
            pl = pseudo_labels.PseudoLabels.from_dict(np.load(_round_path(workdir, done["round"])))
        rounds = [r for r in rounds if r["round"] <= done["round"]]
        next_round, step = done["round"] + 1, done["step"]
        log.info("resuming after round %d (step %d, %d pseudo-labels)", done["round"], step, len(pl))
    else:
        next_round, step = 0, 0

    # reselect: the anchors alone synthesise, every pool image competes again and the
    # round's best max_new * r replace the set (a wrong label can be dropped)
    reselect = bool(config.estep.get("reselect"))
    finished_this_call = 0
    for r in range(next_round, config.num_rounds + 1):
        if stop_after_rounds is not None and finished_this_call >= stop_after_rounds:
            break
        t0 = time.time()
        new, dropped = pseudo_labels.PseudoLabels.empty(), 0
        e_seconds, num_views = 0.0, 0
        if r > 0:
            estep_cfg = config.estep
            candidates = np.ones(len(unlabelled), bool)
            src_pl = pseudo_labels.PseudoLabels.empty() if reselect else pl
            if reselect:
                estep_cfg = copy.deepcopy(config.estep)
                estep_cfg.max_new = int(config.estep.max_new) * r
            else:
                candidates[pl.index] = False
            nemo = train.nemo_model(config, model, state, model_mesh)
            fn = train.feature_fn(nemo)
            pool_maps = extract_features(fn, unlabelled.images, config.eval_batch_size)
            src_maps, src_poses, src_focal, src_principal, src_ids, src_lab = _round_sources(
                config, fn, labelled, unlabelled, pool_maps, src_pl, r)
            clutter = feat.clutter_prototype(state.aux.clutter)
            result = e_step(estep_cfg, source_maps=src_maps, source_poses=src_poses,
                            source_focal=src_focal, source_principal=src_principal,
                            source_ids=src_ids, source_is_labelled=src_lab, pool_maps=pool_maps,
                            candidates=candidates, model_mesh=model_mesh, stride=stride,
                            round_index=r, mesh_axes=mesh_axes,
                            solver_inputs=(state.aux.vertex, clutter, solver_cfg))
            new, e_seconds, num_views = result.new, result.seconds, result.num_views
            del pool_maps, src_maps
            if reselect:
                dropped = int(np.sum(~np.isin(pl.index, new.index)))
                pl, new = new, new.take(~np.isin(new.index, pl.index))
            else:
                pl = pl.extend(new)
            if len(new) == 0:
                log.info("round %d: nothing new passes; stopping", r)
        if r == 0 or len(new) > 0:
            data = training_set(labelled, unlabelled, pl, config.labelled_min_fraction)
            n_steps = config.initial_steps if r == 0 else config.steps_per_round
            state = _m_step(config, state, train_step, data, step, n_steps, r, mesh_axes, writer,
                            progress)
            step += n_steps
        # record the round
        err = evaluation.rotation_errors(pl.poses, hidden[pl.index]) if len(pl) else np.zeros(0)
        new_err = evaluation.rotation_errors(new.poses, hidden[new.index]) if len(new) else np.zeros(0)
        entry = {"round": r, "step": step, "num_pseudo": len(pl), "num_new": len(new),
                 "num_dropped": dropped,
                 "precision": float(np.mean(err < np.pi / 6)) if len(err) else None,
                 "precision_new": float(np.mean(new_err < np.pi / 6)) if len(new_err) else None,
                 "coverage": pseudo_labels.coverage(np.concatenate([labelled.poses, pl.poses])),
                 "num_views": num_views, "estep_seconds": e_seconds,
                 "round_seconds": time.time() - t0}
        if config.get("eval_every_round") and "L0" in test_sets:
            res = train.evaluate_nemo(train.nemo_model(config, model, state, model_mesh),
                            {"L0": test_sets["L0"]}, solver_cfg, config.eval_batch_size)
            entry.update({f"test_{k}": v for k, v in res["L0"].items()
                          if k in ("acc_pi_6", "acc_pi_18", "med_err_deg")})
        ckpt.save(step, state)
        ckpt.wait()
        np.savez(_round_path(workdir, r), **pl.to_dict())
        _write_json_atomic(os.path.join(workdir, "progress.json"), {"round": r, "step": step})
        round_log.write(step, **{k: v for k, v in entry.items() if k != "step"})
        rounds.append({**entry})
        finished_this_call += 1
        log.info("round %d: %s", r, {k: v for k, v in entry.items() if k != "round"})
        if r > 0 and len(new) == 0:
            break
        if r > 0 and len(pl) == len(unlabelled):
            break
    ckpt.close()
    out = {"rounds": rounds, "pseudo_labels": pl, "state": state, "labelled": labelled,
           "unlabelled": unlabelled, "hidden": hidden}
    if stop_after_rounds is None and test_sets:
        out["test"] = train.evaluate_nemo(train.nemo_model(config, model, state, model_mesh), test_sets, solver_cfg,
                                config.eval_batch_size)
    return out
