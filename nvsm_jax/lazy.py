"""Lazy package exports: a package's ``__init__`` names its public API without
importing the modules that hold it (and their jax) until a name is first used, so
that a jax-free module of the package (a config file's settings) loads fast."""

from __future__ import annotations

import importlib

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for ``package``: ``exports`` maps each public name to
    the submodule (relative to ``package``) that defines it (PEP 562). The package sets
    ``__dir__ = lambda: sorted(set(globals()) | set(__all__))`` for tab completion."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(importlib.import_module(package), name, value)     # later reads: no call
        return value

    return __getattr__
