"""One tiny MCSS training step: 8 forced CPU devices give the 1-device loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import mcss as mcss_config
from nvsm_jax import parallel, training
from nvsm_jax.mcss import train as mtrain
from nvsm_jax.mcss.testing import fake_train_set as _fake_train_set


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
    step = mtrain._cached_step(model, cfg, True)      # compiled once for the file
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


def test_train_step_lowers_both_losses_on_a_fixed_batch():
    """Gradient descent on one fixed batch (same images, same augmentation key), tiny
    config (lr 2e-3 after a 1-step warm-up from 0): the first step changes nothing (lr 0),
    the reported total is exactly pose_weight * loss_pose + weight * loss_mv, and after 4
    real updates the total and the multi-view loss are below half their start (seen:
    2.19 -> 0.69, 1.71 -> 0.24) and the pose loss below 0.98 of its start (seen: 0.474 ->
    0.448). Gradient ascent, a dropped loss term or a detached branch cannot do that."""
    cfg = mcss_config.get_config("tiny").train
    assert cfg.pose_weight == 1.0 and cfg.multiview.weight == 1.0
    assert cfg.multiview.get("pose_consistency", 0.0) == 0.0
    ts = _fake_train_set()
    mesh = parallel.make_mesh(1)
    model, state = mtrain.init_state(cfg, mesh, (32, 32), seed=0)
    step = mtrain._cached_step(model, cfg, True)
    batch = parallel.shard_batch(mtrain._batch_for_step(ts, cfg, 0, True, 0), mesh)
    hist = []
    for _ in range(6):      # the metrics of call i are the loss before its update
        state, out = step(state, batch, training.step_key(0, 0))
        hist.append({k: float(v) for k, v in jax.device_get(out).items()})
    assert hist[1]["loss"] == pytest.approx(hist[0]["loss"], rel=1e-6)        # lr 0 first
    for h in hist:
        assert h["loss"] == pytest.approx(h["loss_pose"] + h["loss_mv"], rel=1e-5)
    first, last = hist[0], hist[-1]
    assert last["loss"] < 0.5 * first["loss"], [h["loss"] for h in hist]
    assert last["loss_mv"] < 0.5 * first["loss_mv"], [h["loss_mv"] for h in hist]
    assert last["loss_pose"] < 0.98 * first["loss_pose"], [h["loss_pose"] for h in hist]


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


def _tiny_cfg(**model):
    cfg = mcss_config.get_config("tiny").train
    cfg.model.update(model)
    return cfg


def test_imagenet_encoder_gets_the_packaged_weights_and_the_lite_input():
    """encoder=efficientnet_lite0, pretrained=imagenet: the encoder holds the converted
    ImageNet variables, and the MCSS input pipeline (uint8 -> ImageNet-normalised) feeds
    it exactly what EfficientNet-Lite expects, (rgb - 127) / 128."""
    from nvsm_jax.models import efficientnet, weights

    cfg = _tiny_cfg(encoder="efficientnet_lite0", pretrained="imagenet", norm="frozen_batch",
                    frozen_stages=9, tap=16, pool="flatten", reduce_dim=8)
    mesh = parallel.make_mesh(1)
    model, state = mtrain.init_state(cfg, mesh, (32, 32), seed=0)
    want = weights.load_imagenet("efficientnet_lite0")
    got = jax.device_get(state.params["encoder"])
    for path, leaf in jax.tree_util.tree_flatten_with_path(want["params"])[0]:
        sub = got
        for k in path:
            sub = sub[k.key]
        np.testing.assert_array_equal(np.asarray(sub), leaf)
    assert mtrain.uses_feature_cache(cfg) and mtrain.tap_stage(cfg.model) == 5
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    maps = mtrain.encode(model, state, images, mesh)
    ref = efficientnet.EfficientNetLite("efficientnet_lite0", norm="frozen_batch")
    out = jax.jit(lambda v, x: ref.apply(v, x, train=False))(
        {"params": want["params"], "batch_stats": want["batch_stats"]},
        weights.normalize_lite(images))
    np.testing.assert_allclose(maps, np.asarray(out[2]), atol=2e-4, rtol=1e-3)
    assert maps.shape == (3, 2, 2, 112)


def test_feature_cache_step_equals_the_image_step_and_frozen_stages_stay():
    """A frozen encoder (ResNet, stages 0-4) + no augmentation: the step on cached maps
    gives the loss and update of the step on images; frozen weights do not move; the
    unfrozen ones do."""
    cfg = _tiny_cfg(frozen_stages=5, tap=8, adapter_layers=1, pool="flatten", reduce_dim=8)
    cfg.augment = 0.0
    ts = _fake_train_set()
    mesh = parallel.make_mesh(1)
    model, state = mtrain.init_state(cfg, mesh, (32, 32), seed=0)
    assert mtrain.uses_feature_cache(cfg)
    maps = mtrain.encode(model, state, ts.images, mesh)
    assert mtrain.encode(model, state, ts.images, mesh) is maps       # computed once
    step = mtrain.make_train_step(model, cfg, use_multiview=True)
    state, before, outs, params = _step_from_images_and_maps(step, state, ts, cfg, maps, mesh)
    for k in outs["images"]:
        assert float(outs["maps"][k]) == pytest.approx(float(outs["images"][k]), rel=1e-4,
                                                        abs=1e-6), k
    for p in (params["images"], params["maps"]):
        for path, leaf in jax.tree_util.tree_flatten_with_path(p["encoder"])[0]:
            ref = before["encoder"]
            for k in path:
                ref = ref[k.key]
            np.testing.assert_array_equal(leaf, ref)
        assert np.abs(p["adapter_0"]["kernel"] - before["adapter_0"]["kernel"]).max() > 0
    np.testing.assert_allclose(params["maps"]["reg_out"]["kernel"],
                               params["images"]["reg_out"]["kernel"], atol=1e-6)
    # Prediction from the maps equals prediction from the images.
    e1, p1 = mtrain.predict(model, state, ts.images[:7], mesh)
    e2, p2 = mtrain.predict(model, state, maps[:7], mesh, from_features=True)
    np.testing.assert_allclose(e1, e2, atol=1e-5)
    np.testing.assert_allclose(p1, p2, atol=1e-3)
    with pytest.raises(ValueError, match="frozen_stages > 4"):
        c2 = _tiny_cfg(frozen_stages=4)
        c2.cache_features = "on"
        mtrain.uses_feature_cache(c2)
    assert not mtrain.uses_feature_cache(_tiny_cfg(frozen_stages=4))


def test_partly_frozen_encoder_keeps_its_first_stages():
    cfg = _tiny_cfg(frozen_stages=2)
    ts = _fake_train_set()
    mesh = parallel.make_mesh(1)
    model, state = mtrain.init_state(cfg, mesh, (32, 32), seed=0)
    before = jax.device_get(state.params["encoder"])
    step = mtrain.make_train_step(model, cfg, use_multiview=False)
    b = parallel.shard_batch(mtrain._batch_for_step(ts, cfg, 0, False, 0), mesh)
    state, _ = step(state, b, training.step_key(0, 0))
    state, _ = step(state, b, training.step_key(0, 1))
    after = jax.device_get(state.params["encoder"])
    moved = {top: max(float(np.abs(np.asarray(a) - np.asarray(b_)).max()) for a, b_ in
                      zip(jax.tree_util.tree_leaves(after[top]),
                          jax.tree_util.tree_leaves(before[top])))
             for top in after}
    for top, d in moved.items():
        if top.startswith("layer1") or not top.startswith("layer"):
            assert d == 0.0, top          # stem and stage 1: frozen
        else:
            assert d > 0.0, top


def test_mean_pose_prediction_is_the_labelled_mean():
    ts = _fake_train_set()
    pred = mtrain.mean_pose_prediction(ts, 5)
    want = np.mean(ts.labelled_pose.astype(np.float64), axis=0) * 1000.0
    assert pred.shape == (5, 17, 3)
    np.testing.assert_allclose(pred, np.broadcast_to(want, (5, 17, 3)), rtol=1e-5, atol=1e-3)


def test_bootstrap_labels_every_frame_with_one_pose_per_instant():
    """Labelled frames keep their labels; each unlabelled instant's pseudo-labels in
    the different views are one pose turned (the same joint-distance matrix), and
    they are the views' fused predictions (fusion.pseudo_labels)."""
    from nvsm_jax.mcss import fusion
    cfg = mcss_config.get_config("tiny").train
    mesh = parallel.make_mesh(1)
    ts = _fake_train_set()
    model, state = mtrain.init_state(cfg, mesh, (32, 32), seed=0)
    boot, single = mtrain.bootstrap_train_set(model, state, ts, cfg, mesh)
    np.testing.assert_array_equal(boot.labelled_idx, np.arange(len(ts.images)))
    np.testing.assert_allclose(boot.labelled_pose[ts.labelled_idx], ts.labelled_pose)
    _, pred = mtrain.predict(model, state, ts.images, mesh)
    np.testing.assert_allclose(single, pred, atol=1e-6)
    want = fusion.pseudo_labels(pred / 1000.0, ts.seq_offset, ts.seq_views, ts.seq_frames,
                                ts.labelled_idx, ts.labelled_pose)
    np.testing.assert_allclose(boot.labelled_pose, want, atol=1e-6)
    seq1 = np.flatnonzero(ts.seq_id == 1).reshape(3, 12)          # [views, frames]
    d = np.linalg.norm(boot.labelled_pose[seq1][..., :, None, :]
                       - boot.labelled_pose[seq1][..., None, :, :], axis=-1)
    np.testing.assert_allclose(d[1], d[0], atol=1e-5)
    np.testing.assert_allclose(d[2], d[0], atol=1e-5)
    assert not np.allclose(boot.labelled_pose[seq1[0]], pred[seq1[0]] / 1000.0, atol=1e-6)


