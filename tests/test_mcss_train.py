"""One tiny MCSS training step: 8 forced CPU devices give the 1-device loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import mcss as mcss_config
from nvsm_jax import parallel, training
from nvsm_jax.mcss import train as mtrain


def _fake_train_set(n_seq=3, n_views=3, n_frames=12, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    n = n_seq * n_views * n_frames
    seq_id = np.repeat(np.arange(n_seq), n_views * n_frames).astype(np.int32)
    view = np.tile(np.repeat(np.arange(n_views), n_frames), n_seq).astype(np.int32)
    frame = np.tile(np.arange(n_frames), n_seq * n_views).astype(np.int32)
    lab = np.flatnonzero(seq_id == 0)
    return mtrain.TrainSet(
        images=rng.integers(0, 256, size=(n, *size, 3), dtype=np.uint8), seq_id=seq_id,
        view=view, frame=frame, seq_views=np.full(n_seq, n_views), seq_frames=np.full(n_seq, n_frames),
        seq_offset=np.arange(n_seq) * n_views * n_frames, labelled_idx=lab,
        labelled_pose=rng.normal(size=(len(lab), 17, 3)).astype(np.float32) * 0.3)


def test_multiview_batch_is_synchronised():
    ts = _fake_train_set()
    b = mtrain.sample_multiview_batch(np.random.default_rng(0), ts, 2, 3, 2)
    assert len(b["idx"]) == 12
    np.testing.assert_array_equal(ts.frame[b["idx"]], b["time"])
    np.testing.assert_array_equal(ts.view[b["idx"]], b["view"])
    # Rows sharing (slot, time) come from one sequence and distinct views.
    for s in range(2):
        rows = b["seq"] == s
        assert len(set(ts.seq_id[b["idx"][rows]])) == 1
        for t in set(b["time"][rows]):
            r = rows & (b["time"] == t)
            assert len(set(b["view"][r])) == r.sum() == 2


def test_one_step_same_loss_on_8_devices(eight_devices):
    """MCSS step (pose + multi-view loss) on 1 and 8 devices from the same init."""
    cfg = mcss_config.get_config("tiny").train
    ts = _fake_train_set()
    mesh1, mesh8 = parallel.make_mesh(1), parallel.make_mesh(8)
    model, state1 = mtrain.init_state(cfg, mesh1, (32, 32), seed=0)
    # A real copy (device_put may alias device 0's buffer, and the step donates its input).
    state8 = parallel.replicate(jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state1),
                                mesh8)
    step = mtrain.make_train_step(model, cfg, use_multiview=True)
    host_batch = mtrain._batch_for_step(ts, cfg, 0, True, 0)
    losses = {}
    for n_dev, mesh, state in ((1, mesh1, state1), (8, mesh8, state8)):
        batch = parallel.shard_batch(host_batch, mesh)
        state, _ = step(state, batch, training.step_key(0, 0))
        state, out = step(state, batch, training.step_key(0, 1))
        losses[n_dev] = {k: float(v) for k, v in jax.device_get(out).items()}
        assert state.params["reg_out"]["kernel"].sharding.is_fully_replicated
        assert len(state.params["reg_out"]["kernel"].sharding.device_set) == n_dev
    assert losses[1]["loss_mv"] > 0 and losses[1]["loss_pose"] > 0
    for k in losses[1]:
        assert losses[8][k] == pytest.approx(losses[1][k], rel=2e-3, abs=1e-5), k


def test_predict_features_embedding_is_the_normalised_pooled_features():
    cfg = mcss_config.get_config("tiny").train
    mesh = parallel.make_mesh(1)
    model, state = mtrain.init_state(cfg, mesh, (32, 32), seed=0)
    images = np.random.default_rng(1).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    head, pose_a = mtrain.predict(model, state, images, mesh)
    feats, pose_b = mtrain.predict(model, state, images, mesh, embedding="features")
    np.testing.assert_allclose(pose_a, pose_b, atol=1e-4)
    _, pooled = model.apply(state.variables(), mtrain._prep(jnp.asarray(images)), train=False,
                            method=model.embed)
    pooled = np.asarray(pooled)
    want = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(feats, want, atol=5e-4)
    assert head.shape[1] == cfg.model.embed_dim and feats.shape[1] == pooled.shape[1]
    with pytest.raises(ValueError, match="embedding"):
        mtrain.predict(model, state, images, mesh, embedding="pose")
