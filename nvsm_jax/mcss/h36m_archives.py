"""The official Human3.6M archives -> the layout :mod:`nvsm_jax.mcss.h36m` reads.

Input (``root``, the subject archives extracted side by side)::

    S1/MyPoseFeatures/D3_Positions/<Action>.cdf                 Pose [1, T, 96]
    S1/MyPoseFeatures/D3_Positions_mono/<Action>.<camera>.cdf   Pose [1, T, 96]
    S1/MyPoseFeatures/D2_Positions/<Action>.<camera>.cdf        Pose [1, T, 64]
    S1/Videos/<Action>.<camera>.mp4                             50 fps

or, instead of a video, a folder ``S1/Videos/<Action>.<camera>/`` holding that
video's frames as images (sorted by name = frame order).

Facts about the release this module relies on (checked against public
preprocessing code for the dataset: VideoPose3D's ``data/prepare_data_h36m.py``
and ``common/h36m_dataset.py``, h36m-fetch's ``process_all.py``, and mmpose's
``tools/dataset_converters/preprocess_h36m.py``, plus the issue threads cited):

* ``Pose`` is the one variable used in every feature CDF; it holds one record,
  so it reads as ``[1, T, 32 * D]``: ``D3_Positions`` (world frame, one file per
  action, no camera in the name) and ``D3_Positions_mono`` (camera frame, one
  per action and camera) reshape to ``[T, 32, 3]`` (mm); ``D2_Positions`` (one
  per action and camera) to ``[T, 32, 2]`` (pixels of that camera's video).
  The 32 joints are the mocap order; joint 0 is the pelvis (the root).
* Feature files and videos of one view share the base name
  ``<Action>.<camera>``: ``MyPoseFeatures/D2_Positions/<base>.cdf``,
  ``MyPoseFeatures/D3_Positions_mono/<base>.cdf``, ``Videos/<base>.mp4``.
* The four cameras are 54138969, 55011271, 58860488, 60457274; their videos
  are 1000 x 1002 (54138969, 60457274) and 1000 x 1000 pixels, 50 fps.
* Action names carry the sub-action as a suffix and differ between subjects
  (``Walking`` / ``Walking 1``, ``Eating`` / ``Eating 2``, ``Directions 1`` /
  ``Directions 2``; ``TakingPhoto`` / ``Photo``, ``WalkingDog`` / ``WalkDog``
  between releases); ``_ALL`` names are montages and are skipped here.
* Video frame ``i`` (0-based, in decoding order) is pose frame ``i``; the
  common practice keeps every 5th frame (10 fps). The number of decoded frames
  differs slightly from the pose count for some videos (3d-pose-baseline issue
  #48; VideoPose3D issue #215 reports one far longer video), so the extra tail
  is cut; a video much *shorter* than its poses is treated as broken.
* One video is known to be corrupt: S11 ``Directions``, camera 54138969
  (VideoPose3D drops S11 ``Directions``; h36m-fetch reads ``Directions 1`` for
  that camera). Nothing here special-cases it: a video that does not decode,
  or decodes short, drops its camera and the action is skipped with a warning
  (``min_cameras``); ``--actions`` selects what to prepare.

Output (``out``), per subject and action (see :mod:`nvsm_jax.mcss.h36m`)::

    out/<subject>/<action>/cam<k>/<frame:06d>.png    k = the camera's index in
                                                     ``cameras``, frame = the
                                                     original 0-based frame index
    out/<subject>/<action>/poses.npz
        joints_world [T, 32, 3]      mm (D3_Positions)
        joints_cam   [V, T, 32, 3]   mm, camera frame (D3_Positions_mono)
        joints_2d    [V, T, 32, 2]   in the crop, screen coordinates (x = column,
                                     y = row, pixel centres at +0.5): the root
                                     is at (size / 2, size / 2)
    out/<subject>/<action>/crops.npz   provenance: frame_index [T], camera_id [V],
                                       crop_center [V, T, 2], crop_side [V, T]
                                       (source screen coordinates / pixels)
    out/<subject>/<action>/prepare.json   the settings and source files

Crops. Each frame is cropped to a square centred on the root joint's 2-D
position, of side ``2 (1 + margin) max_j |p_j - p_root|_inf`` (so the whole
2-D skeleton lies inside, with ``margin`` to spare on the farthest side), and
resized to ``size`` px (antialiased). Parts outside the video are black. 2-D
positions come from ``D2_Positions``; where a camera has none, from
``D3_Positions_mono`` through ``intrinsics`` (pinhole, no distortion). We read
D2 pixel coordinates with pixel centres at integers (screen = pixel + 0.5);
the convention is not documented, and the other choice moves a crop by half a
source pixel (a tenth of a crop pixel at typical scales).

Frames ``0, frame_step, 2 frame_step, ...`` below the shortest of the poses and
the videos are kept, the same in every camera, so views stay synchronised.

Bad input. Each problem raises :class:`~nvsm_jax.data.DataError` naming the
file: a missing, truncated or malformed CDF (no ``Pose``, wrong shape, NaN), a
missing or undecodable video, a video more than ``max_frame_gap`` frames
shorter than its poses, a camera's CDF whose frame count differs from
``D3_Positions``' by more than that. With ``skip_bad`` (the default) a bad camera is dropped with a
warning and an action left with fewer than ``min_cameras`` cameras is skipped
with a warning; ``skip_bad=False`` (``--strict``) raises instead.

Idempotent: an action whose ``poses.npz`` and ``prepare.json`` exist is left
as it is (a different ``size``, ``frame_step``, ``margin`` or camera list
raises, naming its ``prepare.json``). Frames are written to a hidden
``.<action>.partial`` folder that is renamed when complete; ``poses.npz`` is
written last, so an interrupted run redoes only the unfinished action.

Optional dependencies, imported when needed: ``cdflib`` (CDF files) and
``imageio-ffmpeg`` (videos; it ships an ffmpeg binary): ``pip install cdflib
imageio-ffmpeg``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from nvsm_jax.data.format import IMAGE_EXTENSIONS, DataError, save_npz, save_png

__all__ = ["CAMERA_IDS", "SUBJECTS", "FPS", "read_pose_cdf", "read_video_frames",
           "find_actions", "crop_boxes", "crop_frame", "PrepareOptions", "prepare_action",
           "prepare_h36m"]

log = logging.getLogger(__name__)

CAMERA_IDS = ("54138969", "55011271", "58860488", "60457274")
SUBJECTS = ("S1", "S5", "S6", "S7", "S8", "S9", "S11")
FPS = 50
ROOT_JOINT = 0
NUM_JOINTS = 32
MAX_CROP_SIDE = 8000       # px; the videos are 1000 px wide

# Settings that change the output; a finished action prepared with others raises.
_SETTINGS = ("size", "frame_step", "margin", "cameras")

FrameReader = Callable[[str, int], Iterable[np.ndarray]]


def _missing(package: str, what: str) -> ImportError:
    return ImportError(f"reading Human3.6M {what} needs the package {package!r}: "
                       f"pip install {package}")


# --- CDF ----------------------------------------------------------------------------------

def read_pose_cdf(path: str, width: int) -> np.ndarray:
    """The ``Pose`` variable of a Human3.6M feature CDF as float32 ``[T, 32, width]``.

    DataError naming ``path`` for a missing, unreadable or truncated file, no
    ``Pose`` variable, a shape other than ``[1, T, 32 * width]`` (``[T, 32 *
    width]`` is accepted too), no frames, or non-finite values (the frame and
    joint are named).
    """
    try:
        import cdflib
    except ImportError as err:
        raise _missing("cdflib", "pose files (.cdf)") from err
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found")
    try:
        cdf = cdflib.CDF(path)
        names = list(cdf.cdf_info().zVariables) + list(cdf.cdf_info().rVariables)
    except Exception as err:   # cdflib raises OSError, ValueError, ... on bad files
        raise DataError(f"{path}: not a readable CDF file ({type(err).__name__}: {err})"
                        ) from err
    if "Pose" not in names:
        raise DataError(f"{path}: no 'Pose' variable (variables: {names})")
    try:
        pose = np.asarray(cdf.varget("Pose"))
    except Exception as err:   # truncated files fail here with assorted errors
        raise DataError(f"{path}: cannot read 'Pose', is the file truncated? "
                        f"({type(err).__name__}: {err})") from err
    shape = pose.shape
    if pose.ndim == 3 and pose.shape[0] == 1:
        pose = pose[0]
    if pose.dtype.kind not in "iuf" or pose.ndim != 2 or pose.shape[1] != NUM_JOINTS * width \
            or pose.shape[0] == 0:
        raise DataError(f"{path}: 'Pose' must be numbers of shape [1, T, {NUM_JOINTS * width}] "
                        f"(T > 0), got {pose.dtype} {shape}")
    pose = pose.reshape(len(pose), NUM_JOINTS, width).astype(np.float32)
    bad = ~np.isfinite(pose).all(-1)
    if bad.any():
        t, j = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{path}: 'Pose' holds {int(bad.sum())} non-finite joint(s), first at "
                        f"frame {t}, joint {j}: {pose[t, j].tolist()}")
    return pose


# --- videos -------------------------------------------------------------------------------

def _folder_frames(folder: str, step: int) -> Iterator[np.ndarray]:
    from PIL import Image
    files = sorted(f for f in os.listdir(folder) if f.endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"{folder}: frame folder holds no images")
    for name in files[::step]:
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as im:
                yield np.asarray(im.convert("RGB"), np.uint8)
        except Exception as err:   # PIL raises several types on corrupt files
            raise DataError(f"{path}: cannot decode frame ({type(err).__name__}: {err})"
                            ) from err


def _ffmpeg_frames(path: str, step: int) -> Iterator[np.ndarray]:
    try:
        import imageio_ffmpeg
    except ImportError as err:
        raise _missing("imageio-ffmpeg", "videos (.mp4)") from err
    # Only every step-th decoded frame leaves ffmpeg; "passthrough" keeps ffmpeg from
    # duplicating frames to fill the gaps (it would, to keep a constant rate).
    params = ["-fps_mode", "passthrough"]
    if step > 1:
        params = ["-vf", f"select=not(mod(n\\,{step}))"] + params
    gen = imageio_ffmpeg.read_frames(path, output_params=params)
    try:
        meta = next(gen)
        w, h = meta["size"]
        for raw in gen:
            yield np.frombuffer(raw, np.uint8).reshape(h, w, 3)
    except Exception as err:   # ffmpeg failures surface as OSError / RuntimeError
        msg = " ".join(str(err).split())
        raise DataError(f"{path}: cannot decode video ({type(err).__name__}: "
                        f"{msg[-400:]})") from err
    finally:
        gen.close()                # ends the ffmpeg process


def read_video_frames(path: str, step: int = 1) -> Iterator[np.ndarray]:
    """Frames ``0, step, 2 step, ...`` of a video file (ffmpeg, through
    imageio-ffmpeg) or of a folder of frame images, as uint8 ``[H, W, 3]``.
    DataError naming the file when it cannot be decoded."""
    if os.path.isdir(path):
        return _folder_frames(path, step)
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found")
    return _ffmpeg_frames(path, step)


def _video_path(subject_dir: str, base: str) -> str:
    """``Videos/<base>.mp4``, else a ``Videos/<base>/`` frame folder; DataError if neither."""
    mp4 = os.path.join(subject_dir, "Videos", base + ".mp4")
    folder = os.path.join(subject_dir, "Videos", base)
    if os.path.isfile(mp4):
        return mp4
    if os.path.isdir(folder):
        return folder
    raise DataError(f"{mp4}: not found (nor a frame folder {folder}{os.sep})")


# --- crops --------------------------------------------------------------------------------

def crop_boxes(joints_2d: np.ndarray, margin: float = 0.2, min_side: float = 8.0):
    """Square crops around the root: ``joints_2d`` [..., 32, 2] screen coordinates ->
    (centre [..., 2], side [...]); side = 2 (1 + margin) * the largest |x| or |y|
    distance of a joint from the root (at least ``min_side``)."""
    center = joints_2d[..., ROOT_JOINT, :]
    half = np.abs(joints_2d - center[..., None, :]).max(axis=(-1, -2))
    return center, np.maximum(2.0 * (1.0 + margin) * half, min_side)


def crop_frame(frame: np.ndarray, center, side: float, size: int) -> np.ndarray:
    """The ``side`` x ``side`` square of ``frame`` centred on screen point ``center``,
    resized to ``size`` x ``size`` (antialiased); outside the frame is black."""
    from PIL import Image
    x0, y0 = float(center[0]) - side / 2.0, float(center[1]) - side / 2.0
    ix0, iy0 = int(np.floor(x0)), int(np.floor(y0))
    ix1, iy1 = int(np.ceil(x0 + side)), int(np.ceil(y0 + side))
    im = Image.fromarray(frame).crop((ix0, iy0, ix1, iy1))   # zero-padded outside
    box = (x0 - ix0, y0 - iy0, x0 - ix0 + side, y0 - iy0 + side)
    return np.asarray(im.resize((size, size), Image.BILINEAR, box=box), np.uint8)


# --- one action ---------------------------------------------------------------------------

def _base_name(action: str) -> str:
    return re.sub(r" \d+$", "", action)


def find_actions(subject_dir: str, actions: Sequence[str] | None = None) -> list[str]:
    """Action names of a subject (``D3_Positions/<action>.cdf``), sorted. ``actions``
    keeps those named exactly or by their name without the sub-action number
    (``"Walking"`` keeps ``Walking``, ``Walking 1``, ...)."""
    folder = os.path.join(subject_dir, "MyPoseFeatures", "D3_Positions")
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: not found (expected the subject's D3_Positions/*.cdf)")
    found = sorted(os.path.splitext(f)[0] for f in os.listdir(folder)
                   if f.endswith(".cdf") and not f.startswith("_"))
    if actions is None:
        return found
    wanted = set(actions)
    return [a for a in found if a in wanted or _base_name(a) in wanted]


def _settings(size, frame_step, margin, cameras) -> dict:
    return {"size": int(size), "frame_step": int(frame_step), "margin": float(margin),
            "cameras": list(cameras)}


def _check_done(seq_dir: str, settings: dict) -> bool:
    """True if ``seq_dir`` holds a finished action prepared with ``settings``."""
    meta_path = os.path.join(seq_dir, "prepare.json")
    if not (os.path.isfile(os.path.join(seq_dir, "poses.npz")) and os.path.isfile(meta_path)):
        return False
    try:
        with open(meta_path) as f:
            old = json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path}: cannot read ({type(err).__name__}: {err}); remove the "
                        "action folder to prepare it again") from err
    diff = {k: (old.get(k), settings[k]) for k in _SETTINGS if old.get(k) != settings[k]}
    if diff:
        raise DataError(f"{meta_path}: this action was prepared with other settings ("
                        + ", ".join(f"{k} {a!r}, now {b!r}" for k, (a, b) in diff.items())
                        + "); use another output folder or remove it")
    return True


def _views_2d(mono_path, d2_path, mono, cam, intrinsics):
    """2-D joints of one view: D2_Positions, else mono through the camera's intrinsics."""
    if os.path.isfile(d2_path) or not (intrinsics and cam in intrinsics):
        return read_pose_cdf(d2_path, 2) + 0.5           # pixel centres -> screen
    fx, fy, cx, cy = (float(v) for v in intrinsics[cam])
    z = mono[..., 2]
    if not np.all(z > 0):
        t, j = (int(i) for i in np.argwhere(~(z > 0))[0])
        raise DataError(f"{mono_path}: joint {j} of frame {t} is not in front of the camera "
                        f"(z = {z[t, j]:g} mm); cannot project it without {d2_path}")
    uv = np.stack([fx * mono[..., 0] / z + cx, fy * mono[..., 1] / z + cy], -1)
    return (uv + 0.5).astype(np.float32)