# ---------------------------------------------------------------- partly frozen Lite encoder
# EfficientNet-Lite0 read at stride 16 (the output of stage 5); frozen_stages=k caches the
# output of stage k - 1 and trains stages k..5, the adapter and the heads. One config for
# the tests below, so the state's initialiser is compiled once.


def _step_from_images_and_maps(step, state, ts, cfg, maps, mesh):
    """One step past the warm-up (the learning rate is 0 at the optimiser's first
    step), then step 3 from the images and, from the same state, from ``maps``:
    ``(state after the warm-up step, its params, {"images"|"maps": metrics},
    {"images"|"maps": new params})`` on the host."""
    b0 = mtrain._batch_for_step(ts, cfg, 0, True, 0, maps)
    state, _ = step(state, parallel.shard_batch(b0, mesh), training.step_key(0, 0))
    copy = lambda s: jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), s)  # noqa: E731
    outs, params = {}, {}
    for name, feats in (("images", None), ("maps", maps)):
        b = mtrain._batch_for_step(ts, cfg, 3, True, 0, feats)
        assert f"sup_{'images' if feats is None else 'feats'}" in b
        new, out = step(copy(state), parallel.shard_batch(b, mesh), training.step_key(0, 3))
        outs[name] = jax.device_get(out)
        params[name] = jax.device_get(new.params)
    return state, jax.device_get(state.params), outs, params


