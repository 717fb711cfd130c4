"""CoKe loss against a plain-numpy, loop-by-loop computation."""

import numpy as np

from nvsm_jax.nemo import losses


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
                           cf.astype(np.float32), weights=losses.CokeWeights(T, r, w, reg_w))
    np.testing.assert_allclose(float(out.contrastive), ce, rtol=1e-4)
    np.testing.assert_allclose(float(out.reg), reg, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(out.total), ce + reg, rtol=1e-4)


def test_neighbour_mask_and_gradient_only_from_visible():
    import jax
    import jax.numpy as jnp
    xy = jnp.array([[[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]]])
    m = np.asarray(losses.neighbor_mask(xy, 2.0))[0]
    np.testing.assert_array_equal(m, [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    # the sampled vertices' rows (what coke_loss masks) are those rows of the full mask
    np.testing.assert_array_equal(
        np.asarray(losses.neighbor_mask(xy, 2.0, jnp.array([[2, 0, 1, 0]])))[0], m[[2, 0, 1, 0]])
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


def test_vertex_subsample_equals_full_loss_when_it_covers_every_vertex():
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(2)
    B, V, D = 2, 6, 4
    f = jnp.asarray(_unit(rng.normal(size=(B, V, D))), jnp.float32)
    mem = jnp.asarray(_unit(rng.normal(size=(V, D))), jnp.float32)
    clu = jnp.asarray(_unit(rng.normal(size=(3, D))), jnp.float32)
    xy = jnp.asarray(rng.uniform(0, 20, size=(B, V, 2)), jnp.float32)
    vis = jnp.asarray(rng.random((B, V)) < 0.6)
    cfg = losses.CokeWeights(neighbor_radius=6.0)
    full = losses.coke_loss(f, vis, xy, mem, clu, weights=cfg)
    perm = jnp.asarray(np.stack([rng.permutation(V) for _ in range(B)]), jnp.int32)
    sub = losses.coke_loss(f, vis, xy, mem, clu, vertex_ids=perm, weights=cfg)
    np.testing.assert_allclose(float(sub.total), float(full.total), rtol=1e-5)
    a = np.asarray(losses.sample_vertices(jax.random.key(0), vis, 2))
    assert all(np.asarray(vis)[b, a[b]].all() for b in range(B) if np.asarray(vis)[b].sum() >= 2)


def test_coke_gradient_matches_finite_differences_and_the_memories_get_none():
    """The gradient the train step follows, against central differences (float64) of the
    plain-numpy loss ``_coke_by_hand`` above: d total / d features and d total / d clutter
    features agree to 1e-3 relative; the memories are constants (the module docstring:
    they move by momentum only), so their gradients are exactly 0. A stop_gradient added
    on the target logit or on the features, or removed from a memory, fails this."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    B, V, D, K, M = 1, 4, 3, 2, 2
    f = _unit(rng.normal(size=(B, V, D)))
    mem = _unit(rng.normal(size=(V, D)))
    clu = _unit(rng.normal(size=(K, D)))
    cf = _unit(rng.normal(size=(B, M, D)))
    vis = np.array([[1, 1, 0, 1]], bool)
    xy = np.array([[[0, 0], [2, 0], [9, 0], [20, 0]]], np.float64)     # 0, 1 neighbours
    T, r, w, reg_w = 0.5, 3.0, 0.05, 0.3          # a soft softmax: every logit matters

    def by_hand(f_, cf_):
        ce, reg = _coke_by_hand(f_, vis, xy, mem, clu, cf_, T, r, w, reg_w)
        return ce + reg

    def fd(x, fn, eps=1e-6):
        g = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            d = np.zeros_like(x)
            d[i] = eps
            g[i] = (fn(x + d) - fn(x - d)) / (2 * eps)
        return g

    want_f = fd(f, lambda x: by_hand(x, cf))
    want_cf = fd(cf, lambda x: by_hand(f, x))
    assert np.abs(want_f).max() > 0.1 and np.abs(want_cf).max() > 0.02

    def total(f_, mem_, clu_, cf_):
        return losses.coke_loss(f_, jnp.asarray(vis), jnp.asarray(xy, jnp.float32), mem_, clu_,
                                cf_, weights=losses.CokeWeights(T, r, w, reg_w)).total

    args = [jnp.asarray(a, jnp.float32) for a in (f, mem, clu, cf)]
    g_f, g_mem, g_clu, g_cf = jax.grad(total, argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(np.asarray(g_f), want_f, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_cf), want_cf, rtol=1e-3, atol=1e-4)
    assert np.all(np.asarray(g_f)[0, 2] == 0)               # the invisible vertex
    assert np.all(np.asarray(g_mem) == 0) and np.all(np.asarray(g_clu) == 0)
