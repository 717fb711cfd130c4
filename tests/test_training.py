"""NeMo training: 1 vs 8 devices give the same numbers; a killed run resumes exactly;
one step updates the memory banks as computed by hand, and steps lower the CoKe loss."""

import json
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import nemo as nemo_config
from nvsm_jax import meshes, parallel, training
from nvsm_jax.data.loaders import PoseSet
from nvsm_jax.nemo import train as nemo_train
from nvsm_jax.settings import OptimConfig


def _toy_set(n=12, hw=64, seed=0):
    rng = np.random.default_rng(seed)
    poses = np.stack([rng.uniform(0, 2 * np.pi, n), rng.uniform(-0.2, 0.8, n),
                      rng.uniform(-0.2, 0.2, n), np.full(n, 5.0)], 1).astype(np.float32)
    return PoseSet("car", tuple(f"im{i}" for i in range(n)),
                   rng.integers(0, 255, (n, hw, hw, 3), dtype=np.uint8), poses,
                   np.full(n, 150.0, np.float32), np.full((n, 2), hw / 2, np.float32))


def _config():
    c = nemo_config.get_config("tiny")
    c.num_steps = 4
    c.checkpoint_every = 2
    c.batch_size = 8
    c.loss.vertices_per_image = 64
    return c


def _params(state):
    return jax.tree_util.tree_map(np.asarray, (state.params, state.aux))


def _assert_close(a, b, atol, adam_lr=None, steps=0):
    """Leaves equal within ``atol``. With ``adam_lr``: Adam moves every weight by about
    ``lr`` whatever its gradient's size, so a weight whose gradient is ~0 may step either
    way when the reduction order changes (1 vs 8 devices); such weights (< 1%) may then
    differ by up to ``2 * lr * steps``."""
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        if adam_lr is None:
            np.testing.assert_allclose(x, y, atol=atol, rtol=0)
            continue
        diff = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
        assert diff.max(initial=0.0) <= 2 * adam_lr * steps, diff.max()
        assert np.mean(diff > atol) <= 0.01, np.mean(diff > atol)


def test_one_vs_eight_devices_and_resume_after_kill(tmp_path, eight_devices):
    data = _toy_set()
    object_mesh = meshes.cuboid_mesh([-0.5, -1.0, -0.4], [0.5, 1.0, 0.4], 200)
    cfg = _config()
    run = lambda wd, **kw: nemo_train.train_and_evaluate(  # noqa: E731
        cfg, tmp_path / wd, train_set=data, object_mesh=object_mesh, progress=False, **kw)

    killed = run("a", num_devices=8, stop_after=2)           # "killed" after step 2
    assert int(killed.step) == 2
    one_dev = run("b", num_devices=1, stop_after=2)
    # 1 vs 8 devices: the memory banks (no Adam) tightly, the weights up to Adam sign flips
    _assert_close(killed.aux, one_dev.aux, atol=2e-4)
    _assert_close(killed.params, one_dev.params, atol=2e-4, adam_lr=cfg.optim.lr, steps=2)

    resumed = run("a", num_devices=8)                         # resumes at step 2
    full = run("c", num_devices=8)                            # uninterrupted 4 steps
    assert int(resumed.step) == int(full.step) == 4
    _assert_close(_params(resumed), _params(full), atol=1e-6)

    rows = training.MetricsWriter(tmp_path / "a").read()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "images_per_s", "contrastive"} <= set(rows[0])
    assert np.isfinite([r["loss"] for r in rows]).all()
    assert json.load(open(tmp_path / "a" / "config.json"))["batch_size"] == 8
    ckpt = training.Checkpointer(tmp_path / "a" / "checkpoints")
    assert ckpt.latest_step() == 4
    # a rerun with another model refuses before training (it used to restore the old
    # checkpoint into the new shapes and die inside flax)
    changed = _config()
    changed.model.feature_dim = 16
    with pytest.raises(training.ConfigMismatchError, match=r"model\.feature_dim: 32 -> 16"):
        nemo_train.train_and_evaluate(changed, tmp_path / "a", train_set=data, object_mesh=object_mesh,
                                      progress=False)
    ckpt.close()


