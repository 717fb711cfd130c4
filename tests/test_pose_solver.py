"""Render-and-compare through the rasteriser: refinement and the initial grid search."""

import jax
import jax.numpy as jnp
import numpy as np

from nvsm_jax import geometry, meshes
from nvsm_jax.nemo import pose_solver as ps
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


def test_nemo_loss_and_clutter_scores_by_hand():
    """NeMo's objective on a 2 x 2 map (4 pixels), computed by hand.

    Clutter scores are cosines: F = (3,4), (0,-2), (1,0), (-1,-1) against the clutter
    direction (5, 0) (not unit) give 0.6, 0, 1, -1/sqrt 2.
    For object scores s_obj and clutter scores s_cl = (0.1, 0.3, 0.5, -0.2):
    pose A, s_obj = (0.9, 0, 0.2, 0): max = (0.9, 0.3, 0.5, 0), mean 0.425; mean s_cl
    0.175; L = 1 - (0.425 - 0.175) = 0.75. Pose B renders nothing (s_obj = 0):
    max = (0.1, 0.3, 0.5, 0), mean 0.225, L = 1 - 0.05 = 0.95. Without the clutter
    term in the max, A would score 1 - (0.275 - 0.175) = 0.9; without the subtracted
    clutter mean, 0.575.
    """
    fm = jnp.array([[[3.0, 4.0], [0.0, -2.0]], [[1.0, 0.0], [-1.0, -1.0]]])
    np.testing.assert_allclose(np.asarray(ps.clutter_scores(fm, jnp.array([5.0, 0.0]))),
                               [0.6, 0.0, 1.0, -np.sqrt(0.5)], atol=1e-6)
    s_obj = jnp.array([[0.9, 0.0, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])
    s_cl = jnp.array([0.1, 0.3, 0.5, -0.2])
    np.testing.assert_allclose(np.asarray(ps.nemo_loss(s_obj, s_cl)), [0.75, 0.95], atol=1e-6)


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
                   principal[None], stride=1, solver_cfg=cfg)
    nearest = np.argmin(geometry.pose_error(grid, gt[None]))
    assert nearest == target
    assert int(np.argmin(res.grid_losses[0])) == target
    np.testing.assert_allclose(res.pose[0], grid[target])
    assert res.grid_losses.shape == (1, 144) and np.isfinite(res.score).all()
    # three hypotheses kept, none refined: the lowest-loss one still wins, its score is
    # 1 - its loss (the grid is scored by the same compiled call)
    res3 = ps.solve(fm[None], mem, clutter, MESH.verts, MESH.faces, jnp.array([focal]),
                    principal[None], stride=1, solver_cfg=ps.SolverConfig(steps=0, top_k=3))
    np.testing.assert_allclose(res3.pose[0], grid[target])
    np.testing.assert_allclose(res3.score[0], 1.0 - res.grid_losses[0].min(), rtol=1e-6)
    assert np.sort(res.grid_losses[0])[1] > res.grid_losses[0].min()   # a real choice


# ------------------------------------------------------------------ batched solver vs oracles


def _per_image_refine_oracle(fms, mem, clutter, focal, principal, init, cfg):
    """The solver before issue 12: ``vmap`` over images and hypotheses of a per-pose
    ``value_and_grad`` + Adam scan (an independent code path for the same math)."""
    import optax
    verts, faces = jnp.asarray(MESH.verts), jnp.asarray(MESH.faces)
    hw = fms.shape[1:3]
    tx = ps._optimizer(cfg)

    def one_image(fm, f, c, poses):
        table, s_cl = ps.score_table(mem, fm), ps.clutter_scores(fm, clutter)

        def loss_fn(p):
            return ps.pose_objective(p, verts, faces, f, c, table, s_cl, hw)

        def one_hyp(p0):
            def body(carry, _):
                p, opt = carry
                loss, g = jax.value_and_grad(loss_fn)(p)
                g = jnp.where(jnp.isfinite(g), g, 0.0)
                upd, opt = tx.update(g, opt, p)
                return (optax.apply_updates(p, upd), opt), loss
            (p, _), trace = jax.lax.scan(body, (p0, tx.init(p0)), None, length=cfg.steps)
            return p, loss_fn(p), trace

        return jax.vmap(one_hyp)(poses)

    return jax.jit(jax.vmap(one_image))(fms, focal, principal, init)


_objective = jax.jit(ps.pose_objective, static_argnums=7)     # the per-image oracle, compiled once


def _two_images(hw=(24, 24)):
    """Two observed maps from different poses and different cameras."""
    gts = [np.array([0.7, 0.3, 0.1, 5.0], np.float32), np.array([2.4, 0.5, -0.1, 5.0], np.float32)]
    focals = [30.0, 26.0]
    fms, principals = [], []
    for i, (gt, f) in enumerate(zip(gts, focals)):
        fm, mem, clutter, _, principal = _observed(gt, hw, f, seed=0)
        fms.append(fm)
        principals.append(principal + jnp.array([0.5 * i, -0.25 * i]))
    return (jnp.stack(fms), mem, clutter, jnp.array(focals), jnp.stack(principals),
            np.stack(gts))


