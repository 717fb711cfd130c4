"""Fault sweep: the findings of issue 30 ("Nothing silent, nothing lost") through the binaries.

    python -m tests.fault_sweep                                 # every case, table + exit status
    python -m tests.fault_sweep --only keep_checkpoints_0,two_runs_one_workdir
    python -m tests.fault_sweep --list                          # the cases, nothing run
    python -m tests.fault_sweep --json runs/fault_sweep.json --keep /tmp/fault_sweep

Each case runs the real command lines (``python -m experiments.<binary> ...``) on a tiny
synthetic set ``S`` (``make_synthetic --config=synthetic:tiny --categories car --train 16
--test 4 --size 32``), made once in a scratch folder, or on a copy of it with one file
damaged (a mesh scaled x100, flattened or of random bytes, a principal point at
(1e6, 1e6), an azimuth stored as ``True``, a 16-bit greyscale or a truncated image).
Trained workdirs are shared between the cases that need one (made on first use, so
``--only`` works for any case): a finished NVSM cell (also: its damaged round file, a kill
between its run-state writes, a rerun on another test root) and a NeMo run killed with
``kill -9`` (also: a second run while it holds the workdir, ``evaluate`` on it, its
``config.json`` truncated). Each case states its expectation:

* ``error``: exit status != 0, at most 3 lines on stderr once absl/jax log lines and
  progress bars are dropped, no ``Traceback`` anywhere, and the message holds the given
  words (the key, the value's file, ...);
* ``warning``: exit status 0 and a log line holding the given words;
* ``correct``: exit status 0 and a check of the outputs (results name the new test
  set, one metrics line per step after a kill and resume, a corrected rerun succeeds ...);

plus, for some, what must not be on disk afterwards (no ``config.json`` after a refused
config, no non-finite checkpoint). A case that cannot run here (no ``mount`` for the full
disk) is *skipped* with the reason. The exit status is 1 when any case fails.

Not part of ``make test``: the whole sweep trains a few tiny models (about 10 min on
2 CPU cores; a tiny training run is 20-90 s). Every command's output is kept under the
scratch folder's ``logs/`` with ``--keep DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MARKER = ".fault_sweep"           # marks a --keep folder as the sweep's (reused, wiped)

# ----------------------------------------------------------------------------- output

_ABSL = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")         # absl / jax (glog) log lines
_ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+\] ")
_NOISE = [
    re.compile(r"\d+%\|"),                                  # tqdm progress bars
    re.compile(r"\d+(\.\d+)?(it/s|s/it)\]"),
    re.compile(r"\.py:\d+: \w*Warning: "),                  # python warnings: the line ...
    re.compile(r"^\s+warnings\.warn\("),                    # ... and its source line
]


def message_lines(text: str) -> list[str]:
    """The lines a user reads: stderr without log lines, progress bars and warning noise."""
    out = []
    for line in re.split(r"[\r\n]", text):
        if not line.strip() or _ABSL.match(line) or any(p.search(line) for p in _NOISE):
            continue
        out.append(line.rstrip())
    return out


@dataclasses.dataclass
class Proc:
    cmd: list
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def command(self) -> str:
        return " ".join(shlex.quote(str(c)) for c in self.cmd)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def tail(self, n: int = 12) -> str:
        """The last ``n`` lines of stdout + stderr, progress bars dropped."""
        lines = [ln for ln in re.split(r"[\r\n]", self.output)
                 if ln.strip() and not any(p.search(ln) for p in _NOISE[:2])]
        return "\n".join(lines[-n:])


@dataclasses.dataclass
class Outcome:
    status: str                     # "ok" | "FAILED" | "skipped"
    detail: str
    procs: list = dataclasses.field(default_factory=list)


class SetupError(Exception):
    """A fixture (the data, a trained workdir) could not be made."""

    def __init__(self, message, proc: Proc | None = None):
        super().__init__(message)
        self.proc = proc


# ----------------------------------------------------------------------------- the sweep

class Sweep:
    """The scratch folder, the fixtures (made once, on first use) and the runs."""

    def __init__(self, scratch: Path, timeout: float):
        self.scratch = scratch
        self.timeout = timeout
        self._memo: dict = {}
        self._count = 0
        self.case = "setup"
        for sub in ("runs", "data", "logs"):
            (scratch / sub).mkdir(parents=True, exist_ok=True)

    # -- runs
    def _log(self, p: Proc) -> None:
        self._count += 1
        base = self.scratch / "logs" / f"{self._count:03d}_{self.case}"
        base.with_suffix(".cmd").write_text(p.command + f"\n# exit {p.rc}, {p.seconds:.1f} s\n")
        base.with_suffix(".out").write_text(p.stdout)
        base.with_suffix(".err").write_text(p.stderr)

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
        env.pop("NVSM_JAX_DEBUG", None)         # the short messages are under test
        return env

    def run(self, args, *, env=None, timeout=None) -> Proc:
        """``python ARGS`` in the repository root; never raises on a failed command."""
        cmd = [PY] + [str(a) for a in args]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env or self.env(), capture_output=True,
                               text=True, timeout=timeout or self.timeout)
            p = Proc(cmd, r.returncode, r.stdout, r.stderr, time.perf_counter() - t0)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
            p = Proc(cmd, 124, out or "", (err or "") + f"\n[fault_sweep] timed out after "
                     f"{timeout or self.timeout:.0f} s", time.perf_counter() - t0)
        self._log(p)
        return p

    def start(self, args, name: str) -> tuple[subprocess.Popen, Path, Path, list]:
        """``python ARGS`` in the background; stdout/stderr go to files."""
        cmd = [PY] + [str(a) for a in args]
        out = self.scratch / "logs" / f"bg_{name}.out"
        err = self.scratch / "logs" / f"bg_{name}.err"
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=fo, stderr=fe)
        return proc, out, err, cmd

    def once(self, key, make):
        if key not in self._memo:
            try:
                self._memo[key] = make()
            except SetupError as e:
                self._memo[key] = e
        value = self._memo[key]
        if isinstance(value, SetupError):
            raise value
        return value

    # -- folders
    def workdir(self, name: str) -> Path:
        """A fresh (absent) workdir path under ``runs/``."""
        w = self.scratch / "runs" / name
        if w.exists():
            shutil.rmtree(w)
        return w

    def copy_workdir(self, src: Path, name: str) -> Path:
        w = self.workdir(name)
        shutil.copytree(src, w, symlinks=True)
        return w

    @property
    def S(self) -> Path:
        return self.once("S", self._make_S)

    def _make_S(self) -> Path:
        out = self.scratch / "data" / "S"
        if out.exists():
            shutil.rmtree(out)
        p = self.run(["-m", "experiments.make_synthetic", "--config=synthetic:tiny",
                      "--categories", "car", "--train", "16", "--test", "4", "--size", "32",
                      "--out", out])
        if p.rc != 0:
            raise SetupError("make_synthetic of the tiny set S failed", p)
        return out

    def damaged(self, name: str, damage: Callable[[Path], str]) -> tuple[Path, str]:
        """A copy of S with ``damage(root)`` applied; -> (root, what it damaged)."""
        def make():
            root = self.scratch / "data" / name
            if root.exists():
                shutil.rmtree(root)
            shutil.copytree(self.S, root)
            return root, damage(root)
        return self.once(("damaged", name), make)

    def roots(self, root: Path | None = None) -> list[str]:
        root = root or self.S
        return [f"--config.data_root={root / 'train'}", f"--config.test_root={root / 'test'}"]


# ----------------------------------------------------------------------------- expectations

def _has(text: str, word) -> bool:
    """``word``: a string, or a tuple of alternatives."""
    return any(w in text for w in word) if isinstance(word, tuple) else word in text


def _words(word) -> str:
    return " | ".join(map(repr, word)) if isinstance(word, tuple) else repr(word)


def expect_error(p: Proc, words=(), problems=()) -> Outcome:
    lines = message_lines(p.stderr)
    message = "\n".join(lines)
    bad = list(problems)
    if p.rc == 0:
        bad.append("exit status 0 (expected a refusal)")
    if p.rc == 124:
        bad.append("timed out")
    if "Traceback" in p.output:
        bad.append("a Traceback is printed")
    if not lines:
        bad.append("no message on stderr")
    if len(lines) > 3:
        bad.append(f"{len(lines)} message lines on stderr (at most 3)")
    missing = [_words(w) for w in words if not _has(message, w)]
    if missing and p.rc != 0:
        bad.append(f"the message lacks {', '.join(missing)}")
    shown = message if len(message) < 400 else message[:400] + " ..."
    if bad:
        return Outcome("FAILED", "; ".join(bad) + (f" -- message: {shown}" if lines else ""),
                       [p])
    return Outcome("ok", shown, [p])


def expect_warning(p: Proc, words=(), problems=()) -> Outcome:
    bad = list(problems)
    if p.rc != 0:
        bad.append(f"exit status {p.rc}")
    hit = [ln for ln in re.split(r"[\r\n]", p.output) if all(_has(ln, w) for w in words)]
    if not hit:
        bad.append(f"no log line with {', '.join(_words(w) for w in words)}")
    if "Traceback" in p.output:
        bad.append("a Traceback is printed")
    if bad:
        return Outcome("FAILED", "; ".join(bad), [p])
    line = _ABSL_PREFIX.sub("", hit[0].strip())
    return Outcome("ok", line if len(line) < 400 else line[:400] + " ...", [p])


def expect_correct(p: Proc, problems=(), detail: str = "") -> Outcome:
    bad = list(problems)
    if p.rc != 0:
        bad.insert(0, f"exit status {p.rc}")
    if "Traceback" in p.output:
        bad.append("a Traceback is printed")
    if bad:
        return Outcome("FAILED", "; ".join(bad), [p])
    return Outcome("ok", detail, [p])


def nothing_written(workdir: Path) -> list[str]:
    """Problems when a refused run left a record in ``workdir``."""
    if not workdir.exists():
        return []
    left = sorted(str(q.relative_to(workdir)) for q in workdir.rglob("*"))
    if (workdir / "config.json").exists() or (workdir / "data").exists() or \
            (workdir / "checkpoints").exists():
        return [f"the refused run wrote {left[:6]}"]
    return []


# ----------------------------------------------------------------------------- commands

NVSM = ["-m", "experiments.nvsm_fewshot", "--config=nvsm:tiny"]
NEMO = ["-m", "experiments.train_nemo", "--config=nemo:tiny"]
EVALUATE = ["-m", "experiments.evaluate"]
SYNTH = ["-m", "experiments.make_synthetic", "--config=synthetic:tiny", "--categories", "car",
         "--size", "32"]
#: the cheapest NVSM cell that still runs an E-step and writes a round file
NVSM_CELL = ["--config.methods=nvsm", "--config.num_rounds=1", "--config.eval_every_round=False"]
KILLED_STEPS = 60               # the NeMo run killed with kill -9
KILL_AT = 25                    # ... once metrics.jsonl has this many lines


def refused_config(binary: list, key_args: list, words, name: str, *, roots=True):
    """A case: ``binary`` with a bad config value is refused naming it, nothing written."""
    def case(sw: Sweep) -> Outcome:
        w = sw.workdir(name)
        p = sw.run(binary + [f"--workdir={w}"] + (sw.roots() if roots else []) + key_args)
        return expect_error(p, words, nothing_written(w))
    return case


def refused_synthetic(flag_args: list, words, name: str):
    def case(sw: Sweep) -> Outcome:
        out = sw.workdir(name)
        p = sw.run(SYNTH + ["--out", out] + flag_args)
        left = [str(q) for q in out.rglob("*")] if out.exists() else []
        return expect_error(p, words, [f"wrote {left[:4]}"] if left else [])
    return case


# -- data damage (copies of S)

def _first_train_name(root: Path) -> str:
    return (root / "train" / "lists" / "car" / "mesh01.txt").read_text().split()[0]


def _read_off(path: Path):
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    nv, nf = map(int, lines[1].split()[:2])
    verts = np.array([list(map(float, ln.split()[:3])) for ln in lines[2:2 + nv]])
    faces = np.array([list(map(int, ln.split()[1:4])) for ln in lines[2 + nv:2 + nv + nf]])
    return verts, faces


def _write_off(path: Path, verts, faces):
    with open(path, "w") as f:
        f.write(f"OFF\n{len(verts)} {len(faces)} 0\n")
        np.savetxt(f, verts, fmt="%.6f")
        np.savetxt(f, np.concatenate([np.full((len(faces), 1), 3), faces], 1), fmt="%d")


def _mesh(root: Path) -> Path:
    return root / "train" / "CAD_single" / "car" / "01.off"


def _edit_annotation(root: Path, **fields) -> str:
    name = _first_train_name(root)
    path = root / "train" / "annotations" / "car" / f"{name}.npz"
    with np.load(path) as z:
        ann = {k: z[k] for k in z.files}
    ann.update(fields)
    np.savez(path, **ann)
    return f"{name}.npz"


def _image(root: Path) -> Path:
    name = _first_train_name(root)
    return next((root / "train" / "images" / "car").glob(name + ".*"))


def damage_mesh_x100(root):
    v, f = _read_off(_mesh(root))
    _write_off(_mesh(root), v * 100, f)
    return "01.off"


def damage_mesh_flat(root):
    v, f = _read_off(_mesh(root))
    v[:, 2] = 0.0
    _write_off(_mesh(root), v, f)
    tri = v[f]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)
    return f"dropped {int(np.sum(area <= 1e-12))} of {len(f)}"


def damage_mesh_bytes(root):
    rng = np.random.default_rng(0)
    _mesh(root).write_bytes(b"\xff\xfe" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return "01.off"


def damage_principal(root):
    return _edit_annotation(root, principal=np.array([1e6, 1e6]))


def damage_azimuth_bool(root):
    return _edit_annotation(root, azimuth=np.bool_(True))


def damage_png16(root):
    from PIL import Image
    path = _image(root)
    with Image.open(path) as im:
        w, h = im.size
    grey = np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16)
    target = path.with_suffix(".png")
    path.unlink()
    Image.fromarray(grey).save(target)
    with Image.open(target) as im:
        if im.mode != "I;16":
            raise SetupError(f"PIL wrote the 16-bit image as mode {im.mode}, not I;16")
    return str(target)


def damage_truncated_image(root):
    path = _image(root)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path.name


def data_case(damage, words_of, expect="error"):
    """train_nemo on a damaged copy of S: refused naming the file (or a warning)."""
    def case(sw: Sweep) -> Outcome:
        root, what = sw.damaged(damage.__name__, damage)
        w = sw.workdir(sw.case)
        args = NEMO + [f"--workdir={w}"] + sw.roots(root)
        if expect == "warning":     # it trains: as few steps as possible
            args += ["--config.num_steps=2", "--config.checkpoint_every=2"]
        p = sw.run(args)
        if expect == "warning":
            return expect_warning(p, words_of(what))
        return expect_error(p, words_of(what), nothing_written(w))
    return case


# -- finding 1 and 3: configs

def case_data_root_alone(sw):
    w = sw.workdir("data_root_alone")
    p = sw.run(NVSM + [f"--workdir={w}", f"--config.data_root={sw.S / 'train'}"])
    return expect_error(p, ["data_root", "test_root"], nothing_written(w))


# -- a finished NVSM cell (shared): its refused and corrected runs

def _nvsm_fixture(sw: Sweep) -> dict:
    def make():
        w = sw.workdir("nvsm")
        refused = sw.run(NVSM + [f"--workdir={w}"] + sw.roots() + NVSM_CELL
                         + ["--config.estep.azimuth_steps=-1"])
        left = nothing_written(w)
        corrected = sw.run(NVSM + [f"--workdir={w}"] + sw.roots() + NVSM_CELL)
        return {"w": w, "refused": refused, "left": left, "corrected": corrected}
    return sw.once("nvsm", make)


def _finished_nvsm(sw: Sweep) -> Path:
    fx = _nvsm_fixture(sw)
    if fx["corrected"].rc != 0 or not (fx["w"] / "results.json").exists():
        raise SetupError("the tiny NVSM run did not finish", fx["corrected"])
    return fx["w"]


def case_azimuth_steps(sw):
    fx = _nvsm_fixture(sw)
    first = expect_error(fx["refused"], ["estep.azimuth_steps", "-1"], fx["left"])
    p = fx["corrected"]
    problems = [] if (fx["w"] / "results.json").exists() else ["no results.json"]
    second = expect_correct(p, problems)
    procs = [fx["refused"], p]
    if first.status != "ok":
        return Outcome("FAILED", "refused run: " + first.detail, procs)
    if second.status != "ok":
        return Outcome("FAILED", "corrected rerun in the same workdir: " + second.detail, procs)
    return Outcome("ok", f"{first.detail} -> corrected rerun exit 0 ({p.seconds:.0f} s)", procs)


def _test3(sw: Sweep) -> Path:
    """A test root of S's images less the last one of each list (another test set)."""
    def make():
        root = sw.scratch / "data" / "test3" / "test"
        if root.parent.exists():
            shutil.rmtree(root.parent)
        shutil.copytree(sw.S / "test", root)
        for lst in (root / "lists").glob("*/mesh01.txt"):
            names = lst.read_text().split()
            lst.write_text("".join(n + "\n" for n in names[:-1]))
        return root
    return sw.once("test3", make)


