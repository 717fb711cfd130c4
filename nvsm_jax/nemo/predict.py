"""Poses of the object in a user's own photos (the ``nvsm-predict`` console script).

:func:`predict_images` takes a trained NeMo workdir (``nvsm-train-nemo``) or an NVSM /
NeMo cell of a few-shot experiment (``nvsm-fewshot``: ``W/nvsm_car_7`` ...), and image
files or folders (JPEG / PNG, any size), and estimates the model category's 3D pose
in each.

**Crop rule** (the real-data preparation's, :mod:`nvsm_jax.data.crop`): the photo is
scaled by ``s`` and an ``H x W`` window (the training crops' size) centred on a point
``p`` is cut out, zero-padded, with :func:`nvsm_jax.data.crop.scale_and_crop`. The
crop is then seen with the training crops' camera (:class:`ModelCamera`: their median
focal in pixels, principal point at the crop's centre), so a photo point ``x`` lands
at ``s x - o``, ``o = s p - (W/2, H/2)``:

* without a box, the image is the object's crop, framed as the training crops are:
  ``p`` is the image centre and ``s = min(H / h, W / w)`` (the whole image fits; an
  image of the training crops' size is taken unchanged, so a crop written by
  ``nvsm-make-synthetic`` is predicted exactly as ``nvsm-evaluate`` predicts it);
* with a box ``(x0, y0, x1, y1)`` (pixel edges, ``x`` = column), ``p`` is the box's
  centre (the object's centre is taken as the principal point, as in PASCAL3D+) and
  ``s`` scales the box's diagonal to :func:`reference_diagonal` (the model mesh's
  median projected box diagonal over the solver's grid poses at the grid distance):
  the object gets the size it has in the training crops.

The pose is NeMo's render-and-compare solution (:func:`nvsm_jax.nemo.pose_solver.solve`,
the workdir's solver settings, as the evaluation). ``distance`` is in the crop's
camera (model units for the training focal), not metres.

**Second hypothesis**: the grid pose with the lowest loss among those more than
``min_separation_deg`` (45 degrees of rotation) from the prediction, refined like the
prediction; if its refinement comes back within that angle, the grid pose itself and
its grid score are reported. It answers "how close was the other reading (front vs
back)?": a second score near the first, or above it (the prediction refines only the
solver's ``top_k`` best grid poses, as the evaluation does), means an ambiguous photo.

Outputs (``out_dir``): ``predictions.jsonl`` (one record per image, angles in
degrees), ``overlays/NNNN_<name>.png`` (the cuboid's wireframe at the predicted pose
on the photo, yellow, the object's x / y / z axes as red / green / blue arrows, a key
in the corner; a photo under :data:`OVERLAY_MIN_SIZE` px is drawn enlarged) and
``contact_sheet.png``.

A bad input is an :class:`nvsm_jax.errors.InputError` naming the file: an unreadable
image (:class:`nvsm_jax.data.DataError`), a box outside the image or of zero area
(:class:`BoxError`), a workdir that holds no trained model (:class:`RunStateError`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from nvsm_jax import geometry
from nvsm_jax.nemo import pose_solver
from nvsm_jax.data.format import IMAGE_EXTENSIONS, DataError
from nvsm_jax.errors import RunStateError

__all__ = ["BoxError", "ModelCamera", "Crop", "load_predictor", "model_camera",
           "reference_diagonal", "check_box", "crop_for_box", "second_hypotheses",
           "draw_wireframe", "contact_sheet", "list_images", "read_boxes", "predict_images"]

log = logging.getLogger(__name__)

#: Wireframe colour of the overlays (RGB).
WIRE_COLOR = (255, 215, 0)
#: Colours of the object's x, y, z axes in the overlays.
AXIS_COLORS = ((230, 40, 40), (40, 200, 40), (60, 110, 255))


class BoxError(DataError):
    """An object box that is not 4 finite numbers, has no area or leaves the image."""


class ModelCamera(NamedTuple):
    """The camera of the model's training crops: image_hw (H, W); focal (pixels, their
    median); principal [2] (the crop's centre, screen coordinates); size_focal: the
    focal at which the object, at the solver's distance, has its training size (the
    median of ``focal * D / d``; a box is scaled to the mesh's size at it)."""

    image_hw: tuple[int, int]
    focal: float
    principal: np.ndarray
    size_focal: float


class Crop(NamedTuple):
    """image: [H, W, 3] uint8 crop; scale s and offset o [2]: photo point x is crop
    point ``s x - o``."""

    image: np.ndarray
    scale: float
    offset: np.ndarray


# --------------------------------------------------------------------------- the model

def _trained_cells(workdir) -> list[str]:
    try:
        subs = sorted(os.listdir(workdir))
    except OSError:
        return []
    return [d for d in subs if os.path.isdir(os.path.join(workdir, d, "checkpoints"))
            and os.path.isfile(os.path.join(workdir, d, "config.json"))]


def load_predictor(workdir):
    """The :class:`nvsm_jax.nemo.train.NemoModel` of a trained NeMo workdir or NVSM / NeMo
    cell (latest checkpoint). A folder without ``config.json`` or checkpoints, a
    few-shot experiment's top folder (its cells are named), or non-finite weights
    raise :class:`RunStateError` / ``NonFiniteError`` naming the folder."""
    from nvsm_jax.nemo import train

    workdir = os.fspath(workdir)
    hint = ("pass the --workdir of nvsm-train-nemo, or a cell folder of nvsm-fewshot "
            "(W/nvsm_car_7, W/nemo_car_7, ...)")
    if not os.path.isdir(workdir):
        raise RunStateError(f"{workdir}: workdir not found; {hint}")
    ckpt = os.path.join(workdir, "checkpoints")
    steps = ([d for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else [])
    if not os.path.isfile(os.path.join(workdir, "config.json")) or not steps:
        cells = [c for c in _trained_cells(workdir) if c.startswith(("nvsm_", "nemo"))]
        if cells:
            shown = ", ".join(cells[:6]) + (" ..." if len(cells) > 6 else "")
            raise RunStateError(f"{workdir}: a few-shot experiment's folder, not one model; "
                                f"pass one of its cells: {shown}")
        raise RunStateError(f"{workdir}: not a trained model (no config.json and checkpoint); "
                            f"{hint}")
    nemo = train.load_model(workdir)
    from nvsm_jax.nemo import evaluate

    evaluate.checkpoint_record(workdir, nemo)        # refuses NaN / infinite weights
    return nemo


def model_camera(config, *, limit: int = 64) -> ModelCamera:
    """The training crops' camera (:class:`ModelCamera`) over the first ``limit`` images
    of ``config.data_root``'s L0 subset: their size and median focal, the principal at
    the centre, and the focal at which the object at the solver's distance ``D`` has its
    training size (median of ``focal * D / d``: prepared real crops fix the object's
    size, so their focal grows with the distance ``d``; synthetic crops have ``d`` near
    ``D``)."""
    from nvsm_jax.data import loaders

    root = config.data_root
    if not root or not os.path.isdir(root):
        raise RunStateError(f"{root}: the model's training root (config.json data_root) is "
                            "not found; predicting needs its crop size, camera and model mesh")
    train = loaders.load_pose_set(root, config.category, "L0", limit=limit, lazy_images=True)
    h, w = train.image_size
    scale = float(config.solver.distance) / np.asarray(train.poses[:, 3], np.float64)
    return ModelCamera((int(h), int(w)), float(np.median(train.focal)),
                       np.array([w / 2.0, h / 2.0]), float(np.median(train.focal * scale)))


def reference_diagonal(verts, focal: float, grid) -> float:
    """Median diagonal (pixels) of the mesh's projected bounding box over the poses
    ``grid`` [G, 4]. verts: [V, 3]; focal: pixels."""
    scr = geometry.project_to_screen(np.asarray(verts, np.float64), np.asarray(grid, np.float64),
                                     float(focal), np.zeros(2), xnp=np)        # [G, V, 3]
    ext = scr[..., :2].max(-2) - scr[..., :2].min(-2)                         # [G, 2]
    return float(np.median(np.hypot(ext[:, 0], ext[:, 1])))


# --------------------------------------------------------------------------- crops

def check_box(box, image_hw, source: str = "<image>") -> np.ndarray:
    """``box`` as [4] float64 ``(x0, y0, x1, y1)``; raises BoxError naming ``source``
    unless it is 4 finite numbers with ``x1 > x0``, ``y1 > y0`` inside the
    ``image_hw`` image (pixel edges: ``0 <= x0``, ``x1 <= w``)."""
    try:
        b = np.asarray(box, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise BoxError(f"{source}: box {box!r} is not 4 numbers x0,y0,x1,y1") from None
    if b.size != 4 or not np.all(np.isfinite(b)):
        raise BoxError(f"{source}: box {box!r} is not 4 finite numbers x0,y0,x1,y1")
    x0, y0, x1, y1 = b
    h, w = image_hw
    if x1 <= x0 or y1 <= y0:
        raise BoxError(f"{source}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) has zero area "
                       "(it needs x1 > x0 and y1 > y0)")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise BoxError(f"{source}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) reaches outside "
                       f"the {w} x {h} image")
    return b


def crop_for_box(image, box, camera: ModelCamera, ref_diag: float) -> Crop:
    """The model's crop of ``image`` [h, w, 3] uint8 (module docstring's rule).

    box: None (the image is the object's crop) or a checked (x0, y0, x1, y1);
    ref_diag: :func:`reference_diagonal` (pixels in the crop)."""
    from nvsm_jax.data.crop import scale_and_crop

    h, w = image.shape[:2]
    H, W = camera.image_hw
    if box is None:
        centre, scale = np.array([w / 2.0, h / 2.0]), min(H / h, W / w)
    else:
        x0, y0, x1, y1 = np.asarray(box, np.float64)
        centre = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])
        scale = ref_diag / float(np.hypot(x1 - x0, y1 - y0))
    crop, offset = scale_and_crop(image, centre, scale, (H, W))
    return Crop(crop, float(scale), np.asarray(offset, np.float64))


# --------------------------------------------------------------------------- second hypothesis

def second_hypotheses(grid, grid_losses, best_pose, min_separation: float):
    """The best grid pose more than ``min_separation`` (radians of rotation) from each
    image's prediction. grid: [G, 4]; grid_losses: [B, G]; best_pose: [B, 4] ->
    (poses [B, 4], losses [B]); an image with no such grid pose gets its best grid pose."""
    grid = np.asarray(grid, np.float64)
    best = np.asarray(best_pose, np.float64)
    losses = np.asarray(grid_losses, np.float64)
    far = geometry.pose_error(best[:, None, :3], grid[None, :, :3], xnp=np) > min_separation
    masked = np.where(far, losses, np.inf)
    idx = np.where(far.any(1), np.argmin(masked, 1), np.argmin(losses, 1))
    return grid[idx].astype(np.float32), losses[np.arange(len(idx)), idx]


# --------------------------------------------------------------------------- drawing

def _to_photo(points_xy, scale, offset):
    return (np.asarray(points_xy) + np.asarray(offset)) / scale


def draw_wireframe(image, pose, verts, focal: float, principal, *, scale: float = 1.0,
                   offset=(0.0, 0.0), width: int | None = None, axes: bool = True,
                   key: bool = True) -> np.ndarray:
    """The mesh's bounding-box wireframe (12 edges: a NeMo cuboid's) at ``pose`` drawn
    on ``image`` [h, w, 3] uint8 -> a new [h, w, 3] uint8 image.

    pose [4], focal (pixels) and principal [2] are the crop's camera; ``scale`` and
    ``offset`` map crop points back to the photo (x_photo = (x_crop + o) / s, see
    :class:`Crop`). axes: the object's x, y, z axes as red / green / blue arrows from
    its centre to its faces; key: a "pose x y z" key in the top-left corner. Edges with a
    vertex behind the camera are left out."""
    from PIL import Image, ImageDraw, ImageFont

    from nvsm_jax.figures import box_edges

    out = Image.fromarray(np.ascontiguousarray(image, np.uint8))
    draw = ImageDraw.Draw(out)
    h, w = image.shape[:2]
    width = width or max(1, int(round(max(h, w) / 250)))
    corners, edges = box_edges(verts)
    lo, hi = corners.min(0), corners.max(0)
    centre = (lo + hi) / 2.0
    tips = centre + np.diag((hi - lo) / 2.0)                                 # [3, 3]
    pts = np.concatenate([corners, centre[None], tips])
    scr = geometry.project_to_screen(pts, np.asarray(pose, np.float64), float(focal),
                                     np.asarray(principal, np.float64), xnp=np)
    front = scr[:, 2] > 1e-6
    xy = _to_photo(scr[:, :2], scale, offset) - 0.5        # PIL: pixel (c, r) at (c, r)
    for a, b in edges:
        if front[a] and front[b]:
            draw.line([tuple(xy[a]), tuple(xy[b])], fill=WIRE_COLOR, width=width)
    if axes:
        c = 8
        for k in range(3):
            if front[c] and front[c + 1 + k]:
                tip = xy[c + 1 + k]
                draw.line([tuple(xy[c]), tuple(tip)], fill=AXIS_COLORS[k], width=width + 1)
                r = width + 1.5
                draw.ellipse([tip[0] - r, tip[1] - r, tip[0] + r, tip[1] + r],
                             fill=AXIS_COLORS[k])
    if key:                                 # about 1/30 of the image high, 10 px at least
        size = max(10, min(h, w) // 30)
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:                   # Pillow < 10.1: one bitmap size
            font, size = ImageFont.load_default(), 10
        draw.rectangle([0, 0, int(8.4 * size), int(1.3 * size)], fill=(0, 0, 0))
        draw.text((0.3 * size, 0.1 * size), "pose", fill=WIRE_COLOR, font=font)
        for k, name in enumerate("xyz"):
            draw.text((3.3 * size + 1.5 * size * k, 0.1 * size), name, fill=AXIS_COLORS[k],
                      font=font)
    return np.asarray(out)


#: Overlays of photos smaller than this (pixels, longer side) are drawn on the photo
#: enlarged by a whole factor, so that the key and the lines stay small beside the object.
OVERLAY_MIN_SIZE = 256


def overlay(photo, pose, verts, focal: float, principal, crop: "Crop") -> np.ndarray:
    """:func:`draw_wireframe` of ``pose`` on ``photo`` [h, w, 3] uint8, the photo first
    enlarged ``k`` times (nearest pixel; ``k`` the least whole factor that brings its
    longer side to :data:`OVERLAY_MIN_SIZE`, 1 for larger photos) -> [k h, k w, 3]."""
    from PIL import Image

    h, w = photo.shape[:2]
    k = max(1, -(-OVERLAY_MIN_SIZE // max(h, w)))
    if k > 1:
        photo = np.asarray(Image.fromarray(np.asarray(photo, np.uint8)).resize(
            (w * k, h * k), Image.NEAREST))
    # x_big = k x_photo = (x_crop + o) / (s / k)
    return draw_wireframe(photo, pose, verts, focal, principal, scale=crop.scale / k,
                          offset=crop.offset)


def contact_sheet(images: Sequence[np.ndarray], captions: Sequence[str], path, *,
                  height: int = 200, ncols: int = 4) -> str:
    """The images (scaled to ``height`` px) in a grid with a caption under each; saved
    as a PNG at ``path``. Returns the path."""
    from PIL import Image, ImageDraw

    thumbs = []
    for im in images:
        pil = Image.fromarray(np.asarray(im, np.uint8))
        w = max(1, int(round(pil.width * height / pil.height)))
        thumbs.append(pil.resize((w, height), Image.BILINEAR))
    ncols = max(1, min(ncols, len(thumbs)))
    cell_w = max(t.width for t in thumbs) + 8
    cell_h = height + 8 + 14 * max(1, max(c.count("\n") + 1 for c in captions))
    nrows = -(-len(thumbs) // ncols)
    sheet = Image.new("RGB", (cell_w * ncols, cell_h * nrows), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (t, cap) in enumerate(zip(thumbs, captions)):
        x, y = (i % ncols) * cell_w + 4, (i // ncols) * cell_h + 4
        sheet.paste(t, (x, y))
        draw.multiline_text((x, y + height + 2), cap, fill=(0, 0, 0), spacing=2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return os.fspath(path)


# --------------------------------------------------------------------------- inputs

def list_images(images) -> list[str]:
    """Image files from paths and folders (a folder's JPEG / PNG files, sorted); a
    missing path or an empty selection raises DataError naming it."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    out = []
    for p in images:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p)
                           if n.endswith(IMAGE_EXTENSIONS))
            if not found:
                raise DataError(f"{p}: no JPEG or PNG images in the folder")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise DataError(f"{p}: image not found")
    if not out:
        raise DataError("no images given")
    return out


def read_boxes(path) -> dict:
    """Boxes per image from a file: JSON ``{"image": [x0, y0, x1, y1], ...}`` or CSV rows
    ``image,x0,y0,x1,y1`` (a header row is skipped). Keys are file names or paths."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: box file not found")
    with open(path, newline="") as f:
        text = f.read()
    if path.lower().endswith(".json"):
        try:
            boxes = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not JSON ({err})") from None
        if not isinstance(boxes, dict):
            raise DataError(f'{path}: expected a JSON object {{"image": [x0, y0, x1, y1]}}')
        return boxes
    boxes = {}
    for i, row in enumerate(csv.reader(text.splitlines())):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 5:
            raise DataError(f"{path}: line {i + 1}: expected image,x0,y0,x1,y1, got {row}")
        try:
            boxes[row[0].strip()] = [float(v) for v in row[1:]]
        except ValueError:
            if i == 0:
                continue                # header
            raise DataError(f"{path}: line {i + 1}: box {row[1:]} is not 4 numbers") from None
    return boxes


def _box_for(boxes, i, path):
    """The box of image ``i`` (``path``): None without boxes; from a mapping (a boxes
    file) by path, absolute path or file name, and an image the file does not name is
    a BoxError (a misspelt name would otherwise crop the whole photo silently)."""
    if boxes is None:
        return None
    if isinstance(boxes, Mapping):
        for key in (path, os.path.abspath(path), os.path.basename(path)):
            if key in boxes:
                return boxes[key]
        raise BoxError(f"{path}: the boxes file names no box for this image (by path or "
                       f"file name; it names {len(boxes)} images, e.g. "
                       f"{sorted(boxes)[:2]}); add it, or predict it without --boxes")
    return boxes[i]


# --------------------------------------------------------------------------- prediction

def _degrees(pose) -> dict:
    """pose [4] radians -> azimuth in [0, 360), elevation, theta in (-180, 180], distance."""
    a, e, t, d = (float(v) for v in pose)
    return {"azimuth": float(np.degrees(np.mod(a, 2 * np.pi))),
            "elevation": float(np.degrees(e)),
            "theta": float(180.0 - np.degrees(np.mod(np.pi - t, 2 * np.pi))), "distance": d}


def predict_images(workdir, images, boxes=None, *, out_dir=None, solver: str = "config",
                   batch_size: int | None = None, min_separation_deg: float = 45.0,
                   progress: bool = True) -> list[dict]:
    """Pose of the object in each image (module docstring: crop rule, outputs).

    workdir: a trained NeMo workdir or few-shot cell. images: a path, a folder or a
    list of them. boxes: None, a list aligned with the images (None entries: no box),
    a dict ``{file name or path: box}``, or a JSON / CSV file of them (:func:`read_boxes`).
    solver: "config" (the workdir's), "reference" or "fast". out_dir: where
    ``predictions.jsonl``, ``overlays/`` and ``contact_sheet.png`` go (None: nothing
    written). Returns one record per image: ``image``, ``box``, ``azimuth``,
    ``elevation``, ``theta`` (degrees), ``distance``, ``score`` and ``second`` (the
    second hypothesis: the same keys), plus ``overlay`` when written.
    """
    paths, photos, checked = _read_inputs(images, boxes, solver)
    nemo = load_predictor(workdir)
    cfg = nemo.config
    camera = model_camera(cfg)
    solver_cfg = pose_solver.settings_for(cfg, solver)
    ref_diag = reference_diagonal(nemo.object_mesh.verts, camera.size_focal, solver_cfg.grid())
    crops = [crop_for_box(photo, box, camera, ref_diag) for photo, box in zip(photos, checked)]
    bs = int(batch_size or cfg.eval_batch_size)
    best, score, second, second_score = _solve_crops(
        nemo, crops, camera, solver_cfg, bs, np.deg2rad(min_separation_deg), progress)
    records = _records(paths, checked, best, score, second, second_score)
    if out_dir is not None:
        _write_outputs(out_dir, records, photos, crops, best, score, nemo, camera)
    return records


def _read_inputs(images, boxes, solver: str):
    """:func:`predict_images`' inputs, every one checked before the model is loaded ->
    (image paths, photos [h, w, 3] uint8, boxes: None or [4] float64 per image)."""
    from nvsm_jax.data import loaders

    paths = list_images(images)
    if isinstance(boxes, (str, os.PathLike)):
        boxes = read_boxes(boxes)
    if boxes is not None and not isinstance(boxes, Mapping) and len(boxes) != len(paths):
        raise DataError(f"{len(boxes)} boxes for {len(paths)} images")
    if solver not in pose_solver.SETTINGS:
        raise ValueError(f"solver must be one of {pose_solver.SETTINGS}, got {solver!r}")
    photos, checked = [], []
    for i, p in enumerate(paths):
        photo = loaders.load_image(p)
        box = _box_for(boxes, i, p)
        checked.append(None if box is None else check_box(box, photo.shape[:2], p))
        photos.append(photo)
    return paths, photos, checked


def _solve_crops(nemo, crops, camera: ModelCamera, solver_cfg, batch_size: int, min_sep: float,
                 progress: bool):
    """:func:`_solve_chunk` over the crops, ``batch_size`` at a time (the last chunk padded,
    then cut back), all seen with ``camera``; min_sep: radians -> (poses [N, 4],
    scores [N], second poses [N, 4], second scores [N])."""
    from nvsm_jax import parallel, training
    from nvsm_jax.nemo import features as feat
    from nvsm_jax.nemo import train

    bs = batch_size
    features = train.feature_fn(nemo)
    clutter = feat.clutter_prototype(nemo.memory.clutter)
    n = len(crops)
    focal = np.full(n, camera.focal, np.float32)
    principal = np.tile(np.asarray(camera.principal, np.float32), (n, 1))
    all_images = np.stack([c.image for c in crops])
    starts = range(0, n, bs)
    if progress:
        starts = training.progress_bar(starts, total=len(starts), desc="predict")
    outs = []
    for s in starts:
        (chunk, f, c), m = parallel.pad_to_multiple(
            (all_images[s:s + bs], focal[s:s + bs], principal[s:s + bs]), bs)
        out = _solve_chunk(features, nemo, clutter, chunk, geometry.Intrinsics(f, c), solver_cfg,
                           min_sep)
        outs.append([x[:m] for x in out])
    return tuple(np.concatenate(x) for x in zip(*outs))


def _solve_chunk(features, nemo, clutter, images, cameras, solver_cfg, min_sep: float):
    """:func:`nvsm_jax.nemo.pose_solver.solve` of one chunk and its second hypotheses
    (module docstring). features: the jitted :func:`nvsm_jax.nemo.train.feature_fn`;
    clutter: the prototype [D]; images: [B, H, W, 3] uint8 crops; cameras: their
    :class:`nvsm_jax.geometry.Intrinsics`, focal [B] and principal [B, 2] -> (poses
    [B, 4], scores [B], second poses [B, 4], second scores [B])."""
    import jax
    import jax.numpy as jnp

    stride = int(nemo.config.model.stride)
    verts, faces = nemo.object_mesh
    f, c = cameras
    fmaps = features(images)
    r = pose_solver.solve(fmaps, nemo.memory.vertex, clutter, verts, faces, f, c,
                          stride=stride, solver_cfg=solver_cfg)
    init, init_loss = second_hypotheses(solver_cfg.grid(), r.grid_losses, r.pose, min_sep)
    if solver_cfg.steps > 0:
        refined, loss, _ = pose_solver.refine(   # the cameras as solve() passes them
            fmaps, nemo.memory.vertex, clutter, verts, faces,
            jnp.asarray(f, jnp.float32) / stride, jnp.asarray(c, jnp.float32) / stride,
            jax.device_put(init[:, None], nemo.memory.vertex.sharding), solver_cfg)
        refined, loss = np.asarray(refined)[:, 0], np.asarray(loss)[:, 0]
        far = geometry.pose_error(refined.astype(np.float64), r.pose.astype(np.float64),
                                  xnp=np) > min_sep
        sec = np.where(far[:, None], refined, init)
        sec_loss = np.where(far, loss, init_loss)
    else:
        sec, sec_loss = init, init_loss
    return r.pose, r.score, sec, 1.0 - sec_loss


def _records(paths, checked, poses, scores, second, second_scores) -> list[dict]:
    """:func:`predict_images`' records (without ``overlay``): poses / second [N, 4]
    radians, scores / second_scores [N], checked: None or a box per image."""
    records = []
    for i, p in enumerate(paths):
        rec = {"image": p, "box": None if checked[i] is None else checked[i].tolist()}
        rec.update(_degrees(poses[i]))
        rec["score"] = float(scores[i])
        rec["second"] = dict(_degrees(second[i]), score=float(second_scores[i]))
        records.append(rec)
    return records


def _write_outputs(out_dir, records, photos, crops, best, score, nemo, camera):
    from PIL import Image

    over_dir = os.path.join(out_dir, "overlays")
    os.makedirs(over_dir, exist_ok=True)
    overlays, captions = [], []
    for i, rec in enumerate(records):
        ov = overlay(photos[i], best[i], nemo.object_mesh.verts, camera.focal, camera.principal,
                     crops[i])
        name = os.path.splitext(os.path.basename(rec["image"]))[0]
        path = os.path.join(over_dir, f"{i:04d}_{name}.png")
        Image.fromarray(ov).save(path)
        rec["overlay"] = path
        overlays.append(ov)
        captions.append(f"{name[:28]}\naz {rec['azimuth']:.0f} el {rec['elevation']:.0f} "
                        f"th {rec['theta']:.0f}  score {rec['score']:.2f}\n2nd az "
                        f"{rec['second']['azimuth']:.0f} el {rec['second']['elevation']:.0f} "
                        f"score {rec['second']['score']:.2f}")
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    contact_sheet(overlays, captions, os.path.join(out_dir, "contact_sheet.png"))
    log.info("wrote %s, %s/ and %s", os.path.join(out_dir, "predictions.jsonl"), over_dir,
             os.path.join(out_dir, "contact_sheet.png"))
