"""Every enumerated option is checked before any work starts, naming the key and value."""

import os

import pytest

from experiments.configs import nemo as nemo_config
from experiments.configs import nvsm as nvsm_config
from nvsm_jax import config_checks, experiment, semi_supervised
from nvsm_jax import train as nemo_train


@pytest.mark.parametrize("arg", ["demo", "paper", "tiny"])
def test_shipped_nvsm_configs_pass(arg):
    config_checks.check_config(nvsm_config.get_config(arg))


@pytest.mark.parametrize("arg", ["default", "tiny"])
def test_shipped_nemo_configs_pass(arg):
    config_checks.check_config(nemo_config.get_config(arg))


@pytest.mark.parametrize("key,value,message", [
    ("anchor_rule", "ring", "anchor_rule='ring'"),
    ("estep.max_new", -3, "max_new must be >= 0"),
    ("estep.margin_angle", float("nan"), "margin_angle must be finite"),
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
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_checks.check_config(c)


def test_every_bad_key_is_listed_in_one_error():
    """Three bad values give ONE ValueError naming all three (so a user fixes them in
    one go), in the order checked, joined by '; '."""
    c = nvsm_config.get_config("tiny")
    c.anchor_rule = "ring"
    c.model.stride = 2
    c.eval_occlusions = ("L0", "L5")
    with pytest.raises(ValueError) as info:
        config_checks.check_config(c)
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
        config_checks.check_config(c)
    c.model.frozen_stages = -1
    with pytest.raises(ValueError, match=r"^invalid config: model.frozen_stages=-1 \(expected >= 0\)$"):
        config_checks.check_config(c)


def test_imagenet_weights_need_a_lite_backbone():
    c = nemo_config.get_config("default")
    c.model.backbone = "small"
    with pytest.raises(ValueError, match="pretrained=''"):
        config_checks.check_config(c)
    c.model.pretrained = ""
    config_checks.check_config(c)


def test_trainers_refuse_before_any_work(tmp_path):
    c = nvsm_config.get_config("tiny")
    c.anchor_rule = "ring"
    with pytest.raises(ValueError, match="anchor_rule"):
        experiment.train_and_evaluate(c, str(tmp_path / "exp"))
    assert not os.path.exists(tmp_path / "exp")              # no data rendered, nothing written
    with pytest.raises(ValueError, match="anchor_rule"):
        semi_supervised.run_nvsm(c, str(tmp_path / "nvsm"))
    assert not os.path.exists(tmp_path / "nvsm")
    n = nemo_config.get_config("tiny")
    n.model.backbone = "resnet34"
    with pytest.raises(ValueError, match="resnet34"):
        nemo_train.train_and_evaluate(n, str(tmp_path / "nemo"))
    assert not os.path.exists(tmp_path / "nemo")
