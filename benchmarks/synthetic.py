"""Throughput of the synthetic data generator (images/s), and the full-benchmark estimate.

    python -m benchmarks.synthetic                       # 2 categories x (64 train + 4 x 16 test), 128 px
    python -m benchmarks.synthetic --categories all --train 1000 --test 200   # the whole default set
    python -m benchmarks.synthetic --json runs/bench/synthetic.json

Reports images/s (excluding the first batch of every compiled shape, reported
separately as compile time) and extrapolates to the default data set
(12 categories x (1000 train + 4 x 200 test) = 21,600 images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from nvsm_jax.data import shapes, synthetic

DEFAULT_IMAGES = 12 * (1000 + 4 * 200)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--categories", default="car,aeroplane", help="comma list or 'all'")
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--test", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--supersample", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default=None, help="output dir (default: a temp dir, deleted)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cats = shapes.CATEGORIES if a.categories == "all" else tuple(a.categories.split(","))
    cfg = synthetic.SynthConfig(categories=cats, num_train=a.train, num_test=a.test,
                                image_size=(a.size, a.size), supersample=a.supersample,
                                batch_size=a.batch)
    import jax
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up: compile the renderer for every mesh-size bucket we will use
        t0 = time.perf_counter()
        warm = synthetic.SynthConfig(categories=cats, num_train=1, num_test=0, test_levels=(),
                                     image_size=cfg.image_size, supersample=cfg.supersample,
                                     batch_size=cfg.batch_size, cuboid_instances=5)
        synthetic.generate(os.path.join(tmp, "warm"), warm, log=lambda *_: None)
        compile_s = time.perf_counter() - t0
        stats = synthetic.generate(a.out or os.path.join(tmp, "run"), cfg)
    timing = stats["timing"]
    ips = timing["images_per_second"]
    result = {"benchmark": "synthetic", "images": timing["images"], "seconds": timing["seconds"],
              "images_per_second": ips, "cpu_ms_per_image": timing["cpu_ms_per_image"],
              "load_average_1min": round(os.getloadavg()[0], 2),
              "warmup_compile_seconds": round(compile_s, 2),
              "default_set_images": DEFAULT_IMAGES,
              "default_set_estimated_minutes": round(DEFAULT_IMAGES / ips / 60, 2),
              "config": cfg.to_json(), "backend": jax.default_backend(),
              "devices": [str(d) for d in jax.devices()][:1], "cpu_count": os.cpu_count(),
              "machine": platform.machine()}
    print(json.dumps(result, indent=1))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
