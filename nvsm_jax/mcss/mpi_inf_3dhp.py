"""MPI-INF-3DHP loader for the MCSS cross-view benchmark.

Layout (the dataset's own, with the videos extracted to images)::

    ROOT/<subject>/<sequence>/annot.mat        subjects S1..S8, sequences Seq1, Seq2
    ROOT/<subject>/<sequence>/imageFrames/video_<c>/frame_<n:06d>.jpg   (or .png)

``c`` is the camera (0..13; 11-13 look down from the ceiling) and ``n`` the
1-based frame number, as ``ffmpeg -i video_<c>.avi imageFrames/video_<c>/frame_%06d.jpg``
writes it. ``annot.mat`` (read with ``scipy.io.loadmat``) holds, per camera, a
cell array of 14: ``annot2`` ``[T, 56]`` (28 joints x 2, pixels), ``annot3``
``[T, 84]`` (28 x 3, mm, camera frame) and ``univ_annot3`` (the same, rescaled to
the universal skeleton). A ``[T, 28, k]`` per camera, or one number array
``[14, T, 28 * k]``, is accepted too.

The 28 joints are reduced to the 17 of :mod:`nvsm_jax.mcss.skeleton` with
``MPI_28_TO_17``. Frames are cropped to a square around the 2D joints of that
frame (side ``crop_scale`` x the larger side of their box, centred on it, black
outside the image) and resized to ``image_size``: the synthetic benchmark's
root-centred crops. The 2D joints are used for the crop only; the learner never
sees them or the calibration. Every ``frame_step``-th frame is kept (the videos
run at 25 or 50 fps), at most ``max_frames`` per sequence. The cameras of a
sequence are synchronised; if their annotations differ in length every camera
is cut to the shortest, with a warning.

Bad input raises :class:`nvsm_jax.data.DataError` naming the file: a missing or
unreadable ``annot.mat``, a missing key, a camera it does not cover, joints of
the wrong shape or with NaN/inf, a missing or undecodable frame image.

Returns :class:`nvsm_jax.mcss.h36m.MultiViewData` (views = the requested cameras in
the order given; ``actions`` holds the sequence names).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from nvsm_jax.data.format import DataError
from nvsm_jax.mcss import h36m
from nvsm_jax.mcss.h36m import MultiViewData

__all__ = ["MPI_28_TO_17", "CEILING_CAMERAS", "load_sequence", "load_dataset", "frame_path",
           "read_annotations"]

log = logging.getLogger(__name__)

MPI_28_TO_17 = (4, 23, 24, 25, 18, 19, 20, 3, 5, 7, 6, 9, 10, 11, 14, 15, 16)
CEILING_CAMERAS = (11, 12, 13)
NUM_CAMERAS = 14
NUM_JOINTS = 28


def frame_path(seq_dir: str, camera: int, t: int) -> str:
    """The image of 0-based frame ``t`` of ``camera`` (the ``.jpg`` unless only a
    ``.png`` exists)."""
    base = os.path.join(seq_dir, "imageFrames", f"video_{camera}", f"frame_{t + 1:06d}")
    return base + ".png" if not os.path.isfile(base + ".jpg") and \
        os.path.isfile(base + ".png") else base + ".jpg"


def _per_camera(value, path, key, width, cameras) -> list[np.ndarray]:
    """``annot.mat``'s ``key`` -> one float32 ``[T, 28, width]`` per requested camera."""
    a = np.asarray(value)
    if a.dtype == object:
        cells = a.reshape(-1)
    elif a.dtype.kind in "biuf" and a.ndim >= 2:
        cells = list(a)                   # [14, T, 28 * width] or [14, T, 28, width]
    else:
        raise DataError(f"{path}: {key!r} must be a cell array of {NUM_CAMERAS} cameras (or a "
                        f"number array [cameras, T, {NUM_JOINTS * width}]), got {a.dtype} {a.shape}")
    out = []
    for c in cameras:
        if c < 0 or c >= len(cells):
            raise DataError(f"{path}: {key!r} covers {len(cells)} cameras, camera {c} was asked for")
        x = np.asarray(cells[c])
        if x.dtype.kind not in "biuf":
            raise DataError(f"{path}: {key!r} of camera {c} is not a number array ({x.dtype})")
        if x.ndim == 2 and x.shape[1] == NUM_JOINTS * width:
            x = x.reshape(x.shape[0], NUM_JOINTS, width)
        if x.ndim != 3 or x.shape[1:] != (NUM_JOINTS, width):
            raise DataError(f"{path}: {key!r} of camera {c} must be [T, {NUM_JOINTS * width}] or "
                            f"[T, {NUM_JOINTS}, {width}], got {x.shape}")
        x = x.astype(np.float32)
        bad = ~np.isfinite(x).all(-1)
        if bad.any():
            t, j = (int(i) for i in np.argwhere(bad)[0])
            raise DataError(f"{path}: {key!r} of camera {c} holds {int(bad.sum())} non-finite "
                            f"joint(s), first at frame {t}, joint {j}")
        out.append(x)
    return out


