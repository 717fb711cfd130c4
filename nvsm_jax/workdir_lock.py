"""One run per workdir, and a run's file-system failures reported in one line.

A run holds its workdir (:func:`hold`, or the :func:`locked` decorator of the
top-level runs) through the lock file ``WORKDIR/nvsm_run.lock``: JSON with the
process id, host name and start time of the holder. A second run into the same
workdir, or into a folder under it, refuses with :class:`nvsm_jax.errors.WorkdirLocked`
naming the holder and the lock file. A lock whose process is gone (same host: a
``kill -9``, a crash) is taken over with a warning. A holder touches its lock file
every :data:`REFRESH_SECONDS`; a lock of another host (whose process cannot be
checked from here) is refused while it is fresh, and taken over with a warning once
it has gone :data:`STALE_SECONDS` without a touch (a preempted job requeued on
another node resumes by itself).

The hold is re-entrant within a process: a run that holds ``W`` may run others in
``W`` or below it (the few-shot experiment runs NeMo and NVSM cells in its
workdir). It is released when the outermost hold ends, and at process exit. On a
multi-process run (``jax.distributed``) only process 0 takes the lock and the
others write nothing there; when process 0 refuses, the launcher stops the rest.

Inside a hold, a full disk (``ENOSPC`` / ``EDQUOT``) raised without a file name,
as ``write()`` / ``close()`` / orbax raise it, gets the workdir as its file name, so
:func:`nvsm_jax.errors.guard` prints one line naming the path; orbax's log records
and ``Event loop is closed`` reports of that failure are dropped (``--debug``
keeps them).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import inspect
import json
import logging
import os
import socket
import threading
import time

from nvsm_jax import errors

log = logging.getLogger(__name__)

__all__ = ["LOCK_FILE", "hold", "locked", "holder", "naming"]

#: The lock file's name inside a workdir.
LOCK_FILE = "nvsm_run.lock"

_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)

#: How often a holder touches its lock file, and how long without a touch makes a
#: lock of another host stale.
REFRESH_SECONDS = 60.0
STALE_SECONDS = 600.0

_mutex = threading.RLock()
_held: dict[str, dict] = {}        # realpath -> {"depth", "record", "created_dir"}


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), which
    tells a live process from a later one that reuses its id; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None


def _alive(record: dict) -> bool:
    """Whether the lock's process (on this host) still runs."""
    pid = record["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # another user's process
        return True
    start = _process_start(pid)
    if start is not None and record.get("start") not in (None, start):
        return False                # the id belongs to a newer process now
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False        # exited, not yet reaped
    except (OSError, IndexError):
        pass
    return True


def _own_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "start": _process_start(os.getpid())}


def holder(workdir) -> dict | None:
    """The lock record ``{"pid", "host", "since", ...}`` of ``workdir``, or None when
    it is not locked. A lock file that is not such a record raises RunStateError."""
    path = os.path.join(os.fspath(workdir), LOCK_FILE)
    for attempt in range(2):
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        if text.strip() or attempt:
            break
        time.sleep(0.2)             # just created by O_EXCL, not yet written
    try:
        record = json.loads(text)
        if not (isinstance(record, dict) and isinstance(record.get("pid"), int)
                and isinstance(record.get("host"), str)):
            raise ValueError("expected {'pid': int, 'host': str, ...}")
    except ValueError as err:
        raise errors.RunStateError(
            f"{path}: damaged lock file ({err}); if no run uses {os.fspath(workdir)}, "
            "delete the lock file and rerun") from err
    return record


def _describe(record: dict) -> str:
    return f"pid {record['pid']} on host {record['host']} since {record.get('since', '?')}"


def _age(path: str) -> float:
    """Seconds since the lock file was last touched (0 when it is gone)."""
    try:
        return max(0.0, time.time() - os.stat(path).st_mtime)
    except FileNotFoundError:
        return 0.0


def _refusal(workdir: str, record: dict, path: str) -> errors.WorkdirLocked:
    if record["host"] != socket.gethostname():
        return errors.WorkdirLocked(
            f"{workdir} is in use by another run ({_describe(record)}; lock file {path}).\n"
            "This host cannot tell whether that run is alive: if it has ended, delete the "
            f"lock file and rerun (it is taken over by itself {STALE_SECONDS:.0f} s after "
            "its last refresh)")
    return errors.WorkdirLocked(
        f"{workdir} is in use by another run ({_describe(record)}; lock file {path}).\n"
        "Two runs in one workdir overwrite each other's files: wait for it to end, stop it, "
        "or use another --workdir")


