"""Loading a NeMo-format root into memory (:class:`PoseSet`).

Works unchanged on generated synthetic roots, NeMo-preprocessed PASCAL3D+ and
OccludedPASCAL3D+ (``.JPEG`` images, no masks -> ``None``), and the roots that
``experiments.prepare_pascal3d`` / ``experiments.prepare_kitti`` write.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os

import numpy as np

from nvsm_jax import meshes
from nvsm_jax.data.format import (IMAGE_EXTENSIONS, REQUIRED_KEYS, DataError, read_list,
                                  subset_name)

__all__ = ["PoseSet", "load_pose_set", "load_model_mesh", "load_annotation", "load_image",
           "list_names", "subset_names", "ImageFiles"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PoseSet:
    """A labelled set of one category, everything in memory as numpy arrays.

    images: [N, H, W, 3] uint8; poses: [N, 4] float32 (azimuth, elevation,
    theta, distance; radians); focal: [N] float32 pixels (= focal * viewport);
    principal: [N, 2] float32 (px, py) screen coordinates; object_mask /
    occluder_mask: [N, H, W] bool or None (real data has none).
    """

    category: str
    names: tuple[str, ...]
    images: np.ndarray
    poses: np.ndarray
    focal: np.ndarray
    principal: np.ndarray
    object_mask: np.ndarray | None = None
    occluder_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])

    def subset(self, indices) -> "PoseSet":
        """The rows ``indices`` (in that order)."""
        idx = np.asarray(indices, np.int64)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return PoseSet(self.category, tuple(self.names[i] for i in idx), self.images[idx],
                       self.poses[idx], self.focal[idx], self.principal[idx],
                       pick(self.object_mask), pick(self.occluder_mask))


class ImageFiles:
    """Images read from their files when indexed: an ``[N, H, W, 3]`` uint8 array-like.

    ``load_pose_set(..., lazy_images=True)`` gives a PoseSet whose ``images`` is one,
    so a process of a multi-process run reads only the images it uses: its rows of
    each batch (``BatchIterator.batch(step, rows)``) and its share of the E-step's
    pool (``estep.pool_features``). Indexing the first axis with a slice or
    an index array gives another ImageFiles (nothing read yet: ``PoseSet.subset``,
    few-shot splits); an integer, ``np.asarray`` or ``np.concatenate`` read the files.
    Nothing is cached. ``reads`` (shared by every ImageFiles indexed from one) counts
    the reads per file; ``read_paths`` are the files read so far.
    """

    def __init__(self, paths, image_hw, reads: dict | None = None):
        self.paths = tuple(paths)
        self.shape = (len(self.paths), int(image_hw[0]), int(image_hw[1]), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4
        self.reads = {} if reads is None else reads

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def read_paths(self) -> set:
        return set(self.reads)

    def _read(self, path) -> np.ndarray:
        img = load_image(path)
        if img.shape != self.shape[1:]:
            raise DataError(f"{path}: image size {img.shape[:2]} differs from the "
                            f"{self.shape[1:3]} of its set")
        self.reads[path] = self.reads.get(path, 0) + 1
        return img

    def __getitem__(self, key):
        if isinstance(key, tuple):
            first = self[key[0]]
            rest = (slice(None),) + key[1:] if not isinstance(key[0], (int, np.integer)) \
                else key[1:]
            return np.asarray(first)[rest]
        if isinstance(key, (int, np.integer)):
            return self._read(self.paths[key])
        idx = np.arange(len(self.paths))[key]
        return ImageFiles([self.paths[i] for i in np.atleast_1d(idx)], self.shape[1:3],
                          self.reads)

    def __array__(self, dtype=None, copy=None):
        if not self.paths:
            out = np.zeros(self.shape, np.uint8)
        else:
            out = np.stack([self._read(p) for p in self.paths])
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype, **kw):
        return np.asarray(self).astype(dtype, **kw)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files, {self.shape[1]}x{self.shape[2]})"


def _image_size(path) -> tuple[int, int]:
    """(H, W) from the file's header (nothing decoded)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except FileNotFoundError as err:
        raise DataError(f"{path}: image not found") from err
    except Exception as err:  # noqa: BLE001 - PIL raises several types
        raise DataError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err


