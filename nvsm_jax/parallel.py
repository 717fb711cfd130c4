"""One code path for 1 CPU, 8 forced CPU devices, a GPU or a TPU pod.

Every batch lives on a ``Mesh`` with a single ``data`` axis: the leading
(batch) dimension is sharded over it, everything else (params, optimiser state,
memory banks) is replicated. Jitted functions take and return such arrays and
XLA inserts the collectives. Multi-process runs (a TPU pod, several GPU
hosts, or ``nvsm-launch`` on one machine) call
:func:`initialize` first; each process then reads and feeds only its own rows
of each global batch (:func:`process_rows`, ``shard_batch(...,
process_local=True)``), and :func:`host_array` brings a sharded result back to
every process.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DATA", "initialize", "make_mesh", "data_sharding", "replicated",
           "shard_batch", "replicate", "pad_to_multiple", "is_main_process",
           "wait_if_cpu_collectives", "quiet_backend_probe_logs", "process_rows",
           "local_rows", "host_array", "sync", "ENV_COORDINATOR", "ENV_NUM_PROCESSES",
           "ENV_PROCESS_ID", "reexec_with_huge_pages", "ENV_HUGE_PAGES"]

DATA = "data"


# The variables :func:`initialize` reads (``experiments.launch`` sets them per process).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"   # host:port of process 0's coordinator
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"       # processes in the run
ENV_PROCESS_ID = "JAX_PROCESS_ID"             # this process, 0 .. JAX_NUM_PROCESSES - 1
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"  # optional: "0,1" (read by jax itself)
_CLUSTER_MARKERS = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE")


def _distributed_started() -> bool:
    try:
        return bool(jax.distributed.is_initialized())
    except AttributeError:       # older jax
        from jax._src import distributed
        return distributed.global_state.client is not None


def initialize() -> None:
    """Starts ``jax.distributed`` on a multi-process run; a no-op on one process.

    Call it first, before anything touches a device (it must run before jax
    creates its backends). It reads, in this order:

    * ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES``
      and ``JAX_PROCESS_ID``: an explicit multi-process run (``experiments.launch``
      sets all three, and so can any cluster script; ``JAX_LOCAL_DEVICE_IDS`` optionally
      names this process's devices);
    * otherwise the cluster's own variables (``SLURM_JOB_ID``, a TPU pod's
      ``TPU_WORKER_HOSTNAMES``, Open MPI's ``OMPI_COMM_WORLD_SIZE``): jax detects the
      coordinator, process count and index itself;
    * none of them: one process, nothing to do.

    On CPU the processes exchange collectives through gloo
    (``jax_cpu_collectives_implementation``). Idempotent.
    """
    if _distributed_started():
        return
    address = os.environ.get(ENV_COORDINATOR)
    num = os.environ.get(ENV_NUM_PROCESSES)
    pid = os.environ.get(ENV_PROCESS_ID)
    if address and (num is None) != (pid is None):
        raise ValueError(f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} go together (got "
                         f"{ENV_NUM_PROCESSES}={num!r}, {ENV_PROCESS_ID}={pid!r})")
    explicit = bool(address) and num is not None
    if explicit and int(num) == 1:
        return
    if not explicit and not any(os.environ.get(k) for k in _CLUSTER_MARKERS):
        return
    if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu").split(","):
        # CPU processes reach each other through gloo (jax's default since 0.4.3x;
        # set explicitly so an older default or a user config cannot leave them without)
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except AttributeError:
            jax.config.update("jax_cpu_enable_gloo_collectives", True)
    if explicit:
        jax.distributed.initialize(coordinator_address=address, num_processes=int(num),
                                   process_id=int(pid))
    else:
        jax.distributed.initialize()


class _BackendProbeFilter(logging.Filter):
    """Drops jax's INFO record of an optional backend that failed to load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO
                    and str(record.msg).startswith("Unable to initialize backend"))


ENV_HUGE_PAGES = "NVSM_JAX_HUGE_PAGES"   # "0": binaries leave the allocator as it is
_HUGETLB_TUNABLE = "glibc.malloc.hugetlb"


