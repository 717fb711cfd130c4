"""Faults in training (issue 30, finding 4): a diverged training stops at its first
non-finite step and keeps only finite checkpoints; a resumed run writes each metric
step once; the ImageNet weights cache is checked on every read."""

import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nvsm_jax import parallel, training
from nvsm_jax.errors import NonFiniteError
from nvsm_jax.models import weights


# --------------------------------------------------------------------------- divergence

def _state(lr=0.1, devices=1):
    mesh = parallel.make_mesh(devices)
    init = lambda k: training.TrainState.create(apply_fn=None, params={"w": jnp.zeros(3)},
                                                tx=optax.sgd(lr))
    return training.create_replicated(init, jax.random.key(0), mesh), mesh


def _step_fn(bad_loss_at=None, bad_grad_at=None):
    """A train step whose loss (or gradient norm) is NaN from step ``bad_*_at`` on
    (steps count from 1: the step that makes ``state.step`` equal to it)."""
    big = 10 ** 9

    @jax.jit
    def step(state, batch, key):
        k = state.step + 1
        loss = jnp.where(k >= (bad_loss_at or big), jnp.nan, jnp.sum(state.params["w"]) + 1.0)
        norm = jnp.where(k >= (bad_grad_at or big), jnp.nan, 1.0)
        state = state.apply_gradients(grads={"w": jnp.ones(3)})
        return state, {"loss": loss, "grad_norm": norm}

    return step


def _fit(tmp_path, step_fn, state, mesh, *, end=10, save_every=2, log_every=1, ckpt=True,
         num_steps=None):
    ck = (training.Checkpointer(tmp_path / "ckpt", save_every=save_every, max_to_keep=20)
          if ckpt else None)
    try:
        return training.fit(state, step_fn, lambda s, rows: {"x": np.zeros((1,), np.float32)[rows]},
                            mesh, training.StepRange(int(state.step), end, total=num_steps),
                            seed=0, batch_size=1,
                            log=training.LoopLog(training.MetricsWriter(tmp_path), log_every,
                                                 progress=False), ckpt=ck)
    finally:
        if ck is not None:
            ck.close()


def _saved_steps(tmp_path):
    ck = training.Checkpointer(tmp_path / "ckpt")
    steps = sorted(ck.manager.all_steps())
    state, _ = _state()
    for s in steps:
        restored = ck.restore(state, step=s)
        assert training.nonfinite_leaf(restored.checkpoint_tree()) is None, s
    ck.close()
    return steps


@pytest.mark.parametrize("log_every", [1, 100])
def test_nan_loss_stops_at_its_step_and_keeps_the_finite_checkpoints(tmp_path, log_every):
    """optim.lr=nan / loss.temperature=0: the first NaN loss (step 5) is named even when
    it is only read at the next save (step 6, log_every=100), and no later state is saved."""
    state, mesh = _state()
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 5; the last finite "
                       r"checkpoint, step 4, is kept in .*ckpt.4\. check the learning rate"):
        _fit(tmp_path, _step_fn(bad_loss_at=5), state, mesh, log_every=log_every)
    assert _saved_steps(tmp_path) == [2, 4]


def test_a_late_read_still_names_the_first_bad_step(tmp_path):
    """The device carries the first bad step: read only at the save of step 8, the error
    names step 3 (and checkpoint 3 was never due)."""
    state, mesh = _state()
    with pytest.raises(NonFiniteError, match="non-finite gradient norm at step 3; no finite "
                       "checkpoint was saved"):
        _fit(tmp_path, _step_fn(bad_grad_at=3), state, mesh, save_every=8, log_every=100)
    assert _saved_steps(tmp_path) == []


def test_loss_and_gradient_norm_of_the_same_step_are_both_named_without_a_checkpointer(
        tmp_path):
    state, mesh = _state()
    with pytest.raises(NonFiniteError, match="non-finite loss and gradient norm at step 2; "
                       "this loop keeps no checkpoints"):
        _fit(tmp_path, _step_fn(bad_loss_at=2, bad_grad_at=2), state, mesh, ckpt=False)
    rows = training.MetricsWriter(tmp_path).read()
    assert [r["step"] for r in rows] == [1, 2] and np.isnan(rows[1]["loss"])


