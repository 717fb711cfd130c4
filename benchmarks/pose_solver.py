"""NeMo inference speed: backbone, 144-pose grid scoring and Adam refinement.

    python -m benchmarks.pose_solver --json runs/bench/pose_solver.json
    python -m benchmarks.pose_solver --workdir runs/nemo_car_full --data data/synthetic/test
    python -m benchmarks.pose_solver --workdir runs/solver_model --eval_images 200 \
        --baseline /tmp/solver_base/nvsm_jax/nemo/pose_solver.py --json runs/bench/pose_solver.json

Records (first: the machine's matmul GFLOP/s): for each solver setting
(``reference`` = NeMo's 300 Adam steps, ``fast`` = 60 steps / faster decay),
``images_per_s`` of the full solve of one batch and the seconds per image spent
in the backbone, the grid scoring and the refinement, plus peak RSS.

``solver_efficiency`` (same record, same run): refinement frames/s
(images x hypotheses x steps / refinement seconds) divided by the rasteriser's
forward + backward frames/s on the same scene: the model's mesh (face count),
the feature-map size, the batch's B x K first-step poses and intrinsics, one
``value_and_grad`` of the folded NeMo loss w.r.t. the screen vertices per call
(:func:`benchmarks.rasterizer.score_fwd_bwd_frames_per_s`). 1.0 means a
refinement step costs exactly one differentiable render per hypothesis.

With a workdir and data, also the median error of each setting on the timed
batch, and with ``--eval_images N`` the accuracy of the full solve
(:func:`nvsm_jax.nemo.pose_solver.solve_batched`, batches of ``--batch``) on the
first N images of ``--level``: ``acc_pi_6``, ``acc_pi_18`` (percent),
``med_err_deg`` and that pass's ``eval_images_per_s``. ``--baseline FILE``
loads another ``pose_solver.py`` (e.g. the previous commit's, from a
``git worktree``) and evaluates the same settings with it on the same model and
images (``_baseline`` records, with the per-image paired error difference of
today's solver against it): before and after in one JSON. ``--feature_noise
1e-6`` adds, per setting, a pass on slightly perturbed features (``_noise``
records): the solve's own sensitivity, the yardstick for a before/after difference. Without a
workdir, a random network and random vertex memory on random images (speed only).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    from benchmarks.common import matmul_gflops, peak_rss_mb, print_table, write_json
except ImportError:  # benchmarks/common.py is another engineer's; minimal stand-ins
    import json
    import os
    import resource

    def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda a: a @ a)
        f(a).block_until_ready()
        t = time.perf_counter()
        for _ in range(repeats):
            f(a).block_until_ready()
        return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9

    def peak_rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def print_table(records):
        for r in records:
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r.items()))

    def write_json(path, records):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(records, f, indent=2)

from nvsm_jax import evaluation, meshes
from nvsm_jax.nemo import pose_solver as ps
from nvsm_jax.nemo.features import clutter_prototype


def _timed(fn, *args, repeats=1):
    jax.block_until_ready(fn(*args))          # compile + warm up
    t = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t) / repeats, out


def _load_baseline(path):
    """Imports a ``pose_solver.py`` file as a separate module (its imports resolve here)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("baseline_pose_solver", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _efficiency(solver, fmaps, vmem, clutter, object_mesh, f_s, p_s, init, t_ref, cfg):
    """(solver_efficiency, rasteriser record): see the module docstring."""
    from benchmarks.rasterizer import score_fwd_bwd_frames_per_s
    from nvsm_jax import geometry
    nb, nk = init.shape[:2]
    hw = tuple(fmaps.shape[1:3])
    sv = geometry.project_to_screen(jnp.asarray(object_mesh.verts, jnp.float32), init,
                                    f_s[:, None], p_s[:, None]).reshape(nb * nk, -1, 3)
    tables = jnp.repeat(jax.vmap(lambda fm: solver.score_table(vmem, fm))(fmaps), nk, axis=0)
    s_cl = jnp.repeat(jax.vmap(lambda fm: solver.clutter_scores(fm, clutter))(fmaps), nk, axis=0)
    rast = score_fwd_bwd_frames_per_s(sv, object_mesh.faces, tables, s_cl, hw)
    refine_fps = nb * nk * cfg.steps / t_ref
    return refine_fps / rast["frames_per_s"], refine_fps, rast


def _accuracy(solver, cfg, feat_fn, pose_set, vmem, clutter, object_mesh, stride, batch):
    """(record fields, per-image rotation errors [N] in radians) of the full solve."""
    import inspect
    from nvsm_jax import geometry
    cams = geometry.Intrinsics(pose_set.focal, pose_set.principal)
    params = inspect.signature(solver.solve_batched).parameters
    # a --baseline from before solve_batched took the mesh and cameras whole, and named
    # its solver config cfg
    where = (object_mesh, cams) if "object_mesh" in params else (*object_mesh, *cams)
    solver_kw = {"solver_cfg" if "solver_cfg" in params else "cfg": cfg}
    t = time.perf_counter()
    res = solver.solve_batched(feat_fn, pose_set.images, vmem, clutter, *where, stride=stride,
                               batch_size=batch, **solver_kw)
    wall = time.perf_counter() - t
    err = evaluation.rotation_errors(res.pose, pose_set.poses)
    return {"eval_images": int(len(err)), "acc_pi_6": evaluation.accuracy_at(err, np.pi / 6),
            "acc_pi_18": evaluation.accuracy_at(err, np.pi / 18),
            "med_err_deg": evaluation.median_error_deg(err),
            "eval_images_per_s": len(err) / wall}, err


def _noisy(feat_fn, sigma: float):
    """feat_fn plus N(0, sigma^2) noise, the same for the same images (a sensitivity check)."""
    def fn(x):
        f = feat_fn(x)
        seed = int(np.asarray(x, np.int64).sum() % (2 ** 31))
        return f + sigma * jax.random.normal(jax.random.key(seed), f.shape, f.dtype)
    return fn


def _paired(err, base_err) -> dict:
    """Per-image error differences (degrees) against another solve of the same images."""
    d = np.degrees(np.asarray(err) - np.asarray(base_err))
    return {"paired_diff_deg_mean": float(d.mean()),
            "paired_diff_deg_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
            "images_moved_over_0.5deg": int(np.sum(np.abs(d) > 0.5))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None, help="a trained NeMo workdir (else random)")
    ap.add_argument("--data", default="data/synthetic/test")
    ap.add_argument("--level", default="L0", help="occlusion level of --data")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=128)
    ap.add_argument("--settings", default="fast,reference")
    ap.add_argument("--eval_images", type=int, default=0,
                    help="also the accuracy of each setting on this many images (workdir only)")
    ap.add_argument("--baseline", default=None,
                    help="another pose_solver.py to evaluate beside this one (before/after)")
    ap.add_argument("--baseline_settings", default=None,
                    help="settings for --baseline (default: --settings)")
    ap.add_argument("--feature_noise", type=float, default=0.0,
                    help="also each accuracy pass on features + N(0, this^2): how much the "
                         "solve moves under perturbations far below the features' scale")
    ap.add_argument("--no_efficiency", action="store_true",
                    help="skip the rasteriser forward+backward measurement")
    args = ap.parse_args()

    records = [{"name": "matmul_gflops", "value": matmul_gflops()}]
    b = args.batch
    if args.workdir:
        from nvsm_jax.nemo import train
        from nvsm_jax.data import loaders
        nemo = train.load_model(args.workdir)
        test = loaders.load_pose_set(args.data, nemo.config.category, args.level, limit=b)
        images, focal, principal, gt = test.images, test.focal, test.principal, test.poses
        model, variables, stride = nemo.model, nemo.variables, nemo.config.model.stride
        vmem, clutter, object_mesh = nemo.memory.vertex, clutter_prototype(nemo.memory.clutter), nemo.object_mesh
    else:
        from nvsm_jax.models import backbone
        model = backbone.make_feature_net("small", stride=8)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 255, (b, args.image, args.image, 3), dtype=np.uint8)
        focal = np.full(b, 3.5 * args.image, np.float32)
        principal = np.full((b, 2), args.image / 2, np.float32)
        gt = None
        variables = model.init(jax.random.key(0), jnp.zeros((1, args.image, args.image, 3)))
        stride = 8
        object_mesh = meshes.cuboid_mesh([-0.26, -0.58, -0.22], [0.26, 0.58, 0.21], 1000)
        vmem = jax.random.normal(jax.random.key(1), (len(object_mesh.verts), model.feature_dim))
        vmem = vmem / jnp.linalg.norm(vmem, axis=-1, keepdims=True)
        clutter = vmem[0]

    from nvsm_jax.models.backbone import preprocess
    feat_fn = jax.jit(lambda x: model.apply(variables, preprocess(x), train=False))
    t_bb, fmaps = _timed(feat_fn, images)
    f_s = jnp.asarray(focal) / stride
    p_s = jnp.asarray(principal) / stride
    solvers = [("", ps, args.settings)]
    if args.baseline:
        solvers.append(("_baseline", _load_baseline(args.baseline),
                        args.baseline_settings or args.settings))
    eval_set, errors = None, {}
    if args.workdir and args.eval_images > 0:
        eval_set = loaders.load_pose_set(args.data, nemo.config.category, args.level,
                                         limit=args.eval_images)
    for suffix, solver, settings in solvers:
        for name in settings.split(","):
            cfg = {"fast": solver.FAST, "reference": solver.REFERENCE}[name]
            grid = cfg.grid()
            t_grid, losses = _timed(lambda f: solver.grid_losses(
                f, vmem, clutter, object_mesh.verts, object_mesh.faces, f_s, p_s, grid), fmaps)
            init = jnp.asarray(grid)[jnp.argsort(losses, axis=1)[:, :cfg.top_k]]
            t_ref, (poses, fl, _) = _timed(lambda f: solver.refine(
                f, vmem, clutter, object_mesh.verts, object_mesh.faces, f_s, p_s, init, cfg), fmaps)
            total = t_bb + t_grid + t_ref
            rec = {"name": f"nemo_solve_{name}{suffix}", "setting": name, "batch": b,
                   "feature_hw": list(fmaps.shape[1:3]), "grid_poses": int(grid.shape[0]),
                   "top_k": cfg.top_k, "steps": cfg.steps, "images_per_s": b / total,
                   "s_per_image_backbone": t_bb / b, "s_per_image_grid": t_grid / b,
                   "s_per_image_refine": t_ref / b, "peak_rss_mb": peak_rss_mb()}
            if not args.no_efficiency and cfg.steps > 0:
                eff, refine_fps, rast = _efficiency(solver, fmaps, vmem, clutter, object_mesh, f_s, p_s,
                                                    init, t_ref, cfg)
                rec.update(solver_efficiency=eff, refine_frames_per_s=refine_fps,
                           raster_fwd_bwd_frames_per_s=rast["frames_per_s"],
                           raster_faces=int(len(object_mesh.faces)), raster_load1=rast["load1"])
            if gt is not None:
                best = np.asarray(poses)[np.arange(b), np.argmin(np.asarray(fl), axis=1)]
                rec["med_err_deg_batch"] = evaluation.median_error_deg(
                    evaluation.rotation_errors(best, gt))
                rec["med_err_deg_grid_only"] = evaluation.median_error_deg(
                    evaluation.rotation_errors(np.asarray(init[:, 0]), gt))
            if eval_set is not None:
                fields, err = _accuracy(solver, cfg, feat_fn, eval_set, vmem, clutter, object_mesh,
                                        stride, b)
                rec.update(fields)
                if suffix:                 # the same setting of this solver, image by image
                    mine = errors.get(("", name))
                    if mine is not None:
                        rec.update({f"{k}_now_vs_this": v for k, v in _paired(mine, err).items()})
                errors[(suffix, name)] = err
            records.append(rec)
            print_table([rec])
            if eval_set is not None and args.feature_noise > 0:
                fields, err_n = _accuracy(solver, cfg, _noisy(feat_fn, args.feature_noise),
                                          eval_set, vmem, clutter, object_mesh, stride, b)
                noisy = {"name": f"nemo_solve_{name}{suffix}_noise", "setting": name,
                         "feature_noise": args.feature_noise, **fields, **_paired(err_n, err)}
                records.append(noisy)
                print_table([noisy])
    print_table(records)
    if args.json:
        write_json(args.json, records)


if __name__ == "__main__":
    main()