def _glibc_at_least(major: int, minor: int) -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (major, minor)
    except (AttributeError, ValueError, OSError):
        return False


def reexec_with_huge_pages() -> None:
    """Restarts this process once with glibc's malloc backing large blocks by
    transparent huge pages (the tunable ``glibc.malloc.hugetlb=1``).

    XLA:CPU allocates a step's working buffers afresh on every call and glibc
    gives them back to the system afterwards, so each step faults them all in
    again: at 128 px a Lite0 NeMo step took 100,000 page faults and 0.19 s of
    system time on 2 cores. In 2 MB pages it took 350 and ran 1.2-1.35x faster
    (measured, WORKSPACE.md). glibc reads its tunables only at start-up, hence
    the restart (same interpreter, same command line, same PID). The binaries
    call this first thing in ``main``, before jax computes anything; it does
    nothing where the tunable is already set (the restarted process), where
    glibc is older than 2.35 or absent, where transparent huge pages are off
    (``never``), or with ``NVSM_JAX_HUGE_PAGES=0``.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (os.environ.get(ENV_HUGE_PAGES, "1") == "0" or _HUGETLB_TUNABLE in tunables
            or not sys.platform.startswith("linux") or not _glibc_at_least(2, 35)
            or not getattr(sys, "orig_argv", None)):
        return
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return
    except OSError:
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(
        t for t in (tunables, f"{_HUGETLB_TUNABLE}=1") if t))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as err:      # keep running as we are
        logging.getLogger(__name__).warning("could not restart with %s=1: %s",
                                            _HUGETLB_TUNABLE, err)


def quiet_backend_probe_logs() -> None:
    """Hides the "Unable to initialize backend 'tpu': ... libtpu.so" line of CPU/GPU runs.

    At start-up jax probes every registered backend and logs, at INFO, each optional one
    that is not there (the TPU plugin on every CPU or GPU machine); the binaries log at
    INFO, so every run printed it. This drops exactly those INFO records of
    ``jax._src.xla_bridge``. Nothing real is hidden: a backend that was asked for
    (``JAX_PLATFORMS=tpu``) and fails raises, jax's "a TPU/GPU may be present but ..."
    hints are WARNINGs and stay, and ``jax.devices("tpu")`` still raises with the reason.
    Idempotent.
    """
    logger = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _BackendProbeFilter) for f in logger.filters):
        logger.addFilter(_BackendProbeFilter())


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all by default).

    On several processes the global device list is process-major (process 0's
    devices, then process 1's, ...), so each process's rows of a ``data``-sharded
    array are one contiguous block (:func:`process_rows`). A mesh smaller than one
    process's devices (e.g. ``make_mesh(1)`` for inference) takes this process's
    own devices: it then runs on each process alone, with no collectives.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
    if jax.process_count() > 1:
        local = jax.local_devices()
        if n <= len(local):
            return Mesh(np.asarray(local[:n]), (DATA,))
        if n != len(devices):
            raise ValueError(f"num_devices={n}: a mesh over several processes takes all "
                             f"{len(devices)} devices, or at most one process's {len(local)}")
        devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices[:n]), (DATA,))


def wait_if_cpu_collectives(tree: Any, mesh: Mesh) -> Any:
    """Blocks until ``tree`` is computed when ``mesh`` spans several CPU devices.

    Step loops call this after each step. XLA's in-process CPU collectives run
    every device's share of a program on one shared thread pool; when two
    programs with collectives overlap (async dispatch of step s + 1 while step s
    still runs), the pool can fill with threads waiting at one rendezvous while
    the last participant has no thread to run on, and XLA aborts the process
    after 40 s ("may be stuck ... not all of them arrived"). One step in flight at
    a time avoids it. GPUs, TPUs and single-device runs keep async dispatch.
    Returns ``tree``.
    """
    if mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu":
        jax.block_until_ready(tree)
    return tree


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``data``."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def pad_to_multiple(batch: Any, multiple: int) -> tuple[Any, int]:
    """Pads every leaf's leading axis (by repeating the last row) to a multiple.

    Returns ``(padded, n)`` where ``n`` is the original length, so results can be
    cut back with ``[:n]``. An empty batch raises ValueError.
    """
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("pad_to_multiple: empty batch")
    n = len(leaves[0])
    if n == 0:
        raise ValueError("pad_to_multiple: batch has no rows")
    pad = (-n) % multiple

    def _pad(x):
        x = np.asarray(x)
        if pad == 0:
            return x
        return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)

    return jax.tree_util.tree_map(_pad, batch), n


def _is_local(mesh: Mesh) -> bool:
    """Whether every device of ``mesh`` belongs to this process."""
    if jax.process_count() == 1:
        return True
    me = jax.process_index()
    return all(d.process_index == me for d in mesh.devices.flat)


def process_rows(n: int, mesh: Mesh) -> slice:
    """The rows ``[start, stop)`` of a ``data``-sharded leading axis of length ``n``
    that this process's devices hold (all of them on one process). ``n`` must split
    evenly over the mesh's devices."""
    n_dev = mesh.devices.size
    if n % n_dev:
        raise ValueError(f"{n} rows do not split over {n_dev} devices; pad them with "
                         "pad_to_multiple")
    if _is_local(mesh):
        return slice(0, n)
    index = data_sharding(mesh).addressable_devices_indices_map((n,))
    starts = sorted(sl[0].start or 0 for sl in index.values())
    per = n // n_dev
    start, stop = starts[0], starts[-1] + per
    if len(set(starts)) * per != stop - start:
        raise ValueError("this process's devices hold no contiguous block of the data axis; "
                         "build the mesh with parallel.make_mesh")
    return slice(start, stop)


