"""2D appearance for the synthetic data (numpy + PIL): backgrounds, occluders, noise.

Everything draws from a caller-supplied ``np.random.Generator`` so that an
image is a pure function of its seed.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["random_color", "background", "texture", "occlude", "photometric",
           "OcclusionError"]


class OcclusionError(RuntimeError):
    """The occluder search could not reach the requested occluded fraction."""


def random_color(rng, n=None, sat=(0.2, 1.0), val=(0.15, 1.0)):
    """Random RGB in [0, 1] drawn in HSV (varied hue, saturation and value).

    n=None: one colour [3]; else [n, 3].
    """
    if n is None:
        h, s, v = rng.random(), rng.uniform(*sat), rng.uniform(*val)
        return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32)
    h = rng.random(n)
    s = rng.uniform(*sat, n)
    v = rng.uniform(*val, n)
    return np.array([colorsys.hsv_to_rgb(*x) for x in zip(h, s, v)], np.float32).reshape(n, 3)


def _smooth_field(rng, hw, cells, channels):
    """A smooth random field in [0, 1]: bicubic upsampling of a coarse grid."""
    h, w = hw
    coarse = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    img = Image.fromarray(coarse if channels == 3 else coarse[..., 0])
    up = np.asarray(img.resize((w, h), Image.BICUBIC), np.float32) / 255.0
    return up if channels == 3 else up[..., None]


def texture(rng, hw, base=None):
    """A procedural texture [H, W, 3] in [0, 1]: stripes, checks, blobs or grain."""
    h, w = hw
    base = random_color(rng) if base is None else base
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(4)
    ang = rng.uniform(0, np.pi)
    freq = rng.uniform(0.08, 0.6)
    u = np.cos(ang) * xx + np.sin(ang) * yy
    v = -np.sin(ang) * xx + np.cos(ang) * yy
    if kind == 0:
        pat = 0.5 + 0.5 * np.sign(np.sin(freq * u))[..., None]
    elif kind == 1:
        pat = 0.5 + 0.5 * (np.sign(np.sin(freq * u) * np.sin(freq * v)))[..., None]
    elif kind == 2:
        pat = _smooth_field(rng, hw, int(rng.integers(3, 10)), 1)
    else:
        pat = rng.random((h, w, 1)).astype(np.float32)
    other = random_color(rng)
    return base * pat + other * (1 - pat) * rng.uniform(0.3, 1.0)


def background(rng, hw) -> np.ndarray:
    """A cluttered background [H, W, 3] float32 in [0, 1].

    A smooth random colour field, 4-13 random shapes (ellipses, polygons,
    rotated boxes; solid or textured) and sometimes a horizon-like split.
    Solid shapes are drawn straight into a PIL image (fast); textured ones are
    pasted through their mask.
    """
    h, w = hw
    img = _smooth_field(rng, hw, int(rng.integers(2, 6)), 3) * rng.uniform(0.4, 1.0) \
        + random_color(rng) * rng.uniform(0.0, 0.5)
    im = Image.fromarray(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    num = int(rng.integers(4, 14))
    for _ in range(num):
        pts, _ = _shape_points(rng, center=rng.uniform(0, 1, 2) * (w, h),
                               size=rng.uniform(0.08, 0.45) * max(h, w))
        if rng.random() < 0.4:
            mask = Image.new("L", (w, h), 0)
            ImageDraw.Draw(mask).polygon(pts, fill=255)
            bbox = mask.getbbox()
            if bbox is None:
                continue
            x0, y0, x1, y1 = bbox
            tex = texture(rng, (y1 - y0, x1 - x0))
            tex = Image.fromarray(np.clip(np.rint(tex * 255), 0, 255).astype(np.uint8))
            im.paste(tex, (x0, y0), mask.crop(bbox))
        else:
            draw.polygon(pts, fill=tuple(int(v) for v in np.rint(random_color(rng) * 255)))
    out = np.asarray(im, np.float32) * (1.0 / 255.0)
    # a horizon-like split sometimes
    if rng.random() < 0.3:
        y0 = int(rng.uniform(0.3, 0.8) * h)
        out[y0:] = out[y0:] * 0.5 + random_color(rng) * 0.5
    return out


def _paint(image, mask, make_texture):
    """image[mask] = texture, computing the texture on the mask's bounding box only."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if len(rows) == 0:
        return
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    m = mask[sl]
    tex = make_texture(m.shape)
    image[sl][m] = tex[m]


