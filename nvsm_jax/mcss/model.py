"""MCSS network: shared ResNetEncoder -> embedding head -> pose regressor.

``MCSSNet(x: [B, H, W, 3] float32, train) -> (emb [B, D] unit vectors,
pose [B, 17, 3] root-relative joints in the input camera's frame, metres)``.

The embedding is the global average pool of the encoder's last (stride 32)
map, then an MLP head, L2-normalised. The pose regressor is an MLP on the
embedding (``regress_from="embedding"``, the paper's design) or on the pooled
features before the head (``"features"``).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from nvsm_jax.models.backbone import ResNetEncoder

__all__ = ["MCSSNet", "make_model"]


class MCSSNet(nn.Module):
    stage_sizes: Sequence[int] = (1, 1, 1, 1)
    widths: Sequence[int] = (32, 64, 128, 256)
    stem_width: int = 32
    norm: str = "group"
    embed_dim: int = 64
    head_hidden: int = 256
    regressor_hidden: Sequence[int] = (256, 256)
    num_joints: int = 17
    regress_from: str = "embedding"
    embed_scale: float = 1.0   # the regressor sees ``embed_scale * emb``

    def setup(self):
        self.encoder = ResNetEncoder(stage_sizes=tuple(self.stage_sizes), widths=tuple(self.widths),
                                     stem_width=self.stem_width, norm=self.norm)
        self.head = [nn.Dense(self.head_hidden, name="head_0"),
                     nn.Dense(self.embed_dim, name="head_1")]
        self.regressor = [nn.Dense(h, name=f"reg_{i}") for i, h in enumerate(self.regressor_hidden)]
        self.reg_out = nn.Dense(self.num_joints * 3, name="reg_out",
                                kernel_init=nn.initializers.normal(1e-3))

    def embed(self, x, train: bool = False):
        """-> (emb [B, D] unit, pooled features [B, C])."""
        feats = self.encoder(x, train)[-1]
        pooled = jnp.mean(feats, axis=(1, 2))
        h = nn.relu(self.head[0](pooled))
        e = self.head[1](h)
        e = e / jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True) + 1e-12)
        return e, pooled

    def regress(self, emb, pooled):
        h = emb * self.embed_scale if self.regress_from == "embedding" else pooled
        for layer in self.regressor:
            h = nn.relu(layer(h))
        return self.reg_out(h).reshape(h.shape[0], self.num_joints, 3)

    def __call__(self, x, train: bool = False):
        emb, pooled = self.embed(x, train)
        return emb, self.regress(emb, pooled)


def make_model(cfg) -> MCSSNet:
    """From a config dict / ConfigDict with the fields of :class:`MCSSNet`."""
    keys = ("stage_sizes", "widths", "stem_width", "norm", "embed_dim", "head_hidden",
            "regressor_hidden", "regress_from", "embed_scale")
    return MCSSNet(**{k: (tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k])
                      for k in keys if k in cfg})