def _lite_cfg(frozen_stages: int = 4):
    cfg = _tiny_cfg(encoder="efficientnet_lite0", pretrained="imagenet", norm="frozen_batch",
                    frozen_stages=frozen_stages, tap=16, pool="flatten", reduce_dim=8,
                    adapter_layers=1)
    cfg.augment = 0.0
    return cfg


def _leaves_by_stage(encoder_params):
    """{stage: [(path, leaf), ...]} of an EfficientNet-Lite0 parameter tree."""
    from nvsm_jax.models import efficientnet
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(encoder_params)[0]:
        names = tuple(k.key for k in path)
        out.setdefault(efficientnet.stage_of_param(names), []).append((names, np.asarray(leaf)))
    return out


def test_cache_level_for_each_freezing():
    """Which maps training reads computed once: the tap maps when the encoder is frozen
    up to the tap; a partly frozen Lite encoder, the output of its last frozen stage
    (k - 1); nothing frozen, trainable batch statistics or "off": none; "on" where
    there is nothing to cache: a ValueError naming what is missing."""
    def level(mode="auto", **model):
        cfg = _tiny_cfg(**model)
        cfg.cache_features = mode
        stage = mtrain.feature_cache_stage(cfg)
        assert mtrain.uses_feature_cache(cfg) == (stage is not None)
        return stage, mtrain._cache_split(cfg)

    lite = dict(encoder="efficientnet_lite0", norm="frozen_batch", tap=16)
    assert level(**lite, frozen_stages=9) == (5, (None, None))      # fully frozen: the tap
    assert level(**lite, frozen_stages=6) == (5, (None, None))
    assert level("on", **lite, frozen_stages=9) == (5, (None, None))
    for k in (5, 4, 3, 1):                                           # partly: stage k - 1
        assert level(**lite, frozen_stages=k) == (k - 1, (k - 1, k)), k
        assert level("on", **lite, frozen_stages=k) == (k - 1, (k - 1, k)), k
    assert level(**{**lite, "tap": 32}, frozen_stages=9) == (8, (None, None))
    assert level(**{**lite, "tap": 32}, frozen_stages=8) == (7, (7, 8))
    assert level(**{**lite, "tap": 8}, frozen_stages=3) == (2, (2, 3))
    assert level(**{**lite, "tap": 8}, frozen_stages=4) == (3, (None, None))
    assert level(**lite, frozen_stages=0) == (None, (None, None))
    assert level("off", **lite, frozen_stages=9) == (None, (None, None))
    assert level("off", **lite, frozen_stages=3) == (None, (None, None))
    assert level(**{**lite, "norm": "batch"}, frozen_stages=3) == (None, (None, None))
    assert level(**{**lite, "norm": "batch"}, frozen_stages=9) == (None, (None, None))
    with pytest.raises(ValueError, match="frozen_stages >= 1"):
        level("on", **lite, frozen_stages=0)
    with pytest.raises(ValueError, match="norm != 'batch'"):
        level("on", **{**lite, "norm": "batch"}, frozen_stages=3)
    # The ResNet (tiny: tap 32 = stage 4) is cached at the tap only.
    assert level(frozen_stages=5) == (4, (None, None))
    assert level(frozen_stages=2) == (None, (None, None))
    assert level(frozen_stages=0) == (None, (None, None))
    with pytest.raises(ValueError, match="frozen_stages > 4"):
        level("on", frozen_stages=2)
    with pytest.raises(ValueError, match="frozen_stages > 4"):
        level("on", frozen_stages=0)
    with pytest.raises(ValueError, match="cache_features"):
        level("sometimes", frozen_stages=5)


