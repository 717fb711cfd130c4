"""Every option of a config is checked before any work starts, naming the key and value."""

import os
import re

import ml_collections
import pytest

from experiments.configs import nemo as nemo_config
from experiments.configs import nvsm as nvsm_config
from experiments.configs import load_config
from nvsm_jax import config_checks
from nvsm_jax.mcss import config_checks as mcss_checks
from nvsm_jax.nvsm import config_checks as nvsm_checks
from nvsm_jax.nvsm import experiment, rounds
from nvsm_jax.errors import ConfigError
from nvsm_jax.nemo import train as nemo_train


@pytest.mark.parametrize("arg", ["demo", "paper", "tiny"])
def test_shipped_nvsm_configs_pass(arg):
    nvsm_checks.check_config(nvsm_config.get_config(arg))


@pytest.mark.parametrize("arg", ["default", "tiny"])
def test_shipped_nemo_configs_pass(arg):
    nvsm_checks.check_config(nemo_config.get_config(arg))


@pytest.mark.parametrize("key,value,message", [
    ("anchor_rule", "ring", "anchor_rule='ring'"),
    ("estep.max_new", -3, "estep.max_new=-3 (expected None or an integer >= 0"),
    ("estep.margin_angle", float("nan"), "estep.margin_angle=nan (expected a finite number >= 0)"),
    ("estep.source_object", "box", "estep.source_object='box' (expected 'none' or 'mask')"),
    ("model.backbone", "resnet34", "model.backbone='resnet34'"),
    ("model.depthwise", "fast", "model.depthwise='fast'"),
    ("model.encoder_norm", "layer", "model.encoder_norm='layer'"),
    ("model.stride", 2, "model.stride=2"),
    ("optim.schedule", "linear", "optim.schedule='linear'"),
    ("methods", ("nemo", "nvsn"), "['nvsn']"),
    ("eval_occlusions", ("L0", "L5"), "['L5']"),
    ("categories", "car,truck", "['truck']"),
    ("model.pretrained", "coco", "model.pretrained='coco'"),
    ("model.frozen_stages", -1, "frozen_stages=-1"),
])
def test_each_bad_option_is_named(key, value, message):
    c = nvsm_config.get_config("tiny")
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        nvsm_checks.check_config(c)


def test_every_bad_key_is_listed_in_one_error():
    """Three bad values give ONE ValueError naming all three (so a user fixes them in
    one go), in the order checked, joined by '; '."""
    c = nvsm_config.get_config("tiny")
    c.anchor_rule = "ring"
    c.model.stride = 2
    c.eval_occlusions = ("L0", "L5")
    with pytest.raises(ValueError) as info:
        nvsm_checks.check_config(c)
    msg = str(info.value)
    assert msg.startswith("invalid config: anchor_rule='ring' (expected one of ")
    assert msg.count("; ") == 2
    assert msg.index("anchor_rule='ring'") < msg.index("model.stride=2") < msg.index("['L5']")


def test_boundary_and_optional_values_pass():
    """Values at the edge of the allowed sets are accepted: frozen_stages 0 (the
    smallest allowed), every allowed stride, None / '' for the optional fields and
    a comma list of known categories."""
    c = nvsm_config.get_config("tiny")
    with c.model.ignore_type():
        c.model.frozen_stages = 0
        c.model.depthwise = None
        c.model.norm = ""
        c.model.pretrained = None
    c.categories = "car,bus"
    for stride in (4, 8, 16, 32):
        c.model.stride = stride
        nvsm_checks.check_config(c)
    c.model.frozen_stages = -1
    with pytest.raises(ValueError, match=r"^invalid config: model.frozen_stages=-1 \(expected >= 0\)$"):
        nvsm_checks.check_config(c)


def test_imagenet_weights_need_a_lite_backbone():
    c = nemo_config.get_config("default")
    c.model.backbone = "small"
    with pytest.raises(ValueError, match="pretrained=''"):
        nvsm_checks.check_config(c)
    c.model.pretrained = ""
    nvsm_checks.check_config(c)