def case_rerun_other_test_root(sw):
    src = _finished_nvsm(sw)
    t3 = _test3(sw)
    w = sw.copy_workdir(src, "nvsm_other_test_root")
    p = sw.run(NVSM + [f"--workdir={w}", f"--config.data_root={sw.S / 'train'}",
                       f"--config.test_root={t3}"] + NVSM_CELL)
    bad = []
    try:
        res = json.loads((w / "results.json").read_text())
        data = res["data"]["car"]
        if data["test_root"] != str(t3):
            bad.append(f"results.json data.test_root is {data['test_root']}")
        counts = {k: v["count"] for k, v in data["test"].items()}
        if set(counts.values()) != {3}:
            bad.append(f"results.json test counts {counts} (the new root has 3 per level)")
        n = sorted({r["num_images"] for r in res["rows"]})
        if n != [3]:
            bad.append(f"results.json rows evaluated on {n} images (the new root has 3)")
        report = (w / "report.md").read_text()
        if str(t3) not in report or str(sw.S / "test") in report:
            bad.append("report.md does not name (only) the new test root")
        cfg = json.loads((w / "config.json").read_text())
        if cfg.get("test_root") != str(t3):
            bad.append(f"config.json test_root {cfg.get('test_root')}")
        cell = json.loads((w / "nvsm_car_7" / "rows.json").read_text())["inputs"]
        if cell["test_root"] != str(t3):
            bad.append(f"the cell's rows.json test_root {cell['test_root']}")
    except (OSError, KeyError, TypeError, ValueError) as e:
        bad.append(f"cannot read the results ({type(e).__name__}: {e})")
    said = "warned" if "the test set is now" in p.stderr else "did not warn"
    return expect_correct(p, bad, "results.json, report.md, config.json and the cell name "
                          f"the new test root; 3 images per level (the cell re-evaluated; "
                          f"the run {said} that the test set changed)")


