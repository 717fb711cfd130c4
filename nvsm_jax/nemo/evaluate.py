"""NeMo render-and-compare evaluation of a trained workdir (the body of ``nvsm-evaluate``).

:func:`evaluate_workdir` restores a NeMo or NVSM workdir's latest checkpoint
(:func:`nvsm_jax.nemo.train.load_model`), runs the pose solver on every level of a
test root, and writes ``results.json`` / ``results.md`` (the ACC@pi/6, ACC@pi/18 and
median-error rows), ``predictions_<level>.npz`` and ``error_distribution.png``.
:func:`checkpoint_record` says which checkpoint that was and whether its run had
finished (:func:`nvsm_jax.nemo.predict` reads it too).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np

from nvsm_jax import evaluation, results, training
from nvsm_jax.data import loaders
from nvsm_jax.errors import NonFiniteError
from nvsm_jax.nemo import pose_solver
from nvsm_jax.nemo.train import NemoModel, load_model, predict
from nvsm_jax.workdir_lock import locked

log = logging.getLogger(__name__)

__all__ = ["evaluate_workdir", "checkpoint_record", "final_step"]


def final_step(workdir, config) -> int:
    """The step a finished run of ``workdir`` ends at: ``config.num_steps``, or, for an
    NVSM run that ended early (its ``progress.json`` records ``stopped``: nothing new
    passed, or the pool was used up; older records: a last round with nothing new),
    that round's step (:func:`nvsm_jax.training.load_progress`; NeMo imports no NVSM
    code)."""
    final = int(config.num_steps or 0)
    done = training.load_progress(workdir)
    if done is None:
        return final
    last = (training.MetricsWriter(workdir, "rounds.jsonl", tensorboard=False).read()
            or [{}])[-1]
    if done.get("stopped") or (last.get("round") == done["round"] and done["round"] > 0
                               and last.get("num_new") == 0):
        final = int(done["step"])
    return final


def checkpoint_record(workdir, nemo: NemoModel) -> dict:
    """``{"step", "final_step", "finished"}`` of the model to evaluate (all None for a
    live model). Logs which checkpoint is evaluated, with a warning when the run
    stopped before its last step; refuses non-finite weights (NonFiniteError)."""
    step = nemo.step
    leaf = training.nonfinite_leaf({"variables": nemo.variables, "memory": nemo.memory})
    if leaf is not None:
        raise NonFiniteError(
            f"{workdir}: the model of checkpoint step {step} holds NaN or infinite values "
            f"({leaf}): its training diverged; nothing evaluated. Train again in a new "
            "workdir with a lower optim.lr or a higher loss.temperature")
    if step is None:
        return {"step": None, "final_step": None, "finished": None}
    final = final_step(workdir, nemo.config)
    if step < final:
        log.warning("%s: evaluating checkpoint step %d, before the run's last step %d: the "
                    "run was stopped (or is still running); rerun its training command to "
                    "finish it", workdir, step, final)
    else:
        log.info("%s: evaluating checkpoint step %d, the run's last step", workdir, step)
    return {"step": int(step), "final_step": final, "finished": bool(step >= final)}


@dataclasses.dataclass
class _Evaluation:
    """What :func:`_evaluate_levels` gathers for :func:`_write_outputs`."""

    rows: list = dataclasses.field(default_factory=list)
    errors: dict = dataclasses.field(default_factory=dict)     # row key -> errors [N]
    timing: dict = dataclasses.field(default_factory=dict)
    missing: dict = dataclasses.field(default_factory=dict)    # level -> why
    skipped: dict = dataclasses.field(default_factory=dict)    # level -> bad images
    preds: dict = dataclasses.field(default_factory=dict)      # level -> arrays
    test_data: dict = dataclasses.field(default_factory=dict)  # level -> fingerprint


def _evaluate_levels(nemo: NemoModel, data_root, levels, solver_cfg, *, method: str, limit,
                     skip_bad: bool) -> _Evaluation:
    """The pose solver on each level of ``data_root`` that the root holds."""
    cfg = nemo.config
    num_labelled = cfg.num_labelled or "all"     # the rows' "annotations" column
    ev = _Evaluation()
    subsets = {occ: loaders.subset_name(cfg.category, occ) for occ in levels}  # bad names raise
    for occ in levels:
        sub = subsets[occ]
        if not any(os.path.isdir(os.path.join(data_root, d, sub)) for d in ("lists", "annotations")):
            ev.missing[occ] = f"{data_root} has no {sub} subset (no lists/{sub} or annotations/{sub})"
            log.warning("row %s %s missing: %s", cfg.category, occ, ev.missing[occ])
            continue
        test = loaders.load_pose_set(data_root, cfg.category, occ, limit=limit, skip_bad=skip_bad)
        if skip_bad:
            listed = loaders.list_names(data_root, cfg.category, occ)
            listed = listed[:limit] if limit is not None else listed
            kept = set(test.names)
            ev.skipped[occ] = [n for n in listed if n not in kept]
        try:
            ev.test_data[occ] = results.data_fingerprint(data_root, cfg.category, occ, limit)
        except loaders.DataError:       # skip_bad: a listed file is missing
            ev.test_data[occ] = None
        t = time.perf_counter()
        log.info("evaluating on %d %s test images", len(test), occ)
        res = predict(nemo, test, solver_cfg, batch_size=cfg.eval_batch_size,
                      progress=True)
        ev.timing[occ] = {"images": len(test), "seconds": time.perf_counter() - t}
        err = evaluation.rotation_errors(res.pose, test.poses)
        ev.errors[(method, cfg.category, num_labelled, occ)] = err
        ev.rows.append(evaluation.make_row(method, cfg.category, num_labelled, occ, err))
        log.info("%s %s: %s", cfg.category, occ, ev.rows[-1])
        ev.preds[occ] = dict(names=np.asarray(test.names), pred=res.pose, gt=test.poses,
                             score=res.score, init=res.init_pose, error=err)
    return ev


def _write_outputs(out_dir, ev: _Evaluation, solver_cfg, checkpoint: dict, data_root,
                   title: str) -> list[dict]:
    """``results.json`` / ``results.md`` (rows and their means), the predictions and
    the error plot into ``out_dir``; predictions of other levels are removed."""
    os.makedirs(out_dir, exist_ok=True)
    written = {f"predictions_{occ}.npz" for occ in ev.preds}
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("predictions_") and name.endswith(".npz") and name not in written:
            log.warning("removing %s: its level is not in this evaluation",
                        os.path.join(out_dir, name))
            os.remove(os.path.join(out_dir, name))
    for occ, arrays in ev.preds.items():
        np.savez(os.path.join(out_dir, f"predictions_{occ}.npz"), **arrays)
    rows = ev.rows + evaluation.mean_rows(ev.rows, ev.errors)
    _, md_path = evaluation.write_results(out_dir, rows, extra={"solver": solver_cfg.__dict__ | {
        "elevations": list(solver_cfg.elevations), "thetas": list(solver_cfg.thetas)},
        "timing": ev.timing,
        "missing": ev.missing, "skipped": {k: v for k, v in ev.skipped.items() if v},
        "checkpoint": checkpoint,
        "test_data": {"root": os.path.abspath(data_root), "levels": ev.test_data}})
    notes = [f"- row {occ} missing: {why}" for occ, why in ev.missing.items()]
    if checkpoint["step"] is not None and not checkpoint["finished"]:
        notes.insert(0, f"- checkpoint step {checkpoint['step']}, before the run's last step "
                        f"{checkpoint['final_step']}: the run had not finished")
    notes += [f"- {occ}: {len(v)} bad image(s) skipped: {', '.join(v[:10])}"
              + (" ..." if len(v) > 10 else "") for occ, v in ev.skipped.items() if v]
    if notes:
        with open(md_path, "a") as f:
            f.write("\n" + "\n".join(notes) + "\n")
    log.info("drawing %s", os.path.join(out_dir, "error_distribution.png"))
    evaluation.plot_error_distribution({k[3]: v for k, v in ev.errors.items()},
                                       os.path.join(out_dir, "error_distribution.png"),
                                       title=title)
    print(evaluation.rows_to_markdown(rows) + ("\n" + "\n".join(notes) if notes else ""))
    return rows


@locked(arg=("out_dir", "workdir"))     # one run per workdir: the folder it writes into
def evaluate_workdir(workdir, data_root=None, *, solver: str = "config", limit=None,
                     occlusions=None, method: str = "NeMo", out_dir=None,
                     nemo=None, top_k: int | None = None, skip_bad: bool = False) -> list[dict]:
    """NeMo inference on every available level of ``data_root`` (default the config's
    ``test_root``); writes ``results.json`` / ``results.md``, ``predictions_<level>.npz``
    and ``error_distribution.png`` into ``out_dir`` (default the workdir) and returns
    the rows. The CLI is ``nvsm-evaluate``.

    A missing ``data_root`` raises FileNotFoundError; a level whose subset the root
    lacks is left out, and ``results.json`` (``"missing"``) and ``results.md`` say
    which and why; a bad test image or annotation raises DataError naming the file
    (``skip_bad``: it is skipped with a warning and listed under ``"skipped"``).
    With no level evaluated nothing is written (DataError). Outputs are written only
    after every level ran; ``predictions_*.npz`` of levels not in this run are removed
    so the folder never mixes runs.

    The latest checkpoint is evaluated: a run stopped before its last step (killed,
    or still running) is evaluated with a warning naming the step, and
    ``results.json`` records ``checkpoint`` (``step``, ``final_step``, ``finished``)
    and ``test_data`` (the root and each level's
    :func:`nvsm_jax.results.data_fingerprint`). A model with a NaN or infinite
    weight is refused (NonFiniteError naming the workdir and step)."""

    if data_root and not os.path.isdir(data_root):
        raise FileNotFoundError(f"{data_root}: test root not found; nothing written")
    nemo = nemo or load_model(workdir)
    cfg = nemo.config
    checkpoint = checkpoint_record(workdir, nemo)
    data_root = data_root or cfg.test_root
    out_dir = out_dir or workdir
    if not data_root or not os.path.isdir(data_root):
        raise FileNotFoundError(f"{data_root}: test root not found (pass --data, or set the "
                                "config's test_root; `nvsm-make-synthetic --out data/synthetic` "
                                "makes data/synthetic/test); nothing written")
    solver_cfg = pose_solver.settings_for(cfg, solver, top_k)
    levels = list(occlusions or cfg.eval_occlusions or ("L0",))
    ev = _evaluate_levels(nemo, data_root, levels, solver_cfg, method=method,
                          limit=limit if limit is not None else cfg.eval_limit,
                          skip_bad=skip_bad)
    if not ev.rows:
        raise loaders.DataError(f"{data_root}: no level of {cfg.category} to evaluate ("
                                + "; ".join(f"{k}: {v}" for k, v in ev.missing.items())
                                + "); nothing written")
    return _write_outputs(out_dir, ev, solver_cfg, checkpoint, data_root,
                          f"{method} {cfg.category} ({cfg.num_labelled or 'all'} labels)")
