"""Pose-classification baseline: bins, a tiny training run on 8 devices, exact resume."""

import json
import os

import jax
import numpy as np
import pytest

from nvsm_jax.baselines import classifier
from nvsm_jax import geometry
from nvsm_jax.data import PoseSet


def _tiny_pose_set(n=8, size=(32, 32), seed=0):
    """Images whose colour encodes the azimuth bin, so a few steps can fit them."""
    rng = np.random.default_rng(seed)
    poses = np.stack([rng.uniform(0, 2 * np.pi, n), rng.uniform(-0.3, 0.7, n),
                      rng.normal(0, 0.1, n), np.full(n, 5.0)], 1).astype(np.float32)
    images = rng.integers(0, 40, (n, *size, 3)).astype(np.float32)
    images[..., 0] += 200 * poses[:, 0, None, None] / (2 * np.pi)
    images[..., 2] += 100 * (poses[:, 1, None, None] + 0.3)
    h, w = size
    return PoseSet("car", tuple(f"car_{i:04d}" for i in range(n)),
                   np.clip(images, 0, 255).astype(np.uint8), poses,
                   np.full(n, 200.0, np.float32), np.tile([[w / 2, h / 2]], (n, 1)).astype(np.float32))


def test_bin_centres_round_trip_and_wrap():
    cfg = classifier.ClassifierConfig()
    specs = classifier.bin_specs(cfg)
    for spec in specs:
        c = classifier.bin_centers(spec)
        np.testing.assert_array_equal(classifier.encode_angle(c, spec), np.arange(spec.num))
        np.testing.assert_allclose(classifier.decode_angle(np.arange(spec.num), spec), c, atol=1e-6)
    az, el, th = specs
    assert az.num == 36 and np.isclose(az.width, np.deg2rad(10))
    # azimuth wraps at 2 pi: 359.9 deg and 2 pi itself are bin 0; 4.9 deg is bin 0, 5.1 deg bin 1, 355.1 bin 0
    np.testing.assert_array_equal(
        classifier.encode_angle(np.deg2rad([359.9, 360.0, 4.9, 5.1, 355.1, 354.9]), az), [0, 0, 0, 1, 0, 35])
    # theta wraps at +-pi; 0 is a bin centre
    np.testing.assert_array_equal(classifier.encode_angle(np.array([np.pi, -np.pi, 0.0]), th),
                                  [0, 0, 18])
    # elevation clips at the ends of its interval
    np.testing.assert_array_equal(classifier.encode_angle(np.array([-2.0, 2.0]), el), [0, 17])
    # a pose at bin centres decodes to itself (distance = 5)
    grid = np.stack(np.meshgrid(*(classifier.bin_centers(s) for s in specs), indexing="ij"),
                    -1).reshape(-1, 3)
    poses = np.concatenate([grid, np.full((len(grid), 1), 5.0)], 1).astype(np.float32)
    back = classifier.bins_to_pose(classifier.pose_to_bins(poses, cfg), cfg)
    np.testing.assert_allclose(back, poses, atol=1e-5)
    # any pose decodes within half a bin on each angle -> small rotation error
    rng = np.random.default_rng(0)
    p = np.stack([rng.uniform(0, 2 * np.pi, 500), rng.uniform(-1.4, 1.4, 500),
                  rng.uniform(-np.pi, np.pi, 500), np.full(500, 5.0)], 1)
    q = classifier.bins_to_pose(classifier.pose_to_bins(p, cfg), cfg)
    for i, spec in enumerate(specs):
        d = np.angle(np.exp(1j * (q[:, i] - p[:, i])))
        assert np.all(np.abs(d) <= spec.width / 2 + 1e-5)
    assert np.max(geometry.pose_error(q.astype(np.float64), p)) < np.deg2rad(15)


