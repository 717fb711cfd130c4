"""Suite-wide settings.

* Matplotlib draws off-screen.
* No persistent XLA compilation cache by default. With jax/jaxlib 0.10.2, a
  multi-device CPU program loaded from that cache can run its collectives in a
  different order on different devices (seen: 5 devices waiting at all-gather
  op 24, 3 at op 5 of the same run of the pre-training step), which deadlocks,
  and XLA aborts the process after 40 s. Freshly compiled programs do not.
  NVSM_JAX_TEST_CACHE=DIR turns the cache on (single-device debugging only).
"""

import os

import matplotlib

matplotlib.use("Agg")

import jax  # noqa: E402

_cache = os.environ.get("NVSM_JAX_TEST_CACHE", "")
if _cache:
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