def read_annotations(path: str, cameras: Sequence[int], joints: str = "annot3") -> dict:
    """``annot.mat`` -> ``{"joints_cam": [V, T, 17, 3] mm, "joints_2d_full": [V, T, 17, 2]
    px in the full frame}`` for ``cameras`` (cut to the shortest camera)."""
    import scipy.io

    if joints not in ("annot3", "univ_annot3"):
        raise ValueError(f"joints must be 'annot3' or 'univ_annot3', got {joints!r}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:      # scipy raises several types on truncated / foreign files
        raise DataError(f"{path}: cannot read as a MATLAB file ({type(err).__name__}: {err})") \
            from err
    for key in ("annot2", joints):
        if key not in mat:
            raise DataError(f"{path}: no {key!r} (keys: "
                            f"{sorted(k for k in mat if not k.startswith('__'))})")
    j3 = _per_camera(mat[joints], path, joints, 3, cameras)
    j2 = _per_camera(mat["annot2"], path, "annot2", 2, cameras)
    lengths = [len(a) for a in j3] + [len(a) for a in j2]
    t_len = min(lengths)
    if t_len == 0:
        raise DataError(f"{path}: no annotated frames")
    if len(set(lengths)) > 1:
        log.warning("%s: the cameras' annotations hold %s frames; all cut to the first %d",
                    path, sorted(set(lengths)), t_len)
    idx = list(MPI_28_TO_17)
    return {"joints_cam": np.stack([a[:t_len, idx] for a in j3]),
            "joints_2d_full": np.stack([a[:t_len, idx] for a in j2])}


def _crop_box(points2d: np.ndarray, scale: float):
    lo, hi = points2d.min(0), points2d.max(0)
    centre = 0.5 * (lo + hi)
    side = max(float(np.max(hi - lo)) * scale, 8.0)
    return centre - 0.5 * side, side


def _read_crop(path: str, corner, side: float, image_size) -> np.ndarray:
    from PIL import Image

    if not os.path.isfile(path):
        raise DataError(f"{path}: frame image not found")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            box = (float(corner[0]), float(corner[1]), float(corner[0] + side),
                   float(corner[1] + side))
            # A square crop of the image (black beyond its edges), resized.
            out = im.transform((image_size[1], image_size[0]), Image.EXTENT, box,
                               resample=Image.BILINEAR, fillcolor=(0, 0, 0))
            return np.asarray(out, np.uint8)
    except Exception as err:     # PIL raises several types on truncated or corrupt files
        raise DataError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


def load_sequence(seq_dir: str, cameras: Sequence[int] = tuple(range(11)), image_size=(64, 64),
                  frame_step: int = 1, max_frames: int | None = None, joints: str = "annot3",
                  crop_scale: float = 1.2, load_images: bool = True) -> dict:
    """One ``ROOT/<subject>/<sequence>`` folder -> dict(images [V, T', H, W, 3] uint8,
    joints_cam [V, T', 17, 3] mm, joints_2d [V, T', 17, 2] px in the crop, frames [T']
    the 0-based source frame numbers)."""
    if frame_step < 1:
        raise ValueError(f"frame_step must be >= 1, got {frame_step}")
    cameras = [int(c) for c in cameras]
    if not cameras or len(set(cameras)) != len(cameras):
        raise ValueError(f"cameras must be distinct camera numbers, got {cameras}")
    ann = read_annotations(os.path.join(seq_dir, "annot.mat"), cameras, joints)
    frames = np.arange(0, ann["joints_cam"].shape[1], frame_step)
    if max_frames:
        frames = frames[:max_frames]
    jc = ann["joints_cam"][:, frames]
    full2d = ann["joints_2d_full"][:, frames]
    v_len, t_len = len(cameras), len(frames)
    images = np.zeros((v_len, t_len, *image_size, 3), np.uint8) if load_images else None
    j2d = np.zeros((v_len, t_len, 17, 2), np.float32)
    for vi, c in enumerate(cameras):
        for ti, t in enumerate(frames):
            corner, side = _crop_box(full2d[vi, ti], crop_scale)
            j2d[vi, ti] = (full2d[vi, ti] - corner) * (np.array([image_size[1], image_size[0]])
                                                       / side)
            if load_images:
                images[vi, ti] = _read_crop(frame_path(seq_dir, c, int(t)), corner, side,
                                            image_size)
    return {"images": images, "joints_cam": jc, "joints_2d": j2d, "frames": frames}


def load_dataset(root: str, subjects: Sequence[str], sequences: Sequence[str] = ("Seq1", "Seq2"),
                 cameras: Sequence[int] = tuple(range(11)), image_size=(64, 64),
                 frame_step: int = 1, max_frames: int | None = None, joints: str = "annot3",
                 crop_scale: float = 1.2) -> MultiViewData:
    """Every ``ROOT/<subject>/<sequence>`` of the given subjects, flattened as
    :func:`nvsm_jax.mcss.h36m.load_dataset` does (index ``offset + view * T + t``)."""
    parts = []
    for s in subjects:
        sdir = os.path.join(root, s)
        if not os.path.isdir(sdir):
            raise FileNotFoundError(f"subject folder {sdir} not found")
        for q in sequences:
            seq = load_sequence(os.path.join(sdir, q), cameras, tuple(image_size), frame_step,
                                max_frames, joints, crop_scale)
            parts.append((s, q, seq))
    if not parts:
        raise FileNotFoundError(f"no sequences for {list(subjects)} under {root}")
    return h36m.assemble(parts)