# -- finding 4: NaN

def _checkpoint_check(sw: Sweep, ckpt_dir: Path) -> tuple[list[int], list[str]]:
    """(steps on disk, problems): each checkpoint restored and checked finite."""
    steps = sorted(int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit()) \
        if ckpt_dir.is_dir() else []
    if not steps:
        return steps, []
    code = ("import sys, json, numpy as np, jax, orbax.checkpoint as ocp\n"
            "out = {}\n"
            "for d in sys.argv[1:]:\n"
            "    t = ocp.StandardCheckpointer().restore(d + '/default')\n"
            "    out[d] = all(bool(np.all(np.isfinite(np.asarray(x))))\n"
            "                 for x in jax.tree_util.tree_leaves(t)\n"
            "                 if np.asarray(x).dtype.kind == 'f')\n"
            "print(json.dumps(out))\n")
    p = sw.run(["-c", code] + [str(ckpt_dir / str(s)) for s in steps])
    if p.rc != 0:
        return steps, [f"could not read the checkpoints: {p.tail(3)}"]
    finite = json.loads(p.stdout.strip().splitlines()[-1])
    return steps, [f"checkpoint {Path(d).name} holds non-finite values"
                   for d, ok in finite.items() if not ok]


def case_lr_nan(sw):
    w = sw.workdir("lr_nan")
    p = sw.run(NEMO + [f"--workdir={w}"] + sw.roots() + ["--config.optim.lr=nan"])
    steps, bad = _checkpoint_check(sw, w / "checkpoints")
    on_disk = [f"checkpoints {steps} on disk"] if steps else []
    return expect_error(p, ["optim.lr", "nan"], nothing_written(w) + bad + on_disk)


