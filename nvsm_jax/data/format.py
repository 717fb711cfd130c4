"""The on-disk format: NeMo-preprocessed PASCAL3D+ (and OccludedPASCAL3D+).

A *root* (one for training, one for testing, as in NeMo) holds::

    images/{cat}{occ}/{name}.png|.JPEG     the crops (one size per root)
    annotations/{cat}{occ}/{name}.npz      one per image, keys below
    lists/{cat}{occ}/mesh01.txt            image names (no extension), one a line;
                                           one list per CAD index (mesh{cad:02d}.txt)
    CAD_single/{cat}/01.off                the category's cuboid model mesh
    README, dataset.json                   provenance (generated roots)

``{occ}`` is ``""`` for L0 and ``FGL1_BGL1``, ``FGL2_BGL2``, ``FGL3_BGL3`` for
L1-L3, as in OccludedPASCAL3D+.

Annotation keys (``.npz``): ``azimuth``, ``elevation``, ``theta`` (radians),
``distance``, ``focal``, ``viewport`` (pixels = ``focal * viewport``),
``principal`` ``[px, py]`` in **screen coordinates** (x = column, y = row,
pixel centres at +0.5; MATLAB's 1-based coordinates minus 0.5), ``box`` and
``bbox`` (both ``[x_min, y_min, x_max, y_max]`` in screen coordinates, pixel
edges, of the object's full extent), ``cad_index`` (1-based), ``height``,
``width``, and for synthetic data ``object_mask`` / ``occluder_mask``
(``[H, W]`` bool). With these fields
``geometry.project_pascal(X, azimuth, elevation, theta, distance, focal,
viewport, principal)`` gives the pixel of world point ``X`` in the stored image.

Files are written deterministically: PNGs carry no timestamps and ``.npz``
archives are written with a fixed zip date, so the same content gives the same
bytes.
"""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np

from nvsm_jax.errors import InputError

__all__ = ["CATEGORIES", "OCCLUSION_LEVELS", "occlusion_suffix", "subset_name", "REQUIRED_KEYS",
           "DataError", "save_npz", "save_png", "write_list", "read_list", "IMAGE_EXTENSIONS"]

OCCLUSION_LEVELS = ("L0", "L1", "L2", "L3")
# PASCAL3D+'s 12 categories, in its order
CATEGORIES = ("aeroplane", "bicycle", "boat", "bottle", "bus", "car", "chair",
              "diningtable", "motorbike", "sofa", "train", "tvmonitor")
IMAGE_EXTENSIONS = (".png", ".JPEG", ".jpg", ".jpeg", ".PNG", ".JPG")
REQUIRED_KEYS = ("azimuth", "elevation", "theta", "distance", "focal", "viewport", "principal")


class DataError(InputError):
    """Bad or missing input data; the message names the offending file."""


def occlusion_suffix(occlusion: str | int) -> str:
    """'L0' -> '', 'L1' -> 'FGL1_BGL1', ... (also accepts 0..3 or the suffix itself)."""
    if isinstance(occlusion, (int, np.integer)):
        occlusion = f"L{int(occlusion)}"
    if occlusion in ("", "L0", "0"):
        return ""
    for k in (1, 2, 3):
        if occlusion in (f"L{k}", str(k), f"FGL{k}_BGL{k}"):
            return f"FGL{k}_BGL{k}"
    raise ValueError(f"unknown occlusion level {occlusion!r}; expected L0, L1, L2 or L3")


def subset_name(category: str, occlusion: str | int = "L0") -> str:
    """The per-subset folder name ``{cat}{occ}`` (e.g. ``carFGL1_BGL1``)."""
    return f"{category}{occlusion_suffix(occlusion)}"


_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def save_npz(path: str | os.PathLike, compress: bool = True, **arrays) -> None:
    """Like ``np.savez_compressed`` but byte-deterministic (fixed zip timestamps)."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    buf_zip = io.BytesIO()
    with zipfile.ZipFile(buf_zip, "w", compression=method, compresslevel=1) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_DATE)
            info.compress_type = method
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=1)
    with open(path, "wb") as f:
        f.write(buf_zip.getvalue())


def save_png(path: str | os.PathLike, image: np.ndarray, compress_level: int = 1) -> None:
    """Writes an ``[H, W, 3]`` (or ``[H, W]``) uint8 image as PNG (no metadata)."""
    from PIL import Image
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG",
                                                      compress_level=compress_level)


def write_list(path: str | os.PathLike, names) -> None:
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{n}\n" for n in names))


def read_list(path: str | os.PathLike) -> list[str]:
    """Names in a NeMo list file; extensions (if any) are stripped.

    A file that is not UTF-8 text (e.g. an image or archive saved under a list's
    name), or whose names hold control characters, raises DataError naming it
    (and the line).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read list file ({type(err).__name__}: {err})") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: list file is not UTF-8 text (byte {err.start}: "
                        f"{raw[err.start:err.start + 1]!r}); expected one image name a line"
                        ) from err
    names = []
    for n, line in enumerate(text.split("\n")):
        name = line.strip()
        if not name:
            continue
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise DataError(f"{path}:{n + 1}: list entry {name[:40]!r} holds control characters;"
                            " expected one image name a line (is this a binary file?)")
        base, ext = os.path.splitext(name)
        names.append(base if ext in IMAGE_EXTENSIONS or ext == ".npz" else name)
    return names