def list_names(root, category: str, occlusion="L0") -> list[str]:
    """Image names of a subset: the union of ``lists/{cat}{occ}/*.txt`` in file order.

    Without a lists folder, the annotation files are listed instead.
    """
    sub = subset_name(category, occlusion)
    list_dir = os.path.join(root, "lists", sub)
    files = sorted(glob.glob(os.path.join(list_dir, "*.txt")))
    if files:
        names, seen = [], set()
        for f in files:
            for n in read_list(f):
                if n not in seen:
                    seen.add(n)
                    names.append(n)
        return names
    ann_dir = os.path.join(root, "annotations", sub)
    if not os.path.isdir(ann_dir):
        raise DataError(f"{list_dir}: no list files and no annotation folder {ann_dir} "
                        f"(category {category!r}, occlusion {occlusion!r})")
    return sorted(os.path.splitext(f)[0] for f in os.listdir(ann_dir) if f.endswith(".npz"))


def subset_names(root) -> list[str]:
    """Folder names under ``annotations/`` (e.g. ``car``, ``carFGL1_BGL1``)."""
    return sorted(os.listdir(os.path.join(root, "annotations")))


def _find_image(root, sub, name) -> str:
    for ext in IMAGE_EXTENSIONS:
        path = os.path.join(root, "images", sub, name + ext)
        if os.path.isfile(path):
            return path
    raise DataError(f"{os.path.join(root, 'images', sub, name)}.*: image not found "
                    f"(tried {', '.join(IMAGE_EXTENSIONS)})")


_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb8(im, path) -> np.ndarray:
    """A decoded PIL image -> [H, W, 3] uint8. 16-bit greyscale (0..65535) is scaled by
    1/257 (PIL's own conversion clips it, turning most of the image white); 32-bit
    integer or float images of another origin are refused (their range is unknown)."""
    if im.mode in _GREY16_MODES or (im.mode == "I" and im.format == "PNG"):
        grey = np.round(np.asarray(im, np.float64) / 257.0)
        return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if im.mode in ("I", "F"):
        raise DataError(f"{path}: {'float' if im.mode == 'F' else '32-bit integer'} image "
                        f"(PIL mode {im.mode}) of unknown range; save it as 8- or 16-bit")
    return np.asarray(im.convert("RGB"), np.uint8)


