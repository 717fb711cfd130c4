"""The project's binaries (thin absl/argparse front ends) and their configs.

In the repository this package is ``experiments`` (its modules also run with
``python -m`` from the repository root); ``pip install`` installs it as ``nvsm_jax_experiments``,
with the console scripts below, so it never claims the generic name. Binaries and
configs import each other relatively and work under both names. The library
(``nvsm_jax``, ``rasterizer``) never imports this package.

| console script | module |
|---|---|
| ``nvsm-fewshot`` | ``nvsm_fewshot`` (default ``--config=nvsm:demo``) |
| ``nvsm-train-nemo`` | ``train_nemo`` (default ``--config=nemo``) |
| ``nvsm-evaluate`` | ``evaluate`` |
| ``nvsm-predict`` | ``predict`` (poses of your own photos) |
| ``nvsm-mcss`` | ``mcss`` (default ``--config=mcss:demo``) |
| ``nvsm-make-synthetic`` | ``make_synthetic`` (default ``--config=synthetic``) |
| ``nvsm-show-data`` | ``show_data`` |
| ``nvsm-prepare-pascal3d``, ``nvsm-prepare-kitti`` | ``prepare_pascal3d``, ``prepare_kitti`` |
| ``nvsm-prepare-h36m`` | ``prepare_h36m`` |
| ``nvsm-report`` | ``report`` |
| ``nvsm-launch`` | ``launch`` |
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# The console scripts' functions are named ``<module>_cli``: a package attribute named
# like a submodule would shadow ``from experiments import nvsm_fewshot``.


class ArgumentParser(argparse.ArgumentParser):
    """The argparse binaries' parser: a bad flag or value is one line, ``<prog>: error:
    <message>; --help shows the usage``, exit status 2 (argparse prints its whole usage
    first), and ``debug=True`` adds ``--debug``, read by :meth:`run`. The docstring is
    shown as written (``RawDescriptionHelpFormatter``)."""

    def __init__(self, *, debug: bool = True, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)
        if debug:
            self.add_argument("--debug", action="store_true",
                              help="show the traceback of a bad input instead of a short message")

    def error(self, message):
        from nvsm_jax import errors

        self.exit(errors.EXIT_STATUS, f"{self.prog}: error: {message}; --help shows the usage\n")

    def run(self, fn, args, *fn_args):
        """``fn(*fn_args)`` under :func:`nvsm_jax.errors.guard` (an expected error: one
        short message, exit 2), or bare with ``args.debug`` (the traceback)."""
        from nvsm_jax import errors

        return (fn if args.debug else errors.guard(fn, prog=self.prog))(*fn_args)


def _parse_flags(argv):
    """absl's flag parsing, with a ``--config.KEY=VALUE`` override of a key the config
    lacks (ml_collections raises AttributeError, "Did you mean ...") or of a value it
    cannot take said in one line, exit status 2, instead of a traceback."""
    import re

    from absl import flags

    from nvsm_jax import errors

    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = f"{err}; --helpshort lists the flags"
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        if errors.debug_requested(argv):
            raise
        text = str(err.args[0] if err.args else err)
        key = re.match(r"""^\W*([\w.]+)""", text)
        overrides = [a for a in argv if a.startswith("--config.")]
        if not overrides:           # the config file's own error (a bug in get_config)
            raise
        if isinstance(err, (AttributeError, KeyError)) and key:
            guess = re.search(r'Did you mean "([\w.]+)"', text)
            hint = re.search(r"Did you mean [^?]*\?", text)    # another wording: kept as is
            if guess:
                path = _override_path(overrides, key.group(1), guess.group(1))
                message = f"did you mean --config.{path}? "
            else:
                message = f"{hint.group(0)} " if hint else ""
            message += f"unknown config key {key.group(1)!r} in the --config overrides"
        else:
            message = f"a --config override does not fit the config: {text.splitlines()[0]}"
    name = os.path.basename(argv[0] if argv else "nvsm")
    sys.stderr.write(f"{name}: error: {message}\n")
    sys.exit(errors.EXIT_STATUS)


def _override_path(overrides, key: str, guess: str) -> str:
    """The dotted path of the override that named ``key``, with ``key`` replaced by
    ``guess`` (``estep.max_nw`` -> ``estep.max_new``); ``guess`` alone if none matches."""
    for arg in overrides:
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        if key in path:
            path[path.index(key)] = guess
            return ".".join(path)
    return guess


def run(main) -> None:
    """``app.run(main)`` with the package's error handling: a bad input, config or run
    state (:class:`nvsm_jax.errors.InputError`) or a file-system error prints one short
    message and exits 2; ``--debug`` shows the traceback (:func:`nvsm_jax.errors.guard`);
    a flag or ``--config`` override that cannot be parsed likewise (:func:`_parse_flags`)."""
    from absl import app, flags

    from nvsm_jax import errors

    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, "Show the traceback of an expected error (a bad "
                          "input, config or run state) instead of a short message.")
    app.run(errors.guard(main), flags_parser=_parse_flags)


def _run_absl(module: str) -> None:
    """``app.run(main)`` of an absl binary of this package (a console script).

    ``--help`` shows the binary's docstring and flags, as ``python -m`` does: absl
    describes the flags and the ``__doc__`` of the main module (``sys.argv[0]``), here
    the console script's wrapper.
    """
    from absl import flags

    from nvsm_jax import parallel

    mod = importlib.import_module(f"{__name__}.{module}")
    for flag in flags.FLAGS.get_key_flags_for_module(mod.__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    main_module = sys.modules.get("__main__")
    if main_module is not None and not main_module.__doc__:
        main_module.__doc__ = mod.__doc__
    parallel.quiet_backend_probe_logs()
    run(mod.main)


def nvsm_fewshot_cli() -> None:
    _run_absl("nvsm_fewshot")


def train_nemo_cli() -> None:
    _run_absl("train_nemo")


def evaluate_cli() -> None:
    _run_absl("evaluate")


def predict_cli() -> None:
    _run_absl("predict")


def mcss_cli() -> None:
    _run_absl("mcss")


def report_cli() -> None:
    _run_absl("report")


def launch_cli() -> int:
    """``nvsm-launch``: :func:`launch.main`, its exit status returned."""
    return importlib.import_module(f"{__name__}.launch").main()
