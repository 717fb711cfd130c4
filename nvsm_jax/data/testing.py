"""Tiny NeMo-format roots for tests (no rasteriser needed).

``write_tiny_root`` writes random images and annotations with poses drawn like
the synthetic generator's, a cuboid model mesh and a list file, so any code
that reads a root can be tested in milliseconds. The images are noise: they
do not show the object.
"""

from __future__ import annotations

import os

import numpy as np

from nvsm_jax import meshes
from nvsm_jax.data.format import save_npz, save_png, subset_name, write_list

__all__ = ["write_tiny_root"]


def write_tiny_root(root, category: str = "car", num: int = 12, *, size=(32, 48),
                    occlusion: str = "L0", seed: int = 0, masks: bool = True,
                    ext: str = ".png", viewport: float = 200.0) -> list[str]:
    """Writes ``num`` images of ``category`` at ``occlusion`` into ``root``; returns names."""
    rng = np.random.default_rng(seed)
    h, w = size
    sub = subset_name(category, occlusion)
    names = []
    for i in range(num):
        name = f"{category}_{i:04d}"
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if ext == ".png":
            save_png(os.path.join(root, "images", sub, name + ext), img)
        else:
            from PIL import Image
            os.makedirs(os.path.join(root, "images", sub), exist_ok=True)
            Image.fromarray(img).save(os.path.join(root, "images", sub, name + ext), quality=95)
        fields = dict(azimuth=rng.uniform(0, 2 * np.pi), elevation=np.deg2rad(rng.uniform(-10, 40)),
                      theta=np.deg2rad(rng.normal(0, 5)), distance=rng.uniform(4.5, 5.5),
                      focal=1.0, viewport=viewport, principal=np.array([w / 2, h / 2]),
                      box=np.array([2.0, 2.0, w - 2.0, h - 2.0]), cad_index=1, height=h, width=w)
        fields["bbox"] = fields["box"]
        if masks:
            obj = np.zeros((h, w), bool)
            obj[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
            fields["object_mask"] = obj
            fields["occluder_mask"] = np.zeros((h, w), bool)
        save_npz(os.path.join(root, "annotations", sub, name + ".npz"), **fields)
        names.append(name)
    write_list(os.path.join(root, "lists", sub, "mesh01.txt"), names)
    cub = meshes.cuboid_mesh([-0.25, -0.5, -0.2], [0.25, 0.5, 0.2], 200)
    meshes.save_off(os.path.join(root, "CAD_single", category, "01.off"), *cub)
    return names