def test_batch_objective_equals_the_per_image_objective():
    fms, mem, clutter, focal, principal, gts = _two_images()
    rng = np.random.default_rng(3)
    poses = (gts[:, None] + rng.normal(0, 0.1, (2, 3, 4))).astype(np.float32)     # [B, K, 4]
    tables = jnp.stack([ps.score_table(mem, fm) for fm in fms])
    s_cl = jnp.stack([ps.clutter_scores(fm, clutter) for fm in fms])
    got = ps.batch_objective(jnp.asarray(poses), jnp.asarray(MESH.verts), jnp.asarray(MESH.faces),
                             focal, principal, tables, s_cl, fms.shape[1:3])
    want = np.stack([_objective(jnp.asarray(poses[b]), jnp.asarray(MESH.verts),
                                       jnp.asarray(MESH.faces), focal[b], principal[b],
                                       tables[b], s_cl[b], fms.shape[1:3]) for b in range(2)])
    assert got.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    assert np.ptp(want) > 1e-2                       # the poses really differ


def test_batched_refinement_matches_the_per_image_oracle():
    fms, mem, clutter, focal, principal, gts = _two_images()
    offsets = np.radians([[3.0, -2.5, 2.0, 0.0], [-2.0, 3.0, -1.5, 0.0]]).astype(np.float32)
    init = (gts[:, None] + offsets[None]).astype(np.float32)                        # [2, 2, 4]
    cfg = ps.SolverConfig(steps=6, decay_every=3)
    poses, losses, trace = ps.refine(fms, mem, clutter, MESH.verts, MESH.faces, focal, principal,
                                     init, cfg)
    want_p, want_l, want_t = _per_image_refine_oracle(fms, mem, clutter, focal, principal,
                                                      jnp.asarray(init), cfg)
    assert poses.shape == (2, 2, 4) and losses.shape == (2, 2) and trace.shape == (2, 2, 6)
    np.testing.assert_allclose(np.asarray(trace), np.asarray(want_t), atol=1e-5)
    np.testing.assert_allclose(np.asarray(losses), np.asarray(want_l), atol=1e-5)
    np.testing.assert_allclose(np.asarray(poses), np.asarray(want_p), atol=1e-4)
    assert np.abs(np.asarray(poses) - init).max() > 1e-2          # it moved


def test_grid_losses_shared_and_per_image_cameras_match_the_objective():
    fms, mem, clutter, focal, principal, _ = _two_images(hw=(16, 16))
    grid = ps.SolverConfig().grid()[::9]                                            # 16 poses
    verts, faces = jnp.asarray(MESH.verts), jnp.asarray(MESH.faces)

    def oracle(f, c):
        return np.stack([_objective(jnp.asarray(grid), verts, faces, f[b], c[b],
                                           ps.score_table(mem, fms[b]),
                                           ps.clutter_scores(fms[b], clutter), (16, 16))
                         for b in range(2)])

    # per-image cameras (the lax.map path)
    got = ps.grid_losses(fms, mem, clutter, MESH.verts, MESH.faces, focal, principal, grid)
    np.testing.assert_allclose(np.asarray(got), oracle(focal, principal), atol=1e-6)
    # one shared camera: the grid is rendered once for the batch
    f1, c1 = jnp.full(2, 28.0), jnp.broadcast_to(principal[:1], (2, 2))
    assert ps._shared_camera(f1, c1) is not None and ps._shared_camera(focal, principal) is None
    got1 = ps.grid_losses(fms, mem, clutter, MESH.verts, MESH.faces, f1, c1, grid)
    np.testing.assert_allclose(np.asarray(got1), oracle(f1, c1), atol=1e-6)
    # back-face culling is exact on this closed mesh
    culled = ps.grid_losses(fms, mem, clutter, MESH.verts, MESH.faces, f1, c1, grid,
                            cull_backfaces=True)
    np.testing.assert_allclose(np.asarray(culled), np.asarray(got1), atol=1e-6)


def test_reference_setting_is_nemos():
    r = ps.REFERENCE
    assert (r.steps, r.lr, r.b1, r.b2, r.decay_every, r.decay_factor, r.top_k) == \
        (300, 0.05, 0.4, 0.6, 100, 0.2, 1)
    assert r.grid().shape == (144, 4) and r.refine_distance and not r.cull_backfaces


def test_solver_config_from_config_refuses_unknown_keys_and_reads_every_shipped_config():
    import pytest

    from experiments.configs import nemo as nemo_config
    from experiments.configs import nvsm as nvsm_config

    for name, get, variants in (("nemo", nemo_config.get_config, ("default", "tiny")),
                                ("nvsm", nvsm_config.get_config, ("demo", "paper", "tiny"))):
        for v in variants:
            block = get(v).solver.to_dict()
            cfg = ps.SolverConfig.from_config(block)
            assert cfg.steps == block["steps"] and cfg.thetas == tuple(block["thetas"]), (name, v)
    block = nemo_config.get_config("tiny").solver.to_dict()
    with pytest.raises(ValueError, match=r"num_azimuths.*known: num_azimuth, "):
        ps.SolverConfig.from_config({**block, "num_azimuths": 8})
    assert ps.SolverConfig().distance == geometry.NEMO_DISTANCE     # the settings module has no jax
