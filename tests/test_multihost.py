"""Multi-process runs: 2 jax processes x 4 CPU devices (``experiments.launch``, gloo)
against 1 process x 8 devices.

Two launches of this file as a script (``python tests/test_multihost.py TASK ROOT WORK
OUT`` under :func:`experiments.launch.launch`):
``kill`` trains NeMo and SIGKILLs both processes right after their first
checkpoint; ``resume`` resumes that run to the end, trains the same run
uninterrupted in another workdir, runs one NVSM E-step, two MCSS steps with their
predictions and the pose classifier's predictions. Each
process saves what it computed, and how many images it read, to ``OUT/TASK_p<i>.npz``;
the test compares them with the same calls made here on one process.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest

from nvsm_jax import parallel, training
from nvsm_jax.data.testing import write_tiny_root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2


# ---- the computations, shared by the processes and the one-process reference

def _nemo_config():
    from experiments.configs import nemo as nemo_config

    c = nemo_config.get_config("tiny")
    c.num_steps, c.checkpoint_every, c.batch_size = 4, 2, 8
    c.loss.vertices_per_image = 64
    c.augment.hue, c.augment.grayscale_prob = 0.5, 0.3   # row-wise draws must line up
    return c


def _nemo(workdir, data_root, **kw):
    """NeMo on the lazily read root -> ({"params_<i>", "aux_<i>": leaves}, images read)."""
    import jax
    from nvsm_jax.nemo import train
    from nvsm_jax.data import load_model_mesh, load_pose_set

    data = load_pose_set(data_root, "car", lazy_images=True)
    state = train.train_and_evaluate(_nemo_config(), workdir, train_set=data,
                                     object_mesh=load_model_mesh(data_root, "car"),
                                     progress=False, **kw)
    leaves = {f"{name}_{i}": np.asarray(x) for name, tree in (("params", state.params),
                                                             ("aux", state.aux))
              for i, x in enumerate(jax.tree_util.tree_leaves(tree))}
    return leaves, sum(data.images.reads.values())


def _estep(data_root, mesh):
    """One NVSM E-step of the initial model: score table, pseudo-labels, pool reads."""
    from experiments.configs import nvsm as nvsm_config
    from nvsm_jax.nemo import features as feat
    from nvsm_jax.nemo import pose_solver, train
    from nvsm_jax.nvsm import pseudo_labels, estep
    from nvsm_jax.data import fewshot, load_model_mesh, load_pose_set

    cfg = _nemo_config()            # the NeMo run's model: its initialiser is compiled already
    cfg.eval_batch_size = 8
    cfg.estep = nvsm_config.get_config("tiny").estep
    cfg.estep.max_new = 4
    data = load_pose_set(data_root, "car", lazy_images=True)
    object_mesh = load_model_mesh(data_root, "car")
    split = fewshot.split_from_config(data, 7, cfg)
    labelled, unlabelled = split.labelled, split.unlabelled
    model = train.build_model(cfg.model)
    state = train.init_state(cfg, model, len(object_mesh.verts), data.image_size, mesh)
    fn = train.feature_fn(train.nemo_model(cfg, model, state, object_mesh))
    maps, rows = estep.pool_features(fn, unlabelled.images, cfg.eval_batch_size, mesh)
    pool_reads = sorted(p for p in data.images.read_paths if p in set(unlabelled.images.paths))
    candidates = np.ones(len(unlabelled), bool)
    candidates[[1, 5]] = False
    pool = estep.Pool(maps, unlabelled.focal, unlabelled.principal, candidates, rows)
    est = estep.EStepConfig.from_config(cfg.estep)
    sources = estep.round_sources(cfg, fn, labelled, unlabelled, pool,
                               pseudo_labels.PseudoLabels.empty(), mesh)
    solver = estep.SolverInputs(state.aux.vertex, feat.clutter_prototype(state.aux.clutter),
                             pose_solver.SolverConfig.from_config(cfg.solver))
    kw = dict(object_mesh=object_mesh, stride=cfg.model.stride, mesh=mesh, solver=solver)
    table = estep.score_views(est, sources, pool, **kw)
    new = estep.e_step(est, sources, pool, round_index=1, **kw).new
    own = np.asarray(unlabelled.images.paths)[rows]
    return {"scores": table.scores, "view_poses": table.view_poses, "index": new.index,
            "poses": new.poses, "score": new.score, "all_maps": pool.maps_at(
                np.arange(len(unlabelled)), mesh), "pool_reads": np.asarray(pool_reads),
            "own_rows": own}


def _fake_mcss_set(**kw):
    from nvsm_jax.mcss.testing import fake_train_set
    return fake_train_set(**kw)


def _mcss(mesh):
    """Two MCSS steps (pose + multi-view loss) on the mesh, each process gathering only
    its rows of the batch -> the second step's losses, and the predictions (embedding,
    joints) of 12 frames, gathered from every process."""
    import jax
    from experiments.configs import mcss as mcss_config
    from nvsm_jax import parallel, training
    from nvsm_jax.mcss import train as mtrain

    cfg = mcss_config.get_config("tiny").train
    ts = _fake_mcss_set()
    model, state = mtrain.init_state(cfg, mesh, (32, 32), seed=0)
    step = mtrain.make_train_step(model, cfg, use_multiview=True)
    batch = parallel.shard_batch(mtrain._batch_for_step(ts, cfg, 0, True, 0, mesh=mesh),
                                 mesh, process_local=True)
    for s in range(2):
        state, out = step(state, batch, training.step_key(0, s))
    emb, joints = mtrain.predict(model, state, ts.images[:12], mesh, batch_size=8)
    return {**{k: float(v) for k, v in jax.device_get(out).items()},
            "pred_emb": emb, "pred_joints": joints}


def _classifier(root, mesh):
    """The pose classifier's predictions (untrained, tiny) for 12 images, each process
    computing its rows of every chunk -> poses [12, 4], on every process."""
    from nvsm_jax.baselines import classifier
    from nvsm_jax.data import load_pose_set

    cfg = classifier.classifier_config("tiny")
    images = load_pose_set(root, "car").images[:12]
    state = classifier.init_classifier_state(cfg, images.shape[1:3], mesh)
    return {"poses": classifier.predict_classifier(state, images, 8, config=cfg)}


# ---- the processes

def _kill_after_first_checkpoint():
    """Every process SIGKILLs itself once the first checkpoint is on disk."""
    real = training.Checkpointer.maybe_save

    def maybe_save(self, step, state, force=False):
        saved = real(self, step, state, force)
        if saved:
            self.wait()
            parallel.sync("checkpoint written")
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    training.Checkpointer.maybe_save = maybe_save


def _process_main(task, root, work, out):
    parallel.initialize()
    import jax

    assert jax.process_count() == NUM_PROCESSES and jax.local_device_count() == 4
    pid = jax.process_index()
    mesh = parallel.make_mesh()
    res = {}
    if task == "kill":
        _kill_after_first_checkpoint()
        _nemo(os.path.join(work, "killed"), root)
        raise SystemExit("not killed")
    t = time.time()
    resumed, res["reads_resume"] = _nemo(os.path.join(work, "killed"), root)
    print(f"resume {time.time() - t:.1f} s", flush=True)
    full, res["reads_full"] = _nemo(os.path.join(work, "full"), root)
    print(f"full {time.time() - t:.1f} s", flush=True)
    res.update({f"resumed_{k}": v for k, v in resumed.items()})
    res.update({f"full_{k}": v for k, v in full.items()})
    res.update({f"estep_{k}": v for k, v in _estep(root, mesh).items()})
    print(f"estep {time.time() - t:.1f} s", flush=True)
    res.update({f"mcss_{k}": v for k, v in _mcss(mesh).items()})
    print(f"mcss {time.time() - t:.1f} s", flush=True)
    res.update({f"cls_{k}": v for k, v in _classifier(root, mesh).items()})
    np.savez(os.path.join(out, f"{task}_p{pid}.npz"), **res)


# ---- the tests


def _assert_close(a, b, atol, adam_lr=None, steps=0):
    """As ``tests/test_training.py``: leaves within ``atol``; with ``adam_lr``, < 1% of
    the weights (Adam sign flips of ~0 gradients) may differ up to ``2 * lr * steps``."""
    assert len(a) == len(b)
    for k in a:
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        if adam_lr is None:
            np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=k)
            continue
        diff = np.abs(x - y)
        assert diff.max(initial=0.0) <= 2 * adam_lr * steps, (k, diff.max())
        assert np.mean(diff > atol) <= 0.01, (k, np.mean(diff > atol))


def _launch(task, root, work, out, timeout=300):
    from experiments.launch import launch

    env = {"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    codes = launch(["python", os.path.abspath(__file__), task, root, work, out],
                   NUM_PROCESSES, devices_per_process=4, env=env, timeout=timeout,
                   cwd=REPO, log_dir=os.path.join(out, f"logs_{task}"))
    logs = "".join(open(os.path.join(out, f"logs_{task}", f"process_{i}.log")).read()[-3000:]
                   for i in range(NUM_PROCESSES))
    return codes, logs


def _part(d, prefix):
    return {k[len(prefix):]: d[k] for k in d.files if k.startswith(prefix)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two 2-process launches (each process: 4 forced CPU devices)."""
    tmp = tmp_path_factory.mktemp("multihost")
    root = str(tmp / "data")
    write_tiny_root(root, "car", num=20, size=(32, 32), seed=0)
    work, out = str(tmp / "work"), str(tmp / "out")
    os.makedirs(out)
    # killed right after its first checkpoint (step 2 of 4)
    kill_codes, kill_logs = _launch("kill", root, work, out)
    killed = os.path.join(work, "killed")
    ckpt = training.Checkpointer(os.path.join(killed, "checkpoints"))
    after_kill = {"latest": ckpt.latest_step(),
                  "steps": [r["step"] for r in training.MetricsWriter(killed).read()]}
    ckpt.close()
    # resumed; the same run uninterrupted; one E-step; two MCSS steps
    codes, logs = _launch("resume", root, work, out)
    assert codes == [0] * NUM_PROCESSES, (codes, logs)
    procs = [np.load(os.path.join(out, f"resume_p{i}.npz")) for i in range(NUM_PROCESSES)]
    return {"root": root, "work": work, "kill_codes": kill_codes, "kill_logs": kill_logs,
            "after_kill": after_kill, "procs": procs, "tmp": tmp}


