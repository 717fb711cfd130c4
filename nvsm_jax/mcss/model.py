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
(:func:`nvsm_jax.mcss.train.encode`).

The embedding is an MLP head on the pooled features, L2-normalised. The pose
regressor is an MLP on the embedding (``regress_from="embedding"``, the paper's
design) or on the pooled features (``"features"``).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

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

    def features(self, x, train: bool = False):
        """The encoder map at stride ``tap``: [B, H / tap, W / tap, C]."""
        return self.encoder(x, train)[TAP_INDEX[self.tap]]

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

    def embed(self, x, train: bool = False):
        """-> (emb [B, D] unit, pooled features [B, C'])."""
        return self.embed_features(self.features(x, train))

    def regress(self, emb, pooled):
        h = emb * self.embed_scale if self.regress_from == "embedding" else pooled
        for layer in self.regressor:
            h = nn.relu(layer(h))
        return self.reg_out(h).reshape(h.shape[0], self.num_joints, 3)

    def __call__(self, x, train: bool = False, from_features: bool = False):
        """x: images, or with ``from_features`` the encoder maps of :meth:`features`
        (a frozen encoder's maps computed once; same result)."""
        emb, pooled = self.embed_features(x) if from_features else self.embed(x, train)
        return emb, self.regress(emb, pooled)


_FIELDS = ("stage_sizes", "widths", "stem_width", "norm", "depthwise", "tap", "pool",
           "reduce_dim", "adapter_layers", "embed_dim", "head_hidden", "regressor_hidden", "regress_from",
           "embed_scale")


def make_model(cfg) -> MCSSNet:
    """From a config dict / ConfigDict with the fields of :class:`MCSSNet`
    (``encoder`` names ``encoder_kind``; ``pretrained`` / ``frozen_stages`` are read
    by the trainer)."""
    kw = {k: (tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k])
          for k in _FIELDS if k in cfg}
    if "encoder" in cfg:
        kw["encoder_kind"] = cfg["encoder"]
    return MCSSNet(**kw)
