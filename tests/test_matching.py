"""NVSM matching scores against the poster's formula written as explicit loops."""

import numpy as np
import pytest

from nvsm_jax.nvsm import matching
from nvsm_jax import parallel


def naive_match_scores(syn_feats, syn_mask, image_feats) -> np.ndarray:
    """The oracle: the poster's formula as explicit loops (numpy, float64)."""
    syn_feats, syn_mask, image_feats = (np.asarray(x, np.float64)
                                        for x in (syn_feats, syn_mask, image_feats))
    out = np.zeros((len(syn_feats), len(image_feats)))
    for k in range(len(syn_feats)):
        for n in range(len(image_feats)):
            total, count = 0.0, 0
            for h in range(syn_feats.shape[1]):
                for w in range(syn_feats.shape[2]):
                    if syn_mask[k, h, w] <= 0:
                        continue
                    a, b = syn_feats[k, h, w], image_feats[n, h, w]
                    na, nb = np.linalg.norm(a), np.linalg.norm(b)
                    cos = a @ b / (na * nb) if na > 0 and nb > 0 else 0.0
                    total += 1.0 - (1.0 - cos)
                    count += 1
            out[k, n] = total / count if count else 0.0
    return out


def _data(seed, k=5, n=7, h=4, w=5, d=3):
    rng = np.random.default_rng(seed)
    syn = rng.normal(size=(k, h, w, d)).astype(np.float32)
    img = rng.normal(size=(n, h, w, d)).astype(np.float32)
    mask = rng.uniform(size=(k, h, w)) > 0.4
    mask[-1] = False  # a view with nothing valid scores 0
    return syn, mask, img


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_match_scores_equal_the_naive_loop(chunk):
    syn, mask, img = _data(0)
    want = naive_match_scores(syn, mask, img)
    got = np.asarray(matching.match_scores(syn, mask, img, chunk=chunk))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(got[-1] == 0)


def test_identical_maps_score_one_and_scores_are_bounded():
    syn, mask, _ = _data(1)
    got = np.asarray(matching.match_scores(syn[:-1], mask[:-1], syn[:-1]))
    np.testing.assert_allclose(np.diag(got), 1.0, atol=1e-5)
    assert np.all(np.abs(got) <= 1 + 1e-5)


def test_sharded_over_8_devices_matches_one_device(eight_devices):
    syn, mask, img = _data(2, n=13)  # 13 images: padded to 16 and cut back
    want = np.asarray(matching.match_scores(syn, mask, img))
    for mesh in (parallel.make_mesh(1), parallel.make_mesh(8)):
        got = matching.match_scores_sharded(syn, mask, img, mesh, chunk=2)
        assert got.shape == (5, 13)
        np.testing.assert_allclose(got, want, atol=1e-5)
        # the E-step's path: the pool normalised once, then matched as is
        pre = np.asarray(matching.normalize_images(img))
        np.testing.assert_allclose(np.linalg.norm(pre, axis=-1), 1.0, atol=1e-5)
        got = matching.match_scores_sharded(syn, mask, pre, mesh, chunk=2, normalized=True)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_empty_pool_is_a_clear_error():
    syn, mask, img = _data(3)
    with pytest.raises(ValueError, match="empty pool"):
        matching.match_scores_sharded(syn, mask, img[:0])


def test_each_image_finds_the_view_it_was_made_from():
    """Image n is view perm[n] on that view's valid pixels, each pixel scaled by a
    positive factor (cosine ignores it) plus 2 % noise, and unrelated noise
    elsewhere (masked out, so it must not count). Oracles: the naive loop, and the
    facts that the right view scores near 1, every wrong view near 0 (random
    directions in 8-D), so each image's best view is its own, on both paths (raw
    images, and images normalised once then matched with ``normalized=True``)."""
    rng = np.random.default_rng(4)
    k, h, w, d = 6, 4, 5, 8
    syn = rng.normal(size=(k, h, w, d)).astype(np.float32)
    mask = rng.uniform(size=(k, h, w)) > 0.5
    mask[:, 0, 0] = True                                   # no empty view
    perm = rng.permutation(k)
    img = rng.normal(size=(k, h, w, d))
    for n, v in enumerate(perm):
        scale = rng.uniform(0.3, 3.0, size=(h, w, 1))
        made = syn[v] * scale + 0.02 * scale * rng.normal(size=(h, w, d))
        img[n] = np.where(mask[v][..., None], made, img[n])
    img = img.astype(np.float32)
    want = naive_match_scores(syn, mask, img)
    got = np.asarray(matching.match_scores(syn, mask, img, chunk=4))
    pre = matching.normalize_images(img)
    got_pre = np.asarray(matching.match_scores(syn, mask, pre, normalized=True))
    for g in (got, got_pre):
        np.testing.assert_allclose(g, want, atol=1e-5)
        np.testing.assert_array_equal(np.argmax(g, axis=0), perm)
        right = g[perm, np.arange(k)]
        assert np.all(right > 0.99), right
        wrong = np.where(np.arange(k)[:, None] == perm[None], -np.inf, g)
        assert np.max(wrong) < 0.6, np.max(wrong)
