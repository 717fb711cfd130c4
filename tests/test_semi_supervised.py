"""NVSM EM rounds end to end on tiny data (8 forced CPU devices), and resume after a kill."""

import jax
import numpy as np
import pytest

from experiments.configs import nvsm as nvsm_config
from nvsm_jax import semi_supervised
from nvsm_jax.data import fewshot, load_model_mesh, load_pose_set
from nvsm_jax.data.testing import write_tiny_root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nvsm_data"))
    write_tiny_root(root, "car", num=20, size=(32, 32), seed=0)
    test_root = str(tmp_path_factory.mktemp("nvsm_test"))
    write_tiny_root(test_root, "car", num=4, size=(32, 32), seed=1)
    return (load_pose_set(root, "car"), load_model_mesh(root, "car"),
            {"L0": load_pose_set(test_root, "car")})


def _config():
    c = nvsm_config.get_config("tiny")
    c.num_labelled = 7
    c.eval_every_round = False
    c.estep.agree_angle = 0.0    # the solver-agreement path runs in tests/test_experiment.py
    return c


def _run(tiny_data, workdir, **kw):
    train_set, mesh, tests = tiny_data
    return semi_supervised.run_nvsm(_config(), workdir, train_set=train_set, model_mesh=mesh,
                                    test_sets=tests, num_devices=8, progress=False, **kw)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """An uninterrupted run on 8 devices."""
    return _run(tiny_data, tmp_path_factory.mktemp("nvsm_reference"))


def test_tiny_em_rounds_on_8_devices(tiny_data, reference):
    assert len(jax.devices()) == 8
    train_set, _, _ = tiny_data
    c = _config()
    out = reference
    rounds = out["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    pl = out["pseudo_labels"]
    assert len(pl) == 2 * c.estep.max_new                 # threshold off: the cap binds
    assert set(pl.round.tolist()) == {1, 2}
    assert len(np.unique(pl.index)) == len(pl)            # an image is labelled once
    # sources of round 1 are labelled images; round 2 may use round-1 pseudo-labels
    assert np.all(pl.source_is_labelled[pl.round == 1])
    assert np.all(pl.source[pl.source_is_labelled] < c.num_labelled)
    assert all(np.isfinite(r["coverage"]) for r in rounds)
    assert rounds[-1]["num_pseudo"] == len(pl)
    assert np.isfinite(out["test"]["L0"]["med_err_deg"])
    # the pseudo-labelled images never carry their hidden pose into the training set
    split = fewshot.make_fewshot_split(train_set, 7, seed=c.seed)
    data = semi_supervised.training_set(split.labelled, split.unlabelled, pl)
    np.testing.assert_allclose(data.poses[-len(pl):], pl.poses)


def test_resume_after_kill_gives_the_same_result(tiny_data, reference, tmp_path):
    full = reference
    part = _run(tiny_data, tmp_path / "killed", stop_after_rounds=2)
    assert [r["round"] for r in part["rounds"]] == [0, 1]
    assert semi_supervised.load_progress(tmp_path / "killed") == {"round": 1, "step": 4}
    resumed = _run(tiny_data, tmp_path / "killed")
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2]
    np.testing.assert_array_equal(resumed["pseudo_labels"].index, full["pseudo_labels"].index)
    np.testing.assert_allclose(resumed["pseudo_labels"].poses, full["pseudo_labels"].poses)
    leaves_a = jax.tree_util.tree_leaves(full["state"].params)
    leaves_b = jax.tree_util.tree_leaves(resumed["state"].params)
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_e_step_rejects_empty_sources(tiny_data):
    _, mesh, _ = tiny_data
    with pytest.raises(ValueError, match="no sources"):
        semi_supervised.e_step(_config().estep, source_maps=np.zeros((0, 8, 8, 4)),
                               source_poses=np.zeros((0, 4)), source_focal=np.zeros(0),
                               source_principal=np.zeros((0, 2)), source_ids=np.zeros(0, int),
                               source_is_labelled=np.zeros(0, bool),
                               pool_maps=np.zeros((3, 8, 8, 4)), candidates=np.ones(3, bool),
                               model_mesh=mesh, stride=4, round_index=1, mesh_axes=None)

