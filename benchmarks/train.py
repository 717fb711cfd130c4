"""NeMo training throughput (images/s of the jitted train step, data excluded).

    python -m benchmarks.train --json runs/bench/train.json
    python -m benchmarks.train --backbones small,efficientnet_lite0 --image 128 --batch 16 \
        --depthwise shift,conv --anchors 128

Backbones are ``model.backbone`` presets; the EfficientNet-Lite rows are timed
with each ``--depthwise`` form (XLA:CPU's grouped convolution against the shifted
multiply-adds, ``nvsm_jax.models.efficientnet``); ``scratch`` rows of a Lite
backbone are the same network (the weights do not change the speed).

Random images/poses and NeMo's cuboid; records matmul GFLOP/s first.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks.pose_solver import matmul_gflops, peak_rss_mb, print_table, write_json
from experiments.configs import nemo as nemo_config
from nvsm_jax import meshes, parallel
from nvsm_jax import train as nemo_train
from nvsm_jax.models import backbone


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--backbones", default="small,efficientnet_lite0")
    ap.add_argument("--depthwise", default="shift,conv",
                    help="EfficientNet depthwise forms to time (ResNet rows ignore it)")
    ap.add_argument("--image", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--anchors", default="128,0", help="anchors_per_image values (0 = all)")
    ap.add_argument("--frozen_stages", default="0",
                    help="model.frozen_stages values to time (the frozen stages need no backward)")
    args = ap.parse_args()
    records = [{"name": "matmul_gflops", "value": matmul_gflops()}]
    mesh = meshes.cuboid_mesh([-0.26, -0.58, -0.22], [0.26, 0.58, 0.21], 1000)
    hw = (args.image, args.image)
    rng = np.random.default_rng(0)
    b = args.batch
    batch = {"image": rng.integers(0, 255, (b, *hw, 3), dtype=np.uint8),
             "pose": np.stack([rng.uniform(0, 6.28, b), rng.uniform(-0.2, 0.6, b),
                               rng.uniform(-0.2, 0.2, b), np.full(b, 5.0)], 1).astype(np.float32),
             "focal": np.full(b, 3.5 * args.image, np.float32),
             "principal": np.full((b, 2), args.image / 2, np.float32)}
    axes = parallel.make_mesh(1)
    rows = []
    for name in args.backbones.split(","):
        lite = "encoder" in backbone.PRESETS[name]
        for form in (args.depthwise.split(",") if lite else ["-"]):
            for anchors in (int(a) for a in args.anchors.split(",")):
                for frozen in (int(k) for k in args.frozen_stages.split(",")):
                    rows.append((name, form, anchors, frozen))
    for preset, form, anchors, frozen in rows:
        cfg = nemo_config.get_config("default")
        cfg.model.backbone = preset
        cfg.model.pretrained = ""
        cfg.model.frozen_stages = frozen
        if form != "-":
            cfg.model.depthwise = form
        cfg.batch_size = b
        cfg.loss.anchors_per_image = anchors or None
        model = nemo_train.build_model(cfg)
        state = nemo_train.init_state(cfg, model, len(mesh.verts), hw, axes)
        sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
        step = nemo_train.make_train_step(cfg, model, mesh, hw, sharding, axes)
        sb = parallel.shard_batch(batch, axes)
        t = time.perf_counter()
        state, m = step(state, sb, jax.random.key(0))
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(args.steps):
            state, m = step(state, sb, jax.random.key(i))
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t) / args.steps
        records.append({"name": "nemo_train_step", "backbone": preset, "depthwise": form,
                        "frozen_stages": frozen, "image": args.image,
                        "batch": b, "anchors_per_image": anchors or "all",
                        "images_per_s": b / dt, "s_per_step": dt, "compile_s": compile_s,
                        "peak_rss_mb": peak_rss_mb()})
    print_table(records)
    if args.json:
        write_json(args.json, records)


if __name__ == "__main__":
    main()
