"""The typed config blocks (``nvsm_jax.settings`` and each method's ``settings``): the
config files are their dataclasses written out, unknown keys are refused with their
dotted path, and records of earlier versions (a run's ``config.json``, a results cell)
are read in today's names, so such a run resumes and its cells average with new ones."""

import json

import pytest

from experiments.configs import mcss as mcss_config
from experiments.configs import nemo as nemo_config
from experiments.configs import nvsm as nvsm_config
from nvsm_jax import training
from nvsm_jax.baselines.settings import ClassifierConfig
from nvsm_jax.errors import ConfigError
from nvsm_jax.nemo.settings import FAST, NemoConfig
from nvsm_jax.nvsm.settings import FewShotConfig
from nvsm_jax.settings import OptimConfig, flatten, unflatten, upgrade_record


def test_the_nemo_config_file_is_nemo_config_written_out():
    assert NemoConfig.from_config(nemo_config.get_config()) == NemoConfig()
    assert NemoConfig().solver == FAST and NemoConfig().solver.steps == 60
    tiny = NemoConfig.from_config(nemo_config.get_config("tiny"))
    assert (tiny.model.backbone, tiny.num_steps, tiny.solver.steps) == ("tiny", 4, 5)
    # typed placeholders: a None field still takes a value from the command line
    c = nemo_config.get_config()
    c.num_labelled, c.optim.grad_clip, c.model.encoder_norm = 7, 1.0, "batch"
    with pytest.raises(TypeError):
        c.num_labelled = "seven"


def test_an_unknown_key_is_refused_with_its_dotted_path():
    c = nvsm_config.get_config("tiny")
    c.cls.optim.lrr = 1e-3
    with pytest.raises(ConfigError, match=r"unknown config keys cls\.optim\.lrr \(OptimConfig\); "
                                          r"known: lr, weight_decay"):
        FewShotConfig.from_config(c)
    with pytest.raises(ValueError, match=r"unknown config keys warmup "):     # a ValueError too
        OptimConfig.from_config({"lr": 1e-3, "warmup": 5})


def test_a_few_shot_config_gives_the_hashable_nemo_settings_of_its_rows():
    fs = FewShotConfig.from_config(nvsm_config.get_config("tiny"))
    nemo = NemoConfig.of(fs)
    assert type(nemo) is NemoConfig
    assert hash(nemo) == hash(NemoConfig.of(nvsm_config.get_config("tiny")))
    assert (nemo.model.backbone, nemo.augment.hue, nemo.num_labelled) == ("tiny", 1.0, 7)
    hash(fs)                                  # the generator's settings (a dict) are not hashed


def test_an_augment_block_set_to_none_means_no_augmentation():
    from nvsm_jax.data import pipeline
    from nvsm_jax.nemo import config_checks

    c = nemo_config.get_config("tiny")
    c.augment = None
    config_checks.check_nemo_config(c)
    assert NemoConfig.of(c).augment is None and pipeline.augment_from_config(None) is None


def _old_nvsm_record():
    """The demo's record as the version before the typed blocks wrote it."""
    flat = flatten(json.loads(nvsm_config.get_config("demo").to_json()))
    flat["loss.anchors_per_image"] = flat.pop("loss.vertices_per_image")
    del flat["solver.cull_backfaces"]
    for key in list(flat):
        if key.startswith("cls."):
            block, _, name = key[4:].rpartition(".")
            if block in ("model", "optim", "augment"):
                value = flat.pop(key)
                if not (block == "optim" and name in ("b1", "b2", "schedule", "decoupled")
                        or block == "model" and name in ("stride", "feature_dim")):
                    flat["cls." + name] = value
    return unflatten(flat)


def test_a_record_of_the_version_before_reads_as_todays():
    old = _old_nvsm_record()
    assert "backbone" in old["cls"] and "anchors_per_image" in old["loss"]
    new = json.loads(nvsm_config.get_config("demo").to_json())
    assert training.config_differences(old, new) == []          # it resumes
    changed = dict(old, loss=dict(old["loss"], anchors_per_image=64))
    assert training.config_differences(changed, new) == ["loss.vertices_per_image: 64 -> 128"]
    assert NemoConfig.of(changed, recorded=True).loss.vertices_per_image == 64
    cls = ClassifierConfig.from_dict(old["cls"])
    assert cls == ClassifierConfig.from_config(nvsm_config.get_config("demo").cls)
    assert (cls.model.backbone, cls.augment.hue) == ("efficientnet_lite0", 1.0)
    mcss_old = json.loads(mcss_config.get_config("tiny").to_json())
    mcss_old["train"]["optim"] = {"lr": 2e-3, "warmup": 1, "weight_decay": 1e-4,
                                  "grad_clip": 1.0, "final_lr_fraction": 0.05}
    del mcss_old["train"]["model"]["adapter_layers"]
    assert training.config_differences(
        mcss_old, json.loads(mcss_config.get_config("tiny").to_json())) == []
    assert upgrade_record({"a.b": 1}) == {"a.b": 1}


def test_lazy_package_exports():
    import nvsm_jax.data as data

    assert "PoseSet" in dir(data) and data.PoseSet.__name__ == "PoseSet"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        data.nothing


def test_the_values_the_same_numbers_rest_on():
    """The optimisers the runs of earlier tables used, now dataclass defaults (a change
    of a shared default would change them without this test)."""
    from nvsm_jax.mcss.settings import MCSSTrainConfig

    nemo = OptimConfig(lr=1e-3, weight_decay=1e-4, b1=0.9, b2=0.999, schedule="cosine",
                       warmup_steps=100, final_lr_fraction=0.05, grad_clip=None, decoupled=False)
    assert NemoConfig().optim == nemo and ClassifierConfig().optim == nemo
    assert MCSSTrainConfig().optim == nemo.replace(lr=2e-3, warmup_steps=50, grad_clip=1.0)
    assert (NemoConfig().loss.vertices_per_image, NemoConfig().loss.temperature) == (128, 0.07)


def test_unknown_keys_are_reported_beside_bad_values_and_a_block_is_not_none():
    from nvsm_jax.mcss import config_checks as mcss_checks

    c = mcss_config.get_config("tiny")
    c.train.steps, c.train.model.bogus = -1, 1
    with pytest.raises(ConfigError) as info:
        mcss_checks.check_mcss_config(c)
    assert "train.steps=-1" in str(info.value)
    assert "unknown config keys train.model.bogus (MCSSModelConfig)" in str(info.value)
    c = nemo_config.get_config("tiny")
    c.optim = None
    with pytest.raises(ConfigError, match=r"optim=None \(expected a block of OptimConfig's"):
        NemoConfig.of(c)