def test_trainers_refuse_before_any_work(tmp_path):
    c = nvsm_config.get_config("tiny")
    c.anchor_rule = "ring"
    with pytest.raises(ValueError, match="anchor_rule"):
        experiment.train_and_evaluate(c, str(tmp_path / "exp"))
    assert not os.path.exists(tmp_path / "exp")              # no data rendered, nothing written
    with pytest.raises(ValueError, match="anchor_rule"):
        rounds.run_nvsm(c, str(tmp_path / "nvsm"))
    assert not os.path.exists(tmp_path / "nvsm")
    n = nemo_config.get_config("tiny")
    n.model.backbone = "resnet34"
    with pytest.raises(ValueError, match="resnet34"):
        nemo_train.train_and_evaluate(n, str(tmp_path / "nemo"))
    assert not os.path.exists(tmp_path / "nemo")


# ------------------------------------------------------------------ numeric ranges and types

def _with(config, key, value):
    """``config`` with ``key`` (dotted) set to ``value``, whatever its type."""
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    return config


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("key,value,message", [
    # the cases (issue 30, finding 3 and 4)
    ("keep_checkpoints", 0, "keep_checkpoints=0 (expected an integer >= 1)"),
    ("estep.azimuth_steps", -1, "estep.azimuth_steps=-1 (expected an integer >= 0"),
    ("num_labelled", 0, "num_labelled=0 (expected None or an integer >= 1; None = every label)"),
    ("annotations", (7, 0), "annotations=(7, 0) (expected a non-empty list of integers >= 1)"),
    ("num_steps", 0, "num_steps=0 (expected an integer >= 1)"),
    ("num_steps", -5, "num_steps=-5 (expected an integer >= 1)"),
    ("num_rounds", -1, "num_rounds=-1 (expected an integer >= 0; 0 = round 0 only)"),
    ("log_every", 0, "log_every=0 (expected an integer >= 1)"),
    ("seed", -1, "seed=-1 (expected an integer >= 0)"),
    ("model.feature_dim", 0, "model.feature_dim=0 (expected an integer >= 1)"),
    ("optim.lr", NAN, "optim.lr=nan (expected a finite number > 0)"),
    ("loss.temperature", 0.0, "loss.temperature=0.0 (expected a finite number > 0)"),
    # the rest of NeMo's fields
    ("optim.lr", INF, "optim.lr=inf (expected a finite number > 0)"),
    ("optim.lr", 0.0, "optim.lr=0.0 (expected a finite number > 0)"),
    ("optim.weight_decay", -1e-4, "optim.weight_decay=-0.0001 (expected a finite number >= 0)"),
    ("optim.b2", 1.0, "optim.b2=1.0 (expected a finite number in [0, 1))"),
    ("optim.warmup_steps", -1, "optim.warmup_steps=-1 (expected an integer >= 0)"),
    ("optim.final_lr_fraction", 2.0, "optim.final_lr_fraction=2.0 (expected a finite number in [0, 1])"),
    ("optim.grad_clip", 0.0, "optim.grad_clip=0.0 (expected None or a finite number > 0; None = no clipping)"),
    ("loss.clutter_weight", 0.0, "loss.clutter_weight=0.0 (expected a finite number > 0)"),
    ("loss.momentum", 1.0, "loss.momentum=1.0 (expected a finite number in [0, 1))"),
    ("loss.neighbor_reference_width", 0, "loss.neighbor_reference_width=0 (expected a finite number > 0)"),
    ("loss.clutter_size", 0, "loss.clutter_size=0 (expected an integer >= 1)"),
    ("loss.vertices_per_image", 0, "loss.vertices_per_image=0 (expected None or an integer >= 1"),
    ("augment.flip_prob", 1.5, "augment.flip_prob=1.5 (expected a finite number in [0, 1])"),
    ("augment.grayscale_prob", -0.1, "augment.grayscale_prob=-0.1 (expected a finite number in [0, 1])"),
    ("batch_size", 0, "batch_size=0 (expected an integer >= 1)"),
    ("checkpoint_every", 0, "checkpoint_every=0 (expected an integer >= 1)"),
    ("eval_batch_size", 0, "eval_batch_size=0 (expected an integer >= 1)"),
    ("eval_limit", 0, "eval_limit=0 (expected None or an integer >= 1"),
    ("num_devices", 0, "num_devices=0 (expected None or an integer >= 1; None = all)"),
    ("render_stride", 0, "render_stride=0 (expected None or an integer >= 1)"),
    ("solver.top_k", 200, "solver.top_k=200 (expected <= 144, the grid's poses"),
    ("solver.steps", -1, "solver.steps=-1 (expected an integer >= 0; 0 = the grid's best pose)"),
    ("solver.decay_every", 0, "solver.decay_every=0 (expected an integer >= 1)"),
    ("solver.distance", -5.0, "solver.distance=-5.0 (expected a finite number > 0)"),
    ("solver.elevations", (), "solver.elevations=() (expected a non-empty list of finite numbers in"),
    # types: a bool, a float or a string is not a count; a bool is not a number
    ("batch_size", True, "batch_size=True (expected an integer >= 1)"),
    ("num_steps", 4.0, "num_steps=4.0 (expected an integer >= 1)"),
    ("optim.lr", "1e-3", "optim.lr='1e-3' (expected a finite number > 0)"),
    ("eval_at_end", "yes", "eval_at_end='yes' (expected True or False)"),
    ("model.frozen_stages", True, "model.frozen_stages=True (expected an integer >= 0)"),
    # the few-shot experiment
    ("annotations", (), "annotations=() (expected a non-empty list of integers >= 1)"),
    ("fewshot_steps", 0, "fewshot_steps=0 (expected an integer >= 1)"),
    ("full_steps", 0, "full_steps=0 (expected an integer >= 1)"),
    ("steps_per_round", 0, "steps_per_round=0 (expected an integer >= 1)"),
    ("labelled_min_fraction", 1.5, "labelled_min_fraction=1.5 (expected a finite number in [0, 1])"),
    ("pretrain_steps", -1, "pretrain_steps=-1 (expected an integer >= 0"),
    ("pretrain_batch", 0, "pretrain_batch=0 (expected an integer >= 1)"),
    ("data.num_train", 0, "data.num_train=0 (expected an integer >= 1)"),
    ("data.num_test", 0, "data.num_test=0 (expected an integer >= 1)"),
    ("data.image_size", (32, 0), "data.image_size=(32, 0) (expected 2 integers >= 1)"),
    ("data.seed", -1, "data.seed=-1 (expected an integer >= 0)"),
    ("data.synthetic.fill", 0.0, "data.synthetic.fill=0.0 (expected a finite number in (0, 1])"),
    ("cls.num_steps", 0, "cls.num_steps=0 (expected an integer >= 1)"),
    ("cls.azimuth_bins", 0, "cls.azimuth_bins=0 (expected an integer >= 1)"),
    ("cls.label_smoothing", 1.5, "cls.label_smoothing=1.5 (expected a finite number in [0, 1])"),
    ("cls.elevation_range", (1.0, -1.0), "cls.elevation_range=(1.0, -1.0) (expected (lo, hi) with lo < hi)"),
    # the E-step
    ("estep.elevation_steps", 1.5, "estep.elevation_steps=1.5 (expected an integer >= 0"),
    ("estep.azimuth_step", 0.0, "estep.azimuth_step=0.0 (expected a finite number > 0)"),
    ("estep.min_weight", 1.5, "estep.min_weight=1.5 (expected a finite number in [0, 1])"),
    ("estep.source_chunk", 0, "estep.source_chunk=0 (expected an integer >= 1)"),
    ("estep.refine_steps", -2, "estep.refine_steps=-2 (expected an integer >= 0; 0 = off)"),
    ("estep.agreement_rate", 1.5, "estep.agreement_rate=1.5 (expected a finite number in [0, 1])"),
    ("estep.agreement_min_count", 0, "estep.agreement_min_count=0 (expected an integer >= 1)"),
    ("estep.max_per_source", 0, "estep.max_per_source=0 (expected None or an integer >= 1"),
    ("estep.distance_scales", (1.0, -0.5), "estep.distance_scales=(1.0, -0.5) (expected a non-empty list of finite numbers > 0)"),
    ("estep.source_render_stride", 0, "estep.source_render_stride=0 (expected None or an integer >= 1)"),
    ("estep.mirror_sources", 1, "estep.mirror_sources=1 (expected True or False)"),
    ("estep.max_elevation", -1.0, "estep.max_elevation=-1.0 (expected >= estep.min_elevation="),
])
def test_each_impossible_value_is_refused(key, value, message):
    """Every numeric field of the NVSM config (NeMo's included): one ConfigError naming
    the key, the value and the allowed range (issue 30: these used to train, lose the
    checkpoints or fail late)."""
    c = _with(nvsm_config.get_config("tiny"), key, value)
    with pytest.raises(ConfigError, match="^invalid config: " + re.escape(message)):
        nvsm_checks.check_config(c)


