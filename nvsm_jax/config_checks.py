"""Checks every option of a config before any work starts.

A misspelt or impossible value used to surface only where it was first read (a
wrong ``anchor_rule`` after the whole ``nemo_full`` row had trained,
``estep.azimuth_steps=-1`` after NVSM's round 0), or never: ``keep_checkpoints=0``
kept no checkpoint, ``num_labelled=0`` trained on every label, ``num_steps=0``
reported an untrained network. :func:`check_config` (NeMo's fields, and the
few-shot experiment's when present), :func:`check_mcss_config` and
:func:`check_synthetic_config` read every enumerated and numeric field the config
has (a key it lacks is not checked) and raise one
:class:`~nvsm_jax.errors.ConfigError` naming each bad key, its value and the
allowed values or range. Counts are integers and a bool is not a number. The
trainers and binaries call them before they write anything.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from nvsm_jax import pseudo_labels
from nvsm_jax.errors import ConfigError
from nvsm_jax.data.fewshot import ANCHOR_RULES
from nvsm_jax.data.format import OCCLUSION_LEVELS
from nvsm_jax.data.shapes import CATEGORIES
from nvsm_jax.models import backbone, weights

__all__ = ["check_config", "check_mcss_config", "check_synthetic_config", "METHODS"]

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


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return ((_is_int(value) or isinstance(value, (float, np.floating)))
            and math.isfinite(float(value)))


def _within(value, low=None, high=None, low_open=False, high_open=False) -> bool:
    return ((low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high)))


def _range_text(kind: str, low=None, high=None, low_open=False, high_open=False) -> str:
    """``"an integer >= 1"``, ``"a finite number in [0, 1)"``, ..."""
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def _same(a, b) -> bool:
    """Whether two config values are one (a field and the field it refers to)."""
    try:
        if a is b or bool(a == b):
            return True
    except (TypeError, ValueError):
        return False
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


class _Checks:
    """The bad keys of one config, one line each in ``errors``.

    config: a ConfigDict or mapping; flags: ``{key: "--flag"}``, named with a key's
    error (a binary's command-line flag that sets it). A key the config lacks is
    skipped.
    """

    def __init__(self, config, flags: dict | None = None):
        self.config, self.flags = config, dict(flags or {})
        self.errors: list[str] = []

    def get(self, key):
        return _get(self.config, key)

    def bad(self, key, value, expected: str):
        flag = self.flags.get(key)
        self.errors.append(f"{key}={value!r} ({flag + '; ' if flag else ''}expected {expected})")

    def one_of(self, key, allowed, *, optional=False):
        value = self.get(key)
        if value is _MISSING or (optional and value in (None, "")):
            return
        if value not in allowed:
            self.errors.append(f"{key}={value!r} (expected one of {tuple(allowed)})")

    def each_of(self, key, allowed):
        value = self.get(key)
        if value is _MISSING or value is None:
            return
        bad = [v for v in _as_list(value) if v not in allowed]
        if bad:
            self.errors.append(f"{key}: {bad} not in {tuple(allowed)}")

    def integer(self, key, low=None, high=None, *, optional=False, note=""):
        """An int (not a bool) in [low, high]; also None when ``optional``."""
        value = self.get(key)
        if value is _MISSING or (optional and value is None):
            return
        if not (_is_int(value) and _within(value, low, high)):
            self.bad(key, value, ("None or " if optional else "")
                     + _range_text("an integer", low, high) + note)

    def number(self, key, low=None, high=None, *, low_open=False, high_open=False,
               optional=False, note=""):
        """A finite int or float (not a bool) in the interval; also None when ``optional``."""
        value = self.get(key)
        if value is _MISSING or (optional and value is None):
            return
        if not (_is_number(value) and _within(value, low, high, low_open, high_open)):
            self.bad(key, value, ("None or " if optional else "")
                     + _range_text("a finite number", low, high, low_open, high_open) + note)

    def sequence(self, key, low=None, high=None, *, integers=False, low_open=False,
                 length=None, empty=False, note=""):
        """A tuple / list of ints (``integers``) or finite numbers in the interval:
        ``length`` of them, or at least one (none too when ``empty``)."""
        value = self.get(key)
        if value is _MISSING:
            return
        test = _is_int if integers else _is_number
        ok = (isinstance(value, (tuple, list))
              and (len(value) == length if length else (empty or len(value) > 0))
              and all(test(v) and _within(v, low, high, low_open) for v in value))
        if not ok:
            count = f"{length}" if length else ("a list of" if empty else "a non-empty list of")
            kind = "integers" if integers else "finite numbers"
            self.bad(key, value, _range_text(f"{count} {kind}", low, high, low_open) + note)

    def interval(self, key):
        """``(lo, hi)``: two finite numbers, lo < hi."""
        value = self.get(key)
        if value is _MISSING:
            return
        if not (isinstance(value, (tuple, list)) and len(value) == 2
                and all(_is_number(v) for v in value) and value[0] < value[1]):
            self.bad(key, value, "(lo, hi) with lo < hi")

    def flag(self, key):
        value = self.get(key)
        if value is not _MISSING and not isinstance(value, (bool, np.bool_)):
            self.bad(key, value, "True or False")

    def raise_if_any(self, what: str = "invalid config"):
        if self.errors:
            raise ConfigError(f"{what}: " + "; ".join(self.errors))


def _augment_rules(ck: _Checks, prefix: str, skip=()):
    """:class:`nvsm_jax.data.pipeline.Augment`'s fields under ``prefix``."""
    for key, high in (("flip_prob", 1), ("jitter", None), ("hue", 1), ("grayscale_prob", 1)):
        if prefix + key not in skip:
            ck.number(prefix + key, 0, high)


def _optim_rules(ck: _Checks, prefix: str, warmup: str, skip=()):
    """The optimiser fields every trainer shares (:func:`nvsm_jax.training.make_schedule`,
    :func:`nvsm_jax.training.make_adamw`) under ``prefix``; ``warmup``: the warm-up key."""
    rules = {"lr": dict(low=0, low_open=True), "weight_decay": dict(low=0),
             "final_lr_fraction": dict(low=0, high=1),
             "grad_clip": dict(low=0, low_open=True, optional=True, note="; None = no clipping")}
    for key, kw in rules.items():
        if prefix + key not in skip:
            ck.number(prefix + key, **kw)
    ck.integer(prefix + warmup, 0)


# Fields that the shipped NVSM config links to others (ConfigDict references: the
# baseline's ``cls`` block to NeMo's fields, ``initial_steps`` to ``fewshot_steps``):
# each is checked once, under the name it refers to, unless it holds its own value.
_LINKS = {"cls.seed": "seed", "cls.batch_size": "batch_size", "cls.log_every": "log_every",
          "cls.keep_checkpoints": "keep_checkpoints", "cls.lr": "optim.lr",
          "cls.weight_decay": "optim.weight_decay", "cls.frozen_stages": "model.frozen_stages",
          "cls.flip_prob": "augment.flip_prob", "cls.jitter": "augment.jitter",
          "cls.hue": "augment.hue", "cls.grayscale_prob": "augment.grayscale_prob",
          "cls.checkpoint_every": "cls.num_steps", "initial_steps": "fewshot_steps"}


def _nemo_ranges(ck: _Checks):
    """NeMo's numeric fields (train.py, losses.py, features.py, pose_solver.py) and the
    few-shot experiment's (experiment.py, semi_supervised.py, baselines.py)."""
    linked = {k for k, target in _LINKS.items()
              if ck.get(k) is not _MISSING and _same(ck.get(k), ck.get(target))}
    ck.integer("seed", 0)
    ck.integer("num_labelled", 1, optional=True, note="; None = every label")
    ck.integer("num_devices", 1, optional=True, note="; None = all")
    ck.integer("render_stride", 1, optional=True)
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                "eval_batch_size", "model.feature_dim"):
        ck.integer(key, 1)
    ck.integer("eval_limit", 1, optional=True, note="; None = every test image")
    for key in ("eval_at_end", "restart", "optim.decoupled", "solver.refine_distance"):
        ck.flag(key)
    _optim_rules(ck, "optim.", "warmup_steps")
    ck.number("optim.b1", 0, 1, high_open=True)
    ck.number("optim.b2", 0, 1, high_open=True)
    ck.number("loss.temperature", 0, low_open=True)
    ck.number("loss.neighbor_radius_px", 0)
    ck.number("loss.neighbor_reference_width", 0, low_open=True)
    ck.number("loss.clutter_weight", 0, low_open=True)
    ck.number("loss.reg_weight", 0)
    ck.number("loss.momentum", 0, 1, high_open=True)
    ck.integer("loss.clutter_per_image", 1)
    ck.integer("loss.clutter_size", 1)
    ck.integer("loss.anchors_per_image", 1, optional=True, note="; None = every visible vertex")
    _augment_rules(ck, "augment.")
    ck.integer("solver.num_azimuth", 1)
    ck.sequence("solver.elevations", -math.pi / 2, math.pi / 2)
    ck.sequence("solver.thetas", -math.pi, math.pi)
    ck.number("solver.distance", 0, low_open=True)
    ck.integer("solver.top_k", 1)
    ck.integer("solver.steps", 0, note="; 0 = the grid's best pose")
    ck.number("solver.lr", 0, low_open=True)
    ck.number("solver.b1", 0, 1, high_open=True)
    ck.number("solver.b2", 0, 1, high_open=True)
    ck.integer("solver.decay_every", 1)
    ck.number("solver.decay_factor", 0, 1, low_open=True)
    grid = [ck.get("solver.num_azimuth"), ck.get("solver.elevations"), ck.get("solver.thetas")]
    top_k = ck.get("solver.top_k")
    if (_is_int(top_k) and _is_int(grid[0]) and all(isinstance(g, (tuple, list)) for g in grid[1:])
            and top_k > grid[0] * len(grid[1]) * len(grid[2])):
        ck.bad("solver.top_k", top_k, f"<= {grid[0] * len(grid[1]) * len(grid[2])}, the "
               "grid's poses: solver.num_azimuth x len(elevations) x len(thetas)")
    # the few-shot experiment
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
    # the classification baseline (baselines.ClassifierConfig)
    for key in ("azimuth_bins", "elevation_bins", "theta_bins", "num_steps", "batch_size",
                "log_every", "checkpoint_every", "keep_checkpoints"):
        if "cls." + key not in linked:
            ck.integer("cls." + key, 1)
    for key in ("seed", "frozen_stages"):
        if "cls." + key not in linked:
            ck.integer("cls." + key, 0)
    ck.interval("cls.elevation_range")
    ck.interval("cls.theta_range")
    ck.number("cls.label_smoothing", 0, 1)
    ck.number("cls.distance", 0, low_open=True)
    _optim_rules(ck, "cls.", "warmup_steps", skip=linked)
    _augment_rules(ck, "cls.", skip=linked)


