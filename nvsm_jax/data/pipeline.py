"""Input pipeline: static-size numpy batches, augmentation, sharding.

Batches are dicts of numpy arrays with a static leading size ``batch_size``:

* ``image``: ``[B, H, W, 3]`` **uint8** by default (cheap to transfer; turn it
  into network input on device with :func:`normalize_images`), or float32
  ImageNet-normalised (``(x / 255 - mean) / std``) with
  ``image_dtype="float32"``;
* ``pose``: ``[B, 4]`` float32 (PoseSet only; an UnlabelledSet has none);
* ``focal``: ``[B]`` float32 pixels; ``principal``: ``[B, 2]`` float32;
* ``index``: ``[B]`` int32 row of the source set (after a flip the row's
  image is mirrored, the index still names the source row);
* ``flipped``: ``[B]`` bool; with ``include_masks`` also ``object_mask`` /
  ``occluder_mask`` ``[B, H, W]`` bool.

Order: the rows form one endless stream, the concatenation of per-epoch
permutations drawn from ``np.random.default_rng([seed, epoch])``; batch
``step`` is rows ``[step * B, (step + 1) * B)`` of the stream. So a batch is a
pure function of ``(seed, step)``: iteration is reproducible and resumes from
any step number, and sets smaller than a batch (7 anchors) still give full
batches. Augmentation randomness is drawn from ``(seed, step)`` as well.

Horizontal flip rule (mirroring the image about its vertical centre line,
screen ``x -> W - x``): ``azimuth -> 2 pi - azimuth``, ``theta -> -theta``,
``principal x -> W - px``; elevation and distance unchanged. It is exact for
objects that are mirror-symmetric about their x = 0 plane (PASCAL3D+ objects
are, nearly; tests/test_data_pipeline.py checks it by projection).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from nvsm_jax import parallel
from nvsm_jax.data.fewshot import UnlabelledSet
from nvsm_jax.data.loaders import PoseSet
from nvsm_jax.settings import Augment

__all__ = ["Augment", "BatchIterator", "flip_pose", "flip_batch", "color_jitter",
           "hue_rotation", "recolor", "augment_from_config", "normalize_images", "shard",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize_images(images, xnp=np):
    """uint8 ``[..., 3]`` -> float32 ImageNet-normalised (numpy or jax.numpy)."""
    x = xnp.asarray(images).astype(xnp.float32) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def flip_pose(pose, principal, width):
    """Pose and principal point of the horizontally mirrored image.

    pose: [..., 4]; principal: [..., 2]; width: image width W (pixels).
    """
    pose = np.array(pose, np.float32, copy=True)
    principal = np.array(principal, np.float32, copy=True)
    pose[..., 0] = np.mod(2 * np.pi - pose[..., 0], 2 * np.pi)
    pose[..., 2] = -pose[..., 2]
    principal[..., 0] = width - principal[..., 0]
    return pose, principal


def flip_batch(batch: dict, which: np.ndarray) -> dict:
    """Mirrors the rows ``which`` ([B] bool) of a batch (images, masks, pose, principal)."""
    out = dict(batch)
    which = np.asarray(which, bool)
    if not which.any():
        out["flipped"] = which
        return out
    width = batch["image"].shape[2]
    for key in ("image", "object_mask", "occluder_mask"):
        if key in out:
            x = out[key].copy()
            x[which] = x[which][:, :, ::-1]
            out[key] = x
    principal = out["principal"].copy()
    if "pose" in out:
        pose = out["pose"].copy()
        pose[which], principal[which] = flip_pose(pose[which], principal[which], width)
        out["pose"] = pose
    else:
        principal[which, 0] = width - principal[which, 0]
    out["principal"] = principal
    out["flipped"] = which
    return out


def _draw_rows(rows, n: int):
    """``(which, total)``: the rows of a batch of ``total`` that ``images`` holds."""
    return (slice(0, n), n) if rows is None else rows


def color_jitter(images: np.ndarray, rng: np.random.Generator, brightness: float = 0.2,
                 contrast: float = 0.2, saturation: float = 0.2, *, rows=None) -> np.ndarray:
    """Per-image random brightness/contrast/saturation on uint8 ``[B, H, W, 3]``.

    rows: ``(slice, total)`` when ``images`` are those rows of a batch of ``total``
    (one process's share): the draws are made for ``total`` and sliced."""
    which, b = _draw_rows(rows, len(images))
    x = images.astype(np.float32)
    gray = x.mean(-1, keepdims=True)
    s = rng.uniform(1 - saturation, 1 + saturation, (b, 1, 1, 1)).astype(np.float32)[which]
    x = gray + (x - gray) * s
    mean = x.mean((1, 2, 3), keepdims=True)
    c = rng.uniform(1 - contrast, 1 + contrast, (b, 1, 1, 1)).astype(np.float32)[which]
    x = mean + (x - mean) * c
    x = x * rng.uniform(1 - brightness, 1 + brightness, (b, 1, 1, 1)).astype(np.float32)[which]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def hue_rotation(angle) -> np.ndarray:
    """RGB matrices rotating colours about the grey axis: angle [B] radians -> [B, 3, 3].

    Rotation by ``angle`` about ``(1, 1, 1) / sqrt(3)`` (Rodrigues): greys stay grey,
    brightness ``r + g + b`` and saturation (distance from the grey axis) are
    kept, the hue turns by ``angle``.
    """
    angle = np.asarray(angle, np.float64)
    u = np.ones(3) / np.sqrt(3.0)
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    return (c * np.eye(3) + s * cross + (1 - c) * np.outer(u, u)).astype(np.float32)


def recolor(images: np.ndarray, rng: np.random.Generator, hue: float = 0.0,
            grayscale_prob: float = 0.0, *, rows=None) -> np.ndarray:
    """Per-image random hue rotation and greyscale on uint8 ``[B, H, W, 3]``.

    hue: rotation angles are drawn from ``U(-hue * pi, hue * pi)`` (1 = any hue);
    grayscale_prob: probability of replacing an image by its grey level.
    The random draws happen even when an effect is off, so switching one
    effect does not change the other's draws. rows: as in :func:`color_jitter`.
    """
    which, b = _draw_rows(rows, len(images))
    angle = (rng.uniform(-np.pi, np.pi, b) * hue)[which]
    gray = (rng.random(b) < grayscale_prob)[which]
    if hue == 0 and not gray.any():
        return images
    m = hue_rotation(angle)
    m[gray] = np.full((3, 3), 1.0 / 3.0, np.float32)
    x = np.einsum("bhwc,bdc->bhwd", images.astype(np.float32), m)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment_from_config(aug) -> Augment | None:
    """The ``augment`` block as an :class:`Augment` (given one, or a mapping with its
    fields: missing ones keep their defaults, older configs lack ``hue`` /
    ``grayscale_prob``), or None when the block is None or every effect is off."""
    if aug is None:
        return None
    if isinstance(aug, Augment):
        aug = aug.to_dict()
    fields = {f.name: float(aug.get(f.name, f.default)) for f in dataclasses.fields(Augment)}
    if not any(v > 0 for v in fields.values()):
        return None
    return Augment(**fields)


class BatchIterator:
    """Reproducible, resumable static-size batches over a PoseSet or UnlabelledSet.

    ``it.batch(step)`` is the batch of a given step; ``iter(it)`` /
    ``it.iterate(start_step)`` yields them from a step on, forever (or
    ``num_steps``). See the module doc for the order and keys.
    """

    def __init__(self, data: PoseSet | UnlabelledSet, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, augment: Augment | None = None,
                 image_dtype: str = "uint8", include_masks: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(data) == 0:
            raise ValueError("BatchIterator: empty data set")
        if image_dtype not in ("uint8", "float32"):
            raise ValueError(f"image_dtype must be 'uint8' or 'float32', got {image_dtype!r}")
        self.data = data
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.augment = augment
        self.image_dtype = image_dtype
        self.include_masks = include_masks and isinstance(data, PoseSet) and \
            data.object_mask is not None
        self._perm = functools.lru_cache(maxsize=8)(self._permutation)

    def __len__(self) -> int:
        """Steps per epoch (ceil)."""
        return -(-len(self.data) // self.batch_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.data)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def indices(self, step: int) -> np.ndarray:
        """Source rows of batch ``step``: [B] int64."""
        n = len(self.data)
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epochs = pos // n
        out = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[pos[sel] % n]
        return out

    def batch(self, step: int, rows: slice | None = None) -> dict:
        """The batch of ``step``; with ``rows`` (a slice of ``0 .. batch_size``) only
        those rows of it, e.g. one process's share of a global batch: only their
        images are read and augmented, and they equal the same rows of the whole
        batch (every random draw is made for the whole batch)."""
        idx = self.indices(step)
        b = len(idx)
        rows = slice(0, b) if rows is None else rows
        local = idx[rows]
        d = self.data
        out = {"image": np.asarray(d.images[local]), "focal": d.focal[local].astype(np.float32),
               "principal": d.principal[local].astype(np.float32),
               "index": local.astype(np.int32)}
        if isinstance(d, PoseSet):
            out["pose"] = d.poses[local].astype(np.float32)
            if self.include_masks:
                out["object_mask"] = d.object_mask[local]
                if d.occluder_mask is not None:
                    out["occluder_mask"] = d.occluder_mask[local]
        flipped = np.zeros(len(local), bool)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, 1, step])
            flipped = (rng.random(b) < self.augment.flip_prob)[rows]
            if self.augment.jitter > 0:
                j = self.augment.jitter
                out["image"] = color_jitter(out["image"], rng, j, j, j, rows=(rows, b))
            if self.augment.hue > 0 or self.augment.grayscale_prob > 0:
                out["image"] = recolor(out["image"], np.random.default_rng([self.seed, 2, step]),
                                       self.augment.hue, self.augment.grayscale_prob,
                                       rows=(rows, b))
        out = flip_batch(out, flipped)
        if self.image_dtype == "float32":
            out["image"] = normalize_images(out["image"])
        return out

    def iterate(self, start_step: int = 0, num_steps: int | None = None):
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch(step)
            step += 1

    def __iter__(self):
        return self.iterate(0)


def shard(batch: dict, mesh) -> tuple[dict, int]:
    """Pads a host batch to a multiple of the mesh size and shards it over ``data``.

    Returns ``(global_batch, n)`` where ``n`` is the number of real rows (cut
    results back with ``[:n]``). Uses :mod:`nvsm_jax.parallel`.
    """
    padded, n = parallel.pad_to_multiple(batch, mesh.devices.size)
    return parallel.shard_batch(padded, mesh), n
