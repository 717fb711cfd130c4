"""Checks every option of a config before any work starts.

A misspelt or impossible value used to surface only where it was first read (a
wrong ``anchor_rule`` after the whole ``nemo_full`` row had trained,
``estep.azimuth_steps=-1`` after NVSM's round 0), or never: ``keep_checkpoints=0``
kept no checkpoint, ``num_labelled=0`` trained on every label, ``num_steps=0``
reported an untrained network. This module holds the rules' machinery (:class:`Checks`:
one line per bad key) and the rules every method shares (optimiser, augmentation, synthetic data); each method's
own checks sit beside it: :func:`nvsm_jax.nemo.config_checks.check_nemo_config`,
:func:`nvsm_jax.nvsm.config_checks.check_config` (NeMo's fields and the few-shot
experiment's), :func:`nvsm_jax.mcss.config_checks.check_mcss_config`, and
:func:`check_synthetic_config` here. They read every enumerated and numeric field
the config has (a key it lacks is not checked) and raise one
:class:`~nvsm_jax.errors.ConfigError` naming each bad key, its value and the
allowed values or range. Counts are integers and a bool is not a number. The
trainers and binaries call them before they write anything.
"""

from __future__ import annotations

import math

import numpy as np

from nvsm_jax.data.format import OCCLUSION_LEVELS
from nvsm_jax.data.shapes import CATEGORIES
from nvsm_jax.errors import ConfigError

__all__ = ["Checks", "MISSING", "get", "as_list", "is_int", "is_number", "same",
           "optim_rules", "augment_rules", "block_rules", "synthetic_rules",
           "check_synthetic_config", "NORMS"]

NORMS = ("group", "batch", "frozen_batch")


def get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get") or part not in node:
            return MISSING
        node = node[part]
    return node


MISSING = object()


def as_list(value):
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    return list(value)


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return ((is_int(value) or isinstance(value, (float, np.floating)))
            and math.isfinite(float(value)))


def within(value, low=None, high=None, low_open=False, high_open=False) -> bool:
    return ((low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high)))


def range_text(kind: str, low=None, high=None, low_open=False, high_open=False) -> str:
    """``"an integer >= 1"``, ``"a finite number in [0, 1)"``, ..."""
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def same(a, b) -> bool:
    """Whether two config values are one (a field and the field it refers to)."""
    try:
        if a is b or bool(a == b):
            return True
    except (TypeError, ValueError):
        return False
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


class Checks:
    """The bad keys of one config, one line each in ``errors``.

    config: a ConfigDict or mapping; flags: ``{key: "--flag"}``, named with a key's
    error (a binary's command-line flag that sets it). A key the config lacks is
    skipped.
    """

    def __init__(self, config, flags: dict | None = None):
        self.config, self.flags = config, dict(flags or {})
        self.errors: list[str] = []

    def get(self, key):
        return get(self.config, key)

    def bad(self, key, value, expected: str):
        flag = self.flags.get(key)
        self.errors.append(f"{key}={value!r} ({flag + '; ' if flag else ''}expected {expected})")

    def one_of(self, key, allowed, *, optional=False):
        value = self.get(key)
        if value is MISSING or (optional and value in (None, "")):
            return
        if value not in allowed:
            self.errors.append(f"{key}={value!r} (expected one of {tuple(allowed)})")

    def each_of(self, key, allowed):
        value = self.get(key)
        if value is MISSING or value is None:
            return
        bad = [v for v in as_list(value) if v not in allowed]
        if bad:
            self.errors.append(f"{key}: {bad} not in {tuple(allowed)}")

    def integer(self, key, low=None, high=None, *, optional=False, note=""):
        """An int (not a bool) in [low, high]; also None when ``optional``."""
        value = self.get(key)
        if value is MISSING or (optional and value is None):
            return
        if not (is_int(value) and within(value, low, high)):
            self.bad(key, value, ("None or " if optional else "")
                     + range_text("an integer", low, high) + note)

    def number(self, key, low=None, high=None, *, low_open=False, high_open=False,
               optional=False, note=""):
        """A finite int or float (not a bool) in the interval; also None when ``optional``."""
        value = self.get(key)
        if value is MISSING or (optional and value is None):
            return
        if not (is_number(value) and within(value, low, high, low_open, high_open)):
            self.bad(key, value, ("None or " if optional else "")
                     + range_text("a finite number", low, high, low_open, high_open) + note)

    def sequence(self, key, low=None, high=None, *, integers=False, low_open=False,
                 length=None, empty=False, note=""):
        """A tuple / list of ints (``integers``) or finite numbers in the interval:
        ``length`` of them, or at least one (none too when ``empty``)."""
        value = self.get(key)
        if value is MISSING:
            return
        test = is_int if integers else is_number
        ok = (isinstance(value, (tuple, list))
              and (len(value) == length if length else (empty or len(value) > 0))
              and all(test(v) and within(v, low, high, low_open) for v in value))
        if not ok:
            count = f"{length}" if length else ("a list of" if empty else "a non-empty list of")
            kind = "integers" if integers else "finite numbers"
            self.bad(key, value, range_text(f"{count} {kind}", low, high, low_open) + note)

    def interval(self, key):
        """``(lo, hi)``: two finite numbers, lo < hi."""
        value = self.get(key)
        if value is MISSING:
            return
        if not (isinstance(value, (tuple, list)) and len(value) == 2
                and all(is_number(v) for v in value) and value[0] < value[1]):
            self.bad(key, value, "(lo, hi) with lo < hi")

    def flag(self, key):
        value = self.get(key)
        if value is not MISSING and not isinstance(value, (bool, np.bool_)):
            self.bad(key, value, "True or False")

    def raise_if_any(self, what: str = "invalid config"):
        if self.errors:
            raise ConfigError(f"{what}: " + "; ".join(self.errors))