def _estep_ranges(ck: _Checks):
    """The ``estep`` block (semi_supervised.EStepConfig, pseudo_labels.Selection)."""
    e = "estep."
    for key in ("azimuth_step", "elevation_step", "agreement_angle", "flip_window"):
        ck.number(e + key, 0, low_open=True)
    for key in ("azimuth_steps", "elevation_steps"):
        ck.integer(e + key, 0, note="; offsets on each side of a source's pose")
    ck.number(e + "min_elevation", -math.pi / 2, math.pi / 2)
    ck.number(e + "max_elevation", -math.pi / 2, math.pi / 2)
    lo, hi = ck.get(e + "min_elevation"), ck.get(e + "max_elevation")
    if _is_number(lo) and _is_number(hi) and lo > hi:
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
    ck = _Checks(config)
    errors = ck.errors
    one_of, each_of = ck.one_of, ck.each_of

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
    if frozen is not _MISSING and frozen is not None:
        if not _is_int(frozen):
            ck.bad("model.frozen_stages", frozen, "an integer >= 0")
        elif int(frozen) < 0:
            errors.append(f"model.frozen_stages={frozen!r} (expected >= 0)")
    _nemo_ranges(ck)
    if _get(config, "data.synthetic") is not _MISSING:
        _synthetic_rules(ck, "data.synthetic.")
    estep = _get(config, "estep")
    if estep is not _MISSING:
        before = len(errors)
        _estep_ranges(ck)
        if len(errors) == before:     # its own checks: unknown keys, options, combinations
            from nvsm_jax import semi_supervised     # (imports this module)
            try:
                fields = [f.name for f in dataclasses.fields(pseudo_labels.Selection)]
                pseudo_labels.Selection(**{k: estep[k] for k in fields if k in estep})
                semi_supervised.EStepConfig.from_config(estep)
            except (ValueError, TypeError, KeyError) as err:
                errors.append(f"estep: {err}")
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))


