"""CoKe loss against a plain-numpy, loop-by-loop computation."""

import numpy as np

from nvsm_jax import losses


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _coke_by_hand(f, vis, xy, mem, clu, cf, T, r, w, reg_w):
    B, V, _ = f.shape
    terms = []
    for b in range(B):
        for i in range(V):
            if not vis[b, i]:
                continue
            logits = []
            for j in range(V):
                d = np.hypot(*(xy[b, i] - xy[b, j]))
                if j != i and d <= r:
                    continue          # a neighbour: not a negative
                logits.append(np.dot(f[b, i], mem[j]) / T)
            for k in range(len(clu)):
                logits.append(np.dot(f[b, i], clu[k]) / T + np.log(w))
            target = np.dot(f[b, i], mem[i]) / T
            m = max(logits)
            lse = m + np.log(sum(np.exp(l - m) for l in logits))
            terms.append(lse - target)
    reg = reg_w * np.mean([[np.dot(cf[b, m_], mem[v]) for v in range(V)]
                           for b in range(B) for m_ in range(cf.shape[1])])
    return np.mean(terms), reg


def test_coke_matches_hand_computation_with_neighbours_and_invisible():
    rng = np.random.default_rng(0)
    B, V, D, K, M = 2, 5, 4, 3, 2
    f = _unit(rng.normal(size=(B, V, D)))
    mem = _unit(rng.normal(size=(V, D)))
    clu = _unit(rng.normal(size=(K, D)))
    cf = _unit(rng.normal(size=(B, M, D)))
    vis = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], bool)
    # vertices 0,1 close (neighbours), 3,4 close in image 0; spread in image 1
    xy = np.array([[[0, 0], [3, 0], [20, 0], [40, 0], [40, 4]],
                   [[0, 0], [10, 0], [20, 0], [30, 0], [30.5, 0]]], np.float64)
    T, r, w, reg_w = 0.07, 5.0, 0.005, 0.1
    ce, reg = _coke_by_hand(f, vis, xy, mem, clu, cf, T, r, w, reg_w)
    out = losses.coke_loss(f.astype(np.float32), vis, xy.astype(np.float32),
                           mem.astype(np.float32), clu.astype(np.float32),
                           cf.astype(np.float32), temperature=T, neighbor_radius=r,
                           clutter_weight=w, reg_weight=reg_w)
    np.testing.assert_allclose(float(out.contrastive), ce, rtol=1e-4)
    np.testing.assert_allclose(float(out.reg), reg, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(out.total), ce + reg, rtol=1e-4)


def test_neighbour_mask_and_gradient_only_from_visible():
    import jax
    import jax.numpy as jnp
    xy = jnp.array([[[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]]])
    m = np.asarray(losses.neighbor_mask(xy, 2.0))[0]
    np.testing.assert_array_equal(m, [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    rng = np.random.default_rng(1)
    f = jnp.asarray(_unit(rng.normal(size=(1, 3, 4))), jnp.float32)
    mem = jnp.asarray(_unit(rng.normal(size=(3, 4))), jnp.float32)
    clu = jnp.asarray(_unit(rng.normal(size=(2, 4))), jnp.float32)
    vis = jnp.array([[True, False, True]])
    g = jax.grad(lambda f: losses.coke_loss(f, vis, xy, mem, clu).total)(f)
    assert np.all(np.asarray(g[0, 1]) == 0)         # invisible vertex: no gradient
    assert np.all(np.isfinite(np.asarray(g)))
    # no visible vertex at all: a finite zero loss
    out = losses.coke_loss(f, jnp.zeros((1, 3), bool), xy, mem, clu)
    assert float(out.contrastive) == 0.0


def test_anchor_subsample_equals_full_loss_when_it_covers_every_vertex():
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(2)
    B, V, D = 2, 6, 4
    f = jnp.asarray(_unit(rng.normal(size=(B, V, D))), jnp.float32)
    mem = jnp.asarray(_unit(rng.normal(size=(V, D))), jnp.float32)
    clu = jnp.asarray(_unit(rng.normal(size=(3, D))), jnp.float32)
    xy = jnp.asarray(rng.uniform(0, 20, size=(B, V, 2)), jnp.float32)
    vis = jnp.asarray(rng.random((B, V)) < 0.6)
    full = losses.coke_loss(f, vis, xy, mem, clu, neighbor_radius=6.0)
    perm = jnp.asarray(np.stack([rng.permutation(V) for _ in range(B)]), jnp.int32)
    sub = losses.coke_loss(f, vis, xy, mem, clu, anchors=perm, neighbor_radius=6.0)
    np.testing.assert_allclose(float(sub.total), float(full.total), rtol=1e-5)
    a = np.asarray(losses.sample_anchors(jax.random.key(0), vis, 2))
    assert all(np.asarray(vis)[b, a[b]].all() for b in range(B) if np.asarray(vis)[b].sum() >= 2)
