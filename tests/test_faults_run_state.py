"""One run per workdir (the lock file), run-state files named when damaged, no round
lost by a kill between NVSM's run-state writes, and a full disk in one line (issue 30)."""

import errno
import json
import logging
import time
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from nvsm_jax import errors, parallel, training
from nvsm_jax.nvsm import pseudo_labels, run_state as rs
from nvsm_jax import workdir_lock as wl
from nvsm_jax.errors import RunStateError, WorkdirLocked
from nvsm_jax.nemo import evaluate as nemo_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(pid, host=None, **extra):
    return {"pid": pid, "host": host or socket.gethostname(), "since": "2024-01-02 03:04:05",
            **extra}


def _write_lock(workdir, record):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, wl.LOCK_FILE), "w") as f:
        json.dump(record, f)


@pytest.fixture
def sleeper():
    """A live process of this host (another run's stand-in)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- the lock

def test_a_live_holder_is_named_and_the_run_refused(tmp_path, sleeper):
    work = str(tmp_path / "w")
    _write_lock(work, _record(sleeper.pid, start=wl._process_start(sleeper.pid)))
    lock = os.path.join(work, wl.LOCK_FILE)
    with pytest.raises(WorkdirLocked, match=rf"in use by another run \(pid {sleeper.pid} on "
                       rf"host {socket.gethostname()} since 2024-01-02 03:04:05; lock file "
                       rf"{lock}\)") as info:
        with wl.hold(work):
            pass
    assert len(str(info.value).splitlines()) <= errors.MAX_LINES
    assert wl.holder(work)["pid"] == sleeper.pid          # the holder's lock is untouched
    # a cell under a held workdir is refused too
    with pytest.raises(WorkdirLocked, match=rf"{work} is in use .*pid {sleeper.pid}"):
        with wl.hold(os.path.join(work, "nvsm_car_7")):
            pass
    assert not os.path.exists(os.path.join(work, "nvsm_car_7"))


def test_the_decorated_runs_refuse_a_held_workdir(tmp_path, sleeper):

    work = str(tmp_path / "w")
    _write_lock(work, _record(sleeper.pid))
    calls = []

    @wl.locked
    def run(config, workdir):
        calls.append(workdir)

    with pytest.raises(WorkdirLocked, match="in use by another run"):
        run(None, work)
    with pytest.raises(WorkdirLocked, match="in use by another run"):
        run(None, workdir=work)
    # evaluate_workdir locks the folder it writes into: its out_dir when given
    with pytest.raises(WorkdirLocked, match="in use by another run"):
        nemo_evaluate.evaluate_workdir(work, str(tmp_path / "no_root"))
    out = str(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="test root not found"):
        nemo_evaluate.evaluate_workdir(work, str(tmp_path / "no_root"), out_dir=out)
    assert calls == [] and not os.path.exists(out)      # refused before writing anything


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    work = str(tmp_path / "w")
    dead = _dead_pid()
    _write_lock(work, _record(dead))
    with caplog.at_level(logging.WARNING, logger=wl.__name__):
        with wl.hold(work):
            assert wl.holder(work)["pid"] == os.getpid()
    assert f"taking over the lock of a run that is gone (pid {dead} " in caplog.text
    assert not os.path.exists(os.path.join(work, wl.LOCK_FILE))     # released
    # a live pid of another process started later than the lock's: reused, stale too
    _write_lock(work, _record(os.getppid(), start="1"))
    with wl.hold(work):
        assert wl.holder(work)["pid"] == os.getpid()


def test_a_lock_of_another_host_is_refused_until_it_goes_stale(tmp_path, caplog):
    """A fresh lock of another host is refused with how to remove it; one not refreshed
    for STALE_SECONDS (a preempted job, requeued on another node) is taken over."""
    work = str(tmp_path / "w")
    _write_lock(work, _record(1, host="gpu-node-7"))
    with pytest.raises(WorkdirLocked, match=r"pid 1 on host gpu-node-7(.|\n)*cannot tell "
                                            r"whether that run is alive: if it has ended, "
                                            r"delete the lock file"):
        with wl.hold(work):
            pass
    lock = os.path.join(work, wl.LOCK_FILE)
    old = time.time() - wl.STALE_SECONDS - 5
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING):
        with wl.hold(work):
            assert wl.holder(work)["pid"] == os.getpid()
    assert "gpu-node-7" in caplog.text and "not refreshed for" in caplog.text
    assert not os.path.exists(lock)


def test_a_held_lock_is_refreshed(tmp_path, monkeypatch):
    monkeypatch.setattr(wl, "REFRESH_SECONDS", 0.05)
    work = str(tmp_path / "w")
    with wl.hold(work):
        lock = os.path.join(work, wl.LOCK_FILE)
        old = time.time() - 1000
        os.utime(lock, (old, old))
        time.sleep(0.3)
        assert time.time() - os.stat(lock).st_mtime < 5


def test_a_damaged_lock_file_is_named(tmp_path):
    work = str(tmp_path / "w")
    os.makedirs(work)
    with open(os.path.join(work, wl.LOCK_FILE), "w") as f:
        f.write('{"pid": "x"')
    with pytest.raises(RunStateError, match=rf"{wl.LOCK_FILE}: damaged lock file"):
        with wl.hold(work):
            pass


def test_the_hold_is_reentrant_and_released_by_the_outermost(tmp_path):
    work = str(tmp_path / "w")
    lock = os.path.join(work, wl.LOCK_FILE)
    with wl.hold(work):
        record = wl.holder(work)
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with wl.hold(work), wl.hold(os.path.join(work, "nemo_car_7")):
            assert os.path.exists(lock)
        assert os.path.exists(lock)
        assert not os.path.exists(os.path.join(work, "nemo_car_7", wl.LOCK_FILE))
    assert not os.path.exists(lock)
    with wl.hold(work):             # the same notebook, a second time
        assert os.path.exists(lock)
    # a run that fails is released too; a folder it created and left empty is removed
    fresh = str(tmp_path / "fresh")
    with pytest.raises(errors.ConfigError):
        with wl.hold(fresh):
            raise errors.ConfigError("config.num_steps=0 (expected >= 1)")
    assert not os.path.exists(fresh)


def test_only_process_0_of_a_multi_process_run_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "is_main_process", lambda: False)
    work = str(tmp_path / "w")
    with wl.hold(work):
        assert not os.path.exists(work)          # process 1 writes nothing there


_CHILD = """
import sys
from nvsm_jax import workdir_lock
held = workdir_lock.hold(sys.argv[1])
held.__enter__()                # never left: released at exit
print("held", flush=True)
sys.stdin.readline()
"""


def test_a_second_process_is_refused_until_the_first_exits(tmp_path):
    """Two real processes: the second is refused while the first holds the workdir;
    the lock goes at the holder's exit; a SIGKILLed holder's lock is taken over."""
    work = str(tmp_path / "w")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}

    def child():
        p = subprocess.Popen([sys.executable, "-c", _CHILD, work], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
        assert p.stdout.readline().strip() == "held"
        return p

    p = child()
    with pytest.raises(WorkdirLocked, match=rf"pid {p.pid} on host"):
        with wl.hold(work):
            pass
    p.communicate("\n", timeout=30)                  # exits normally
    assert p.returncode == 0 and wl.holder(work) is None
    p = child()
    p.kill()
    p.wait()
    assert wl.holder(work)["pid"] == p.pid           # a kill -9 leaves its lock behind
    with wl.hold(work):
        assert wl.holder(work)["pid"] == os.getpid()


# ---- NVSM run state

def _labels(index):
    n = len(index)
    return pseudo_labels.PseudoLabels(np.asarray(index, np.int64),
                                      np.full((n, 4), 0.5, np.float32), np.ones(n, np.float32),
                                      np.zeros(n, np.int64), np.zeros(n, bool),
                                      np.ones(n, np.int64))


def test_damaged_round_files_are_named(tmp_path):
    work = str(tmp_path)
    os.makedirs(os.path.join(work, "pseudo_labels"))
    path = rs.round_path(work, 2)
    with pytest.raises(RunStateError, match=rf"{path}: the pseudo-labels after round 2, .* "
                                            r"are missing"):
        rs.load_round(work, 2)
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 not a zip")
    with pytest.raises(RunStateError, match=rf"round_002\.npz: .* are damaged: not an npz "
                                            r"file of this run \(BadZipFile.*restore the file, "
                                            r"or start"):
        rs.load_round(work, 2)
    with open(path, "wb") as f:                       # numpy reads random bytes as a pickle
        f.write(bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)))
    with pytest.raises(RunStateError, match=r"round_002\.npz: .* damaged: not an npz file of "
                                            r"this run; restore") as info:
        rs.load_round(work, 2)
    assert "pickle" not in str(info.value)
    np.savez(path, index=np.arange(3))                # a key missing
    with pytest.raises(RunStateError, match=r"round_002\.npz: .* damaged: not an npz file of "
                                            r"this run \(KeyError"):
        rs.load_round(work, 2)
    rs.savez_atomic(path, **_labels([4, 1]).to_dict())
    np.testing.assert_array_equal(rs.load_round(work, 2).index, [4, 1])


def test_damaged_progress_is_named(tmp_path):
    path = tmp_path / "progress.json"
    for text in ('{"round": 2, "st', '{"round": -1, "step": 4}', '{"round": "2", "step": 4}'):
        path.write_text(text)
        with pytest.raises(RunStateError, match=r"progress\.json: .*delete it to restart the "
                                                r"NVSM run from round 0 \(and with it checkp"):
            rs.load_progress(tmp_path)


def test_a_checkpoint_past_the_progress_record_is_refused():
    from experiments.configs import nvsm as nvsm_config

    c = nvsm_config.get_config("tiny")
    c.initial_steps, c.steps_per_round, c.num_rounds = 2, 2, 2
    assert rs.resume_point(c, None, None, "ck") == (0, 0, None)
    assert rs.resume_point(c, None, 1, "ck") == (0, 0, 1)             # inside round 0
    assert rs.resume_point(c, {"round": 1, "step": 4}, 5, "ck") == (2, 4, 5)
    assert rs.resume_point(c, {"round": 1, "step": 4}, 4, "ck") == (2, 4, None)
    with pytest.raises(RunStateError, match=r"ck: holds step 6, past the end of round 0 "
                                            r"\(step 2\) where progress\.json \(missing\)"):
        rs.resume_point(c, None, 6, "ck")                          # progress.json lost
    with pytest.raises(RunStateError, match=r"holds step 8, past the end of round 3"):
        rs.resume_point(c, {"round": 2, "step": 6}, 8, "ck")


def test_a_run_that_stopped_early_runs_no_further_round(tmp_path):
    """A round after which nothing new passed (or the pool ran out) ends the run, and
    progress.json says so: evaluating the cell again (another test set) resumes past
    the last round instead of running another E-step, and evaluate counts the run
    as finished at that round's step."""
    from experiments.configs import nvsm as nvsm_config

    c = nvsm_config.get_config("tiny")
    c.initial_steps, c.steps_per_round, c.num_rounds = 2, 2, 4
    log_writer = training.MetricsWriter(tmp_path, "rounds.jsonl", tensorboard=False)
    os.makedirs(tmp_path / "pseudo_labels")
    rs.record_round(str(tmp_path), log_writer, 0, 2, _labels([]), {"round": 0, "num_new": 0})
    assert rs.load_progress(tmp_path) == {"round": 0, "step": 2}
    rs.record_round(str(tmp_path), log_writer, 1, 4, _labels([3]),
                     {"round": 1, "num_new": 1}, stopped=True)
    done = rs.load_progress(tmp_path)
    assert done == {"round": 1, "step": 4, "stopped": True}
    assert rs.resume_point(c, done, 4, "ck") == (c.num_rounds + 1, 4, None)
    c.num_steps = 10
    assert nemo_evaluate.final_step(str(tmp_path), c) == 4


