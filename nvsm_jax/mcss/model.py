"""MCSS network: shared encoder -> pooled features -> embedding head / pose regressor.

``MCSSNet(x: [B, H, W, 3] float32 ImageNet-normalised, train) -> (emb [B, D] unit
vectors, pose [B, 17, 3] root-relative joints in the input camera's frame, metres)``.

Encoder (``encoder``): the shared ``ResNetEncoder`` (``"resnet"``, from scratch) or
EfficientNet-Lite (``"efficientnet_lite0"``, ImageNet weights put in by
:func:`nvsm_jax.mcss.train.init_state`; batch norm on the stored statistics).
Pooled features (``pool``), from the encoder tap of stride ``tap`` (4, 8, 16 or 32):

* ``"mean"``: global average pool ``[B, C]`` (loses where the limbs are);
* ``"flatten"``: a learned 1x1 convolution to ``reduce_dim`` channels + ReLU, then
  the map flattened ``[B, h * w * reduce_dim]`` (keeps the layout).

``adapter_layers`` 3x3 conv-GroupNorm-ReLU layers (``reduce_dim`` wide) may sit
between the tap and the pool: the trainable part above a frozen encoder.
:meth:`MCSSNet.features` / ``__call__(maps, from_features=True)`` split the network
at the tap, so a frozen encoder's maps can be computed once
(:func:`nvsm_jax.mcss.train.encode`). An EfficientNet-Lite encoder also splits
between its stages: ``features(x, stop_stage=j)`` is the output of encoder stage
``j`` and ``__call__(maps, from_features=True, start_stage=j + 1)`` runs the rest
(encoder stages ``j + 1`` .. the tap's, then the heads), so the maps of a frozen
prefix are computed once and the later stages trained from them.

The embedding is an MLP head on the pooled features, L2-normalised. The pose
regressor is an MLP on the embedding (``regress_from="embedding"``, the paper's
design) or on the pooled features (``"features"``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from nvsm_jax.models import efficientnet
from nvsm_jax.models.backbone import make_encoder

__all__ = ["MCSSNet", "make_model", "TAP_INDEX"]

TAP_INDEX = {4: 0, 8: 1, 16: 2, 32: 3}


class MCSSNet(nn.Module):
    encoder_kind: str = "resnet"        # "resnet" | "efficientnet_lite0" ...
    stage_sizes: Sequence[int] = (1, 1, 1, 1)
    widths: Sequence[int] = (32, 64, 128, 256)
    stem_width: int = 32
    norm: str = "group"                 # ResNet: "group"; Lite: "frozen_batch" (see DESIGN.md)
    depthwise: str = "auto"
    tap: int = 32
    pool: str = "mean"                  # "mean" | "flatten"
    reduce_dim: int = 64
    adapter_layers: int = 0             # 3x3 conv-GroupNorm-ReLU layers (reduce_dim wide) on the tap
    embed_dim: int = 64
    head_hidden: int = 256
    regressor_hidden: Sequence[int] = (256, 256)
    num_joints: int = 17
    regress_from: str = "embedding"
    embed_scale: float = 1.0   # the regressor sees ``embed_scale * emb``

    def setup(self):
        if self.tap not in TAP_INDEX:
            raise ValueError(f"tap must be one of {sorted(TAP_INDEX)}, got {self.tap}")
        if self.pool not in ("mean", "flatten"):
            raise ValueError(f"pool must be 'mean' or 'flatten', got {self.pool!r}")
        if self.regress_from not in ("embedding", "features"):
            raise ValueError(f"regress_from must be 'embedding' or 'features', "
                             f"got {self.regress_from!r}")
        self.encoder = make_encoder(self.encoder_kind, stage_sizes=tuple(self.stage_sizes),
                                    widths=tuple(self.widths), stem_width=self.stem_width,
                                    norm=self.norm, depthwise=self.depthwise, name=None)
        if self.pool == "flatten":
            self.reduce = nn.Conv(self.reduce_dim, (1, 1), name="reduce")
        self.adapter = [nn.Conv(self.reduce_dim, (3, 3), name=f"adapter_{i}")
                        for i in range(self.adapter_layers)]
        self.adapter_norm = [nn.GroupNorm(num_groups=int(np.gcd(8, self.reduce_dim)),
                                          name=f"adapter_norm_{i}")
                             for i in range(self.adapter_layers)]
        self.head = [nn.Dense(self.head_hidden, name="head_0"),
                     nn.Dense(self.embed_dim, name="head_1")]
        self.regressor = [nn.Dense(h, name=f"reg_{i}") for i, h in enumerate(self.regressor_hidden)]
        self.reg_out = nn.Dense(self.num_joints * 3, name="reg_out",
                                kernel_init=nn.initializers.normal(1e-3))

    @property
    def is_lite(self) -> bool:
        return self.encoder_kind in efficientnet.VARIANTS

    @property
    def tap_stage(self) -> int:
        """The EfficientNet-Lite stage whose output is the tap map (8, the head, for 32)."""
        return efficientnet.TAP_STAGES.get(self.tap, efficientnet.HEAD_STAGE)

    def _check_split(self, what: str, stage: int):
        if not self.is_lite:
            raise ValueError(f"{what} splits an EfficientNet-Lite encoder between its stages; "
                             f"the {self.encoder_kind!r} encoder splits at the tap only")
        if not 0 <= stage <= self.tap_stage:
            raise ValueError(f"{what}={stage}: the tap (stride {self.tap}) is the output of "
                             f"stage {self.tap_stage}, so it must be in 0..{self.tap_stage}")

    def features(self, x, train: bool = False, stop_stage: int | None = None):
        """The encoder map at stride ``tap``: [B, H / tap, W / tap, C]; with
        ``stop_stage`` (EfficientNet-Lite, ``0 .. tap stage``) the output of that
        encoder stage instead (the maps cached below a partly frozen encoder)."""
        if stop_stage is None:
            return self.encoder(x, train)[TAP_INDEX[self.tap]]
        self._check_split("stop_stage", stop_stage)
        return self.encoder(x, train, stop_stage=stop_stage)

    def tap_map(self, x, train: bool = False, from_features: bool = False,
                start_stage: int | None = None):
        """The tap map from images; with ``from_features``, ``x`` is the tap map
        itself (returned as it is) or, with ``start_stage=k`` too (Lite, ``1 .. tap
        stage``), the output of encoder stage ``k - 1`` (:meth:`features` with
        ``stop_stage=k - 1``), from which encoder stages ``k`` .. the tap's run."""
        if not from_features:
            if start_stage is not None:
                raise ValueError("start_stage needs from_features=True (x: the maps of stage "
                                 "start_stage - 1)")
            return self.features(x, train)
        if start_stage is None:
            return x
        if start_stage == 0:
            raise ValueError("start_stage=0 reads images: call with from_features=False")
        self._check_split("start_stage", start_stage)
        return self.encoder(x, train, start_stage=start_stage, stop_stage=self.tap_stage)

    def embed_features(self, feats):
        """Encoder map -> (emb [B, D] unit, pooled features [B, C'])."""
        for i in range(self.adapter_layers):
            feats = nn.relu(self.adapter_norm[i](self.adapter[i](feats)))
        if self.pool == "mean":
            pooled = jnp.mean(feats, axis=(1, 2))
        else:
            r = nn.relu(self.reduce(feats))
            pooled = r.reshape(r.shape[0], -1)
        h = nn.relu(self.head[0](pooled))
        e = self.head[1](h)
        e = e / jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True) + 1e-12)
        return e, pooled

    def embed(self, x, train: bool = False, from_features: bool = False,
              start_stage: int | None = None):
        """-> (emb [B, D] unit, pooled features [B, C']); ``x`` as in :meth:`tap_map`."""
        return self.embed_features(self.tap_map(x, train, from_features, start_stage))

    def regress(self, emb, pooled):
        h = emb * self.embed_scale if self.regress_from == "embedding" else pooled
        for layer in self.regressor:
            h = nn.relu(layer(h))
        return self.reg_out(h).reshape(h.shape[0], self.num_joints, 3)

    def __call__(self, x, train: bool = False, from_features: bool = False,
                 start_stage: int | None = None):
        """x: images, or with ``from_features`` the encoder maps of :meth:`features`
        (a frozen encoder's maps computed once; same result): the tap maps, or with
        ``start_stage=k`` the output of encoder stage ``k - 1`` (:meth:`tap_map`)."""
        emb, pooled = self.embed(x, train, from_features, start_stage)
        return emb, self.regress(emb, pooled)


_FIELDS = ("stage_sizes", "widths", "stem_width", "norm", "depthwise", "tap", "pool",
           "reduce_dim", "adapter_layers", "embed_dim", "head_hidden", "regressor_hidden", "regress_from",
           "embed_scale")


def make_model(cfg) -> MCSSNet:
    """From the ``model`` block: an :class:`nvsm_jax.mcss.settings.MCSSModelConfig`, or a
    config dict / ConfigDict with the fields of :class:`MCSSNet` (``encoder`` names
    ``encoder_kind``; ``pretrained`` / ``frozen_stages`` are read by the trainer)."""
    if dataclasses.is_dataclass(cfg):
        cfg = cfg.to_dict()
    kw = {k: (tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k])
          for k in _FIELDS if k in cfg}
    if "encoder" in cfg:
        kw["encoder_kind"] = cfg["encoder"]
    return MCSSNet(**kw)