@pytest.mark.parametrize("key,value", [
    ("num_rounds", 0), ("num_labelled", 1), ("num_labelled", None), ("keep_checkpoints", 1),
    ("log_every", 1), ("seed", 0), ("optim.warmup_steps", 0), ("optim.b1", 0.0),
    ("optim.grad_clip", None), ("optim.grad_clip", 1e-6), ("optim.final_lr_fraction", 1.0),
    ("optim.final_lr_fraction", 0), ("loss.momentum", 0.0), ("loss.reg_weight", 0.0),
    ("loss.vertices_per_image", None), ("loss.neighbor_radius_px", 0.0), ("augment.flip_prob", 1.0),
    ("augment.hue", 0.0), ("solver.steps", 0), ("solver.top_k", 144), ("solver.decay_factor", 1.0),
    ("render_stride", None), ("num_devices", None), ("eval_limit", 1), ("pretrain_steps", 0),
    ("labelled_min_fraction", 0.0), ("labelled_min_fraction", 1.0), ("annotations", (1,)),
    ("estep.azimuth_steps", 0), ("estep.elevation_steps", 0), ("estep.agreement_rate", 0.0),
    ("estep.refine_steps", 0),
    ("estep.min_weight", 1.0), ("estep.source_render_stride", None), ("estep.flip_margin", -1.0),
    ("cls.label_smoothing", 0.0), ("cls.optim.warmup_steps", 0), ("optim.lr", 1), ("loss.temperature", 1e-9),
])
def test_boundary_values_pass(key, value):
    """The edge of every allowed range is accepted (0 rounds: round 0 only, 0 solver
    steps: the grid's best pose, None: the documented default)."""
    nvsm_checks.check_config(_with(nvsm_config.get_config("tiny"), key, value))


