"""The package layout's one-way layers, read from the source (function-level imports
included): the shared core (``nvsm_jax/*.py``, ``data/``, ``models/``) imports none of
``nemo``, ``nvsm``, ``baselines`` and ``mcss``; ``nemo`` imports no ``nvsm``; the
rasteriser imports nothing of ``nvsm_jax``; the library never imports the binaries."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("nemo", "nvsm", "baselines", "mcss")


def _modules(package: str) -> dict:
    """``{dotted module name: path}`` of every .py file under ``package``."""
    out = {}
    for root, _, files in os.walk(os.path.join(REPO, package)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
                    os.path.join(root, f)
    return out


def _imports(path: str, known: dict) -> set:
    """The modules of ``known`` (and any other top-level package) that ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in known)
    return found


def _closure(start: str, graph: dict) -> set:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in graph.get(m, ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


@pytest.fixture(scope="module")
def graph():
    known = {**_modules("nvsm_jax"), **_modules("rasterizer")}
    return {m: _imports(p, known) for m, p in known.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[0] == "nvsm_jax" and len(parts) >= 2 and parts[1] in METHODS \
        else "core" if parts[0] == "nvsm_jax" else parts[0]


def test_the_core_imports_no_method(graph):
    core = [m for m in graph if m.startswith("nvsm_jax") and _layer(m) == "core"]
    assert "nvsm_jax.training" in core and "nvsm_jax.data.loaders" in core and len(core) > 20
    for m in core:
        bad = sorted(n for n in _closure(m, graph) if _layer(n) in METHODS)
        assert not bad, f"{m} imports {bad}"


def test_nemo_imports_no_nvsm_and_the_rasteriser_nothing_of_the_package(graph):
    for m in graph:
        reached = _closure(m, graph)
        if _layer(m) == "nemo":
            assert not [n for n in reached if _layer(n) == "nvsm"], m
        if m.startswith("rasterizer"):
            assert not [n for n in reached if n.startswith("nvsm_jax")], m
        if m.startswith(("nvsm_jax", "rasterizer")):
            assert not [n for n in reached if n.split(".")[0] in ("experiments", "benchmarks",
                                                                   "tests")], m


def test_every_method_package_says_what_it_holds():
    for name in METHODS:
        doc = ast.get_docstring(ast.parse(open(os.path.join(REPO, "nvsm_jax", name,
                                                            "__init__.py")).read()))
        assert doc and len(doc.split()) > 20, name


def test_loading_every_config_file_imports_neither_jax_nor_flax():
    """Config files read their defaults from the jax-free settings modules
    (``nvsm_jax.settings`` and each method's ``settings``): loading one, in a fresh
    interpreter, imports neither jax nor flax."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from experiments.configs import mcss, nemo, nvsm, synthetic\n"
            "for mod, args in ((nemo, ('default', 'tiny')), (nvsm, ('demo', 'paper', 'tiny')),\n"
            "                  (mcss, ('demo', 'demo_scratch', 'tiny', 'full')),\n"
            "                  (synthetic, ('', 'tiny', 'demo'))):\n"
            "    for a in args:\n"
            "        mod.get_config(a)\n"
            "print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _functions(package: str):
    for module, path in _modules(package).items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
                params += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                if params[:1] in (["self"], ["cls"]):
                    params = params[1:]
                yield module, node.name, len(params), node.end_lineno - node.lineno + 1


def test_no_library_function_takes_more_than_ten_parameters_nor_a_method_one_80_lines():
    """The layout's size rules: grouped arguments (e.g. ``training.StepRange`` and
    ``LoopLog`` for :func:`nvsm_jax.training.fit`) instead of long parameter lists, and
    NeMo's and NVSM's functions short enough to read."""
    many = [f"{m}.{f} ({n})" for pkg in ("nvsm_jax", "rasterizer")
            for m, f, n, _ in _functions(pkg) if n > 10]
    assert not many, f"over 10 parameters: {many}"
    long = [f"{m}.{f} ({lines} lines)" for m, f, _, lines in _functions("nvsm_jax")
            if _layer(m) in ("nemo", "nvsm") and lines > 80]
    assert not long, f"over 80 lines: {long}"
