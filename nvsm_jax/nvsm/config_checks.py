"""The few-shot experiment's and NVSM's config checks: NeMo's
(:mod:`nvsm_jax.nemo.config_checks`), then the experiment's methods, rows and rounds,
the classifier's ``cls`` block, the generated data and the E-step's ``estep`` block."""

from __future__ import annotations

import dataclasses
import math

from nvsm_jax.config_checks import (MISSING, Checks, augment_rules, get, is_number, optim_rules,
                                    same, synthetic_rules)
from nvsm_jax.data.shapes import CATEGORIES
from nvsm_jax.errors import ConfigError
from nvsm_jax.nemo.config_checks import (model_choices, nemo_ranges, occlusion_choices,
                                         weight_choices)
from nvsm_jax.nvsm import pseudo_labels
from nvsm_jax.nvsm.settings import EStepConfig, FewShotConfig

__all__ = ["check_config", "METHODS", "LINKS", "experiment_ranges", "estep_ranges"]

METHODS = ("cls_baseline", "nemo", "nvsm", "nemo_full")


# Fields that the shipped NVSM config links to others (ConfigDict references: the
# baseline's ``cls`` block to NeMo's fields, ``initial_steps`` to ``fewshot_steps``):
# each is checked once, under the name it refers to, unless it holds its own value.
LINKS = {"cls.seed": "seed", "cls.batch_size": "batch_size", "cls.log_every": "log_every",
         "cls.keep_checkpoints": "keep_checkpoints", "cls.optim.lr": "optim.lr",
         "cls.optim.weight_decay": "optim.weight_decay",
         "cls.model.frozen_stages": "model.frozen_stages",
         "cls.augment.flip_prob": "augment.flip_prob", "cls.augment.jitter": "augment.jitter",
         "cls.augment.hue": "augment.hue", "cls.augment.grayscale_prob": "augment.grayscale_prob",
         "cls.checkpoint_every": "cls.num_steps", "initial_steps": "fewshot_steps"}


def experiment_ranges(ck: Checks):
    """The few-shot experiment's numeric fields (experiment.py, rounds.py, the
    classifier's ``cls`` block), each linked field checked once (:data:`LINKS`)."""
    linked = {k for k, target in LINKS.items()
              if ck.get(k) is not MISSING and same(ck.get(k), ck.get(target))}
    ck.sequence("annotations", 1, integers=True)
    for key in ("full_steps", "fewshot_steps", "initial_steps", "steps_per_round", "pretrain_batch"):
        if key not in linked:
            ck.integer(key, 1)
    ck.integer("num_rounds", 0, note="; 0 = round 0 only")
    ck.integer("pretrain_steps", 0, note="; 0 = no pre-training")
    ck.number("labelled_min_fraction", 0, 1)
    ck.flag("eval_every_round")
    ck.flag("data.generate")
    ck.integer("data.num_train", 1)
    ck.integer("data.num_test", 1)
    ck.sequence("data.image_size", 1, integers=True, length=2)
    ck.integer("data.seed", 0)
    # the classification baseline (baselines.classifier.ClassifierConfig)
    for key in ("azimuth_bins", "elevation_bins", "theta_bins", "num_steps", "batch_size",
                "log_every", "checkpoint_every", "keep_checkpoints"):
        if "cls." + key not in linked:
            ck.integer("cls." + key, 1)
    for key in ("seed", "model.frozen_stages"):
        if "cls." + key not in linked:
            ck.integer("cls." + key, 0)
    ck.interval("cls.elevation_range")
    ck.interval("cls.theta_range")
    ck.number("cls.label_smoothing", 0, 1)
    ck.number("cls.distance", 0, low_open=True)
    optim_rules(ck, "cls.optim.", skip=linked)
    augment_rules(ck, "cls.augment.", skip=linked)


def estep_ranges(ck: Checks):
    """The ``estep`` block (estep.EStepConfig, pseudo_labels.Selection)."""
    e = "estep."
    for key in ("azimuth_step", "elevation_step", "agreement_angle", "flip_window"):
        ck.number(e + key, 0, low_open=True)
    for key in ("azimuth_steps", "elevation_steps"):
        ck.integer(e + key, 0, note="; offsets on each side of a source's pose")
    ck.number(e + "min_elevation", -math.pi / 2, math.pi / 2)
    ck.number(e + "max_elevation", -math.pi / 2, math.pi / 2)
    lo, hi = ck.get(e + "min_elevation"), ck.get(e + "max_elevation")
    if is_number(lo) and is_number(hi) and lo > hi:
        ck.bad("estep.max_elevation", hi, f">= estep.min_elevation={lo!r}")
    ck.number(e + "min_weight", 0, 1)
    ck.number(e + "threshold")
    ck.number(e + "margin")
    ck.number(e + "margin_angle", 0)
    ck.number(e + "agree_angle", 0, note="; 0 = off")
    ck.number(e + "flip_margin", optional=True, note="; None = off")
    ck.integer(e + "max_new", 0, optional=True, note="; None = all that pass")
    for key in ("max_per_source", "max_per_sector"):
        ck.integer(e + key, 1, optional=True, note="; None = no cap")
    ck.integer(e + "source_chunk", 1)
    ck.integer(e + "refine_steps", 0, note="; 0 = off")
    ck.number(e + "agreement_rate", 0, 1)
    ck.integer(e + "agreement_min_count", 1)
    ck.integer(e + "source_render_stride", 1, optional=True)
    ck.number(e + "min_view_cos", 0, 1, high_open=True)
    ck.sequence(e + "distance_scales", 0, low_open=True)
    for key in ("mirror_sources", "novel_views_only"):
        ck.flag(e + key)


def check_config(config) -> None:
    """Raises :class:`~nvsm_jax.errors.ConfigError` listing every option of a NeMo or
    NVSM few-shot ``config`` with a bad value: enumerations, then ranges."""
    ck = Checks(config)
    errors = ck.errors
    one_of, each_of = ck.one_of, ck.each_of
    model_choices(ck)
    each_of("methods", METHODS)
    one_of("nvsm_oracle", pseudo_labels.ORACLES)
    occlusion_choices(ck)
    generate = get(config, "data.generate")
    if generate is not MISSING and generate and not get(config, "data_root"):
        each_of("categories", CATEGORIES)
    weight_choices(ck)
    nemo_ranges(ck)
    experiment_ranges(ck)
    if get(config, "data.synthetic") is not MISSING:
        synthetic_rules(ck, "data.synthetic.")
    block = get(config, "estep")
    if block is not MISSING:
        before = len(errors)
        estep_ranges(ck)
        if len(errors) == before:     # its own checks: unknown keys, options, combinations
            try:
                fields = [f.name for f in dataclasses.fields(pseudo_labels.Selection)]
                pseudo_labels.Selection(**{k: block[k] for k in fields if k in block})
                EStepConfig.from_config(block)
            except (ValueError, TypeError, KeyError) as err:
                errors.append(f"estep: {err}")
    if not errors:                      # unknown keys, at the top and in every block
        try:
            FewShotConfig.from_config(config)
        except (ValueError, TypeError) as err:
            errors.append(str(err))
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))


