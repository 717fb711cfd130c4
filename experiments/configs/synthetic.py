"""Synthetic PASCAL3D+-like data set (nvsm_jax.data.synthetic).

Run:
    nvsm-make-synthetic --config=synthetic --out data/synthetic
    nvsm-make-synthetic --config=synthetic:tiny --out /tmp/tiny

Variants (``get_config(arg)``):
    ""/"default": 12 categories x (1000 train L0 + 4 levels x 200 test), 128 px.
    "tiny":        car and aeroplane, 64 train + 16 test per level, 64 px (tests, demos).
    "demo":        all 12 categories, 200 train + 50 test per level, 96 px.
"""

import ml_collections

from nvsm_jax.data.format import CATEGORIES


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.categories = ",".join(CATEGORIES)
    c.num_train = 1000
    c.num_test = 200
    c.test_levels = ("L0", "L1", "L2", "L3")
    c.image_size = (128, 128)
    c.supersample = 2
    c.batch_size = 32
    c.seed = 0
    c.fill = 0.78
    c.distance_range = (4.5, 5.5)
    c.elevation_deg = (10.0, 12.0, -10.0, 40.0)   # mean, std, min, max
    c.theta_deg = (5.0, 15.0)                      # std, max |theta|
    c.cuboid_coverage = 0.99
    c.cuboid_vertices = 1000
    c.cuboid_instances = 200
    c.workers = 2                                 # host threads compositing / writing
    if arg in ("", "default"):
        pass
    elif arg == "tiny":
        c.categories = "car,aeroplane"
        c.num_train = 64
        c.num_test = 16
        c.image_size = (64, 64)
        c.batch_size = 16
    elif arg == "demo":
        c.num_train = 200
        c.num_test = 50
        c.image_size = (96, 96)
    else:
        raise ValueError(f"unknown synthetic config variant {arg!r} (use '', 'tiny' or 'demo')")
    return c
