"""The MCSS experiment, importable from a notebook: data -> (MCSS, baseline) x supervision
levels -> metrics, retrieval.

``train_and_evaluate(config, workdir)``; the CLI is
``nvsm-mcss --config=mcss:demo --workdir runs/mcss_demo``.

Writes to WORKDIR: ``data/`` (synthetic benchmark, unless ``config.data.root``),
``runs/<method>_<level>/`` (checkpoints + metrics.jsonl; re-running resumes),
``results.json``, ``report.md``, ``retrieval.png``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time

import jax
import numpy as np

from nvsm_jax import parallel, training
from nvsm_jax.mcss import config_checks as mcss_checks
from nvsm_jax.mcss import data as mdata
from nvsm_jax.mcss import h36m, mpi_inf_3dhp, retrieval
from nvsm_jax.mcss import train as mtrain
from nvsm_jax.mcss.settings import EvalConfig, MCSSTrainConfig
from nvsm_jax.workdir_lock import locked

__all__ = ["train_and_evaluate", "report_markdown", "headline_markdown", "aggregate",
           "aggregate_markdown", "claims", "load_data", "HEADLINE", "BOOTSTRAP"]

_log = logging.getLogger(__name__)


def _slug(level: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", level)


def _retrieval(emb, test, ev: EvalConfig) -> dict:
    """Cross-view retrieval (queries: camera ``ev.query_view``; gallery: the other
    cameras) and the cross-subject row (gallery: only the other test subjects):
    ``{"pa_mpjpe", "hit", "pa_mpjpe_xs", "hit_xs"}`` (the ``_xs`` None with one subject);
    plus the cross-view ``queries`` / ``neighbours`` / ``errors`` for the figure."""
    kw = dict(query_view=ev.query_view, ks=tuple(ev.ks), threshold=ev.hit_threshold)
    out = retrieval.retrieval_scores(emb, test.pose3d, test.view, **kw)
    xs = retrieval.cross_subject_scores(emb, test.pose3d, test.view, test.subject_of_frame, **kw)
    out["pa_mpjpe_xs"] = None if xs is None else xs["pa_mpjpe"]
    out["hit_xs"] = None if xs is None else xs["hit"]
    return out


def load_data(config, root: str):
    """``(train, test)`` :class:`nvsm_jax.mcss.h36m.MultiViewData` of ``config.data``:
    ``format="h36m"`` (the Human3.6M-like layout, also the synthetic benchmark's) or
    ``"3dhp"`` (MPI-INF-3DHP, :mod:`nvsm_jax.mcss.mpi_inf_3dhp`, settings in
    ``config.data.mpi``)."""
    size = tuple(config.data.image_size)
    if config.data.format == "3dhp":
        m = config.data.mpi
        kw = dict(sequences=tuple(m.sequences), cameras=tuple(m.cameras), image_size=size,
                  frame_step=int(m.frame_step), max_frames=int(m.max_frames or 0) or None,
                  joints=m.joints, crop_scale=float(m.crop_scale))
        return (mpi_inf_3dhp.load_dataset(root, tuple(m.train_subjects), **kw),
                mpi_inf_3dhp.load_dataset(root, tuple(m.test_subjects), **kw))
    actions = tuple(config.data.actions or ()) or None    # () or "": every action folder
    return (h36m.load_dataset(root, config.data.train_subjects, actions, size),
            h36m.load_dataset(root, config.data.test_subjects, actions, size))


def _eval_model(model, state, test, mesh, train_cfg: MCSSTrainConfig, ev: EvalConfig,
                embedding: str = "head"):
    """(pose metrics, retrieval dict of :func:`_retrieval`) of a trained network."""
    emb, pose = mtrain.predict_frames(model, state, test.images, train_cfg, mesh,
                                      embedding=embedding)
    return mtrain.evaluate_poses(pose, test.pose3d), _retrieval(emb, test, ev)


def _row(method: str, level: str, metrics: dict, ret: dict, **extra) -> dict:
    return dict(metrics, method=method, supervision=level, retrieval=ret["pa_mpjpe"],
                hit=ret["hit"], retrieval_xs=ret["pa_mpjpe_xs"], hit_xs=ret["hit_xs"], **extra)


@locked     # one run per workdir (nvsm_jax.workdir_lock)
def train_and_evaluate(config, workdir: str, log=None) -> dict:
    """The whole experiment; returns the results dict (also written to disk).

    Without ``config.seeds``: one run of ``config.seed``; returns its results
    (``rows``: one dict per table row, ``method`` / ``supervision`` / metrics).
    With ``config.seeds`` (e.g. ``(0, 1, 2)``) every seed runs into
    ``WORKDIR/seed<S>`` (its own data, split and training; resumable) and
    ``WORKDIR/report.md`` holds the mean +- SE over seeds (:func:`aggregate`); returns
    ``{"seeds", "summary", "per_seed"}``.
    log: a callable taking one message (default: this module's logger at INFO).
    Every option is checked first (:func:`nvsm_jax.mcss.config_checks.check_mcss_config`)."""
    mcss_checks.check_mcss_config(config)
    log = log or _log.info
    seeds = tuple(int(s) for s in (config.seeds or ()))
    if not seeds:
        return _run_seed(config, workdir, log)
    os.makedirs(workdir, exist_ok=True)
    training.save_config(config, workdir)
    per_seed = []
    for s in seeds:
        c = copy.deepcopy(config)
        c.seed, c.seeds = s, ()
        per_seed.append(_run_seed(c, os.path.join(workdir, f"seed{s}"), log))
    summary = aggregate(per_seed, config)
    if parallel.is_main_process():
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({"seeds": list(seeds), "summary": summary,
                       "per_seed": [{k: v for k, v in r.items() if k != "figure"}
                                    for r in per_seed]}, f, indent=1)
        with open(os.path.join(workdir, "report.md"), "w") as f:
            f.write(aggregate_markdown(summary, config))
    log(aggregate_markdown(summary, config))
    return {"seeds": list(seeds), "summary": summary, "per_seed": per_seed}


def _run_seed(config, workdir: str, log) -> dict:
    """One seed: data, every supervision level's rows, the ceiling and the untrained
    network; writes ``results.json`` / ``report.md`` / ``retrieval.png``."""
    t0 = time.time()
    ev = EvalConfig.from_config(config.eval)        # the typed blocks (mcss/settings.py),
    train_cfg = MCSSTrainConfig.from_config(config.train)     # built once, passed on
    pseudo = train_cfg.multiview_pseudo
    os.makedirs(workdir, exist_ok=True)
    training.save_config(config, workdir)
    if config.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    mesh = parallel.make_mesh(config.num_devices or None)
    root = config.data.root or os.path.join(workdir, "data")
    fmt = config.data.format
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

    def run(method, level, ts, name):
        t1 = time.time()
        run_dir = os.path.join(workdir, "runs", f"{method}_{_slug(level)}")
        model, state = mtrain.train(ts, train_cfg, run_dir, method=method, mesh=mesh,
                                    seed=config.seed, log=log)
        # The baseline's embedding head gets no gradient (and Adam-normalised L2 decay
        # shrinks it to zero); by default it is judged by the features it did learn.
        emb_kind = ev.baseline_embedding if method == "baseline" else "head"
        m, ret = _eval_model(model, state, test, mesh, train_cfg, ev, embedding=emb_kind)
        row = _row(name, level, m, ret, embedding=emb_kind, labelled_frames=len(ts.labelled_idx),
                   labelled_fraction=len(ts.labelled_idx) / len(train_data),
                   seconds=time.time() - t1)
        _log_row(log, row)
        return model, state, row, ret

    rows, figure_src = [], None
    for level in config.supervision_levels:
        mask = mtrain.supervision_mask(train_data, level, config.seed)
        ts = mtrain.make_train_set(train_data, mask)
        n_inst = int(mask.sum())
        # The constant predictor: the mean pose of this level's labelled frames. Its
        # embedding is constant, so its retrieval is chance (ties broken at random).
        mean_pose = mtrain.mean_pose_prediction(ts, len(test))
        rng = np.random.default_rng([config.seed, 77])
        row = _row("mean pose", level, mtrain.evaluate_poses(mean_pose, test.pose3d),
                   _retrieval(rng.normal(size=(len(test), 8)), test, ev), embedding="none",
                   labelled_frames=n_inst, labelled_fraction=n_inst / len(train_data),
                   seconds=0.0)
        rows.append(row)
        _log_row(log, row)
        for method in config.methods:
            model, state, row, ret = run(method, level, ts, method)
            rows.append(row)
            if method == "mcss" and figure_src is None:
                figure_src = (ret, level)
            rounds = int(pseudo.rounds) if method == "mcss" else 0
            if rounds <= 0:
                continue
            t1, boots, before = time.time(), [], row["mpjpe"]
            for r in range(1, rounds + 1):      # multi-view bootstrapping (fusion.py)
                boot, single = mtrain.bootstrap_train_set(model, state, ts, train_cfg, mesh)
                unl = np.setdiff1d(boot.labelled_idx, ts.labelled_idx)
                hidden = train_data.pose3d[unl]                     # hidden: report only
                err = mtrain.evaluate_poses(boot.labelled_pose[unl] * 1000.0, hidden)["mpjpe"]
                err1 = mtrain.evaluate_poses(single[unl], hidden)["mpjpe"]
                log(f"[mcss] {level} round {r}: test MPJPE so far {before:.1f}; "
                    f"{len(unl)} pseudo-labels, MPJPE {err:.1f} fused vs {err1:.1f} single-view "
                    "(hidden poses, report only)")
                model, state = mtrain.train(boot, train_cfg, os.path.join(
                    workdir, "runs", f"{method}_{_slug(level)}_round{r}"), method=method,
                    mesh=mesh, seed=config.seed + r, log=log)
                m, ret = _eval_model(model, state, test, mesh, train_cfg, ev)
                boots.append({"round": r, "test_mpjpe_before": before, "pseudo_labels": len(unl),
                              "pseudo_mpjpe": err, "single_view_mpjpe": err1})
                before = m["mpjpe"]
            row = _row(BOOTSTRAP, level, m, ret, embedding="head", labelled_frames=n_inst,
                       labelled_fraction=n_inst / len(train_data),
                       seconds=row["seconds"] + time.time() - t1, bootstrap=boots)
            rows.append(row)
            _log_row(log, row)

    if config.ceiling:      # the same network on every training label
        _, _, row, _ = run("baseline", "all", mtrain.make_train_set(
            train_data, np.ones(len(train_data), bool)), "ceiling")
        rows.append(row)
    # The same network untrained (or gaussian vectors for the embedding).
    model, state = mtrain.init_state(train_cfg, mesh, size, config.seed + 1)
    m, ret = _eval_model(model, state, test, mesh, train_cfg, ev)
    if ev.random_embedding == "gaussian":
        ret = _retrieval(np.random.default_rng(config.seed).normal(size=(len(test), 64)),
                         test, ev)
    rows.append(_row("untrained", "none", m, ret, embedding="head"))

    fig_path = None
    if figure_src is not None:
        ret, level = figure_src
        fig_path = retrieval.save_retrieval_figure(
            os.path.join(workdir, "retrieval.png"), test.images, ret["queries"],
            ret["neighbours"], ret["errors"], test.view, rows=ev.figure_rows,
            title=f"MCSS ({level}): query (left) and top-5 from other views, PA-MPJPE")
    results = {"rows": rows, "data_seconds": t_data, "total_seconds": time.time() - t0,
               "test_frames": len(test), "train_frames": len(train_data),
               "devices": int(mesh.devices.size), "figure": fig_path, "seed": int(config.seed)}
    if parallel.is_main_process():
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(workdir, "report.md"), "w") as f:
            f.write(report_markdown(results, config))
    log(headline_markdown(rows, config))
    log(f"[mcss] done in {results['total_seconds']:.0f}s -> {workdir}/results.json")
    return results


BOOTSTRAP = "mcss + bootstrap"
# The headline table's rows, in order (method names of the results rows).
HEADLINE = ("mcss", BOOTSTRAP, "baseline", "ceiling", "mean pose", "untrained")


def _log_row(log, row):
    log(f"[mcss] {row['method']:16s} {row['supervision']:10s} MPJPE {row['mpjpe']:.1f} "
        f"N-MPJPE {row['n_mpjpe']:.1f} PA-MPJPE {row['pa_mpjpe']:.1f} "
        f"ret@1 {next(iter(row['retrieval'].values())):.1f} ({row.get('seconds', 0.0):.0f}s)")


def _headline_rows(rows, config) -> dict:
    """method -> the row of the headline level (the first supervision level; the
    ceiling's and the untrained network's own rows)."""
    level = config.supervision_levels[0]
    out = {}
    for r in rows:
        if r["method"] in ("ceiling", "untrained") or r["supervision"] == level:
            out.setdefault(r["method"], r)
    return out


def claims(rows, config) -> dict:
    """The protocol's comparisons at the headline level, from one seed's rows:
    ``{"<mcss row>": {"below_baseline": fraction of the baseline's MPJPE saved,
    "gap_closed": fraction of (baseline - ceiling) closed}}`` (None without the rows)."""
    h = _headline_rows(rows, config)
    out = {}
    for name in ("mcss", BOOTSTRAP):
        if name not in h or "baseline" not in h:
            continue
        base, ours = h["baseline"]["mpjpe"], h[name]["mpjpe"]
        gap = base - h["ceiling"]["mpjpe"] if "ceiling" in h else None
        out[name] = {"below_baseline": (base - ours) / base,
                     "gap_closed": None if not gap or gap <= 0 else (base - ours) / gap}
    return out


def _k1(config) -> str:
    return str(config.eval.ks[0])


def headline_markdown(rows, config) -> str:
    """The headline table (the first supervision level, e.g. S1) of one seed."""
    h, k = _headline_rows(rows, config), _k1(config)
    level = config.supervision_levels[0]
    lines = [f"## Headline: {level} labelled (test subjects)", "",
             f"| method | MPJPE | PA-MPJPE | retrieval PA@{k} | Hit@{k} | cross-subject PA@{k} "
             f"| cross-subject Hit@{k} |", "|---|---|---|---|---|---|---|"]
    for name in HEADLINE:
        if name in h:
            r = h[name]
            xs = (f"{r['retrieval_xs'][k]:.1f} | {r['hit_xs'][k]:.2f}"
                  if r.get("retrieval_xs") else "- | -")
            lines.append(f"| {_label(name, r)} | {r['mpjpe']:.1f} | {r['pa_mpjpe']:.1f} | "
                         f"{r['retrieval'][k]:.1f} | {r['hit'][k]:.2f} | {xs} |")
    for name, c in claims(rows, config).items():
        gap = "n/a" if c["gap_closed"] is None else f"{100 * c['gap_closed']:.0f} %"
        lines.append(f"\n{name}: MPJPE {100 * c['below_baseline']:.1f} % below the baseline; "
                     f"closes {gap} of the gap to the ceiling.")
    return "\n".join(lines) + "\n"


def _label(name, row) -> str:
    return {"ceiling": "ceiling (baseline, all labels)", "untrained": "untrained network",
            "mean pose": f"mean pose ({row['supervision']} labels)"}.get(name, name)


_AGG_KEYS = ("mpjpe", "pa_mpjpe", "retrieval", "hit", "retrieval_xs", "hit_xs")


def aggregate(per_seed: list, config) -> dict:
    """Mean and standard error over seeds of the headline rows and claims.

    per_seed: results dicts of :func:`train_and_evaluate` (one seed each). Returns
    ``{"rows": {method: {key: [mean, se, n]}}, "claims": {row: {key: [mean, se, n]}}}``
    (retrieval keys at the first k)."""
    k = _k1(config)

    def stat(values):
        v = np.asarray([x for x in values if x is not None], np.float64)
        if len(v) == 0:
            return None
        se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
        return [float(v.mean()), se, int(len(v))]

    rows = {}
    heads = [_headline_rows(r["rows"], config) for r in per_seed]
    for name in HEADLINE:
        got = [h[name] for h in heads if name in h]
        if not got:
            continue
        rows[name] = {key: stat([(g.get(key) or {}).get(k) if isinstance(g.get(key), dict)
                                 or g.get(key) is None else g[key] for g in got])
                      for key in _AGG_KEYS}
    cl = [claims(r["rows"], config) for r in per_seed]
    out_claims = {name: {key: stat([c[name][key] for c in cl if name in c])
                         for key in ("below_baseline", "gap_closed")}
                  for name in ("mcss", BOOTSTRAP) if any(name in c for c in cl)}
    return {"rows": rows, "claims": out_claims, "level": config.supervision_levels[0]}


def aggregate_markdown(summary: dict, config) -> str:
    """The headline table over seeds: mean +- SE."""
    k = _k1(config)
    n = max((v[2] for r in summary["rows"].values() for v in r.values() if v), default=0)

    def f(v, digits=1, pct=False):
        if v is None:
            return "-"
        scale = 100.0 if pct else 1.0
        se = "" if not np.isfinite(v[1]) else f" ± {scale * v[1]:.{digits}f}"
        return f"{scale * v[0]:.{digits}f}{se}"

    lines = [f"# MCSS, {summary['level']} labelled: mean ± SE over {n} seeds (test subjects)", "",
             f"| method | MPJPE | PA-MPJPE | retrieval PA@{k} | Hit@{k} | cross-subject PA@{k} | "
             f"cross-subject Hit@{k} |", "|---|---|---|---|---|---|---|"]
    for name, r in summary["rows"].items():
        lines.append(f"| {name} | {f(r['mpjpe'])} | {f(r['pa_mpjpe'])} | {f(r['retrieval'])} | "
                     f"{f(r['hit'], 2)} | {f(r['retrieval_xs'])} | {f(r['hit_xs'], 2)} |")
    for name, c in summary["claims"].items():
        lines.append(f"\n{name}: MPJPE {f(c['below_baseline'], 1, True)} % below the baseline; "
                     f"closes {f(c['gap_closed'], 0, True)} % of the gap to the ceiling.")
    return "\n".join(lines) + "\n"


def _test_subjects(config):
    if config.data.format == "3dhp":
        return tuple(config.data.mpi.test_subjects)
    return tuple(config.data.test_subjects)


def report_markdown(results: dict, config) -> str:
    ks = [str(k) for k in config.eval.ks]
    name = ("MPI-INF-3DHP" if config.data.format == "3dhp"
            else "the synthetic multi-view benchmark" if config.data.generate
            else "the Human3.6M layout")
    lines = [f"# MCSS on {name}", "",
             f"Train frames {results['train_frames']}, test frames {results['test_frames']} "
             f"(subjects {', '.join(_test_subjects(config))}), {results['devices']} device(s), "
             f"total {results['total_seconds']:.0f}s (data {results['data_seconds']:.0f}s).", "",
             headline_markdown(results["rows"], config),
             "## 3D pose (mm, test subjects)", "",
             "| method | supervision | labelled frames | MPJPE | N-MPJPE | PA-MPJPE |",
             "|---|---|---|---|---|---|"]
    lines.insert(len(lines) - 2, "`mean pose` predicts the mean pose of the level's labelled "
                 "frames for every image (its retrieval is chance: a constant embedding); "
                 "`untrained` is the network at its initial weights, `ceiling` the baseline "
                 "trained on every training label, `mcss + bootstrap` MCSS retrained on its "
                 "views' fused poses.")
    lines.insert(len(lines) - 2, "")
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {r['supervision']} | {r.get('labelled_frames', 0)} | "
                     f"{r['mpjpe']:.1f} | {r['n_mpjpe']:.1f} | {r['pa_mpjpe']:.1f} |")
    lines += ["", f"## Cross-view retrieval (queries: camera {config.eval.query_view}; gallery: "
              "the other cameras). Mean PA-MPJPE (mm) of the top-k; Hit@k under "
              f"{config.eval.hit_threshold:g} mm", "",
              "| method | supervision | " + " | ".join(f"PA@{k}" for k in ks) + " | " +
              " | ".join(f"Hit@{k}" for k in ks) + f" | cross-subject PA@{ks[0]} | "
              f"cross-subject Hit@{ks[0]} |",
              "|---|---|" + "---|" * (2 * len(ks) + 2)]
    for r in results["rows"]:
        xs = (f"{r['retrieval_xs'][ks[0]]:.1f} | {r['hit_xs'][ks[0]]:.2f}"
              if r.get("retrieval_xs") else "- | -")
        lines.append(f"| {r['method']} | {r['supervision']} | " +
                     " | ".join(f"{r['retrieval'][k]:.1f}" for k in ks) + " | " +
                     " | ".join(f"{r['hit'][k]:.2f}" for k in ks) + f" | {xs} |")
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