def local_rows(n: int, mesh: Mesh) -> tuple[slice, int]:
    """This process's share of ``n`` real rows once padded to the devices.

    Returns ``(rows, n_padded)``: ``rows`` the real rows (a slice of ``0 .. n``,
    possibly empty) this process computes, ``n_padded`` the padded global length
    (:func:`process_rows` of it, cut at ``n``, is ``rows``)."""
    n_pad = -(-int(n) // mesh.devices.size) * mesh.devices.size
    block = process_rows(n_pad, mesh)
    return slice(min(block.start, n), min(block.stop, n)), n_pad


def shard_batch(batch: Any, mesh: Mesh, *, process_local: bool = False) -> Any:
    """Places host numpy arrays as global arrays sharded over ``data``.

    By default every leaf holds the whole global batch (the same on every process):
    one process ``device_put``s it; on several, each process keeps its rows
    (:func:`process_rows`). With ``process_local=True`` the leaves hold only this
    process's rows (each process read just those) and the global array is
    assembled with ``make_array_from_process_local_data``. Leading sizes must
    divide evenly by the number of devices (see :func:`pad_to_multiple`).
    """
    sharding = data_sharding(mesh)
    n_dev = mesh.devices.size
    n_proc = 1 if _is_local(mesh) else len({d.process_index for d in mesh.devices.flat})

    def put(x):
        x = np.asarray(x)
        if n_proc == 1:
            if x.shape[0] % n_dev:
                raise ValueError(f"batch of {x.shape[0]} rows does not split over {n_dev} "
                                 "devices; pad it with pad_to_multiple")
            return jax.device_put(x, sharding)
        if process_local:
            return jax.make_array_from_process_local_data(
                sharding, x, (x.shape[0] * n_proc,) + x.shape[1:])
        rows = process_rows(x.shape[0], mesh)
        return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)

    return jax.tree_util.tree_map(put, batch)


def host_array(x) -> np.ndarray:
    """A (possibly multi-process) jax array as the whole numpy array, on every process.

    Fully addressable or fully replicated arrays are read directly; a sharded global
    array is gathered from all processes (every process must call this together)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync(name: str) -> None:
    """A barrier of all processes (a no-op on one), e.g. before process 0 writes a
    file that the others read next."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree fully replicated on the mesh."""
    return jax.device_put(tree, replicated(mesh))


def is_main_process() -> bool:
    return jax.process_index() == 0