def test_damaged_round_log_lines_are_named_and_torn_ones_dropped(tmp_path, caplog):
    path = str(tmp_path / "rounds.jsonl")
    rows = [{"step": 2, "round": 0}, {"step": 4, "round": 1}, {"step": 6, "round": 2}]
    with open(path, "w") as f:
        f.write(json.dumps(rows[0]) + "\n{\"step\": 4, \"rou\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(RunStateError, match=r"rounds\.jsonl: line 2 is damaged .*fix or delete "
                                            r"that line"):
        rs.round_log_entries(path, {"round": 2, "step": 6})
    # a torn last line and an entry past progress.json: dropped, the file rewritten
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "ro')
    with caplog.at_level(logging.WARNING):
        assert rs.round_log_entries(path, {"round": 1, "step": 4}) == rows[:2]
    assert "dropping its damaged last line" in caplog.text
    assert training.MetricsWriter(tmp_path, "rounds.jsonl").read() == rows[:2]
    # no progress.json: nothing of the log counts
    assert rs.round_log_entries(path, None) == [] and open(path).read() == ""


def _record_rounds(work, log_writer, rounds):
    for r, step, index in rounds:
        rs.record_round(work, log_writer, r, step, _labels(index),
                         {"round": r, "step": step, "num_pseudo": len(index)})