def test_network_from_cached_stage_maps_equals_the_network_from_images():
    """encode(stage=k - 1) then the network from stage k (start_stage=k) gives the
    embedding and the pose of the network run on the images, for a cache right after
    the stem (k=1) and mid-trunk (k=4); predict_frames, which picks that split from the
    config (frozen_stages=k), gives them too. The maps have stage k - 1's shape (32 px
    input)."""
    cfg = _lite_cfg()
    mesh = parallel.make_mesh(1)
    model, state = mtrain.init_state(cfg, mesh, (32, 32), seed=0)
    images = _fake_train_set().images[:6]
    emb, pose = mtrain.predict(model, state, images, mesh)
    # the outputs depend on the input (a constant network would pass everything below)
    assert np.abs(pose - pose[:1]).max() > 1e-3 and np.abs(emb - emb[:1]).max() > 1e-3
    for k, shape in ((1, (16, 16, 32)), (4, (4, 4, 40))):         # stem, stage 3 outputs
        maps = mtrain.encode(model, state, images, mesh, stage=k - 1)
        assert maps.shape == (6, *shape), k
        emb2, pose2 = mtrain.predict(model, state, maps, mesh, from_features=True,
                                     start_stage=k)
        np.testing.assert_allclose(emb2, emb, atol=1e-5, err_msg=f"k={k}")
        np.testing.assert_allclose(pose2, pose, atol=1e-3, err_msg=f"k={k}")
        c = _lite_cfg(k)
        assert mtrain.feature_cache_stage(c) == k - 1
        emb3, pose3 = mtrain.predict_frames(model, state, images, c, mesh)
        np.testing.assert_allclose(emb3, emb, atol=1e-5, err_msg=f"k={k}")
        np.testing.assert_allclose(pose3, pose, atol=1e-3, err_msg=f"k={k}")
    # the kept maps of stage 3 follow the weights of stages 0-3 and only those
    def scaled(block):
        p = dict(state.params)
        p["encoder"] = {**p["encoder"],
                        block: jax.tree_util.tree_map(lambda a: a * 1.5, p["encoder"][block])}
        return state.replace(params=p)

    maps = mtrain.encode(model, state, images, mesh, stage=3)
    assert mtrain.encode(model, scaled("blocks_5"), images, mesh, stage=3) is maps   # stage 4
    other = mtrain.encode(model, scaled("blocks_4"), images, mesh, stage=3)          # stage 3
    assert np.abs(other - maps).max() > 1e-3
    with pytest.raises(ValueError, match="from_features"):
        mtrain.predict(model, state, images, mesh, start_stage=3)


