"""Generates the synthetic PASCAL3D+-like data set (train and test roots).

    python -m experiments.make_synthetic --out data/synthetic
    python -m experiments.make_synthetic --out /tmp/syn --categories car,aeroplane --train 64 --test 16
    python -m experiments.make_synthetic --config experiments/configs/synthetic.py:tiny --out /tmp/tiny

Flags override the config (defaults: experiments/configs/synthetic.py).
Writes OUT/train (L0 pool) and OUT/test (L0..L3), each with README and dataset.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

from nvsm_jax.data import synthetic


def load_config(spec: str | None):
    """``path/to/config.py[:variant]``; None -> experiments/configs/synthetic.py."""
    path, _, arg = (spec or "").partition(":")
    if not path:
        from experiments.configs import synthetic as mod
    else:
        s = importlib.util.spec_from_file_location("_synthetic_config", path)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    return mod.get_config(arg)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="path[:variant] of an ml_collections config")
    p.add_argument("--categories", default=None, help="comma-separated")
    p.add_argument("--train", type=int, default=None, help="training images per category")
    p.add_argument("--test", type=int, default=None, help="test images per category and level")
    p.add_argument("--size", type=int, default=None, help="square image size (pixels)")
    p.add_argument("--supersample", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="images per rasteriser call")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    cfg = load_config(a.config).to_dict()
    for key, val in (("categories", a.categories), ("num_train", a.train), ("num_test", a.test),
                     ("supersample", a.supersample), ("batch_size", a.batch), ("seed", a.seed)):
        if val is not None:
            cfg[key] = val
    if a.size is not None:
        cfg["image_size"] = (a.size, a.size)
    config = synthetic.SynthConfig.from_mapping(cfg)
    stats = synthetic.generate(a.out, config)
    print(json.dumps({"out": a.out, "counts": stats["counts"], "timing": stats["timing"]}, indent=1))


if __name__ == "__main__":
    main()