def test_num_labelled_picks_the_anchors_from_a_passed_pool(tmp_path, monkeypatch):
    """A pool passed in still trains on only its ``num_labelled`` few-shot anchors."""
    from nvsm_jax.data import fewshot

    pool = _toy_set(n=16)
    object_mesh = meshes.cuboid_mesh([-0.5, -1.0, -0.4], [0.5, 1.0, 0.4], 200)
    cfg = _config()
    cfg.num_labelled = 4
    anchors = fewshot.make_fewshot_split(pool, 4, seed=cfg.seed).labelled
    assert len(anchors) == 4 and set(anchors.names) < set(pool.names)
    assert nemo_train.labelled_images(cfg, pool).names == anchors.names

    trained_on = []                       # what the batch iterator of the trainer is given
    real = nemo_train._batch_iterator
    monkeypatch.setattr(nemo_train, "_batch_iterator",
                        lambda config, data: trained_on.append(data.names) or real(config, data))
    for n, wd in ((4, "pool"), (None, "all")):
        cfg.num_labelled = n
        nemo_train.train_and_evaluate(cfg, tmp_path / wd, train_set=pool, object_mesh=object_mesh,
                                      num_devices=1, stop_after=0, progress=False)
    assert trained_on == [anchors.names, pool.names]


def test_checkpointer_roundtrip_and_step_key(tmp_path):
    mesh = parallel.make_mesh(1)
    import optax
    state = training.create_replicated(
        lambda k: training.TrainState.create(apply_fn=None, params={"w": jax.random.normal(k, (3,))},
                                             tx=optax.adam(1e-2), aux={"m": np.zeros(2)}),
        jax.random.key(0), mesh)
    ck = training.Checkpointer(tmp_path / "ck", save_every=2)
    assert ck.restore_or(state) is state
    assert not ck.maybe_save(1, state) and ck.maybe_save(2, state)
    ck.wait()
    moved = state.replace(params={"w": state.params["w"] + 1})
    back = ck.restore(moved)
    np.testing.assert_array_equal(np.asarray(back.params["w"]), np.asarray(state.params["w"]))
    assert back.params["w"].sharding == state.params["w"].sharding
    ck.close()
    k1, k2 = training.step_key(0, 5), training.step_key(0, 5)
    assert (jax.random.key_data(k1) == jax.random.key_data(k2)).all()


def test_quiet_checkpoint_logs_drops_only_orbax_info():
    import logging as py_logging
    import os

    from absl import logging as absl_logging

    training.quiet_checkpoint_logs()
    training.quiet_checkpoint_logs()  # idempotent
    handler = absl_logging.get_absl_handler()
    filters = [f for f in handler.filters if isinstance(f, training._DropCheckpointInfo)]
    assert len(filters) == 1

    def record(path, level):
        return py_logging.LogRecord("absl", level, path, 1, "msg", None, None)

    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "x.py")
    ours = os.path.join(os.sep, "repo", "nvsm_jax", "train.py")
    assert not handler.filter(record(orbax_file, py_logging.INFO))
    assert handler.filter(record(orbax_file, py_logging.WARNING))
    assert handler.filter(record(ours, py_logging.INFO))


def test_fit_keeps_one_multi_device_cpu_step_in_flight(tmp_path, eight_devices):
    """Two overlapping CPU programs with collectives can deadlock XLA's shared thread
    pool, so on several CPU devices step s + 1 is dispatched only once step s is done."""
    mesh = parallel.make_mesh(8)
    rep = parallel.replicated(mesh)

    @jax.jit
    def heavy(w, x):
        h = x @ w                                      # [B, D] sharded over data
        for _ in range(6):
            h = jax.numpy.tanh(h @ w)
        g = jax.lax.with_sharding_constraint(h, rep)   # an all-gather
        return w + 1e-6 * (g.T @ g), {"loss": jax.numpy.mean(g)}

    seen = []

    def train_step(state, batch, key):
        seen.append(all(leaf.is_ready() for leaf in jax.tree_util.tree_leaves(state)))
        return heavy(state, batch["x"])

    rng = np.random.default_rng(0)
    # the starting state's host-to-device copy is finished, so every entry of ``seen``
    # is about the outputs of the step before
    state = jax.block_until_ready(parallel.replicate(np.eye(512, dtype=np.float32), mesh))
    ckpt = training.Checkpointer(tmp_path / "ckpt", save_every=1000)
    training.fit(state, train_step, lambda s, rows: {"x": rng.random((64, 512), np.float32)[rows]},
                 mesh, training.StepRange(0, 6, total=1000), seed=0, batch_size=64,
                 log=training.LoopLog(training.MetricsWriter(tmp_path), 1000, progress=False),
                 ckpt=ckpt)
    ckpt.close()
    assert all(seen), seen
    x = parallel.replicate(np.ones(3, np.float32), parallel.make_mesh(1))
    assert parallel.wait_if_cpu_collectives(x, parallel.make_mesh(1)) is x


