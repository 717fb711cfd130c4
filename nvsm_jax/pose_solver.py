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
144 poses) is scored for a batch of images in one jitted call; the best
``top_k`` start Adam refinement of (azimuth, elevation, theta, distance) inside
``lax.scan``, vmapped over images x hypotheses. The hypothesis with the lowest
final loss wins; its ``1 - L`` is returned as a confidence.

All intrinsics passed here are for the **feature map** (focal / stride,
principal / stride); :func:`solve` takes input-image intrinsics and a stride.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nvsm_jax import geometry, parallel
from rasterizer import interpolate_score, rasterize

__all__ = ["SolverConfig", "FAST", "REFERENCE", "score_table", "clutter_scores", "fold_scores",
           "pose_objective", "grid_losses", "refine", "SolveResult", "solve", "solve_batched"]


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Search + refinement settings (defaults: NeMo's, facts file).

    num_azimuth/elevations/thetas/distance: the initial grid (12 x 4 x 3 = 144).
    top_k: grid hypotheses refined per image. steps/lr/b1/b2: Adam refinement;
    the lr is multiplied by ``decay_factor`` every ``decay_every`` steps.
    render_stride: render at ``feature_stride`` (None) - the score table's
    resolution. refine_distance: whether the distance is optimised too.
    """

    num_azimuth: int = 12
    elevations: Sequence[float] = tuple(np.linspace(-np.pi / 6, np.pi / 3, 4).tolist())
    thetas: Sequence[float] = tuple(np.linspace(-np.pi / 6, np.pi / 6, 3).tolist())
    distance: float = geometry.NEMO_DISTANCE
    top_k: int = 1
    steps: int = 300
    lr: float = 0.05
    b1: float = 0.4
    b2: float = 0.6
    decay_every: int = 100
    decay_factor: float = 0.2
    refine_distance: bool = True

    def grid(self) -> np.ndarray:
        return geometry.nemo_pose_grid(self.num_azimuth, self.elevations, self.thetas,
                                       self.distance)

    @classmethod
    def from_dict(cls, d) -> "SolverConfig":
        d = dict(d)
        for k in ("elevations", "thetas"):
            if k in d and d[k] is not None:
                d[k] = tuple(float(x) for x in d[k])
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


REFERENCE = SolverConfig()
# tuned for speed (benchmarks/pose_solver.py): a third of the steps, faster decay
FAST = SolverConfig(steps=60, lr=0.05, decay_every=25, top_k=1)


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


def pose_objective(pose, verts, faces, focal, principal, table, s_clutter, hw):
    """NeMo's loss L(pose) for one image. pose: [..., 4] -> [...]."""
    screen = geometry.project_to_screen(verts, pose, focal, principal)
    frags = rasterize(screen, faces, image_size=tuple(hw))
    s_obj = fold_scores(frags, faces, table).reshape(pose.shape[:-1] + (-1,))
    best = jnp.maximum(s_obj, s_clutter)
    return 1.0 - (jnp.mean(best, axis=-1) - jnp.mean(s_clutter))


def _prepare(feature_map, vertex_memory, clutter):
    table = score_table(vertex_memory, feature_map)
    return table, clutter_scores(feature_map, clutter)


@functools.partial(jax.jit, static_argnames=("hw",))
def _grid_losses(feature_maps, vertex_memory, clutter, verts, faces, focal, principal, grid, hw):
    def one(fm, f, c):
        table, s_cl = _prepare(fm, vertex_memory, clutter)
        return pose_objective(grid, verts, faces, f, c, table, s_cl, hw)
    return jax.vmap(one)(feature_maps, focal, principal)


def grid_losses(feature_maps, vertex_memory, clutter, verts, faces, focal, principal, grid):
    """Losses of every grid pose. feature_maps: [B, h, w, D]; focal: [B];
    principal: [B, 2] (feature-map intrinsics); grid: [G, 4] -> [B, G]."""
    hw = tuple(feature_maps.shape[1:3])
    return _grid_losses(feature_maps, jnp.asarray(vertex_memory), jnp.asarray(clutter),
                        jnp.asarray(verts, jnp.float32), jnp.asarray(faces, jnp.int32),
                        jnp.asarray(focal, jnp.float32), jnp.asarray(principal, jnp.float32),
                        jnp.asarray(grid, jnp.float32), hw)


def _optimizer(cfg: SolverConfig):
    schedule = optax.exponential_decay(cfg.lr, transition_steps=cfg.decay_every,
                                       decay_rate=cfg.decay_factor, staircase=True)
    return optax.adam(schedule, b1=cfg.b1, b2=cfg.b2)


@functools.partial(jax.jit, static_argnames=("hw", "cfg"))
def _refine(feature_maps, vertex_memory, clutter, verts, faces, focal, principal, init, hw, cfg):
    tx = _optimizer(cfg)
    mask = jnp.array([1.0, 1.0, 1.0, 1.0 if cfg.refine_distance else 0.0])

    def one_image(fm, f, c, poses):                                    # poses: [K, 4]
        table, s_cl = _prepare(fm, vertex_memory, clutter)

        def loss_fn(p):
            return pose_objective(p, verts, faces, f, c, table, s_cl, hw)

        def one_hyp(p0):
            def body(carry, _):
                p, opt = carry
                loss, g = jax.value_and_grad(loss_fn)(p)
                g = jnp.where(jnp.isfinite(g), g, 0.0) * mask
                upd, opt = tx.update(g, opt, p)
                return (optax.apply_updates(p, upd), opt), loss
            (p, _), trace = jax.lax.scan(body, (p0, tx.init(p0)), None, length=cfg.steps)
            return p, loss_fn(p), trace

        return jax.vmap(one_hyp)(poses)

    return jax.vmap(one_image)(feature_maps, focal, principal, init)


def refine(feature_maps, vertex_memory, clutter, verts, faces, focal, principal, init,
           cfg: SolverConfig = REFERENCE):
    """Adam refinement of ``init: [B, K, 4]`` -> (poses [B, K, 4], losses [B, K],
    loss traces [B, K, steps]). Intrinsics are the feature map's."""
    hw = tuple(feature_maps.shape[1:3])
    return _refine(feature_maps, jnp.asarray(vertex_memory), jnp.asarray(clutter),
                   jnp.asarray(verts, jnp.float32), jnp.asarray(faces, jnp.int32),
                   jnp.asarray(focal, jnp.float32), jnp.asarray(principal, jnp.float32),
                   jnp.asarray(init, jnp.float32), hw, cfg)


class SolveResult(NamedTuple):
    """pose: [B, 4] best refined pose; score: [B] 1 - loss (confidence);
    init_pose: [B, 4] best grid pose; grid_losses: [B, G]."""

    pose: np.ndarray
    score: np.ndarray
    init_pose: np.ndarray
    grid_losses: np.ndarray


def solve(feature_maps, vertex_memory, clutter, verts, faces, focal, principal, *,
          stride: int, cfg: SolverConfig = REFERENCE) -> SolveResult:
    """Full NeMo inference for a batch.

    feature_maps: [B, h, w, D]; vertex_memory: [V, D]; clutter: [D] (the clutter
    prototype, see :func:`nvsm_jax.features.clutter_prototype`); focal: [B];
    principal: [B, 2] for the **input image**; stride: the map's stride.
    """
    focal = jnp.asarray(focal, jnp.float32) / stride
    principal = jnp.asarray(principal, jnp.float32) / stride
    grid = cfg.grid()
    losses = grid_losses(feature_maps, vertex_memory, clutter, verts, faces, focal, principal, grid)
    k = min(cfg.top_k, grid.shape[0])
    _, idx = jax.lax.top_k(-losses, k)
    init = jnp.asarray(grid)[idx]                                      # [B, K, 4]
    if cfg.steps > 0:
        poses, final, _ = refine(feature_maps, vertex_memory, clutter, verts, faces, focal,
                                 principal, init, cfg)
    else:
        poses, final = init, jnp.take_along_axis(losses, idx, axis=1)
    best = jnp.argmin(final, axis=1)
    pose = jnp.take_along_axis(poses, best[:, None, None], axis=1)[:, 0]
    score = 1.0 - jnp.take_along_axis(final, best[:, None], axis=1)[:, 0]
    return SolveResult(np.asarray(pose), np.asarray(score), np.asarray(init[:, 0]),
                       np.asarray(losses))


def solve_batched(feature_fn, images, vertex_memory, clutter, verts, faces, focal, principal, *,
                  stride: int, cfg: SolverConfig = REFERENCE, batch_size: int = 16,
                  progress=None) -> SolveResult:
    """:func:`solve` over a whole set in chunks; ``feature_fn(images_chunk) -> maps``.

    The last chunk is padded to ``batch_size`` (one compilation) and cut back.
    """

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
                  stride=stride, cfg=cfg)
        outs.append(jax.tree_util.tree_map(lambda x: x[:m], r))
    return SolveResult(*(np.concatenate([getattr(o, f) for o in outs]) for f in SolveResult._fields))