def _create(path: str, text: str) -> bool:
    """Creates ``path`` holding ``text`` unless it exists (atomically: the file
    appears complete); returns whether this call created it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:                 # a file system without hard links
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        os.remove(tmp)


def _take_over(path: str, stale: dict) -> None:
    """Moves the stale lock ``stale`` aside; puts it back if, meanwhile, another run
    replaced it with a live one."""
    aside = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return                      # another run took it over first
    try:
        with open(aside) as f:
            moved = json.loads(f.read() or "null")
    except ValueError:
        moved = None
    if moved is not None and moved != stale:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    os.remove(aside)


def _acquire(workdir: str) -> dict:
    """Creates the lock of ``workdir`` (see the module docstring); returns its entry."""
    _check_enclosing(workdir)
    created_dir = not os.path.isdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    own = _own_record()
    text = json.dumps(own)
    for _ in range(5):
        if _create(path, text):
            return {"depth": 1, "record": own, "created_dir": created_dir, "path": path,
                    "refresh": _refresher(path)}
        record = holder(workdir)
        if record is None:
            continue                # released meanwhile
        same_host = record["host"] == socket.gethostname()
        if not same_host and _age(path) < STALE_SECONDS:
            raise _refusal(workdir, record, path)
        if same_host and record["pid"] != os.getpid() and _alive(record):
            raise _refusal(workdir, record, path)
        log.warning("%s: taking over the lock of a run that is gone (%s%s)", path,
                    _describe(record), "" if same_host else
                    f"; not refreshed for {_age(path):.0f} s")
        _take_over(path, record)
    raise errors.WorkdirLocked(f"{path}: could not take the lock (other runs keep taking it); "
                               "make sure one run at a time uses the workdir")


def _check_enclosing(workdir: str) -> None:
    """Refuses when a folder above ``workdir`` is held by another live run."""
    parent = os.path.dirname(workdir)
    while parent and parent != workdir:
        path = os.path.join(parent, LOCK_FILE)
        if os.path.exists(path):
            try:
                record = holder(parent)
            except errors.RunStateError:
                record = None
            other_host = record is not None and record["host"] != socket.gethostname()
            if record is not None and ((other_host and _age(path) < STALE_SECONDS) or (
                    not other_host and record["pid"] != os.getpid() and _alive(record))):
                raise _refusal(parent, record, path)
        workdir, parent = parent, os.path.dirname(parent)


def _refresher(path: str) -> threading.Event:
    """Touches ``path`` every REFRESH_SECONDS until the returned event is set, so that
    other hosts see the lock is alive (:data:`STALE_SECONDS`)."""
    stop = threading.Event()

    def touch():
        while not stop.wait(REFRESH_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(path)

    threading.Thread(target=touch, name="workdir-lock-refresh", daemon=True).start()
    return stop


def _release(key: str) -> None:
    entry = _held.pop(key)
    entry["refresh"].set()
    try:
        record = holder(key)
    except errors.RunStateError:
        record = None
    if record == entry["record"]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(entry["path"])
    else:
        log.warning("%s: the lock is no longer this run's (%s); leaving it", entry["path"],
                    "gone" if record is None else _describe(record))
    if entry["created_dir"]:        # a run refused before writing: leave no empty folder
        with contextlib.suppress(OSError):
            os.rmdir(key)


@atexit.register
def _release_all() -> None:
    with _mutex:
        for key in list(_held):
            with contextlib.suppress(Exception):
                _release(key)


def _enclosing_held(key: str) -> str | None:
    """The held workdir that is ``key`` or a folder above it, if any."""
    for held in _held:
        if key == held or key.startswith(held.rstrip(os.sep) + os.sep):
            return held
    return None


@contextlib.contextmanager
def naming(path):
    """Gives a full-disk ``OSError`` raised without a file name (``write``, ``close``,
    orbax) the name ``path``; with ``--debug`` too (it only adds information)."""
    try:
        yield
    except OSError as err:
        if err.errno in _FULL_DISK and not err.filename:
            raise OSError(err.errno, err.strerror or os.strerror(err.errno),
                          os.fspath(path)) from err
        raise
    except Exception as err:        # tensorstore's RESOURCE_EXHAUSTED ... [os_error_code=28]
        if "No space left on device" in str(err) or "os_error_code='28'" in str(err):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path)) from err
        raise


class _DropFullDiskRecords(logging.Filter):
    """Drops orbax's log records of a full disk: the error itself reaches the user once,
    through :func:`nvsm_jax.errors.guard`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if errors.debug_requested():
            return True
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + repr(record.exc_info[1])
        return not ("No space left on device" in text or "os_error_code='28'" in text
                    or "[Errno 28]" in text)


def _quiet_full_disk_noise() -> None:
    """Installs :class:`_DropFullDiskRecords` on absl's logger and drops ``Event loop
    is closed`` reports (idempotent)."""
    from nvsm_jax import training

    training._drop_closed_event_loop_noise()
    absl_log = logging.getLogger("absl")
    if not any(isinstance(f, _DropFullDiskRecords) for f in absl_log.filters):
        absl_log.addFilter(_DropFullDiskRecords())


@contextlib.contextmanager
def hold(workdir):
    """Holds ``workdir`` for a run (created if missing): see the module docstring.
    Raises WorkdirLocked when another live run holds it or a folder above it."""
    from nvsm_jax import parallel

    workdir = os.fspath(workdir)
    key = os.path.realpath(workdir)
    _quiet_full_disk_noise()
    with _mutex:
        outer = _enclosing_held(key)
        if outer is not None:
            _held[outer]["depth"] += 1
        elif parallel.is_main_process():
            _held[key] = _acquire(key)
            outer = key
    try:
        with naming(workdir):
            yield
    finally:
        if outer is not None:
            with _mutex:
                _held[outer]["depth"] -= 1
                if _held[outer]["depth"] == 0:
                    _release(outer)


def locked(fn=None, *, arg: str | tuple = "workdir"):
    """Decorator: ``fn`` runs inside :func:`hold` of its argument ``arg`` (a name, or
    names of which the first one given is used; none given: no hold).
    ``@locked`` or ``@locked(arg=("out_dir", "workdir"))``."""
    if fn is None:
        return functools.partial(locked, arg=arg)
    names = (arg,) if isinstance(arg, str) else tuple(arg)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        given = signature.bind_partial(*args, **kwargs).arguments
        workdir = next((given[n] for n in names if given.get(n) is not None), None)
        if workdir is None:
            return fn(*args, **kwargs)
        with hold(workdir):
            return fn(*args, **kwargs)

    return wrapped
