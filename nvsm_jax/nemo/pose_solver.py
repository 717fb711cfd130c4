"""NeMo render-and-compare pose estimation with feature folding.

Objective (NeMo, with its clutter model), for a pose ``p`` and an observed
unit feature map ``F [h, w, D]``::

    s_obj(px)  = <rendered vertex features at px, F(px)>   (0 off the object)
    s_clut(px) = cos(F(px), clutter)                        (clutter = normalised
                                                             mean of the clutter bank)
    L(p)       = 1 - [ mean_px max(s_obj, s_clut) - mean_px s_clut ]

Feature folding (rasteriser notes, lesson 4): the rendered feature at a pixel is
``sum_k b_k M[v_k]`` so ``s_obj(px) = sum_k b_k S[v_k, px]`` with the score
table ``S = M @ F^T: [V, h*w]`` computed once per image (one matmul). Each
pose then gathers 3 values per pixel: its cost does not depend on ``D``.

Search: every pose of the initial grid (:func:`nvsm_jax.geometry.nemo_pose_grid`,
144 poses) is scored for a batch of images in one jitted call (rendered once
for the batch when all images share one camera); the best ``top_k`` start Adam
refinement of (azimuth, elevation, theta, distance) inside ``lax.scan``. The
hypothesis with the lowest final loss wins; its ``1 - L`` is returned as a
confidence.

Speed (issue 12, WORKSPACE "Pose solver speed"): all B images x K hypotheses
of a step are one flat rasteriser call (:func:`batch_objective`) and one Adam
state ``[B, K, 4]`` (Adam is elementwise, so this is B x K independent
optimisers). ``vmap`` over images, as before, turned the rasteriser's flat
scatters and its pass ``while_loop`` into batched ones plus layout copies and
cost ~10x; now a refinement step costs about one differentiable render per
hypothesis (``solver_efficiency`` in ``benchmarks.pose_solver``).

All intrinsics passed here are for the **feature map** (focal / stride,
principal / stride); :func:`solve` takes input-image intrinsics and a stride.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nvsm_jax import geometry, meshes, parallel
from nvsm_jax.nemo.settings import FAST, REFERENCE, SolverConfig
from rasterizer import interpolate_score, rasterize

__all__ = ["SolverConfig", "FAST", "REFERENCE", "score_table", "clutter_scores", "fold_scores",
           "nemo_loss", "pose_objective", "batch_objective", "grid_losses", "refine", "SolveResult", "solve",
           "solve_batched", "SETTINGS", "settings_for"]



#: The solver settings a trained model can be evaluated with (:func:`settings_for`).
SETTINGS = ("config", "reference", "fast")


def settings_for(run_config, setting: str = "config", top_k: int | None = None) -> SolverConfig:
    """The solver of a trained run: its own ``solver`` block (``"config"``),
    :data:`REFERENCE` or :data:`FAST`; ``top_k`` overrides how many grid poses are
    refined. An unknown setting or ``top_k < 1`` is a ValueError."""
    if setting == "config":
        solver_cfg = SolverConfig.from_config(run_config.solver)
    elif setting in SETTINGS:
        solver_cfg = {"reference": REFERENCE, "fast": FAST}[setting]
    else:
        raise ValueError(f"solver must be one of {SETTINGS}, got {setting!r}")
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        solver_cfg = dataclasses.replace(solver_cfg, top_k=top_k)
    return solver_cfg


def score_table(vertex_memory, feature_map):
    """``S[v, p] = <M_v, F_p>``. vertex_memory: [V, D]; feature_map: [h, w, D] -> [V, h*w]."""
    h, w, d = feature_map.shape
    return jnp.einsum("vd,pd->vp", vertex_memory, feature_map.reshape(h * w, d))


def clutter_scores(feature_map, clutter):
    """``cos(F_p, clutter)``. feature_map: [h, w, D]; clutter: [D] -> [h*w]."""
    h, w, d = feature_map.shape
    f = feature_map.reshape(h * w, d)
    fn = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    return fn @ (clutter / jnp.maximum(jnp.linalg.norm(clutter), 1e-12))


def fold_scores(fragments, faces, table):
    """``sum_k bary_k * table[v_k, pixel]`` (0 off the object).

    fragments: face_id [..., H, W], bary [..., H, W, 3]; table: [V, H*W] -> [..., H, W].
    """
    return interpolate_score(fragments, faces, table)


def nemo_loss(s_obj, s_clutter):
    """NeMo's loss from folded object scores and clutter scores.

    s_obj: [..., h*w] per pose; s_clutter: [..., h*w] broadcastable against it
    (one image's clutter scores) -> [...]: 1 - (mean max(object, clutter) - mean clutter).
    """
    best = jnp.maximum(s_obj, s_clutter)
    return 1.0 - (jnp.mean(best, axis=-1) - jnp.mean(s_clutter, axis=-1))


def pose_objective(pose, verts, faces, focal, principal, table, s_clutter, hw, *,
                   cull_backfaces: bool = False):
    """NeMo's loss L(pose) for one image. pose: [..., 4] -> [...].

    focal: []; principal: [2]; table: [V, h*w]; s_clutter: [h*w]; hw: (h, w).
    All poses are rasterised in one flat call (the rasteriser's fast path).
    """
    screen = geometry.project_to_screen(verts, pose, focal, principal)
    frags = rasterize(screen, faces, image_size=tuple(hw), cull_backfaces=cull_backfaces)
    s_obj = fold_scores(frags, faces, table).reshape(pose.shape[:-1] + (-1,))
    return nemo_loss(s_obj, s_clutter)


def batch_objective(poses, verts, faces, focal, principal, tables, s_clutter, hw, *,
                    cull_backfaces: bool = False):
    """NeMo's loss for every image x hypothesis, rendered in one rasteriser call.

    poses: [B, K, 4]; verts: [V, 3]; faces: [F, 3]; focal: [B]; principal: [B, 2]
    (feature-map intrinsics); tables: [B, V, h*w] (:func:`score_table` per image);
    s_clutter: [B, h*w]; hw: (h, w) -> [B, K]. Equals :func:`pose_objective` of
    each image on its own K poses, but the B x K frames form one flat batch
    (no ``vmap`` over images: its batched scatters and batched ``while_loop``
    are what made the per-image form slow, see WORKSPACE "Pose solver speed").
    """
    nb, nk = poses.shape[:2]
    screen = geometry.project_to_screen(verts, poses, focal[:, None], principal[:, None])
    frags = rasterize(screen, faces, image_size=tuple(hw), cull_backfaces=cull_backfaces)
    s_obj = fold_scores(frags, faces, tables[:, None]).reshape(nb, nk, -1)   # [B, K, h*w]
    return nemo_loss(s_obj, s_clutter[:, None])


def _prepare(feature_map, vertex_memory, clutter):
    table = score_table(vertex_memory, feature_map)
    return table, clutter_scores(feature_map, clutter)


def _prepare_batch(feature_maps, vertex_memory, clutter):
    """feature_maps: [B, h, w, D] -> (tables [B, V, h*w], clutter scores [B, h*w])."""
    return jax.vmap(lambda fm: _prepare(fm, vertex_memory, clutter))(feature_maps)


@functools.partial(jax.jit, static_argnames=("hw", "cull_backfaces"))
def _grid_losses_shared(feature_maps, vertex_memory, clutter, verts, faces, focal, principal,
                        grid, hw, cull_backfaces=False):
    """All images share one camera (focal [], principal [2]): the G grid poses are
    rendered once and every image's table is folded against the same fragments."""
    tables, s_cl = _prepare_batch(feature_maps, vertex_memory, clutter)
    screen = geometry.project_to_screen(verts, grid, focal, principal)       # [G, V, 3]
    frags = rasterize(screen, faces, image_size=tuple(hw), cull_backfaces=cull_backfaces)
    nb, ng = feature_maps.shape[0], grid.shape[0]
    s_obj = fold_scores(frags, faces, tables[:, None]).reshape(nb, ng, -1)  # [B, G, h*w]
    return nemo_loss(s_obj, s_cl[:, None])


@functools.partial(jax.jit, static_argnames=("hw", "cull_backfaces"))
def _grid_losses(feature_maps, vertex_memory, clutter, verts, faces, focal, principal, grid, hw,
                 cull_backfaces=False):
    """Per-image cameras: one flat G-pose render per image, images in ``lax.map``
    (bounded memory; ``vmap`` would batch the rasteriser's scatters)."""
    def one(args):
        fm, f, c = args
        table, s_cl = _prepare(fm, vertex_memory, clutter)
        return pose_objective(grid, verts, faces, f, c, table, s_cl, hw,
                              cull_backfaces=cull_backfaces)
    return jax.lax.map(one, (feature_maps, focal, principal))


def _shared_camera(focal, principal):
    """(focal [], principal [2]) if every image has the same (concrete) intrinsics, else None."""
    try:
        f, p = np.asarray(focal), np.asarray(principal)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None
    if f.size and np.all(f == f.reshape(-1)[0]) and np.all(p == p.reshape(-1, 2)[:1]):
        return (jnp.asarray(f.reshape(-1)[0], jnp.float32),
                jnp.asarray(p.reshape(-1, 2)[0], jnp.float32))
    return None


def grid_losses(feature_maps, vertex_memory, clutter, verts, faces, focal, principal, grid, *,
                cull_backfaces: bool = False):
    """Losses of every grid pose. feature_maps: [B, h, w, D]; focal: [B];
    principal: [B, 2] (feature-map intrinsics); grid: [G, 4] -> [B, G].

    When all images share one camera (the usual case: crops rescaled to one
    focal length and centred) the grid is rendered once for the whole batch.
    """
    hw = tuple(feature_maps.shape[1:3])
    args = (feature_maps, jnp.asarray(vertex_memory), jnp.asarray(clutter),
            jnp.asarray(verts, jnp.float32), jnp.asarray(faces, jnp.int32))
    shared = _shared_camera(focal, principal)
    if shared is not None:
        return _grid_losses_shared(*args, *shared, jnp.asarray(grid, jnp.float32), hw,
                                   bool(cull_backfaces))
    return _grid_losses(*args, jnp.asarray(focal, jnp.float32),
                        jnp.asarray(principal, jnp.float32), jnp.asarray(grid, jnp.float32), hw,
                        bool(cull_backfaces))


def _optimizer(solver_cfg: SolverConfig):
    schedule = optax.exponential_decay(solver_cfg.lr, transition_steps=solver_cfg.decay_every,
                                       decay_rate=solver_cfg.decay_factor, staircase=True)
    return optax.adam(schedule, b1=solver_cfg.b1, b2=solver_cfg.b2)


@functools.partial(jax.jit, static_argnames=("hw", "solver_cfg"))
def _refine(feature_maps, vertex_memory, clutter, verts, faces, focal, principal, init, hw,
            solver_cfg):
    tx = _optimizer(solver_cfg)
    mask = jnp.array([1.0, 1.0, 1.0, 1.0 if solver_cfg.refine_distance else 0.0])
    tables, s_cl = _prepare_batch(feature_maps, vertex_memory, clutter)

    def losses_fn(p):                                                  # [B, K, 4] -> [B, K]
        return batch_objective(p, verts, faces, focal, principal, tables, s_cl, hw,
                               cull_backfaces=solver_cfg.cull_backfaces)

    def total(p):
        losses = losses_fn(p)
        return jnp.sum(losses), losses

    # Adam is elementwise, so one optimiser over [B, K, 4] is B x K independent ones;
    # each loss depends on its own pose only, so grad(sum) is every pose's gradient.
    def body(carry, _):
        p, opt = carry
        (_, loss), g = jax.value_and_grad(total, has_aux=True)(p)
        g = jnp.where(jnp.isfinite(g), g, 0.0) * mask
        upd, opt = tx.update(g, opt, p)
        return (optax.apply_updates(p, upd), opt), loss

    (p, _), trace = jax.lax.scan(body, (init, tx.init(init)), None, length=solver_cfg.steps)
    return p, losses_fn(p), jnp.moveaxis(trace, 0, -1)


def refine(feature_maps, vertex_memory, clutter, verts, faces, focal, principal, init,
           solver_cfg: SolverConfig = REFERENCE):
    """Adam refinement of ``init: [B, K, 4]`` -> (poses [B, K, 4], losses [B, K],
    loss traces [B, K, steps]). Intrinsics are the feature map's: focal [B],
    principal [B, 2]. All B x K hypotheses step together in one program."""
    hw = tuple(feature_maps.shape[1:3])
    return _refine(feature_maps, jnp.asarray(vertex_memory), jnp.asarray(clutter),
                   jnp.asarray(verts, jnp.float32), jnp.asarray(faces, jnp.int32),
                   jnp.asarray(focal, jnp.float32), jnp.asarray(principal, jnp.float32),
                   jnp.asarray(init, jnp.float32), hw, solver_cfg)


class SolveResult(NamedTuple):
    """pose: [B, 4] best refined pose; score: [B] 1 - loss (confidence);
    init_pose: [B, 4] best grid pose; grid_losses: [B, G]."""

    pose: np.ndarray
    score: np.ndarray
    init_pose: np.ndarray
    grid_losses: np.ndarray


def solve(feature_maps, vertex_memory, clutter, verts, faces, focal, principal, *,
          stride: int, solver_cfg: SolverConfig = REFERENCE) -> SolveResult:
    """Full NeMo inference for a batch.

    feature_maps: [B, h, w, D]; vertex_memory: [V, D]; clutter: [D] (the clutter
    prototype, see :func:`nvsm_jax.nemo.features.clutter_prototype`); focal: [B];
    principal: [B, 2] for the **input image**; stride: the map's stride.
    """
    focal = jnp.asarray(focal, jnp.float32) / stride
    principal = jnp.asarray(principal, jnp.float32) / stride
    grid = solver_cfg.grid()
    losses = grid_losses(feature_maps, vertex_memory, clutter, verts, faces, focal, principal, grid,
                         cull_backfaces=solver_cfg.cull_backfaces)
    k = min(solver_cfg.top_k, grid.shape[0])
    _, idx = jax.lax.top_k(-losses, k)
    init = jnp.asarray(grid)[idx]                                      # [B, K, 4]
    if solver_cfg.steps > 0:
        poses, final, _ = refine(feature_maps, vertex_memory, clutter, verts, faces, focal,
                                 principal, init, solver_cfg)
    else:
        poses, final = init, jnp.take_along_axis(losses, idx, axis=1)
    best = jnp.argmin(final, axis=1)
    pose = jnp.take_along_axis(poses, best[:, None, None], axis=1)[:, 0]
    score = 1.0 - jnp.take_along_axis(final, best[:, None], axis=1)[:, 0]
    return SolveResult(np.asarray(pose), np.asarray(score), np.asarray(init[:, 0]),
                       np.asarray(losses))


def solve_batched(feature_fn, images, vertex_memory, clutter, object_mesh: meshes.Mesh,
                  cameras: geometry.Intrinsics, *, stride: int,
                  solver_cfg: SolverConfig = REFERENCE, batch_size: int = 16,
                  progress=None) -> SolveResult:
    """:func:`solve` over a whole set in chunks; ``feature_fn(images_chunk) -> maps``.

    images: [N, ...] (what ``feature_fn`` takes); cameras: the **input images'**
    intrinsics, focal [N] and principal [N, 2], as :func:`solve`'s. The last chunk is
    padded to ``batch_size`` (one compilation) and cut back.
    """
    verts, faces = object_mesh
    focal, principal = cameras
    n = len(images)
    outs = []
    starts = range(0, n, batch_size)
    if progress is not None:
        starts = progress(starts)
    for s in starts:
        chunk, m = parallel.pad_to_multiple(
            (np.asarray(images[s:s + batch_size]), np.asarray(focal[s:s + batch_size]),
             np.asarray(principal[s:s + batch_size])), batch_size)
        fmaps = feature_fn(chunk[0])
        r = solve(fmaps, vertex_memory, clutter, verts, faces, chunk[1], chunk[2],
                  stride=stride, solver_cfg=solver_cfg)
        outs.append(jax.tree_util.tree_map(lambda x: x[:m], r))
    return SolveResult(*(np.concatenate([getattr(o, f) for o in outs]) for f in SolveResult._fields))
