"""The errors a user can fix, and how the binaries print them.

Every error that means "the input, the config or the run's files are wrong" is an
:class:`InputError` (a ``ValueError``): bad data (:class:`nvsm_jax.data.DataError`),
meshes (:class:`nvsm_jax.meshes.MeshError`), weights
(:class:`nvsm_jax.models.weights.WeightsError`), configs (:class:`ConfigError`,
:class:`nvsm_jax.training.ConfigMismatchError`), damaged or busy run state
(:class:`RunStateError`, :class:`WorkdirLocked`) and a training that diverged
(:class:`NonFiniteError`). Its message names the file, key or value.

The binaries run their ``main`` under :func:`guard`: an ``InputError``, or an
``OSError`` from the file system (a missing file, no permission, a full disk),
prints ``<binary>: error: <message>`` in at most a few lines and exits 2 (1 stays the
status of a crash); with ``--debug`` (or ``NVSM_JAX_DEBUG=1``) the traceback is shown
instead. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import sys

__all__ = ["EXIT_STATUS", "InputError", "ConfigError", "RunStateError", "WorkdirLocked", "NonFiniteError",
           "describe", "guard", "debug_requested"]


class InputError(ValueError):
    """Bad input, config or run state: the message says what and where."""


class ConfigError(InputError):
    """A config value that is out of range, of the wrong type or inconsistent."""


class RunStateError(InputError):
    """A run-state file of a workdir (progress, rounds, pseudo-labels, checkpoints) that
    is damaged or does not belong to this run."""


class WorkdirLocked(RunStateError):
    """Another live run holds the workdir."""


class NonFiniteError(InputError):
    """The training produced a non-finite loss or gradient."""


#: The exit status of an expected error (a crash exits 1).
EXIT_STATUS = 2

#: Lines of a message printed without ``--debug``.
MAX_LINES = 3


def describe(err: BaseException) -> str:
    """A short message for an expected error: the error's own words, plus the path for a
    file-system error (a full disk says which file it was writing)."""
    if isinstance(err, OSError) and not isinstance(err, InputError):
        path = err.filename or ""
        if err.errno == errno.ENOSPC:
            return f"no space left on the device while writing {path or 'a file'}".rstrip()
        reason = err.strerror or str(err)
        return f"{reason}: {path}" if path else reason
    text = str(err) or type(err).__name__
    lines = text.splitlines()
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 1] + [f"... ({len(lines) - MAX_LINES + 1} more lines; "
                                         "--debug shows everything)"]
    return "\n".join(lines)


def debug_requested(argv=None) -> bool:
    """``--debug`` (also ``--debug=true`` / ``=1``; the last one given wins, as absl
    reads it) or ``NVSM_JAX_DEBUG`` set to anything but ``0``."""
    argv = sys.argv if argv is None else argv
    wanted = None
    for arg in argv:
        if arg in ("--debug", "-debug"):
            wanted = True
        elif arg in ("--nodebug", "-nodebug"):
            wanted = False
        elif arg.startswith(("--debug=", "-debug=")):
            wanted = arg.split("=", 1)[1].lower() in ("1", "true", "yes", "t", "y")
    if wanted is not None:
        return wanted
    return os.environ.get("NVSM_JAX_DEBUG", "") not in ("", "0")


#: File-system errors a user fixes (a missing file, a permission, a full disk, ...); other
#: OSErrors (a refused connection, EINVAL from a bug, ENOMEM) keep their traceback.
_FILE_SYSTEM_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC,
                                 errno.EDQUOT, errno.EROFS, errno.EISDIR, errno.ENOTDIR,
                                 errno.EEXIST, errno.ENOTEMPTY, errno.ENAMETOOLONG})


def _expected(err: BaseException) -> bool:
    if isinstance(err, InputError):
        return True
    return isinstance(err, OSError) and (err.errno in _FILE_SYSTEM_ERRNOS
                                         or isinstance(err, FileNotFoundError))


def _root_cause_enospc(err: BaseException) -> OSError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return err
        err = err.__cause__ or err.__context__
    return None


def guard(main, prog: str | None = None):
    """``main`` wrapped for a binary: expected errors become one short message and exit
    status :data:`EXIT_STATUS` (see the module docstring); ``--debug`` keeps the traceback."""
    name = prog or os.path.basename(sys.argv[0] or "nvsm")

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:            # noqa: BLE001 - sorted below
            full = _root_cause_enospc(err)
            if debug_requested() or not (_expected(err) or full is not None):
                raise
            message = describe(full if full is not None else err)
            sys.stderr.write(f"{name}: error: {message}\n")
            sys.stderr.flush()
            sys.exit(EXIT_STATUS)

    return wrapped
