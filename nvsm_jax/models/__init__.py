"""Learned parts: the dense feature backbone and weight conversion."""

from nvsm_jax.models.backbone import (FeatureNet, PRESETS, ResNetEncoder, make_feature_net,
                                      preprocess)

__all__ = ["FeatureNet", "ResNetEncoder", "PRESETS", "make_feature_net", "preprocess"]
