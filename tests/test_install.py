"""Installed use: configs resolve from any folder, under the installed package name.

* ``experiments.configs.resolve`` / ``load_config``: ``NAME[:ARG]``, a file ``PATH[:ARG]``,
  the repository's documented paths from another folder, errors naming what exists;
* the binaries' ``--config`` flag, parsed in a fresh interpreter whose working folder
  is elsewhere and whose ``sys.path`` lacks the repository (as after ``pip install``):
  the binaries import as ``nvsm_jax_experiments`` and never import ``experiments``;
* the wheel's package list covers every package directory, and the console scripts
  point at functions that exist; the library never imports the binaries;
* jax's "Unable to initialize backend" INFO probe line is dropped, nothing else.
No training: a few seconds.
"""

import ast
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from experiments import configs
from experiments.configs import nemo as nemo_config
from experiments.configs import nvsm as nvsm_config
from nvsm_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_names_and_variants_resolve_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert configs.resolve("nvsm:tiny") == (nvsm_config, "tiny")
    assert configs.resolve("nemo") == (nemo_config, None)
    assert configs.load_config("nvsm:tiny").to_dict() == nvsm_config.get_config("tiny").to_dict()
    assert configs.load_config("nemo").to_dict() == nemo_config.get_config().to_dict()
    # an absolute path to one of the package's files is the package module (relative imports)
    assert configs.resolve(nvsm_config.__file__ + ":paper") == (nvsm_config, "paper")
    for bad, words in (("nvsmm:demo", "unknown config 'nvsmm'"),
                       ("nowhere/mine.py", "not found"), ("", "empty")):
        with pytest.raises(ValueError, match=words):
            configs.resolve(bad)
    with pytest.raises(ValueError, match="'demo', 'paper' or 'tiny'"):
        configs.load_config("nvsm:huge")


def test_a_missing_config_path_is_an_error_naming_it(tmp_path, monkeypatch):
    """Never the packaged config of the same name: a mistyped path to an edited copy
    would otherwise run the packaged one silently."""
    monkeypatch.chdir(tmp_path)
    for spec, path, hint in (
            ("experiments/configs/nvsm.py:demo", "experiments/configs/nvsm.py",
             "for the package's own 'nvsm' config write --config=nvsm:demo"),
            ("my/configs/nemo.py", "my/configs/nemo.py", "own 'nemo' config write --config=nemo"),
            ("mine/nvsm_edited.py:tiny", "mine/nvsm_edited.py",
             "the package's configs are mcss, nemo, nvsm, synthetic (e.g. --config=nvsm:demo)")):
        with pytest.raises(errors.ConfigError) as info:
            configs.load_config(spec)
        message = str(info.value)
        assert message.startswith(f"config file {path!r} not found (from {str(tmp_path)!r})")
        assert message.endswith(hint), message
    # the same file, present, is loaded (and a package file is the package module)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "nvsm_edited.py").write_text(
        "def get_config(arg='a'):\n    return {'arg': arg}\n")
    assert configs.load_config("mine/nvsm_edited.py:tiny") == {"arg": "tiny"}


