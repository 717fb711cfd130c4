"""KITTI 3D object (training split layout) -> NeMo-format car crops (see :mod:`nvsm_jax.data.kitti`).

    nvsm-prepare-kitti --root KITTI/object/training --out data/kitti
"""

from __future__ import annotations

import json
import logging

from nvsm_jax import parallel
from nvsm_jax.data.kitti import prepare_kitti

from . import ArgumentParser


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True, help="folder with label_2/, calib/, image_2/")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", help="root name under --out")
    p.add_argument("--crop", default="256,672", help="H,W of the crops")
    p.add_argument("--focal_px", type=float, default=3000.0)
    p.add_argument("--min_box_side", type=float, default=100.0)
    p.add_argument("--max_truncation", type=float, default=0.2)
    p.add_argument("--unit_m", type=float, default=4.0, help="metres per model unit")
    p.add_argument("--strict", action="store_true", help="fail on bad input instead of skipping")
    a = p.parse_args(argv)
    p.run(_run, a, a)


def _run(a):
    logging.basicConfig(level=logging.INFO)
    parallel.quiet_backend_probe_logs()
    h, w = (int(x) for x in a.crop.split(","))
    counts = prepare_kitti(a.root, a.out, crop_hw=(h, w), target_focal=a.focal_px,
                           min_box_side=a.min_box_side, max_truncation=a.max_truncation,
                           unit_m=a.unit_m, split=a.split, skip_bad=not a.strict)
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
