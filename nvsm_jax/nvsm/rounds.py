"""NVSM's EM rounds: E-step, M-step, record, until the pose space is covered.

``run_nvsm(config, workdir)`` composes the pieces and computes nothing itself: after
:func:`start_run` (checks, data, model) and :func:`resume`, each round is
:func:`e_step_for_round`, :func:`m_step_for_round`, :func:`record_round`; the run's
files are :mod:`nvsm_jax.nvsm.run_state`'s.

* **Round 0 (initial M-step).** CoKe training (:mod:`nvsm_jax.nemo.train`) on the
  labelled images only; optionally starting from a self-supervised pre-trained
  backbone (``config.pretrain_workdir``).
* **E-step** (:mod:`nvsm_jax.nvsm.estep`). Pseudo-labels accumulate and
  pseudo-labelled images become sources.
* **M-step.** CoKe training on labelled + pseudo-labelled images
  (:func:`training_set`), continuing the same TrainState (params, Adam state and the
  vertex/clutter memory).
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
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from nvsm_jax import meshes, parallel, training, workdir_lock
from nvsm_jax.data import PoseSet, fewshot, loaders, pipeline
from nvsm_jax.errors import RunStateError
from nvsm_jax.nemo import features as feat
from nvsm_jax.nemo import train
from nvsm_jax.nemo.settings import NemoConfig
from nvsm_jax.nvsm import config_checks as nvsm_checks
from nvsm_jax.nvsm import pseudo_labels, run_state
from nvsm_jax.nvsm.estep import (EStepConfig, Pool, SolverInputs, e_step, pool_features,
                                 round_sources)
from nvsm_jax.nvsm.run_state import RoundResult, load_progress

log = logging.getLogger(__name__)

__all__ = ["NVSMRun", "RunPosition", "training_set", "schedule_steps", "start_run", "resume",
           "e_step_for_round", "m_step_for_round", "round_entry", "record_round", "run_nvsm",
           "load_progress", "RoundResult"]


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
    augment = pipeline.augment_from_config(run.nemo.augment)
    batches = pipeline.BatchIterator(data, config.batch_size, seed=config.seed * 1000 + round_index,
                                     augment=augment)
    keys = ("image", "pose", "focal", "principal")
    return training.fit(          # each process reads only its rows of every batch
        state, run.train_step,
        lambda s, rows: {k: v for k, v in batches.batch(s - round_start, rows).items()
                         if k in keys},
        run.mesh, training.StepRange(begin, end, total=round_end), seed=config.seed,
        batch_size=config.batch_size,
        log=training.LoopLog(run.writer, config.log_every, progress=run.progress,
                             desc=f"round {round_index} M-step", extra={"round": round_index}),
        ckpt=run.ckpt)


def schedule_steps(config) -> int:
    """Optimiser steps of a whole NVSM run, the learning-rate schedule's horizon:
    round 0 (``initial_steps``) plus ``num_rounds`` M-steps of ``steps_per_round``."""
    return int(config.initial_steps) + int(config.num_rounds) * int(config.steps_per_round)


@dataclasses.dataclass
class NVSMRun:
    """What every round of one NVSM run shares, set up once by :func:`start_run`."""

    config: Any                     # the run's config (``num_steps`` = the whole schedule)
    nemo: NemoConfig                # its NeMo settings: the model, CoKe, the solver
    workdir: str
    estep: EStepConfig
    labelled: PoseSet               # the anchors, at their labels
    unlabelled: PoseSet             # the pool (its poses are never read)
    hidden: np.ndarray              # the pool's hidden poses [N, 4]: reports and oracle rows only
    test_sets: dict                 # {"L0": PoseSet, ...}
    object_mesh: meshes.Mesh
    mesh: Any                  # the device mesh
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


def start_run(config, workdir, *, train_set: PoseSet | None = None, object_mesh=None,
              test_sets: dict | None = None, num_devices: int | None = None,
              progress: bool = True) -> tuple[NVSMRun, Any]:
    """Checks ``config``, loads the data (unless given), records ``config.json`` and
    builds the model, its fresh TrainState, the checkpointer and the logs ->
    ``(run, state)``."""
    nvsm_checks.check_config(config)
    workdir = os.fspath(workdir)
    config = copy.deepcopy(config)
    config.num_steps = schedule_steps(config)   # the learning-rate schedule spans the whole run
    if train_set is None:
        train_set = loaders.load_pose_set(config.data_root, config.category, "L0",
                                          lazy_images=jax.process_count() > 1)  # own rows only
        object_mesh = loaders.load_model_mesh(config.data_root, config.category,
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

    mesh = parallel.make_mesh(num_devices or config.num_devices)
    nemo = NemoConfig.of(config)            # the typed settings, built once
    model = train.build_model(nemo.model)
    image_hw = train_set.image_size
    state = train.init_state(nemo, model, len(object_mesh.verts), image_hw, mesh)
    state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
    run = NVSMRun(
        config=config, nemo=nemo, workdir=workdir, estep=EStepConfig.from_config(config.estep),
        labelled=split.labelled, unlabelled=split.unlabelled, hidden=hidden,
        test_sets=test_sets, object_mesh=object_mesh, mesh=mesh, model=model,
        train_step=train.make_train_step(nemo, model, object_mesh, image_hw, state_sharding,
                                         mesh),
        ckpt=training.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                                   max_to_keep=max(1, int(config.keep_checkpoints))),
        writer=training.MetricsWriter(workdir),
        round_log=training.MetricsWriter(workdir, "rounds.jsonl"), progress=progress)
    return run, state


def resume(run: NVSMRun, state) -> RunPosition:
    """Where the run in ``run.workdir`` stopped (:mod:`nvsm_jax.nvsm.run_state`): after a
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
        fn = train.feature_fn(train.nemo_model(run.nemo, run.model, at.state, run.object_mesh))
        log.info("round %d E-step: feature maps of %d pool images", r, len(unlabelled))
        # each process: the feature maps of its own rows of the pool
        pool_maps, rows = pool_features(fn, unlabelled.images, config.eval_batch_size,
                                        run.mesh)
        candidates = np.ones(len(unlabelled), bool)
        candidates[pl.index] = False
        pool = Pool(pool_maps, unlabelled.focal, unlabelled.principal, candidates, rows)
        result = e_step(run.estep, round_sources(config, fn, labelled, unlabelled, pool, pl,
                                                     run.mesh),
                        pool, object_mesh=run.object_mesh, stride=run.nemo.model.stride,
                        round_index=r, mesh=run.mesh,
                        solver=SolverInputs(at.state.aux.vertex,
                                            feat.clutter_prototype(at.state.aux.clutter),
                                            run.nemo.solver))
        del pool_maps, pool
        oracle = str(config.nvsm_oracle)    # checked by check_config
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
    (:func:`nvsm_jax.nvsm.run_state.record_round`). Returns True when the run stops here:
    nothing new passed, or the pool is used up."""
    config = run.config
    entry = {**round_entry(run, at, r, result), "round_seconds": time.time() - started}
    if config.eval_every_round and "L0" in run.test_sets:
        res = train.evaluate_nemo(train.nemo_model(run.nemo, run.model, at.state, run.object_mesh),
                                  {"L0": run.test_sets["L0"]})
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
def run_nvsm(config, workdir, *, train_set: PoseSet | None = None, object_mesh=None,
             test_sets: dict | None = None, num_devices: int | None = None,
             stop_after_rounds: int | None = None, stop_after_steps: int | None = None,
             progress: bool = True) -> dict:
    """NVSM per ``config`` into ``workdir``; resumes from ``progress.json`` and the
    latest checkpoint, also from inside a round's M-step. Holds the workdir
    (:func:`nvsm_jax.workdir_lock.hold`: another live run there is refused).

    train_set / object_mesh / test_sets ({"L0": PoseSet, ...}): given directly
    (tests, notebooks) or loaded from ``config.data_root`` / ``config.test_root``.
    The learning-rate schedule spans the run (:func:`schedule_steps`; the recorded
    ``config.json`` holds that as ``num_steps``). Checkpoints: every
    ``config.checkpoint_every`` steps and at the end of every round, the last
    ``config.keep_checkpoints`` kept.
    stop_after_rounds / stop_after_steps: stop after finishing this many rounds,
    or optimiser steps, in this call (simulates a kill). Returns ``{"rounds":
    [...], "pseudo_labels": PseudoLabels, "state": TrainState, "test": {occ: metrics}}``.
    """
    run, state = start_run(config, workdir, train_set=train_set, object_mesh=object_mesh,
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
            train.nemo_model(run.nemo, run.model, at.state, run.object_mesh), run.test_sets)
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