def _check_lengths(world, mono, path, tol_mm=5.0):
    """Warns when camera-frame joints are not a rigid motion of the world joints."""
    t = min(len(world), len(mono))
    dw = np.linalg.norm(world[:t] - world[:t, :1], axis=-1)
    dm = np.linalg.norm(mono[:t] - mono[:t, :1], axis=-1)
    err = float(np.median(np.abs(dw - dm)))
    if err > tol_mm:
        log.warning("%s: joint distances to the root differ from D3_Positions by %.1f mm "
                    "(median); is it another action's file?", path, err)


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """How :func:`prepare_action` / :func:`prepare_h36m` prepare an action.

    size: crop side, pixels. frame_step: keep frames ``0, frame_step, ...``
    (50 fps / frame_step). margin: crop side = 2 (1 + margin) x the 2-D
    skeleton's half extent. cameras: camera ids, in view order (``cam<k>`` = the
    k-th); an action needs ``min_cameras`` of them (default: all).
    max_frame_gap: how many frames a video or feature file may lack against
    ``D3_Positions``. intrinsics: camera id -> (fx, fy, cx, cy) pixels, used for
    views without ``D2_Positions``. skip_bad: drop a bad camera / skip a bad
    action or subject with a warning (False: raise). frame_reader(path, step):
    yields frames 0, step, ... (default :func:`read_video_frames`).
    size, frame_step, margin and cameras change the output: a finished action
    prepared with others raises.
    """

    size: int = 64
    frame_step: int = 5
    margin: float = 0.2
    cameras: Sequence[str] = CAMERA_IDS
    min_cameras: int | None = None
    max_frame_gap: int = 10
    intrinsics: Mapping[str, Sequence[float]] | None = None
    skip_bad: bool = True
    frame_reader: FrameReader | None = None


