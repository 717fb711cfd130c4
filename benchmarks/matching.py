"""NVSM matching throughput: (synthesised view, image) pairs scored per second.

    python -m benchmarks.matching --json runs/bench/matching.json [--quick]

Each row scores K synthesised views against N images of ``h x w x D`` features
with :func:`nvsm_jax.nvsm.matching.match_scores_sharded` (all local devices) and
reports ``pairs_per_s`` and ``fraction_of_matmul``: the achieved FLOP rate
(``2 K N h w D`` per call) over the machine's float32 matmul rate measured in
the same run (the first record, ``name: "matmul_gflops"``).

``pool: "normalised"`` rows time the E-step's path (the pool normalised and
sharded once per round, fresh views every call); ``pool: "raw"`` rows also
normalise the images inside every call.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks import common
from nvsm_jax.nvsm import matching
from nvsm_jax import parallel

FULL = [  # (views K, images N, map h = w, channels D)
    (64, 512, 16, 128),
    (256, 1024, 16, 128),
    (64, 512, 32, 128),
    (256, 1024, 32, 128),
    (1024, 1024, 16, 64),
]
QUICK = [(32, 64, 8, 32)]


def run(rows, repeats: int = 3):
    gflops = common.matmul_gflops()
    records = [{"name": "matmul_gflops", "gflops": gflops, "device": jax.devices()[0].device_kind}]
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    for k, n, hw, d in rows:
        syn = rng.normal(size=(k, hw, hw, d)).astype(np.float32)
        mask = rng.uniform(size=(k, hw, hw)) > 0.3
        raw = jax.device_put(rng.normal(size=(n, hw, hw, d)).astype(np.float32))
        pools = {"normalised": matching.normalize_images(raw), "raw": raw}
        for pool, images in pools.items():
            compile_s, seconds = common.time_fn(
                lambda: matching.match_scores_sharded(syn, mask, images, mesh,
                                                      normalized=pool == "normalised"),
                warmup=1, repeats=repeats)
            achieved = 2.0 * k * n * hw * hw * d / seconds / 1e9
            records.append({
                "name": "match_scores", "pool": pool, "views": k, "images": n, "map": [hw, hw],
                "channels": d, "pairs_per_s": k * n / seconds, "gflops": achieved,
                "fraction_of_matmul": achieved / gflops, "seconds": seconds,
                "compile_s": compile_s, "peak_rss_mb": common.peak_rss_mb(),
                "devices": mesh.devices.size, "device": jax.devices()[0].device_kind,
            })
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument("--quick", action="store_true", help="one tiny row (smoke test)")
    args = parser.parse_args(argv)
    records = run(QUICK if args.quick else FULL, repeats=1 if args.quick else 3)
    common.print_table(records)
    if args.json:
        common.write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
