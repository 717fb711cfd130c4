"""Bad input caught at the door of the checkpoint reader and of ``experiments.evaluate``:
an error naming the path (non-zero exit), or a row marked missing with its reason; never
results silently written over good ones."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nvsm_jax.data import DataError
from nvsm_jax.data.testing import write_tiny_root
from nvsm_jax.nemo import evaluate as nemo_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code, *args, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


_TRUNCATED_CHECKPOINT = """
    import asyncio, glob, os, sys
    import numpy as np
    from nvsm_jax import training
    tree = {f"w{i}": np.arange(50 + i, dtype=np.float32) for i in range(100)}
    ckpt = training.Checkpointer(sys.argv[1], save_every=1)
    ckpt.save(3, tree)
    ckpt.close()
    # the zarr metadata of every array: cut in half, as by a full disk or a killed copy
    meta = glob.glob(os.path.join(sys.argv[1], "3", "default", "d", "*"))[0]
    data = open(meta, "rb").read()
    open(meta, "wb").write(data[: len(data) // 2])
    ckpt = training.Checkpointer(sys.argv[1], save_every=1)
    try:
        ckpt.restore(tree, step=3)
    except ValueError as err:
        print("RAISED", err, flush=True)
    ckpt.close()

    # What tensorstore does after orbax's asyncio.run gave up (it happens for some of
    # the pending reads, depending on timing): a read completes and calls back into
    # the closed loop, in a context where Python can only print the error.
    class PendingRead:
        def __init__(self, loop, exc=None):
            self.loop, self.exc = loop, exc
        def __del__(self):
            if self.exc is not None:
                raise self.exc
            self.loop.call_soon_threadsafe(print)
    loop = asyncio.new_event_loop()
    loop.close()
    for _ in range(3):
        PendingRead(loop)
    PendingRead(loop, KeyError("a real bug elsewhere"))
    print("DONE", flush=True)
"""


def test_truncated_checkpoint_gives_one_error_without_event_loop_noise(tmp_path):
    res = _run_python(_TRUNCATED_CHECKPOINT, str(tmp_path / "ck"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"RAISED {tmp_path / 'ck' / '3'}: cannot restore this checkpoint" in res.stdout
    assert "DONE" in res.stdout
    assert "Event loop is closed" not in res.stderr
    # other errors Python can only print are still printed
    assert "KeyError: 'a real bug elsewhere'" in res.stderr


def test_other_unraisable_errors_still_reported():
    from nvsm_jax import training

    seen = []
    hook = training._DropClosedEventLoopNoise(seen.append)

    class U:
        def __init__(self, exc):
            self.exc_value = exc

    hook(U(RuntimeError("Event loop is closed")))
    hook(U(RuntimeError("something else")))
    hook(U(ValueError("Event loop is closed")))
    assert [str(u.exc_value) for u in seen] == ["something else", "Event loop is closed"]


# --------------------------------------------------------------------------- evaluate

@pytest.fixture(scope="module")
def nemo():
    from experiments.configs import nemo as nemo_config
    from nvsm_jax import meshes, parallel
    from nvsm_jax.nemo import train as nemo_train

    cfg = nemo_config.get_config("tiny")
    cfg.eval_batch_size = 4
    model = nemo_train.build_model(cfg.model)
    object_mesh = meshes.cuboid_mesh([-0.5, -1.0, -0.4], [0.5, 1.0, 0.4], 100)
    state = nemo_train.init_state(cfg, model, len(object_mesh.verts), (32, 32), parallel.make_mesh(1))
    return nemo_train.nemo_model(cfg, model, state, object_mesh)


def _old_outputs(out):
    """A previous evaluation's outputs, which a failed one must leave as they are."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"rows": [{"occlusion": "L1", "acc_pi_6": 50.0}]}, f)
    np.savez(os.path.join(out, "predictions_L1.npz"), pred=np.zeros((2, 4)))
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}


def _files(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}


def test_evaluate_missing_data_dir_raises_and_writes_nothing(tmp_path, nemo):

    out = str(tmp_path / "eval")
    before = _old_outputs(out)
    missing = str(tmp_path / "no_such_root")
    with pytest.raises(FileNotFoundError, match=f"{missing}: test root not found"):
        nemo_evaluate.evaluate_workdir(str(tmp_path), missing, nemo=nemo, out_dir=out)
    # a root that exists but holds none of the levels: also an error, nothing written
    os.makedirs(tmp_path / "empty_root")
    with pytest.raises(DataError, match=r"no level of car to evaluate \(L0: .* has no car "
                                        r"subset.*nothing written"):
        nemo_evaluate.evaluate_workdir(str(tmp_path), str(tmp_path / "empty_root"), nemo=nemo,
                                    out_dir=out, occlusions=["L0"])
    assert _files(out) == before


def test_evaluate_truncated_test_image_fails_naming_it_or_is_listed(tmp_path, nemo):

    root = str(tmp_path / "test")
    names = write_tiny_root(root, "car", num=3, size=(32, 32))
    png = os.path.join(root, "images", "car", names[1] + ".png")
    data = open(png, "rb").read()
    open(png, "wb").write(data[: len(data) // 2])
    out = str(tmp_path / "eval")
    before = _old_outputs(out)
    with pytest.raises(DataError, match="cannot decode image") as err:
        nemo_evaluate.evaluate_workdir(str(tmp_path), root, nemo=nemo, out_dir=out,
                                    occlusions=["L0"])
    assert str(err.value).startswith(png)
    assert _files(out) == before
    rows = nemo_evaluate.evaluate_workdir(str(tmp_path), root, nemo=nemo, out_dir=out,
                                       occlusions=["L0"], skip_bad=True)
    assert rows[0]["occlusion"] == "L0" and rows[0]["num_images"] == 2
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["skipped"] == {"L0": [names[1]]}
    assert f"- L0: 1 bad image(s) skipped: {names[1]}" in open(os.path.join(out, "results.md")).read()
    pred = np.load(os.path.join(out, "predictions_L0.npz"))
    assert list(pred["names"]) == [names[0], names[2]]


def test_evaluate_missing_level_is_said_in_the_table_and_stale_predictions_go(tmp_path, nemo):

    root = str(tmp_path / "test")
    write_tiny_root(root, "car", num=3, size=(32, 32))
    out = str(tmp_path / "eval")
    _old_outputs(out)
    rows = nemo_evaluate.evaluate_workdir(str(tmp_path), root, nemo=nemo, out_dir=out,
                                       occlusions=["L0", "L3"])
    assert [r["occlusion"] for r in rows if r["category"] != "Mean"] == ["L0"]
    saved = json.load(open(os.path.join(out, "results.json")))
    assert set(saved["missing"]) == {"L3"} and "carFGL3_BGL3" in saved["missing"]["L3"]
    md = open(os.path.join(out, "results.md")).read()
    assert f"- row L3 missing: {root} has no carFGL3_BGL3 subset" in md
    assert sorted(f for f in os.listdir(out) if f.startswith("predictions_")) == \
        ["predictions_L0.npz"]                     # L1's, from the older run, removed


def test_evaluate_cli_exits_nonzero_naming_the_missing_root(tmp_path):
    missing = str(tmp_path / "nope")
    res = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--workdir",
                          str(tmp_path), "--data", missing], cwd=REPO, capture_output=True,
                         text=True, timeout=240, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 2
    assert f"evaluate.py: error: {missing}: test root not found" in res.stderr
    assert "Traceback" not in res.stderr
    assert os.listdir(tmp_path) == []