def prepare_action(root: str, out: str, subject: str, action: str, *,
                   options: PrepareOptions = PrepareOptions()) -> dict:
    """Prepares ``root/<subject>``'s ``action`` into ``out/<subject>/<action>``.

    options: :class:`PrepareOptions`.
    Returns ``{"status": "written" | "existing" | "skipped", "views": V, "frames": T}``.
    See the module docstring for the files, the checks and ``skip_bad``.
    """
    size, frame_step, margin, cameras = (options.size, options.frame_step, options.margin,
                                         options.cameras)
    min_cameras, max_frame_gap, intrinsics = (options.min_cameras, options.max_frame_gap,
                                              options.intrinsics)
    skip_bad, frame_reader = options.skip_bad, options.frame_reader
    if size < 1 or frame_step < 1 or margin < 0 or max_frame_gap < 0:
        raise ValueError(f"size {size} and frame_step {frame_step} must be >= 1, margin "
                         f"{margin} and max_frame_gap {max_frame_gap} >= 0")
    cameras = [str(c) for c in cameras]
    min_cameras = len(cameras) if min_cameras is None else int(min_cameras)
    read = frame_reader or read_video_frames
    settings = _settings(size, frame_step, margin, cameras)
    sdir = os.path.join(root, subject)
    seq_dir = os.path.join(out, subject, action)
    where = f"{subject}/{action}"
    if _check_done(seq_dir, settings):
        log.info("%s: already prepared, left as it is", where)
        return {"status": "existing", "views": None, "frames": None}

    def bad(err: DataError, what: str):
        if not skip_bad:
            raise err
        log.warning("%s: %s: %s", where, what, err)

    feats = os.path.join(sdir, "MyPoseFeatures")
    world_path = os.path.join(feats, "D3_Positions", action + ".cdf")
    try:
        world = read_pose_cdf(world_path, 3)
    except DataError as err:
        bad(err, "skipping the action")
        return {"status": "skipped", "views": 0, "frames": 0}

    # Poses of each camera; a camera with a bad file is dropped.
    views = []
    for k, cam in enumerate(cameras):
        base = f"{action}.{cam}"
        mono_path = os.path.join(feats, "D3_Positions_mono", base + ".cdf")
        d2_path = os.path.join(feats, "D2_Positions", base + ".cdf")
        try:
            mono = read_pose_cdf(mono_path, 3)
            uv = _views_2d(mono_path, d2_path, mono, cam, intrinsics)
            video = _video_path(sdir, base)
            uv_path = d2_path if os.path.isfile(d2_path) else mono_path
            for path, n in ((mono_path, len(mono)), (uv_path, len(uv))):
                if abs(n - len(world)) > max_frame_gap:
                    raise DataError(f"{path}: {n} frames, but {world_path} has {len(world)} "
                                    f"(more than max_frame_gap={max_frame_gap} apart)")
            _, side = crop_boxes(uv, margin)
            if side.max() > MAX_CROP_SIDE:
                t = int(np.argmax(side))
                raise DataError(f"{uv_path}: the 2-D joints of frame {t} span "
                                f"{side[t]:.0f} px (crop side), implausible for a "
                                f"{MAX_CROP_SIDE} px limit: {uv[t].tolist()[:4]} ...")
        except DataError as err:
            bad(err, f"camera {cam} dropped")
            continue
        _check_lengths(world, mono, mono_path)
        views.append({"k": k, "cam": cam, "mono": mono, "uv": uv, "video": video})
    if len(views) < max(min_cameras, 1):
        bad(DataError(f"{os.path.join(sdir, 'Videos')}: {where} has {len(views)} usable of "
                      f"{len(cameras)} cameras, fewer than min_cameras={min_cameras}"),
            "skipping the action")
        return {"status": "skipped", "views": len(views), "frames": 0}

    t_pose = min([len(world)] + [min(len(v["mono"]), len(v["uv"])) for v in views])
    want = np.arange(0, t_pose, frame_step)
    tmp = os.path.join(out, subject, f".{action}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    kept = []
    for v in views:
        center, side = crop_boxes(v["uv"][want], margin)
        cam_dir = os.path.join(tmp, f"cam{v['k']}")
        have, frames = 0, None
        try:
            frames = iter(read(v["video"], frame_step))
            for frame in frames:
                crop = crop_frame(frame, center[have], float(side[have]), size)
                save_png(os.path.join(cam_dir, f"{int(want[have]):06d}.png"), crop)
                have += 1
                if have == len(want):
                    break
            # Short of want, the video has at most have * frame_step frames.
            if have == 0 or (have < len(want) and t_pose - have * frame_step > max_frame_gap):
                raise DataError(
                    f"{v['video']}: holds {have} of the {len(want)} frames at step "
                    f"{frame_step} (at most {have * frame_step} frames), its poses {t_pose}: "
                    f"more than max_frame_gap={max_frame_gap} frames short")
        except DataError as err:
            shutil.rmtree(cam_dir, ignore_errors=True)
            if not skip_bad:
                shutil.rmtree(tmp, ignore_errors=True)
            bad(err, f"camera {v['cam']} dropped")
            continue
        finally:
            if hasattr(frames, "close"):
                frames.close()             # stops ffmpeg when the poses end first
        v.update(center=center, side=side, have=have)
        kept.append(v)
    if len(kept) < max(min_cameras, 1):
        shutil.rmtree(tmp, ignore_errors=True)
        bad(DataError(f"{os.path.join(sdir, 'Videos')}: {where} has {len(kept)} decodable of "
                      f"{len(cameras)} cameras, fewer than min_cameras={min_cameras}"),
            "skipping the action")
        return {"status": "skipped", "views": len(kept), "frames": 0}

    t_len = min(v["have"] for v in kept)
    for v in kept:                      # every camera cut to the shortest
        for t in want[t_len:v["have"]]:
            os.remove(os.path.join(tmp, f"cam{v['k']}", f"{int(t):06d}.png"))
    frames = want[:t_len]
    centers = np.stack([v["center"][:t_len] for v in kept]).astype(np.float32)
    sides = np.stack([v["side"][:t_len] for v in kept]).astype(np.float32)
    uv = np.stack([v["uv"][frames] for v in kept])
    j2d = (uv - (centers - sides[..., None] / 2)[:, :, None]) * (size / sides)[..., None, None]
    save_npz(os.path.join(tmp, "crops.npz"), frame_index=frames.astype(np.int64),
             camera_id=np.array([v["cam"] for v in kept]), crop_center=centers, crop_side=sides)
    meta = {"settings": settings, "subject": subject, "action": action, "fps": FPS / frame_step,
            "frames": int(t_len), "cameras": [v["cam"] for v in kept],
            "folders": [f"cam{v['k']}" for v in kept],
            "sources": {"D3_Positions": world_path,
                        "D3_Positions_mono": [os.path.join(
                            feats, "D3_Positions_mono", f"{action}.{v['cam']}.cdf") for v in kept],
                        "videos": [v["video"] for v in kept]}}
    with open(os.path.join(tmp, "prepare.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(seq_dir, ignore_errors=True)          # an unfinished earlier attempt
    os.makedirs(os.path.dirname(seq_dir), exist_ok=True)
    os.replace(tmp, seq_dir)
    part = os.path.join(seq_dir, "poses.partial.npz")
    save_npz(part, joints_world=world[frames],
             joints_cam=np.stack([v["mono"][frames] for v in kept]),
             joints_2d=j2d.astype(np.float32))
    os.replace(part, os.path.join(seq_dir, "poses.npz"))
    log.info("%s: %d cameras x %d frames written", where, len(kept), t_len)
    return {"status": "written", "views": len(kept), "frames": int(t_len)}


# --- everything ---------------------------------------------------------------------------

def prepare_h36m(root: str, out: str, subjects: Sequence[str] = SUBJECTS,
                 actions: Sequence[str] | None = None, *,
                 options: PrepareOptions = PrepareOptions()) -> dict:
    """Prepares every action of ``subjects`` (or those ``actions`` select, see
    :func:`find_actions`) from ``root`` into ``out``.

    options: :class:`PrepareOptions` (size, frame_step, margin, cameras,
    min_cameras, max_frame_gap, intrinsics, skip_bad, frame_reader), the same for
    every action. Returns counts: ``written``, ``existing``,
    ``skipped`` (lists of ``subject/action``; a subject that could not be read is
    listed in ``skipped`` by name) and ``frames`` (images written).
    """
    skip_bad = options.skip_bad
    counts = {"written": [], "existing": [], "skipped": [], "frames": 0}
    for subject in subjects:
        sdir = os.path.join(root, subject)
        try:
            if not os.path.isdir(sdir):
                raise DataError(f"{sdir}: subject folder not found")
            names = find_actions(sdir, actions)
            if not names:
                raise DataError(f"{os.path.join(sdir, 'MyPoseFeatures', 'D3_Positions')}: no "
                                f"action files" + (f" for {list(actions)}" if actions else ""))
        except DataError as err:
            if not skip_bad:
                raise
            log.warning("skipping subject %s: %s", subject, err)
            counts["skipped"].append(subject)
            continue
        for action in names:
            r = prepare_action(root, out, subject, action, options=options)
            counts[r["status"]].append(f"{subject}/{action}")
            if r["status"] == "written":
                counts["frames"] += r["views"] * r["frames"]
    return counts
