"""One few-shot car cell (NeMo on the 7 anchors, then NVSM), timed phase by phase.

    python -m benchmarks.nvsm_cell --json runs/bench/nvsm_cell.json           # 128 px, ~1 h on 2 cores
    python -m benchmarks.nvsm_cell --size 64 --train 400 --rounds 4 --json runs/bench/nvsm_cell64.json
    python -m benchmarks.nvsm_cell --baseline HEAD~1 --json runs/bench/nvsm_cell_vs_prev.json
    python -m benchmarks.nvsm_cell --size 32 --train 24 --test 4 --rounds 1 \
        --fewshot_steps 4 --steps_per_round 2                                   # smoke run

The cell is ``nvsm_jax.nvsm.experiment.train_and_evaluate`` with the ``nvsm`` config's
``paper`` settings restricted to car, 7 annotations and the methods ``nemo`` and
``nvsm`` (``--size``, ``--train``, ``--test``, ``--rounds`` scale it down), on a
synthetic set rendered first (not timed as training). Phases are timed by wrapping
the library's functions for the run (wall seconds and calls; nested phases are
also inside their parents): ``nemo_row`` (training + evaluation of NeMo-7),
``nvsm_row`` and inside it ``m_step`` (CoKe steps), ``e_step`` (synthesis,
matching, selection), ``pool_features`` and ``round_sources`` (the pool's and the
sources' feature maps), ``evaluation`` (render-and-compare on the test sets, every
row) and ``figures``.

``--baseline REF`` runs the same cell with commit REF's library (exported with
``git archive``, this benchmark copied in), after this tree's, on the same data: the
``_baseline`` record and ``speedup`` (total seconds, REF over this tree).

Each tree's cell runs as that tree's binaries run it: where the library has
``parallel.reexec_with_huge_pages`` the child process restarts with it
(``huge_pages`` in the record; ``NVSM_JAX_HUGE_PAGES=0`` turns it off for both).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.common import (machine_load, matmul_gflops, print_table, run_as_the_binaries,
                               write_json)
from benchmarks.train import ROOT, export_tree

#: The modules' paths before the package layout (a --baseline commit may predate it).
OLD_MODULES = {"nvsm_jax.nvsm.experiment": "nvsm_jax.experiment",
               "nvsm_jax.nvsm.rounds": "nvsm_jax.semi_supervised",
               "nvsm_jax.nemo.train": "nvsm_jax.train"}


def _import(module: str):
    """``module``, or its path before the package layout in an older tree."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return importlib.import_module(OLD_MODULES[module])


PHASES = {                  # phase -> (module, attribute)
    "nemo_row": ("nvsm_jax.nvsm.experiment", "_run_nemo"),
    "nvsm_row": ("nvsm_jax.nvsm.experiment", "_run_nvsm"),
    "m_step": ("nvsm_jax.nvsm.rounds", "_m_step"),
    "e_step": ("nvsm_jax.nvsm.rounds", "e_step"),
    "pool_features": ("nvsm_jax.nvsm.rounds", "pool_features"),
    "round_sources": ("nvsm_jax.nvsm.rounds", "round_sources"),
    "evaluation": ("nvsm_jax.nemo.train", "evaluate_nemo"),
    "figures": ("nvsm_jax.nvsm.experiment", "_nvsm_figures"),
}


def _timed(fn, totals, name):
    @functools.wraps(fn)
    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            totals.setdefault(name, [0.0, 0])
            totals[name][0] += time.perf_counter() - t0
            totals[name][1] += 1
    return wrapper


def cell_config(args):
    from experiments.configs import nvsm
    c = nvsm.get_config("paper")
    c.categories = "car"
    c.annotations = (7,)
    c.methods = ("nemo", "nvsm")
    c.data.image_size = (args.size, args.size)
    c.data.num_train = args.train
    c.data.num_test = args.test
    c.eval_occlusions = ("L0",)
    if args.rounds is not None:
        c.num_rounds = args.rounds
    if args.fewshot_steps is not None:
        c.fewshot_steps = args.fewshot_steps
    if args.steps_per_round is not None:
        c.steps_per_round = args.steps_per_round
    return c


