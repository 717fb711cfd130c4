"""Vertex sampling, visibility/weights, memory momentum and the clutter ring, by hand."""

import jax
import jax.numpy as jnp
import numpy as np

from nvsm_jax.nemo import features as feat
from nvsm_jax import geometry, meshes


def test_bilinear_sample_matches_hand_computation():
    rng = np.random.default_rng(0)
    fm = rng.normal(size=(4, 5, 3)).astype(np.float32)
    pts = np.array([[0.5, 0.5], [1.25, 2.75], [4.5, 3.5], [3.0, 1.0], [2.2, 0.9]], np.float32)
    out, inside = feat.bilinear_sample(jnp.asarray(fm), jnp.asarray(pts))
    for (x, y), got in zip(pts, np.asarray(out)):
        u, v = x - 0.5, y - 0.5                     # pixel centres at +0.5
        c0, r0 = int(np.floor(u)), int(np.floor(v))
        fu, fv = u - c0, v - r0
        c1, r1 = min(c0 + 1, 4), min(r0 + 1, 3)
        want = ((1 - fu) * (1 - fv) * fm[r0, c0] + fu * (1 - fv) * fm[r0, c1]
                + (1 - fu) * fv * fm[r1, c0] + fu * fv * fm[r1, c1])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(inside))
    _, inside = feat.bilinear_sample(jnp.asarray(fm), jnp.array([[-1.0, 2.0], [2.0, 9.0]]))
    assert not np.any(np.asarray(inside))


def test_memory_momentum_and_clutter_fifo_by_hand():
    rng = np.random.default_rng(0)
    V, D, B = 3, 4, 2
    mem = rng.normal(size=(V, D))
    mem /= np.linalg.norm(mem, axis=-1, keepdims=True)
    f = rng.normal(size=(B, V, D))
    w = np.array([[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    got = np.asarray(feat.update_vertex_memory(jnp.asarray(mem), jnp.asarray(f), jnp.asarray(w), 0.9))
    for v in range(V):
        m = 0.9 * mem[v] + 0.1 * np.mean([f[b, v] * w[b, v] for b in range(B)], axis=0)
        np.testing.assert_allclose(got[v], m / np.linalg.norm(m), rtol=1e-5)
    np.testing.assert_allclose(got[1], mem[1], rtol=1e-5)       # never seen: unchanged

    bank = feat.MemoryBank(jnp.zeros((V, D)), jnp.zeros((5, 1)), jnp.zeros((), jnp.int32))
    bank = feat.enqueue_clutter(bank, jnp.array([[1.0], [2.0], [3.0]]))
    bank = feat.enqueue_clutter(bank, jnp.array([[4.0], [5.0], [6.0]]))
    np.testing.assert_array_equal(np.asarray(bank.clutter)[:, 0], [6, 2, 3, 4, 5])
    assert int(bank.clutter_ptr) == 1


def test_sample_clutter_avoids_the_object():
    fm = jnp.arange(2 * 6 * 6, dtype=jnp.float32).reshape(2, 6, 6, 1)
    mask = np.zeros((2, 6, 6), bool)
    mask[:, 1:4, 1:4] = True                      # dilated by 1: rows/cols 0..4 excluded
    out = np.asarray(feat.sample_clutter(jax.random.key(0), fm, jnp.asarray(mask), 5))
    for b in range(2):
        idx = out[b, :, 0].astype(int) - b * 36
        r, c = idx // 6, idx % 6
        assert len(set(idx)) == 5
        assert np.all((r == 5) | (c == 5))


def test_vertex_features_visibility_and_weights():
    object_mesh = meshes.cuboid_mesh([-1, -1, -1], [1, 1, 1], 300)
    normals = meshes.vertex_normals(object_mesh.verts, object_mesh.faces)
    pose = jnp.array([[0.0, 0.0, 0.0, 6.0]])      # camera on -y: sees the y = -1 side
    h = w = 16
    stride = 4
    focal = jnp.array([120.0])
    principal = jnp.array([[32.0, 32.0]])
    fm = jax.random.normal(jax.random.key(0), (1, h, w, 8))
    vf = feat.vertex_features(fm, object_mesh.verts, object_mesh.faces, normals, pose, focal, principal,
                              stride=stride, render_stride=1)
    vis = np.asarray(vf.visible[0])
    front = np.isclose(normals[:, 1], -1)
    back = np.isclose(normals[:, 1], 1)
    assert vis[front].mean() > 0.95 and not vis[back].any()
    # weights = visible * |n . view| ~ 1 on the front face, 0 where hidden
    wts = np.asarray(vf.weights[0])
    assert np.all(wts[front & vis] > 0.9) and np.all(wts[~vis] == 0)
    # samples = bilinear reading at the projections / stride
    xy = np.asarray(geometry.project_to_screen(jnp.asarray(object_mesh.verts), pose[0], focal[0],
                                               principal[0])[:, :2])
    np.testing.assert_allclose(np.asarray(vf.xy[0]), xy, atol=1e-3)
    want, _ = feat.bilinear_sample(fm[0], jnp.asarray(xy) / stride)
    np.testing.assert_allclose(np.asarray(vf.features[0]), np.asarray(want), atol=1e-5)
    assert vf.silhouette.shape == (1, h, w) and bool(vf.silhouette[0, 8, 8])


def test_clutter_prototype_is_the_normalised_mean_row_by_hand():
    """NeMo's clutter model is the unit mean of the bank's rows: rows (2,0,0), (0,4,0),
    (1,2,0), (1,2,4) average to (1,2,1), which normalises to (1,2,1)/sqrt(6)."""
    bank = jnp.array([[2.0, 0, 0], [0, 4, 0], [1, 2, 0], [1, 2, 4]])
    got = np.asarray(feat.clutter_prototype(bank))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, np.array([1.0, 2.0, 1.0]) / np.sqrt(6.0), rtol=1e-6)
