"""How good is one E-step? Round-1 score tables of a stored model, per E-step setting.

Loads a NeMo workdir trained on the few-shot anchors (the model an NVSM run has
after round 0, e.g. ``python -m experiments.train_nemo --config nemo
--config.num_labelled=7 --config.num_steps=600 --workdir runs/r0_lite_7``), builds
the same split NVSM uses, extracts the pool's feature maps once, and for every
variant (an override of the ``estep`` block) computes the round-1 table (the
anchors and their mirror images x the whole pool) and
:func:`nvsm_jax.nvsm.pseudo_labels.table_report`: top-k precision, best-view accuracy
per 30-degree azimuth sector, the score gap between the right view and the chosen
wrong one, precision by the chosen view's distance error. Hidden poses are read
for the report only.

    python -m benchmarks.estep --workdir runs/r0_lite_7 --json runs/bench/estep.json \\
        --variants "base:;stride2:source_render_stride=2;..."

A variant is ``name:key=value,key=value`` (values parsed as Python literals).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import time

import numpy as np
from absl import app, flags

from benchmarks.common import print_table, write_json

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "NeMo workdir of the round-0 model", required=True)
flags.DEFINE_string("data", "", "training root (default: the workdir config's data_root)")
flags.DEFINE_string("variants", "base:", "semicolon-separated name:key=value,... overrides")
flags.DEFINE_string("json", "", "write the results here")
flags.DEFINE_integer("num_labelled", 0, "anchors (default: the workdir config's num_labelled)")
flags.DEFINE_integer("solver_steps", -1, "also the model's own render-and-compare prediction "
                     "per pool image: -1 off, 0 grid search only, > 0 Adam steps after it; "
                     "the report then gives the agreement rule's precision")
flags.DEFINE_bool("holdout", False, "also the E-step on its own anchors, each held out "
                  "(estep.holdout_check), and the pool precision above its scores")
flags.DEFINE_float("agree_deg", 30.0, "match and solver agree within this angle (degrees)")

DEFAULT_VARIANTS = "base:"


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """``"a:x=1,y=(0.9,1.0);b:"`` -> ``[("a", {"x": 1, "y": (0.9, 1.0)}), ("b", {})]``."""
    out = []
    for item in [t for t in text.split(";") if t.strip()]:
        name, _, body = item.partition(":")
        changes = {}
        depth, cur, parts = 0, "", []
        for ch in body:                      # split on commas outside brackets
            if ch in "([":
                depth += 1
            elif ch in ")]":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        for part in [p for p in parts if p.strip()]:
            key, _, value = part.partition("=")
            changes[key.strip()] = ast.literal_eval(value.strip())
        out.append((name.strip(), changes))
    return out


def holdout_report(hc, scores, view_poses, hidden, quantiles=(0.25, 0.5)) -> dict:
    """The held-out anchors' accuracy and, for score thresholds at ``quantiles`` of
    the right held-out anchors' best scores, how many pool images pass and their
    precision (hidden poses: reporting only)."""
    from nvsm_jax import geometry
    best = np.argmax(scores, axis=0)
    best_score = scores[best, np.arange(scores.shape[1])]
    right = geometry.pose_error(np.asarray(view_poses, np.float64)[best],
                                np.asarray(hidden, np.float64)) < np.pi / 6
    out = {"holdout_accuracy": hc.accuracy, "holdout_n": int(len(hc.right)),
           "holdout_right": hc.right.tolist(), "holdout_scores": hc.best_score.tolist()}
    for q in quantiles:
        tag = f"q{int(round(100 * q))}"
        if hc.right.any():
            thr = float(np.quantile(hc.best_score[hc.right], q))
            ok = best_score >= thr
            out[f"threshold@{tag}"] = thr
            out[f"pass@{tag}"] = int(ok.sum())
            out[f"P_pass@{tag}"] = float(np.mean(right[ok])) if ok.any() else None
        else:
            out[f"threshold@{tag}"], out[f"pass@{tag}"], out[f"P_pass@{tag}"] = None, 0, None
    return out


def main(argv):
    del argv
    import ml_collections

    from nvsm_jax.nemo import features as feat
    from nvsm_jax import geometry, parallel
    from nvsm_jax.nemo import pose_solver, train
    from nvsm_jax.nvsm import pseudo_labels, estep
    from nvsm_jax.data import fewshot, loaders
    from experiments.configs import nvsm as nvsm_config

    with open(f"{FLAGS.workdir}/config.json") as f:
        config = ml_collections.ConfigDict(json.load(f))
    root = FLAGS.data or config.data_root
    n_lab = FLAGS.num_labelled or int(config.num_labelled)
    train_set = loaders.load_pose_set(root, config.category, "L0")
    object_mesh = loaders.load_model_mesh(root, config.category)
    nemo = train.load_model(FLAGS.workdir, object_mesh=object_mesh)   # its recorded config
    split = fewshot.split_from_config(train_set, n_lab, config)
    labelled, unlabelled = split.labelled, split.unlabelled
    hidden = fewshot.hidden_poses(train_set, unlabelled.names)
    fn = train.feature_fn(nemo)
    t0 = time.time()
    pool_maps = estep.extract_features(fn, unlabelled.images, 16)
    extract_s = time.time() - t0
    base = nvsm_config.get_config("demo").estep            # the experiment's estep block
    mesh = parallel.make_mesh()
    solver = estep.SolverInputs(
        nemo.memory.vertex, feat.clutter_prototype(nemo.memory.clutter),
        pose_solver.SolverConfig.from_config(config.solver))
    solver_poses, solver_s = None, 0.0
    if FLAGS.solver_steps >= 0:
        solver_cfg = dataclasses.replace(solver.solver_cfg, steps=FLAGS.solver_steps)
        t0 = time.time()
        solver_poses = pose_solver.solve_batched(       # maps in, so the "backbone" is identity
            lambda maps: maps, pool_maps, solver.vertex_memory, solver.clutter, object_mesh,
            geometry.Intrinsics(unlabelled.focal, unlabelled.principal),
            stride=config.model.stride, solver_cfg=solver_cfg).pose
        solver_s = time.time() - t0
    results, rows = {}, []
    for name, changes in parse_variants(FLAGS.variants):
        cfg = dataclasses.replace(estep.EStepConfig.from_config(base),
                                  max_new=30, **changes)
        run_cfg = ml_collections.ConfigDict({"eval_batch_size": 16, "estep": cfg.to_dict()})
        sources = estep.round_sources(run_cfg, fn, labelled, unlabelled, pool_maps,
                                      pseudo_labels.PseudoLabels.empty())
        pool = estep.Pool(pool_maps, unlabelled.focal, unlabelled.principal,
                          np.ones(len(unlabelled), bool))
        t0 = time.time()
        table = estep.score_views(cfg, sources, pool, object_mesh=object_mesh,
                                  stride=config.model.stride, mesh=mesh,
                                  solver=solver)
        seconds = time.time() - t0
        rep = pseudo_labels.table_report(table.scores, table.view_poses, hidden,
                                         solver_poses=solver_poses,
                                         agree_angle=float(np.radians(FLAGS.agree_deg)))
        rep.update(num_views=int(table.scores.shape[0]), seconds=seconds, changes=changes)
        if FLAGS.holdout:
            hc = estep.holdout_check(cfg, sources, object_mesh=object_mesh,
                                               stride=config.model.stride, mesh=mesh,
                                               solver=solver)
            rep.update(holdout_report(hc, table.scores, table.view_poses, hidden))
        results[name] = rep
        row = {"variant": name, "views": rep["num_views"],
               "P@30": rep["precision@30"], "P@60": rep["precision@60"],
               "P@100": rep["precision@100"], "best_right": rep["best_view_right"],
               "gap": rep["gap"]}
        if FLAGS.holdout:
            row.update({k: rep[k] for k in ("holdout_accuracy", "holdout_n", "pass@q25",
                                             "P_pass@q25", "pass@q50", "P_pass@q50")})
        if solver_poses is not None:
            row.update({"solver_right": rep["solver_right"], "agree@30": rep["agree@30"],
                        "agree@100": rep["agree@100"], "P_agree@30": rep["precision_agree@30"],
                        "P_agree@60": rep["precision_agree@60"],
                        "P_disagree@100": rep["precision_disagreeing_top"]})
        row.update({"right % by sector 0..330": " ".join(
                        "-" if v is None else f"{100 * v:.0f}" for v in rep["by_sector"]),
                    "seconds": seconds})
        rows.append(row)
        print_table(rows[-1:], header=len(rows) == 1)
    if FLAGS.json:
        write_json(FLAGS.json, [{"workdir": FLAGS.workdir, "pool": len(unlabelled),
                                 "anchors": n_lab, "extract_seconds": extract_s,
                                 "solver_steps": FLAGS.solver_steps, "solver_seconds": solver_s,
                                 "variant": name, **rep} for name, rep in results.items()])

if __name__ == "__main__":
    app.run(main)
