"""Pose-classification baseline ("Res50-Gene" in the NVSM / NeMo tables).

A ResNet encoder (the shared :class:`nvsm_jax.models.backbone.ResNetEncoder`, the
same preset as the NeMo config) + global average pooling + three linear heads
that classify azimuth, elevation and theta into bins; cross-entropy, optionally
with label smoothing onto the two neighbouring bins; trained on labelled images
only (a :class:`nvsm_jax.data.PoseSet`); prediction = the argmax bins' centres
with distance = ``config.distance`` (5, NeMo's). The encoder starts from random
weights, or from the self-supervised pre-training the NeMo rows use
(``train_classifier(..., pretrained=...)``, :mod:`nvsm_jax.baselines.pretrain`).

Bins (:class:`BinSpec`, all in radians):

* **azimuth** (periodic, default 36 bins = 10 deg): centres ``2 pi k / n``; bin
  ``k`` covers ``[c_k - w/2, c_k + w/2)`` so 359 deg falls in bin 0 (wrap-around);
* **elevation** (interval, default 18 bins over ``[-pi/2, pi/2]``): centres
  ``lo + (k + 1/2) w``, angles outside the interval clip to the end bins;
* **theta** (periodic, default 36 bins over ``[-pi, pi)``): centres
  ``-pi + k w`` (0 is a centre), wrap-around at +-pi.

Training follows :mod:`nvsm_jax.nemo.train`: one ``Mesh`` with a ``data`` axis, the
batch sharded over it, everything else replicated; a jitted, donated step;
keys ``fold_in(seed, step)`` and batches that are pure functions of ``(seed,
step)`` (:class:`nvsm_jax.data.BatchIterator` with :class:`Augment`, whose
horizontal flip applies the pose flip rule ``a -> 2 pi - a, theta -> -theta``),
so a killed run resumes exactly from its orbax checkpoint; metrics as JSON lines
(``metrics.jsonl``), the config as ``config.json``.

Public API:

* :class:`ClassifierConfig` (frozen dataclass; :func:`classifier_config` gives
  the ``"default"`` / ``"tiny"`` presets);
* :class:`BinSpec`, :func:`bin_specs`, :func:`pose_to_bins`, :func:`bins_to_pose`,
  :func:`smooth_targets`;
* :class:`PoseClassifier` ``(x [B, H, W, 3] float32, train) -> {"azimuth": [B, n_a],
  "elevation": [B, n_e], "theta": [B, n_t]}`` logits;
* :func:`train_classifier` ``(config, train_set, workdir) -> TrainState``;
* :func:`predict_classifier` ``(state_or_model, images [N, H, W, 3] uint8) ->
  poses [N, 4]``; :func:`load_classifier` ``(workdir) -> ClassifierModel``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nvsm_jax import parallel, training
from nvsm_jax.baselines import pretrain
from nvsm_jax.baselines.settings import ClassifierConfig
from nvsm_jax.data import pipeline
from nvsm_jax.models import backbone, weights
from nvsm_jax.settings import ModelConfig, OptimConfig

log = logging.getLogger(__name__)

__all__ = ["ClassifierConfig", "classifier_config", "BinSpec", "bin_specs", "bin_centers",
           "encode_angle", "decode_angle", "pose_to_bins", "bins_to_pose", "smooth_targets",
           "PoseClassifier", "build_classifier", "init_classifier_state", "make_train_step",
           "train_classifier", "ClassifierModel", "load_classifier", "predict_classifier",
           "HEADS"]

HEADS = ("azimuth", "elevation", "theta")


def classifier_config(arg: str = "default") -> ClassifierConfig:
    """``"default"`` (NeMo's ``small`` preset, 2000 steps) or ``"tiny"`` (seconds, tests)."""
    if arg in (None, "", "default"):
        return ClassifierConfig()
    if arg == "tiny":
        return ClassifierConfig(model=ModelConfig(backbone="tiny", pretrained=""), num_steps=4,
                                batch_size=8, log_every=1, checkpoint_every=2,
                                optim=OptimConfig(warmup_steps=1, lr=3e-3, weight_decay=0.0))
    raise ValueError(f"config arg must be 'default' or 'tiny', got {arg!r}")


# --------------------------------------------------------------------------- bins

class BinSpec(NamedTuple):
    """``num`` bins over ``[low, high)``; ``periodic`` heads wrap (centres ``low + k w``),
    interval heads clip (centres ``low + (k + 1/2) w``); ``w = (high - low) / num``."""

    num: int
    low: float
    high: float
    periodic: bool

    @property
    def width(self) -> float:
        return (self.high - self.low) / self.num


def bin_specs(config: ClassifierConfig) -> tuple[BinSpec, BinSpec, BinSpec]:
    """(azimuth, elevation, theta) specs of a config."""
    return (BinSpec(int(config.azimuth_bins), 0.0, 2 * np.pi, True),
            BinSpec(int(config.elevation_bins), float(config.elevation_range[0]),
                    float(config.elevation_range[1]), False),
            BinSpec(int(config.theta_bins), float(config.theta_range[0]),
                    float(config.theta_range[1]), True))


def bin_centers(spec: BinSpec) -> np.ndarray:
    """[num] float64 bin centres (radians)."""
    k = np.arange(spec.num, dtype=np.float64)
    return spec.low + (k if spec.periodic else k + 0.5) * spec.width


def _xnp(x):
    return jnp if isinstance(x, jax.Array) else np


def encode_angle(angle, spec: BinSpec):
    """Angles ``[...]`` (radians) -> bin indices ``[...]`` int32 (numpy or jax)."""
    xnp = _xnp(angle)
    t = (xnp.asarray(angle) - spec.low) / spec.width
    if spec.periodic:
        k = xnp.mod(xnp.floor(t + 0.5), spec.num)
    else:
        k = xnp.clip(xnp.floor(t), 0, spec.num - 1)
    return k.astype(xnp.int32)


def decode_angle(bins, spec: BinSpec):
    """Bin indices ``[...]`` -> bin centres ``[...]`` float32 (numpy or jax)."""
    xnp = _xnp(bins)
    return xnp.asarray(bin_centers(spec).astype(np.float32))[bins]


def pose_to_bins(poses, config: ClassifierConfig):
    """poses ``[..., >=3]`` -> bins ``[..., 3]`` int32 (azimuth, elevation, theta)."""
    xnp = _xnp(poses)
    return xnp.stack([encode_angle(poses[..., i], s) for i, s in enumerate(bin_specs(config))],
                     axis=-1)


def bins_to_pose(bins, config: ClassifierConfig):
    """bins ``[..., 3]`` -> poses ``[..., 4]`` float32 (bin centres, distance = config.distance)."""
    xnp = _xnp(bins)
    angles = [decode_angle(bins[..., i], s) for i, s in enumerate(bin_specs(config))]
    dist = xnp.full(angles[0].shape, config.distance, dtype=xnp.float32)
    return xnp.stack(angles + [dist], axis=-1)


def smooth_targets(bins, spec: BinSpec, smoothing: float = 0.0) -> jax.Array:
    """Soft targets ``[..., num]``: ``1 - smoothing`` on the bin, ``smoothing / 2`` on each
    neighbour (periodic heads wrap; at an interval's end the mass stays on the bin)."""
    bins = jnp.asarray(bins)
    one = jax.nn.one_hot(bins, spec.num)
    if not smoothing:
        return one
    if spec.periodic:
        lo, hi = jnp.mod(bins - 1, spec.num), jnp.mod(bins + 1, spec.num)
    else:
        lo, hi = jnp.maximum(bins - 1, 0), jnp.minimum(bins + 1, spec.num - 1)
    return ((1.0 - smoothing) * one + 0.5 * smoothing * jax.nn.one_hot(lo, spec.num)
            + 0.5 * smoothing * jax.nn.one_hot(hi, spec.num))


# --------------------------------------------------------------------------- model

class PoseClassifier(nn.Module):
    """Encoder (ResNet or EfficientNet-Lite) + global average pool + one linear head per angle.

    x: [B, H, W, 3] float32 (:func:`nvsm_jax.models.backbone.preprocess`; H, W
    multiples of 32) -> dict of logits ``{"azimuth": [B, n_a], "elevation": [B, n_e],
    "theta": [B, n_t]}``. The encoder is named ``encoder`` as in
    :class:`~nvsm_jax.models.backbone.FeatureNet`, so encoder weights transfer.
    """

    num_bins: Sequence[int] = (36, 18, 36)
    stage_sizes: Sequence[int] = (1, 1, 1, 1)
    widths: Sequence[int] = (16, 32, 64, 128)
    bottleneck: bool = False
    stem_width: int = 16
    norm: str = "group"
    encoder: str = "resnet"
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        feats = backbone.make_encoder(self.encoder, stage_sizes=self.stage_sizes,
                                      widths=self.widths, bottleneck=self.bottleneck,
                                      stem_width=self.stem_width, norm=self.norm,
                                      depthwise=self.depthwise, name="encoder")(x, train)
        g = jnp.mean(feats[-1], axis=(1, 2))
        return {name: nn.Dense(n, name=f"head_{name}")(g)
                for name, n in zip(HEADS, self.num_bins)}


@functools.lru_cache(maxsize=16)
def build_classifier(config: ClassifierConfig) -> PoseClassifier:
    """The :class:`PoseClassifier` of a config (encoder fields of ``backbone.PRESETS``)."""
    m = config.model
    if m.backbone not in backbone.PRESETS:
        raise ValueError(f"unknown backbone preset {m.backbone!r}; "
                         f"choose from {sorted(backbone.PRESETS)}")
    net = backbone.make_feature_net(m.backbone, norm=m.norm, encoder_norm=m.encoder_norm,
                                    depthwise=m.depthwise)
    return PoseClassifier(num_bins=(config.azimuth_bins, config.elevation_bins, config.theta_bins),
                          stage_sizes=net.stage_sizes, widths=net.widths,
                          bottleneck=net.bottleneck, stem_width=net.stem_width,
                          norm=net.encoder_norm or net.norm, encoder=net.encoder,
                          depthwise=net.depthwise)


@functools.lru_cache(maxsize=16)
def _optimizer(config: ClassifierConfig):
    """``(tx, schedule)`` of :func:`nvsm_jax.training.make_optimizer`, cached: the
    same config gets the same ``tx`` object, a static field of the state, so the
    cached train step sees the same state structure and does not compile again."""
    return training.make_optimizer(
        config.optim, config.num_steps,
        frozen=backbone.frozen_encoder_filter(config.model.backbone, config.model.frozen_stages))


def init_classifier_state(config: ClassifierConfig, image_hw, mesh) -> training.TrainState:
    """TrainState (params, Adam, batch_stats if any) replicated on ``mesh``, the
    encoder from ``config.model.pretrained`` (``"imagenet"`` or none).

    image_hw: (H, W) of the training images (only the init trace uses it).
    Through :func:`nvsm_jax.training.create_replicated`, compiled once per config
    (seed aside) and image size, so resumed runs, seeds and tests reuse it.
    """
    model = build_classifier(config)
    init = training.state_initializer(model, _optimizer(config)[0], (1, *image_hw, 3))
    state = training.create_replicated(
        init, jax.random.key(config.seed), mesh,
        cache_key=("classifier", config.replace(seed=0), tuple(image_hw)))
    encoder = weights.pretrained_encoder(model.encoder, config.model.pretrained)
    if encoder is not None:
        state = training.replace_weights(state, *encoder, subtree="encoder")
    return state


def classification_loss(logits: dict, bins, config: ClassifierConfig):
    """Sum over heads of the mean (smoothed) cross-entropy, and per-head accuracies.

    logits: dict of [B, n]; bins: [B, 3] int -> (loss [], {"acc_azimuth": [], ...}).
    """
    total = 0.0
    metrics = {}
    for i, (name, spec) in enumerate(zip(HEADS, bin_specs(config))):
        target = smooth_targets(bins[:, i], spec, config.label_smoothing)
        ce = optax.softmax_cross_entropy(logits[name], target).mean()
        total = total + ce
        metrics[f"ce_{name}"] = ce
        metrics[f"acc_{name}"] = jnp.mean(jnp.argmax(logits[name], -1) == bins[:, i])
    return total, metrics


@functools.lru_cache(maxsize=8)
def make_train_step(config: ClassifierConfig, mesh):
    """The jitted, donated step ``(state, batch, key) -> (state, metrics)``.

    batch: ``{"image": [B, H, W, 3] uint8, "pose": [B, 4]}`` sharded over ``data``.
    Cached on ``(config, mesh)`` so repeated runs (resume, tests) compile once.
    """
    _, schedule = _optimizer(config)
    rep = parallel.replicated(mesh)
    frozen = backbone.frozen_encoder_filter(config.model.backbone, config.model.frozen_stages)

    def step(state: training.TrainState, batch, key):
        del key  # the model is deterministic; kept for the shared step signature
        images = backbone.preprocess(batch["image"])
        bins = pose_to_bins(batch["pose"], config)

        def loss_fn(params):               # no backward through the frozen stages
            logits, new_ms = state.apply_train(params, images, is_frozen=frozen)
            loss, m = classification_loss(logits, bins, config)
            return loss, (m, new_ms)

        (loss, (m, new_ms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads).replace(model_state=new_ms)
        metrics = {"loss": loss, **m, "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state.step - 1)}
        return state, metrics

    return jax.jit(step, donate_argnums=0, out_shardings=(rep, rep))


def _save_config(config: ClassifierConfig, workdir: str) -> None:
    """The run's record; refuses a workdir run with another config (training.save_config)."""
    training.save_config({"kind": "pose_classifier", **config.to_dict()}, workdir)


def train_classifier(config: ClassifierConfig, train_set, workdir, *,
                     num_devices: int | None = None, progress: bool = True,
                     stop_after: int | None = None, pretrained=None) -> training.TrainState:
    """Trains the classifier on a labelled PoseSet into ``workdir`` (resuming if possible).

    train_set: :class:`nvsm_jax.data.PoseSet` (images [N, H, W, 3] uint8, H and W
      multiples of 32; poses [N, 4]).
    num_devices: devices of the ``data`` axis (default all); ``config.batch_size``
      must be a multiple of it.
    stop_after: stop after this many steps *of this call* (simulates a killed run;
      the final checkpoint is then not forced).
    pretrained: :class:`nvsm_jax.baselines.pretrain.Pretrained` (or a FeatureNet params
      tree) whose ``encoder`` starts the run (the heads stay random); a
      checkpoint in ``workdir``, if any, still wins.
    Returns the replicated :class:`nvsm_jax.training.TrainState` (``apply_fn`` =
    the classifier's ``apply``). Writes ``config.json``, ``metrics.jsonl``
    (loss, per-head ce/acc, grad_norm, lr, images_per_s) and ``checkpoints/``.
    """

    if isinstance(config, dict) or hasattr(config, "to_dict") and not isinstance(
            config, ClassifierConfig):
        config = ClassifierConfig.from_dict(config.to_dict() if hasattr(config, "to_dict")
                                            else config)
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    _save_config(config, workdir)
    mesh = parallel.make_mesh(num_devices)
    n_dev = mesh.devices.size
    if config.batch_size % n_dev:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of {n_dev} devices")
    image_hw = train_set.image_size
    log.info("classifier: initialising the model (compiling its initialiser)")
    with training.heartbeat("classifier: initialising the model"):
        state = init_classifier_state(config, image_hw, mesh)
    if pretrained is not None:
        state = pretrain.apply_pretrained(state, pretrained, subtree="encoder")
    ckpt = training.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                                 max_to_keep=config.keep_checkpoints)
    state = ckpt.restore_or(state)
    start = int(state.step)
    train_step = make_train_step(config, mesh)
    augment = pipeline.augment_from_config(config.augment)
    batches = pipeline.BatchIterator(train_set, config.batch_size, seed=config.seed,
                                     augment=augment)
    writer = training.MetricsWriter(workdir)
    end = config.num_steps if stop_after is None else min(config.num_steps, start + stop_after)
    if start < end:
        log.info("classifier: steps %d -> %d on %d device(s), %d images", start, end, n_dev,
                 len(train_set))

    def host_batch(step, rows):     # each process reads only its rows of every batch
        b = batches.batch(step, rows)
        return {"image": b["image"], "pose": b["pose"]}

    state = training.fit(
        state, train_step, host_batch, mesh,
        training.StepRange(start, end, total=config.num_steps), seed=config.seed,
        batch_size=config.batch_size,
        log=training.LoopLog(writer, config.log_every, progress=progress, desc="classifier"),
        ckpt=ckpt)
    ckpt.close()
    return state


class ClassifierModel(NamedTuple):
    """Inference bundle: model (PoseClassifier), variables, config."""

    model: Any
    variables: Any
    config: ClassifierConfig


def load_classifier(workdir, config: ClassifierConfig | None = None) -> ClassifierModel:
    """Restores the latest checkpoint of a classifier workdir (config from ``config.json``)."""
    workdir = os.fspath(workdir)
    if config is None:
        with open(os.path.join(workdir, "config.json")) as f:
            config = ClassifierConfig.from_dict(json.load(f))
    mesh = parallel.make_mesh(1)
    state = init_classifier_state(config, (32, 32), mesh)  # fully convolutional + GAP
    ckpt = training.Checkpointer(os.path.join(workdir, "checkpoints"))
    state = ckpt.restore(state)
    ckpt.close()
    return ClassifierModel(build_classifier(config), state.variables(), config)


@functools.lru_cache(maxsize=8)
def _predict_fn(model: PoseClassifier):
    @jax.jit
    def f(variables, images):
        logits = model.apply(variables, backbone.preprocess(images), train=False)
        return jnp.stack([jnp.argmax(logits[h], -1) for h in HEADS], axis=-1).astype(jnp.int32)
    return f


def predict_classifier(state_or_model, images, batch_size: int = 32, *,
                       config: ClassifierConfig | None = None,
                       num_devices: int | None = None) -> np.ndarray:
    """Poses of images from the argmax bin of each head.

    state_or_model: a :class:`ClassifierModel` (from :func:`load_classifier`), or the
      :class:`~nvsm_jax.training.TrainState` returned by :func:`train_classifier`
      together with ``config`` (needed to rebuild the model and its bins).
    images: [N, H, W, 3] uint8 (H, W multiples of 32).
    batch_size: images per forward pass (rounded up to a multiple of the devices;
      the last batch is padded, so one shape is compiled).
    Returns poses [N, 4] float32 (bin centres; distance = ``config.distance``).
    """
    if isinstance(state_or_model, ClassifierModel):
        model, variables, config = state_or_model
    else:
        if config is None:
            raise ValueError("predict_classifier(state, ...) needs config=ClassifierConfig")
        model, variables = build_classifier(config), state_or_model.variables()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got {images.shape}")
    if len(images) == 0:
        return np.zeros((0, 4), np.float32)
    mesh = parallel.make_mesh(num_devices)
    n_dev = mesh.devices.size
    bs = -(-int(batch_size) // n_dev) * n_dev
    variables = parallel.replicate(jax.device_get(variables), mesh)
    f = _predict_fn(model)
    out = []
    for i in range(0, len(images), bs):
        chunk = images[i:i + bs]
        n = len(chunk)
        if n < bs:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
        out.append(parallel.host_array(f(variables, parallel.shard_batch(chunk, mesh)))[:n])
    return np.asarray(bins_to_pose(np.concatenate(out), config), np.float32)
