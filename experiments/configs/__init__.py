"""The experiments' ml_collections configs, one module per experiment.

A config is named by a spec ``NAME[:ARG]`` or ``PATH[:ARG]``; ``ARG`` goes to the
module's ``get_config(arg)`` (without ``:ARG``, ``get_config()`` uses its default):

* ``nvsm:demo``, ``nemo:tiny``, ``mcss``, ``synthetic:tiny``: a config of this
  package (``nemo``, ``nvsm``, ``mcss``, ``synthetic``), found from any folder
  and under both names of the package (``experiments.configs`` in the repository,
  ``nvsm_jax_experiments.configs`` once installed);
* ``my_config.py:arg``, ``/abs/path/config.py``: a file (relative to the current
  folder). A path that does not exist is an error (:class:`nvsm_jax.errors.ConfigError`
  naming it), never the package's config of the same name; a file that *is* one of
  this package's (``experiments/configs/nvsm.py`` from the repository root) is
  imported as the package module, so its relative imports work.

:func:`load_config` returns the config; :func:`DEFINE_config` defines an absl flag
(``--config=nvsm:demo``, overrides ``--config.steps=3``) that resolves specs this way.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import types

from nvsm_jax.errors import ConfigError

__all__ = ["NAMES", "resolve", "load_config", "DEFINE_config"]

#: The package's config modules.
NAMES = ("mcss", "nemo", "nvsm", "synthetic")

_DIR = os.path.dirname(os.path.abspath(__file__))


def _package_module(name: str) -> types.ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def _package_name_of(path: str) -> str | None:
    """``.../configs/NAME.py`` with NAME one of the package's configs -> NAME (a hint)."""
    parts = os.path.normpath(path).replace("\\", "/").split("/")
    if len(parts) >= 2 and parts[-2] == "configs" and parts[-1].endswith(".py"):
        name = parts[-1][:-3]
        if name in NAMES:
            return name
    return None


def resolve(spec: str) -> tuple[types.ModuleType, str | None]:
    """``NAME[:ARG]`` or ``PATH[:ARG]`` -> ``(config module, ARG or None)``.

    Raises ConfigError (a ValueError: an unknown name, a missing file) naming it and
    what exists.
    """
    if not spec:
        raise ConfigError(f"empty config spec; use NAME[:ARG] with NAME in {NAMES} or PATH[:ARG]")
    path, sep, arg = spec.partition(":")
    arg_or_none = arg if sep else None
    is_path = path.endswith(".py") or os.sep in path or "/" in path
    if not is_path:
        if path not in NAMES:
            raise ConfigError(f"unknown config {path!r} in {spec!r}: the package's configs are "
                              f"{', '.join(NAMES)} (NAME[:ARG]), or give a file PATH[:ARG]")
        return _package_module(path), arg_or_none
    if os.path.isfile(path):
        if os.path.dirname(os.path.abspath(path)) == _DIR:
            name = os.path.basename(path)[:-3]
            if name in NAMES:
                return _package_module(name), arg_or_none
        return _load_file(path), arg_or_none
    name = _package_name_of(path)
    hint = (f"for the package's own {name!r} config write --config={name}{sep}{arg}"
            if name else f"the package's configs are {', '.join(NAMES)} (e.g. --config=nvsm:demo)")
    raise ConfigError(f"config file {path!r} not found (from {os.getcwd()!r}); {hint}")


def _load_file(path: str) -> types.ModuleType:
    mod_name = "_nvsm_config_" + os.path.basename(path)[:-3].replace("-", "_").replace(".", "_")
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {path!r}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not callable(getattr(mod, "get_config", None)):
        raise ConfigError(f"config file {path!r} has no get_config()")
    return mod


def load_config(spec: str):
    """The ``get_config(ARG)`` result of a ``NAME[:ARG]`` / ``PATH[:ARG]`` spec."""
    mod, arg = resolve(spec)
    return mod.get_config() if arg is None else mod.get_config(arg)


def DEFINE_config(name: str = "config", default: str | None = None,  # noqa: N802 (absl style)
                  help_string: str | None = None, lock_config: bool = True):
    """An absl flag like ``config_flags.DEFINE_config_file`` whose value is a spec.

    ``--NAME=nvsm:demo`` or ``--NAME=path/to/config.py:arg``, with the usual
    ``--NAME.field=value`` overrides. Returns the flag holder.
    """
    from absl import flags
    from ml_collections.config_flags import config_flags

    flags.disclaim_key_flags()  # the flag belongs to the binary that calls this (its --help)
    class _SpecParser(config_flags.ConfigFileFlagParser):
        def parse(self, argument):
            config = load_config(argument)  # a ValueError: absl reports a bad flag value
            if self._lock_config:
                config_flags._LockConfig(config)  # pylint: disable=protected-access
            return config

    help_string = help_string or (
        f"Config spec NAME[:ARG] (NAME in {', '.join(NAMES)}, e.g. nvsm:demo; found from any "
        f"folder) or PATH[:ARG] to a config file; override fields with --{name}.field=value.")
    flag = config_flags._ConfigFlag(  # pylint: disable=protected-access
        parser=_SpecParser(name=name, lock_config=lock_config),
        serializer=flags.ArgumentSerializer(), name=name, default=default,
        help_string=help_string, flag_values=flags.FLAGS)
    return flags.DEFINE_flag(flag, flags.FLAGS)
