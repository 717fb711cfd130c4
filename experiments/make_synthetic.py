"""Generates the synthetic PASCAL3D+-like data set (train and test roots).

    nvsm-make-synthetic --out data/synthetic
    nvsm-make-synthetic --out /tmp/syn --categories car,aeroplane --train 64 --test 16
    nvsm-make-synthetic --config=synthetic:tiny --out /tmp/tiny

Flags override the config (default: the package's ``synthetic`` config; ``--config``
takes NAME[:ARG], e.g. ``synthetic:tiny``, or a file PATH[:ARG]).
Writes OUT/train (L0 pool) and OUT/test (L0..L3), each with README and dataset.json.
"""

from __future__ import annotations

import json

from nvsm_jax import config_checks, parallel
from nvsm_jax.data import synthetic

from . import ArgumentParser, configs


def load_config(spec: str | None):
    """A config spec (``synthetic:tiny``, ``path/to/config.py[:variant]``); None -> ``synthetic``."""
    return configs.load_config(spec or "synthetic")


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="synthetic",
                   help="config spec NAME[:ARG] (e.g. synthetic:tiny) or PATH[:ARG] (default: synthetic)")
    p.add_argument("--categories", default=None, help="comma-separated")
    p.add_argument("--train", type=int, default=None, help="training images per category")
    p.add_argument("--test", type=int, default=None, help="test images per category and level")
    p.add_argument("--size", type=int, default=None, help="square image size (pixels)")
    p.add_argument("--supersample", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="images per rasteriser call")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    p.run(_generate, a, p, a)


def _generate(p, a):
    """The config of ``--config`` with the flags' values, checked (a bad field: a
    ConfigError naming it and the flag that set it, nothing written), then the data set."""
    parallel.quiet_backend_probe_logs()
    try:
        cfg = load_config(a.config).to_dict()
    except ValueError as e:
        p.error(str(e))
    given = {}
    for key, flag, val in (("categories", "--categories", a.categories),
                           ("num_train", "--train", a.train), ("num_test", "--test", a.test),
                           ("supersample", "--supersample", a.supersample),
                           ("batch_size", "--batch", a.batch), ("seed", "--seed", a.seed),
                           ("image_size", "--size", None if a.size is None else (a.size, a.size))):
        if val is not None:
            cfg[key], given[key] = val, flag
    config_checks.check_synthetic_config(cfg, flags=given)
    config = synthetic.SynthConfig.from_mapping(cfg)
    stats = synthetic.generate(a.out, config)
    print(json.dumps({"out": a.out, "counts": stats["counts"], "timing": stats["timing"]}, indent=1))


if __name__ == "__main__":
    main()