def case_diverged_training(sw):
    """A config that passes the checks but diverges: stops at the step, keeps the last
    finite checkpoint, saves nothing non-finite."""
    w = sw.workdir("diverged")
    p = sw.run(NEMO + [f"--workdir={w}"] + sw.roots() + ["--config.optim.lr=1e30"])
    steps, bad = _checkpoint_check(sw, w / "checkpoints")
    m = re.search(r"at step (\d+)", p.stderr)
    if m and any(s >= int(m.group(1)) for s in steps):
        bad.append(f"checkpoint {max(steps)} at or after the diverged step {m.group(1)}")
    out = expect_error(p, ["step", "optim.lr"], bad)
    if out.status == "ok":
        out.detail += f" [checkpoints on disk: {steps}, all finite]"
    return out


def case_weights_cache_nan(sw):
    cache = sw.scratch / "weights_cache"
    if cache.exists():
        shutil.rmtree(cache)
    env = sw.env(NVSM_JAX_CACHE=str(cache))
    build = sw.run(["-c", "from nvsm_jax.models import weights; "
                          "weights.load_imagenet('efficientnet_lite0')"], env=env)
    files = sorted(cache.glob("*.npz"))
    if build.rc != 0 or len(files) != 1:
        return Outcome("FAILED", f"building the scratch cache failed (exit {build.rc}, "
                       f"{len(files)} files)", [build])
    path = files[0]
    with np.load(path) as z:
        arrays = {k: (np.full_like(z[k], np.nan) if z[k].dtype.kind == "f" else z[k])
                  for k in z.files}
    with open(path, "wb") as f:
        np.savez(f, **arrays)               # a valid .npz of NaNs, its record kept
    w = sw.workdir("weights_nan")
    p = sw.run(NEMO + [f"--workdir={w}"] + sw.roots()
               + ["--config.model.backbone=efficientnet_lite0",
                  "--config.model.pretrained=imagenet", "--config.num_steps=1",
                  "--config.checkpoint_every=1"], env=env)
    bad = []
    try:
        with np.load(path) as z:
            if not all(np.all(np.isfinite(z[k])) for k in z.files if z[k].dtype.kind == "f"):
                bad.append("the cache still holds NaN after the run")
    except Exception as e:                  # noqa: BLE001
        bad.append(f"the cache is unreadable after the run ({e})")
    out = expect_warning(p, [path.name, "non-finite", "rebuilding"], bad)
    out.procs.insert(0, build)
    return out


