"""Report figures: each writes a readable PNG; the PCA colours are consistent."""

import numpy as np
from PIL import Image

from nvsm_jax import figures, geometry, meshes


def _png(path, min_wh=(200, 150)):
    img = Image.open(path)
    assert img.format == "PNG"
    w, h = img.size
    assert w >= min_wh[0] and h >= min_wh[1], img.size
    arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 5          # not blank
    return img.size


def test_plot_rounds(tmp_path):
    rounds = [dict(round=r, num_pseudo=n, precision=p, coverage=c, test_acc_pi_6=t)
              for r, n, p, c, t in [(0, 40, 0.9, 0.3, None), (1, 85, 0.85, 0.55, 61.0),
                                    (2, 120, 0.78, 0.8, 66.5)]]
    path = figures.plot_rounds(rounds, tmp_path / "rounds.png")
    assert path.endswith("rounds.png")
    w, h = _png(path, (800, 300))
    assert w > h


def test_plot_coverage(tmp_path):
    rng = np.random.default_rng(0)
    lab = np.stack([rng.uniform(0, 2 * np.pi, 7), rng.uniform(-0.2, 0.6, 7),
                    np.zeros(7), np.full(7, 5.0)], 1)
    m = 150
    pse = np.stack([rng.uniform(0, 2 * np.pi, m), rng.uniform(-0.3, 0.8, m),
                    np.zeros(m), np.full(m, 5.0)], 1)
    err = np.abs(rng.normal(0, 0.5, m))
    err[:5] = np.nan
    rounds = rng.integers(0, 3, m)
    _png(figures.plot_coverage(lab, pse, err, rounds, tmp_path / "cov.png"), (900, 250))
    # no pseudo-labels at all still draws the labelled set
    _png(figures.plot_coverage(lab, np.zeros((0, 4)), np.zeros(0), np.zeros(0, int),
                               tmp_path / "cov0.png"), (300, 250))


def test_feature_pca_rgb_consistent_colours(tmp_path):
    rng = np.random.default_rng(0)
    n, h, w, d = 3, 6, 8, 16
    mesh = meshes.cuboid_mesh([-1.0, -2.0, -0.7], [1.0, 2.0, 0.7], 200)
    v = len(mesh.verts)
    # features: a smooth function of 3 latent values plus noise, memory reuses map features
    basis = rng.normal(size=(3, d))
    lat = rng.normal(size=(n, h, w, 3))
    fmap = lat @ basis + 0.05 * rng.normal(size=(n, h, w, d))
    fmap /= np.linalg.norm(fmap, axis=-1, keepdims=True)
    pick = rng.integers(0, n * h * w, v)
    memory = fmap.reshape(-1, d)[pick]
    images = rng.integers(0, 255, (n, 48, 64, 3), dtype=np.uint8)
    path, map_rgb, vert_rgb = figures.feature_pca_rgb(fmap, memory, mesh.verts, images,
                                                      tmp_path / "pca.png", return_colors=True)
    _png(path, (500, 400))
    assert map_rgb.shape == (n, h, w, 3) and vert_rgb.shape == (v, 3)
    assert map_rgb.min() >= 0 and map_rgb.max() <= 1
    np.testing.assert_allclose(vert_rgb, map_rgb.reshape(-1, 3)[pick], atol=1e-12)
    # the three components span the three latent directions: colours vary
    assert np.all(map_rgb.reshape(-1, 3).std(0) > 0.1)
    pca = figures.fit_pca(fmap)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-8)
    np.testing.assert_allclose(figures.pca_rgb(pca, memory), vert_rgb, atol=1e-12)


def test_draw_poses_and_edges(tmp_path):
    mesh = meshes.cuboid_mesh([-0.8, -1.8, -0.6], [0.8, 1.8, 0.6], 300)
    corners, edges = figures.box_edges(mesh.verts)
    assert corners.shape == (8, 3) and edges.shape == (12, 2)
    lengths = np.linalg.norm(corners[edges[:, 0]] - corners[edges[:, 1]], axis=1)
    np.testing.assert_allclose(np.sort(lengths), np.repeat([1.2, 1.6, 3.6], 4), atol=1e-6)
    e = figures.mesh_edges(mesh.faces)
    assert len(e) > 300 and len(figures.mesh_edges(mesh.faces, max_edges=50)) == 50
    rng = np.random.default_rng(0)
    n, hh, ww = 5, 96, 128
    images = rng.integers(40, 120, (n, hh, ww, 3), dtype=np.uint8)
    gt = geometry.make_pose(rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 0.5, n), 0.0, 5.0,
                            xnp=np)
    pred = gt.copy()
    pred[::2, 0] += np.pi / 2              # three wrong, two right
    focal = np.full(n, 120.0)
    principal = np.tile([[ww / 2, hh / 2]], (n, 1))
    _png(figures.draw_poses(images, pred, gt, mesh.verts, mesh.faces, focal, principal,
                            tmp_path / "poses.png"), (500, 250))
    _png(figures.draw_poses(images[:2], pred[:2], None, mesh.verts, mesh.faces, focal[:2],
                            principal[:2], tmp_path / "poses_nogt.png", outline="edges"),
         (250, 100))
