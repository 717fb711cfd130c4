"""One code path for 1 CPU, 8 forced CPU devices, a GPU or a TPU pod.

Every batch lives on a ``Mesh`` with a single ``data`` axis: the leading
(batch) dimension is sharded over it, everything else (params, optimiser state,
memory banks) is replicated. Jitted functions take and return such arrays and
XLA inserts the collectives. Multi-host runs call :func:`initialize` first;
each process then feeds its own slice of the global batch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DATA", "initialize", "make_mesh", "data_sharding", "replicated",
           "shard_batch", "replicate", "pad_to_multiple", "is_main_process",
           "wait_if_cpu_collectives", "quiet_backend_probe_logs"]

DATA = "data"


def initialize() -> None:
    """``jax.distributed.initialize()`` on multi-host runs; a no-op on one host.

    A pod or multi-process run is recognised by the coordinator variables JAX
    reads itself (TPU pods, SLURM, or ``JAX_COORDINATOR_ADDRESS``).
    """
    markers = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES")
    if any(os.environ.get(k) for k in markers) and jax.process_count() == 1:
        try:
            jax.distributed.initialize()
        except (RuntimeError, ValueError) as err:  # already initialised, or one host
            if "already" not in str(err) and os.environ.get("JAX_COORDINATOR_ADDRESS"):
                raise


class _BackendProbeFilter(logging.Filter):
    """Drops jax's INFO record of an optional backend that failed to load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO
                    and str(record.msg).startswith("Unable to initialize backend"))


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
    """A 1-D mesh over the first ``num_devices`` devices (all by default)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
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


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places host numpy arrays as global arrays sharded over ``data``.

    On one process this is ``device_put`` with the data sharding; on several,
    each process passes its local rows and the global array is assembled with
    ``make_array_from_process_local_data``. Leading sizes must divide evenly
    by the number of devices (see :func:`pad_to_multiple`).
    """
    sharding = data_sharding(mesh)
    n_dev = mesh.devices.size

    def put(x):
        x = np.asarray(x)
        if jax.process_count() == 1:
            if x.shape[0] % n_dev:
                raise ValueError(f"batch of {x.shape[0]} rows does not split over {n_dev} devices; "
                                 "pad it with pad_to_multiple")
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree fully replicated on the mesh."""
    return jax.device_put(tree, replicated(mesh))


def is_main_process() -> bool:
    return jax.process_index() == 0
