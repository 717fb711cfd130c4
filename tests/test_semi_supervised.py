"""NVSM EM rounds end to end on tiny data (8 forced CPU devices), and resume after a kill."""

import jax
import numpy as np
import pytest

from experiments.configs import nvsm as nvsm_config
from nvsm_jax import semi_supervised, training
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


def _run(tiny_data, workdir, config=None, **kw):
    train_set, mesh, tests = tiny_data
    return semi_supervised.run_nvsm(config or _config(), workdir, train_set=train_set,
                                    model_mesh=mesh, test_sets=tests, num_devices=8,
                                    progress=False, **kw)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """An uninterrupted run on 8 devices."""
    workdir = tmp_path_factory.mktemp("nvsm_reference")
    return {**_run(tiny_data, workdir), "workdir": workdir}


def test_tiny_em_rounds_on_8_devices(tiny_data, reference, eight_devices):
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
    assert rounds[-1]["num_pseudo"] == len(pl)
    # coverage of each round = azimuth x elevation cells hit by anchors + pseudo-labels so far
    labelled = fewshot.split_from_config(train_set, c.num_labelled, c).labelled

    def cells_hit(poses):           # 12 sectors of 30 deg x elevations [-10,5) [5,20) [20,40)
        hit = set()
        for a, e in np.degrees(poses[:, :2]):
            j = next((j for j, (lo, hi) in enumerate([(-10, 5), (5, 20), (20, 40)])
                      if lo <= e < hi), None)
            if j is not None:
                hit.add((int(np.mod(a, 360.0) // 30) % 12, j))
        return len(hit) / 36.0

    for r in rounds:
        so_far = pl.take(pl.round <= r["round"]).poses
        assert r["coverage"] == pytest.approx(
            cells_hit(np.concatenate([labelled.poses, so_far])), abs=1e-9), r["round"]
    assert np.isfinite(out["test"]["L0"]["med_err_deg"])
    # the pseudo-labelled images never carry their hidden pose into the training set
    split = fewshot.make_fewshot_split(train_set, 7, seed=c.seed)
    data = semi_supervised.training_set(split.labelled, split.unlabelled, pl)
    np.testing.assert_allclose(data.poses[-len(pl):], pl.poses)


def test_learning_rate_decays_through_the_last_round(reference):
    """The schedule spans round 0 and every M-step, not the NeMo config's num_steps."""
    c = _config()
    total = c.fewshot_steps + c.num_rounds * c.steps_per_round
    assert total > c.num_steps                            # the case the horizon gets wrong
    logged = [m for m in training.MetricsWriter(reference["workdir"]).read() if "lr" in m]
    assert [m["step"] for m in logged] == list(range(1, total + 1))
    lr = np.array([m["lr"] for m in logged])
    assert lr[1] == pytest.approx(c.optim.lr)            # one warm-up step
    assert np.all(np.diff(lr[1:]) < 0)                    # still decaying in the last round
    assert lr[-1] > c.optim.lr * c.optim.final_lr_fraction


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


def test_reselect_replaces_the_set_from_the_anchors_and_grows_the_cap(tiny_data, tmp_path):
    c = _config()
    c.estep.reselect = True
    out = _run(tiny_data, tmp_path / "reselect", config=c)
    pl, rounds = out["pseudo_labels"], out["rounds"]
    cap = c.estep.max_new
    assert [r["num_pseudo"] for r in rounds] == [0, cap, 2 * cap]      # threshold off
    assert np.all(pl.source_is_labelled)                  # only the anchors synthesise
    assert len(np.unique(pl.index)) == len(pl)
    r1, r2 = rounds[1], rounds[2]
    assert r2["num_pseudo"] == r1["num_pseudo"] + r2["num_new"] - r2["num_dropped"]
    kept = np.isin(pl.index, np.load(tmp_path / "reselect" / "pseudo_labels" / "round_001.npz")["index"])
    assert int((~kept).sum()) == r2["num_new"]


def test_e_step_rejects_empty_sources(tiny_data):
    _, mesh, _ = tiny_data
    with pytest.raises(ValueError, match="no sources"):
        semi_supervised.e_step(_config().estep, source_maps=np.zeros((0, 8, 8, 4)),
                               source_poses=np.zeros((0, 4)), source_focal=np.zeros(0),
                               source_principal=np.zeros((0, 2)), source_ids=np.zeros(0, int),
                               source_is_labelled=np.zeros(0, bool),
                               pool_maps=np.zeros((3, 8, 8, 4)), candidates=np.ones(3, bool),
                               model_mesh=mesh, stride=4, round_index=1, mesh_axes=None)



def test_novel_views_only_moves_a_look_alike_off_the_pseudo_source_pose(tiny_data):
    """A pool image whose feature map is a pseudo-labelled source's own map is
    matched at that source's pose; with ``novel_views_only`` that view is gone
    and the image lands at another pose."""
    from nvsm_jax import geometry, parallel

    train_set, mesh, _ = tiny_data
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 8, 8, 16)).astype(np.float32)
    pool = np.concatenate([maps[1:], rng.normal(size=(3, 8, 8, 16)).astype(np.float32)])
    kw = dict(source_maps=maps, source_poses=train_set.poses[:2], source_focal=train_set.focal[:2],
              source_principal=train_set.principal[:2], source_ids=np.array([0, 100]),
              source_is_labelled=np.array([True, False]), pool_maps=pool,
              candidates=np.ones(4, bool), model_mesh=mesh, stride=4, round_index=2,
              mesh_axes=parallel.make_mesh(1))
    cfg = _config().estep
    cfg.max_new = 4

    def pose_of_image_0(result):
        rows = np.flatnonzero(result.new.index == 0)
        assert len(rows) == 1
        return result.new.poses[rows[0]].astype(np.float64), result.new.source[rows[0]]

    base = semi_supervised.e_step(cfg, **kw)
    pose, source = pose_of_image_0(base)
    own = train_set.poses[1].astype(np.float64)
    assert source == 100 and geometry.pose_error(pose, own) < 1e-4
    cfg.novel_views_only = True
    novel = semi_supervised.e_step(cfg, **kw)
    assert novel.num_views == base.num_views - 1
    pose, _ = pose_of_image_0(novel)
    assert geometry.pose_error(pose, own) > np.radians(5)


def test_mirrored_sources_project_like_the_mirror_image(tiny_data):
    """A mirrored source's pose projects the model mesh onto the mirror of the
    original projection (checked by projecting, not through flip_pose), and its
    feature map is the network's map of the mirrored image."""
    from nvsm_jax import geometry

    train_set, model_mesh, _ = tiny_data
    rows = np.arange(3)
    images = train_set.images[rows]
    w = images.shape[2]
    calls = []

    def feature_fn(x):                      # a stand-in network: per-pixel channel sums
        calls.append(np.asarray(x))
        return np.asarray(x, np.float32).sum(-1, keepdims=True)

    maps = feature_fn(images)
    out = semi_supervised.mirrored_sources(
        feature_fn, 2, images, maps, train_set.poses[rows], train_set.focal[rows],
        train_set.principal[rows], np.array([4, 5, 6]), np.array([True, False, True]))
    m_maps, m_poses, m_focal, m_principal, m_ids, m_lab = out
    assert m_maps.shape == (6,) + maps.shape[1:]
    np.testing.assert_array_equal(m_maps[3:], feature_fn(images[:, :, ::-1]))
    np.testing.assert_array_equal(m_ids, [4, 5, 6, 4, 5, 6])
    np.testing.assert_array_equal(m_lab, [True, False, True] * 2)
    verts = np.asarray(model_mesh.verts, np.float64)
    mirrored_verts = verts * [-1.0, 1.0, 1.0]       # the car is symmetric about x = 0
    for i in range(3):
        uv = geometry.project_to_screen(verts, *_camera(train_set.poses[i], train_set.focal[i],
                                                        train_set.principal[i]))
        uv_m = geometry.project_to_screen(mirrored_verts, *_camera(m_poses[3 + i], m_focal[3 + i],
                                                                   m_principal[3 + i]))
        np.testing.assert_allclose(uv_m[:, 0], w - uv[:, 0], atol=1e-3)
        np.testing.assert_allclose(uv_m[:, 1], uv[:, 1], atol=1e-3)


def _camera(pose, focal, principal):
    return (np.asarray(pose, np.float64), np.float64(focal), np.asarray(principal, np.float64))
