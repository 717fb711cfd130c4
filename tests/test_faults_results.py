"""Results that match their inputs (issue 30): roots given alone are refused,
``config.json`` is written only after the config and the data are good (and a run
that failed before any work never blocks its corrected rerun), finished cells
record their data and are evaluated again when the test set changes, and
``evaluate`` names the checkpoint of a killed run and refuses a diverged one.

The few-shot runs here replace the classifier's training by a stub
(``experiment._run_cls``): only the experiment's bookkeeping is under test.
"""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from experiments.configs import nemo as nemo_config
from experiments.configs import nvsm as nvsm_config
from nvsm_jax import errors, parallel, results
from nvsm_jax.nvsm import experiment, rounds
from nvsm_jax.nemo import pose_solver
from nvsm_jax.nemo import evaluate as nemo_evaluate
from nvsm_jax.nemo import train
from nvsm_jax import training
from nvsm_jax.data import DataError, load_model_mesh
from nvsm_jax.data.testing import write_tiny_root

SIZE = (32, 32)


@pytest.fixture
def roots(tmp_path):
    """A training root (12 images) and two test roots (4 and 6 other images)."""
    write_tiny_root(tmp_path / "train", num=12, size=SIZE)
    write_tiny_root(tmp_path / "testset_a", num=4, size=SIZE, seed=1)
    write_tiny_root(tmp_path / "testset_b", num=6, size=SIZE, seed=2)
    return tmp_path


def _config(roots, **overrides):
    c = nvsm_config.get_config("tiny")
    c.methods = ("cls_baseline",)
    c.eval_occlusions = ("L0",)
    c.data_root = str(roots / "train")
    c.test_root = str(roots / "testset_a")
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


@pytest.fixture
def fake_cls(monkeypatch):
    """``experiment._run_cls`` without training: error 0.1 rad on every image, checkpoint
    step 5; returns the list of (test root, {level: images}) it evaluated."""
    calls = []

    def run(config, cell, labelled, test_sets):
        calls.append((config.test_root, {occ: len(t) for occ, t in test_sets.items()}))
        os.makedirs(cell, exist_ok=True)
        return {occ: {"errors": np.full(len(t), 0.1)} for occ, t in test_sets.items()}, 5

    monkeypatch.setattr(experiment, "_run_cls", run)
    return calls


# ------------------------------------------------------------------ roots and config.json

@pytest.mark.parametrize("given", ["data_root", "test_root"])
def test_a_root_given_alone_is_refused_before_anything_is_written(roots, given):
    c = _config(roots)
    setattr(c, "test_root" if given == "data_root" else "data_root", "")
    work = roots / "w"
    with pytest.raises(errors.ConfigError, match=rf"config\.{given}='.*' is given but "
                                                 r"config\.\w+ is empty: give both roots"):
        experiment.train_and_evaluate(c, work)
    assert not (work / "config.json").exists() and not (work / "data").exists()