# -- finding 6: run state (the finished NVSM cell)

def case_pseudo_labels_damaged(sw):
    src = _finished_nvsm(sw)
    w = sw.copy_workdir(src, "nvsm_damaged_round")
    cell = w / "nvsm_car_7"
    r = json.loads((cell / "progress.json").read_text())["round"]
    if r < 1:
        return Outcome("FAILED", f"setup: progress.json records round {r}; no round file "
                       "is read on resume", [])
    (cell / "rows.json").unlink()           # the cell unfinished: its run state is read
    rng = np.random.default_rng(1)
    (cell / "pseudo_labels" / f"round_{r:03d}.npz").write_bytes(
        rng.integers(0, 256, 700, dtype=np.uint8).tobytes())
    p = sw.run(NVSM + [f"--workdir={w}"] + sw.roots() + NVSM_CELL)
    return expect_error(p, [f"round_{r:03d}.npz", "damaged"])


def case_kill_between_round_files(sw):
    """The state a kill leaves between round r's ``rounds.jsonl`` entry and its
    ``progress.json``: the round file and log entry written, progress.json and the
    staged E-step still those of round r-1. The resume must report every round once."""
    src = _finished_nvsm(sw)
    w = sw.copy_workdir(src, "nvsm_kill_between_writes")
    cell = w / "nvsm_car_7"
    r = json.loads((cell / "progress.json").read_text())["round"]
    entries = [json.loads(ln) for ln in (cell / "rounds.jsonl").read_text().splitlines()
               if ln.strip()]
    by_round = {e["round"]: e for e in entries}
    if r < 1 or r - 1 not in by_round:
        return Outcome("FAILED", f"setup: progress round {r}, rounds.jsonl {sorted(by_round)}",
                       [])
    with np.load(cell / "pseudo_labels" / f"round_{r:03d}.npz") as z:
        pl = {k: z[k] for k in z.files}
    new = pl["round"] == r
    last = by_round[r]
    np.savez(cell / "pseudo_labels" / f"estep_{r:03d}.npz",
             **{k: v[new] for k, v in pl.items()}, num_views=last.get("num_views") or 0,
             seconds=last.get("estep_seconds") or 0.0,
             agreement=np.nan if last.get("agreement") is None else last["agreement"])
    (cell / "progress.json").write_text(json.dumps({"round": r - 1,
                                                    "step": by_round[r - 1]["step"]}))
    (cell / "rows.json").unlink()
    p = sw.run(NVSM + [f"--workdir={w}"] + sw.roots() + NVSM_CELL)
    bad = []
    try:
        after = [json.loads(ln)["round"] for ln in
                 (cell / "rounds.jsonl").read_text().splitlines() if ln.strip()]
        if after != list(range(r + 1)):
            bad.append(f"rounds.jsonl holds rounds {after} (expected {list(range(r + 1))})")
        done = json.loads((cell / "progress.json").read_text())
        if done.get("round") != r:
            bad.append(f"progress.json {done}")
        report = (w / "report.md").read_text()
        row = [ln for ln in report.splitlines() if ln.startswith("| car | 7 |") and "@" in ln]
        if not row or row[0].count("@") != r:
            bad.append(f"report.md's pseudo-label row {row[:1]} (expected {r} round(s))")
    except (OSError, KeyError, ValueError) as e:
        bad.append(f"cannot read the run state ({type(e).__name__}: {e})")
    how = ("resumed from the kill point" if f"resuming round {r}'s M-step" in p.stderr
           else f"did not log a resume of round {r}")
    return expect_correct(p, bad, f"rounds.jsonl holds rounds 0..{r} once each; report.md "
                          f"lists {r} round(s); {how}")


# -- finding 6: a NeMo run killed with kill -9 (shared), a second run while it runs

