"""``parallel.reexec_with_huge_pages``: the binaries' one restart under glibc's
``glibc.malloc.hugetlb=1`` tunable, and when it must not happen."""

import os
import subprocess
import sys

import pytest

from nvsm_jax import parallel

_PROBE = """
import os
from nvsm_jax import parallel
print("run", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
parallel.reexec_with_huge_pages()
print("continued", flush=True)
"""


def _supported() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp_on = "[never]" not in f.read()
    except OSError:
        return False
    return sys.platform.startswith("linux") and thp_on and parallel._glibc_at_least(2, 35)


def _probe(**env):
    full = {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", parallel.ENV_HUGE_PAGES)}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         env=full, timeout=120, check=True)
    return [line.split(" ", 2) for line in out.stdout.splitlines()]


@pytest.mark.skipif(not _supported(), reason="needs Linux, glibc >= 2.35 and THP not 'never'")
def test_restarts_once_with_the_tunable_keeping_others():
    lines = _probe(GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    # the first run restarts (same PID), the second sees both tunables and continues
    assert [line[0] for line in lines] == ["run", "run", "continued"]
    assert lines[0][1] == lines[1][1]
    assert lines[0][2] == "glibc.malloc.arena_max=4"
    assert lines[1][2] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"


def test_switched_off_or_already_set_means_no_restart():
    off = _probe(**{parallel.ENV_HUGE_PAGES: "0"})
    assert [line[0] for line in off] == ["run", "continued"] and off[0][2] == "None"
    already = _probe(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert [line[0] for line in already] == ["run", "continued"]
    assert already[0][2] == "glibc.malloc.hugetlb=0"
