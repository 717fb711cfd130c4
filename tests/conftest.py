"""Suite-wide settings.

* Matplotlib draws off-screen.
* No persistent XLA compilation cache by default. With jax/jaxlib 0.10.2, a
  multi-device CPU program loaded from that cache can run its collectives in a
  different order on different devices (seen: 5 devices waiting at all-gather
  op 24, 3 at op 5 of the same run of the pre-training step), which deadlocks,
  and XLA aborts the process after 40 s. Freshly compiled programs do not.
  NVSM_JAX_TEST_CACHE=DIR turns the cache on (single-device debugging only).
* The suite runs on 8 forced CPU devices: ``XLA_FLAGS`` gains
  ``--xla_force_host_platform_device_count=8`` unless it already sets a count
  (before jax is imported). Tests of the multi-device paths take the
  ``eight_devices`` fixture, which fails, naming the flag, when the count differs.
"""

import os

import matplotlib
import pytest

matplotlib.use("Agg")

_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_COUNT_FLAG}=8").strip()

import jax  # noqa: E402

_cache = os.environ.get("NVSM_JAX_TEST_CACHE", "")
if _cache:
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def eight_devices():
    """The 8 devices the multi-device tests shard over (fails if the suite has others)."""
    devices = jax.devices()
    if len(devices) != 8:
        pytest.fail(f"this test needs 8 devices, found {len(devices)}: run the suite with "
                    f"XLA_FLAGS={_COUNT_FLAG}=8 (make test does)")
    return devices
