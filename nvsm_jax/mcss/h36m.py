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
the views; all cameras of a sequence must hold the same number of frames
(synchronised); longer ones are cut to the shortest.

Returns a :class:`MultiViewData`: every frame of every view flattened, with
the index ``offset + view * T + t`` per sequence.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Sequence

import numpy as np

from nvsm_jax import geometry as geo
from nvsm_jax.mcss.skeleton import H36M_32_TO_17

__all__ = ["MultiViewData", "load_dataset", "load_sequence", "to_17_joints"]


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

    with Image.open(path) as im:
        im = im.convert("RGB")
        if image_size is not None and im.size != (image_size[1], image_size[0]):
            im = im.resize((image_size[1], image_size[0]), Image.BILINEAR)
        return np.asarray(im, np.uint8)


def load_sequence(seq_dir: str, image_size=None, load_images: bool = True) -> dict:
    """Reads one sequence folder -> dict(images [V, T, H, W, 3], joints_cam [V, T, 17, 3],
    joints_2d [V, T, 17, 2] or None, joints_world [T, 17, 3])."""
    cams = _cam_dirs(seq_dir)
    if not cams:
        raise FileNotFoundError(f"no cam* folders in {seq_dir}")
    files = [sorted(glob.glob(os.path.join(c, "*.png")) + glob.glob(os.path.join(c, "*.jpg")))
             for c in cams]
    with np.load(os.path.join(seq_dir, "poses.npz")) as z:
        poses = {k: z[k] for k in z.files}
    world = to_17_joints(poses["joints_world"].astype(np.float32))
    t_len = min(min(len(f) for f in files), world.shape[0])
    v_len = len(cams)
    if "joints_cam" in poses:
        jc = to_17_joints(poses["joints_cam"].astype(np.float32))[:v_len, :t_len]
    else:
        with np.load(os.path.join(seq_dir, "cameras.npz")) as z:
            cam = {k: z[k] for k in z.files}
        if "R" in cam:
            r, t = cam["R"].astype(np.float64), cam["t"].astype(np.float64)
        else:
            r, t = geo.world_to_camera(cam["pose"].astype(np.float64))
        jc = geo.transform_points(world[None, :t_len].astype(np.float64), r[:v_len, None],
                                  t[:v_len, None]).astype(np.float32)
    j2d = None
    if "joints_2d" in poses:
        j2d = to_17_joints(poses["joints_2d"].astype(np.float32))[:v_len, :t_len]
    images = None
    if load_images:
        images = np.stack([np.stack([_read_image(p, image_size) for p in f[:t_len]])
                           for f in files])
    return {"images": images, "joints_cam": jc, "joints_2d": j2d, "joints_world": world[:t_len]}


def load_dataset(root: str, subjects: Sequence[str], actions: Sequence[str] | None = None,
                 image_size=None) -> MultiViewData:
    """Loads every ``ROOT/<subject>/<action>`` sequence of the given subjects."""
    imgs, jcs, j2ds, seq_ids, views, frames = [], [], [], [], [], []
    subj_list, act_list, nv, nt, off = [], [], [], [], []
    offset = 0
    for s in subjects:
        sdir = os.path.join(root, s)
        if not os.path.isdir(sdir):
            raise FileNotFoundError(f"subject folder {sdir} not found")
        acts = actions if actions is not None else sorted(
            a for a in os.listdir(sdir) if os.path.isfile(os.path.join(sdir, a, "poses.npz")))
        for a in acts:
            seq = load_sequence(os.path.join(sdir, a), image_size)
            v, t = seq["images"].shape[:2]
            k = len(subj_list)
            subj_list.append(s)
            act_list.append(a)
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
    if not subj_list:
        raise FileNotFoundError(f"no sequences for {list(subjects)} under {root}")
    j2d = None if any(x is None for x in j2ds) else np.concatenate(j2ds)
    return MultiViewData(images=np.concatenate(imgs), seq_id=np.concatenate(seq_ids),
                         view=np.concatenate(views), frame=np.concatenate(frames),
                         joints_cam=np.concatenate(jcs), joints_2d=j2d, subjects=subj_list,
                         actions=act_list, seq_views=np.asarray(nv), seq_frames=np.asarray(nt),
                         seq_offset=np.asarray(off))