def test_nemo_config_ranges():
    """The NeMo trainer's config alone (no experiment fields) is checked the same way;
    num_labelled None (every label) passes and 0 is refused."""
    c = nemo_config.get_config("tiny")
    assert c.num_labelled is None
    nvsm_checks.check_config(c)
    c.num_labelled, c.keep_checkpoints, c.loss.temperature = 0, 0, 0.0
    with pytest.raises(ConfigError) as info:
        nvsm_checks.check_config(c)
    msg = str(info.value)
    assert "num_labelled=0" in msg and "keep_checkpoints=0" in msg and "loss.temperature=0.0" in msg
    assert msg.count("; ") == 3      # the num_labelled note adds one


def test_linked_fields_are_named_once_and_own_values_are_checked():
    """The baseline's block refers to NeMo's fields (cls.keep_checkpoints is
    keep_checkpoints): a bad value is named once, under NeMo's name. A block with its
    own values (e.g. read back from JSON, no references) has them checked."""
    c = nvsm_config.get_config("tiny")
    c.keep_checkpoints = 0
    with pytest.raises(ConfigError) as info:
        nvsm_checks.check_config(c)
    assert str(info.value) == "invalid config: keep_checkpoints=0 (expected an integer >= 1)"
    c = nvsm_config.get_config("tiny")
    c.fewshot_steps = 0                  # initial_steps refers to it
    with pytest.raises(ConfigError, match=r"^invalid config: fewshot_steps=0 \(expected an integer >= 1\)$"):
        nvsm_checks.check_config(c)
    c = nvsm_config.get_config("tiny")
    c.cls = ml_collections.ConfigDict(c.cls.to_dict())          # no references left
    c.cls.keep_checkpoints, c.cls.optim.lr = 0, -1.0
    with pytest.raises(ConfigError) as info:
        nvsm_checks.check_config(c)
    assert "cls.keep_checkpoints=0" in str(info.value) and "cls.optim.lr=-1.0" in str(info.value)
    assert "invalid config: cls." in str(info.value)     # NeMo's own fields are fine