def _killed_nemo(sw: Sweep) -> dict:
    def make():
        w = sw.workdir("nemo_killed")
        args = NEMO + [f"--workdir={w}"] + sw.roots() + [
            f"--config.num_steps={KILLED_STEPS}", "--config.checkpoint_every=10",
            "--config.log_every=1"]
        a, a_out, a_err, a_cmd = sw.start(args, "nemo_killed")
        lock = w / "nvsm_run.lock"
        t0 = time.time()
        try:
            while not lock.exists() and a.poll() is None and time.time() - t0 < 120:
                time.sleep(0.05)
            if not lock.exists():
                raise SetupError(f"the first run never took the lock (exit {a.poll()}); see "
                                 f"{a_err}")
            second = sw.run(args, timeout=120)      # while the first holds the workdir
            alive_after_second = a.poll() is None
            metrics = w / "metrics.jsonl"

            def lines():
                try:
                    return sum(1 for ln in metrics.read_text().splitlines() if ln.strip())
                except OSError:
                    return 0
            while a.poll() is None and time.time() - t0 < 400:
                if lines() >= KILL_AT:
                    break
                time.sleep(0.02)
            if a.poll() is not None:
                raise SetupError(f"the run ended (exit {a.returncode}) before it could be "
                                 f"killed at {KILL_AT} metric lines; see {a_err}")
            os.kill(a.pid, signal.SIGKILL)
            a.wait()
        finally:
            if a.poll() is None:
                os.kill(a.pid, signal.SIGKILL)
                a.wait()
        at_kill = lines()
        snapshot = sw.scratch / "runs" / "nemo_killed_snapshot"
        if snapshot.exists():
            shutil.rmtree(snapshot)
        shutil.copytree(w, snapshot, symlinks=True)
        return {"w": w, "args": args, "pid": a.pid, "second": second,
                "alive_after_second": alive_after_second, "lines_at_kill": at_kill,
                "snapshot": snapshot, "first_cmd": a_cmd}
    return sw.once("killed", make)


def case_two_runs_one_workdir(sw):
    fx = _killed_nemo(sw)
    p = fx["second"]
    bad = [] if fx["alive_after_second"] else ["the first run had ended when the second "
                                               "one finished: nothing was tested"]
    return expect_error(p, [f"pid {fx['pid']}", "nvsm_run.lock", "in use"], bad)


def case_kill9_resume(sw):
    fx = _killed_nemo(sw)
    w = fx["w"]
    p = sw.run(fx["args"])
    bad = []
    try:
        steps = [json.loads(ln)["step"] for ln in (w / "metrics.jsonl").read_text().splitlines()
                 if ln.strip()]
        if steps != list(range(1, KILLED_STEPS + 1)):
            dup = sorted({s for s in steps if steps.count(s) > 1})
            bad.append(f"metrics.jsonl: {len(steps)} lines for {KILLED_STEPS} steps"
                       + (f", duplicated steps {dup[:10]}" if dup else "")
                       + (f", order {steps[:5]}...{steps[-3:]}" if not dup else ""))
    except (OSError, KeyError, ValueError) as e:
        bad.append(f"cannot read metrics.jsonl ({type(e).__name__}: {e})")
    if "taking over the lock" not in p.output:
        bad.append("no warning that the dead run's lock was taken over")
    return expect_correct(p, bad, f"killed at {fx['lines_at_kill']} metric lines; resumed: "
                          f"{KILLED_STEPS} lines, one per step; stale lock taken over with "
                          "a warning")


def case_evaluate_killed(sw):
    fx = _killed_nemo(sw)
    w = sw.copy_workdir(fx["snapshot"], "nemo_killed_evaluate")
    latest = max((int(d.name) for d in (w / "checkpoints").iterdir() if d.name.isdigit()),
                 default=None)
    out = w / "eval"
    p = sw.run(EVALUATE + [f"--workdir={w}", f"--data={sw.S / 'test'}", "--limit=1",
                           "--occlusions=L0", f"--out={out}"])
    bad = []
    try:
        rec = json.loads((out / "results.json").read_text()).get("checkpoint") or {}
        if rec.get("finished") is not False or rec.get("final_step") != KILLED_STEPS:
            bad.append(f"results.json checkpoint record {rec}")
        elif latest is not None and rec.get("step") != latest:
            bad.append(f"results.json names step {rec.get('step')}; the latest on disk is "
                       f"{latest}")
    except (OSError, ValueError) as e:
        bad.append(f"no results.json ({type(e).__name__}: {e})")
    return expect_warning(p, ["evaluating checkpoint step", f"last step {KILLED_STEPS}"], bad)


def case_evaluate_nonfinite_model(sw):
    """A checkpoint holding a NaN (as runs from before the train loop's check saved):
    ``evaluate`` refuses it instead of printing a normal-looking table."""
    fx = _killed_nemo(sw)
    w = sw.copy_workdir(fx["snapshot"], "nemo_nan_checkpoint")
    latest = max((int(d.name) for d in (w / "checkpoints").iterdir() if d.name.isdigit()),
                 default=None)
    if latest is None:
        return Outcome("FAILED", "setup: the killed run left no checkpoint", [])
    code = ("import sys, shutil, numpy as np, jax, orbax.checkpoint as ocp\n"
            "d = sys.argv[1]\n"
            "t = ocp.StandardCheckpointer().restore(d + '/default')\n"
            "leaves, tree = jax.tree_util.tree_flatten(t)\n"
            "i = next(i for i, x in enumerate(leaves) if np.asarray(x).dtype.kind == 'f'"
            " and np.asarray(x).size > 1)\n"
            "x = np.array(leaves[i]); x.flat[0] = np.nan; leaves[i] = x\n"
            "c = ocp.StandardCheckpointer()\n"
            "c.save(d + '/nan', jax.tree_util.tree_unflatten(tree, leaves))\n"
            "c.wait_until_finished()\n"
            "shutil.rmtree(d + '/default'); shutil.move(d + '/nan', d + '/default')\n")
    prep = sw.run(["-c", code, w / "checkpoints" / str(latest)])
    if prep.rc != 0:
        return Outcome("FAILED", "setup: writing a NaN into the checkpoint failed", [prep])
    p = sw.run(EVALUATE + [f"--workdir={w}", f"--data={sw.S / 'test'}", "--limit=1",
                           "--occlusions=L0", f"--out={w / 'eval'}"])
    left = [] if not (w / "eval" / "results.json").exists() else ["results.json written"]
    out = expect_error(p, [("NaN", "non-finite"), f"step {latest}"], left)
    out.procs.insert(0, prep)
    return out