def test_a_non_finite_update_with_a_finite_loss_is_never_saved(tmp_path):
    """sgd with lr = nan: step 1's loss is finite but its update is not; the
    checkpoint of step 1 is refused, naming the parameter."""
    state, mesh = _state(lr=float("nan"))
    with pytest.raises(NonFiniteError, match=r"non-finite weights \(\['params'\]\['w'\]\) at "
                       "step 1; no finite checkpoint was saved"):
        _fit(tmp_path, _step_fn(), state, mesh, save_every=1, log_every=100)
    assert _saved_steps(tmp_path) == []
    ck = training.Checkpointer(tmp_path / "direct")
    with pytest.raises(NonFiniteError, match=r"step 7 not saved: \['w'\] holds non-finite"):
        ck.save(7, {"w": np.array([1.0, np.inf], np.float32), "n": np.zeros(2, np.int32)})
    ck.close()


def test_divergence_on_eight_devices(tmp_path, eight_devices):
    state, mesh = _state(devices=8)
    ck = training.Checkpointer(tmp_path / "ckpt", save_every=2)
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3; the last finite "
                       "checkpoint, step 2,"):
        training.fit(state, _step_fn(bad_loss_at=3),
                     lambda s, rows: {"x": np.zeros((8,), np.float32)[rows]}, mesh,
                     training.StepRange(0, 6), seed=0, batch_size=8,
                     log=training.LoopLog(training.MetricsWriter(tmp_path), 100, progress=False),
                     ckpt=ck)
    ck.close()


def test_a_finite_run_is_unchanged(tmp_path):
    state, mesh = _state()
    out = _fit(tmp_path, _step_fn(), state, mesh, end=4, save_every=2, log_every=2)
    assert int(out.step) == 4 and _saved_steps(tmp_path) == [2, 4]
    np.testing.assert_allclose(np.asarray(out.params["w"]), -0.4, rtol=1e-6)


# --------------------------------------------------------------------------- metrics lines

def test_a_resumed_run_writes_each_metric_step_once(tmp_path):
    """Killed after step 6 with checkpoint 4 (and a half-written line): the resume from
    step 4 replays steps 5, 6; metrics.jsonl keeps one line per step, the resumed run's."""
    state, mesh = _state()
    _fit(tmp_path, _step_fn(), state, mesh, end=6, save_every=4, num_steps=8)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')                            # the kill
    ck = training.Checkpointer(tmp_path / "ckpt", save_every=4)
    resumed = ck.restore(state)
    ck.close()
    assert int(resumed.step) == 4
    _fit(tmp_path, _step_fn(), resumed, mesh, end=8, save_every=4, num_steps=8)
    rows = training.MetricsWriter(tmp_path).read()
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert not os.path.exists(str(tmp_path / "metrics.jsonl") + ".tmp")


def test_discard_after_keeps_rows_without_a_step_and_reports_the_count(tmp_path):
    writer = training.MetricsWriter(tmp_path, tensorboard=False)
    for s in (1, 2, 3):
        writer.write(s, loss=float(s))
    with open(writer.path, "a") as f:
        f.write(json.dumps({"note": "x"}) + "\n")
    assert writer.discard_after(3) == 0
    assert writer.discard_after(1) == 2
    assert writer.read() == [{"step": 1, "loss": 1.0}, {"note": "x"}]
    assert training.MetricsWriter(tmp_path / "none").discard_after(0) == 0


# --------------------------------------------------------------------------- weights cache