def test_fit_logs_saves_and_keys_each_step_by_its_global_index(tmp_path):
    """A resumed slice (steps 3..5 of a 5-step run) sees the keys and batches of those
    global steps, logs every ``log_every`` steps and at its end with the ``extra``
    fields, and forces the checkpoint of the run's last step."""
    import optax

    mesh = parallel.make_mesh(1)
    init = lambda k: training.TrainState.create(apply_fn=None, params={"w": jnp.zeros(())},
                                                tx=optax.sgd(1.0))
    state = training.create_replicated(init, jax.random.key(0), mesh)
    seen = []

    def train_step(state, batch, key):
        seen.append((int(batch["s"][0]), np.asarray(jax.random.key_data(key)).tolist()))
        grads = {"w": -jnp.mean(batch["s"])}
        return state.apply_gradients(grads=grads), {"loss": state.params["w"]}

    ckpt = training.Checkpointer(tmp_path / "ckpt", save_every=100)
    writer = training.MetricsWriter(tmp_path)
    out = training.fit(state, train_step,
                       lambda s, rows: {"s": np.full((2,), s, np.float32)[rows]}, mesh,
                       training.StepRange(3, 5, total=5), seed=7, batch_size=2,
                       log=training.LoopLog(writer, 2, progress=False, extra={"round": 4}),
                       ckpt=ckpt)
    ckpt.close()
    assert [s for s, _ in seen] == [3, 4]
    assert [k for _, k in seen] == [np.asarray(jax.random.key_data(training.step_key(7, s))).tolist()
                                    for s in (3, 4)]
    assert float(out.params["w"]) == 7.0                       # sgd on -mean(s): 0 + 3 + 4
    rows = writer.read()
    assert [(r["step"], r["round"]) for r in rows] == [(4, 4), (5, 4)]
    assert training.Checkpointer(tmp_path / "ckpt").latest_step() == 5
    # the same scalars as TensorBoard summaries (read with the event-file framing:
    # u64 length, u32 crc, Event proto, u32 crc)
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    writer.close()
    (path,) = glob.glob(str(tmp_path / "tensorboard" / "metrics" / "events.out.tfevents.*"))
    data, seen_tb = open(path, "rb").read(), {}
    while data:
        (n,) = struct.unpack("<Q", data[:8])
        event = event_pb2.Event.FromString(data[12:12 + n])
        data = data[12 + n + 4:]
        for v in event.summary.value:
            seen_tb[(v.tag, event.step)] = v.simple_value
    assert seen_tb[("loss", 4)] == pytest.approx(rows[0]["loss"])
    assert seen_tb[("round", 5)] == 4.0


def test_create_replicated_compiles_once_per_cache_key():
    import optax

    mesh = parallel.make_mesh(1)
    traces = []

    def init(key):
        traces.append(1)
        return training.TrainState.create(apply_fn=None, params={"w": jax.random.normal(key, (3,))},
                                          tx=optax.adam(1e-3))

    a = training.create_replicated(init, jax.random.key(0), mesh, cache_key=("t", 3))
    n = len(traces)
    b = training.create_replicated(init, jax.random.key(1), mesh, cache_key=("t", 3))
    assert len(traces) == n                                   # reused, not retraced
    assert not np.allclose(np.asarray(a.params["w"]), np.asarray(b.params["w"]))  # seed honoured
    expect = jax.random.normal(jax.random.key(1), (3,))
    np.testing.assert_allclose(np.asarray(b.params["w"]), np.asarray(expect), rtol=1e-6)
    assert b.params["w"].sharding.is_fully_replicated


