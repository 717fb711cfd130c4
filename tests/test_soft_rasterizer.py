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
    return R.soft_rasterize(sv, faces, (H, W), attrs, R.SoftSettings(sigma=sigma, top_k=TOP_K))


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
            out = R.soft_rasterize(_screen(verts, pose), faces, (H, W),
                                   settings=R.SoftSettings(sigma=0.3, top_k=TOP_K))
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
            out = R.soft_rasterize(sv, faces, (H, W), v64, R.SoftSettings(sigma=0.5, top_k=TOP_K))
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
            out = R.soft_rasterize(sv, faces, (16, 16), attrs,
                                   R.SoftSettings(sigma=0.5, top_k=TOP_K))
            return jnp.sum(out.silhouette) + jnp.sum(out.attrs), out
        return jax.grad(loss, has_aux=True)(sv)

    g, out = run(sv)
    assert set(np.unique(np.asarray(out.face_ids)).tolist()) == {-1, 3}
    assert np.all(np.isfinite(out.silhouette)) and np.all(np.isfinite(out.attrs))
    assert np.all(np.isfinite(g))


# --------------------------------------------------------------------------- closed-form oracle

TRI_A = np.array([[3.2, 2.7], [13.1, 4.3], [5.4, 13.6]])          # the small, near triangle
TRI_B = np.array([[1.3, 1.1], [15.2, 1.6], [2.1, 15.4]])          # the big, far one behind it


def _numpy_coverage(tri, sigma):
    """SoftRas coverage ``sigmoid(+-d^2 / sigma)`` of one triangle at the 16 x 16 pixel
    centres, in float64 numpy: ``d`` is the brute-force minimum over the three edges
    of the distance to the segment (the closest point clamped to the segment's ends),
    the sign + inside (all edge cross products of one sign), - outside."""
    px, py = np.meshgrid(np.arange(16) + 0.5, np.arange(16) + 0.5)
    d2 = np.full(px.shape, np.inf)
    cross = []
    for i in range(3):
        (ax, ay), (bx, by) = tri[i], tri[(i + 1) % 3]
        t = np.clip(((px - ax) * (bx - ax) + (py - ay) * (by - ay))
                    / ((bx - ax) ** 2 + (by - ay) ** 2), 0.0, 1.0)
        d2 = np.minimum(d2, (px - ax - t * (bx - ax)) ** 2 + (py - ay - t * (by - ay)) ** 2)
        cross.append((bx - ax) * (py - ay) - (by - ay) * (px - ax))
    inside = np.all(np.stack(cross) >= 0, 0) | np.all(np.stack(cross) <= 0, 0)
    return 1.0 / (1.0 + np.exp(-np.where(inside, d2, -d2) / sigma))


@jax.jit
def _soft_pair(sv, attrs):
    faces = np.array([[0, 1, 2], [3, 4, 5]], np.int32)
    return R.soft_rasterize(sv, faces, (16, 16), attrs,
                            R.SoftSettings(sigma=0.5, gamma=0.05, top_k=TOP_K))


def test_silhouette_and_depth_blend_match_the_closed_form():
    """Two flat triangles of constant depth (A at z = 2 in front of the larger B at
    z = 4) against the SoftRas formulas evaluated in numpy at every pixel:

    * A alone (B collapsed to a point, never a candidate): silhouette = D_A;
    * both: silhouette = 1 - (1 - D_A)(1 - D_B), and with per-face constant
      attributes A = (1, 0), B = (0, 1) the blended attributes are the weights
      ``w_j = D_j exp(zn_j / gamma) / (sum_i D_i exp(zn_i / gamma) + exp(eps / gamma))``
      with ``zn = (zfar - z) / (zfar - znear)`` (larger = nearer).

    Pixels that are not candidates have ``D < dist_eps = 1e-4`` in the formula, so
    the silhouettes must agree within 2e-4 everywhere (the weights: see below). The blur (sigma 0.5 px^2, radius ~2 px)
    puts pixels beyond A's corners inside the candidate region, where only the
    distance to the segment's end point (not to the edge's line) is right; the
    temperature (gamma 0.05) makes the far face's weight a sizeable fraction.
    """
    sigma, gamma, znear, zfar, eps = 0.5, 0.05, 1.0, 100.0, 1e-3
    d_a, d_b = _numpy_coverage(TRI_A, sigma), _numpy_coverage(TRI_B, sigma)
    attrs = jnp.asarray([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3, jnp.float32)
    a3 = np.concatenate([TRI_A, np.full((3, 1), 2.0)], 1)
    b3 = np.concatenate([TRI_B, np.full((3, 1), 4.0)], 1)
    alone = _soft_pair(jnp.asarray(np.concatenate([a3, np.tile([[30.0, 30.0, 4.0]], (3, 1))])[None],
                                   jnp.float32), attrs)
    np.testing.assert_allclose(np.asarray(alone.silhouette[0]), d_a, atol=2e-4)
    assert (d_a > 0.5).sum() > 30 and ((d_a > 0.01) & (d_a < 0.5)).sum() > 20
    both = _soft_pair(jnp.asarray(np.concatenate([a3, b3])[None], jnp.float32), attrs)
    np.testing.assert_allclose(np.asarray(both.silhouette[0]), 1 - (1 - d_a) * (1 - d_b), atol=2e-4)
    logits = np.stack([np.log(np.maximum(d_a, 1e-300)) + (zfar - 2.0) / (zfar - znear) / gamma,
                       np.log(np.maximum(d_b, 1e-300)) + (zfar - 4.0) / (zfar - znear) / gamma,
                       np.full(d_a.shape, eps / gamma)])
    w = np.exp(logits - logits.max(0))
    w = w / w.sum(0)
    # The weights are normalised, so a face that is not a candidate (D < dist_eps)
    # still has a share in the formula next to another tiny D: compare where each
    # face is either surely a candidate (D > dist_eps) or negligible (D < 1e-7)
    # and at least one is a candidate.
    d = np.stack([d_a, d_b])
    sure = np.all((d > 1e-4) | (d < 1e-7), 0) & np.any(d > 1e-4, 0)
    assert sure.sum() > 150
    np.testing.assert_allclose(np.asarray(both.attrs[0])[sure], np.moveaxis(w[:2], 0, -1)[sure],
                               atol=2e-4)
    # well inside both: w_A / w_B = exp((zn_A - zn_B) / gamma) = exp(2 / 99 / 0.05) = 1.50,
    # so the near face gets 0.60 and the far one 0.40 of the attributes
    deep = (d_a > 0.99) & (d_b > 0.99)
    assert deep.sum() >= 5
    np.testing.assert_allclose(np.asarray(both.attrs[0])[deep], [[0.6, 0.4]] * deep.sum(), atol=5e-3)