def block_rules(ck: Checks, blocks: dict):
    """Each typed block ``{dotted name: DataclassConfig class}``: its unknown keys (and
    its sub-blocks') are errors, with their paths; then, unless its own fields already
    failed a check, it is built (a value its class refuses is an error). An absent or
    None block is left to the checks of its fields."""
    for name, block_class in blocks.items():
        block = ck.get(name)
        if block in (MISSING, None) or not hasattr(block, "keys"):
            continue
        unknown = block_class.unknown_keys(block, f"{name}.")
        ck.errors.extend(unknown)
        if not unknown and not any(e.startswith(name + ".") for e in ck.errors):
            try:
                block_class.from_config(block, f"{name}.")
            except (ValueError, TypeError) as err:
                ck.errors.append(str(err))


def augment_rules(ck: Checks, prefix: str, skip=()):
    """:class:`nvsm_jax.data.pipeline.Augment`'s fields under ``prefix``."""
    for key, high in (("flip_prob", 1), ("jitter", None), ("hue", 1), ("grayscale_prob", 1)):
        if prefix + key not in skip:
            ck.number(prefix + key, 0, high)


def optim_rules(ck: Checks, prefix: str, skip=()):
    """The ``optim`` block every trainer shares (:class:`nvsm_jax.settings.OptimConfig`,
    :func:`nvsm_jax.training.make_optimizer`) under ``prefix``."""
    rules = {"lr": dict(low=0, low_open=True), "weight_decay": dict(low=0),
             "final_lr_fraction": dict(low=0, high=1),
             "grad_clip": dict(low=0, low_open=True, optional=True, note="; None = no clipping"),
             "b1": dict(low=0, high=1, high_open=True), "b2": dict(low=0, high=1, high_open=True)}
    for key, kw in rules.items():
        if prefix + key not in skip:
            ck.number(prefix + key, **kw)
    ck.integer(prefix + "warmup_steps", 0)
    ck.one_of(prefix + "schedule", ("cosine", "constant"))
    ck.flag(prefix + "decoupled")


def synthetic_rules(ck: Checks, prefix: str = ""):
    """:class:`nvsm_jax.data.synthetic.SynthConfig`'s fields under ``prefix``."""
    p = prefix
    ck.each_of(p + "categories", CATEGORIES)
    cats = ck.get(p + "categories")
    if cats is not MISSING and (cats is None or not as_list(cats)):
        ck.bad(p + "categories", cats, f"at least one of {CATEGORIES}")
    ck.each_of(p + "test_levels", OCCLUSION_LEVELS)
    ck.integer(p + "num_train", 1)
    levels = ck.get(p + "test_levels")
    if levels is not MISSING and levels is not None and not as_list(levels):
        ck.integer(p + "num_test", 0, note="; no test_levels: no test set")
    else:
        ck.integer(p + "num_test", 1, note="; 0 only with test_levels=()")
    size = ck.get(p + "image_size")
    if is_int(size):                  # SynthConfig.from_mapping: one side for both
        ck.integer(p + "image_size", 1)
    else:
        ck.sequence(p + "image_size", 1, integers=True, length=2)
    for key in ("supersample", "batch_size", "cuboid_vertices", "cuboid_instances", "workers"):
        ck.integer(p + key, 1)
    ck.integer(p + "seed", 0)
    ck.number(p + "fill", 0, 1, low_open=True)
    ck.number(p + "cuboid_coverage", 0, 1, low_open=True)
    d = ck.get(p + "distance_range")
    if d is not MISSING and not (isinstance(d, (tuple, list)) and len(d) == 2
                                  and all(is_number(v) for v in d) and 0 < d[0] <= d[1]):
        ck.bad(p + "distance_range", d, "(lo, hi) with 0 < lo <= hi")
    ck.sequence(p + "theta_deg", 0, length=2, note="; std, max |theta|")
    el = ck.get(p + "elevation_deg")
    if el is not MISSING:
        ok = (isinstance(el, (tuple, list)) and len(el) == 4 and all(is_number(v) for v in el)
              and el[1] >= 0 and -90 <= el[2] <= el[3] <= 90)
        if not ok:
            ck.bad(p + "elevation_deg", el, "(mean, std >= 0, lo, hi) degrees with "
                   "-90 <= lo <= hi <= 90")


def check_synthetic_config(config, flags: dict | None = None) -> None:
    """Raises :class:`~nvsm_jax.errors.ConfigError` listing every bad field of a synthetic
    data config (a mapping or ConfigDict with :class:`nvsm_jax.data.synthetic.SynthConfig`'s
    fields). flags: ``{field: "--flag"}``, named with a field's error."""
    ck = Checks(config, flags=flags)
    synthetic_rules(ck)
    ck.raise_if_any("invalid synthetic data config")
