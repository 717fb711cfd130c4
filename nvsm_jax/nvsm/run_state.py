"""An NVSM run's state in its workdir: what lets a killed run resume and never lose a round.

The files, each written atomically (a temporary file, then a rename) by process 0:

* ``pseudo_labels/estep_RRR.npz``: round R's E-step (:class:`RoundResult`), stored before
  its M-step, so a run killed inside the M-step resumes it from its last checkpoint
  instead of redoing the E-step (:func:`stage_estep`, :func:`load_staged_estep`);
* ``pseudo_labels/round_RRR.npz``: every pseudo-label after round R (:func:`load_round`);
* ``rounds.jsonl``: one entry per finished round (:func:`round_log_entries` drops the
  entries a kill left past ``progress.json``);
* ``progress.json``: ``{"round": r, "step": s}`` of the last finished round, written last
  (:func:`record_round`), with ``"stopped": true`` when the run ended there early.

:func:`resume_point` reads where to go on from ``progress.json`` and the latest
checkpoint. A damaged or inconsistent file raises
:class:`nvsm_jax.errors.RunStateError` naming it and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np

from nvsm_jax import parallel, training, workdir_lock
from nvsm_jax.nvsm import pseudo_labels
from nvsm_jax.errors import RunStateError
from nvsm_jax.training import START_OVER, load_progress   # the record NeMo reads too

log = logging.getLogger(__name__)

__all__ = ["RoundResult", "START_OVER", "load_progress", "write_json_atomic", "savez_atomic",
           "round_path", "load_round", "round_log_entries", "resume_point", "record_round",
           "staged_path", "stage_estep", "load_staged_estep"]


@dataclasses.dataclass
class RoundResult:
    """What one E-step produced (host arrays)."""

    new: pseudo_labels.PseudoLabels
    num_views: int
    seconds: float
    agreement: float | None = None    # the safeguard's agreement rate over the images it
    #                                   checked (None: the safeguard is off)
    matched_poses: np.ndarray | None = None   # [M, 4] the matched poses before refinement
    #                                           (None: not refined)


def write_json_atomic(path, obj):
    """``obj`` as JSON into ``path`` through a temporary file (a kill leaves the old
    file or the new one); a full disk names ``path``."""
    with workdir_lock.naming(path):
        training.write_atomic(path, lambda f: json.dump(obj, f, indent=1), fsync=True)


def savez_atomic(path, **arrays):
    """``np.savez(path, **arrays)`` through a temporary file (a kill leaves the old
    file or the new one, never a torn one); a full disk names ``path``."""
    with workdir_lock.naming(path):
        training.write_atomic(path, lambda f: np.savez(f, **arrays), binary=True, fsync=True,
                              suffix=".tmp.npz")


def round_path(workdir, r):
    return os.path.join(workdir, "pseudo_labels", f"round_{r:03d}.npz")


def load_round(workdir, r) -> pseudo_labels.PseudoLabels:
    """The pseudo-labels after round ``r`` (``pseudo_labels/round_XXX.npz``); a missing
    or damaged file raises RunStateError naming it."""
    path = round_path(workdir, r)
    try:
        with np.load(path) as d:
            pl = pseudo_labels.PseudoLabels.from_dict(d)
        if pl.poses.shape != (len(pl), 4):
            raise ValueError(f"poses of shape {pl.poses.shape} for {len(pl)} labels")
    except Exception as err:  # noqa: BLE001 - any damage: name the file
        missing = isinstance(err, FileNotFoundError)
        # numpy reads random bytes as a pickle and suggests allow_pickle: never the fix here
        cause = "" if missing or "pickle" in str(err) else f" ({type(err).__name__}: " \
            f"{str(err)[:200]})"
        raise RunStateError(
            f"{path}: the pseudo-labels after round {r}, which progress.json records as "
            f"finished, are {'missing' if missing else 'damaged: not an npz file of this run'}"
            f"{cause}; restore the file, or start the NVSM "
            "run over (delete progress.json, rounds.jsonl, pseudo_labels/ and checkpoints/)"
        ) from err
    return pl


def round_log_entries(path, done: dict | None) -> list[dict]:
    """The entries of ``rounds.jsonl`` that ``progress.json`` (``done``) covers, one per
    round in round order: entries of rounds past ``done`` (written before a kill
    stopped the round's progress.json) and a torn last line are dropped, and the file
    is rewritten without them (process 0). A damaged line elsewhere raises
    RunStateError naming the file and the line; a missing round is warned about."""
    last = -1 if done is None else done["round"]
    lines = []
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f.read().split("\n") if line.strip()]
    by_round, dropped = {}, 0
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
            if not (isinstance(entry, dict) and type(entry.get("round")) is int):
                raise ValueError("not an object with an integer 'round'")
        except ValueError as err:
            if i == len(lines) - 1:             # torn by a kill while appending
                log.warning("%s: dropping its damaged last line (a run killed while "
                            "writing it)", path)
                dropped += 1
                continue
            raise RunStateError(
                f"{path}: line {i + 1} is damaged ({err}); fix or delete that line (the "
                "report then lacks that round), or restore the file") from err
        if entry["round"] > last:
            dropped += 1
            continue
        dropped += entry["round"] in by_round
        by_round[entry["round"]] = entry
    missing = sorted(set(range(last + 1)) - set(by_round))
    if missing:
        log.warning("%s: no entry for round(s) %s, which progress.json records as finished; "
                    "the report leaves them out", path, missing)
    entries = [by_round[r] for r in sorted(by_round)]
    if dropped and parallel.is_main_process():
        with workdir_lock.naming(path):
            training.write_atomic(path, lambda f: f.writelines(json.dumps(e) + "\n"
                                                               for e in entries))
    return entries


def resume_point(config, done: dict | None, latest: int | None,
                  ckpt_dir: str) -> tuple[int, int, int | None]:
    """``(next_round, step, mid_round)``: the round to run next, the step it starts
    at, and the checkpoint inside its M-step to resume from (None: none), from
    ``progress.json`` (``done``) and the latest checkpoint step. A checkpoint past the
    end of that round means the two do not belong together (progress.json lost or
    replaced): RunStateError."""
    next_round, step = (done["round"] + 1, done["step"]) if done else (0, 0)
    if done and done.get("stopped"):        # ended early: a rerun runs no further round
        next_round = config.num_rounds + 1
    mid_round = latest if latest is not None and latest > step else None
    round_end = step + (config.initial_steps if next_round == 0 else config.steps_per_round)
    if mid_round is not None and (mid_round > round_end or next_round > config.num_rounds):
        raise RunStateError(
            f"{ckpt_dir}: holds step {mid_round}, past the end of round {next_round} (step "
            f"{round_end}) where progress.json ({'missing' if done is None else done}) resumes; "
            "restore progress.json, or start the NVSM run over (delete progress.json, "
            "rounds.jsonl, pseudo_labels/ and checkpoints/)")
    return next_round, step, mid_round


def record_round(workdir, round_log, r: int, step: int, pl: pseudo_labels.PseudoLabels,
                  entry: dict, stopped: bool = False) -> None:
    """Writes round ``r``'s run state (process 0), each file atomically and in this
    order: the pseudo-labels (``round_XXX.npz``), the ``rounds.jsonl`` entry, then
    ``progress.json``, which makes the round finished (``stopped``: and the run, before
    ``num_rounds``); the staged E-step goes last. A
    kill between any two leaves the round unfinished, redone on resume (which drops
    its early log entry, :func:`round_log_entries`), so the report never loses it."""
    if not parallel.is_main_process():     # run state: one writer, read back by every process
        return
    savez_atomic(round_path(workdir, r), **pl.to_dict())
    with workdir_lock.naming(round_log.path):
        round_log.write(step, **{k: v for k, v in entry.items() if k != "step"})
    write_json_atomic(os.path.join(workdir, "progress.json"),
                       {"round": r, "step": step, **({"stopped": True} if stopped else {})})
    if os.path.exists(staged_path(workdir, r)):
        os.remove(staged_path(workdir, r))


def staged_path(workdir, r):
    return os.path.join(workdir, "pseudo_labels", f"estep_{r:03d}.npz")


def stage_estep(workdir, r, result: RoundResult) -> None:
    """Stores round ``r``'s E-step before its M-step, so a run killed in the M-step
    resumes it from its last checkpoint instead of repeating the E-step."""
    extra = {} if result.matched_poses is None else {"matched_poses": result.matched_poses}
    savez_atomic(staged_path(workdir, r), **result.new.to_dict(), num_views=result.num_views,
                  seconds=result.seconds,
                  agreement=np.nan if result.agreement is None else result.agreement, **extra)


def load_staged_estep(workdir, r) -> RoundResult | None:
    path = staged_path(workdir, r)
    if not os.path.exists(path):
        return None
    try:
        d = dict(np.load(path))
        agreement = float(d["agreement"]) if "agreement" in d else float("nan")
        return RoundResult(pseudo_labels.PseudoLabels.from_dict(d), int(d["num_views"]),
                           float(d["seconds"]), None if np.isnan(agreement) else agreement,
                           d.get("matched_poses"))
    except Exception as err:  # noqa: BLE001 - any damage means: redo the E-step
        raise RunStateError(f"{path}: damaged stored E-step ({type(err).__name__}: "
                            f"{str(err)[:200]}); delete it, and the checkpoints/ steps past "
                            f"progress.json's, to redo the E-step of round {r}") from err
