"""EfficientNet-Lite (lite0 ... lite4) in Flax, tapped at strides 4, 8, 16 and 32.

Written from the EfficientNet-Lite builder's facts (Tan & Le 2019, the ``lite``
variants): a 3x3/2 stem to 32 channels; seven stages of MBConv blocks, given as
(repeats, kernel, stride, expansion, out channels)::

    (1,3,1,1,16) (2,3,2,6,24) (2,5,2,6,40) (3,3,2,6,80) (3,5,1,6,112) (4,5,2,6,192) (1,3,1,6,320)

a 1x1 head to 1280 channels, global average pooling, dropout and a 1000-way
classifier. The Lite variants use ReLU6 everywhere, no squeeze-excitation, and
do not scale the stem, the head, or the repeats of the first and last stage;
batch norm epsilon 1e-3; TensorFlow's "SAME" padding (asymmetric for stride
2: the extra row/column goes bottom/right); a residual add when the stride is
1 and the block keeps its channel count. Inputs are RGB as ``(x - 127) / 128``.

Parameter names mirror the reference checkpoint's keys (``_conv_stem`` ->
``conv_stem``, ``_blocks.N._expand_conv`` -> ``blocks_N/expand_conv`` ...), so
:mod:`nvsm_jax.models.weights` maps the ImageNet weights one to one.

Public API:

* :class:`EfficientNetLite` ``(x: [B, H, W, 3] float32 as (x - 127) / 128, train)``
  -> ``[f4, f8, f16, f32]`` (strides 4, 8, 16, 32; ``f32`` is the 1280-channel
  head) or, with ``num_classes``, logits ``[B, num_classes]``. ``start_stage`` /
  ``stop_stage`` run a range of its stages only (the input then is the output of
  the stage before; the output the map of the last stage run): a frozen prefix's
  maps can be computed once and the rest trained from them.
* :data:`NUM_STAGES` (9: 0 the stem, 1..7 the MBConv stages, 8 the head) and
  :func:`stage_of_param`, the stage of a parameter.
* :func:`block_specs` the per-block (kernel, stride, expansion, in, out, stage)
  of a variant; :data:`VARIANTS`.
* :func:`depthwise_conv` a depthwise convolution in either form (below).

Depthwise convolutions: XLA:CPU runs a grouped convolution with one group per
channel (``feature_group_count = C``) 20-100x slower than a dense one of the
same FLOPs; written as ``k * k`` shifted multiply-adds it is several times
faster on CPU, forward and backward (``python -m benchmarks.train``). The
shifted form has a hand-written backward (:func:`depthwise_shift`): one dilated
pad of the cotangent and a tap sum for dx, one sum per tap for dw. The two
forms compute the same function from the same ``[k, k, 1, C]`` kernel (tested
against ``lax.conv_general_dilated``); ``depthwise="auto"`` picks the shifted
form on CPU and the grouped convolution elsewhere. The 1x1 convolutions are one
matmul each (:class:`PointwiseConv`), not convolutions: XLA:CPU computed their
weight gradient as a window convolution over transposed copies of both maps.
Where the batch norm's statistics are fixed (``frozen_batch``, or ``batch``
outside training) its per-channel affine is folded into the kernel before it
(:func:`_conv_norm`): the same function to float rounding, one pass over the
activations fewer in the forward and in the backward.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["EfficientNetLite", "VARIANTS", "BASE_STAGES", "BlockSpec", "block_specs",
           "depthwise_conv", "depthwise_shift", "pointwise", "PointwiseConv", "same_padding",
           "stage_of_param", "NUM_STAGES", "HEAD_STAGE", "TAP_STAGES"]

# (repeats, kernel, stride, expansion, out channels) of EfficientNet-Lite0.
BASE_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
               (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))

# name -> (width coefficient, depth coefficient, ImageNet resolution, dropout)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}

STEM_WIDTH = 32
HEAD_WIDTH = 1280
BN_EPS = 1e-3
# The stage whose last block ends at each tap's stride (stage numbers 1..7); the
# stride-32 tap is the head's output (stage 8).
TAP_STAGES = {4: 2, 8: 3, 16: 5}
# Stages of the trunk: 0 the stem, 1..7 the MBConv stages, 8 the 1x1 head.
NUM_STAGES = 9
HEAD_STAGE = NUM_STAGES - 1


class BlockSpec(NamedTuple):
    kernel: int
    stride: int
    expansion: int
    cin: int
    cout: int
    stage: int          # 1..7


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channel count scaled by ``width``, rounded to a multiple of 8 (never down > 10 %)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def block_specs(variant: str = "efficientnet_lite0") -> list[BlockSpec]:
    """Every MBConv block of ``variant`` in order (the reference's ``_blocks.N``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; "
                         f"choose from {sorted(VARIANTS)}")
    width, depth, _, _ = VARIANTS[variant]
    specs = []
    cin = STEM_WIDTH                                   # the stem is not scaled
    last = len(BASE_STAGES) - 1
    for s, (repeats, kernel, stride, expansion, cout) in enumerate(BASE_STAGES):
        cout = round_filters(cout, width)
        if s not in (0, last):                         # first/last stage repeats fixed
            repeats = int(math.ceil(depth * repeats))
        for r in range(repeats):
            specs.append(BlockSpec(kernel, stride if r == 0 else 1, expansion, cin, cout, s + 1))
            cin = cout
    return specs


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis: (before, after), the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x, kernel: int, stride: int):
    ph = same_padding(x.shape[1], kernel, stride)
    pw = same_padding(x.shape[2], kernel, stride)
    return jnp.pad(x, ((0, 0), ph, pw, (0, 0))), ph, pw