class _Killed(Exception):
    pass


# round 2 gains no new label (the same step as round 1), as when nothing passes
ROUNDS = [(0, 2, []), (1, 4, [3]), (2, 4, [3])]


@pytest.mark.parametrize("kill_at", range(5))
def test_a_kill_between_run_state_writes_loses_no_round(tmp_path, monkeypatch, kill_at):
    """Round 2's writes (npz, log entry, progress.json, staged E-step removal) are cut
    at each point; the resumed run then sees rounds 0..progress exactly once and, after
    redoing round 2, the log holds every round once."""
    work = str(tmp_path)
    os.makedirs(os.path.join(work, "pseudo_labels"))
    log_writer = training.MetricsWriter(work, "rounds.jsonl", tensorboard=False)
    _record_rounds(work, log_writer, ROUNDS[:2])
    open(rs.staged_path(work, 2), "wb").close()
    calls = []

    def cut(fn):
        def wrapped(*a, **kw):
            if len(calls) == kill_at:
                raise _Killed
            calls.append(fn)
            return fn(*a, **kw)
        return wrapped

    with monkeypatch.context() as mp:
        mp.setattr(rs, "savez_atomic", cut(rs.savez_atomic))
        mp.setattr(log_writer, "write", cut(log_writer.write))
        mp.setattr(rs, "write_json_atomic", cut(rs.write_json_atomic))
        mp.setattr(os, "remove", cut(os.remove))
        try:
            _record_rounds(work, log_writer, ROUNDS[2:])
        except _Killed:
            pass
    done = rs.load_progress(work)
    assert done["round"] == (2 if kill_at >= 3 else 1)
    entries = rs.round_log_entries(log_writer.path, done)
    assert [e["round"] for e in entries] == list(range(done["round"] + 1))
    np.testing.assert_array_equal(rs.load_round(work, done["round"]).index, [3])
    if done["round"] < 2:           # the resumed run redoes round 2
        _record_rounds(work, log_writer, ROUNDS[2:])
    assert [e["round"] for e in log_writer.read()] == [0, 1, 2]
    assert not os.path.exists(rs.staged_path(work, 2)) or kill_at == 3