def load_image(path) -> np.ndarray:
    """[H, W, 3] uint8; raises DataError naming the file if it is missing or corrupt.

    16-bit images are scaled to 0..255 (greyscale by 1/257; PIL reduces 16-bit colour
    itself)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb8(im, path)
    except DataError:
        raise
    except FileNotFoundError as err:
        raise DataError(f"{path}: image not found") from err
    except Exception as err:  # PIL raises several types on corrupt data
        raise DataError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


# Angles are radians. A stored value beyond these bounds is not a pose in radians
# (most often degrees written by mistake: azimuth 270, elevation 7 rad), so it is refused.
ANGLE_LIMITS = {"azimuth": 2 * np.pi, "elevation": np.pi / 2, "theta": 2 * np.pi}
_ANGLE_SLACK = 1e-4


def _scalar(ann, key, path):
    raw = np.asarray(ann[key])
    if raw.dtype.kind == "b":
        shown = raw.reshape(-1)[0] if raw.size else raw
        raise DataError(f"{path}: annotation {key!r} is a boolean ({shown}), not a number; "
                        "store it as a float")
    if raw.dtype.kind not in "iuf":
        shown = raw.reshape(-1)[0] if raw.size else raw
        raise DataError(f"{path}: annotation {key!r} must be a number, got {raw.dtype} "
                        f"value {str(shown)!r}")
    v = raw.astype(np.float64).reshape(-1)
    if v.size != 1:
        raise DataError(f"{path}: annotation {key!r} must be a scalar, got shape {raw.shape}")
    if not np.isfinite(v[0]):
        raise DataError(f"{path}: annotation {key!r} is not finite ({v[0]})")
    return float(v[0])


def _check_angle(key, value, path):
    bound = ANGLE_LIMITS[key]
    if abs(value) > bound + _ANGLE_SLACK:
        lo = "-pi/2" if key == "elevation" else "-2 pi"
        hi = "pi/2" if key == "elevation" else "2 pi"
        raise DataError(f"{path}: annotation {key!r} = {value:g} is outside [{lo}, {hi}]; "
                        "angles are radians (was it stored in degrees?)")


def load_annotation(path) -> dict:
    """Reads and checks one annotation ``.npz``; raises DataError naming the file.

    Every required field must be a finite number (a string, a boolean or an array
    raises);
    azimuth and theta must lie in [-2 pi, 2 pi] and elevation in [-pi/2, pi/2]
    (radians: values beyond are refused as degrees stored by mistake); distance
    and focal * viewport must be positive.

    Returns dict with ``pose`` [4], ``focal`` (pixels), ``principal`` [2] and the
    raw arrays (``raw``).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: annotation not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            ann = {k: z[k] for k in z.files}
    except Exception as err:
        raise DataError(f"{path}: cannot read annotation ({type(err).__name__}: {err})") from err
    missing = [k for k in REQUIRED_KEYS if k not in ann]
    if missing:
        raise DataError(f"{path}: annotation is missing keys {missing}")
    a, e, t, d, f, vp = (_scalar(ann, k, path) for k in
                         ("azimuth", "elevation", "theta", "distance", "focal", "viewport"))
    for key, value in (("azimuth", a), ("elevation", e), ("theta", t)):
        _check_angle(key, value, path)
    raw_p = np.asarray(ann["principal"])
    if raw_p.dtype.kind not in "iuf":
        raise DataError(f"{path}: annotation 'principal' must be 2 numbers, got {raw_p.dtype}")
    principal = raw_p.astype(np.float64).reshape(-1)
    if principal.size != 2 or not np.all(np.isfinite(principal)):
        raise DataError(f"{path}: annotation 'principal' must be 2 finite numbers, got {principal}")
    if d <= 0 or f * vp <= 0:
        raise DataError(f"{path}: distance ({d}) and focal*viewport ({f * vp}) must be positive")
    return {"pose": np.array([a, e, t, d], np.float32), "focal": np.float32(f * vp),
            "principal": principal.astype(np.float32), "raw": ann}


def _check_principal(principal, image_hw, path, img_path):
    """Refuses a principal point (px, py) outside its image [0, W] x [0, H]."""
    (px, py), (h, w) = principal, image_hw
    if not (0 <= px <= w and 0 <= py <= h):
        raise DataError(f"{path}: principal point ({px:g}, {py:g}) lies outside its image "
                        f"{img_path} ({w}x{h}); expected screen coordinates (x = column, "
                        "y = row) inside the image")


def _mask(ann, key, shape, path, img_path):
    if key not in ann:
        return None
    m = np.asarray(ann[key])
    if m.shape != shape:
        raise DataError(f"{path}: {key!r} has shape {m.shape}, but the image {img_path} "
                        f"is {shape}")
    return m.astype(bool)


