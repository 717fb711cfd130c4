"""Dense contrastive pre-training: view correspondence, the loss, a tiny run on 8 devices."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from nvsm_jax.baselines import pretrain
from nvsm_jax.data import UnlabelledSet
from nvsm_jax.models import backbone


def _cell_image(h, w, stride, seed=0):
    """An image whose stride x stride cells each have a distinct constant colour."""
    rng = np.random.default_rng(seed)
    colours = rng.permutation(256 ** 3 // 4096)[:h * w] * 4096 + 2048
    rgb = np.stack([colours // 65536, colours // 256 % 256, colours % 256], -1).astype(np.uint8)
    return np.repeat(np.repeat(rgb.reshape(h, w, 3), stride, 0), stride, 1)


def _cells(images, stride):
    """'Feature map' of an image: per-cell mean colour [B, h, w, 3]."""
    b, hh, ww, c = images.shape
    return images.reshape(b, hh // stride, stride, ww // stride, stride, c).mean((2, 4))


def test_view_correspondence_matches_shifted_cells():
    h, w, s = 4, 6, 8
    img = _cell_image(h, w, s)
    orig = _cells(img[None], s)[0].reshape(h * w, 3)
    cfg = pretrain.PretrainConfig(max_shift_cells=2, flip_prob=0.5, jitter=0.0, noise_std=0.0,
                                  cells_per_image=h * w)
    views = pretrain.make_views(np.repeat(img[None], 16, 0), s, cfg, np.random.default_rng(3))
    assert views["view1"].shape == (16, h * s, w * s, 3) and views["idx1"].shape == (16, h * w)
    assert views["flip"].any() and (~views["flip"]).any() and np.any(views["shift"] != 0)
    for v in (1, 2):
        feat = _cells(views[f"view{v}"], s).reshape(16, h * w, 3)
        got = np.take_along_axis(feat, views[f"idx{v}"][..., None].astype(np.int64), 1)
        ok = views["valid"]
        want = orig[(views["cell"][..., 0] * w + views["cell"][..., 1]).astype(int)]
        np.testing.assert_array_equal(got[ok], want[ok])
    # the number of shared cells is exactly the overlap of the two shifts
    sh = views["shift"]
    def span(t, n):   # original rows/cols that stay inside both views
        return np.maximum(0, n - np.maximum(0, -t.min(1)) - np.maximum(0, t.max(1)))
    overlap = span(sh[:, :, 0], h) * span(sh[:, :, 1], w)
    np.testing.assert_array_equal(views["valid"].sum(1), overlap)
    # a direct case: shift by (1, -2) cells and flip
    idx, valid = pretrain.view_correspondence((h, w), np.array([1, -2]), np.array(True))
    i, j = 0, 3
    assert valid[i * w + j] and idx[i * w + j] == (i + 1) * w + (w - 1 - (j - 2))
    assert not valid[(h - 1) * w + 0] and not valid[0 * w + 1]


def test_dense_infonce_identical_vs_random():
    rng = np.random.default_rng(0)
    n, d = 256, 64
    f = rng.normal(size=(n, d))
    f /= np.linalg.norm(f, axis=-1, keepdims=True)
    g = rng.normal(size=(n, d))
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    f, g = jnp.asarray(f, jnp.float32), jnp.asarray(g, jnp.float32)
    ok = jnp.ones(n, bool)
    same = float(pretrain.dense_infonce(f, f, ok, temperature=0.1))
    assert same < 0.05, same
    rand = float(pretrain.dense_infonce(f, g, ok, temperature=0.5))
    assert abs(rand - np.log(n)) < 0.15, (rand, np.log(n))
    # invalid rows are neither anchors nor negatives: garbage there changes nothing
    valid = jnp.asarray(rng.random(n) < 0.5)
    garbage = jnp.where(valid[:, None], g, f)
    a = float(pretrain.dense_infonce(garbage, g, valid, temperature=0.2))
    b = float(pretrain.dense_infonce(g[valid], g[valid], jnp.ones(int(valid.sum()), bool),
                                     temperature=0.2))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # excluding same-image neighbours removes their (high) similarity from the negatives
    ids = jnp.repeat(jnp.arange(n // 4), 4)
    cell = jnp.tile(jnp.array([[0, 0], [0, 1], [1, 0], [5, 5]], jnp.float32), (n // 4, 1))
    smooth = jnp.repeat(f[::4], 4, 0)           # 4 identical cells per image: hard negatives
    with_nb = float(pretrain.dense_infonce(smooth, smooth, ok, temperature=0.1))
    without = float(pretrain.dense_infonce(smooth, smooth, ok, temperature=0.1, image_id=ids,
                                           cell=cell, neighbor_radius=1.0))
    np.testing.assert_allclose(with_nb, np.log(4), atol=0.02)
    # (0,0) keeps 1 negative, (0,1) and (1,0) keep 2 (they are sqrt 2 apart), (5,5) keeps 3
    np.testing.assert_allclose(without, (np.log(2) + 2 * np.log(3) + np.log(4)) / 4, atol=0.02)


def _smooth_noise(n, size, seed):
    """Low-frequency colour noise (8x8 upsampled): every feature cell looks different."""
    rng = np.random.default_rng(seed)
    h, w = size
    small = rng.uniform(0, 255, (n, h // 4, w // 4, 3))
    big = np.repeat(np.repeat(small, 4, 1), 4, 2)
    k = np.ones(4) / 4          # box blur along both axes
    big = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, big)
    big = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 2, big)
    return np.clip(big, 0, 255).astype(np.uint8)


def test_tiny_pretrain_on_8_devices_decreases_loss(tmp_path, eight_devices):
    n = 16
    images = _smooth_noise(n, (32, 32), 0)
    pool = UnlabelledSet("car", tuple(f"u{i}" for i in range(n)), images,
                         np.full(n, 200.0, np.float32), np.tile([[16.0, 16.0]], (n, 1)))
    model = backbone.make_feature_net("tiny", stride=8, feature_dim=16)
    tiny = pretrain.pretrain_config("tiny")
    cfg = tiny.replace(num_steps=8, checkpoint_every=4, optim=tiny.optim.replace(lr=1e-2),
                       cells_per_image=8, jitter=0.2)
    out = pretrain.pretrain(cfg, model, pool, tmp_path, num_devices=8, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 8 and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.15, losses
    assert rows[-1]["pos_cos"] > rows[0]["pos_cos"]
    # the saved weights load back and fit a (NeMo-style) FeatureNet TrainState
    loaded = pretrain.load_pretrained_params(tmp_path)
    for a, b in zip(jax.tree_util.tree_leaves(out.params), jax.tree_util.tree_leaves(loaded.params)):
        np.testing.assert_array_equal(a, b)
    fresh = pretrain.init_state(cfg.replace(seed=1), model, (32, 32),
                                jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",)))
    state = pretrain.apply_pretrained(fresh, loaded)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(out.params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    feats = model.apply(state.variables(), backbone.preprocess(images[:2]))
    assert feats.shape == (2, 4, 4, 16)
    # resuming a finished run restores it without training
    again = pretrain.pretrain(cfg, model, pool, tmp_path, num_devices=8, progress=False)
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 8
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(again.params)[0],
                                  jax.tree_util.tree_leaves(out.params)[0])
    os.remove(tmp_path / pretrain.PARAMS_FILE)          # unfinished-run path: the checkpoint
    raw = pretrain.load_pretrained_params(tmp_path)
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(raw.params)[0],
                                  jax.tree_util.tree_leaves(out.params)[0])


def _np_infonce(f1, f2, allowed, temperature, directions=False):
    """Symmetric InfoNCE by loops: ``allowed[r]`` = the columns row r is scored against
    (its positive r included); rows missing from ``allowed`` are not anchors. The mean of
    the two directions (f1 rows against f2, f2 rows against f1), or with ``directions``
    both."""
    s = f1 @ f2.T / temperature
    out = []
    for m in (s, s.T):
        terms = [-(m[r, r] - np.log(sum(np.exp(m[r, c]) for c in cols)))
                 for r, cols in allowed.items()]
        out.append(np.mean(terms))
    return tuple(out) if directions else 0.5 * (out[0] + out[1])


def test_dense_infonce_hand_case():
    """Four pairs, row 3 invalid, rows 0 and 1 adjacent cells of one image (radius 1): row 0
    is scored against columns {0, 2}, row 1 against {1, 2}, row 2 against {0, 1, 2}, in both
    directions (f1 -> f2 and f2 -> f1, averaged); without the radius rows 0 and 1 see each
    other. The two directions differ here (the cosine matrix is not symmetric), so both
    must be counted."""
    f1 = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]])
    f2 = np.array([[0.8, 0.6, 0.0], [0.0, 0.6, 0.8], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    valid = np.array([True, True, True, False])
    ids = np.array([0, 0, 1, 1])
    cell = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [3.0, 3.0]])
    t = 0.5
    args = (jnp.asarray(f1, jnp.float32), jnp.asarray(f2, jnp.float32), jnp.asarray(valid))
    # jitted: one small compile instead of many eager ones (test time)
    dense_infonce = jax.jit(pretrain.dense_infonce,
                            static_argnames=("temperature", "neighbor_radius"))
    got = dense_infonce(*args, temperature=t, image_id=jnp.asarray(ids),
                        cell=jnp.asarray(cell, jnp.float32), neighbor_radius=1.0)
    allowed = {0: [0, 2], 1: [1, 2], 2: [0, 1, 2]}
    want = _np_infonce(f1, f2, allowed, t)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    one, other = _np_infonce(f1, f2, allowed, t, directions=True)
    assert abs(one - other) > 0.03                  # a one-direction loss is off by > 0.015
    plain = dense_infonce(*args, temperature=t)
    everyone = {r: [0, 1, 2] for r in range(3)}
    np.testing.assert_allclose(float(plain), _np_infonce(f1, f2, everyone, t), rtol=1e-5)
    assert abs(want - float(plain)) > 0.05          # the exclusion matters here


def test_pretrain_loss_gathers_the_sampled_cells_and_weights_the_terms():
    """Two images of 2 x 2 feature cells: the dense term pairs fmap1[b, idx1[b, k]] with
    fmap2[b, idx2[b, k]] (flat cells, gathered by hand below), the global term is the
    InfoNCE of the normalised mean features, total = 0.75 dense + 0.25 global; pos_cos /
    neg_cos are the mean cosine of the valid pairs / of valid cells of different images."""
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    fmap1 = unit(rng.normal(size=(2, 2, 2, 3)))
    fmap2 = unit(fmap1 + 0.5 * rng.normal(size=(2, 2, 2, 3)))
    batch = {"idx1": np.array([[0, 3], [1, 2]], np.int32),
             "idx2": np.array([[2, 1], [3, 0]], np.int32),
             "valid": np.array([[True, True], [True, False]]),
             "cell": np.array([[[0, 0], [1, 1]], [[0, 1], [1, 0]]], np.float32)}
    cfg = pretrain.PretrainConfig(temperature=0.2, neighbor_radius=1.0, global_weight=0.25)
    total, m = jax.jit(pretrain.pretrain_loss, static_argnums=3)(
        jnp.asarray(fmap1, jnp.float32), jnp.asarray(fmap2, jnp.float32),
        {k: jnp.asarray(v) for k, v in batch.items()}, cfg)
    flat1, flat2 = fmap1.reshape(2, 4, 3), fmap2.reshape(2, 4, 3)
    # rows: (image 0, cell (0,0)), (image 0, cell (1,1)), (image 1, cell (0,1)), padding
    f1 = np.stack([flat1[0, 0], flat1[0, 3], flat1[1, 1], flat1[1, 2]])
    f2 = np.stack([flat2[0, 2], flat2[0, 1], flat2[1, 3], flat2[1, 0]])
    # (0,0) and (1,1) are sqrt 2 apart (> radius 1): no exclusion
    dense = _np_infonce(f1, f2, {r: [0, 1, 2] for r in range(3)}, 0.2)
    g1, g2 = unit(fmap1.mean((1, 2))), unit(fmap2.mean((1, 2)))
    glob = _np_infonce(g1, g2, {0: [0, 1], 1: [0, 1]}, 0.2)
    np.testing.assert_allclose(float(m["dense"]), dense, rtol=1e-5)
    np.testing.assert_allclose(float(m["global"]), glob, rtol=1e-5)
    np.testing.assert_allclose(float(total), 0.75 * dense + 0.25 * glob, rtol=1e-5)
    cos = f1 @ f2.T
    np.testing.assert_allclose(float(m["pos_cos"]), np.mean(np.diag(cos)[:3]), rtol=1e-5)
    other = [cos[0, 2], cos[1, 2], cos[2, 0], cos[2, 1]]
    np.testing.assert_allclose(float(m["neg_cos"]), np.mean(other), rtol=1e-5)