def test_a_missing_root_or_subset_is_named_and_leaves_no_config(roots):
    work = roots / "w"
    with pytest.raises(errors.ConfigError, match=r"config\.test_root='.*nowhere': no such folder"):
        experiment.train_and_evaluate(_config(roots, test_root=str(roots / "nowhere")), work)
    (roots / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/lists/car: no list files"):
        experiment.train_and_evaluate(_config(roots, test_root=str(roots / "empty")), work)
    c = _config(roots, data_root="", test_root="")
    c.data.generate = False
    with pytest.raises(errors.ConfigError, match=r"empty and config\.data\.generate is False"):
        experiment.train_and_evaluate(c, work)
    assert not (work / "config.json").exists()
    # NeMo and NVSM alone: the data is loaded before the record is written
    nemo = nemo_config.get_config("tiny")
    nemo.data_root = str(roots / "empty")
    with pytest.raises(DataError, match=r"empty/lists/car"):
        train.train_and_evaluate(nemo, roots / "nemo")
    nvsm = _config(roots, test_root=str(roots / "empty"))
    nvsm.category = "car"
    with pytest.raises(DataError, match=r"empty/lists/car"):
        rounds.run_nvsm(nvsm, roots / "nvsm")
    for run in ("nemo", "nvsm"):
        assert not (roots / run / "config.json").exists(), run


def test_generated_data_of_other_settings_is_refused(tmp_path):
    c = nvsm_config.get_config("tiny")
    c.eval_occlusions = ("L0",)
    stats = tmp_path / "data" / "test" / "dataset.json"
    stats.parent.mkdir(parents=True)
    stats.write_text(json.dumps({"config": experiment._synth_config(c).to_json()}))
    data = str(tmp_path / "data")
    assert experiment.ensure_data(c, tmp_path) == (os.path.join(data, "train"),
                                                   os.path.join(data, "test"))
    c.data.num_test = 8
    with pytest.raises(errors.ConfigError, match=r"data was generated with other settings "
                                                 r"\(num_test: 4 -> 8\); delete that folder"):
        experiment.ensure_data(c, tmp_path)
    c.data.num_test = 4
    c.eval_occlusions = ("L0", "L1")
    with pytest.raises(errors.ConfigError, match=r"test_levels: \['L0'\] lacks \['L1'\]"):
        experiment.ensure_data(c, tmp_path)


def test_holds_work_counts_checkpoints_and_finished_results_only(tmp_path):
    work = tmp_path / "w"
    (work / "checkpoints").mkdir(parents=True)                 # created, nothing saved
    (work / "config.json").write_text("{}")
    (work / "metrics.jsonl").write_text("")
    (work / "data" / "test").mkdir(parents=True)               # generated data
    (work / "data" / "test" / "results.json").write_text("{}")
    (work / "replaced-20240101T000000Z" / "checkpoints" / "4").mkdir(parents=True)
    assert not train.holds_work(work)
    (work / "nemo_car_7" / "checkpoints" / "2").mkdir(parents=True)
    assert train.holds_work(work)
    shutil.rmtree(work / "nemo_car_7")
    (work / "cls_baseline_car_7").mkdir()
    (work / "cls_baseline_car_7" / "rows.json").write_text("[]")
    assert train.holds_work(work)


def test_a_run_that_failed_before_any_work_accepts_a_changed_config(roots, fake_cls,
                                                                     monkeypatch, caplog):
    work = roots / "w"
    c = _config(roots)
    fake = experiment._run_cls

    def broken(*args):
        raise RuntimeError("the classifier failed")

    monkeypatch.setattr(experiment, "_run_cls", broken)
    with pytest.raises(RuntimeError, match="classifier failed"):
        experiment.train_and_evaluate(c, work)
    assert (work / "config.json").exists() and not train.holds_work(work)
    c.cls.num_steps = 3                                        # the corrected config
    monkeypatch.setattr(experiment, "_run_cls", fake)
    with caplog.at_level(logging.WARNING, logger="nvsm_jax.training"):
        experiment.train_and_evaluate(c, work)
    assert "config changed (" in caplog.text and "cls.num_steps: 2 -> 3" in caplog.text
    assert any(p.name.startswith("replaced-") for p in work.iterdir())   # nothing deleted
    assert json.load(open(work / "config.json"))["cls"]["num_steps"] == 3
    c.cls.num_steps = 4                     # now a cell finished: a change is refused again
    with pytest.raises(training.ConfigMismatchError, match=r"cls\.num_steps: 3 -> 4"):
        experiment.train_and_evaluate(c, work)


# ------------------------------------------------------------------ results match their inputs

def test_a_finished_cell_records_its_data_and_is_evaluated_again_on_another_test_set(
        roots, fake_cls, caplog):
    work = roots / "w"
    c = _config(roots, results_dir=str(roots / "tracked"))
    experiment.train_and_evaluate(c, work)
    cell = work / "cls_baseline_car_7"
    inputs = json.load(open(cell / "rows.json"))["inputs"]
    assert inputs["train_root"] == str(roots / "train")
    assert inputs["test_root"] == str(roots / "testset_a")
    assert inputs["train"]["L0"]["count"] == 12 and inputs["test"]["L0"]["count"] == 4
    assert inputs["checkpoint_step"] == 5
    assert results.load_cells(c.results_dir)[0]["inputs"] == inputs
    experiment.train_and_evaluate(c, work)                     # the same data: not again
    assert len(fake_cls) == 1

    c.test_root = str(roots / "testset_b")                     # may change on a rerun
    with caplog.at_level(logging.WARNING, logger="nvsm_jax.nvsm.experiment"):
        report = experiment.train_and_evaluate(c, work)
    assert fake_cls[-1] == (str(roots / "testset_b"), {"L0": 6})
    assert f"evaluated on {roots / 'testset_a'} (L0: 4 images" in caplog.text
    assert f"the test set is now {roots / 'testset_b'} (L0: 6 images" in caplog.text
    saved = json.load(open(work / "results.json"))
    assert {r["num_images"] for r in saved["rows"]} == {6}
    assert saved["data"]["car"]["test_root"] == str(roots / "testset_b")
    assert str(roots / "testset_b") in report and str(roots / "testset_a") not in report
    assert json.load(open(cell / "rows.json"))["inputs"]["test_root"] == str(roots / "testset_b")
    assert results.load_cells(c.results_dir)[0]["inputs"]["test"]["L0"]["count"] == 6

    write_tiny_root(roots / "testset_b", num=7, size=SIZE, seed=2)   # changed on disk
    experiment.train_and_evaluate(c, work)
    assert fake_cls[-1] == (str(roots / "testset_b"), {"L0": 7})
    c.eval_limit = 3                                           # another subset
    experiment.train_and_evaluate(c, work)
    assert fake_cls[-1] == (str(roots / "testset_b"), {"L0": 3})
    assert len(fake_cls) == 4


def test_an_old_cell_record_without_data_is_evaluated_again(roots, fake_cls, caplog):
    work = roots / "w"
    c = _config(roots)
    experiment.train_and_evaluate(c, work)
    path = work / "cls_baseline_car_7" / "rows.json"
    path.write_text(json.dumps(json.load(open(path))["rows"]))     # the old format: rows only
    with caplog.at_level(logging.WARNING, logger="nvsm_jax.nvsm.experiment"):
        experiment.train_and_evaluate(c, work)
    assert "its record names no data" in caplog.text and len(fake_cls) == 2
    assert "inputs" in json.load(open(path))
    path.write_text('{"rows": 3}')
    with pytest.raises(errors.RunStateError, match=r"rows\.json: not a record of the cell"):
        experiment.train_and_evaluate(c, work)


def test_rows_of_a_model_trained_on_other_data_are_refused(roots, fake_cls):
    work = roots / "w"
    c = _config(roots)
    experiment.train_and_evaluate(c, work)
    write_tiny_root(roots / "train", num=12, size=SIZE, seed=5)   # other annotations
    with pytest.raises(errors.RunStateError,
                       match=r"cls_baseline_car_7: trained on .*/train \(L0: 12 images, \w+\), "
                             r"but the training data is now .*/train \(L0: 12 images, \w+\); "
                             r"restore that data, or delete"):
        experiment.train_and_evaluate(c, work)
    assert len(fake_cls) == 1


def test_data_fingerprint_follows_the_files_not_the_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_tiny_root(a, num=5, size=SIZE)
    shutil.copytree(a, b)
    fp = results.data_fingerprint(a, "car")
    assert fp == results.data_fingerprint(b, "car") and fp["count"] == 5
    cut = results.data_fingerprint(a, "car", limit=3)
    assert cut["count"] == 3 and cut["hash"] != fp["hash"]
    write_tiny_root(b, num=5, size=SIZE, seed=1)
    assert results.data_fingerprint(b, "car")["hash"] != fp["hash"]
    os.remove(b / "images" / "car" / "car_0002.png")
    with pytest.raises(DataError, match=r"images/car/car_0002\.\*: image not found"):
        results.data_fingerprint(b, "car")


def test_a_results_folder_never_mixes_test_sets(tmp_path):
    rows = [{"occlusion": "L0", "acc_pi_6": 50.0, "acc_pi_18": 10.0, "med_err_deg": 30.0,
             "num_images": 4}]

    def record(method, seed, digest):
        results.record_cell(tmp_path, method=method, category="car", annotations=7, seed=seed,
                            rows=rows, errors={"L0": np.linspace(0, 1, 4)},
                            config={"seed": seed}, inputs={
                                "test_root": f"/data/{digest}",
                                "test": {"L0": {"count": 4, "hash": digest}}})

    record("nemo", 0, "aaaa")
    record("nemo", 1, "aaaa")
    record("nvsm", 0, "bbbb")
    cells = results.load_cells(tmp_path)
    assert results.aggregate(cells)                             # one test set per method
    assert results.paired_differences(cells) == []              # nvsm and nemo differ
    record("nemo", 2, "bbbb")
    with pytest.raises(ValueError, match=r"were evaluated on other test sets \(/data/aaaa"):
        results.aggregate(results.load_cells(tmp_path))


# ------------------------------------------------------------------ evaluate

def _nemo_workdir(roots):
    """A NeMo workdir whose run stopped at step 2 of 4 (a real checkpoint of the tiny
    model), its config's test root the 4-image test set."""
    c = nemo_config.get_config("tiny")
    c.data_root, c.test_root = str(roots / "train"), str(roots / "testset_a")
    c.eval_occlusions = ("L0",)
    work = str(roots / "nemo")
    object_mesh = load_model_mesh(c.data_root, "car")
    state = train.init_state(c, train.build_model(c.model), len(object_mesh.verts), (64, 64),
                             parallel.make_mesh(1), pretrained=False)
    ckpt = training.Checkpointer(os.path.join(work, "checkpoints"))
    ckpt.save(2, state.replace(step=np.int32(2)))
    ckpt.close()
    training.save_config(c, work)
    return work, state


def _fake_predict(nemo, test, solver_cfg=None, *, batch_size=16, progress=False):
    return pose_solver.SolveResult(test.poses.copy(), np.ones(len(test)), test.poses.copy(),
                                   np.zeros((len(test), 1)))


def test_evaluate_names_the_checkpoint_of_a_killed_run_and_refuses_a_diverged_one(
        roots, monkeypatch, caplog):
    work, state = _nemo_workdir(roots)
    monkeypatch.setattr(nemo_evaluate, "predict", _fake_predict)       # the bookkeeping, not the solver
    monkeypatch.setattr(nemo_evaluate.evaluation, "plot_error_distribution", lambda *a, **k: None)
    with caplog.at_level(logging.WARNING, logger="nvsm_jax.nemo.evaluate"):
        rows = nemo_evaluate.evaluate_workdir(work)
    assert "evaluating checkpoint step 2, before the run's last step 4" in caplog.text
    assert rows[0]["acc_pi_6"] == 100.0
    saved = json.load(open(os.path.join(work, "results.json")))
    assert saved["checkpoint"] == {"step": 2, "final_step": 4, "finished": False}
    assert saved["test_data"]["root"] == str(roots / "testset_a")
    assert saved["test_data"]["levels"]["L0"] == results.data_fingerprint(
        roots / "testset_a", "car")
    assert "checkpoint step 2, before the run's last step 4" in open(
        os.path.join(work, "results.md")).read()

    # a diverged step 3, written past Checkpointer.save's own guard (an older run's file)
    leaves, treedef = jax.tree_util.tree_flatten(jax.device_get(state.params))
    leaves = [np.full_like(x, np.nan) if i == 0 else x for i, x in enumerate(leaves)]
    tree = dict(jax.device_get(state.checkpoint_tree()), step=np.int32(3),
                params=jax.tree_util.tree_unflatten(treedef, leaves))
    ckpt = training.Checkpointer(os.path.join(work, "checkpoints"))
    ckpt.manager.save(3, args=ckpt._ocp.args.StandardSave(tree), force=True)
    ckpt.close()
    with pytest.raises(errors.NonFiniteError, match=r"nemo: the model of checkpoint step 3 "
                                                    r"holds NaN or infinite values \(.*\]\)"):
        nemo_evaluate.evaluate_workdir(work)


def test_evaluate_names_a_missing_or_truncated_config(tmp_path):
    with pytest.raises(errors.RunStateError, match=r"config\.json: not found; is .* the workdir"):
        nemo_evaluate.evaluate_workdir(tmp_path)
    (tmp_path / "config.json").write_text('{"category": "car", "mod')
    with pytest.raises(errors.RunStateError, match=r"config\.json: the run's config is damaged "
                                                   r".*delete it and rerun the training"):
        nemo_evaluate.evaluate_workdir(tmp_path)
