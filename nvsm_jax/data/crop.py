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


# The crop window may be at most this many times the photo (or the crop, if larger)
# in area: a window larger than that comes from a nonsense scale (a viewport or focal
# near zero), and cutting it would allocate gigabytes for a picture of padding.
MAX_WINDOW_AREA_RATIO = 64.0


def scale_and_crop(image: np.ndarray, principal, scale: float, out_hw):
    """image [h, w, 3] uint8; principal (px, py) screen coords in the photo.

    Returns (crop [H, W, 3] uint8, offset o [2]) with crop point = s x - o.
    Only the crop window (plus the resampling filter's support) is cut from the
    photo and zero-padded, never the whole photo. Raises ValueError (the caller
    names the file) when the scale is not a positive finite number, the principal
    point is not finite, the window does not overlap the photo, or the window is
    more than ``MAX_WINDOW_AREA_RATIO`` times the photo's area.
    """
    H, W = out_hw
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"crop scale must be a positive finite number, got {scale}")
    p = np.asarray(principal, np.float64).reshape(-1)
    if p.size != 2 or not np.all(np.isfinite(p)):
        raise ValueError(f"principal point must be 2 finite numbers, got {p}")
    o = scale * p - np.array([W / 2.0, H / 2.0])
    # source window (photo coordinates) of the crop
    x0, y0 = o / scale
    x1, y1 = (o + np.array([W, H])) / scale
    h, w = image.shape[:2]
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise ValueError(f"principal point ({p[0]:g}, {p[1]:g}) at scale {scale:g} puts the crop "
                         f"window x [{x0:.6g}, {x1:.6g}], y [{y0:.6g}, {y1:.6g}] entirely off "
                         f"the {w} x {h} photo")
    if (x1 - x0) * (y1 - y0) > MAX_WINDOW_AREA_RATIO * max(h * w, H * W):
        raise ValueError(f"crop scale {scale:g} gives a {x1 - x0:.6g} x {y1 - y0:.6g} px window "
                         f"on a {w} x {h} photo (more than {MAX_WINDOW_AREA_RATIO:g} times its "
                         "area): the scale (focal, viewport or distance) is implausible")
    # The whole photo zero-padded by ``pad`` would be the canvas; cut from it only the
    # window plus the filter support (BOX: 0.5 / s source pixels when shrinking;
    # BILINEAR: 1), so the result equals resizing the fully padded photo.
    pad = int(np.ceil(max(0.0, -x0, -y0, x1 - w, y1 - h))) + 2
    margin = (int(np.ceil(0.5 / scale)) if scale < 1 else 1) + 2
    cx0 = max(-pad, int(np.floor(x0)) - margin)
    cy0 = max(-pad, int(np.floor(y0)) - margin)
    cx1 = min(w + pad, int(np.ceil(x1)) + margin)
    cy1 = min(h + pad, int(np.ceil(y1)) + margin)
    canvas = np.zeros((cy1 - cy0, cx1 - cx0) + image.shape[2:], image.dtype)
    sx0, sy0, sx1, sy1 = max(cx0, 0), max(cy0, 0), min(cx1, w), min(cy1, h)
    canvas[sy0 - cy0:sy1 - cy0, sx0 - cx0:sx1 - cx0] = image[sy0:sy1, sx0:sx1]
    im = Image.fromarray(canvas)
    resample = Image.BILINEAR if scale >= 1 else Image.BOX
    crop = im.resize((W, H), resample, box=(x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0))
    return np.asarray(crop, np.uint8), o