def test_a_config_file_of_ones_own(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text(
        "import ml_collections\n"
        "from experiments.configs import nemo\n"
        "def get_config(arg='a'):\n"
        "    c = nemo.get_config('tiny')\n"
        "    c.note = arg\n"
        "    return c\n")
    monkeypatch.chdir(tmp_path)
    assert configs.load_config("mine.py").note == "a"
    assert configs.load_config(str(tmp_path / "mine.py") + ":b").note == "b"
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no get_config"):
        configs.load_config("empty.py")


_PROBE = r"""
import importlib, json, sys
module, keys = sys.argv[1], json.loads(sys.argv[2])
sys.argv = ["prog"] + sys.argv[3:]            # ml_collections reads the overrides from sys.argv
from absl import flags
importlib.import_module("nvsm_jax_experiments." + module)
flags.FLAGS(sys.argv)
values = []
for key in keys:                              # "data.num_train" -> config["data"]["num_train"]
    value = flags.FLAGS.config
    for part in key.split("."):
        value = value[part]
    values.append(value)
print(json.dumps({"values": values, "experiments imported": any(
    m == "experiments" or m.startswith("experiments.") for m in sys.modules)}))
"""


def _parse_in_another_folder(folder, module, keys, *argv):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", _PROBE, module, json.dumps(keys), *argv],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["experiments imported"] is False
    return out["values"]


def test_binaries_parse_package_configs_in_another_folder(tmp_path):
    """The flags as ``nvsm-fewshot --config=nvsm:tiny --config.fewshot_steps=3`` parse them,
    from a folder without the repository, importing ``nvsm_jax_experiments`` only."""
    demo, tiny = nvsm_config.get_config("demo"), nvsm_config.get_config("tiny")
    assert _parse_in_another_folder(tmp_path, "nvsm_fewshot", ["num_rounds", "data.num_train"],
                                    "--workdir=w") == [demo.num_rounds, demo.data.num_train]
    assert _parse_in_another_folder(
        tmp_path, "nvsm_fewshot", ["fewshot_steps", "data.num_train"], "--config=nvsm:tiny",
        "--config.fewshot_steps=3", "--workdir=w") == [3, tiny.data.num_train]
    assert _parse_in_another_folder(tmp_path, "train_nemo", ["num_steps"],
                                    "--config=nemo:tiny",
                                    "--workdir=w") == [nemo_config.get_config("tiny").num_steps]
    from experiments.configs import mcss as mcss_config
    assert _parse_in_another_folder(tmp_path, "mcss", ["seed"], "--workdir=w") == \
        [mcss_config.get_config("demo").seed]


def test_make_synthetic_default_config_from_another_folder(tmp_path, monkeypatch):
    from experiments import make_synthetic
    from experiments.configs import synthetic as synthetic_config
    monkeypatch.chdir(tmp_path)
    assert make_synthetic.load_config(None).to_dict() == synthetic_config.get_config().to_dict()
    assert make_synthetic.load_config("synthetic:tiny").num_train == \
        synthetic_config.get_config("tiny").num_train
    with pytest.raises(SystemExit):          # argparse's error, naming the known configs
        make_synthetic.main(["--out", str(tmp_path / "x"), "--config", "synthetc"])


def test_wheel_packages_and_console_scripts():
    project = _pyproject()
    packages = set(project["tool"]["setuptools"]["packages"])
    mapping = project["tool"]["setuptools"]["package-dir"]
    assert mapping == {"nvsm_jax_experiments": "experiments"}
    found = set()
    for top, installed in (("nvsm_jax", "nvsm_jax"), ("rasterizer", "rasterizer"),
                           ("experiments", "nvsm_jax_experiments")):
        for folder, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                rel = os.path.relpath(folder, os.path.join(REPO, top))
                found.add(installed if rel == "." else installed + "." + rel.replace(os.sep, "."))
    assert packages == found, "pyproject's [tool.setuptools] packages must list every package"
    assert not packages & {"experiments", "benchmarks"}
    scripts = project["project"]["scripts"]
    assert {"nvsm-fewshot", "nvsm-train-nemo", "nvsm-evaluate", "nvsm-mcss",
            "nvsm-make-synthetic", "nvsm-show-data", "nvsm-prepare-pascal3d",
            "nvsm-prepare-kitti", "nvsm-prepare-h36m", "nvsm-report",
            "nvsm-launch"} <= set(scripts)
    for target in scripts.values():
        module, func = target.split(":")
        module = module.replace("nvsm_jax_experiments", "experiments", 1)
        assert callable(getattr(importlib.import_module(module), func)), target


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel of this tree installed (``pip install --no-deps --target``) into a fresh
    folder: ``(site, bin)``; its dependencies come from this interpreter."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"                   # a copy: an in-tree build would write into the tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for top in ("nvsm_jax", "rasterizer", "experiments"):
        shutil.copytree(os.path.join(REPO, top), src / top,
                        ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-compile", "--target", str(site), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return str(site), str(site / "bin")


_PATH = re.compile(r"/?[\w.{}<>*+-]+(?:/[\w.{}<>*+-]+)+")
_MODULE = re.compile(r"\b(?:nvsm_jax_experiments|nvsm_jax|rasterizer)(?:\.\w+)+")
_SOURCES = ("nvsm_jax", "rasterizer", "nvsm_jax_experiments", "experiments", "benchmarks",
            "notebooks", "tests", "docs")


def _not_installed(text, site):
    """The project files (``pkg/mod.py``, ``experiments/...``) and modules
    (``nvsm_jax.data.kitti``, ``nvsm_jax.parallel.initialize``) that ``text`` names and
    the install at ``site`` lacks."""
    missing = []
    for path in _PATH.findall(text):
        path = path.rstrip(".:,")
        if path.startswith("/"):        # an absolute path: an example of the user's own
            continue
        if path.split("/")[0] in _SOURCES or path.endswith((".py", ".ipynb", ".toml")):
            if not os.path.exists(os.path.join(site, path)):
                missing.append(path)
    for dotted in _MODULE.findall(text):
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):  # the longest installed module, then attributes
            base = os.path.join(site, *parts[:n])
            source = next((f for f in (base + ".py", os.path.join(base, "__init__.py"))
                           if os.path.isfile(f)), None)
            if source:
                break
        rest = parts[n:]
        if source is None or len(rest) > 1 or (rest and not re.search(
                rf"^(def|class) {rest[0]}\b|^{rest[0]}\s*[:=]", open(source).read(), re.M)):
            missing.append(dotted)
    return missing


def test_installed_help_texts_name_console_scripts_and_installed_files(installed, tmp_path):
    """Each console script's ``--help``, run from an empty folder with only the wheel's
    packages importable, shows commands a pip user can run: console scripts, never
    ``python -m experiments.X``, and no file of the repository the wheel lacks. So do
    the configs' docstrings. A ``--config`` path that does not exist stops the parse
    with one message naming it (no fallback to the packaged config)."""
    site, bindir = installed
    scripts = sorted(_pyproject()["project"]["scripts"])
    assert sorted(os.listdir(bindir)) == scripts
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(PYTHONPATH=site, JAX_PLATFORMS="cpu", PATH=bindir + os.pathsep + env["PATH"])
    runs = {name: subprocess.Popen([os.path.join(bindir, name), "--help"], cwd=empty, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name in scripts}
    wrong = subprocess.Popen([os.path.join(bindir, "nvsm-train-nemo"),
                              "--config=experiments/configs/nemo.py:tiny", "--workdir=w"],
                             cwd=empty, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    problems = {}
    for name, proc in runs.items():
        text, _ = proc.communicate(timeout=180)
        # absl's --help exits 1, argparse's 0
        found = [f"exit {proc.returncode}"] if proc.returncode not in (0, 1) else []
        found += [] if re.search(r"^\s+--[\w\[\]]", text, re.M) else ["no flags listed"]
        found += re.findall(r"python3? -m experiments\b[.\w]*", text)
        found += [f"no example of {name}"] if f"{name} --" not in text else []
        found += _not_installed(text, site)
        if found:
            problems[name] = found
    for name in ("nemo", "nvsm", "mcss", "synthetic"):
        path = os.path.join(site, "nvsm_jax_experiments", "configs", name + ".py")
        doc = ast.get_docstring(ast.parse(open(path).read()))
        found = re.findall(r"python3? -m experiments\b[.\w]*", doc) + _not_installed(doc, site)
        found += [] if re.search(rf"nvsm-\S+ --config[= ]{name}\b", doc) else ["no command"]
        if found:
            problems[f"configs/{name}.py"] = found
    assert not problems, problems
    text, _ = wrong.communicate(timeout=180)
    assert wrong.returncode not in (0, None)
    assert "config file 'experiments/configs/nemo.py' not found" in text, text
    assert "write --config=nemo:tiny" in text and "Traceback" not in text, text
    assert os.listdir(empty) == []


def test_not_installed_flags_repository_paths_and_unknown_modules(installed):
    site, _ = installed
    assert _not_installed("see nvsm_jax/data/kitti.py, nvsm_jax.parallel.initialize, "
                          ":mod:`nvsm_jax.data.pascal3d` and /abs/mine.py", site) == []
    assert _not_installed("see experiments/configs/nemo.py and nvsm_jax/data/nope.py; "
                          "nvsm_jax.data.kitti.nothing_here, nvsm_jax.nope.f and "
                          "DESIGN at nvsm_jax/mcss/DESIGN.md", site) == [
        "experiments/configs/nemo.py", "nvsm_jax/data/nope.py", "nvsm_jax/mcss/DESIGN.md",
        "nvsm_jax.data.kitti.nothing_here", "nvsm_jax.nope.f"]


def test_generated_dataset_readme_names_the_console_script(tmp_path):
    from types import SimpleNamespace

    from nvsm_jax.data import synthetic
    config = SimpleNamespace(categories=("car", "bus"), num_train=8, num_test=4,
                             image_size=(64, 64), seed=3)
    synthetic._write_readme(str(tmp_path), "train", config, {"car": 8})
    text = (tmp_path / "README").read_text()
    assert "Regenerate with:\n\n    nvsm-make-synthetic --out <DIR> --categories car,bus \\\n" \
           "        --train 8 --test 4 --size 64 \\\n        --seed 3\n" in text, text
    assert "python -m" not in text


def test_missing_default_data_root_says_which_command_makes_it(tmp_path, monkeypatch):
    """``nvsm-train-nemo --config=nemo:tiny`` from a folder without ``data/synthetic``:
    one DataError naming the root and ``nvsm-make-synthetic``; nothing written."""
    from nvsm_jax.nemo import train
    from nvsm_jax.data.format import DataError
    monkeypatch.chdir(tmp_path)
    config = nemo_config.get_config("tiny")
    assert config.data_root == "data/synthetic/train"
    with pytest.raises(DataError) as info:
        train.train_and_evaluate(config, tmp_path / "w")
    assert str(info.value) == (
        f"training root 'data/synthetic/train' not found (config.data_root, from "
        f"{str(tmp_path)!r}); make one with `nvsm-make-synthetic --out data/synthetic` "
        "(the default data/synthetic/train) or pass --config.data_root=DIR")
    assert os.listdir(tmp_path) == []
    config.data_root = ""
    with pytest.raises(DataError, match="training root '' not found"):
        train.load_train_set(config)


def test_the_library_never_imports_the_binaries():
    for top in ("nvsm_jax", "rasterizer"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                    for m in mods:
                        assert m.split(".")[0] not in ("experiments", "nvsm_jax_experiments",
                                                       "benchmarks"), f"{path} imports {m}"


def test_backend_probe_line_is_dropped_and_nothing_else():
    from nvsm_jax import parallel
    parallel.quiet_backend_probe_logs()
    parallel.quiet_backend_probe_logs()                  # idempotent
    logger = logging.getLogger("jax._src.xla_bridge")
    assert sum(type(f).__name__ == "_BackendProbeFilter" for f in logger.filters) == 1

    def kept(level, msg):
        return logger.filter(logging.LogRecord(logger.name, level, __file__, 1, msg, (), None))

    assert not kept(logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: Failed to "
                                  "open libtpu.so: libtpu.so: cannot open shared object file")
    assert kept(logging.WARNING, "Unable to initialize backend 'cuda': ...")
    assert kept(logging.WARNING, "A Google TPU may be present on this machine, but ...")
    assert kept(logging.INFO, "Some other message")


@pytest.mark.parametrize("override, words", [
    ("--config.num_round=3", ["error: did you mean --config.num_rounds? unknown config key 'num_round'"]),
    ("--config.estep.max_nw=3", ["error: did you mean --config.estep.max_new? unknown config key 'max_nw'"]),
    ("--config.num_rounds=abc", ["--config.num_rounds=abc", "invalid literal"]),
])
def test_a_config_override_typo_is_one_line_and_writes_nothing(tmp_path, override, words):
    """A mistyped ``--config`` key or an ill-typed value: one line naming it, exit status
    2, no traceback and no workdir (ml_collections raises it while absl parses)."""
    work = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "experiments.nvsm_fewshot", "--config=nvsm:tiny",
                           override, f"--workdir={work}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("nvsm_fewshot.py: error: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not work.exists()


def test_argparse_binaries_and_the_report_say_a_bad_input_in_one_line(tmp_path):
    """An argparse binary's bad flag: one line (no usage block), exit 2. ``nvsm-report``
    on a missing folder or on one with no finished cells (a few-shot workdir): one line,
    exit 2, and an existing ``report.md`` is left as it was."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    work = tmp_path / "fewshot"
    work.mkdir()
    (work / "report.md").write_text("the experiment's own report")
    for args in (["experiments.show_data", "--root", "r", "--out", "o", "--bogus"],
                 ["experiments.make_synthetic", "--out", str(tmp_path / "s"), "--train", "abc"],
                 ["experiments.report", f"--results={tmp_path / 'nothere'}"],
                 ["experiments.report", f"--results={work}"]):
        proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env=env)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and ": error: " in lines[0], proc.stderr
    assert "no finished cells" in lines[0]
    assert (work / "report.md").read_text() == "the experiment's own report"
    assert not (tmp_path / "s").exists()