def test_a_bool_is_not_a_number():
    """A ConfigDict turns True into 1.0 for a float field; a config read from JSON or
    built as a mapping keeps it, and it is refused (issue 30: azimuth True read as 1)."""
    c = {"optim": {"lr": True}, "loss": {"temperature": False}, "log_every": True}
    with pytest.raises(ConfigError) as info:
        nvsm_checks.check_config(c)
    assert str(info.value) == (
        "invalid config: log_every=True (expected an integer >= 1); optim.lr=True (expected a "
        "finite number > 0); loss.temperature=False (expected a finite number > 0)")


def test_estep_combinations_are_checked():
    """The E-step's own rules run once its ranges pass: the safeguard
    (agreement_rate > 0) needs max_new; without it, max_new None (all) or 0 passes."""
    c = nvsm_config.get_config("tiny")
    assert c.estep.agreement_rate > 0
    c.estep.max_new = None
    with pytest.raises(ConfigError, match=r"estep: estep.agreement_rate > 0 needs estep.max_new"):
        nvsm_checks.check_config(c)
    c.estep.agreement_rate = 0.0
    for max_new in (None, 0):
        c.estep.max_new = max_new
        nvsm_checks.check_config(c)


def test_range_errors_join_the_enumeration_errors():
    c = nvsm_config.get_config("tiny")
    c.anchor_rule = "ring"
    c.keep_checkpoints = 0
    c.estep.azimuth_steps = -1
    with pytest.raises(ConfigError) as info:
        nvsm_checks.check_config(c)
    msg = str(info.value)
    assert msg.index("anchor_rule='ring'") < msg.index("keep_checkpoints=0") \
        < msg.index("estep.azimuth_steps=-1")


# ------------------------------------------------------------------------------------ MCSS

@pytest.mark.parametrize("arg", ["demo", "demo_scratch", "tiny", "full"])
def test_shipped_mcss_configs_pass(arg):
    mcss_checks.check_mcss_config(load_config(f"mcss:{arg}"))