def load_pose_set(root, category: str, occlusion="L0", *, limit: int | None = None,
                  skip_bad: bool = False, lazy_images: bool = False) -> PoseSet:
    """Loads ``{root}/{images,annotations,lists}/{category}{occ}`` into a PoseSet.

    root: a train or a test root. occlusion: 'L0'..'L3' (or 0..3, or the
      ``FGLk_BGLk`` suffix). limit: the first ``limit`` names of the list (a
      positive integer; None = all).
    skip_bad: bad entries (missing/corrupt image, annotation missing keys,
      non-numeric, non-finite or out of range, a principal point outside the
      image, image or mask of another size)
      raise a DataError naming the file by default; with ``skip_bad=True`` they
      are logged and skipped, and the count is logged at the end.
    The images of one subset share one size: the most common one (ties: the
    first listed); an image of another size is the bad entry, named as such.
    Masks are returned only when every loaded annotation has them.
    lazy_images: ``images`` is an :class:`ImageFiles` (read when used; sizes checked
      from the file headers now, contents when read): a process of a multi-process
      run then holds only the images it uses. Annotations are read now, as always.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                              or limit < 1):
        raise ValueError(f"limit must be a positive number of images or None, got {limit!r}")
    sub = subset_name(category, occlusion)
    names = list_names(root, category, occlusion)
    if limit is not None:
        names = names[:limit]
    skipped = 0

    def bad(err):
        nonlocal skipped
        if not skip_bad:
            raise err
        skipped += 1
        log.warning("skipping %s", err)

    entries = []                                   # (name, ann, ann_path, img, img_path)
    for name in names:
        try:
            ann_path = os.path.join(root, "annotations", sub, name + ".npz")
            ann = load_annotation(ann_path)
            img_path = _find_image(root, sub, name)
            img = (np.empty(_image_size(img_path) + (0,), np.uint8) if lazy_images
                   else load_image(img_path))
        except DataError as err:
            bad(err)
            continue
        entries.append((name, ann, ann_path, img, img_path))
    sizes = [e[3].shape[:2] for e in entries]
    common = max(sizes, key=lambda sz: (sizes.count(sz), -sizes.index(sz))) if sizes else None
    kept, images, poses, focal, principal, obj, occ = [], [], [], [], [], [], []
    for name, ann, ann_path, img, img_path in entries:
        try:
            if img.shape[:2] != common:
                first = next(e[4] for e in entries if e[3].shape[:2] == common)
                raise DataError(f"{img_path}: image size {img.shape[:2]} differs from {common} "
                                f"of {sizes.count(common)} other images (e.g. {first}); images "
                                "of one root must share one size")
            _check_principal(ann["principal"], img.shape[:2], ann_path, img_path)
            om = _mask(ann["raw"], "object_mask", img.shape[:2], ann_path, img_path)
            cm = _mask(ann["raw"], "occluder_mask", img.shape[:2], ann_path, img_path)
        except DataError as err:
            bad(err)
            continue
        kept.append(name)
        images.append(img_path if lazy_images else img)
        poses.append(ann["pose"])
        focal.append(ann["focal"])
        principal.append(ann["principal"])
        obj.append(om)
        occ.append(cm)
    if skipped:
        log.warning("load_pose_set(%s, %s): skipped %d of %d bad entries", root, sub, skipped,
                    len(names))
    if not kept:
        raise DataError(f"{os.path.join(root, 'lists', sub)}: no usable images "
                        f"({len(names)} listed, {skipped} skipped)")
    stack = lambda ms: None if any(m is None for m in ms) else np.stack(ms)  # noqa: E731
    return PoseSet(category=category, names=tuple(kept),
                   images=ImageFiles(images, common) if lazy_images else np.stack(images),
                   poses=np.stack(poses).astype(np.float32),
                   focal=np.asarray(focal, np.float32),
                   principal=np.stack(principal).astype(np.float32),
                   object_mask=stack(obj), occluder_mask=stack(occ))


def load_model_mesh(root, category: str, cad_index: int = 1, *,
                    pose_set: PoseSet | None = None) -> meshes.Mesh:
    """The category's model mesh ``{root}/CAD_single/{cat}/{cad_index:02d}.off``.

    Falls back to the sibling root (``../train`` or ``../test``) when this root
    has no ``CAD_single`` folder. With ``pose_set`` (the images it will be used
    with), a camera inside the mesh's bounding box for most of them raises MeshError
    naming the file, for a few a warning (:func:`meshes.check_camera_outside`).
    """
    rel = os.path.join("CAD_single", category, f"{cad_index:02d}.off")
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        parent = os.path.dirname(os.path.abspath(root))
        for sib in ("train", "test"):
            alt = os.path.join(parent, sib, rel)
            if os.path.isfile(alt):
                path = alt
                break
    try:
        object_mesh = meshes.load_mesh(path)
    except meshes.MeshError as err:
        raise DataError(str(err)) from err
    if pose_set is not None:
        meshes.check_camera_outside(object_mesh, pose_set.poses, source=path, names=pose_set.names)
    return object_mesh