def _synthetic_rules(ck: _Checks, prefix: str = ""):
    """:class:`nvsm_jax.data.synthetic.SynthConfig`'s fields under ``prefix``."""
    p = prefix
    ck.each_of(p + "categories", CATEGORIES)
    cats = ck.get(p + "categories")
    if cats is not _MISSING and (cats is None or not _as_list(cats)):
        ck.bad(p + "categories", cats, f"at least one of {CATEGORIES}")
    ck.each_of(p + "test_levels", OCCLUSION_LEVELS)
    ck.integer(p + "num_train", 1)
    levels = ck.get(p + "test_levels")
    if levels is not _MISSING and levels is not None and not _as_list(levels):
        ck.integer(p + "num_test", 0, note="; no test_levels: no test set")
    else:
        ck.integer(p + "num_test", 1, note="; 0 only with test_levels=()")
    size = ck.get(p + "image_size")
    if _is_int(size):                  # SynthConfig.from_mapping: one side for both
        ck.integer(p + "image_size", 1)
    else:
        ck.sequence(p + "image_size", 1, integers=True, length=2)
    for key in ("supersample", "batch_size", "cuboid_vertices", "cuboid_instances", "workers"):
        ck.integer(p + key, 1)
    ck.integer(p + "seed", 0)
    ck.number(p + "fill", 0, 1, low_open=True)
    ck.number(p + "cuboid_coverage", 0, 1, low_open=True)
    d = ck.get(p + "distance_range")
    if d is not _MISSING and not (isinstance(d, (tuple, list)) and len(d) == 2
                                  and all(_is_number(v) for v in d) and 0 < d[0] <= d[1]):
        ck.bad(p + "distance_range", d, "(lo, hi) with 0 < lo <= hi")
    ck.sequence(p + "theta_deg", 0, length=2, note="; std, max |theta|")
    el = ck.get(p + "elevation_deg")
    if el is not _MISSING:
        ok = (isinstance(el, (tuple, list)) and len(el) == 4 and all(_is_number(v) for v in el)
              and el[1] >= 0 and -90 <= el[2] <= el[3] <= 90)
        if not ok:
            ck.bad(p + "elevation_deg", el, "(mean, std >= 0, lo, hi) degrees with "
                   "-90 <= lo <= hi <= 90")