@pytest.fixture(scope="module")
def nemo_reference(runs):
    """The same NeMo run on one process with 8 devices: (leaves, loss curve)."""
    workdir = runs["tmp"] / "reference"
    leaves, _ = _nemo(str(workdir), runs["root"])
    return leaves, [r["loss"] for r in training.MetricsWriter(workdir).read()]


def test_launcher_environment(monkeypatch):
    from experiments import launch

    base = {"XLA_FLAGS": "--xla_backend_optimization_level=0 "
                         "--xla_force_host_platform_device_count=8", "PATH": "/bin"}
    env = launch.process_env(1, 2, "127.0.0.1:1234", base=base)
    assert (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) \
        == ("127.0.0.1:1234", "2", "1")
    assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"
    assert env["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=0",
                                        "--xla_force_host_platform_device_count=4"]
    assert "device_count=3" in launch.process_env(0, 2, "a:1", devices_per_process=3,
                                                  base={})["XLA_FLAGS"]
    # one process: initialize() is a no-op; a half-given pair of variables is refused
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    parallel.initialize()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    parallel.initialize()                                   # one process: nothing to start
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        parallel.initialize()


def test_batch_rows_read_only_their_images(tmp_path):
    """A process's rows of a batch equal those rows of the whole batch (augmentation
    included) and read only their image files."""
    from nvsm_jax.data import load_pose_set, pipeline

    write_tiny_root(str(tmp_path), "car", num=10, size=(16, 16), seed=3)
    eager = load_pose_set(str(tmp_path), "car")
    lazy = load_pose_set(str(tmp_path), "car", lazy_images=True)
    assert not lazy.images.reads and len(lazy.subset([4, 2]).images) == 2
    np.testing.assert_array_equal(np.asarray(lazy.images), eager.images)
    lazy.images.reads.clear()
    aug = pipeline.Augment(flip_prob=0.5, jitter=0.3, hue=0.5, grayscale_prob=0.3)
    whole = pipeline.BatchIterator(eager, 8, seed=1, augment=aug)
    part = pipeline.BatchIterator(lazy, 8, seed=1, augment=aug)
    for step in range(3):
        full = whole.batch(step)
        for rows in (slice(0, 4), slice(4, 8)):
            got = part.batch(step, rows)
            assert set(got) == set(full)
            for k in full:
                np.testing.assert_array_equal(got[k], full[k][rows], err_msg=k)
    assert sum(lazy.images.reads.values()) == 3 * 8      # each row read once, by its owner


