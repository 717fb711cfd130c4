"""Render-and-compare through the rasteriser: refinement and the initial grid search."""

import jax.numpy as jnp
import numpy as np
import pytest

from nvsm_jax import geometry, meshes
from nvsm_jax import pose_solver as ps
import rasterizer

MESH = meshes.cuboid_mesh([-0.8, -1.6, -0.6], [0.8, 1.6, 0.6], 500)


def _observed(pose, hw, focal, dim=32, seed=0):
    """A feature map rendered at ``pose`` from random unit per-vertex features."""
    rng = np.random.default_rng(seed)
    mem = rng.normal(size=(len(MESH.verts), dim))
    mem = jnp.asarray(mem / np.linalg.norm(mem, axis=-1, keepdims=True), jnp.float32)
    principal = jnp.array([hw[1] / 2, hw[0] / 2])
    scr = geometry.project_to_screen(jnp.asarray(MESH.verts), jnp.asarray(pose), focal, principal)
    fr = rasterizer.rasterize(scr, jnp.asarray(MESH.faces), hw)
    fm = rasterizer.interpolate(fr, jnp.asarray(MESH.faces), mem)
    bg = jnp.asarray(rng.normal(size=hw + (dim,)), jnp.float32)
    fm = jnp.where((fr.face_id >= 0)[..., None], fm, bg)
    fm = fm / jnp.linalg.norm(fm, axis=-1, keepdims=True)
    clutter = jnp.asarray(rng.normal(size=dim), jnp.float32)
    return fm, mem, clutter, fr, principal


def test_folded_score_equals_rendered_feature_dot_product():
    pose = np.array([0.7, 0.3, 0.1, 5.0], np.float32)
    fm, mem, _, fr, _ = _observed(pose, (24, 24), 30.0, dim=8)
    table = ps.score_table(mem, fm)
    got = ps.fold_scores(fr, MESH.faces, table)
    want = jnp.sum(rasterizer.interpolate(fr, jnp.asarray(MESH.faces), mem) * fm, -1)
    want = jnp.where(fr.face_id >= 0, want, 0.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_refinement_recovers_a_perturbed_pose_within_one_degree():
    gt = np.array([0.7, 0.3, 0.1, 5.0], np.float32)
    hw, focal = (48, 48), 60.0
    fm, mem, clutter, _, principal = _observed(gt, hw, focal)
    init = gt + np.radians([3.5, -3.0, 2.5, 0.0]).astype(np.float32)
    init[3] = 5.0
    cfg = ps.SolverConfig(steps=40, decay_every=20)
    poses, losses, trace = ps.refine(fm[None], mem, clutter, MESH.verts, MESH.faces,
                                     jnp.array([focal]), principal[None], init[None, None], cfg)
    before = np.degrees(geometry.pose_error(init, gt))
    after = np.degrees(geometry.pose_error(np.asarray(poses[0, 0]), gt))
    assert before > 4.0 and after < 1.0, (before, after)
    assert float(losses[0, 0]) < float(trace[0, 0, 0])
    assert np.all(np.isfinite(np.asarray(trace)))


def test_grid_search_finds_the_coarse_pose():
    cfg = ps.SolverConfig(steps=0)
    grid = cfg.grid()
    target = 67                                     # azimuth 150 deg, elevation 30, theta 0
    gt = grid[target] + np.radians([4.0, -3.0, 2.0, 0.0]).astype(np.float32)
    hw, focal = (32, 32), 40.0
    fm, mem, clutter, _, principal = _observed(gt, hw, focal, seed=1)
    res = ps.solve(fm[None], mem, clutter, MESH.verts, MESH.faces, jnp.array([focal]),
                   principal[None], stride=1, cfg=cfg)
    nearest = np.argmin(geometry.pose_error(grid, gt[None]))
    assert nearest == target
    assert int(np.argmin(res.grid_losses[0])) == target
    np.testing.assert_allclose(res.pose[0], grid[target])
    assert res.grid_losses.shape == (1, 144) and np.isfinite(res.score).all()
