"""The MCSS experiment, importable from a notebook: data -> (MCSS, baseline) x supervision
levels -> metrics, retrieval.

``train_and_evaluate(config, workdir)``; the CLI is
``python -m experiments.mcss --config experiments/configs/mcss.py:demo --workdir runs/mcss_demo``.

Writes to WORKDIR: ``data/`` (synthetic benchmark, unless ``config.data.root``),
``runs/<method>_<level>/`` (checkpoints + metrics.jsonl; re-running resumes),
``results.json``, ``report.md``, ``retrieval.png``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

import jax
import numpy as np

from nvsm_jax import parallel, training
from nvsm_jax.mcss import data as mdata
from nvsm_jax.mcss import h36m, mpi_inf_3dhp, retrieval
from nvsm_jax.mcss import train as mtrain

__all__ = ["train_and_evaluate", "report_markdown", "load_data"]

_log = logging.getLogger(__name__)


def _slug(level: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", level)


def _retrieval(emb, test, cfg) -> dict:
    return retrieval.retrieval_scores(emb, test.pose3d, test.view, query_view=cfg.eval.query_view,
                                      ks=tuple(cfg.eval.ks), threshold=cfg.eval.hit_threshold)


def load_data(config, root: str):
    """``(train, test)`` :class:`nvsm_jax.mcss.h36m.MultiViewData` of ``config.data``:
    ``format="h36m"`` (the Human3.6M-like layout, also the synthetic benchmark's) or
    ``"3dhp"`` (MPI-INF-3DHP, :mod:`nvsm_jax.mcss.mpi_inf_3dhp`, settings in
    ``config.data.mpi``)."""
    size = tuple(config.data.image_size)
    if config.data.get("format", "h36m") == "3dhp":
        m = config.data.mpi
        kw = dict(sequences=tuple(m.sequences), cameras=tuple(m.cameras), image_size=size,
                  frame_step=int(m.frame_step), max_frames=int(m.max_frames or 0) or None,
                  joints=m.joints, crop_scale=float(m.crop_scale))
        return (mpi_inf_3dhp.load_dataset(root, tuple(m.train_subjects), **kw),
                mpi_inf_3dhp.load_dataset(root, tuple(m.test_subjects), **kw))
    actions = tuple(config.data.actions or ()) or None    # () or "": every action folder
    return (h36m.load_dataset(root, config.data.train_subjects, actions, size),
            h36m.load_dataset(root, config.data.test_subjects, actions, size))


def _eval_model(model, state, test, mesh, cfg, with_pose: bool = True, embedding: str = "head"):
    emb, pose = mtrain.predict_frames(model, state, test.images, cfg.train, mesh,
                                      embedding=embedding)
    row = mtrain.evaluate_poses(pose, test.pose3d) if with_pose else {}
    ret = retrieval.retrieval_scores(emb, test.pose3d, test.view, query_view=cfg.eval.query_view,
                                     ks=tuple(cfg.eval.ks), threshold=cfg.eval.hit_threshold)
    return row, ret


def train_and_evaluate(config, workdir: str, log=None) -> dict:
    """The whole experiment; returns the results dict (also written to disk).

    log: a callable taking one message (default: this module's logger at INFO)."""
    log = log or _log.info
    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    training.save_config(config, workdir)
    if config.get("compilation_cache", ""):
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    mesh = parallel.make_mesh(config.num_devices or None)
    root = config.data.root or os.path.join(workdir, "data")
    fmt = config.data.get("format", "h36m")
    if fmt not in ("h36m", "3dhp"):
        raise ValueError(f"data.format must be 'h36m' or '3dhp', got {fmt!r}")
    if fmt == "3dhp" and not config.data.root:
        raise ValueError("data.format='3dhp' reads an existing MPI-INF-3DHP tree: set data.root")
    if config.data.generate and fmt == "h36m":
        mdata.generate_dataset(root, subjects=tuple(config.data.train_subjects) +
                               tuple(config.data.test_subjects), actions=config.data.actions,
                               num_frames=config.data.num_frames, num_views=config.data.num_views,
                               image_size=tuple(config.data.image_size), seed=config.seed,
                               noise_std=config.data.noise_std, log=log)
    size = tuple(config.data.image_size)
    train_data, test = load_data(config, root)
    t_data = time.time() - t0
    log(f"[mcss] data ready in {t_data:.0f}s: train {len(train_data)} frames, test {len(test)}")

    rows, figure_src = [], None
    for level in config.supervision_levels:
        mask = mtrain.supervision_mask(train_data, level, config.seed)
        ts = mtrain.make_train_set(train_data, mask)
        n_inst = int(mask.sum())
        # The constant predictor: the mean pose of this level's labelled frames. Its
        # embedding is constant, so its retrieval is chance (ties broken at random).
        mean_pose = mtrain.mean_pose_prediction(ts, len(test))
        row = mtrain.evaluate_poses(mean_pose, test.pose3d)
        rng = np.random.default_rng([config.seed, 77])
        ret = _retrieval(rng.normal(size=(len(test), 8)), test, config)
        row.update(method="mean pose", embedding="none", supervision=level,
                   labelled_frames=n_inst, labelled_fraction=n_inst / len(train_data),
                   retrieval=ret["pa_mpjpe"], hit=ret["hit"], seconds=0.0)
        rows.append(row)
        log(f"[mcss] mean pose {level:10s} MPJPE {row['mpjpe']:.1f} N-MPJPE {row['n_mpjpe']:.1f} "
            f"PA-MPJPE {row['pa_mpjpe']:.1f} ret@1 {ret['pa_mpjpe'][str(config.eval.ks[0])]:.1f}")
        for method in config.methods:
            t1 = time.time()
            run_dir = os.path.join(workdir, "runs", f"{method}_{_slug(level)}")
            model, state = mtrain.train(ts, config.train, run_dir, method=method, mesh=mesh,
                                        seed=config.seed, log=log)
            extra = {}
            rounds = int(config.train.multiview_pseudo.get("rounds", 0)) if method == "mcss" else 0
            for r in range(1, rounds + 1):      # multi-view bootstrapping (fusion.py)
                before, _ = _eval_model(model, state, test, mesh, config, embedding="head")
                boot, single = mtrain.bootstrap_train_set(model, state, ts, config.train, mesh)
                unl = np.setdiff1d(boot.labelled_idx, ts.labelled_idx)
                hidden = train_data.pose3d[unl]                     # hidden: report only
                err = mtrain.evaluate_poses(boot.labelled_pose[unl] * 1000.0, hidden)["mpjpe"]
                err1 = mtrain.evaluate_poses(single[unl], hidden)["mpjpe"]
                extra.setdefault("bootstrap", []).append(
                    {"round": r, "test_mpjpe_before": before["mpjpe"], "pseudo_labels": len(unl),
                     "pseudo_mpjpe": err, "single_view_mpjpe": err1})
                log(f"[mcss] {level} round {r}: test MPJPE so far {before['mpjpe']:.1f}; "
                    f"{len(unl)} pseudo-labels, MPJPE {err:.1f} fused vs {err1:.1f} single-view "
                    "(hidden poses, report only)")
                model, state = mtrain.train(boot, config.train, f"{run_dir}_round{r}",
                                            method=method, mesh=mesh, seed=config.seed + r,
                                            log=log)
            # The baseline's embedding head gets no gradient (and Adam-normalised L2 decay
            # shrinks it to zero); by default it is judged by the features it did learn.
            emb_kind = config.eval.get("baseline_embedding", "features") \
                if method == "baseline" else "head"
            row, ret = _eval_model(model, state, test, mesh, config, embedding=emb_kind)
            row.update(method=method, embedding=emb_kind, supervision=level, labelled_frames=n_inst,
                       labelled_fraction=n_inst / len(train_data),
                       retrieval={k: v for k, v in ret["pa_mpjpe"].items()},
                       hit=ret["hit"], seconds=time.time() - t1, **extra)
            rows.append(row)
            log(f"[mcss] {method:8s} {level:10s} MPJPE {row['mpjpe']:.1f} "
                f"N-MPJPE {row['n_mpjpe']:.1f} PA-MPJPE {row['pa_mpjpe']:.1f} "
                f"ret@1 {ret['pa_mpjpe']['1']:.1f} ({row['seconds']:.0f}s)")
            if method == "mcss" and figure_src is None:
                figure_src = (ret, level)

    # Random embedding: the same network untrained (or gaussian vectors).
    model, state = mtrain.init_state(config.train, mesh, size, config.seed + 1)
    row, ret = _eval_model(model, state, test, mesh, config)
    if config.eval.random_embedding == "gaussian":
        emb = np.random.default_rng(config.seed).normal(size=(len(test), 64))
        ret = _retrieval(emb, test, config)
    row.update(method="random", supervision="none", retrieval=ret["pa_mpjpe"], hit=ret["hit"])
    rows.append(row)

    fig_path = None
    if figure_src is not None:
        ret, level = figure_src
        fig_path = retrieval.save_retrieval_figure(
            os.path.join(workdir, "retrieval.png"), test.images, ret["queries"],
            ret["neighbours"], ret["errors"], test.view, rows=config.eval.figure_rows,
            title=f"MCSS ({level}): query (left) and top-5 from other views, PA-MPJPE")
    results = {"rows": rows, "data_seconds": t_data, "total_seconds": time.time() - t0,
               "test_frames": len(test), "train_frames": len(train_data),
               "devices": int(mesh.devices.size), "figure": fig_path}
    if parallel.is_main_process():
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(workdir, "report.md"), "w") as f:
            f.write(report_markdown(results, config))
    log(f"[mcss] done in {results['total_seconds']:.0f}s -> {workdir}/results.json")
    return results


def _test_subjects(config):
    if config.data.get("format", "h36m") == "3dhp":
        return tuple(config.data.mpi.test_subjects)
    return tuple(config.data.test_subjects)


def report_markdown(results: dict, config) -> str:
    ks = [str(k) for k in config.eval.ks]
    name = ("MPI-INF-3DHP" if config.data.get("format", "h36m") == "3dhp"
            else "the synthetic multi-view benchmark" if config.data.generate
            else "the Human3.6M layout")
    lines = [f"# MCSS on {name}", "",
             f"Train frames {results['train_frames']}, test frames {results['test_frames']} "
             f"(subjects {', '.join(_test_subjects(config))}), {results['devices']} device(s), "
             f"total {results['total_seconds']:.0f}s (data {results['data_seconds']:.0f}s).", "",
             "## 3D pose (mm, test subjects)", "",
             "| method | supervision | labelled frames | MPJPE | N-MPJPE | PA-MPJPE |",
             "|---|---|---|---|---|---|"]
    lines.insert(len(lines) - 2, "`mean pose` predicts the mean pose of the level's labelled "
                 "frames for every image (its retrieval is chance: a constant embedding); "
                 "`random` is the untrained network.")
    lines.insert(len(lines) - 2, "")
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {r['supervision']} | {r.get('labelled_frames', 0)} | "
                     f"{r['mpjpe']:.1f} | {r['n_mpjpe']:.1f} | {r['pa_mpjpe']:.1f} |")
    lines += ["", f"## Cross-view retrieval (queries: camera {config.eval.query_view}; gallery: "
              "the other cameras). Mean PA-MPJPE (mm) of the top-k; Hit@k under "
              f"{config.eval.hit_threshold:g} mm", "",
              "| method | supervision | " + " | ".join(f"PA@{k}" for k in ks) + " | " +
              " | ".join(f"Hit@{k}" for k in ks) + " |",
              "|---|---|" + "---|" * (2 * len(ks))]
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {r['supervision']} | " +
                     " | ".join(f"{r['retrieval'][k]:.1f}" for k in ks) + " | " +
                     " | ".join(f"{r['hit'][k]:.2f}" for k in ks) + " |")
    boot = [r for r in results["rows"] if r.get("bootstrap")]
    if boot:
        lines += ["", "## Multi-view bootstrapping (MCSS: views fused into pseudo-labels, "
                  "then retrained)", "",
                  "Pseudo-label errors use the hidden training poses (reporting only).", "",
                  "| supervision | round | test MPJPE before | after | pseudo-labels | "
                  "their MPJPE fused | single-view |", "|---|---|---|---|---|---|---|"]
        for r in boot:
            for i, b in enumerate(r["bootstrap"]):
                after = (r["bootstrap"][i + 1]["test_mpjpe_before"] if i + 1 < len(r["bootstrap"])
                         else r["mpjpe"])
                lines.append(f"| {r['supervision']} | {b['round']} | {b['test_mpjpe_before']:.1f} "
                             f"| {after:.1f} | {b['pseudo_labels']} | {b['pseudo_mpjpe']:.1f} | "
                             f"{b['single_view_mpjpe']:.1f} |")
    if results.get("figure"):
        lines += ["", "![retrieval](retrieval.png)"]
    return "\n".join(lines) + "\n"