@pytest.mark.parametrize("decoupled", [False, True])
def test_make_optimizer_is_adam_with_clip_l2_warmup_cosine_and_frozen_leaves(decoupled):
    """The one optimiser builder of every trainer against Adam written out in float64:
    global-norm clipping (over the trained leaves only), then torch-style L2 (``wd * p``
    added to the gradient) or, ``decoupled``, AdamW (``wd * p`` added to Adam's step),
    warm-up from 0 over 2 steps, cosine to ``lr * final_lr_fraction`` at step 10; the
    frozen leaf gets zero updates."""
    lr, wd, clip, b1, b2 = 0.1, 0.1, 1.0, 0.8, 0.9
    optim = OptimConfig(lr=lr, weight_decay=wd, b1=b1, b2=b2, warmup_steps=2,
                        final_lr_fraction=0.5, grad_clip=clip, decoupled=decoupled)
    tx, schedule = training.make_optimizer(optim, 10, frozen=lambda path: path[0] == "enc")

    def lr_at(c):
        if c < 2:
            return lr * c / 2
        return 0.05 + 0.05 * 0.5 * (1 + np.cos(np.pi * (c - 2) / 8))

    for c in (0, 1, 2, 5, 10):
        np.testing.assert_allclose(float(schedule(c)), lr_at(c), rtol=1e-6)
    rng = np.random.default_rng(0)
    params = {"enc": {"w": np.array([1.0, -2.0], np.float32)},
              "head": {"w": rng.normal(size=3).astype(np.float32)}}
    p = params["head"]["w"].astype(np.float64)
    m = v = np.zeros(3)
    opt = tx.init(params)
    for t in range(1, 5):
        g = rng.normal(size=3) * (2.0 if t % 2 else 0.3)     # clipped on odd steps only
        grads = {"enc": {"w": np.ones(2, np.float32)}, "head": {"w": g.astype(np.float32)}}
        updates, opt = tx.update(grads, opt, params)
        params = jax.tree_util.tree_map(lambda a, u: np.asarray(a + u, np.float32),
                                        params, updates)
        np.testing.assert_array_equal(np.asarray(updates["enc"]["w"]), 0.0)
        g = g * min(1.0, clip / np.linalg.norm(g))
        if not decoupled:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-8)
        if decoupled:
            step = step + wd * p
        p = p - lr_at(t - 1) * step
        np.testing.assert_allclose(params["head"]["w"], p, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(params["enc"]["w"], [1.0, -2.0])


def test_save_config_refuses_a_changed_config_and_restart_moves_the_old_run(tmp_path):
    import ml_collections

    c = ml_collections.ConfigDict({"seed": 0, "restart": False, "eval_limit": 5,
                                   "model": {"feature_dim": 128, "backbone": "small"}})
    work = tmp_path / "w"
    training.save_config(c, work)
    (work / "checkpoints").mkdir()
    (work / "data").mkdir()
    training.save_config(c, work)                               # same config: resumes
    c.eval_limit = 50                                           # evaluation only: allowed
    training.save_config(c, work)
    c.model.feature_dim = 16
    with pytest.raises(training.ConfigMismatchError,
                       match=r"model\.feature_dim: 128 -> 16.*--config\.restart=True"):
        training.save_config(c, work)
    assert json.load(open(work / "config.json"))["model"]["feature_dim"] == 128  # untouched
    (work / "config.json").write_text('{"seed": 0, "mod')       # truncated record
    with pytest.raises(training.ConfigMismatchError, match="unreadable"):
        training.save_config(c, work)
    (work / "config.json").write_text(json.dumps({"seed": 0, "model": {"feature_dim": 128}}))
    c.restart = True
    training.save_config(c, work)
    aside = [p for p in work.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints").is_dir()
    assert json.load(open(aside[0] / "config.json"))["model"]["feature_dim"] == 128
    assert (work / "data").is_dir() and not (work / "checkpoints").exists()
    assert json.load(open(work / "config.json"))["model"]["feature_dim"] == 16


# ------------------------------------------------------------------ learning, not consistency


def _dilate(mask, r=1):
    """Binary dilation of [B, h, w] by a (2r+1)^2 square, plain numpy (sample_clutter's rule)."""
    b, h, w = mask.shape
    pad = np.pad(mask, ((0, 0), (r, r), (r, r)))
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= pad[:, dy:dy + h, dx:dx + w]
    return out


def test_train_step_updates_the_memory_by_hand_and_lowers_the_coke_loss():
    """NeMo train steps on 8 fixed images (1 device, the tiny ``_config`` with a constant
    lr of 2e-3), checked against numbers a wrong step cannot produce:

    * vertex memory after one step = ``normalize(0.9 * mem0 + 0.1 * mean_b(normalize(f_bv)
      * w_bv))`` computed in numpy from the step's inputs (the initial network's features
      read at the projected vertices, weights ``visible * |n . v|``); vertices no image
      sees keep their row;
    * the clutter ring: 8 images x 5 features land in rows 0..39 in image order (a FIFO
      from pointer 0), the pointer moves to 40, rows 40..63 keep their values, and every
      new row is a cell of its own image's feature map, 5 distinct cells, off the dilated
      object mask wherever the image has 5 such cells (``sample_clutter``'s rule);
    * learning: with the memory held at its initial value and the batch and key fixed,
      the CoKe loss is a function of the weights only, and 7 Adam steps must bring it
      below 0.8 x its start, falling at every step (measured: 8.27 -> 6.14, 0.74; with
      gradient ascent it rises to 12.2; a dropped update leaves it where it is).
    """
    from nvsm_jax.nemo import features as feat
    from nvsm_jax.models import backbone

    data = _toy_set()
    object_mesh = meshes.cuboid_mesh([-0.5, -1.0, -0.4], [0.5, 1.0, 0.4], 200)
    cfg = _config()
    cfg.optim.schedule = "constant"
    cfg.optim.lr = 2e-3
    n, hw = cfg.batch_size, data.image_size
    mesh = parallel.make_mesh(1)
    model = nemo_train.build_model(cfg.model)
    state = nemo_train.init_state(cfg, model, len(object_mesh.verts), hw, mesh)
    sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
    step = nemo_train.make_train_step(cfg, model, object_mesh, hw, sharding, mesh)
    host = {"image": data.images[:n], "pose": data.poses[:n], "focal": data.focal[:n],
            "principal": data.principal[:n]}
    batch = parallel.shard_batch(host, mesh)
    key = jax.random.key(3)
    params0 = jax.tree_util.tree_map(np.array, state.params)
    mem0 = jax.tree_util.tree_map(np.array, state.aux)
    assert int(mem0.clutter_ptr) == 0 and mem0.clutter.shape == (64, 32)

    # the step's inputs, by the library's (separately tested) feature reader; one jit
    # compiles faster than running the net and the rasteriser op by op
    @jax.jit
    def read(params, b):
        fmap = model.apply({"params": params, **state.model_state},
                           backbone.preprocess(b["image"]), train=True)
        return fmap, feat.vertex_features(
            fmap, object_mesh.verts, object_mesh.faces, meshes.vertex_normals(object_mesh.verts, object_mesh.faces),
            b["pose"], b["focal"], b["principal"], stride=cfg.model.stride,
            render_stride=cfg.render_stride)

    fmap, vf = read(params0, host)
    fv = np.asarray(vf.features, np.float64)
    fv /= np.linalg.norm(fv, axis=-1, keepdims=True)
    w = np.asarray(vf.weights, np.float64)
    unseen = ~w.astype(bool).any(0)
    assert 0.1 < w.astype(bool).mean() < 0.9 and unseen.any()   # some seen, some hidden

    state, m = step(state, batch, key)
    losses = [float(m["loss"])]
    mem1 = jax.tree_util.tree_map(np.asarray, state.aux)
    want = 0.9 * mem0.vertex + 0.1 * np.mean(fv * w[..., None], axis=0)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(mem1.vertex, want, atol=2e-5)
    np.testing.assert_allclose(mem1.vertex[unseen], mem0.vertex[unseen], atol=1e-6)
    assert np.abs(mem1.vertex - mem0.vertex).max() > 1e-2    # the seen rows moved

    assert int(mem1.clutter_ptr) == 40
    np.testing.assert_array_equal(mem1.clutter[40:], mem0.clutter[40:])
    fm = np.asarray(fmap).reshape(n, -1, fmap.shape[-1])
    background = ~_dilate(np.asarray(vf.silhouette)).reshape(n, -1)
    assert (background.sum(-1) >= 5).sum() >= 3                # the check below bites
    for b in range(n):
        rows = mem1.clutter[5 * b:5 * b + 5]
        d = np.abs(rows[:, None, :] - fm[b][None]).max(-1)     # [5, h*w]
        cell = d.argmin(-1)
        assert np.all(d.min(-1) < 1e-5), (b, d.min(-1))          # a cell of image b ...
        assert len(set(cell.tolist())) == 5                     # ... 5 distinct ones ...
        if background[b].sum() >= 5:                            # ... off the object
            assert np.all(background[b, cell]), (b, cell)

    # learning on a fixed batch, the memory held at its start
    fixed = jax.tree_util.tree_map(np.copy, mem0)
    for _ in range(7):
        state = state.replace(aux=jax.device_put(fixed, parallel.replicated(mesh)))
        state, m = step(state, batch, key)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_progress_is_log_lines_off_a_terminal_with_a_heartbeat(monkeypatch, caplog):
    """Off a terminal, progress_bar gives logging lines (no tqdm ``\\r``): one when an
    item took ``interval``, the last at the total, with count, percent and set_postfix
    values; an item slower than the heartbeat gets "still running" lines meanwhile."""
    import io
    import logging
    import time

    monkeypatch.setattr("sys.stderr", io.StringIO())          # not a terminal
    bar = training.progress_bar(range(3, 5), total=5, initial=3, desc="fit", disable=False)
    assert isinstance(bar, training.LogProgress)
    bar.interval = 0.0
    caplog.set_level(logging.INFO, logger="nvsm_jax.training")
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss="0.500")
    assert seen == [3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["fit: 4/5 (80%)", "fit: 5/5 (100%)"]
    assert lines[0].endswith("left, loss=0.500") and "left" not in lines[1]
    assert training.progress_bar(range(2), disable=True) == range(2)
    caplog.clear()
    with training.heartbeat("compiling", every=0.05):
        time.sleep(0.18)
    beats = [r.getMessage() for r in caplog.records]
    assert 2 <= len(beats) <= 4 and all(b.startswith("compiling: still running, ")
                                        for b in beats), beats
    # the loop's own beat (one thread for the loop): a slow item is said to be running
    caplog.clear()
    monkeypatch.setattr(training, "HEARTBEAT_SECONDS", 0.2)
    bar = training.progress_bar(range(2), total=2, desc="fit", disable=False)
    bar.interval = 1e9
    for i in bar:
        time.sleep(0.7 if i == 0 else 0.0)
    beats = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert 1 <= len(beats) <= 4 and all(b.startswith("fit: 1/2: still running, ")
                                        for b in beats), beats


def test_fit_without_a_progress_bar_beats_during_its_first_step(tmp_path, monkeypatch, caplog):
    """``progress=False`` (MCSS, the E-step's M-steps off a terminal): a first step slower
    than the heartbeat (a compilation) is said to be running; later steps are not."""
    import logging
    import time

    import optax

    monkeypatch.setattr(training, "HEARTBEAT_SECONDS", 0.1)
    mesh = parallel.make_mesh(1)
    init = lambda k: training.TrainState.create(apply_fn=None, params={"w": jnp.zeros(())},
                                                tx=optax.sgd(1.0))
    state = training.create_replicated(init, jax.random.key(0), mesh)

    def train_step(state, batch, key):
        time.sleep(0.45 if int(state.step) == 0 else 0.0)
        return state.replace(step=state.step + 1), {"loss": jnp.zeros(())}

    caplog.set_level(logging.INFO, logger="nvsm_jax.training")
    training.fit(state, train_step, lambda s, rows: {"s": np.zeros((2,), np.float32)[rows]}, mesh,
                 training.StepRange(0, 3), seed=0, batch_size=2,
                 log=training.LoopLog(training.MetricsWriter(tmp_path), 10, progress=False,
                                      desc="mcss_S1"))
    beats = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert 2 <= len(beats) <= 6, beats
    assert all(b.startswith("mcss_S1: step 1 (the first call compiles): still running") for b in beats)
