"""Learned parts: the dense feature backbones (ResNet, EfficientNet-Lite) and their weights."""

from nvsm_jax.models.backbone import (FeatureNet, PRESETS, ResNetEncoder, make_encoder,
                                      make_feature_net, preprocess)
from nvsm_jax.models.efficientnet import EfficientNetLite
from nvsm_jax.models.weights import WeightsError, imagenet_logits, load_imagenet

__all__ = ["FeatureNet", "ResNetEncoder", "EfficientNetLite", "PRESETS", "make_encoder",
           "make_feature_net", "preprocess", "imagenet_logits", "load_imagenet", "WeightsError"]