def depthwise_conv(x, kernel, stride: int, form: str = "shift"):
    """Depthwise convolution with TF "SAME" padding.

    x: [B, H, W, C]; kernel: [k, k, 1, C] -> [B, ceil(H/s), ceil(W/s), C].
    form: ``"shift"`` (k*k strided slices times per-channel weights, summed, with
    the hand-written backward of :func:`depthwise_shift`) or ``"conv"``
    (``lax.conv_general_dilated`` with ``feature_group_count=C``).
    """
    if form == "conv":
        c = x.shape[-1]
        xp, _, _ = _pad_same(x, kernel.shape[0], stride)
        return jax.lax.conv_general_dilated(
            xp, kernel.astype(x.dtype), (stride, stride), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    if form != "shift":
        raise ValueError(f"depthwise form must be 'shift' or 'conv', got {form!r}")
    return depthwise_shift(x, kernel[:, :, 0, :].astype(x.dtype), stride)


def _tap_sum(xp, w, out_hw, stride: int):
    """sum_ij xp[:, i + s*oy, j + s*ox] * w[i, j]: xp [B, Hp, Wp, C], w [k, k, C]
    -> [B, OH, OW, C]. The k*k strided slices fuse into one loop with XLA."""
    k = w.shape[0]
    b, c = xp.shape[0], xp.shape[-1]
    oh, ow = out_hw
    out = None
    for i in range(k):
        for j in range(k):
            tap = jax.lax.slice(xp, (0, i, j, 0),
                                (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                                (1, stride, stride, 1))
            term = tap * w[i, j]
            out = term if out is None else out + term
    return out


def _shift_forward(x, w, stride):
    k = w.shape[0]
    xp, _, _ = _pad_same(x, k, stride)
    out_hw = (-(-x.shape[1] // stride), -(-x.shape[2] // stride))
    return _tap_sum(xp, w, out_hw, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_shift(x, w, stride: int):
    """The shifted form with TF "SAME" padding: x [B, H, W, C], w [k, k, C]
    -> [B, ceil(H/s), ceil(W/s), C].

    Its backward (a custom VJP; autodiff of the slices pads every tap's cotangent
    to the input's size, k*k full-size pads):

    * dx is the transposed convolution of the cotangent g: g dilated by the stride
      and padded once (``lax.pad`` with interior padding), then k*k slices times
      the flipped weights, summed (:func:`_tap_sum` again, stride 1);
    * dw[i, j] = sum over batch and space of tap_ij(x) * g, one tap per loop
      iteration, its product summed as a [B*OH*OW, C] matrix over its rows.
    """
    return _shift_forward(x, w, stride)


def _depthwise_shift_fwd(x, w, stride):
    return _shift_forward(x, w, stride), (x, w)


def _depthwise_shift_bwd(stride, residuals, g):
    x, w = residuals
    k = w.shape[0]
    b, h, wd, c = x.shape
    oh, ow = g.shape[1:3]
    (ph, _), (pw, _) = same_padding(h, k, stride), same_padding(wd, k, stride)
    # dx[y] = sum_i gd[y + ph - i] w[i], gd = g dilated by the stride (zero between
    # and outside): pad gd by k - 1 - ph before and up to h + k - 1 after, then
    # correlate with the flipped kernel.
    zero = jnp.zeros((), g.dtype)
    gp = jax.lax.pad(g, zero, ((0, 0, 0),
                               (k - 1 - ph, h + ph - (oh - 1) * stride - 1, stride - 1),
                               (k - 1 - pw, wd + pw - (ow - 1) * stride - 1, stride - 1),
                               (0, 0, 0)))
    dx = _tap_sum(gp, w[::-1, ::-1], (h, wd), 1)
    # dw: one tap per iteration of a loop (k*k unrolled taps compile 3x slower, run
    # no faster); each tap's product with g reduced over its rows in one sum (XLA:CPU
    # hands that reduction to its vectorised library kernel; WORKSPACE.md).
    xp, _, _ = _pad_same(x, k, stride)
    win_h, win_w = (oh - 1) * stride + 1, (ow - 1) * stride + 1

    def tap_grad(t):
        tap = jax.lax.dynamic_slice(xp, (0, t // k, t % k, 0), (b, win_h, win_w, c))
        return jnp.sum((tap[:, ::stride, ::stride] * g).reshape(-1, c), axis=0)

    dw = jax.lax.map(tap_grad, jnp.arange(k * k)).reshape(k, k, c)
    return dx, dw


depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


@jax.custom_vjp
def relu6(x):
    """min(max(x, 0), 6), elementwise, with ``jax.nn.relu6``'s gradient (g where
    0 < x < 6, else 0) taken from its output: 0 < relu6(x) < 6 exactly where
    0 < x < 6. The output is what the next layer keeps for its own backward, so
    the pre-activation need not be kept too (a 128 px Lite0 step 13 % faster,
    WORKSPACE.md)."""
    return jax.nn.relu6(x)


def _relu6_fwd(x):
    y = jax.nn.relu6(x)
    return y, y


def _relu6_bwd(y, g):
    return (jnp.where((y > 0) & (y < 6), g, jnp.zeros((), g.dtype)),)


relu6.defvjp(_relu6_fwd, _relu6_bwd)


def resolve_depthwise(form: str) -> str:
    """``"auto"`` -> ``"shift"`` on CPU, ``"conv"`` on GPU/TPU (measured, module docstring)."""
    if form == "auto":
        return "shift" if jax.default_backend() == "cpu" else "conv"
    if form not in ("shift", "conv"):
        raise ValueError(f"depthwise must be 'auto', 'shift' or 'conv', got {form!r}")
    return form


class DepthwiseConv(nn.Module):
    """x: [B, H, W, C] -> [B, ceil(H/s), ceil(W/s), C]; ``scale`` [C] multiplies the
    kernel (a folded batch norm, :func:`_conv_norm`)."""

    kernel_size: int
    stride: int = 1
    form: str = "auto"

    @nn.compact
    def __call__(self, x, scale=None):
        c = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                            (self.kernel_size, self.kernel_size, 1, c))
        if scale is not None:
            kernel = kernel * scale
        return depthwise_conv(x, kernel, self.stride, resolve_depthwise(self.form))


class _FrozenBatchNorm(nn.Module):
    """``nn.BatchNorm``'s variables (params ``scale``, ``bias``; ``batch_stats``
    ``mean``, ``var``; same names, shapes and initial values) read as the
    per-channel affine of its stored statistics: ``() -> (a, c)``, ``[C]`` each,
    with ``norm(y) = y * a + c``."""

    channels: int

    @nn.compact
    def __call__(self):
        shape = (self.channels,)
        scale = self.param("scale", nn.initializers.ones, shape)
        bias = self.param("bias", nn.initializers.zeros, shape)
        mean = self.variable("batch_stats", "mean", jnp.zeros, shape).value
        var = self.variable("batch_stats", "var", jnp.ones, shape).value
        a = scale * jax.lax.rsqrt(var + BN_EPS)
        return a, bias - mean * a


class _Norm(nn.Module):
    """BatchNorm with the stored statistics (``frozen_batch``), batch statistics in
    training (``batch``), or GroupNorm (``group``; from scratch only).

    ``(x [..., C], train) -> normalised x``. Where the statistics are fixed
    (``frozen_batch``, or ``batch`` outside training) ``(None, train, channels)``
    returns the affine ``(a, c)`` instead, for :func:`_conv_norm` to fold into
    the layer before."""

    kind: str = "frozen_batch"

    def fixed(self, train: bool) -> bool:
        """Whether this norm is a fixed per-channel affine (foldable)."""
        if self.kind not in ("batch", "frozen_batch", "group"):
            raise ValueError(f"unknown norm {self.kind!r}: expected 'frozen_batch', 'batch' "
                             "or 'group'")
        return self.kind == "frozen_batch" or (self.kind == "batch" and not train)

    @nn.compact
    def __call__(self, x, train: bool, channels: int | None = None):
        if self.fixed(train):
            a, c = _FrozenBatchNorm(channels or x.shape[-1], name="BatchNorm_0")()
            return (a, c) if x is None else x * a + c
        if x is None:
            raise ValueError(f"a {self.kind!r} norm in training has no fixed affine to fold")
        if self.kind == "group":
            return nn.GroupNorm(num_groups=int(np.gcd(8, x.shape[-1])), epsilon=BN_EPS,
                                name="GroupNorm_0")(x)
        return nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=BN_EPS,
                            name="BatchNorm_0")(x)


def _conv_norm(conv: nn.Module, norm: _Norm, x, train: bool, channels: int):
    """``norm(conv(x))``; a fixed norm's scale is folded into the kernel,
    ``conv(x, scale=a) + c``: one pass less forward and backward, and the
    scale's gradient becomes a reduction over the kernel instead of over every
    pixel (``conv`` takes a ``scale`` [channels] for its output channels)."""
    if norm.fixed(train):
        a, c = norm(None, train, channels)
        return conv(x, scale=a) + c
    return norm(conv(x), train)


@jax.custom_vjp
def pointwise(x, kernel):
    """A 1x1 convolution as a matmul: x [..., Cin], kernel [Cin, Cout] -> [..., Cout].

    Its VJP is autodiff's, written out: dx = g kernel^T and dkernel = x^T g over
    the flattened rows. Autodiff produced the same numbers (bitwise) but had
    XLA:CPU lay the cotangent out transposed, a full copy of g before each
    weight gradient; written this way a whole MBConv block's gradient ran
    1.0-1.7x faster (measured, WORKSPACE.md)."""
    return jnp.dot(x, kernel)


def _pointwise_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, g):
    x, kernel = residuals
    rows = x.size // x.shape[-1]
    dk = jnp.dot(jnp.transpose(x.reshape(rows, x.shape[-1])), g.reshape(rows, g.shape[-1]))
    return jnp.dot(g, jnp.transpose(kernel)), dk


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


class PointwiseConv(nn.Module):
    """A 1x1 convolution without bias as one matmul over the channels.

    x: [B, H, W, Cin] -> [B, H, W, features]; the kernel keeps ``nn.Conv``'s
    ``[1, 1, Cin, features]`` shape and name. As a dot, its weight gradient is
    ``x^T g`` over the B*H*W rows; as a convolution, XLA:CPU computes that as a
    convolution with an H x W window over transposed copies of both maps.
    ``scale`` [features] multiplies the kernel's output channels.
    """

    features: int

    @nn.compact
    def __call__(self, x, scale=None):
        kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                            (1, 1, x.shape[-1], self.features))[0, 0]
        if scale is not None:
            kernel = kernel * scale
        return pointwise(x, kernel.astype(x.dtype))


class _StemConv(nn.Module):
    """``nn.Conv(features, (3, 3), strides=2, padding="VALID", use_bias=False)``
    (same parameter) with an optional ``scale`` [features] on the kernel;
    x: [B, H, W, Cin] already padded."""

    features: int

    @nn.compact
    def __call__(self, x, scale=None):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features))
        if scale is not None:
            kernel = kernel * scale
        return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (2, 2), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class MBConv(nn.Module):
    spec: BlockSpec
    norm: str = "frozen_batch"
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        s = self.spec
        y = x
        mid = s.cin * s.expansion
        if s.expansion != 1:
            y = _conv_norm(PointwiseConv(mid, name="expand_conv"), _Norm(self.norm, name="bn0"),
                           y, train, mid)
            y = relu6(y)
        y = _conv_norm(DepthwiseConv(s.kernel, s.stride, self.depthwise, name="depthwise_conv"),
                       _Norm(self.norm, name="bn1"), y, train, mid)
        y = relu6(y)
        y = _conv_norm(PointwiseConv(s.cout, name="project_conv"), _Norm(self.norm, name="bn2"),
                       y, train, s.cout)
        if s.stride == 1 and s.cin == s.cout:
            y = y + x
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk (module docstring).

    x: [B, H, W, 3] float32 normalised as ``(rgb - 127) / 128``; or, with
    ``input_mean`` / ``input_std``, as ``(rgb / 255 - mean) / std`` (mapped back to
    the Lite normalisation exactly, so callers keep one preprocessing).
    Returns ``[f4, f8, f16, f32]`` (``[B, ceil(H/s), ceil(W/s), C_s]``; C = 24, 40,
    112, 1280 for lite0), or logits ``[B, num_classes]`` when ``num_classes``.

    A range of stages (0 the stem, 1..7 the MBConv stages, 8 the head;
    :func:`stage_of_param`) runs alone:

    * ``start_stage=k`` (1..8): ``x`` is the output of stage ``k - 1`` (for
      ``k = 1`` the stem's, after its ReLU6; no input normalisation then) and the
      trunk runs from stage ``k`` on. The taps of stages before ``k - 1`` were
      never computed: their entries of the returned list are ``None``; the tap
      that stage ``k - 1`` ends (``TAP_STAGES``) is ``x`` itself.
    * ``stop_stage=j`` (``start_stage`` .. 8): returns the output of stage ``j``
      alone, ``[B, h, w, C_j]`` (stage 8: the head's map, never the logits), and
      runs nothing after it.

    Parameter names do not depend on the range (each module is named), so one
    set of variables (initialised by the default call) serves every range; the
    default call computes exactly what it did before these arguments existed,
    and ``stop_stage=j`` then ``start_stage=j + 1`` compose to it (to float
    rounding where the two halves are compiled apart).
    """

    variant: str = "efficientnet_lite0"
    norm: str = "frozen_batch"
    depthwise: str = "auto"
    num_classes: int | None = None
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, start_stage: int = 0,
                 stop_stage: int | None = None):
        if not 0 <= start_stage <= HEAD_STAGE:
            raise ValueError(f"start_stage must be in 0..{HEAD_STAGE}, got {start_stage}")
        if stop_stage is not None and not start_stage <= stop_stage <= HEAD_STAGE:
            raise ValueError(f"stop_stage must be in start_stage ({start_stage}).."
                             f"{HEAD_STAGE}, got {stop_stage}")
        specs = block_specs(self.variant)
        taps = {}
        if start_stage == 0:
            if self.input_mean is not None:
                rgb = 255.0 * (x * jnp.asarray(self.input_std, x.dtype)
                               + jnp.asarray(self.input_mean, x.dtype))
                x = (rgb - 127.0) / 128.0
            xp, _, _ = _pad_same(x, 3, 2)
            x = _conv_norm(_StemConv(STEM_WIDTH, name="conv_stem"), _Norm(self.norm, name="bn0"),
                           xp, train, STEM_WIDTH)
            x = relu6(x)
            if stop_stage == 0:
                return x
        else:                       # x: the output of stage start_stage - 1
            for stride, stage in TAP_STAGES.items():
                if stage == start_stage - 1:
                    taps[stride] = x
        for n, spec in enumerate(specs):
            if spec.stage < start_stage:
                continue
            x = MBConv(spec, self.norm, self.depthwise, name=f"blocks_{n}")(x, train)
            last_of_stage = n + 1 == len(specs) or specs[n + 1].stage != spec.stage
            if last_of_stage:
                if spec.stage == stop_stage:
                    return x
                for stride, stage in TAP_STAGES.items():
                    if stage == spec.stage:
                        taps[stride] = x
        x = _conv_norm(PointwiseConv(HEAD_WIDTH, name="conv_head"),   # not scaled in Lite
                       _Norm(self.norm, name="bn1"), x, train, HEAD_WIDTH)
        x = relu6(x)
        if stop_stage is not None:          # stop_stage == HEAD_STAGE
            return x
        if self.num_classes:
            g = jnp.mean(x, axis=(1, 2))
            return nn.Dense(self.num_classes, name="fc")(g)
        return [taps.get(4), taps.get(8), taps.get(16), x]


def stage_of_param(path: tuple[str, ...], variant: str = "efficientnet_lite0") -> int:
    """Trainable-stage number (0 stem, 1..7 MBConv stages, 8 head) of an encoder
    parameter path such as ``("blocks_3", "expand_conv", "kernel")``."""
    top = path[0]
    if top in ("conv_stem", "bn0"):
        return 0
    if top.startswith("blocks_"):
        return block_specs(variant)[int(top.split("_")[1])].stage
    if top in ("conv_head", "bn1", "fc"):
        return 8
    raise KeyError(f"not an EfficientNet-Lite parameter path: {'/'.join(path)}")
