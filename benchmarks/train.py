"""NeMo training throughput: the jitted train step against its own forward pass;
with ``--model mcss``, the MCSS train step.

    python -m benchmarks.train --json runs/bench/train.json
    python -m benchmarks.train --baseline HEAD~1 --json runs/bench/train_vs_prev.json
    python -m benchmarks.train --backbones small,efficientnet_lite0 --image 128 \\
        --depthwise shift,conv --vertices 128,0
    python -m benchmarks.train --model mcss --image 64 --frozen_stages 9,5,4,3,0 --steps 10

One record per (backbone, depthwise form, image size, sampled vertices, frozen stages), each
timed in a fresh process (``--row``):

* ``images_per_s`` / ``s_per_step``: the whole train step (forward, backward, Adam,
  memory updates; data excluded), median of ``--steps`` timed steps;
* ``forward_images_per_s``: the step's forward alone (``train.make_loss_fn``: encoder,
  decoder, rasterisation and vertex sampling, CoKe loss), and ``backward_overhead`` =
  step time / forward time (a backward normally costs about 2x its forward, so about
  3 is the ideal): the step and the forward are timed in turn, call by call, and
  this is the median of the per-call ratios;
* ``gflops`` of the step (XLA's cost analysis of the compiled step) and
  ``gflop_per_s`` as ``fraction_of_matmul``: the achieved rate over this run's
  float32 matmul rate (``matmul_gflops``, first record): how far the step is from
  what these cores can do;
* ``cpu_s_per_step``: process CPU time per step, steadier than wall time on a
  shared machine.

``--baseline REF`` exports commit REF (``git archive``) into a scratch folder, puts
this benchmark there and times every row with REF's library too, alternating
REF and this tree row by row for ``--rounds`` rounds; the ``_baseline`` records
and a ``speedup`` (this tree's images/s over REF's, medians over rounds) make the
before/after comparison one run on one machine.

Random images/poses and NeMo's cuboid mesh; ``model.pretrained=""`` (the weights do
not change the speed).

``--model mcss``: one record per (``--mcss_config``, image size, frozen stages,
``--cache`` mode), the MCSS step of ``experiments/configs/mcss.py`` (default its
``demo``: EfficientNet-Lite0 read at stride 16, ``sup_batch`` 32 labelled frames +
the 4 x 4 x 4 multi-view batch, method "mcss") on random images of 4 sequences x 4
views x 16 frames, with the config's encoder weights (``--pretrained`` overrides;
``""`` = random init). As ``train.train`` runs it: where the config caches encoder maps
(``train.uses_feature_cache``: the tap maps of an encoder frozen up to the tap, or
the last frozen stage's output), they are computed first (``cache_s``) and the step
reads them; else it reads the images (with the config's colour augmentation).
``s_per_step``: median wall time of ``--steps`` steps after the compiling call and
two untimed ones, each on its own batch, sharded beforehand (data excluded); no
forward-only timing.

Each row runs as its tree's binaries run: where the library has
``parallel.reexec_with_huge_pages`` the row's process restarts with it
(``huge_pages`` in the record; ``NVSM_JAX_HUGE_PAGES=0`` turns it off).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import (machine_load, matmul_gflops, peak_rss_mb, print_table,
                               run_as_the_binaries, run_row_subprocess, time_call,
                               time_fn_stats, write_json)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def time_row(row: dict) -> dict:
    """Times one configuration in this process (the child side of ``--row``)."""
    import jax
    import numpy as np

    from experiments.configs import nemo as nemo_config
    from nvsm_jax import meshes, parallel
    try:
        from nvsm_jax.nemo import train as nemo_train
    except ImportError:                              # a baseline before the package layout
        from nvsm_jax import train as nemo_train
    from nvsm_jax.models import backbone

    object_mesh = meshes.cuboid_mesh([-0.26, -0.58, -0.22], [0.26, 0.58, 0.21], 1000)
    size, b = row["image"], row["batch"]
    hw = (size, size)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 255, (b, *hw, 3), dtype=np.uint8),
             "pose": np.stack([rng.uniform(0, 6.28, b), rng.uniform(-0.2, 0.6, b),
                               rng.uniform(-0.2, 0.2, b), np.full(b, 5.0)], 1).astype(np.float32),
             "focal": np.full(b, 3.5 * size, np.float32),
             "principal": np.full((b, 2), size / 2, np.float32)}
    cfg = nemo_config.get_config("default")
    cfg.model.backbone = row["backbone"]
    cfg.model.pretrained = ""
    cfg.model.frozen_stages = row["frozen_stages"]
    if "encoder" in backbone.PRESETS[row["backbone"]]:
        cfg.model.depthwise = row["depthwise"]
    cfg.batch_size = b
    # (the key before the package layout: anchors_per_image, for --baseline commits)
    key = "vertices_per_image" if "vertices_per_image" in cfg.loss else "anchors_per_image"
    cfg.loss[key] = row["vertices_per_image"] or None
    devices = parallel.make_mesh(1)
    try:                                             # the typed settings, built once
        from nvsm_jax.nemo.settings import NemoConfig
        cfg = NemoConfig.of(cfg)
        model = nemo_train.build_model(cfg.model)
    except ImportError:                              # a baseline before them
        model = nemo_train.build_model(cfg)
    state = nemo_train.init_state(cfg, model, len(object_mesh.verts), hw, devices)
    sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
    step = nemo_train.make_train_step(cfg, model, object_mesh, hw, sharding, devices)
    sb = parallel.shard_batch(batch, devices)
    key = jax.random.key(0)

    holder = {"state": state, "calls": 0}

    def run_step():                      # the step donates its state: thread it through
        holder["state"], m = step(holder["state"], sb, jax.random.key(holder["calls"]))
        holder["calls"] += 1
        return m

    # first call = compile, then two untimed calls (``time_fn_stats``' warm-up and
    # its one timed call, used only for ``compile_s``); the same for the forward;
    # then the step and its forward timed in turn, call by call, so each ratio is
    # taken at one moment of the machine (its speed drifts by 20 % within a run:
    # timed apart, the ratio moved with it)
    timing = time_fn_stats(run_step, warmup=2, repeats=1)
    compile_s = timing["compile_s"]
    flops = _cost_flops(step.lower(holder["state"], sb, key).compile())
    forward = None
    forward_compile_s = fwd_s = fwd_cpu = overhead = None
    if hasattr(nemo_train, "make_loss_fn"):          # a baseline commit may predate it
        loss_fn = nemo_train.make_loss_fn(cfg, model, object_mesh, hw)
        jitted = jax.jit(lambda params, state, batch, key: loss_fn(params, state, batch, key)[0])
        forward = lambda: jitted(holder["state"].params, holder["state"], sb, key)  # noqa: E731
        forward_compile_s = time_fn_stats(forward, warmup=2, repeats=1)["compile_s"]
    steps, fwds = [], []                             # (wall s, CPU s) per call
    for _ in range(row["steps"]):
        steps.append(time_call(run_step))
        if forward is not None:
            fwds.append(time_call(forward))
    step_s, step_cpu = (statistics.median(t) for t in zip(*steps))
    if fwds:
        fwd_s, fwd_cpu = (statistics.median(t) for t in zip(*fwds))
        overhead = statistics.median(a[0] / f[0] for a, f in zip(steps, fwds))
    rec = {"name": "nemo_train_step", **row, "images_per_s": b / step_s,
           "forward_images_per_s": None if fwd_s is None else b / fwd_s,
           "backward_overhead": overhead,
           "s_per_step": step_s, "cpu_s_per_step": step_cpu, "forward_s": fwd_s,
           "forward_cpu_s": fwd_cpu, "gflops": None if flops is None else flops / 1e9,
           "gflop_per_s": None if flops is None else flops / step_s / 1e9,
           "compile_s": compile_s, "forward_compile_s": forward_compile_s,
           "peak_rss_mb": peak_rss_mb(), "load": machine_load()}
    return rec


def time_mcss_row(row: dict) -> dict:
    """Times one MCSS configuration in this process (``--model mcss``; module docstring)."""
    import jax
    import numpy as np

    from experiments.configs import mcss as mcss_config
    from nvsm_jax import parallel, training
    from nvsm_jax.mcss import train as mtrain
    from nvsm_jax.mcss.testing import fake_train_set

    cfg = mcss_config.get_config(row["config"]).train
    cfg.model.pretrained = row["pretrained"]
    cfg.model.frozen_stages = row["frozen_stages"]
    cfg.model.depthwise = row["depthwise"]
    cfg.cache_features = row["cache_features"]
    hw = (row["image"], row["image"])
    use_mv = row["method"] == "mcss"
    mesh = parallel.make_mesh(1)
    ts = fake_train_set(n_seq=4, n_views=4, n_frames=16, size=hw)
    model, state = mtrain.init_state(cfg, mesh, hw, seed=0)
    feats, cache_s, stage = None, None, None
    if mtrain.uses_feature_cache(cfg):             # as train.train does
        split = getattr(mtrain, "_cache_split", None)   # a baseline may predate it
        stage = split(cfg)[0] if split else None
        t0 = time.perf_counter()
        if hasattr(mtrain, "encode_copies"):       # with the config's jittered copies
            feats = mtrain.encode_copies(model, state, ts.images, cfg, mesh)
        else:
            feats = mtrain.encode(model, state, ts.images, mesh,
                                  **({} if stage is None else {"stage": stage}))
        cache_s = time.perf_counter() - t0
    step = mtrain._cached_step(model, cfg, use_mv)
    n = row["steps"] + 2
    batches = [parallel.shard_batch(mtrain._batch_for_step(ts, cfg, s, use_mv, 0, feats), mesh)
               for s in range(n + 1)]
    holder = {"state": state, "calls": 0}

    def run_step():                      # the step donates its state: thread it through
        s = holder["calls"]
        holder["state"], m = step(holder["state"], batches[s], training.step_key(0, s))
        holder["calls"] += 1
        return m

    compile_s = time_call(run_step)[0]
    for _ in range(2):
        run_step()
    wall, cpu = zip(*(time_call(run_step) for _ in range(row["steps"])))
    step_s = statistics.median(wall)
    b = cfg.sup_batch + (cfg.multiview.num_seqs * cfg.multiview.num_times
                         * cfg.multiview.num_views if use_mv else 0)
    return {"name": "mcss_train_step", **row, "batch": b,
            "cache": None if feats is None else ("tap" if stage is None else f"stage {stage}"),
            "cache_shape": None if feats is None else list(feats.shape[-3:]),
            "s_per_step": step_s, "min_s_per_step": min(wall),
            "cpu_s_per_step": statistics.median(cpu), "images_per_s": b / step_s,
            "compile_s": compile_s, "cache_s": cache_s, "peak_rss_mb": peak_rss_mb(),
            "load": machine_load(), "jax": jax.__version__, "numpy": np.__version__}


def export_tree(ref: str, dest: str) -> str:
    """Commit ``ref``'s files in ``dest``, with this tree's ``benchmarks/`` on top."""
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    shutil.rmtree(os.path.join(dest, "benchmarks"), ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "benchmarks"), os.path.join(dest, "benchmarks"),
                    ignore=shutil.ignore_patterns("__pycache__", ".peers"))
    return subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()


def _median_record(recs: list[dict]) -> dict:
    out = dict(recs[0])
    for k, v in recs[0].items():
        if isinstance(v, float) and k not in ("peak_rss_mb",):
            vals = [r[k] for r in recs if r.get(k) is not None]
            out[k] = statistics.median(vals) if vals else None
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in recs)
    out["rounds"] = len(recs)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--backbones", default="efficientnet_lite0")
    ap.add_argument("--depthwise", default="shift",
                    help="EfficientNet depthwise forms to time (ResNet rows ignore it)")
    ap.add_argument("--image", default="64,128", help="image sizes (square)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row")
    ap.add_argument("--vertices", default="128",
                    help="loss.vertices_per_image values (0 = all)")
    ap.add_argument("--frozen_stages", default="0",
                    help="model.frozen_stages values to time (the frozen stages need no backward)")
    ap.add_argument("--baseline", default=None,
                    help="a git commit to time beside this tree, row by row")
    ap.add_argument("--rounds", type=int, default=1,
                    help="times each row is run (alternating with --baseline); medians reported")
    ap.add_argument("--model", default="nemo", choices=("nemo", "mcss"),
                    help="the NeMo step (--backbones, --batch, --vertices) or the MCSS step "
                         "(--mcss_config, --cache, --method)")
    ap.add_argument("--mcss_config", default="demo", help="experiments/configs/mcss.py arg")
    ap.add_argument("--cache", default="auto",
                    help="MCSS train.cache_features values to time (auto, on, off)")
    ap.add_argument("--method", default="mcss", help="MCSS method: mcss or baseline")
    ap.add_argument("--pretrained", default=None,
                    help="MCSS model.pretrained (default: the config's; '' = random init)")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.row:                                    # the child: one row, JSON on stdout
        huge_pages = run_as_the_binaries()
        row = json.loads(args.row)
        timer = time_mcss_row if row.get("model") == "mcss" else time_row
        print(json.dumps([{**timer(row), "huge_pages": huge_pages}]))
        return

    from nvsm_jax.models import backbone
    rows = []
    for name in (args.backbones.split(",") if args.model == "nemo" else []):
        lite = "encoder" in backbone.PRESETS[name]
        for form in (args.depthwise.split(",") if lite else ["-"]):
            for size in (int(s) for s in args.image.split(",")):
                for vertices in (int(a) for a in args.vertices.split(",")):
                    for frozen in (int(k) for k in args.frozen_stages.split(",")):
                        rows.append({"backbone": name, "depthwise": form, "image": size,
                                     "batch": args.batch, "vertices_per_image": vertices,
                                     "frozen_stages": frozen, "steps": args.steps})
    if args.model == "mcss":
        from experiments.configs import mcss as mcss_config
        for size in (int(s) for s in args.image.split(",")):
            for frozen in (int(k) for k in args.frozen_stages.split(",")):
                for cache in args.cache.split(","):
                    rows.append({"model": "mcss", "config": args.mcss_config, "image": size,
                                 "frozen_stages": frozen, "cache_features": cache,
                                 "depthwise": args.depthwise.split(",")[0],
                                 "method": args.method, "steps": args.steps,
                                 "pretrained": (mcss_config.get_config(args.mcss_config)
                                                .train.model.pretrained
                                                if args.pretrained is None else args.pretrained)})
    records = [{"name": "matmul_gflops", "value": matmul_gflops(), "load": machine_load()}]
    trees = [("", None, "this tree")]
    scratch = None
    if args.baseline:
        scratch = tempfile.mkdtemp(prefix="nvsm_bench_baseline_")
        sha = export_tree(args.baseline, scratch)
        trees.append(("_baseline", scratch, f"{args.baseline} ({sha})"))
    try:
        results: dict = {}
        for rnd in range(args.rounds):
            for row in rows:
                order = trees if rnd % 2 == 0 else trees[::-1]
                for suffix, cwd, label in order:
                    rec = run_row_subprocess("benchmarks.train", row, cwd=cwd)[0]
                    rec["name"] += suffix
                    rec["code"] = label
                    results.setdefault((suffix, json.dumps(row, sort_keys=True)), []).append(rec)
                    if args.model == "mcss":
                        print(f"round {rnd + 1}: {label:>16s} frozen_stages="
                              f"{row['frozen_stages']} cache={rec['cache']} {row['image']}px: "
                              f"{rec['s_per_step']:.3f} s/step (cpu "
                              f"{rec['cpu_s_per_step']:.2f} s/step)", flush=True)
                        continue
                    print(f"round {rnd + 1}: {label:>16s} {row['backbone']} {row['depthwise']} "
                          f"{row['image']}px: {rec['images_per_s']:.1f} images/s "
                          f"(cpu {rec['cpu_s_per_step']:.2f} s/step), forward "
                          f"{rec['forward_images_per_s'] or float('nan'):.1f} images/s",
                          flush=True)
        for row in rows:
            key = json.dumps(row, sort_keys=True)
            cur = _median_record(results[("", key)])
            records.append(cur)
            if args.baseline:
                base = _median_record(results[("_baseline", key)])
                cur["speedup"] = cur["images_per_s"] / base["images_per_s"]
                records.append(base)
        records.append({"name": "matmul_gflops_end", "value": matmul_gflops(),
                        "load": machine_load()})
        peak = max(records[0]["value"], records[-1]["value"])
        for r in records:
            if r.get("gflop_per_s") is not None:
                r["fraction_of_matmul"] = r["gflop_per_s"] / peak
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.model == "mcss":
        print_table([r for r in records if r["name"].startswith("mcss")],
                    ["name", "frozen_stages", "cache_features", "cache", "cache_shape", "image",
                     "batch", "s_per_step", "min_s_per_step", "cpu_s_per_step", "images_per_s",
                     "speedup", "compile_s", "cache_s", "peak_rss_mb", "load"])
    else:
        print_table([r for r in records if r["name"].startswith("nemo")],
                    ["name", "backbone", "depthwise", "image", "images_per_s",
                     "forward_images_per_s", "backward_overhead", "cpu_s_per_step", "gflops",
                     "fraction_of_matmul", "speedup", "compile_s", "peak_rss_mb", "load"])
    print(f"matmul {records[0]['value']:.0f} / {records[-1]['value']:.0f} GFLOP/s (start/end)")
    if args.json:
        write_json(args.json, records)


if __name__ == "__main__":
    sys.exit(main())