def test_jax_encoding_matches_numpy_and_smoothing():
    cfg = classifier.ClassifierConfig(label_smoothing=0.2)
    rng = np.random.default_rng(1)
    p = np.stack([rng.uniform(-1, 7, 64), rng.uniform(-2, 2, 64), rng.uniform(-4, 4, 64),
                  np.full(64, 5.0)], 1).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(classifier.pose_to_bins(jax.numpy.asarray(p), cfg)),
                                  classifier.pose_to_bins(p, cfg))
    az = classifier.bin_specs(cfg)[0]
    t = np.asarray(classifier.smooth_targets(np.array([0, 5]), az, 0.2))
    np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(t[0, [35, 0, 1]], [0.1, 0.8, 0.1], atol=1e-6)  # wraps
    el = classifier.bin_specs(cfg)[1]
    t = np.asarray(classifier.smooth_targets(np.array([0]), el, 0.2))
    np.testing.assert_allclose(t[0, [0, 1]], [0.9, 0.1], atol=1e-6)


def _cfg(**kw):
    tiny = classifier.classifier_config("tiny")
    return tiny.replace(num_steps=6, checkpoint_every=3, optim=tiny.optim.replace(lr=1e-2), **kw)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    data = _tiny_pose_set()
    n_dev = jax.device_count()
    workdir = tmp_path_factory.mktemp("clf_full")
    state = classifier.train_classifier(_cfg(), data, workdir, num_devices=n_dev, progress=False)
    return data, n_dev, workdir, state


def test_tiny_training_decreases_loss_and_predicts(full_run, eight_devices):
    data, n_dev, workdir, state = full_run
    assert n_dev == 8 and len(state.params["encoder"]["conv1"]["kernel"].sharding.device_set) == 8
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 7))
    losses = [r["loss"] for r in rows]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0] - 0.3, losses
    cfg = _cfg()
    pred = classifier.predict_classifier(state, data.images[:5], batch_size=8, config=cfg)
    assert pred.shape == (5, 4) and pred.dtype == np.float32
    np.testing.assert_allclose(pred[:, 3], 5.0)
    # predictions sit on bin centres
    np.testing.assert_allclose(classifier.bins_to_pose(classifier.pose_to_bins(pred, cfg), cfg),
                               pred, atol=1e-5)
    # the restored workdir predicts the same
    loaded = classifier.load_classifier(workdir)
    np.testing.assert_allclose(classifier.predict_classifier(loaded, data.images[:5], 4), pred)


