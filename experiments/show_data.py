"""Contact sheet of a NeMo-format root with the model cuboid drawn at the annotated pose.

    nvsm-show-data --root data/synthetic/test --out sheet.png

(``data/synthetic/test``: made by ``nvsm-make-synthetic --out data/synthetic``.)

One row per subset ({cat}{occ}); each tile shows an image with the cuboid's 12
edges projected with geometry.project_pascal from the stored annotation fields
(front face, the y = min side, in red; back face in blue; the rest green) and
the annotated box in yellow. With masks, occluder pixels are outlined in magenta.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from nvsm_jax import geometry, parallel
from nvsm_jax.data.format import OCCLUSION_LEVELS, subset_name
from nvsm_jax.data.loaders import list_names, load_annotation, load_image, load_model_mesh, _find_image

from . import ArgumentParser

_EDGES = [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7)]


def _corners(object_mesh):
    lo, hi = object_mesh.verts.min(0), object_mesh.verts.max(0)
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


def draw_tile(image, ann, corners, tile):
    raw = ann["raw"]
    h, w = image.shape[:2]
    k = tile / max(h, w)
    im = Image.fromarray(image).resize((round(w * k), round(h * k)), Image.NEAREST).convert("RGB")
    d = ImageDraw.Draw(im)
    if "occluder_mask" in raw and raw["occluder_mask"].any():
        m = raw["occluder_mask"].astype(bool)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        for y, x in zip(*np.nonzero(edge)):
            d.point((x * k + k / 2, y * k + k / 2), fill=(255, 0, 255))
    uv = geometry.project_pascal(corners, raw["azimuth"], raw["elevation"], raw["theta"],
                                 raw["distance"], raw["focal"], raw["viewport"],
                                 np.asarray(raw["principal"], np.float64), xnp=np) * k
    for i, j in _EDGES:
        front = corners[i, 1] == corners[:, 1].min() and corners[j, 1] == corners[:, 1].min()
        back = corners[i, 1] == corners[:, 1].max() and corners[j, 1] == corners[:, 1].max()
        color = (255, 40, 40) if front else (60, 120, 255) if back else (40, 255, 40)
        d.line([tuple(uv[i]), tuple(uv[j])], fill=color, width=2 if front else 1)
    box = raw.get("bbox", raw.get("box"))
    if box is not None and np.size(box) >= 4:
        x0, y0, x1, y1 = np.asarray(box, np.float64).ravel()[:4] * k
        d.rectangle([x0, y0, x1, y1], outline=(255, 230, 0))
    return im


def contact_sheet(root, out, *, per_row=8, tile=128, categories=None):
    subs = sorted(os.listdir(os.path.join(root, "annotations")))
    rows = []
    for sub in subs:
        cat, occ = sub, "L0"
        for lv in OCCLUSION_LEVELS[1:]:
            suffix = subset_name("", lv)
            if sub.endswith(suffix):
                cat, occ = sub[: -len(suffix)], lv
        if categories and cat not in categories:
            continue
        try:
            object_mesh = load_model_mesh(root, cat)
        except Exception:  # no model mesh: draw boxes only
            object_mesh = None
        names = list_names(root, cat, occ)
        pick = names[:: max(1, len(names) // per_row)][:per_row]
        tiles = []
        for n in pick:
            ann = load_annotation(os.path.join(root, "annotations", sub, n + ".npz"))
            img = load_image(_find_image(root, sub, n))
            corners = _corners(object_mesh) if object_mesh is not None else np.zeros((8, 3))
            tiles.append(draw_tile(img, ann, corners, tile))
        rows.append((sub, tiles))
    th = max(t.size[1] for _, ts in rows for t in ts)
    tw = max(t.size[0] for _, ts in rows for t in ts)
    label_w = 110
    sheet = Image.new("RGB", (label_w + per_row * (tw + 2), len(rows) * (th + 2)), (30, 30, 30))
    d = ImageDraw.Draw(sheet)
    for r, (sub, tiles) in enumerate(rows):
        d.text((4, r * (th + 2) + th // 2 - 6), sub, fill=(255, 255, 255))
        for c, t in enumerate(tiles):
            sheet.paste(t, (label_w + c * (tw + 2), r * (th + 2)))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    sheet.save(out)
    return out


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True, help="a train or test root")
    p.add_argument("--out", required=True)
    p.add_argument("--per_row", type=int, default=8)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--categories", default=None)
    a = p.parse_args(argv)
    p.run(_run, a, a)


def _run(a):
    parallel.quiet_backend_probe_logs()
    cats = a.categories.split(",") if a.categories else None
    print(contact_sheet(a.root, a.out, per_row=a.per_row, tile=a.tile, categories=cats))


if __name__ == "__main__":
    main()