@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A converted cache of a private copy of the packaged lite0 weights:
    ``(source path, cache path, first load)``."""
    monkeypatch.setenv("NVSM_JAX_CACHE", str(tmp_path / "cache"))
    src = tmp_path / os.path.basename(weights.checkpoint_path("efficientnet_lite0"))
    shutil.copy(weights.checkpoint_path("efficientnet_lite0"), src)
    first = weights.load_imagenet("efficientnet_lite0", path=str(src))
    (name,) = os.listdir(tmp_path / "cache")
    return str(src), str(tmp_path / "cache" / name), first


def _rewrite(path, change, keep_record=False):
    with np.load(path) as z:
        flat = {k: np.asarray(z[k]) for k in z.files}
    record = flat.pop("__record__")
    flat = change(flat)
    if keep_record:
        flat["__record__"] = record
    with open(path, "wb") as f:
        np.savez(f, **flat)


def _nan(flat):
    return {k: np.full_like(v, np.nan) for k, v in flat.items()}


def _zeros(flat):
    return {k: np.zeros_like(v) for k, v in flat.items()}


def _drop(flat):
    return {k: v for k, v in flat.items() if k != "batch_stats/bn1/BatchNorm_0/var"}


def _reshape(flat):
    return {**flat, "params/conv_head/kernel": np.zeros((1, 1, 321, 1280), np.float32)}


CASES = {
    "nan": (_nan, False, r"key '[^']+' holds non-finite values"),
    "zeros": (_zeros, False, "no readable '__record__' entry"),
    "zeros, old record": (_zeros, True, "its arrays do not match the digest"),
    "missing key": (_drop, True, r"missing key 'batch_stats/bn1/BatchNorm_0/var'"),
    "wrong shape": (_reshape, True, r"key 'params/conv_head/kernel' is float32 \(1, 1, 321, "
                                    r"1280\), efficientnet_lite0 needs float32 \(1, 1, 320, 1280\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_cache_is_rebuilt_from_its_source_with_a_warning(cache, case, caplog):
    src, path, first = cache
    change, keep_record, message = CASES[case]
    _rewrite(path, change, keep_record)
    with caplog.at_level(logging.WARNING, logger="nvsm_jax.models.weights"):
        again = weights.load_imagenet("efficientnet_lite0", path=src)
    assert any(path in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records), caplog.text
    assert any(re.search(message, r.getMessage()) for r in caplog.records), caplog.text
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)
    weights.read_cache(path, "efficientnet_lite0", weights.file_sha256(src))  # rebuilt, good


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_cache_without_its_source_names_the_cache_and_the_key(cache, case):
    src, path, _ = cache
    change, keep_record, message = CASES[case]
    _rewrite(path, change, keep_record)
    os.remove(src)
    with pytest.raises(weights.WeightsError, match=path.replace(".", r"\.") + ": " + message
                       + ".*source .* is missing"):
        weights.load_imagenet("efficientnet_lite0", path=src)


def test_a_good_cache_serves_without_its_source_and_a_foreign_record_is_rebuilt(cache, caplog):
    src, path, first = cache
    shutil.copy(src, src + ".keep")
    os.remove(src)
    served = weights.load_imagenet("efficientnet_lite0", path=src)
    np.testing.assert_array_equal(served["params"]["conv_stem"]["kernel"],
                                  first["params"]["conv_stem"]["kernel"])
    with pytest.raises(weights.WeightsError, match="no such weights file"):
        weights.load_imagenet("efficientnet_lite0", path=src, use_cache=False)
    os.replace(src + ".keep", src)
    with pytest.raises(weights.WeightsError, match="converted from another file"):
        weights.read_cache(path, "efficientnet_lite0", "0" * 64)
    with np.load(path) as z:                  # a record naming another source file
        flat = {k: np.asarray(z[k]) for k in z.files}
    record = json.loads(str(flat["__record__"]))
    flat["__record__"] = np.array(json.dumps({**record, "source_sha256": "f" * 64}))
    with open(path, "wb") as f:
        np.savez(f, **flat)
    with caplog.at_level(logging.WARNING, logger="nvsm_jax.models.weights"):
        weights.load_imagenet("efficientnet_lite0", path=src)
    assert "converted from another file (source SHA-256 ffffffffffffffff" in caplog.text
    with open(path, "wb") as f:
        f.write(b"not an npz")
    with pytest.raises(weights.WeightsError, match="unreadable weights cache"):
        weights.read_cache(path, "efficientnet_lite0")


def test_an_unwritable_cache_still_serves_the_converted_weights(cache, monkeypatch, caplog):
    """A cache folder that cannot be written (read-only, full disk): a warning naming it,
    the weights converted in memory, and no temporary file left behind."""
    import errno

    src, path, first = cache
    os.remove(path)
    real_savez = np.savez

    def full_disk(*args, **kwargs):
        real_savez(*args, **kwargs)                 # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights.np, "savez", full_disk)
    with caplog.at_level(logging.WARNING, logger="nvsm_jax.models.weights"):
        again = weights.load_imagenet("efficientnet_lite0", path=src)
    assert "could not write the weights cache" in caplog.text and os.path.dirname(path) in caplog.text
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert os.listdir(os.path.dirname(path)) == []
