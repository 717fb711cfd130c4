"""Mutation check: every one-line break in ``tests/mutations/`` must fail its tests.

    make mutants                                   # every mutation, table + exit status
    python -m tests.mutants --only nemo_grad_ascent,solver_no_clutter
    python -m tests.mutants --area nemo            # the mutations of tests/mutations/nemo.py
    python -m tests.mutants --list                 # the list, nothing run
    python -m tests.mutants --json runs/mutants.json

The repository's files (tracked and untracked, not ignored) are copied once into a
scratch folder. Each mutation replaces one exact text in one file of that copy (the
text must occur exactly once, so a stale entry fails loudly instead of mutating
nothing), runs the test files named for it with ``pytest -x`` under the suite's XLA
flags, and puts the file back. A mutation is *caught* when pytest fails, *missed*
when it passes. Mutations marked ``equivalent`` (with the reason) are listed, not run.
The exit status is 1 when any mutation is missed or its text is not found.

Not part of ``make test``: one mutation costs the named files' run time (10-90 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.mutations import MUTATIONS, Mutation

ROOT = Path(__file__).resolve().parent.parent
XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"


def scratch_copy(dest: Path) -> Path:
    """Copy the repository's tracked and untracked-but-not-ignored files into ``dest``."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if not src.is_file():
            continue                                  # a deleted, not yet committed file
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


def apply(mutation: Mutation, root: Path) -> str:
    """Write the mutated file into ``root``; return the original text."""
    path = root / mutation.file
    if not path.is_file():
        raise LookupError(f"{mutation.name}: {mutation.file} does not exist")
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise LookupError(f"{mutation.name}: the text to replace occurs {count} times in "
                          f"{mutation.file} (needs exactly 1): {mutation.old!r}")
    path.write_text(text.replace(mutation.old, mutation.new))
    return text


def run_tests(mutation: Mutation, root: Path, timeout: float) -> tuple[str, float, str]:
    """-> (status, seconds, last lines of pytest's output)."""
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, PYTHONPATH=str(root),
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "--no-header", "-W", "ignore"]
    files = {t.split("::")[0] for t in mutation.tests}
    if len(files) > 1:
        cmd += ["-n", "2", "--dist", "loadfile"]
    cmd += list(mutation.tests)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "caught (timeout)", time.perf_counter() - t0, f"timed out after {timeout:.0f} s"
    dt = time.perf_counter() - t0
    output = proc.stdout + proc.stderr
    tail = "\n".join(output.strip().splitlines()[-3:])
    if proc.returncode == 0:
        return "MISSED", dt, tail
    # 1: tests failed; 2: interrupted, e.g. the mutated module no longer imports. Not a
    # catch: no test selected (5), a named test that does not exist, pytest's own errors.
    if proc.returncode == 5 or "not found:" in output or "no match in any of" in output:
        return "ERROR (no such test)", dt, tail
    if proc.returncode not in (1, 2):
        return f"ERROR (pytest exit {proc.returncode})", dt, tail
    return "caught", dt, tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    ap.add_argument("--area", default="", help="comma-separated areas (tests/mutations/AREA.py)")
    ap.add_argument("--list", action="store_true", help="print the list and exit")
    ap.add_argument("--json", default="", help="also write the table as JSON")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = ap.parse_args(argv)

    chosen = list(MUTATIONS)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {m.name for m in chosen}
        if unknown:
            ap.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
        chosen = [m for m in chosen if m.name in names]
    if args.area:
        areas = set(args.area.split(","))
        chosen = [m for m in chosen if m.area in areas]
    if args.list:
        for m in chosen:
            tag = f"equivalent: {m.equivalent}" if m.equivalent else ", ".join(m.tests)
            print(f"{m.name:40s} {m.kind:18s} {m.file}  [{tag}]")
        print(f"{len(chosen)} mutations")
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="nvsm_mutants_"))
    rows = []
    t_all = time.perf_counter()
    try:
        scratch_copy(scratch)
        print(f"{len(chosen)} mutations, scratch copy {scratch}", flush=True)
        for i, m in enumerate(chosen, 1):
            if m.equivalent:
                rows.append({"name": m.name, "area": m.area, "kind": m.kind, "file": m.file,
                             "status": "equivalent", "seconds": 0.0, "detail": m.equivalent})
                continue
            try:
                original = apply(m, scratch)
            except LookupError as e:
                rows.append({"name": m.name, "area": m.area, "kind": m.kind, "file": m.file,
                             "status": "NOT FOUND", "seconds": 0.0, "detail": str(e)})
                print(f"[{i}/{len(chosen)}] {m.name}: NOT FOUND", flush=True)
                continue
            try:
                status, dt, tail = run_tests(m, scratch, args.timeout)
            finally:
                (scratch / m.file).write_text(original)
            rows.append({"name": m.name, "area": m.area, "kind": m.kind, "file": m.file,
                         "status": status, "seconds": round(dt, 1), "detail": tail})
            print(f"[{i}/{len(chosen)}] {m.name}: {status} ({dt:.0f} s)", flush=True)
            if status != "caught":
                print("    " + tail.replace("\n", "\n    "), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    total = time.perf_counter() - t_all

    print("\n| mutation | area | kind | file | result | s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['area']} | {r['kind']} | {r['file']} | {r['status']} "
              f"| {r['seconds']:.0f} |")
    run = [r for r in rows if r["status"] != "equivalent"]
    caught = sum(r["status"].startswith("caught") for r in run)
    equivalent = len(rows) - len(run)
    print(f"\ncaught {caught} / {len(run)}" + (f" ({equivalent} equivalent, not run)"
                                                if equivalent else "")
          + f" in {total:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "caught": caught,
                                               "run": len(run), "seconds": total}, indent=1))
    return 0 if caught == len(run) else 1


if __name__ == "__main__":
    sys.exit(main())