def _partly_frozen(k: int = 4):
    cfg = _lite_cfg(k)
    ts = _fake_train_set()
    mesh = parallel.make_mesh(1)
    model, state = mtrain.init_state(cfg, mesh, (32, 32), seed=0)
    assert mtrain._cache_split(cfg) == (k - 1, k)
    maps = mtrain.encode(model, state, ts.images, mesh, stage=k - 1)
    return cfg, ts, mesh, model, state, maps


def _assert_stages_kept_and_moved(new_encoder, old, k, label):
    new = _leaves_by_stage(new_encoder)
    for stage in range(k):
        for (path, a), (_, b_) in zip(new[stage], old[stage]):
            np.testing.assert_array_equal(a, b_, err_msg=f"{label}: {path} (stage {stage})")
    for stage in (4, 5):
        for (path, a), (_, b_) in zip(new[stage], old[stage]):
            assert np.abs(a - b_).max() > 0, (label, path, stage)


def test_partly_frozen_step_on_cached_maps_trains_stages_from_k_only():
    """frozen_stages=4: the maps are stage 3's (stride 8); two steps on them (the first
    at the warm-up's zero learning rate) leave stages 0-3 bit-identical and move every
    parameter of stages 4 and 5 (the stages up to the tap), with a multi-view loss and
    a gradient."""
    k = 4
    cfg, ts, mesh, model, state, maps = _partly_frozen(k)
    assert maps.shape == (len(ts.images), 4, 4, 40)                  # stage 3: stride 8
    step = mtrain._cached_step(model, cfg, True)                     # what train() uses
    old = _leaves_by_stage(jax.device_get(state.params["encoder"]))
    for s in (0, 3):
        b = mtrain._batch_for_step(ts, cfg, s, True, 0, maps)
        state, out = step(state, parallel.shard_batch(b, mesh), training.step_key(0, s))
    assert float(out["loss_mv"]) > 0 and float(out["grad_norm"]) > 0
    _assert_stages_kept_and_moved(jax.device_get(state.params["encoder"]), old, k, "maps")


