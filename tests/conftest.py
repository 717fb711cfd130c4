"""Suite-wide settings.

* Matplotlib draws off-screen.
* A persistent XLA compilation cache shared by the pytest-xdist workers (and by
  later runs on the same machine): many tests compile the same programs (the
  EM rounds rerun identical train/synthesis/match steps; resume tests rerun a
  training), and on a 2-core machine compilation dominates their run time.
  Set NVSM_JAX_TEST_CACHE="" to disable it.
"""

import os
import tempfile

import matplotlib

matplotlib.use("Agg")

import jax  # noqa: E402

_cache = os.environ.get("NVSM_JAX_TEST_CACHE",
                        os.path.join(tempfile.gettempdir(), "nvsm_jax_test_xla_cache"))
if _cache:
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