def check_synthetic_config(config, flags: dict | None = None) -> None:
    """Raises :class:`~nvsm_jax.errors.ConfigError` listing every bad field of a synthetic
    data config (a mapping or ConfigDict with :class:`nvsm_jax.data.synthetic.SynthConfig`'s
    fields). flags: ``{field: "--flag"}``, named with a field's error."""
    ck = _Checks(config, flags=flags)
    _synthetic_rules(ck)
    ck.raise_if_any("invalid synthetic data config")


def check_mcss_config(config) -> None:
    """Raises :class:`~nvsm_jax.errors.ConfigError` listing every option of an MCSS
    ``config`` (the package's ``mcss`` config) with a bad value."""
    ck = _Checks(config)
    one_of, integer, number, flag = ck.one_of, ck.integer, ck.number, ck.flag
    integer("seed", 0)
    ck.sequence("seeds", 0, integers=True, empty=True)
    integer("num_devices", 0, note="; 0 = all")
    for key in ("restart", "ceiling", "data.generate", "train.progress", "train.multiview.squared",
                "train.multiview.cross_sequence"):
        flag(key)
    # data
    one_of("data.format", ("h36m", "3dhp"))
    if ck.get("data.format") == "3dhp" and not ck.get("data.root"):
        ck.errors.append("data.format='3dhp' reads an existing MPI-INF-3DHP tree: set data.root")
    integer("data.num_frames", 1)
    integer("data.num_views", 1)
    ck.sequence("data.image_size", 1, integers=True, length=2)
    number("data.noise_std", 0)
    integer("data.mpi.frame_step", 1)
    integer("data.mpi.max_frames", 0, note="; 0 = every frame")
    ck.sequence("data.mpi.cameras", 0, integers=True)
    number("data.mpi.crop_scale", 0, low_open=True)
    one_of("data.mpi.joints", ("annot3", "univ_annot3"))
    levels = ck.get("supervision_levels")
    if levels is not _MISSING:
        bad = [lv for lv in (levels if isinstance(levels, (tuple, list)) else [levels])
               if not _supervision_level_ok(lv)]
        if bad or not levels or not isinstance(levels, (tuple, list)):
            ck.bad("supervision_levels", levels, "a non-empty list of 'all', 'frac:x' with "
                   "0 < x <= 1, or subjects 'S1' / 'S1,S5'" + (f"; bad: {bad}" if bad else ""))
    ck.each_of("methods", ("mcss", "baseline"))
    # model
    m = "train.model."
    one_of(m + "encoder", backbone.ENCODERS)
    one_of(m + "pretrained", ("", "imagenet"), optional=True)
    one_of(m + "norm", NORMS)
    one_of(m + "depthwise", ("auto", "shift", "conv"), optional=True)
    one_of(m + "tap", (4, 8, 16, 32))
    one_of(m + "pool", ("mean", "flatten"))
    one_of(m + "regress_from", ("embedding", "features"))
    ck.sequence(m + "stage_sizes", 1, integers=True)
    ck.sequence(m + "widths", 1, integers=True)
    ck.sequence(m + "regressor_hidden", 1, integers=True, empty=True)
    for key in ("stem_width", "reduce_dim", "embed_dim", "head_hidden"):
        integer(m + key, 1)
    for key in ("frozen_stages", "adapter_layers"):
        integer(m + key, 0)
    number(m + "embed_scale", 0, low_open=True)
    # optimisation
    t = "train."
    integer(t + "steps", 1)
    integer(t + "sup_batch", 1)
    integer(t + "save_every", 1)
    integer(t + "log_every", 1)
    one_of(t + "pose_loss", ("mpjpe", "l1", "mse"))
    number(t + "pose_weight", 0)
    number(t + "augment", 0, note="; 0 = off")
    one_of(t + "cache_features", ("auto", "on", "off"))
    integer(t + "cache_copies", 1)
    _optim_rules(ck, t + "optim.", "warmup")
    v = t + "multiview."
    one_of(v + "kind", ("contrastive", "triplet"))
    for key in ("weight", "margin", "pose_consistency"):
        number(v + key, 0)
    number(v + "temperature", 0, low_open=True)
    integer(v + "dt_min", 0)
    integer(v + "num_seqs", 1)
    integer(v + "num_times", 1)
    integer(v + "num_views", 2, note="; an instant's views are each other's positives")
    integer(t + "multiview_pseudo.rounds", 0, note="; 0 = off")
    one_of(t + "multiview_pseudo.fuse", ("median", "mean"))
    # evaluation
    integer("eval.query_view", 0)
    ck.sequence("eval.ks", 1, integers=True)
    number("eval.hit_threshold", 0, low_open=True)
    one_of("eval.random_embedding", ("untrained", "gaussian"))
    one_of("eval.baseline_embedding", ("features", "head"))
    integer("eval.figure_rows", 1)
    # combinations: the generated benchmark has data.num_views cameras
    views = ck.get("data.num_views")
    if _is_int(views) and ck.get("data.generate") is True and ck.get("data.format") == "h36m":
        for key, limit in ((v + "num_views", views), ("eval.query_view", views - 1)):
            value = ck.get(key)
            if _is_int(value) and value > limit:
                ck.bad(key, value, f"<= {limit} with data.num_views={views}")
    ck.raise_if_any("invalid MCSS config")


def _supervision_level_ok(level) -> bool:
    """``"all"``, ``"frac:x"`` with 0 < x <= 1, or subjects ``"S1"`` / ``"S1,S5"``."""
    if not isinstance(level, str) or not level.strip():
        return False
    if level.startswith("frac:"):
        try:
            x = float(level.split(":", 1)[1])
        except ValueError:
            return False
        return math.isfinite(x) and 0 < x <= 1
    return all(s.strip() for s in level.split(","))
