"""notebooks/quickstart.ipynb executed end to end (nbclient + an ipykernel), so it cannot rot.

The kernel runs the notebook as a user would (one CPU device: the suite's forced device
count is dropped, its faster-compile flag kept) on the ``nvsm:tiny`` config, writing into
a temporary workdir. ~60 s on 2 cores.
"""

import json
import os
import re

import nbformat
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "notebooks", "quickstart.ipynb")


def test_stored_notebook_is_valid_and_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, \
                "store the notebook without outputs (clear them before committing)"
    assert "%pip install" in nb.cells[1].source


def test_quickstart_runs_end_to_end(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags.strip()
    env["NVSM_QUICKSTART_WORKDIR"] = str(tmp_path / "work")
    env.pop("NVSM_JAX_SOURCE", None)
    env["MPLBACKEND"] = "Agg"
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute(env=env)     # raises CellExecutionError with the cell's traceback

    outputs = {i: "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    assert "nvsm_jax is installed" in outputs[1]          # the install cell was skipped
    assert "CpuDevice" in outputs[2]
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if "image/png" in o.get("data", {}))
    assert images == 5                # the annotated poses + the run's four pictures
    assert any("text/markdown" in o.get("data", {}) and "| nvsm |" in o["data"]["text/markdown"]
               for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    rows = json.load(open(tmp_path / "work" / "run" / "results.json"))["rows"]
    assert {(r["method"], r["occlusion"]) for r in rows} >= {("nvsm", "L0")}