def test_nemo_two_processes_match_one(runs, nemo_reference, eight_devices):
    """2 processes x 4 devices: the loss curve and parameters of 1 process x 8."""
    ref, ref_curve = nemo_reference
    full = _part(runs["procs"][0], "full_")
    assert set(full) == set(ref)
    pick = lambda d, name: {k: v for k, v in d.items() if k.startswith(name)}  # noqa: E731
    # the tolerance of tests/test_training.py's 1-vs-8-device check
    _assert_close(pick(full, "aux"), pick(ref, "aux"), atol=2e-4)     # the memory banks
    _assert_close(pick(full, "params"), pick(ref, "params"), atol=2e-4,
                  adam_lr=_nemo_config().optim.lr, steps=4)
    curve = [r["loss"] for r in training.MetricsWriter(os.path.join(runs["work"], "full")).read()]
    assert len(curve) == 4           # written once, by process 0
    np.testing.assert_allclose(curve, ref_curve, rtol=1e-3, atol=1e-4)
    # both processes hold the same replicated state
    _assert_close(full, _part(runs["procs"][1], "full_"), atol=0)


def test_killed_two_process_run_resumes_exactly(runs):
    # each process SIGKILLs itself; the launcher may stop a slower one first (SIGTERM)
    codes = runs["kill_codes"]
    assert -signal.SIGKILL in codes and set(codes) <= {-signal.SIGKILL, -signal.SIGTERM}, \
        (codes, runs["kill_logs"])
    assert runs["after_kill"] == {"latest": 2, "steps": [1, 2]}
    killed = os.path.join(runs["work"], "killed")
    assert [r["step"] for r in training.MetricsWriter(killed).read()] == [1, 2, 3, 4]
    for p in runs["procs"]:
        _assert_close(_part(p, "resumed_"), _part(p, "full_"), atol=1e-6)


