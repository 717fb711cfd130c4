"""KITTI 3D object detection -> car crops in the NeMo format.

Input: ``label_2/{id}.txt`` (``type truncated occluded alpha x1 y1 x2 y2 h w l
x y z rotation_y``), ``calib/{id}.txt`` (``P2: 12 numbers``), ``image_2/{id}.png``.
Kept (NeMo's rules): type ``Car``, truncation < 0.2, the smaller 2D box side
> ``min_box_side`` (100 px), occlusion 0/1/2 written to the subsets ``car``,
``carFGL1_BGL1``, ``carFGL2_BGL2``.

Pose derivation. KITTI's rectified camera frame has x right, y down, z
forward. A label's ``location`` is the bottom centre of the 3D box in the
frame of camera 0; camera 2 (``image_2``) sits at ``-t`` with ``t = K^-1
P2[:, 3]``, so camera-2 coordinates are ``X + t``. The object's own frame
(KITTI) is the camera frame rotated by ``rotation_y`` about y:
``R_y(r) = [[cos r, 0, sin r], [0, 1, 0], [-sin r, 0, cos r]]``; its heading
(front) is its local +x, local +y points down, so local -z is the car's right
side (front x up = x cross -y = -z).

Our PASCAL3D+ object frame (see :mod:`nvsm_jax.data.shapes`) has the front at
-y, up +z, and +x on the object's left. So a KITTI-local vector ``(x_l, y_l,
z_l)`` is PASCAL vector ``(z_l, -x_l, -y_l)`` (a proper rotation). The camera
seen from the object centre ``c`` (box centre = location - (0, h/2, 0), in
camera-2 coordinates) is ``v = -c``; in the object frame ``v_l = R_y(r)^T v``,
``v_p = (v_l.z, -v_l.x, -v_l.y)``. PASCAL puts the camera at ``d (cos e sin
a, -cos e cos a, sin e)``, hence

    distance  d = |v| / unit_m             (model units; 1 unit = ``unit_m`` metres)
    azimuth   a = atan2(v_p.x, -v_p.y)  mod 2 pi
    elevation e = asin(v_p.z / |v|)
    theta     = 0

For an object straight ahead at the camera's height this gives ``a = alpha +
3 pi / 2`` (``alpha`` = KITTI's observation angle): ``rotation_y = 0`` (car
heading right in the image, right side visible) is azimuth 270 deg, ``pi/2``
(heading towards the camera) is azimuth 0, the front view.

Image: the principal point is the projection of the box centre ``c``
(``P2 [c; 1]``; KITTI pixel coordinates have centres at integers, so screen =
pixel + 0.5), the focal is ``P2[0, 0]``; scale and crop as in
:mod:`nvsm_jax.data.crop`. Approximation (as in NeMo): the real camera does
not look at the object; we do not warp the image to a virtual camera that
does, and theta = 0. The stored fields are exact for objects on the optical
axis and good to a few pixels for off-axis ones.

The model mesh ``CAD_single/car/01.off`` is the cuboid covering 99 % per axis
of the kept cars' box corners (model units, centred on the box centre).
"""

from __future__ import annotations

import glob
import logging
import os

import numpy as np

from nvsm_jax import meshes
from nvsm_jax.data.crop import nemo_scale, scale_and_crop
from nvsm_jax.data.format import DataError, save_npz, subset_name, write_list
from nvsm_jax.data.loaders import load_image

__all__ = ["KittiObject", "read_label", "read_calib", "kitti_pose", "box_corners_pascal",
           "prepare_kitti"]

log = logging.getLogger(__name__)


class KittiObject(dict):
    """type, truncated, occluded, alpha, bbox [4], dims (h, w, l), location [3], rotation_y,
    and where it was read: ``source`` (``path:line``)."""


def _check_object(o, where):
    """Raises DataError naming ``where`` (``path:line``) for values that make no crop."""
    x1, y1, x2, y2 = o["bbox"]
    if not (x2 > x1 and y2 > y1):
        raise DataError(f"{where}: 2D box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is empty or inverted")
    if not np.all(o["dims"] > 0):
        raise DataError(f"{where}: 3D box dimensions (h, w, l) {tuple(o['dims'])} must be positive")


