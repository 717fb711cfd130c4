"""Scale-and-crop of real photographs into NeMo-style fixed-size crops.

Rule (used for PASCAL3D+ and KITTI): NeMo renders every object at distance 5
with one focal length ``F_t`` (3000 px by default). An object at distance
``d`` seen with focal ``F`` (pixels) appears ``s = (d / 5) (F_t / F)`` times
smaller than that, so the image is scaled by ``s`` (exactly, in both axes) and a
fixed ``H x W`` window centred on the scaled principal point is cut out
(zero-padded outside the photo). In screen coordinates (pixel centres at
+0.5; a resize maps pixel edges to pixel edges) a photo point ``x`` lands at
``s x - o`` with ``o = s p - (W/2, H/2)``. The stored annotation keeps the
true ``distance = d`` and stores ``focal * viewport = s F`` and ``principal =
(W/2, H/2)``, so ``project_pascal`` with the stored fields is *exactly* the
original projection carried into the crop; at the same time
``s F / d = F_t / 5``, i.e. the object has the size it would have at
distance 5 with focal ``F_t`` (NeMo's simplified camera).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["nemo_scale", "scale_and_crop"]


def nemo_scale(distance: float, focal_px: float, target_focal: float = 3000.0,
               target_distance: float = 5.0) -> float:
    return (distance / target_distance) * (target_focal / focal_px)


def scale_and_crop(image: np.ndarray, principal, scale: float, out_hw):
    """image [h, w, 3] uint8; principal (px, py) screen coords in the photo.

    Returns (crop [H, W, 3] uint8, offset o [2]) with crop point = s x - o.
    """
    H, W = out_hw
    p = np.asarray(principal, np.float64)
    o = scale * p - np.array([W / 2.0, H / 2.0])
    # source window (photo coordinates) of the crop
    x0, y0 = o / scale
    x1, y1 = (o + np.array([W, H])) / scale
    h, w = image.shape[:2]
    pad = int(np.ceil(max(0.0, -x0, -y0, x1 - w, y1 - h))) + 2
    src = np.pad(image, ((pad, pad), (pad, pad), (0, 0))) if pad else image
    im = Image.fromarray(src)
    resample = Image.BILINEAR if scale >= 1 else Image.BOX
    crop = im.resize((W, H), resample, box=(x0 + pad, y0 + pad, x1 + pad, y1 + pad))
    return np.asarray(crop, np.uint8), o
