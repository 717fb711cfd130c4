"""Starts one training command as N cooperating jax processes on this machine.

    nvsm-launch --num_processes 2 -- \\
        nvsm-train-nemo --config=nemo:tiny --config.data_root=syn/train --workdir /tmp/nemo_2p

Every process gets the variables :func:`nvsm_jax.parallel.initialize` reads
(``JAX_COORDINATOR_ADDRESS`` = ``127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``), runs on the CPU (``JAX_PLATFORMS=cpu``; collectives through
gloo) with its share of forced CPU devices (``--devices_per_process``; default:
the parent's ``--xla_force_host_platform_device_count`` divided by N, else 1),
and its output prefixed with ``[p<i>]``. When one process fails the others are
stopped (they would wait at the next collective until jax's timeout). The exit
status is the first failure's, else 0. It is the one-machine stand-in for a
pod or a multi-host GPU job, where the cluster starts the processes and sets these
variables (or jax finds them itself: a TPU pod, SLURM, Open MPI), and the workdir
is one folder every host sees.

The command after ``--`` is run as given (``syn/train`` above: made by
``nvsm-make-synthetic --config=synthetic:tiny --out syn``); a leading ``python`` is
this interpreter. :func:`launch` is the same as a library call (the tests use it).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from . import ArgumentParser

__all__ = ["launch", "free_port", "process_env", "main"]

_COUNT = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forced_count(flags: str) -> int | None:
    m = re.search(_COUNT + r"=(\d+)", flags)
    return int(m.group(1)) if m else None


def process_env(process_id: int, num_processes: int, address: str, *,
                devices_per_process: int | None = None, platform: str = "cpu",
                base: dict | None = None) -> dict:
    """The environment of process ``process_id``: ``base`` (default ``os.environ``)
    plus the coordinator variables and, on CPU, the forced device count."""
    env = dict(os.environ if base is None else base)
    flags = env.get("XLA_FLAGS", "")
    if devices_per_process is None:
        parent = _forced_count(flags)
        devices_per_process = max(1, parent // num_processes) if parent else 1
    env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id))
    if platform:
        env["JAX_PLATFORMS"] = platform
    if platform == "cpu":
        flags = re.sub(_COUNT + r"=\d+", "", flags).strip()
        env["XLA_FLAGS"] = f"{flags} {_COUNT}={int(devices_per_process)}".strip()
    return env


def _command(argv: list[str]) -> list[str]:
    if not argv:
        raise ValueError("launch: no command given (put it after --)")
    if argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    if argv[0].endswith(".py"):
        return [sys.executable, *argv]
    return list(argv)


def _pump(stream, prefix: str, sink) -> None:
    for line in iter(stream.readline, b""):
        sink.write(prefix + line.decode(errors="replace"))
        sink.flush()
    stream.close()


def launch(argv: list[str], num_processes: int, *, devices_per_process: int | None = None,
           platform: str = "cpu", env: dict | None = None, timeout: float | None = None,
           cwd: str | None = None, log_dir: str | None = None, sink=None) -> list[int]:
    """Runs ``argv`` as ``num_processes`` jax processes; returns their exit codes.

    env: extra variables for every process; log_dir: each process's output also
    goes to ``log_dir/process_<i>.log`` (else only to ``sink``, default stdout);
    timeout: seconds before every process still running is killed (exit code
    ``-9``). A process that fails stops the others (SIGTERM, then SIGKILL after
    10 s).
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    cmd = _command(argv)
    address = f"127.0.0.1:{free_port()}"
    sink = sink or sys.stdout
    base = dict(os.environ, **(env or {}))
    procs, pumps, logs = [], [], []
    for i in range(num_processes):
        penv = process_env(i, num_processes, address, devices_per_process=devices_per_process,
                           platform=platform, base=base)
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            logs.append(open(os.path.join(log_dir, f"process_{i}.log"), "w"))
        p = subprocess.Popen(cmd, env=penv, cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        out = logs[-1] if log_dir else sink
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out), daemon=True)
        t.start()
        pumps.append(t)
    deadline = None if timeout is None else time.monotonic() + timeout
    failed_at = None
    try:
        while any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = time.monotonic()
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            if failed_at is not None and time.monotonic() - failed_at > 10:
                _kill_all(procs)
            if deadline is not None and time.monotonic() > deadline:
                _kill_all(procs)
            time.sleep(0.05)
    except KeyboardInterrupt:
        _kill_all(procs)
        raise
    finally:
        for t in pumps:
            t.join(timeout=5)
        for f in logs:
            f.close()
    return [p.returncode for p in procs]


def _kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(description=__doc__, debug=False)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="forced CPU devices per process (default: the parent's "
                             f"{_COUNT} / N, else 1)")
    parser.add_argument("--platform", default="cpu",
                        help="JAX_PLATFORMS of the processes ('' keeps the environment's)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds, then kill all")
    parser.add_argument("--log_dir", default=None, help="also write process_<i>.log here")
    if "--" not in argv:          # --help prints the usage; anything else lacks the command
        parser.parse_args(argv)
        parser.error("no command given: put it after --")
    cut = argv.index("--")
    args = parser.parse_args(argv[:cut])
    codes = launch(argv[cut + 1:], args.num_processes,
                   devices_per_process=args.devices_per_process, platform=args.platform,
                   timeout=args.timeout, log_dir=args.log_dir)
    bad = [c for c in codes if c != 0]
    if bad:
        print(f"launch: exit codes {codes}", file=sys.stderr)
        return bad[0] if bad[0] > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