def test_each_process_reads_only_its_rows(runs):
    """Every batch: 4 of the 8 rows per process; the E-step pool (13 images, padded to
    16 over 8 devices): rows 0-7 on process 0, 8-12 on process 1, nothing else."""
    procs = runs["procs"]
    for p in procs:
        assert int(p["reads_full"]) == 4 * 4 and int(p["reads_resume"]) == 2 * 4
    ests = [_part(p, "estep_") for p in procs]
    assert [len(e["own_rows"]) for e in ests] == [8, 5]
    assert not set(ests[0]["own_rows"]) & set(ests[1]["own_rows"])
    for e in ests:
        np.testing.assert_array_equal(e["pool_reads"], np.sort(e["own_rows"]))


def test_estep_two_processes_match_one(runs, eight_devices):
    """One NVSM E-step: the score table and pseudo-labels of one process, on both."""
    ref = _estep(runs["root"], parallel.make_mesh(8))
    assert len(ref["own_rows"]) == 13
    ests = [_part(p, "estep_") for p in runs["procs"]]
    for e in ests:
        np.testing.assert_allclose(e["all_maps"], ref["all_maps"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(e["scores"], ref["scores"], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(e["view_poses"], ref["view_poses"])
        np.testing.assert_array_equal(e["index"], ref["index"])
        np.testing.assert_allclose(e["poses"], ref["poses"], atol=1e-6)
        assert len(e["index"]) == 4 and not set(e["index"]) & {1, 5}
    for k in ("scores", "index", "poses", "score"):       # identical on every process
        np.testing.assert_array_equal(ests[0][k], ests[1][k], err_msg=k)


def test_mcss_two_processes_match_one(runs, eight_devices):
    ref = _mcss(parallel.make_mesh(8))
    assert ref["loss_mv"] > 0 and ref["loss_pose"] > 0
    for p in runs["procs"]:
        got = _part(p, "mcss_")
        assert set(got) == set(ref)
        for k, v in ref.items():
            if k.startswith("pred_"):       # gathered from both processes: every frame
                assert got[k].shape == v.shape, k
                np.testing.assert_allclose(got[k], v, rtol=2e-3, atol=1e-3 * np.abs(v).max(),
                                           err_msg=k)
            else:
                assert float(got[k]) == pytest.approx(v, rel=2e-3, abs=1e-5), k


def test_classifier_predictions_two_processes_match_one(runs, eight_devices):
    """The few-shot experiment's first method on two processes: each computes its rows
    of every chunk and the poses are gathered (a plain read of the sharded output
    fails there)."""
    ref = _classifier(runs["root"], parallel.make_mesh(8))["poses"]
    for p in runs["procs"]:
        np.testing.assert_array_equal(p["cls_poses"], ref)


if __name__ == "__main__":      # one process of a launch: TASK ROOT WORK OUT
    _process_main(*sys.argv[1:5])
