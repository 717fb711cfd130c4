"""One loader for a preprocessed Human3.6M layout and for our synthetic benchmark.

Layout (per subject / action / camera frames + 3D joints)::

    ROOT/<subject>/<action>/cam<k>/<frame:06d>.(png|jpg)   root-centred crops
    ROOT/<subject>/<action>/poses.npz
        joints_world [T, J, 3]      mm, J = 32 (H3.6M mocap order) or 17
        joints_cam   [V, T, J, 3]   mm, camera frame (optional if cameras.npz has R, t)
        joints_2d    [V, T, J, 2]   px in the crop (optional)
    ROOT/<subject>/<action>/cameras.npz   (optional; evaluation only)
        R [V, 3, 3], t [V, 3]       x_cam = R @ X + t (OpenCV, mm), or
        pose [V, 4], focal, principal   (our synthetic PASCAL3D+ cameras)

32-joint inputs are reduced with ``H36M_32_TO_17``. Sub-actions such as
``"Walking 1"`` are just action folders. The ``k`` of ``cam<k>`` only orders
the views; the cameras of a sequence are synchronised from frame 0. Human3.6M's
videos differ by a frame or two per camera, so (the one repair) every camera and
the joints are cut to the shortest of them, with a warning naming the folders
and their counts.

Bad input raises :class:`nvsm_jax.data.DataError` naming the file: an
unreadable or truncated image or ``.npz``, a ``poses.npz`` without
``joints_world``, joints of the wrong shape or with NaN/inf (the frame and
joint are named), an empty camera folder, fewer camera poses than cameras.

Returns a :class:`MultiViewData`: every frame of every view flattened, with
the index ``offset + view * T + t`` per sequence.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from typing import Sequence

import numpy as np

from nvsm_jax import geometry as geo
from nvsm_jax.data.format import DataError
from nvsm_jax.mcss.skeleton import H36M_32_TO_17

__all__ = ["MultiViewData", "assemble", "load_dataset", "load_sequence", "to_17_joints"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MultiViewData:
    """Flattened frames of synchronised multi-view sequences.

    images: uint8 [N, H, W, 3]; seq_id, view, frame: int32 [N];
    joints_cam: float32 [N, 17, 3] mm in each frame's camera frame (absolute);
    joints_2d: float32 [N, 17, 2] or None; subjects, actions: str per sequence;
    seq_views, seq_frames, seq_offset: int per sequence.
    """

    images: np.ndarray
    seq_id: np.ndarray
    view: np.ndarray
    frame: np.ndarray
    joints_cam: np.ndarray
    joints_2d: np.ndarray | None
    subjects: list
    actions: list
    seq_views: np.ndarray
    seq_frames: np.ndarray
    seq_offset: np.ndarray

    def __len__(self):
        return len(self.images)

    @property
    def pose3d(self) -> np.ndarray:
        """Root-relative camera-frame joints [N, 17, 3] mm (the regression target)."""
        return self.joints_cam - self.joints_cam[:, :1]

    def index(self, seq, view, t):
        """Flat index of (sequence, view, time); broadcasts."""
        seq = np.asarray(seq)
        return self.seq_offset[seq] + np.asarray(view) * self.seq_frames[seq] + np.asarray(t)

    @property
    def subject_of_frame(self) -> np.ndarray:
        return np.asarray(self.subjects)[self.seq_id]


def to_17_joints(joints: np.ndarray) -> np.ndarray:
    """[..., 32, 3] mocap order -> [..., 17, 3]; 17-joint input passes through."""
    if joints.shape[-2] == 32:
        return joints[..., H36M_32_TO_17, :]
    if joints.shape[-2] == 17:
        return joints
    raise ValueError(f"expected 17 or 32 joints, got {joints.shape[-2]}")


def _cam_dirs(seq_dir):
    dirs = [d for d in glob.glob(os.path.join(seq_dir, "cam*")) if os.path.isdir(d)]
    num = lambda d: int(re.sub(r"\D", "", os.path.basename(d)) or 0)
    return sorted(dirs, key=num)


def _read_image(path, image_size):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if image_size is not None and im.size != (image_size[1], image_size[0]):
                im = im.resize((image_size[1], image_size[0]), Image.BILINEAR)
            return np.asarray(im, np.uint8)
    except Exception as err:   # PIL raises several types on truncated or corrupt files
        raise DataError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


def _read_npz(path) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as err:   # zipfile / numpy format errors on truncated files
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from err


def _joints(arr, path, key, lead: int, width: int) -> np.ndarray:
    """``arr`` as float32 [*lead dims, 17, width] with finite values; DataError naming
    ``path``, ``key`` and the first bad frame/joint otherwise."""
    a = np.asarray(arr)
    if a.dtype.kind not in "biuf" or a.ndim != lead + 2 or a.shape[-2] not in (17, 32) \
            or a.shape[-1] != width:
        raise DataError(f"{path}: {key!r} must be a number array of shape "
                        f"[{', '.join(['...'] * lead)}, 17 or 32, {width}], got {a.dtype} "
                        f"{a.shape}")
    a = to_17_joints(a.astype(np.float32))
    bad = ~np.isfinite(a).all(-1)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        where = ", ".join(f"{n} {i}" for n, i in zip(["view", "frame", "joint"][-len(idx):], idx))
        raise DataError(f"{path}: {key!r} holds {int(bad.sum())} non-finite joint(s), first at "
                        f"{where} (of the 17 kept): {a[idx].tolist()}")
    return a


def load_sequence(seq_dir: str, image_size=None, load_images: bool = True) -> dict:
    """Reads one sequence folder -> dict(images [V, T, H, W, 3], joints_cam [V, T, 17, 3],
    joints_2d [V, T, 17, 2] or None, joints_world [T, 17, 3]). Bad input raises DataError
    naming the file (module doc); cameras of different lengths are cut, with a warning."""
    cams = _cam_dirs(seq_dir)
    if not cams:
        raise FileNotFoundError(f"no cam* folders in {seq_dir}")
    files = [sorted(glob.glob(os.path.join(c, "*.png")) + glob.glob(os.path.join(c, "*.jpg")))
             for c in cams]
    empty = [c for c, f in zip(cams, files) if not f]
    if empty:
        raise DataError(f"{empty[0]}: camera folder holds no .png/.jpg frames"
                        + (f" (nor do {len(empty) - 1} more)" if len(empty) > 1 else ""))
    poses_path = os.path.join(seq_dir, "poses.npz")
    poses = _read_npz(poses_path)
    if "joints_world" not in poses:
        raise DataError(f"{poses_path}: no 'joints_world' (keys: {sorted(poses)})")
    world = _joints(poses["joints_world"], poses_path, "joints_world", 1, 3)
    v_len = len(cams)
    counts = [len(f) for f in files]
    t_len = min(min(counts), world.shape[0])
    if len(set(counts)) > 1 or world.shape[0] != t_len:
        log.warning("%s: cameras hold %s frames and joints_world %d; all cut to the first %d",
                    seq_dir, ", ".join(f"{os.path.basename(c)} {n}" for c, n in
                                       zip(cams, counts)), world.shape[0], t_len)

    def per_view(key, width):
        a = _joints(poses[key], poses_path, key, 2, width)
        if a.shape[0] < v_len or a.shape[1] < t_len:
            raise DataError(f"{poses_path}: {key!r} covers {a.shape[0]} views x {a.shape[1]} "
                            f"frames, the sequence has {v_len} cameras x {t_len} frames")
        return a[:v_len, :t_len]

    if "joints_cam" in poses:
        jc = per_view("joints_cam", 3)
    else:
        cam_path = os.path.join(seq_dir, "cameras.npz")
        cam = _read_npz(cam_path)
        try:
            if "R" in cam:
                r, t = cam["R"].astype(np.float64), cam["t"].astype(np.float64)
            else:
                r, t = geo.world_to_camera(cam["pose"].astype(np.float64))
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{cam_path}: needs 'R' and 't' or 'pose' ({type(err).__name__}: "
                            f"{err}; keys: {sorted(cam)})") from err
        r, t = np.asarray(r), np.asarray(t)
        if r.shape[1:] != (3, 3) or t.shape[1:] != (3,) or len(r) < v_len or len(t) < v_len \
                or not (np.isfinite(r).all() and np.isfinite(t).all()):
            raise DataError(f"{cam_path}: cameras must be finite R [V, 3, 3], t [V, 3] for the "
                            f"{v_len} cam* folders, got R {r.shape}, t {t.shape}")
        jc = geo.transform_points(world[None, :t_len].astype(np.float64), r[:v_len, None],
                                  t[:v_len, None]).astype(np.float32)
    j2d = per_view("joints_2d", 2) if "joints_2d" in poses else None
    images = None
    if load_images:
        images = np.stack([np.stack([_read_image(p, image_size) for p in f[:t_len]])
                           for f in files])
    return {"images": images, "joints_cam": jc, "joints_2d": j2d, "joints_world": world[:t_len]}


def assemble(parts) -> MultiViewData:
    """One flat :class:`MultiViewData` from ``[(subject, action, sequence), ...]``;
    a sequence is :func:`load_sequence`'s dict (``images [V, T, H, W, 3]``,
    ``joints_cam [V, T, 17, 3]``, ``joints_2d [V, T, 17, 2]`` or None)."""
    if not parts:
        raise ValueError("assemble: no sequences")
    imgs, jcs, j2ds, seq_ids, views, frames, nv, nt, off = [], [], [], [], [], [], [], [], []
    offset = 0
    for k, (_, _, seq) in enumerate(parts):
        v, t = seq["images"].shape[:2]
        nv.append(v)
        nt.append(t)
        off.append(offset)
        offset += v * t
        imgs.append(seq["images"].reshape(v * t, *seq["images"].shape[2:]))
        jcs.append(seq["joints_cam"].reshape(v * t, 17, 3))
        j2ds.append(None if seq["joints_2d"] is None else seq["joints_2d"].reshape(v * t, 17, 2))
        seq_ids.append(np.full(v * t, k, np.int32))
        views.append(np.repeat(np.arange(v, dtype=np.int32), t))
        frames.append(np.tile(np.arange(t, dtype=np.int32), v))
    j2d = None if any(x is None for x in j2ds) else np.concatenate(j2ds)
    return MultiViewData(images=np.concatenate(imgs), seq_id=np.concatenate(seq_ids),
                         view=np.concatenate(views), frame=np.concatenate(frames),
                         joints_cam=np.concatenate(jcs), joints_2d=j2d,
                         subjects=[p[0] for p in parts], actions=[p[1] for p in parts],
                         seq_views=np.asarray(nv), seq_frames=np.asarray(nt),
                         seq_offset=np.asarray(off))


def load_dataset(root: str, subjects: Sequence[str], actions: Sequence[str] | None = None,
                 image_size=None) -> MultiViewData:
    """Loads every ``ROOT/<subject>/<action>`` sequence of the given subjects."""
    parts = []
    for s in subjects:
        sdir = os.path.join(root, s)
        if not os.path.isdir(sdir):
            raise FileNotFoundError(f"subject folder {sdir} not found")
        acts = actions if actions is not None else sorted(
            a for a in os.listdir(sdir) if os.path.isfile(os.path.join(sdir, a, "poses.npz")))
        for a in acts:
            parts.append((s, a, load_sequence(os.path.join(sdir, a), image_size)))
    if not parts:
        raise FileNotFoundError(f"no sequences for {list(subjects)} under {root}")
    return assemble(parts)
