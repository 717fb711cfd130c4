"""NVSM matching scores against the poster's formula written as explicit loops."""

import numpy as np
import pytest

from nvsm_jax import matching, parallel


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
