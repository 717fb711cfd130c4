"""The baselines' typed configs: the pose classifier's and the self-supervised
pre-training's. Each nests the shared blocks of :mod:`nvsm_jax.settings` (the
backbone, one optimiser built by :func:`nvsm_jax.training.make_optimizer`, the
augmentation). Imports neither jax nor flax (a config file imports it)."""

from __future__ import annotations

import dataclasses

import numpy as np

from nvsm_jax.settings import (Augment, DataclassConfig, ModelConfig, OptimConfig, flatten,
                               unflatten, upgrade_record)

__all__ = ["ClassifierConfig", "PretrainConfig"]


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(DataclassConfig):
    """Everything a classifier run needs (hashable: the jitted step is cached on it).

    Backbone: ``model``, the NeMo config's block (only its encoder fields are used:
    not ``stride`` nor ``feature_dim``); ``model.pretrained="imagenet"`` starts the
    encoder from the packaged ImageNet weights. Bins: counts and the elevation / theta
    ranges (radians). ``label_smoothing``: probability mass moved from the true
    bin to its two neighbours (half each; periodic heads wrap). ``optim``: the shared
    optimiser block (Adam, torch-style L2, warm-up then cosine). ``augment``: the
    shared augmentation block.
    """

    model: ModelConfig = ModelConfig(backbone="small", pretrained="")
    azimuth_bins: int = 36
    elevation_bins: int = 18
    theta_bins: int = 36
    elevation_range: tuple[float, float] = (-np.pi / 2, np.pi / 2)
    theta_range: tuple[float, float] = (-np.pi, np.pi)
    label_smoothing: float = 0.0
    distance: float = 5.0
    seed: int = 0
    num_steps: int = 2000
    batch_size: int = 16
    optim: OptimConfig = OptimConfig()
    augment: Augment | None = Augment()     # None: no augmentation
    log_every: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 2

    @classmethod
    def from_dict(cls, d) -> "ClassifierConfig":
        """Leniently, from a mapping or a run's record (an earlier version's flat
        backbone, optimiser and augmentation keys moved into their blocks)."""
        d = unflatten(upgrade_record(flatten(dict(d)), classifier=True))
        for k in ("elevation_range", "theta_range"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return super().from_dict(d)


@dataclasses.dataclass(frozen=True)
class PretrainConfig(DataclassConfig):
    """Dense contrastive pre-training settings (hashable: the jitted step is cached on it).

    Views: ``max_shift_cells`` (translation range in feature cells), ``flip_prob``,
    ``jitter`` (colour jitter strength), ``noise_std`` (uint8 units).
    Loss: ``temperature``, ``cells_per_image`` (sampled positives per image),
    ``neighbor_radius`` (same-image cells within it are not negatives; 0 = off),
    ``global_weight``. ``optim``: the shared optimiser block (Adam, torch-style L2,
    warm-up then cosine).
    """

    seed: int = 0
    num_steps: int = 2000
    batch_size: int = 32
    optim: OptimConfig = OptimConfig()
    temperature: float = 0.15
    cells_per_image: int = 64
    neighbor_radius: float = 1.0
    global_weight: float = 0.25
    max_shift_cells: int = 2
    flip_prob: float = 0.5
    jitter: float = 0.4
    noise_std: float = 6.0
    log_every: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
