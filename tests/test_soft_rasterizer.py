"""Soft rasteriser tests: the sharp limit vs the hard rasteriser, candidate
selection, gradients (finite, non-zero at the silhouette, equal to finite
differences in float64) and NaN-freedom near the camera.

All float32 calls share one shape and ``top_k`` (``sigma`` is traced), so
the file compiles the soft rasteriser only a few times.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import trimesh

import rasterizer as R
from nvsm_jax import geometry

H, W = 32, 40
FOCAL = 60.0
PRINCIPAL = jnp.asarray([W / 2.0, H / 2.0])
TOP_K = 6
POSES = jnp.asarray([[0.3, 0.4, 0.1, 3.5], [2.0, -0.2, -0.3, 3.2]], jnp.float32)


def _mesh():
    m = trimesh.creation.icosphere(subdivisions=2, radius=0.7)
    return jnp.asarray(m.vertices, jnp.float32), np.asarray(m.faces, np.int32)


def _screen(verts, pose):
    return geometry.project_to_screen(verts, pose, FOCAL, PRINCIPAL)


@jax.jit
def _soft(sv, faces, attrs, sigma):
    return R.soft_rasterize(sv, faces, (H, W), attrs, sigma=sigma, top_k=TOP_K)


def test_sharp_limit_matches_hard_rasteriser_and_candidates_are_ordered():
    verts, faces = _mesh()
    sv = _screen(verts, POSES)
    hard = R.rasterize(sv, faces, (H, W))
    hard_attrs = np.asarray(R.interpolate(hard, faces, verts))
    soft = _soft(sv, faces, verts, 1e-3)
    assert soft.silhouette.shape == (2, H, W) and soft.attrs.shape == (2, H, W, 3)
    assert soft.face_ids.shape == (2, H, W, TOP_K)
    fg = np.asarray(hard.face_id >= 0)
    # coverage agrees except on a thin band of boundary pixels
    assert ((np.asarray(soft.silhouette) > 0.5) == fg).mean() > 0.98
    # inside, the nearest candidate dominates: attributes ~ hard interpolation
    err = np.abs(np.asarray(soft.attrs) - hard_attrs).max(-1)
    assert np.median(err[fg]) < 1e-3
    # the hard winner is among the candidates wherever it is clearly inside
    inside = fg & (np.asarray(hard.bary).min(-1) > 0.05)
    hit = (np.asarray(soft.face_ids) == np.asarray(hard.face_id)[..., None]).any(-1)
    assert hit[inside].mean() > 0.99

    # With a wide blur, candidates are unique, -1 only as trailing padding, and
    # sorted nearest first by depth at the pixel (within the key's quantisation).
    ids = np.asarray(_soft(sv, faces, verts, 0.3).face_ids)
    valid = ids >= 0
    assert valid[..., 1].mean() > 0.2
    assert np.all(valid[..., 1:] <= valid[..., :-1])
    for row in ids.reshape(-1, TOP_K)[::17]:
        row = row[row >= 0]
        assert len(np.unique(row)) == len(row)


def _edge_weights(fg):
    """1 on pixels next to the hard silhouette boundary, 0 elsewhere."""
    pad = np.pad(fg, ((0, 0), (1, 1), (1, 1)), mode="edge")
    edge = np.zeros_like(fg)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            edge |= pad[:, 1 + dy:1 + dy + fg.shape[1], 1 + dx:1 + dx + fg.shape[2]] != fg
    return jnp.asarray(edge, jnp.float32)


def test_silhouette_gradients_are_finite_and_nonzero_at_the_outline():
    verts, faces = _mesh()
    hard = np.asarray(R.rasterize(_screen(verts, POSES), faces, (H, W)).face_id >= 0)
    edge = _edge_weights(hard)

    @jax.jit
    def grads(pose):
        def silhouette_at_edges(pose):
            out = R.soft_rasterize(_screen(verts, pose), faces, (H, W), sigma=0.3, top_k=TOP_K)
            return jnp.sum(out.silhouette * edge), out.silhouette
        return jax.grad(silhouette_at_edges, has_aux=True)(pose)

    g_edge, sil = grads(POSES)
    assert np.all(np.isfinite(g_edge))
    # moving the camera moves the outline: the edge pixels' coverage responds
    assert np.all(np.abs(g_edge[:, :3]).sum(-1) > 1e-3)
    # and the blur stays local: background 2+ px away from the outline stays empty
    near_outline = np.asarray(_edge_weights(np.asarray(edge, bool)), bool) | np.asarray(edge, bool)
    background = ~hard & ~near_outline
    assert background.sum() > 100 and np.all(np.asarray(sil)[background] < 1e-3)


def test_gradient_matches_finite_differences_float64():
    verts, faces = _mesh()
    with jax.enable_x64(True):
        v64 = jnp.asarray(verts, jnp.float64)
        w = jnp.asarray(np.random.default_rng(0).normal(size=(H, W)), jnp.float64)

        def loss(pose):
            sv = geometry.project_to_screen(v64, pose, FOCAL, PRINCIPAL.astype(jnp.float64))
            out = R.soft_rasterize(sv, faces, (H, W), v64, sigma=0.5, top_k=TOP_K)
            return jnp.sum(out.silhouette * w) + jnp.sum(out.attrs[..., 0] * w)

        pose = jnp.asarray([0.3, 0.4, 0.1, 3.5], jnp.float64)
        vg = jax.jit(jax.value_and_grad(loss))
        g = vg(pose)[1]
        for i in range(4):
            d = jnp.zeros(4, jnp.float64).at[i].set(1.0)
            fd = (vg(pose + 1e-6 * d)[0] - vg(pose - 1e-6 * d)[0]) / 2e-6
            np.testing.assert_allclose(g[i], fd, rtol=2e-3, atol=1e-3)


def test_near_plane_faces_give_no_nan():
    sv = jnp.asarray([[[2, 2, -1], [14, 2, 2], [2, 14, 2],          # crosses z = 0
                       [1, 1, 1e-3], [15, 1, 1e-3], [1, 15, 1e-3],  # at the near plane
                       [0, 0, 1], [16, 16, 1], [8, 8, 1],           # edge-on
                       [0, 0, 5], [16, 0, 5], [0, 16, 5]]], jnp.float32)
    faces = np.arange(12, dtype=np.int32).reshape(4, 3)
    attrs = jnp.ones((12, 2))

    @jax.jit
    def run(sv):
        def loss(sv):
            out = R.soft_rasterize(sv, faces, (16, 16), attrs, sigma=0.5, top_k=TOP_K)
            return jnp.sum(out.silhouette) + jnp.sum(out.attrs), out
        return jax.grad(loss, has_aux=True)(sv)

    g, out = run(sv)
    assert set(np.unique(np.asarray(out.face_ids)).tolist()) == {-1, 3}
    assert np.all(np.isfinite(out.silhouette)) and np.all(np.isfinite(out.attrs))
    assert np.all(np.isfinite(g))