def test_resume_after_kill_reproduces_params(full_run, tmp_path):
    data, n_dev, _, state_full = full_run
    cfg = _cfg()
    classifier.train_classifier(cfg, data, tmp_path, num_devices=n_dev, progress=False,
                               stop_after=4)  # "killed" after step 4; last checkpoint at 3
    assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "3"
    state = classifier.train_classifier(cfg, data, tmp_path, num_devices=n_dev, progress=False)
    assert int(state.step) == 6
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state_full.params)),
                    jax.tree_util.tree_leaves(jax.device_get(state.params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pretrained_encoder_starts_the_run_and_heads_stay_fresh(tmp_path):
    from nvsm_jax.baselines import pretrain

    data = _tiny_pose_set()
    cfg = _cfg()
    model, x = classifier.build_classifier(cfg), np.zeros((1, 32, 32, 3), np.float32)
    other = jax.device_get(model.init(jax.random.key(1), x, train=False))
    fresh = jax.device_get(model.init(jax.random.key(cfg.seed), x, train=False))
    given = pretrain.Pretrained(other["params"], {k: v for k, v in other.items() if k != "params"})
    state = jax.device_get(classifier.train_classifier(cfg, data, tmp_path / "pre", num_devices=1,
                                                      progress=False, stop_after=0,
                                                      pretrained=given))
    for a, b in zip(jax.tree_util.tree_leaves(state.params["encoder"]),
                    jax.tree_util.tree_leaves(other["params"]["encoder"])):
        np.testing.assert_array_equal(a, b)
    for head in set(state.params) - {"encoder"}:
        for a, b in zip(jax.tree_util.tree_leaves(state.params[head]),
                        jax.tree_util.tree_leaves(fresh["params"][head])):
            np.testing.assert_array_equal(a, b)
    assert not np.allclose(state.params["encoder"]["conv1"]["kernel"],
                           fresh["params"]["encoder"]["conv1"]["kernel"])


def test_bins_and_smoothed_cross_entropy_by_hand():
    """4 azimuth bins (centres 0, 90, 180, 270 deg), 2 elevation bins ([-90, 0), [0, 90]),
    4 theta bins (centres -180, -90, 0, 90): two poses binned and decoded by hand, and the
    loss = sum over heads of the mean cross-entropy against the smoothed targets written
    out below (0.8 on the bin, 0.1 on each neighbour; periodic heads wrap, the elevation
    ends keep the mass), computed with plain numpy log-softmax."""
    import jax.numpy as jnp

    cfg = classifier.ClassifierConfig(azimuth_bins=4, elevation_bins=2, theta_bins=4,
                                     label_smoothing=0.2)
    poses = np.array([[np.radians(100), np.radians(-10), np.radians(170), 5.0],
                      [np.radians(350), np.radians(30), np.radians(-80), 5.0]], np.float32)
    # az 100 -> bin 1, 350 -> bin 0 (wraps past 315); el -10 -> 0, 30 -> 1;
    # theta 170 -> bin 0 (past 135 it wraps to the -180 centre), -80 -> bin 1 (-90 centre)
    bins = classifier.pose_to_bins(poses, cfg)
    np.testing.assert_array_equal(bins, [[1, 0, 0], [0, 1, 1]])
    np.testing.assert_allclose(classifier.bins_to_pose(bins, cfg),
                               [[np.pi / 2, -np.pi / 4, -np.pi, 5.0],
                                [0.0, np.pi / 4, -np.pi / 2, 5.0]], atol=1e-6)
    logits = {"azimuth": np.array([[0.0, 2.0, 0.0, -1.0], [1.0, 0.0, 0.0, 0.0]]),
              "elevation": np.array([[0.5, -0.5], [0.0, 1.0]]),
              "theta": np.array([[1.0, 0.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0]])}
    targets = {"azimuth": np.array([[0.1, 0.8, 0.1, 0.0], [0.8, 0.1, 0.0, 0.1]]),
               "elevation": np.array([[0.9, 0.1], [0.1, 0.9]]),
               "theta": np.array([[0.8, 0.1, 0.0, 0.1], [0.1, 0.8, 0.1, 0.0]])}
    want_acc = {"azimuth": 1.0, "elevation": 1.0, "theta": 0.5}   # theta row 0 argmax is 3
    total, m = jax.jit(classifier.classification_loss, static_argnums=2)(
        {k: jnp.asarray(v, jnp.float32) for k, v in logits.items()}, jnp.asarray(bins), cfg)
    want_total = 0.0
    for head in classifier.HEADS:
        z = logits[head]
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        ce = float(np.mean(-(targets[head] * logp).sum(-1)))
        want_total += ce
        assert float(m[f"ce_{head}"]) == pytest.approx(ce, rel=1e-5), head
        assert float(m[f"acc_{head}"]) == want_acc[head], head
    assert float(total) == pytest.approx(want_total, rel=1e-5)


def test_predict_decodes_the_argmax_bin_of_each_head():
    """Heads with zero weights and a bias peaked on azimuth bin 7, elevation bin 10 and
    theta bin 20 (and a runner-up elsewhere) predict those bins' centres for every image:
    7 * 10 = 70 deg, -90 + 10.5 * 10 = 15 deg, -180 + 20 * 10 = 20 deg, distance 5."""
    cfg = _cfg()
    model = classifier.build_classifier(cfg)
    variables = jax.device_get(model.init(jax.random.key(0), np.zeros((1, 32, 32, 3),
                                                                      np.float32), train=False))
    params = dict(variables["params"])
    for head, n, k in (("azimuth", 36, 7), ("elevation", 18, 10), ("theta", 36, 20)):
        bias = np.zeros(n, np.float32)
        bias[k], bias[(k + 5) % n] = 3.0, 2.0
        kernel = np.zeros_like(params[f"head_{head}"]["kernel"])
        params[f"head_{head}"] = {"kernel": kernel, "bias": bias}
    bundle = classifier.ClassifierModel(model, {**variables, "params": params}, cfg)
    pred = classifier.predict_classifier(bundle, _tiny_pose_set().images[:5], batch_size=8)
    np.testing.assert_allclose(pred, np.tile(np.r_[np.radians([70.0, 15.0, 20.0]), 5.0], (5, 1)),
                               atol=1e-5)