@pytest.mark.parametrize("key,value,message", [
    ("train.steps", 0, "train.steps=0 (expected an integer >= 1)"),
    ("train.sup_batch", 0, "train.sup_batch=0 (expected an integer >= 1)"),
    ("train.save_every", 0, "train.save_every=0 (expected an integer >= 1)"),
    ("train.log_every", 0, "train.log_every=0 (expected an integer >= 1)"),
    ("train.optim.lr", NAN, "train.optim.lr=nan (expected a finite number > 0)"),
    ("train.optim.warmup_steps", -1, "train.optim.warmup_steps=-1 (expected an integer >= 0)"),
    ("train.optim.schedule", "step", "train.optim.schedule='step' (expected one of"),
    ("train.multiview.temperature", 0.0, "train.multiview.temperature=0.0 (expected a finite number > 0)"),
    ("train.multiview.num_views", 1, "train.multiview.num_views=1 (expected an integer >= 2"),
    ("train.multiview.num_views", 8, "train.multiview.num_views=8 (expected <= 4 with data.num_views=4)"),
    ("train.multiview.dt_min", -1, "train.multiview.dt_min=-1 (expected an integer >= 0)"),
    ("train.multiview.kind", "ntxent", "train.multiview.kind='ntxent' (expected one of"),
    ("train.multiview_pseudo.rounds", -1, "train.multiview_pseudo.rounds=-1 (expected an integer >= 0"),
    ("train.multiview_pseudo.fuse", "max", "train.multiview_pseudo.fuse='max' (expected one of"),
    ("train.cache_copies", 0, "train.cache_copies=0 (expected an integer >= 1)"),
    ("train.cache_features", "yes", "train.cache_features='yes' (expected one of"),
    ("train.augment", -0.1, "train.augment=-0.1 (expected a finite number >= 0; 0 = off)"),
    ("train.pose_loss", "l3", "train.pose_loss='l3' (expected one of ('mpjpe', 'l1', 'mse'))"),
    ("train.model.tap", 2, "train.model.tap=2 (expected one of (4, 8, 16, 32))"),
    ("train.model.encoder", "vit", "train.model.encoder='vit' (expected one of"),
    ("train.model.widths", (8, 0, 16, 16), "train.model.widths=(8, 0, 16, 16) (expected a non-empty list of integers >= 1)"),
    ("train.model.embed_dim", 0, "train.model.embed_dim=0 (expected an integer >= 1)"),
    ("train.model.frozen_stages", -1, "train.model.frozen_stages=-1 (expected an integer >= 0)"),
    ("train.progress", 1, "train.progress=1 (expected True or False)"),
    ("eval.query_view", 4, "eval.query_view=4 (expected <= 3 with data.num_views=4)"),
    ("eval.ks", (1, 0), "eval.ks=(1, 0) (expected a non-empty list of integers >= 1)"),
    ("eval.hit_threshold", 0.0, "eval.hit_threshold=0.0 (expected a finite number > 0)"),
    ("seed", -1, "seed=-1 (expected an integer >= 0)"),
    ("seeds", (0, -1), "seeds=(0, -1) (expected a list of integers >= 0)"),
    ("num_devices", -1, "num_devices=-1 (expected an integer >= 0; 0 = all)"),
    ("supervision_levels", ("frac:0",), "supervision_levels=('frac:0',) (expected a non-empty list of 'all', 'frac:x'"),
    ("supervision_levels", ("S1", "frac:1.5"), "supervision_levels=('S1', 'frac:1.5') (expected a "
     "non-empty list of 'all', 'frac:x' with 0 < x <= 1, or subjects 'S1' / 'S1,S5'; bad: ['frac:1.5'])"),
    ("supervision_levels", (), "supervision_levels=() (expected a non-empty list"),
    ("methods", ("mcss", "ssl"), "methods: ['ssl'] not in ('mcss', 'baseline')"),
    ("data.num_frames", 0, "data.num_frames=0 (expected an integer >= 1)"),
    ("data.image_size", (32,), "data.image_size=(32,) (expected 2 integers >= 1)"),
    ("data.noise_std", -0.1, "data.noise_std=-0.1 (expected a finite number >= 0)"),
    ("data.format", "coco", "data.format='coco' (expected one of ('h36m', '3dhp'))"),
    ("data.format", "3dhp", "data.format='3dhp' reads an existing MPI-INF-3DHP tree: set data.root"),
    ("data.mpi.frame_step", 0, "data.mpi.frame_step=0 (expected an integer >= 1)"),
])
def test_each_bad_mcss_value_is_refused(key, value, message):
    c = _with(load_config("mcss:tiny"), key, value)
    with pytest.raises(ConfigError, match="^invalid MCSS config: " + re.escape(message)):
        mcss_checks.check_mcss_config(c)


def test_mcss_boundary_values_pass():
    c = load_config("mcss:tiny")
    for key, value in (("seeds", (0, 1, 2)), ("num_devices", 0), ("train.multiview_pseudo.rounds", 0),
                       ("train.augment", 0.0), ("supervision_levels", ("all", "frac:1", "S1,S5")),
                       ("train.multiview.dt_min", 0), ("train.model.regressor_hidden", ()),
                       ("train.multiview.num_views", 4), ("eval.query_view", 3),
                       ("train.optim.grad_clip", None), ("data.mpi.max_frames", 0)):
        _with(c, key, value)
    c.data.num_views = 4
    mcss_checks.check_mcss_config(c)


def test_mcss_experiment_refuses_before_writing(tmp_path):
    from nvsm_jax.mcss import experiment as mcss_experiment
    c = load_config("mcss:tiny")
    c.train.steps = 0
    w = tmp_path / "w"
    with pytest.raises(ConfigError, match="train.steps=0"):
        mcss_experiment.train_and_evaluate(c, str(w), log=None)
    assert not os.path.exists(w) or os.listdir(w) == []      # no data, no config.json