def case_evaluate_truncated_config(sw):
    fx = _killed_nemo(sw)
    w = sw.copy_workdir(fx["snapshot"], "nemo_truncated_config")
    cfg = w / "config.json"
    text = cfg.read_text()
    cfg.write_text(text[:len(text) // 2])
    p = sw.run(EVALUATE + [f"--workdir={w}", f"--data={sw.S / 'test'}", "--limit=1",
                           "--occlusions=L0", f"--out={w / 'eval'}"])
    return expect_error(p, ["config.json"])


# -- finding 6: a full disk

def case_full_disk(sw):
    mnt = sw.scratch / "full_disk"
    mnt.mkdir(exist_ok=True)
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if m.returncode != 0:
        return Outcome("skipped", "cannot mount a 1 MB tmpfs here: "
                       + (m.stderr.strip() or f"mount exit {m.returncode}"), [])
    try:
        w = mnt / "W"
        p = sw.run(NEMO + [f"--workdir={w}"] + sw.roots())
        noise = p.output.count("Event loop is closed")
        return expect_error(p, [("no space left", "No space left"), str(mnt)],
                            [f"{noise} 'Event loop is closed' lines"] if noise else [])
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def case_png16(sw):
    root, path = sw.damaged("damage_png16", damage_png16)
    code = ("import sys, json\n"
            "from nvsm_jax.data.loaders import load_image, load_pose_set\n"
            "img = load_image(sys.argv[1])\n"
            "s = load_pose_set(sys.argv[2], 'car')\n"
            "print(json.dumps({'mean': float(img.mean()), 'min': int(img.min()), "
            "'max': int(img.max()), 'shape': list(img.shape), 'dtype': str(img.dtype), "
            "'n': len(s)}))\n")
    p = sw.run(["-c", code, path, root / "train"])
    bad = []
    try:
        got = json.loads(p.stdout.strip().splitlines()[-1])
        if not (120 < got["mean"] < 135 and got["min"] <= 1 and got["max"] >= 254
                and got["dtype"] == "uint8" and got["shape"][-1] == 3 and got["n"] == 16):
            bad.append(f"loaded as {got} (a linear ramp 0..65535 should give mean ~127, "
                       "0..255; PIL's clip gives ~254)")
        detail = (f"ramp 0..65535 loads as uint8 {got['min']}..{got['max']}, mean "
                  f"{got['mean']:.1f}; the root loads ({got['n']} images)")
    except (IndexError, KeyError, ValueError):
        bad.append("no result printed")
        detail = ""
    return expect_correct(p, bad, detail)


# ----------------------------------------------------------------------------- the cases

@dataclasses.dataclass
class Case:
    name: str
    finding: str
    expect: str
    fn: Callable[[Sweep], Outcome]


def _file_words(what):
    return [what]


CASES = [
    # 1. roots
    Case("data_root_alone", "1", "error", case_data_root_alone),
    # 2. results that match their inputs
    Case("rerun_other_test_root", "2", "correct", case_rerun_other_test_root),
    # 3. impossible values
    Case("keep_checkpoints_0", "3", "error",
         refused_config(NVSM, ["--config.keep_checkpoints=0"], ["keep_checkpoints"],
                        "keep_checkpoints_0")),
    Case("azimuth_steps_-1_then_corrected", "3", "error, then correct", case_azimuth_steps),
    Case("num_labelled_0", "3", "error",
         refused_config(NEMO, ["--config.num_labelled=0"], ["num_labelled"], "num_labelled_0")),
    Case("annotations_0", "3", "error",
         refused_config(NVSM, ["--config.annotations=(0,)"], ["annotations"], "annotations_0")),
    Case("num_steps_0", "3", "error",
         refused_config(NEMO, ["--config.num_steps=0"], ["num_steps"], "num_steps_0")),
    Case("fewshot_steps_0", "3", "error",
         refused_config(NVSM, ["--config.fewshot_steps=0"], ["fewshot_steps"],
                        "fewshot_steps_0")),
    Case("num_rounds_-1", "3", "error",
         refused_config(NVSM, ["--config.num_rounds=-1"], ["num_rounds"], "num_rounds_-1")),
    Case("log_every_0", "3", "error",
         refused_config(NEMO, ["--config.log_every=0"], ["log_every"], "log_every_0")),
    Case("seed_-1", "3", "error",
         refused_config(NVSM, ["--config.seed=-1"], ["seed"], "seed_-1")),
    Case("feature_dim_0", "3", "error",
         refused_config(NEMO, ["--config.model.feature_dim=0"], ["model.feature_dim"],
                        "feature_dim_0")),
    Case("mcss_seed_-1", "3", "error",
         refused_config(["-m", "experiments.mcss", "--config=mcss:tiny"], ["--config.seed=-1"],
                        ["seed"], "mcss_seed_-1", roots=False)),
    Case("make_synthetic_train_0", "3", "error",
         refused_synthetic(["--train", "0", "--test", "4"], [("--train", "num_train")],
                           "synth_train_0")),
    Case("make_synthetic_test_-1", "3", "error",
         refused_synthetic(["--train", "16", "--test", "-1"], [("--test", "num_test")],
                           "synth_test_-1")),
    Case("make_synthetic_batch_0", "3", "error",
         refused_synthetic(["--train", "16", "--test", "4", "--batch", "0"],
                           [("--batch", "batch_size")], "synth_batch_0")),
    # 4. NaN
    Case("optim_lr_nan", "4", "error", case_lr_nan),
    Case("loss_temperature_0", "4", "error",
         refused_config(NEMO, ["--config.loss.temperature=0"], ["loss.temperature"],
                        "temperature_0")),
    Case("diverged_training", "4", "error", case_diverged_training),
    Case("weights_cache_nan", "4", "warning", case_weights_cache_nan),
    # 5. geometry and images
    Case("mesh_x100", "5", "error",
         data_case(damage_mesh_x100, lambda what: [what, "camera is inside"])),
    Case("mesh_flattened", "5", "warning",
         data_case(damage_mesh_flat, lambda what: ["01.off", what, "degenerate"],
                   expect="warning")),
    Case("principal_point_1e6", "5", "error",
         data_case(damage_principal, lambda what: [what, "principal point"])),
    Case("png_16bit_grey", "5", "correct", case_png16),
    Case("azimuth_true", "5", "error",
         data_case(damage_azimuth_bool, lambda what: [what, "azimuth", "boolean"])),
    Case("image_truncated", "5", "error", data_case(damage_truncated_image, _file_words)),
    # 6. files and faults
    Case("pseudo_labels_round_damaged", "6", "error", case_pseudo_labels_damaged),
    Case("kill_between_round_files", "6", "correct", case_kill_between_round_files),
    Case("full_disk", "6", "error", case_full_disk),
    Case("two_runs_one_workdir", "6", "error", case_two_runs_one_workdir),
    Case("evaluate_killed_run", "6", "warning", case_evaluate_killed),
    Case("evaluate_nan_checkpoint", "4", "error", case_evaluate_nonfinite_model),
    Case("kill9_resume_metrics", "6", "correct", case_kill9_resume),
    Case("evaluate_truncated_config", "6", "error", case_evaluate_truncated_config),
    Case("mesh_random_bytes", "6", "error",
         data_case(damage_mesh_bytes, lambda what: [what, "not a text mesh"])),
]


# ----------------------------------------------------------------------------- main

def _scratch(keep: str) -> Path:
    if not keep:
        return Path(tempfile.mkdtemp(prefix="nvsm_fault_sweep_"))
    d = Path(keep).resolve()
    if d.exists() and any(d.iterdir()):
        if not (d / MARKER).exists():
            raise SystemExit(f"fault_sweep: --keep {d} is not empty and not a sweep's folder "
                             f"(no {MARKER}); give an empty or new folder")
        for q in d.iterdir():
            if q.name != MARKER:
                shutil.rmtree(q) if q.is_dir() and not q.is_symlink() else q.unlink()
    d.mkdir(parents=True, exist_ok=True)
    (d / MARKER).write_text("scratch folder of python -m tests.fault_sweep\n")
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--json", default="", help="also write the table as JSON")
    ap.add_argument("--keep", default="", metavar="DIR",
                    help="scratch folder to use and keep (data, workdirs, logs/)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per command")
    args = ap.parse_args(argv)

    chosen = list(CASES)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {c.name for c in chosen}
        if unknown:
            ap.error(f"unknown case(s): {', '.join(sorted(unknown))}")
        chosen = [c for c in chosen if c.name in names]
    if args.list:
        for c in chosen:
            print(f"{c.name:34s} finding {c.finding}  {c.expect}")
        print(f"{len(chosen)} cases")
        return 0

    scratch = _scratch(args.keep)
    sw = Sweep(scratch, args.timeout)
    rows = []
    t_all = time.perf_counter()
    print(f"{len(chosen)} cases, scratch folder {scratch}", flush=True)
    try:
        for i, c in enumerate(chosen, 1):
            sw.case = c.name
            t0 = time.perf_counter()
            try:
                out = c.fn(sw)
            except SetupError as e:
                out = Outcome("FAILED", f"setup: {e}", [e.proc] if e.proc else [])
            except Exception as e:          # noqa: BLE001 - the sweep goes on
                out = Outcome("FAILED", f"sweep error: {type(e).__name__}: {e}", [])
            dt = time.perf_counter() - t0
            rows.append({"name": c.name, "finding": c.finding, "expect": c.expect,
                         "status": out.status, "seconds": round(dt, 1), "detail": out.detail,
                         "commands": [p.command for p in out.procs],
                         "exit": [p.rc for p in out.procs],
                         "output": [p.tail() for p in out.procs] if out.status != "ok" else []})
            print(f"[{i}/{len(chosen)}] {c.name}: {out.status} ({dt:.0f} s)", flush=True)
            if out.status != "ok":
                print("    " + out.detail.replace("\n", "\n    "), flush=True)
                for p in out.procs:
                    print(f"    $ {p.command}\n    (exit {p.rc})\n      "
                          + p.tail().replace("\n", "\n      "), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    total = time.perf_counter() - t_all

    def cell(text):
        return text.replace("|", "\\|").replace("\n", " / ")
    print("\n| case | finding | expectation | result | s | detail |\n|---|---|---|---|---|---|")
    for r in rows:
        detail = r["detail"] if len(r["detail"]) <= 160 else r["detail"][:157] + "..."
        print(f"| {r['name']} | {r['finding']} | {r['expect']} | {r['status']} "
              f"| {r['seconds']:.0f} | {cell(detail)} |")
    failed = [r for r in rows if r["status"] == "FAILED"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    print(f"\nmet {len(rows) - len(failed) - len(skipped)} / {len(rows)}"
          + (f" ({len(skipped)} skipped)" if skipped else "")
          + f" in {total:.0f} s" + (f"; kept in {scratch}" if args.keep else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "failed": len(failed),
                                               "skipped": len(skipped), "seconds": total},
                                              indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
