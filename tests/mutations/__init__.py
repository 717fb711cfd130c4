"""The mutation list of ``python -m tests.mutants`` (``make mutants``), one module per area.

Each area module defines ``MUTATIONS``: a list of :class:`Mutation`. A mutation is one
small, realistic break of one file: ``old`` (an exact text occurring once in ``file``)
becomes ``new``, and ``tests`` (test files or node ids, from the repository root) must
then fail. ``kind`` is one of :data:`KINDS`. A mutation that cannot change behaviour is
kept with ``equivalent="why"`` and is listed, not run.
"""

from __future__ import annotations

import dataclasses
import importlib

__all__ = ["Mutation", "KINDS", "AREAS", "MUTATIONS"]

KINDS = ("sign", "dropped term", "swapped args", "off by one", "wrong axis",
         "stop_gradient", "inverted mask", "constant", "skipped step")
AREAS = ("nemo", "nvsm", "learners", "core", "faults")


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    kind: str
    area: str = ""
    equivalent: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} not in {KINDS}")
        if self.old == self.new:
            raise ValueError(f"{self.name}: old and new are the same text")
        if not self.tests and not self.equivalent:
            raise ValueError(f"{self.name}: names no test file")


def _collect():
    out, seen = [], set()
    for area in AREAS:
        module = importlib.import_module(f"{__name__}.{area}")
        for m in module.MUTATIONS:
            if m.name in seen:
                raise ValueError(f"mutation name {m.name!r} used twice")
            seen.add(m.name)
            out.append(dataclasses.replace(m, area=area, tests=tuple(m.tests)))
    return out


MUTATIONS = _collect()