@pytest.mark.parametrize("block,key,message", [
    ("train.optim", "warmup", r"unknown config keys train.optim.warmup \(OptimConfig\); "
                              r"known: lr, weight_decay"),
    ("train.model", "adapters", r"unknown config keys train.model.adapters \(MCSSModelConfig\)"),
    ("train.multiview", "dt", r"unknown config keys train.multiview.dt \(MultiviewConfig\)"),
    ("train.multiview_pseudo", "round", r"unknown config keys train.multiview_pseudo.round "),
    ("eval", "k", r"unknown config keys eval.k \(EvalConfig\)"),
    ("train", "stepz", r"unknown config keys train.stepz \(MCSSTrainConfig\)"),
])
def test_an_unknown_mcss_block_key_is_refused(block, key, message):
    """A typed block's unknown key (e.g. the old ``optim.warmup``) is a config error
    naming it, not a key silently ignored."""
    c = load_config("mcss:tiny")
    mcss_checks.check_mcss_config(c)
    _with(c, f"{block}.{key}", 1)
    with pytest.raises(ConfigError, match=message):
        mcss_checks.check_mcss_config(c)


# ------------------------------------------------------------------------- synthetic data

@pytest.mark.parametrize("arg", ["default", "tiny", "demo"])
def test_shipped_synthetic_configs_pass(arg):
    config_checks.check_synthetic_config(load_config(f"synthetic:{arg}"))


@pytest.mark.parametrize("field,value,message", [
    ("num_train", 0, "num_train=0 (expected an integer >= 1)"),
    ("num_test", -1, "num_test=-1 (expected an integer >= 1; 0 only with test_levels=())"),
    ("num_test", 0, "num_test=0 (expected an integer >= 1"),
    ("batch_size", 0, "batch_size=0 (expected an integer >= 1)"),
    ("image_size", (0, 0), "image_size=(0, 0) (expected 2 integers >= 1)"),
    ("supersample", 0, "supersample=0 (expected an integer >= 1)"),
    ("workers", 0, "workers=0 (expected an integer >= 1)"),
    ("seed", -1, "seed=-1 (expected an integer >= 0)"),
    ("fill", 1.5, "fill=1.5 (expected a finite number in (0, 1])"),
    ("cuboid_coverage", 0.0, "cuboid_coverage=0.0 (expected a finite number in (0, 1])"),
    ("cuboid_instances", 0, "cuboid_instances=0 (expected an integer >= 1)"),
    ("distance_range", (5.5, 4.5), "distance_range=(5.5, 4.5) (expected (lo, hi) with 0 < lo <= hi)"),
    ("distance_range", (0.0, 5.0), "distance_range=(0.0, 5.0) (expected (lo, hi) with 0 < lo <= hi)"),
    ("elevation_deg", (10.0, -1.0, -10.0, 40.0), "elevation_deg=(10.0, -1.0, -10.0, 40.0) (expected (mean, std >= 0, lo, hi)"),
    ("elevation_deg", (10.0, 1.0, 40.0, -10.0), "elevation_deg=(10.0, 1.0, 40.0, -10.0)"),
    ("theta_deg", (5.0,), "theta_deg=(5.0,) (expected 2 finite numbers >= 0; std, max |theta|)"),
    ("categories", ("car", "truck"), "categories: ['truck'] not in"),
    ("categories", (), "categories=() (expected at least one of"),
    ("test_levels", ("L0", "L9"), "test_levels: ['L9'] not in"),
    ("num_train", True, "num_train=True (expected an integer >= 1)"),
])
def test_synth_config_refuses_each_bad_field(field, value, message):
    from nvsm_jax.data import synthetic
    with pytest.raises(ConfigError, match="^invalid synthetic data config: " + re.escape(message)):
        synthetic.SynthConfig(**{field: value})


def test_synth_config_boundaries_pass():
    from nvsm_jax.data import synthetic
    synthetic.SynthConfig(num_train=1, num_test=0, test_levels=())    # a training set only
    synthetic.SynthConfig(num_train=1, num_test=1, image_size=(1, 1), supersample=1, batch_size=1,
                          workers=1, fill=1.0, cuboid_coverage=1.0, distance_range=(5.0, 5.0),
                          elevation_deg=(0.0, 0.0, -90.0, 90.0), theta_deg=(0.0, 0.0), seed=0)
    assert synthetic.SynthConfig.from_mapping({"image_size": 16, "categories": "car"}).image_size == (16, 16)


