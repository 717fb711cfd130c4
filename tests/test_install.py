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
import subprocess
import sys
import tomllib

import pytest

from experiments import configs
from experiments.configs import nemo as nemo_config
from experiments.configs import nvsm as nvsm_config

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
    # the documented repository paths, run from elsewhere, mean the package's configs
    assert configs.resolve("experiments/configs/nvsm.py:demo") == (nvsm_config, "demo")
    # an absolute path to one of the package's files is the package module (relative imports)
    assert configs.resolve(nvsm_config.__file__ + ":paper") == (nvsm_config, "paper")
    for bad, words in (("nvsmm:demo", "unknown config 'nvsmm'"),
                       ("nowhere/mine.py", "not found"), ("", "empty")):
        with pytest.raises(ValueError, match=words):
            configs.resolve(bad)
    with pytest.raises(ValueError, match="'demo', 'paper' or 'tiny'"):
        configs.load_config("nvsm:huge")


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
                                    "--config=experiments/configs/nemo.py:tiny",
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
            "nvsm-make-synthetic"} <= set(scripts)
    for target in scripts.values():
        module, func = target.split(":")
        module = module.replace("nvsm_jax_experiments", "experiments", 1)
        assert callable(getattr(importlib.import_module(module), func)), target


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
