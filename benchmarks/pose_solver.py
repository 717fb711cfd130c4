"""NeMo inference speed: backbone, 144-pose grid scoring and Adam refinement.

    python -m benchmarks.pose_solver --json runs/bench/pose_solver.json
    python -m benchmarks.pose_solver --workdir runs/nemo_car_full --data data/synthetic/test

Records (first: the machine's matmul GFLOP/s): for each solver setting
(``reference`` = NeMo's 300 Adam steps, ``fast`` = 60 steps / faster decay),
``images_per_s`` of the full solve and the seconds per image spent in the
backbone, the grid scoring and the refinement, plus peak RSS. With a workdir
and data, also the median error of each setting on those images. Without, a
random network and random vertex memory on random images (speed only).
"""

from __future__ import annotations

import argparse
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
from nvsm_jax import pose_solver as ps
from nvsm_jax.features import clutter_prototype


def _timed(fn, *args, repeats=1):
    jax.block_until_ready(fn(*args))          # compile + warm up
    t = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t) / repeats, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None, help="a trained NeMo workdir (else random)")
    ap.add_argument("--data", default="data/synthetic/test")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=128)
    ap.add_argument("--settings", default="fast,reference")
    args = ap.parse_args()

    records = [{"name": "matmul_gflops", "value": matmul_gflops()}]
    b = args.batch
    if args.workdir:
        from nvsm_jax import train
        from nvsm_jax.data import loaders
        nemo = train.load_model(args.workdir)
        test = loaders.load_pose_set(args.data, nemo.config.category, "L0", limit=b)
        images, focal, principal, gt = test.images, test.focal, test.principal, test.poses
        model, variables, stride = nemo.model, nemo.variables, nemo.config.model.stride
        vmem, clutter, mesh = nemo.memory.vertex, clutter_prototype(nemo.memory.clutter), nemo.mesh
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
        mesh = meshes.cuboid_mesh([-0.26, -0.58, -0.22], [0.26, 0.58, 0.21], 1000)
        vmem = jax.random.normal(jax.random.key(1), (len(mesh.verts), model.feature_dim))
        vmem = vmem / jnp.linalg.norm(vmem, axis=-1, keepdims=True)
        clutter = vmem[0]

    from nvsm_jax.models.backbone import preprocess
    feat_fn = jax.jit(lambda x: model.apply(variables, preprocess(x), train=False))
    t_bb, fmaps = _timed(feat_fn, images)
    f_s = jnp.asarray(focal) / stride
    p_s = jnp.asarray(principal) / stride
    for name in args.settings.split(","):
        cfg = {"fast": ps.FAST, "reference": ps.REFERENCE}[name]
        grid = cfg.grid()
        t_grid, losses = _timed(lambda f: ps.grid_losses(f, vmem, clutter, mesh.verts, mesh.faces,
                                                         f_s, p_s, grid), fmaps)
        init = jnp.asarray(grid)[jnp.argsort(losses, axis=1)[:, :cfg.top_k]]
        t_ref, (poses, fl, _) = _timed(lambda f: ps.refine(f, vmem, clutter, mesh.verts,
                                                           mesh.faces, f_s, p_s, init, cfg), fmaps)
        total = t_bb + t_grid + t_ref
        rec = {"name": f"nemo_solve_{name}", "setting": name, "batch": b,
               "feature_hw": list(fmaps.shape[1:3]), "grid_poses": int(grid.shape[0]),
               "top_k": cfg.top_k, "steps": cfg.steps, "images_per_s": b / total,
               "s_per_image_backbone": t_bb / b, "s_per_image_grid": t_grid / b,
               "s_per_image_refine": t_ref / b, "peak_rss_mb": peak_rss_mb()}
        if gt is not None:
            best = np.asarray(poses)[np.arange(b), np.argmin(np.asarray(fl), axis=1)]
            rec["med_err_deg"] = evaluation.median_error_deg(evaluation.rotation_errors(best, gt))
            rec["med_err_deg_grid_only"] = evaluation.median_error_deg(
                evaluation.rotation_errors(np.asarray(init[:, 0]), gt))
        records.append(rec)
    print_table(records)
    if args.json:
        write_json(args.json, records)


if __name__ == "__main__":
    main()