@pytest.mark.parametrize("flags,message", [
    (["--train", "0"], "num_train=0 (--train; expected an integer >= 1)"),
    (["--test", "-1"], "num_test=-1 (--test; expected an integer >= 1"),
    (["--batch", "0"], "batch_size=0 (--batch; expected an integer >= 1)"),
    (["--size", "0"], "image_size=(0, 0) (--size; expected 2 integers >= 1)"),
    (["--categories", "car,truck"], "categories: ['truck'] not in"),
])
def test_make_synthetic_refuses_bad_flags_before_writing(tmp_path, capsys, monkeypatch, flags,
                                                         message):
    """make_synthetic names the field and its flag in one short line, exits 2 and writes
    nothing (issue 30: --train 0 / --test -1 wrote empty sets, --batch 0 failed inside
    range()); --debug raises the ConfigError itself."""
    from experiments import make_synthetic
    monkeypatch.delenv("NVSM_JAX_DEBUG", raising=False)
    out = tmp_path / "out"
    argv = ["--config=synthetic:tiny", "--out", str(out), *flags]
    with pytest.raises(SystemExit) as info:
        make_synthetic.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(out)
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_synthetic.main(argv + ["--debug"])
    assert not os.path.exists(out)


@pytest.mark.parametrize("module,flags,message", [
    ("show_data", ["--out", "{tmp}/sheet.png"], "annotations"),
    ("prepare_kitti", ["--out", "{tmp}/k"], "label_2"),
    ("prepare_pascal3d", ["--out", "{tmp}/p", "--categories", "car"], "Annotations"),
])
def test_argparse_binaries_print_expected_errors_and_accept_debug(tmp_path, capsys, monkeypatch,
                                                                  module, flags, message):
    """The data tools run under errors.guard: a missing root is one line naming it and
    exit status 2; --debug is accepted and shows the error itself."""
    import importlib
    main = importlib.import_module(f"experiments.{module}").main
    monkeypatch.delenv("NVSM_JAX_DEBUG", raising=False)
    argv = ["--root", str(tmp_path / "missing")] + [f.format(tmp=tmp_path) for f in flags]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "missing") in err and message in err and "Traceback" not in err
    with pytest.raises(ValueError if module != "show_data" else OSError, match=message):
        main(argv + ["--debug"])


def test_trainers_refuse_impossible_values_before_any_work(tmp_path):
    """A range error stops the run before anything is written, so the corrected rerun
    is never refused (issue 30: estep.azimuth_steps=-1 trained round 0 first)."""
    c = nvsm_config.get_config("tiny")
    c.estep.azimuth_steps = -1
    with pytest.raises(ConfigError, match="estep.azimuth_steps=-1"):
        experiment.train_and_evaluate(c, str(tmp_path / "exp"))
    assert not os.path.exists(tmp_path / "exp") or os.listdir(tmp_path / "exp") == []
    with pytest.raises(ConfigError, match="estep.azimuth_steps=-1"):
        rounds.run_nvsm(c, str(tmp_path / "nvsm"))
    assert not os.path.exists(tmp_path / "nvsm") or os.listdir(tmp_path / "nvsm") == []
    n = nemo_config.get_config("tiny")
    n.keep_checkpoints = 0
    with pytest.raises(ConfigError, match="keep_checkpoints=0"):
        nemo_train.train_and_evaluate(n, str(tmp_path / "nemo"))
    assert not os.path.exists(tmp_path / "nemo") or os.listdir(tmp_path / "nemo") == []


def test_an_unknown_solver_key_is_refused_before_any_training():
    """A typo in the ``solver`` block (read only when the first evaluation builds the
    solver, after a row has trained) is one of the config errors, for NeMo's check and
    the few-shot experiment's."""
    from nvsm_jax.nemo import config_checks as nemo_checks

    for check, c in ((nemo_checks.check_nemo_config, nemo_config.get_config("tiny")),
                     (nvsm_checks.check_config, nvsm_config.get_config("tiny"))):
        check(c)
        c.solver.num_azimuths = 12
        with pytest.raises(ConfigError, match=r"unknown config keys solver.num_azimuths "
                                              r"\(SolverConfig\); known: num_azimuth"):
            check(c)