@pytest.mark.slow
def test_partly_frozen_cached_step_equals_the_image_step(tmp_path):
    """frozen_stages=4, a second check against the image path: the step on the cached
    stage-3 maps has the losses and update of the step on the images (no augmentation),
    both keep stages 0-3; train() then runs on the same cache and keeps them too."""
    k = 4
    cfg, ts, mesh, model, state, maps = _partly_frozen(k)
    step = mtrain._cached_step(model, cfg, True)
    state, before, outs, params = _step_from_images_and_maps(step, state, ts, cfg, maps, mesh)
    for key in outs["images"]:
        assert float(outs["maps"][key]) == pytest.approx(float(outs["images"][key]), rel=1e-4,
                                                          abs=1e-6), key
    old = _leaves_by_stage(before["encoder"])
    for name in ("maps", "images"):
        _assert_stages_kept_and_moved(params[name]["encoder"], old, k, name)
    # the same update, trained stages and heads (Adam: steps of about lr = 2e-3 per weight)
    for path, a in jax.tree_util.tree_flatten_with_path(params["maps"])[0]:
        ref = params["images"]
        for key in path:
            ref = ref[key.key]
        np.testing.assert_allclose(a, ref, atol=2e-5, err_msg=jax.tree_util.keystr(path))
    # train() reads the same cache (its stage-3 maps) and keeps the frozen stages
    _, trained = mtrain.train(ts, cfg, str(tmp_path), method="mcss", mesh=mesh)
    got = _leaves_by_stage(jax.device_get(trained.params["encoder"]))
    for stage in range(k):
        for (path, a), (_, b_) in zip(got[stage], old[stage]):
            np.testing.assert_array_equal(a, b_, err_msg=f"train(): {path}")
    assert all(np.abs(a - b_).max() > 0 for (_, a), (_, b_) in zip(got[4], old[4]))


def test_cache_copies_are_the_maps_of_jittered_images_drawn_per_frame():
    """cache_copies=3 with augment: copy 0 is the plain maps, copy c the maps of the
    images jittered with fold_in(key(seed), c) (computed here by hand from _augment
    and the network's features); a batch takes each frame's maps from one copy, and
    more than one copy appears. cache_copies=1 (or no augment): the plain [N, ...]."""
    cfg = _tiny_cfg(frozen_stages=5)              # the tiny ResNet frozen to its tap
    cfg.augment, cfg.cache_copies = 0.5, 3
    assert mtrain.feature_cache_stage(cfg) is not None
    mesh = parallel.make_mesh(1)
    model, state = mtrain.init_state(cfg, mesh, (32, 32), seed=0)
    ts = _fake_train_set()
    feats = mtrain.encode_copies(model, state, ts.images, cfg, mesh, seed=7)
    plain = mtrain.encode(model, state, ts.images, mesh)
    assert feats.shape == (3, *plain.shape)
    np.testing.assert_array_equal(feats[0], plain)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 2), 0)   # copy 2, chunk 0
    from nvsm_jax.models.backbone import preprocess

    x = mtrain._augment(jnp.asarray(ts.images, jnp.float32) / 255.0, key, 0.5)
    want = jax.jit(lambda v, x: model.apply(v, preprocess(x * 255.0), train=False,
                                            method=model.features))(state.variables(), x)
    np.testing.assert_allclose(feats[2], np.asarray(want), rtol=1e-3, atol=1e-3)
    assert np.abs(feats[1] - plain).mean() > 1e-2 and np.abs(feats[1] - feats[2]).mean() > 1e-2
    # kept as one entry: the next run of the experiment reads them again, also after
    # the maps of other images (the test frames) were computed in between
    mtrain.encode(model, state, ts.images[:5].copy(), mesh)
    mtrain.encode(model, state, ts.images, mesh)
    assert mtrain.encode_copies(model, state, ts.images, cfg, mesh, seed=7) is feats
    batch = mtrain._batch_for_step(ts, cfg, 3, False, 0, feats)
    rng = np.random.default_rng([0, 3])
    idx = mtrain.sample_supervised_batch(rng, ts, cfg.sup_batch)["idx"]
    used = [int(np.flatnonzero([np.array_equal(row, feats[c, i]) for c in range(3)])[0])
            for row, i in zip(batch["sup_feats"], idx)]
    assert len(set(used)) > 1
    cfg.cache_copies = 1
    assert mtrain.encode_copies(model, state, ts.images, cfg, mesh).shape == plain.shape