def read_label(path, *, skip_bad: bool = False) -> list[KittiObject]:
    """The objects of a ``label_2`` file. A line with missing, non-numeric or
    non-finite fields raises DataError naming ``path:line`` and the value (with
    ``skip_bad``: a warning, and the line is skipped)."""
    objs = []
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read label file ({type(err).__name__}: {err})") from err
    for n, line in enumerate(lines):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{n + 1}"
        try:
            if len(parts) < 15:
                raise DataError(f"{where}: expected 15 fields, got {len(parts)}")
            try:
                v = [float(x) for x in parts[1:15]]
            except ValueError as err:
                raise DataError(f"{where}: {err}") from err
            if not np.all(np.isfinite(v)):
                names = ("truncated", "occluded", "alpha", "x1", "y1", "x2", "y2", "h", "w", "l",
                         "x", "y", "z", "rotation_y")
                bad = [f"{k} = {x}" for k, x in zip(names, v) if not np.isfinite(x)]
                raise DataError(f"{where}: non-finite field(s) {', '.join(bad)}")
            if v[1] != int(v[1]):
                raise DataError(f"{where}: occluded must be an integer, got {parts[2]}")
        except DataError as err:
            if not skip_bad:
                raise
            log.warning("skipping %s", err)
            continue
        objs.append(KittiObject(type=parts[0], truncated=v[0], occluded=int(v[1]), alpha=v[2],
                                bbox=np.array(v[3:7]), dims=np.array(v[7:10]),
                                location=np.array(v[10:13]), rotation_y=v[13], source=where))
    return objs