def _shape_points(rng, center, size, scale=1.0, params=None):
    """Polygon of a random ellipse / polygon / rotated box: (points, params).

    Passing ``params`` back gives the same shape at another ``scale``.
    """
    if params is None:
        kind = int(rng.integers(3))
        ang = rng.uniform(0, 2 * np.pi)
        if kind == 0:
            params = {"kind": 0, "ax": rng.uniform(0.4, 1.0), "ay": rng.uniform(0.4, 1.0), "ang": ang}
        elif kind == 1:
            n = int(rng.integers(3, 8))
            t = np.sort(rng.uniform(0, 2 * np.pi, n))
            params = {"kind": 1, "t": t, "r": rng.uniform(0.4, 1.0, n)}
        else:
            params = {"kind": 2, "ax": rng.uniform(0.3, 1.0), "ay": rng.uniform(0.3, 1.0), "ang": ang}
    r = size * scale
    cx, cy = center
    if params["kind"] == 1:
        pts = [(cx + r * rr * np.cos(tt), cy + r * rr * np.sin(tt))
               for tt, rr in zip(params["t"], params["r"])]
    else:
        m = 32 if params["kind"] == 0 else 4
        t = np.linspace(0, 2 * np.pi, m, endpoint=False) + (np.pi / 4 if m == 4 else 0)
        ex, ey = r * params["ax"] * np.cos(t), r * params["ay"] * np.sin(t)
        if m == 4:
            ex, ey = ex * np.sqrt(2), ey * np.sqrt(2)
        c, s = np.cos(params["ang"]), np.sin(params["ang"])
        pts = [(cx + c * a - s * b, cy + s * a + c * b) for a, b in zip(ex, ey)]
    return [(float(x), float(y)) for x, y in pts], params


def _shape_mask(rng, hw, center, size, scale=1.0, params=None):
    """Boolean mask of a random shape (PIL-drawn): (mask, params)."""
    h, w = hw
    pts, params = _shape_points(rng, center, size, scale, params)
    im = Image.new("L", (w, h), 0)
    ImageDraw.Draw(im).polygon(pts, fill=1)
    return np.asarray(im, bool), params


def occlude(image, object_mask, frac_range, rng, max_shapes: int = 60):
    """Composites textured occluders until the occluded fraction is in range.

    image: [H, W, 3] float in [0, 1]; object_mask: [H, W] bool (full silhouette);
    frac_range: (lo, hi) fraction of object pixels to cover. Occluders are
    added one at a time, each centred on a random object pixel; one that would
    overshoot ``hi`` is shrunk by bisection on its scale (or dropped).
    Returns (image, occluder_mask, fraction). Raises OcclusionError when the
    range cannot be reached.
    """
    lo, hi = frac_range
    h, w = object_mask.shape
    n_obj = int(object_mask.sum())
    if n_obj == 0:
        raise OcclusionError("empty object mask")
    occ = np.zeros_like(object_mask)
    ys, xs = np.nonzero(object_mask)
    obj_size = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    image = image.copy()

    def frac(m):
        return float((m & object_mask).sum()) / n_obj

    for k in range(max_shapes):
        i = int(rng.integers(len(xs)))
        center = (xs[i] + rng.uniform(0, 1), ys[i] + rng.uniform(0, 1))
        size = obj_size * rng.uniform(0.15, 0.45) * (1 + 0.02 * k)
        m, params = _shape_mask(rng, (h, w), center, size)
        new = occ | m
        f = frac(new)
        if f > hi:                                 # shrink this shape until f <= hi
            s_lo, s_hi, found = 0.0, 1.0, None
            for _ in range(14):
                s = 0.5 * (s_lo + s_hi)
                m, _ = _shape_mask(rng, (h, w), center, size, scale=s, params=params)
                f = frac(occ | m)
                if f > hi:
                    s_hi = s
                elif f < lo:
                    s_lo = s
                    found = (m, f) if found is None or f > found[1] else found
                else:
                    found = (m, f)
                    break
            if found is None:
                continue
            m, f = found
            new = occ | m
        shade = rng.uniform(0.6, 1.1)
        _paint(image, m, lambda shape: texture(rng, shape) * shade)
        occ = new
        if lo <= f <= hi:
            return image, occ, f
    raise OcclusionError(f"could not reach an occluded fraction in [{lo}, {hi}] "
                         f"(reached {frac(occ):.3f})")


def photometric(image, rng):
    """Random brightness, contrast and Gaussian noise; float [0, 1] -> uint8."""
    mean = image.mean()
    x = (image - mean) * rng.uniform(0.75, 1.25) + mean + rng.uniform(-0.08, 0.08)
    x = x + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 0.025))
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
