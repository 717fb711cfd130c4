# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv if missing, installs, runs the main job
#   make test   creates .venv if missing, installs, runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# Multi-device code paths are tested on 8 forced CPU devices. The tests' programs run
# for milliseconds but take seconds to compile: without LLVM optimisation the suite
# takes ~40% less time.
TEST_XLA_FLAGS := --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0
# XLA:CPU's per-call buffers in transparent huge pages (glibc >= 2.35; ignored elsewhere):
# the binaries restart themselves with it (nvsm_jax.parallel.reexec_with_huge_pages)
HUGE_PAGES := GLIBC_TUNABLES=glibc.malloc.hugetlb=1

.PHONY: install demo test test-slow mutants bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.nvsm_fewshot --config experiments/configs/nvsm.py:demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(HUGE_PAGES) XLA_FLAGS="$(TEST_XLA_FLAGS)" $(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

test-slow: $(STAMP)
	$(HUGE_PAGES) XLA_FLAGS="$(TEST_XLA_FLAGS)" $(PY) -m pytest -q -m slow tests

# One-line breaks of the learners, losses, geometry and checks (tests/mutations/): every one
# must make its tests fail. Not part of `make test` (about 10 minutes on 2 cores).
mutants: $(STAMP)
	$(HUGE_PAGES) $(PY) -m tests.mutants --json runs/mutants.json

bench: $(STAMP)
	$(PY) -m benchmarks.rasterizer --json runs/bench/rasterizer.json

clean:
	rm -rf $(VENV) runs .pytest_cache
