"""Reusable pieces for the benchmarks (rasteriser, pose solver, matching, training).

Importing this module is cheap and needs only the standard library; jax and
numpy are imported inside the functions that use them, so a benchmark can
also run helpers from a peer's virtual environment.

Measurement conventions
-----------------------
* :func:`time_fn` compiles/warms up first, then reports the **median** of
  ``repeats`` timed calls, each ending in ``block_until_ready``. Repeat runs
  on a shared 2-core machine differ by 15-20 % or more; report medians and say
  whether the machine was shared (:func:`machine_load` records the load).
* :func:`peak_rss_mb` is the **process** peak (``ru_maxrss``): it never goes
  down, so measure each row in a fresh process (:func:`run_row_subprocess`)
  when you want per-row peaks.
* :func:`matmul_gflops` gives the machine's float32 matmul rate, so results
  can be read as a fraction of the machine.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

__all__ = ["matmul_gflops", "peak_rss_mb", "time_fn", "time_fn_stats", "print_table",
           "write_json", "machine_load", "device_description", "run_row_subprocess",
           "cuboid_mesh", "random_poses"]


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    """float32 ``[n, n] @ [n, n]`` rate of a jitted matmul in GFLOP/s (median call)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    _, seconds = time_fn(f, a, b, warmup=2, repeats=repeats)
    return 2.0 * n ** 3 / seconds / 1e9


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _block(x):
    import jax
    return jax.block_until_ready(x)


def time_call(fn: Callable, *args) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one call ``fn(*args)``, blocked."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    _block(fn(*args))
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return wall, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime


def time_fn_stats(fn: Callable, *args, warmup: int = 1, repeats: int = 5) -> dict:
    """Times ``fn(*args)``.

    Returns ``compile_s`` (first call, including tracing and compilation),
    ``median_s``/``min_s`` per call over ``repeats`` timed calls after
    ``warmup - 1`` more untimed ones, and ``cpu_s``: the median process CPU
    time (user + system) per call, which is less sensitive than wall time to
    other tenants of a shared machine.
    """
    t0 = time.perf_counter()
    _block(fn(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        _block(fn(*args))
    wall, cpu = zip(*(time_call(fn, *args) for _ in range(repeats)))
    return dict(compile_s=compile_s, median_s=statistics.median(wall), min_s=min(wall),
                cpu_s=statistics.median(cpu))


def time_fn(fn: Callable, *args, warmup: int = 1, repeats: int = 5) -> tuple[float, float]:
    """``(compile seconds, median seconds per call)`` of ``fn(*args)``; see :func:`time_fn_stats`."""
    s = time_fn_stats(fn, *args, warmup=warmup, repeats=repeats)
    return s["compile_s"], s["median_s"]


def machine_load() -> float:
    """1-minute load average (how shared the machine was)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def device_description() -> str:
    """e.g. ``cpu x1 (2 cores, x86_64)``."""
    import jax
    devs = jax.devices()
    return f"{devs[0].platform} x{len(devs)} ({os.cpu_count()} cores, {platform.machine()})"


def print_table(records: Sequence[dict], columns: Sequence[str] | None = None,
                file=sys.stdout, header: bool = True) -> None:
    """Prints records as an aligned text table (floats to 3 significant digits).

    ``header=False`` prints only the rows (for streaming one row at a time;
    columns are then padded to at least their names' widths).
    """
    if not records:
        return
    if columns is None:
        columns = []
        for r in records:
            columns += [k for k in r if k not in columns]

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        if isinstance(v, (list, tuple)):
            return "x".join(str(x) for x in v)
        return str(v)

    rows = [[fmt(r.get(c)) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    if header:
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)
    file.flush()


def write_json(path: str, records: Sequence[dict]) -> None:
    """Writes records as a JSON list (creating parent directories)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(list(records), f, indent=1)


def run_row_subprocess(module: str, row: dict, env: dict | None = None,
                       python: str | None = None, timeout: float | None = None,
                       cwd: str | None = None) -> list[dict]:
    """Runs ``python -m module --row JSON`` in a fresh process and returns its records.

    The child prints one JSON list on its last stdout line. A fresh process
    per row makes :func:`peak_rss_mb` a per-row figure and keeps compilation
    caches from leaking between rows. ``cwd`` (default: this repository's root)
    is where ``module`` and the packages it imports are found first: another
    commit's tree times that commit (``benchmarks.train --baseline``).
    """
    cmd = [python or sys.executable, "-m", module, "--row", json.dumps(row)]
    cwd = cwd or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_as_the_binaries() -> bool:
    """A benchmark child (one row, one cell) runs as its tree's binaries do: where
    the library has ``parallel.reexec_with_huge_pages`` (a baseline commit may
    predate it), the process restarts with it. Returns whether glibc's huge-page
    tunable is on in this process (for the record)."""
    from nvsm_jax import parallel
    if hasattr(parallel, "reexec_with_huge_pages"):
        parallel.reexec_with_huge_pages()
    return "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")


def cuboid_mesh(extent: Sequence[float] = (1.0, 0.5, 0.4),
                segments: Sequence[int] = (20, 11, 9)):
    """A NeMo-style grid-faced cuboid centred at the origin, outward normals.

    extent: side lengths (x, y, z); segments: grid cells per side. Returns
    ``(verts [V, 3] float32, faces [F, 3] int32)`` with
    ``F = 4 (nx ny + ny nz + nz nx)`` and ``V = F / 2 + 2``; the defaults give
    1,000 vertices and 1,996 faces, ``(10, 5, 5)`` gives 500 faces.
    """
    import numpy as np
    half = np.asarray(extent, np.float64) / 2
    axes = [np.linspace(-half[i], half[i], segments[i] + 1) for i in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    shape = grid.shape[:3]
    on = np.zeros(shape, bool)
    on[[0, -1]] = True
    on[:, [0, -1]] = True
    on[:, :, [0, -1]] = True
    index = np.full(shape, -1)
    index[on] = np.arange(on.sum())
    faces = []

    def quads(ids, flip):
        a, b = ids[:-1, :-1], ids[1:, :-1]
        c, d = ids[1:, 1:], ids[:-1, 1:]
        t1 = np.stack([a, b, c], -1).reshape(-1, 3)
        t2 = np.stack([a, c, d], -1).reshape(-1, 3)
        tris = np.concatenate([t1, t2])
        faces.append(tris[:, ::-1] if flip else tris)

    # Each side's (u, v) grid, oriented so that u x v points outward unless flipped.
    quads(index[:, :, -1], flip=False)   # +z: x, y
    quads(index[:, :, 0], flip=True)     # -z
    quads(index[:, 0, :], flip=False)    # -y: x, z -> x x z = -y
    quads(index[:, -1, :], flip=True)    # +y
    quads(index[-1, :, :], flip=False)   # +x: y, z
    quads(index[0, :, :], flip=True)     # -x
    return grid[on].astype(np.float32), np.concatenate(faces).astype(np.int32)


def random_poses(n: int, seed: int = 0, distance: float = 5.0,
                 elevation_deg: tuple[float, float] = (-10.0, 40.0),
                 theta_deg: tuple[float, float] = (-10.0, 10.0)):
    """``[n, 4]`` float32 (azimuth, elevation, theta, distance) in radians.

    Azimuth uniform, elevation and theta uniform in the given degree ranges.
    """
    import numpy as np
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, 2 * np.pi, n),
                     np.deg2rad(rng.uniform(*elevation_deg, n)),
                     np.deg2rad(rng.uniform(*theta_deg, n)),
                     np.full(n, distance)], -1).astype(np.float32)
