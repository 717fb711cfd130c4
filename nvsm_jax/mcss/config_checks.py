"""MCSS's config checks: every enumerated and numeric field of an MCSS config
(:mod:`nvsm_jax.config_checks` has the machinery)."""

from __future__ import annotations

import math

from nvsm_jax.config_checks import MISSING, NORMS, Checks, block_rules, is_int, optim_rules
from nvsm_jax.mcss.settings import EvalConfig, MCSSTrainConfig
from nvsm_jax.models import backbone

__all__ = ["check_mcss_config", "BLOCKS"]

#: An MCSS config's typed blocks (:mod:`nvsm_jax.mcss.settings`; ``train`` with its
#: sub-blocks): each is built from its block, unknown keys refused with their path.
BLOCKS = {"train": MCSSTrainConfig, "eval": EvalConfig}


def check_mcss_config(config) -> None:
    """Raises :class:`~nvsm_jax.errors.ConfigError` listing every option of an MCSS
    ``config`` (the package's ``mcss`` config) with a bad value, and every key of a
    typed block (:data:`BLOCKS`) its dataclass does not know."""
    ck = Checks(config)
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
    if levels is not MISSING:
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
    optim_rules(ck, t + "optim.")
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
    if is_int(views) and ck.get("data.generate") is True and ck.get("data.format") == "h36m":
        for key, limit in ((v + "num_views", views), ("eval.query_view", views - 1)):
            value = ck.get(key)
            if is_int(value) and value > limit:
                ck.bad(key, value, f"<= {limit} with data.num_views={views}")
    block_rules(ck, BLOCKS)         # unknown keys: refused before any training
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
