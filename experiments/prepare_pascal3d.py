"""Raw PASCAL3D+ release 1.1 -> NeMo format (see :mod:`nvsm_jax.data.pascal3d`).

    nvsm-prepare-pascal3d --root PASCAL3D+_release1.1 --out data/pascal3d --categories car,aeroplane
    nvsm-prepare-pascal3d --root PASCAL3D+_release1.1 --out data/pascal3d
"""

from __future__ import annotations

import json
import logging

from nvsm_jax import parallel
from nvsm_jax.data.pascal3d import prepare_pascal3d
from nvsm_jax.data.shapes import CATEGORIES

from . import ArgumentParser


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--crop", default="256,672", help="H,W of the crops")
    p.add_argument("--focal_px", type=float, default=3000.0, help="NeMo focal (pixels) at distance 5")
    p.add_argument("--keep_truncated", action="store_true")
    p.add_argument("--keep_occluded", action="store_true")
    p.add_argument("--keep_difficult", action="store_true")
    p.add_argument("--strict", action="store_true", help="fail on bad input instead of skipping")
    a = p.parse_args(argv)
    p.run(_run, a, a)


def _run(a):
    logging.basicConfig(level=logging.INFO)
    parallel.quiet_backend_probe_logs()
    h, w = (int(x) for x in a.crop.split(","))
    counts = prepare_pascal3d(a.root, a.out, [c for c in a.categories.split(",") if c],
                              crop_hw=(h, w), target_focal=a.focal_px,
                              keep_truncated=a.keep_truncated, keep_occluded=a.keep_occluded,
                              keep_difficult=a.keep_difficult, skip_bad=not a.strict)
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
