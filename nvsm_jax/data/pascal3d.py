"""Raw PASCAL3D+ (release 1.1) -> the NeMo format.

Input (``root``)::

    Annotations/{cat}_imagenet/{id}.mat   key ``record``: objects(i).class, .bbox
                                          [x1 y1 x2 y2], .cad_index, .truncated,
                                          .occluded, .difficult, .viewpoint
                                          (azimuth, elevation, theta in degrees,
                                          distance, focal, px, py, viewport)
    Images/{cat}_imagenet/{id}.JPEG
    CAD/{cat}/{01,02,...}.off
    Image_sets/{cat}_imagenet_{train,val}.txt   (optional)

MATLAB pixel coordinates are 1-based with pixel centres at integers, so a
MATLAB point ``(u, v)`` is screen point ``(u - 0.5, v - 0.5)`` in our
convention (centres at +0.5): the principal point becomes ``(px - 0.5, py -
0.5)`` and the bbox ``[x1, y1, x2, y2]`` (inclusive pixel indices) becomes
pixel edges ``[x1 - 1, y1 - 1, x2, y2]``. Images are then scaled and cropped
by :mod:`nvsm_jax.data.crop` (object at NeMo's scale, fixed crop centred on
the principal point); the stored fields project exactly (see that module).

With ``Image_sets`` present, train ids go to ``out/train`` and val ids to
``out/test``; otherwise everything goes to ``out/train``. The category's model
mesh ``CAD_single/{cat}/01.off`` is NeMo's cuboid over all the category's CAD
vertices (99 % per axis, x symmetric); the original CAD files are copied to
``CAD/{cat}/``.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil

import numpy as np

from nvsm_jax import meshes
from nvsm_jax.data.crop import nemo_scale, scale_and_crop
from nvsm_jax.data.format import DataError, save_npz, write_list
from nvsm_jax.data.loaders import load_image

__all__ = ["read_record", "prepare_pascal3d", "PascalObject"]

log = logging.getLogger(__name__)


def _field(s, name, default=None):
    v = getattr(s, name, default)
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(()).item()
    return v


def _objects(rec):
    objs = _field(rec, "objects")
    if objs is None:
        return []
    if isinstance(objs, np.ndarray):
        return list(objs.reshape(-1))
    return [objs]


class PascalObject(dict):
    """One object of a record (keys: category, bbox, cad_index, truncated, occluded,
    difficult, azimuth, elevation, theta (degrees), distance, focal, px, py, viewport)."""


def read_record(path) -> tuple[str, list[PascalObject]]:
    """Reads a PASCAL3D+ ``.mat`` annotation: (image filename, objects)."""
    import scipy.io
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as err:
        raise DataError(f"{path}: cannot read .mat ({type(err).__name__}: {err})") from err
    if "record" not in mat:
        raise DataError(f"{path}: no 'record' in the .mat file")
    rec = mat["record"]
    filename = _field(rec, "filename")
    objs = []
    for o in _objects(rec):
        vp = _field(o, "viewpoint")
        entry = PascalObject(category=str(_field(o, "class", "")),
                             bbox=np.asarray(_field(o, "bbox", np.zeros(4)), np.float64).reshape(-1),
                             cad_index=int(_field(o, "cad_index", 1) or 1),
                             truncated=bool(_field(o, "truncated", 0)),
                             occluded=bool(_field(o, "occluded", 0)),
                             difficult=bool(_field(o, "difficult", 0)))
        has_vp = vp is not None and not (isinstance(vp, np.ndarray) and vp.size == 0)
        for k in ("azimuth", "elevation", "theta", "distance", "focal", "px", "py", "viewport"):
            v = _field(vp, k) if has_vp else None
            try:
                entry[k] = float(v) if v is not None and np.size(v) == 1 else np.nan
            except (TypeError, ValueError):
                entry[k] = np.nan
        objs.append(entry)
    return (str(filename) if filename is not None else None), objs


def _image_sets(root, category):
    out = {}
    for split, name in (("train", "train"), ("test", "val")):
        p = os.path.join(root, "Image_sets", f"{category}_imagenet_{name}.txt")
        if os.path.isfile(p):
            with open(p) as f:
                out[split] = {line.strip() for line in f if line.strip()}
            if not out[split]:
                log.warning("%s: the image set list is empty: no %s ids; records listed in "
                            "no set are skipped", p, split)
    return out


class _BadObject(DataError):
    """One object of a record is unusable (the record's other objects still are)."""


# Raw PASCAL3D+ angles are degrees; beyond these bounds a value is not an angle.
_DEGREE_LIMITS = {"azimuth": 360.0, "elevation": 90.0, "theta": 360.0}


def _check_viewpoint(o, mat, k):
    """Raises _BadObject naming the file, the object and the value of a nonsense field."""
    for key, bound in _DEGREE_LIMITS.items():
        if abs(o[key]) > bound + 1e-6:
            raise _BadObject(f"{mat}: object {k}: viewpoint {key} = {o[key]:g} degrees is "
                             f"outside [-{bound:g}, {bound:g}]")
    for key in ("distance", "focal", "viewport"):
        if o[key] <= 0:
            raise _BadObject(f"{mat}: object {k}: viewpoint {key} = {o[key]:g} must be positive")


def prepare_pascal3d(root, out, categories, *, crop_hw=(256, 672), target_focal=3000.0,
                     keep_truncated=False, keep_occluded=False, keep_difficult=False,
                     skip_bad=True, jpeg_quality=95) -> dict:
    """Converts raw PASCAL3D+ categories into ``out/train`` (and ``out/test``) roots.

    Objects without a viewpoint are skipped with a warning. A bad record (an
    unreadable ``.mat`` or photo) or object (an angle beyond its range in
    degrees, distance, focal or viewport <= 0, a principal point that puts the
    crop off the photo, an implausible scale) raises a DataError naming the
    ``.mat`` file, the object and the value; with ``skip_bad`` (the default) it
    is skipped with that message as a warning. An empty ``Image_sets`` list and
    records in no list are warned about.
    """
    from PIL import Image
    counts = {}
    for cat in categories:
        ann_dir = os.path.join(root, "Annotations", f"{cat}_imagenet")
        if not os.path.isdir(ann_dir):
            raise DataError(f"{ann_dir}: annotation folder not found")
        sets = _image_sets(root, cat)
        lists = {}                                  # (split, cad) -> names
        unlisted = 0
        for mat in sorted(glob.glob(os.path.join(ann_dir, "*.mat"))):
            stem = os.path.splitext(os.path.basename(mat))[0]
            split = "test" if "test" in sets and stem in sets["test"] else "train"
            if sets and stem not in sets.get("train", ()) and split != "test":
                unlisted += 1
                continue
            try:
                filename, objs = read_record(mat)
                img_path = os.path.join(root, "Images", f"{cat}_imagenet", filename or stem + ".JPEG")
                image = None
                for k, o in enumerate(objs):
                    if o["category"] != cat:
                        continue
                    if (o["truncated"] and not keep_truncated) or \
                            (o["occluded"] and not keep_occluded) or \
                            (o["difficult"] and not keep_difficult):
                        continue
                    vals = [o.get(x, np.nan) for x in ("azimuth", "elevation", "theta", "distance",
                                                      "focal", "px", "py", "viewport")]
                    if not np.all(np.isfinite(vals)):
                        log.warning("%s: object %d has no usable viewpoint, skipped", mat, k)
                        continue
                    try:
                        _check_viewpoint(o, mat, k)
                        if image is None:
                            image = load_image(img_path)
                        f_px = o["focal"] * o["viewport"]
                        s = nemo_scale(o["distance"], f_px, target_focal)
                        p_screen = np.array([o["px"] - 0.5, o["py"] - 0.5])
                        try:
                            crop, off = scale_and_crop(image, p_screen, s, crop_hw)
                        except ValueError as err:
                            raise _BadObject(f"{mat}: object {k} (px {o['px']:g}, py "
                                             f"{o['py']:g}, viewport {o['viewport']:g}, distance "
                                             f"{o['distance']:g}) in {img_path}: {err}") from err
                    except _BadObject as err:
                        if not skip_bad:
                            raise
                        log.warning("skipping %s", err)
                        continue
                    x1, y1, x2, y2 = o["bbox"]
                    box = np.array([x1 - 1, y1 - 1, x2, y2]) * s - np.concatenate([off, off])
                    name = f"{stem}_{k:02d}"
                    dst = os.path.join(out, split)
                    sub = cat
                    os.makedirs(os.path.join(dst, "images", sub), exist_ok=True)
                    Image.fromarray(crop).save(os.path.join(dst, "images", sub, name + ".JPEG"),
                                               quality=jpeg_quality)
                    H, W = crop_hw
                    save_npz(os.path.join(dst, "annotations", sub, name + ".npz"),
                             azimuth=np.deg2rad(o["azimuth"]), elevation=np.deg2rad(o["elevation"]),
                             theta=np.deg2rad(o["theta"]), distance=np.float64(o["distance"]),
                             focal=np.float64(o["focal"]), viewport=np.float64(o["viewport"] * s),
                             principal=np.array([W / 2.0, H / 2.0]), box=box, bbox=box,
                             cad_index=np.int64(o["cad_index"]), height=np.int64(H),
                             width=np.int64(W), source_image=np.str_(filename or stem),
                             scale=np.float64(s))
                    lists.setdefault((split, o["cad_index"]), []).append(name)
            except DataError as err:
                if not skip_bad:
                    raise
                log.warning("skipping %s", err)
        if unlisted:
            log.warning("%s: %d records are in neither Image_sets list (%s), skipped", ann_dir,
                        unlisted, ", ".join(f"{k}: {len(v)} ids" for k, v in sorted(sets.items())))
        if not lists:
            log.warning("%s: no crops written for %s", ann_dir, cat)
        for (split, cad), names in sorted(lists.items()):
            write_list(os.path.join(out, split, "lists", cat, f"mesh{cad:02d}.txt"), names)
            counts[f"{split}/{cat}/mesh{cad:02d}"] = len(names)
        # model mesh: NeMo's cuboid over all CAD vertices
        cad_files = sorted(glob.glob(os.path.join(root, "CAD", cat, "*.off")))
        if cad_files:
            pts = np.concatenate([meshes.load_mesh(p).verts for p in cad_files])
            cub = meshes.cuboid_for_points(pts, 0.99, 1000, symmetric_axes=(0,))
            for split in {s for s, _ in lists} or {"train"}:
                meshes.save_off(os.path.join(out, split, "CAD_single", cat, "01.off"), *cub)
                os.makedirs(os.path.join(out, split, "CAD", cat), exist_ok=True)
                for p in cad_files:
                    shutil.copy(p, os.path.join(out, split, "CAD", cat, os.path.basename(p)))
        else:
            log.warning("%s: no CAD models, CAD_single not written", os.path.join(root, "CAD", cat))
    return counts
