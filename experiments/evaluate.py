"""Evaluates a trained NeMo workdir on a test root (all occlusion levels found).

    python -m experiments.evaluate --workdir runs/nemo_car --data data/synthetic/test
    python -m experiments.evaluate --workdir runs/nemo_car --data data/synthetic/test \\
        --solver reference --limit 50
    python -m experiments.evaluate --workdir runs/nemo_car --top_k 3 --out runs/nemo_car/top3

Writes ``WORKDIR/results.json`` (``{"rows": [...]}``, accuracies in percent),
``results.md``, ``errors.npz`` and ``error_distribution.png``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A train_nemo workdir.", required=True)
flags.DEFINE_string("data", None, "Test root (default: config.test_root).")
flags.DEFINE_string("solver", "config", "'config' (the workdir's config.solver), 'reference' "
                    "(NeMo's 300 steps) or 'fast'.")
flags.DEFINE_integer("limit", None, "At most this many images per occlusion level.")
flags.DEFINE_integer("top_k", None, "Refine the best k grid poses per image (default: the "
                     "solver setting's).")
flags.DEFINE_list("occlusions", None, "Levels to evaluate (default config.eval_occlusions).")
flags.DEFINE_string("method", "NeMo", "Method name in the rows.")
flags.DEFINE_string("out", None, "Output directory (default: the workdir).")


def evaluate_workdir(workdir, data_root=None, *, solver: str = "config", limit=None,
                     occlusions=None, method: str = "NeMo", out_dir=None,
                     nemo=None, top_k: int | None = None) -> list[dict]:
    """Runs NeMo inference on every available level; returns the rows written."""
    from nvsm_jax import evaluation, pose_solver, train
    from nvsm_jax.data import loaders

    nemo = nemo or train.load_model(workdir)
    cfg = nemo.config
    data_root = data_root or cfg.test_root
    out_dir = out_dir or workdir
    os.makedirs(out_dir, exist_ok=True)
    if solver == "config":
        scfg = pose_solver.SolverConfig.from_dict(cfg.solver.to_dict())
    elif solver == "reference":
        scfg = pose_solver.REFERENCE
    elif solver == "fast":
        scfg = pose_solver.FAST
    else:
        raise ValueError(f"unknown solver setting {solver!r}")
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        scfg = dataclasses.replace(scfg, top_k=top_k)
    annotations = cfg.get("num_labelled") or "all"
    limit = limit if limit is not None else cfg.get("eval_limit")
    rows, errors, timing = [], {}, {}
    for occ in (occlusions or cfg.get("eval_occlusions") or ("L0",)):
        try:
            test = loaders.load_pose_set(data_root, cfg.category, occ, limit=limit)
        except (FileNotFoundError, OSError, ValueError) as err:
            logging.warning("skipping %s %s: %s", cfg.category, occ, err)
            continue
        t = time.perf_counter()
        res = train.predict(nemo, test, scfg, batch_size=cfg.get("eval_batch_size", 16),
                            progress=True)
        timing[occ] = {"images": len(test), "seconds": time.perf_counter() - t}
        err = evaluation.rotation_errors(res.pose, test.poses)
        errors[(method, cfg.category, annotations, occ)] = err
        rows.append(evaluation.make_row(method, cfg.category, annotations, occ, err))
        logging.info("%s %s: %s", cfg.category, occ, rows[-1])
        np.savez(os.path.join(out_dir, f"predictions_{occ}.npz"), names=np.asarray(test.names),
                 pred=res.pose, gt=test.poses, score=res.score, init=res.init_pose, error=err)
    rows += evaluation.mean_rows(rows, errors)
    evaluation.write_results(out_dir, rows, extra={"solver": scfg.__dict__ | {
        "elevations": list(scfg.elevations), "thetas": list(scfg.thetas)}, "timing": timing})
    evaluation.plot_error_distribution({k[3]: v for k, v in errors.items()},
                                       os.path.join(out_dir, "error_distribution.png"),
                                       title=f"{method} {cfg.category} ({annotations} labels)")
    print(evaluation.rows_to_markdown(rows))
    return rows


def main(argv):
    del argv
    from nvsm_jax import training

    training.quiet_checkpoint_logs()
    evaluate_workdir(FLAGS.workdir, FLAGS.data, solver=FLAGS.solver, limit=FLAGS.limit,
                     occlusions=FLAGS.occlusions, method=FLAGS.method, out_dir=FLAGS.out,
                     top_k=FLAGS.top_k)


if __name__ == "__main__":
    app.run(main)