# ---- a full disk

def _dev_full_tmp(path, suffix):
    """``path + suffix`` as a link to /dev/full: writing it fails with ENOSPC, as on a
    full disk (and without a file name, as write() and close() raise it)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    os.symlink("/dev/full", path + suffix)


def _guarded(fn, capsys):
    with pytest.raises(SystemExit) as info:
        errors.guard(fn, prog="nvsm_fewshot")()
    assert info.value.code == 2
    return capsys.readouterr().err


def test_a_full_disk_names_the_run_state_file_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NVSM_JAX_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["nvsm_fewshot"])
    progress = str(tmp_path / "progress.json")
    _dev_full_tmp(progress, ".tmp")
    err = _guarded(lambda: rs.write_json_atomic(progress, {"round": 1, "step": 4}), capsys)
    assert err == f"nvsm_fewshot: error: no space left on the device while writing {progress}\n"
    labels = rs.round_path(str(tmp_path), 1)
    os.makedirs(os.path.dirname(labels))
    _dev_full_tmp(labels, ".tmp.npz")
    err = _guarded(lambda: rs.savez_atomic(labels, index=np.zeros(100_000)), capsys)
    assert err == f"nvsm_fewshot: error: no space left on the device while writing {labels}\n"
    assert not os.path.exists(labels)


def test_a_full_disk_inside_a_run_names_its_workdir_and_drops_orbax_noise(
        tmp_path, capsys, caplog, monkeypatch):
    """Writers the run does not name (metrics, orbax) raise ENOSPC without a file name;
    the run's hold names its workdir, tensorstore's RESOURCE_EXHAUSTED too, and
    orbax's log records of it are dropped."""
    monkeypatch.delenv("NVSM_JAX_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["nvsm_fewshot"])
    work = str(tmp_path / "w")
    writer = training.MetricsWriter(work, tensorboard=False)
    monkeypatch.setattr(writer, "path", "/dev/full")

    @wl.locked
    def run(workdir):
        writer.write(1, loss=0.5)

    assert _guarded(lambda: run(work), capsys) == (
        f"nvsm_fewshot: error: no space left on the device while writing {work}\n")

    @wl.locked
    def orbax_save(workdir):
        logging.getLogger("absl").error("Failed to write metadata: [Errno 28] No space left "
                                        "on device")
        logging.getLogger("absl").error("an unrelated orbax error")
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/.zarray": Failed to write 177 '
                         "bytes to file 11: No space left on device [os_error_code='28']")

    with caplog.at_level(logging.ERROR):
        err = _guarded(lambda: orbax_save(work), capsys)
    assert err == f"nvsm_fewshot: error: no space left on the device while writing {work}\n"
    assert [r.getMessage() for r in caplog.records] == ["an unrelated orbax error"]
    assert not os.path.exists(os.path.join(work, wl.LOCK_FILE))