def run_cell(args) -> dict:
    """Generates the data (untimed), then runs and times the cell in this process."""

    experiment = _import("nvsm_jax.nvsm.experiment")
    config = cell_config(args)
    data_dir = os.path.join(args.workdir, "data")
    if not os.path.isdir(os.path.join(data_dir, "test")):
        experiment.ensure_data(config, args.workdir)
    config.data_root = os.path.join(data_dir, "train")
    config.test_root = os.path.join(data_dir, "test")
    totals: dict = {}
    for name, (module, attr) in PHASES.items():
        mod = _import(module)
        setattr(mod, attr, _timed(getattr(mod, attr), totals, name))
    cell = os.path.join(args.workdir, f"cell{args.suffix}")
    t0 = time.perf_counter()
    experiment.train_and_evaluate(config, cell)
    total = time.perf_counter() - t0
    with open(os.path.join(cell, "results.json")) as f:
        rows = json.load(f)["rows"]
    acc = {f"{r['method']}_{r['occlusion']}_{k}": r[k] for r in rows
           if r.get("method") in ("nemo", "nvsm") for k in ("acc_pi_6", "med_err_deg")}
    return {"name": f"nvsm_cell{args.suffix}", "size": args.size, "train": args.train,
            "test": args.test, "rounds": config.num_rounds, "total_s": total,
            **{f"{k}_s": v[0] for k, v in totals.items()},
            **{f"{k}_calls": v[1] for k, v in totals.items()}, **acc, "load": machine_load()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--train", type=int, default=1000, help="training images (the pool)")
    ap.add_argument("--test", type=int, default=50, help="L0 test images")
    ap.add_argument("--rounds", type=int, default=None, help="NVSM rounds (default: the config's)")
    ap.add_argument("--fewshot_steps", type=int, default=None,
                    help="NeMo-7 / NVSM round-0 steps (default: the config's)")
    ap.add_argument("--steps_per_round", type=int, default=None,
                    help="NVSM M-step steps (default: the config's)")
    ap.add_argument("--baseline", default=None, help="a git commit to time after this tree")
    ap.add_argument("--suffix", default="", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    own = args.workdir is None
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="nvsm_cell_"))
    if args.child:
        huge_pages = run_as_the_binaries()
        print(json.dumps({**run_cell(args), "huge_pages": huge_pages}))
        return
    records = [{"name": "matmul_gflops", "value": matmul_gflops(), "load": machine_load()}]
    scratch = None
    try:
        trees = [("", ROOT)]
        if args.baseline:
            scratch = tempfile.mkdtemp(prefix="nvsm_cell_baseline_")
            export_tree(args.baseline, scratch)
            trees.append(("_baseline", scratch))
        for suffix, cwd in trees:
            cmd = [sys.executable, "-m", "benchmarks.nvsm_cell", "--child", "--workdir",
                   args.workdir, "--size", str(args.size), "--train", str(args.train),
                   "--test", str(args.test), "--suffix", suffix]
            for flag in ("rounds", "fewshot_steps", "steps_per_round"):
                if getattr(args, flag) is not None:
                    cmd += [f"--{flag}", str(getattr(args, flag))]
            out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} (in {cwd}) failed:\n{out.stderr[-4000:]}")
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rec["code"] = args.baseline if suffix else "this tree"
            records.append(rec)
            print(f"{rec['code']}: {rec['total_s']:.0f} s", flush=True)
        if args.baseline:
            records[1]["speedup"] = records[2]["total_s"] / records[1]["total_s"]
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        if own:
            shutil.rmtree(args.workdir, ignore_errors=True)
    cols = ["name", "total_s"] + [f"{p}_s" for p in PHASES] + ["speedup", "load"]
    print_table(records[1:], [c for c in cols if any(c in r for r in records[1:])])
    if args.json:
        write_json(args.json, records)


if __name__ == "__main__":
    sys.exit(main())