def read_calib(path) -> np.ndarray:
    """P2 [3, 4] from a KITTI calib file; DataError naming ``path:line`` for a P2 that
    is not 12 finite numbers or whose left 3x3 block is not an invertible camera."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: calibration file not found")
    with open(path) as f:
        for n, line in enumerate(f):
            if line.startswith("P2:"):
                where = f"{path}:{n + 1}"
                try:
                    vals = np.array([float(x) for x in line.split()[1:13]])
                except ValueError as err:
                    raise DataError(f"{where}: P2 must be 12 numbers ({err})") from err
                if vals.size != 12:
                    raise DataError(f"{where}: P2 needs 12 numbers, got {vals.size}")
                if not np.all(np.isfinite(vals)):
                    raise DataError(f"{where}: P2 holds non-finite numbers {vals.tolist()}")
                P2 = vals.reshape(3, 4)
                K = P2[:, :3]
                if not (K[0, 0] > 0 and K[1, 1] > 0 and K[2, 2] > 0) or \
                        abs(np.linalg.det(K)) < 1e-9 * max(1.0, abs(K[0, 0] * K[1, 1])):
                    raise DataError(f"{where}: P2's left 3x3 block {K.tolist()} is not a camera "
                                    "matrix (focal lengths and P2[2,2] must be positive)")
                return P2
    raise DataError(f"{path}: no P2 line")


def _ry(r):
    c, s = np.cos(r), np.sin(r)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _cam2_offset(P2):
    return np.linalg.solve(P2[:, :3], P2[:, 3])


def object_center(obj, P2) -> np.ndarray:
    """Box centre in camera-2 coordinates (metres)."""
    h = obj["dims"][0]
    return obj["location"] - np.array([0.0, h / 2, 0.0]) + _cam2_offset(P2)


def kitti_pose(obj, P2, unit_m: float = 4.0) -> np.ndarray:
    """(azimuth, elevation, theta=0, distance in model units) of a label. See module doc."""
    c = object_center(obj, P2)
    v = -c
    vl = _ry(obj["rotation_y"]).T @ v
    vp = np.array([vl[2], -vl[0], -vl[1]])
    d = np.linalg.norm(v)
    a = np.mod(np.arctan2(vp[0], -vp[1]), 2 * np.pi)
    e = np.arcsin(np.clip(vp[2] / d, -1, 1))
    return np.array([a, e, 0.0, d / unit_m])


def box_corners_pascal(obj, unit_m: float = 4.0) -> np.ndarray:
    """The 8 corners of the 3D box in the PASCAL object frame (model units) [8, 3]."""
    h, w, l = obj["dims"]
    xs, ys, zs = np.meshgrid([-l / 2, l / 2], [-h / 2, h / 2], [-w / 2, w / 2], indexing="ij")
    local = np.stack([xs.ravel(), ys.ravel(), zs.ravel()], 1)       # centred KITTI-local
    return np.stack([local[:, 2], -local[:, 0], -local[:, 1]], 1) / unit_m


def prepare_kitti(root, out, *, crop_hw=(256, 672), target_focal=3000.0, min_box_side=100.0,
                  max_truncation=0.2, unit_m=4.0, split="train", skip_bad=True,
                  jpeg_quality=95) -> dict:
    """Writes car crops of ``root`` to ``out/{split}`` (subsets per occlusion level)."""
    from PIL import Image
    labels = sorted(glob.glob(os.path.join(root, "label_2", "*.txt")))
    if not labels:
        raise DataError(f"{os.path.join(root, 'label_2')}: no label files")
    dst = os.path.join(out, split)
    H, W = crop_hw
    lists, corners = {}, []
    for lab in labels:
        fid = os.path.splitext(os.path.basename(lab))[0]
        try:
            objs = read_label(lab, skip_bad=skip_bad)
            keep = []
            for k, o in enumerate(objs):
                if o["type"] != "Car":
                    continue
                try:
                    _check_object(o, o["source"])
                except DataError as err:
                    if not skip_bad:
                        raise
                    log.warning("skipping %s", err)
                    continue
                x1, y1, x2, y2 = o["bbox"]
                if o["type"] != "Car" or o["truncated"] >= max_truncation or \
                        o["occluded"] not in (0, 1, 2) or min(x2 - x1, y2 - y1) <= min_box_side:
                    continue
                keep.append((k, o))
            if not keep:
                continue
            P2 = read_calib(os.path.join(root, "calib", fid + ".txt"))
            image = load_image(os.path.join(root, "image_2", fid + ".png"))
            for k, o in keep:
                try:
                    c2 = object_center(o, P2)
                    if not c2[2] > 0:
                        raise DataError(f"{o['source']}: the box centre is behind camera 2 "
                                        f"(depth {c2[2]:g} m, location {o['location'].tolist()})")
                    pose = kitti_pose(o, P2, unit_m)
                    c = c2 - _cam2_offset(P2)
                    uvw = P2 @ np.append(c, 1.0)
                    p_screen = uvw[:2] / uvw[2] + 0.5
                    f_px = float(P2[0, 0])
                    s = nemo_scale(pose[3], f_px, target_focal)
                    try:
                        crop, off = scale_and_crop(image, p_screen, s, crop_hw)
                    except ValueError as err:
                        raise DataError(f"{o['source']}: {err}") from err
                except DataError as err:
                    if not skip_bad:
                        raise
                    log.warning("skipping %s", err)
                    continue
                x1, y1, x2, y2 = o["bbox"]
                box = np.array([x1, y1, x2 + 1, y2 + 1]) * s - np.concatenate([off, off])
                sub = subset_name("car", int(o["occluded"]))
                name = f"{fid}_{k:02d}"
                os.makedirs(os.path.join(dst, "images", sub), exist_ok=True)
                Image.fromarray(crop).save(os.path.join(dst, "images", sub, name + ".JPEG"),
                                           quality=jpeg_quality)
                save_npz(os.path.join(dst, "annotations", sub, name + ".npz"),
                         azimuth=np.float64(pose[0]), elevation=np.float64(pose[1]),
                         theta=np.float64(0.0), distance=np.float64(pose[3]),
                         focal=np.float64(1.0), viewport=np.float64(f_px * s),
                         principal=np.array([W / 2.0, H / 2.0]), box=box, bbox=box,
                         cad_index=np.int64(1), height=np.int64(H), width=np.int64(W),
                         occluded=np.int64(o["occluded"]), truncated=np.float64(o["truncated"]),
                         alpha=np.float64(o["alpha"]), rotation_y=np.float64(o["rotation_y"]),
                         dims=np.asarray(o["dims"]), location=np.asarray(o["location"]),
                         scale=np.float64(s))
                lists.setdefault(sub, []).append(name)
                corners.append(box_corners_pascal(o, unit_m))
        except DataError as err:
            if not skip_bad:
                raise
            log.warning("skipping %s", err)
    for sub, names in sorted(lists.items()):
        write_list(os.path.join(dst, "lists", sub, "mesh01.txt"), names)
    if corners:
        cub = meshes.cuboid_for_points(np.concatenate(corners), 0.99, 1000, symmetric_axes=(0,))
        meshes.save_off(os.path.join(dst, "CAD_single", "car", "01.off"), *cub)
    return {sub: len(n) for sub, n in lists.items()}
