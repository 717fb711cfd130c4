"""NVSM EM rounds end to end on tiny data (8 forced CPU devices), and resume after a kill."""

import jax
import numpy as np
import pytest

from experiments.configs import nvsm as nvsm_config
from nvsm_jax.nvsm import estep, rounds
from nvsm_jax import training
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
    c.estep.agreement_rate = 0.0  # the safeguard: test_safeguard_... below, test_experiment.py
    return c


def _run(tiny_data, workdir, config=None, **kw):
    train_set, object_mesh, tests = tiny_data
    return rounds.run_nvsm(config or _config(), workdir, train_set=train_set,
                                    object_mesh=object_mesh, test_sets=tests, num_devices=8,
                                    progress=False, **kw)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """An uninterrupted run on 8 devices; ``m_step_data`` records, per M-step, the
    round and the training set ``_m_step`` was given (what CoKe trained on)."""
    workdir = tmp_path_factory.mktemp("nvsm_reference")
    seen = []
    real = rounds._m_step

    def spy(run, state, data, round_index, *a, **kw):
        seen.append({"round": round_index, "names": tuple(data.names),
                     "poses": np.array(data.poses), "images": np.array(data.images),
                     "focal": np.array(data.focal)})
        return real(run, state, data, round_index, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rounds, "_m_step", spy)
        out = _run(tiny_data, workdir)
    return {**out, "workdir": workdir, "m_step_data": seen}


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
    # what the M-steps trained on: test_each_m_step_trains_on_the_anchors_and_the_pseudo_labels_so_far


def test_each_m_step_trains_on_the_anchors_and_the_pseudo_labels_so_far(tiny_data, reference):
    """What run_nvsm's M-steps actually trained on (recorded by the ``reference``
    fixture's spy on ``_m_step``): round 0 the 7 anchors at their labels; round r
    the anchors plus every image accepted in rounds 1..r, each pseudo-labelled
    image (its own pixels and camera) at its pseudo pose, never its hidden pose;
    so the distinct images seen are 7, 7 + 4 and 7 + 8 (max_new = 4 per round)."""
    train_set, _, _ = tiny_data
    c = _config()
    split = fewshot.split_from_config(train_set, c.num_labelled, c)
    lab, unl = split.labelled, split.unlabelled
    hidden = fewshot.hidden_poses(train_set, unl.names)
    pl = reference["pseudo_labels"]
    seen = reference["m_step_data"]
    assert [s["round"] for s in seen] == [0, 1, 2]
    assert [len(set(s["names"])) for s in seen] == [7, 7 + c.estep.max_new,
                                                      7 + 2 * c.estep.max_new]
    assert seen[0]["names"] == lab.names
    np.testing.assert_array_equal(seen[0]["poses"], lab.poses)
    for s in seen[1:]:
        so_far = pl.take(pl.round <= s["round"])
        want = set(lab.names) | {unl.names[i] for i in so_far.index}
        assert set(s["names"]) == want, s["round"]
        names = np.array(s["names"])
        for i, name in enumerate(lab.names):
            rows = np.flatnonzero(names == name)
            assert len(rows) >= 1
            np.testing.assert_array_equal(s["poses"][rows], np.repeat(lab.poses[i:i + 1],
                                                                      len(rows), 0))
        for j, i in enumerate(so_far.index):
            rows = np.flatnonzero(names == unl.names[i])
            assert len(rows) == 1, (s["round"], unl.names[i])
            r = rows[0]
            np.testing.assert_array_equal(s["poses"][r], so_far.poses[j])
            np.testing.assert_array_equal(s["images"][r], unl.images[i])
            assert s["focal"][r] == unl.focal[i]
            assert not np.allclose(s["poses"][r], hidden[i], atol=1e-3)  # a matched pose


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
    assert rounds.load_progress(tmp_path / "killed") == {"round": 1, "step": 4}
    resumed = _run(tiny_data, tmp_path / "killed")
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2]
    np.testing.assert_array_equal(resumed["pseudo_labels"].index, full["pseudo_labels"].index)
    np.testing.assert_allclose(resumed["pseudo_labels"].poses, full["pseudo_labels"].poses)
    leaves_a = jax.tree_util.tree_leaves(full["state"].params)
    leaves_b = jax.tree_util.tree_leaves(resumed["state"].params)
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_run_killed_inside_an_m_step_resumes_there(tiny_data, reference, tmp_path,
                                                     monkeypatch):
    """Killed after step 3 (inside round 1's M-step, a checkpoint every step): the
    resumed run restores checkpoint 3, reuses round 1's stored E-step instead of
    redoing it, and ends equal to the uninterrupted run."""
    c = _config()
    c.checkpoint_every = 1
    part = _run(tiny_data, tmp_path / "killed", config=c, stop_after_steps=3)
    assert [r["round"] for r in part["rounds"]] == [0]
    assert (tmp_path / "killed" / "pseudo_labels" / "estep_001.npz").exists()
    assert training.Checkpointer(tmp_path / "killed" / "checkpoints").latest_step() == 3
    rounds_run = []
    real = estep.e_step
    monkeypatch.setattr(rounds, "e_step",
                        lambda *a, **kw: rounds_run.append(kw["round_index"]) or real(*a, **kw))
    resumed = _run(tiny_data, tmp_path / "killed", config=c)
    assert rounds_run == [2]
    assert not (tmp_path / "killed" / "pseudo_labels" / "estep_001.npz").exists()
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2]
    np.testing.assert_array_equal(resumed["pseudo_labels"].index, reference["pseudo_labels"].index)
    for a, b in zip(jax.tree_util.tree_leaves(reference["state"].params),
                    jax.tree_util.tree_leaves(resumed["state"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _sources(maps, poses, focal, principal, ids, is_labelled):
    return estep.Sources(np.asarray(maps), np.asarray(poses), np.asarray(focal),
                                   np.asarray(principal), np.asarray(ids),
                                   np.asarray(is_labelled, bool))


def _estep(**changes):
    return estep.EStepConfig.from_config(_config().estep).replace(**changes)


def test_e_step_rejects_empty_sources(tiny_data):
    _, object_mesh, _ = tiny_data
    with pytest.raises(ValueError, match="no sources"):
        estep.e_step(
            _estep(), _sources(np.zeros((0, 8, 8, 4)), np.zeros((0, 4)), np.zeros(0),
                               np.zeros((0, 2)), np.zeros(0, int), np.zeros(0, bool)),
            estep.Pool(np.zeros((3, 8, 8, 4)), np.ones(3), np.zeros((3, 2)),
                                 np.ones(3, bool)),
            object_mesh=object_mesh, stride=4, round_index=1, mesh=None)



def test_novel_views_only_moves_a_look_alike_off_the_pseudo_source_pose(tiny_data):
    """A pool image whose feature map is a pseudo-labelled source's own map is
    matched at that source's pose; with ``novel_views_only`` that view is gone
    and the image lands at another pose."""
    from nvsm_jax import geometry, parallel

    train_set, object_mesh, _ = tiny_data
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 8, 8, 16)).astype(np.float32)
    pool = np.concatenate([maps[1:], rng.normal(size=(3, 8, 8, 16)).astype(np.float32)])
    sources = _sources(maps, train_set.poses[:2], train_set.focal[:2], train_set.principal[:2],
                       [0, 100], [True, False])
    pool_set = estep.Pool(pool, np.full(4, train_set.focal[0]),
                                    np.repeat(train_set.principal[:1], 4, axis=0),
                                    np.ones(4, bool))
    kw = dict(object_mesh=object_mesh, stride=4, round_index=2, mesh=parallel.make_mesh(1))
    cfg = _estep(max_new=4)

    def pose_of_image_0(result):
        rows = np.flatnonzero(result.new.index == 0)
        assert len(rows) == 1
        return result.new.poses[rows[0]].astype(np.float64), result.new.source[rows[0]]

    base = estep.e_step(cfg, sources, pool_set, **kw)
    pose, source = pose_of_image_0(base)
    own = train_set.poses[1].astype(np.float64)
    assert source == 100 and geometry.pose_error(pose, own) < 1e-4
    # the source's view synthesised at its own pose, with the feature map's camera
    # (focal / stride), reproduces its map on the object up to the interpolation's
    # blur (0.82 here); the other pool images are independent noise: mean cosines
    # over a few dozen pixels, |score| ~ 0.1
    score_0 = base.new.score[base.new.index == 0][0]
    assert score_0 > 0.6 and np.all(np.abs(base.new.score[base.new.index != 0]) < 0.3), \
        base.new.score
    # image 0 no longer a candidate (pseudo-labelled in an earlier round): never again
    rest = estep.e_step(cfg, sources, pool_set._replace(candidates=np.array(
        [False, True, True, True])), **kw)
    assert 0 not in rest.new.index and len(rest.new) == 3
    for i in (1, 2, 3):         # the others keep their best view
        np.testing.assert_array_equal(rest.new.poses[rest.new.index == i],
                                      base.new.poses[base.new.index == i])
    novel = estep.e_step(cfg.replace(novel_views_only=True), sources, pool_set, **kw)
    assert novel.num_views == base.num_views - 1
    pose, _ = pose_of_image_0(novel)
    assert geometry.pose_error(pose, own) > np.radians(5)


def test_mirrored_sources_project_like_the_mirror_image(tiny_data):
    """A mirrored source's pose projects the model mesh onto the mirror of the
    original projection (checked by projecting, not through flip_pose), and its
    feature map is the network's map of the mirrored image."""
    from nvsm_jax import geometry

    train_set, object_mesh, _ = tiny_data
    rows = np.arange(3)
    images = train_set.images[rows]
    w = images.shape[2]
    calls = []

    def feature_fn(x):                      # a stand-in network: per-pixel channel sums
        calls.append(np.asarray(x))
        return np.asarray(x, np.float32).sum(-1, keepdims=True)

    maps = feature_fn(images)
    out = estep.mirrored_sources(
        feature_fn, 2, images, _sources(maps, train_set.poses[rows], train_set.focal[rows],
                                        train_set.principal[rows], [4, 5, 6], [True, False, True]))
    m_maps, m_poses, m_focal, m_principal, m_ids, m_lab = (
        out.maps, out.poses, out.focal, out.principal, out.ids, out.is_labelled)
    assert m_maps.shape == (6,) + maps.shape[1:]
    np.testing.assert_array_equal(m_maps[3:], feature_fn(images[:, :, ::-1]))
    np.testing.assert_array_equal(m_ids, [4, 5, 6, 4, 5, 6])
    np.testing.assert_array_equal(m_lab, [True, False, True] * 2)
    verts = np.asarray(object_mesh.verts, np.float64)
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


def test_source_vertex_mask_keeps_visible_front_facing_object_vertices(tiny_data):
    """Against independent numpy readings: the mask at each vertex's pixel, |n . v|
    from the camera centre, and the memory-vs-clutter comparison."""
    from nvsm_jax.nemo import features as feat
    from nvsm_jax import geometry, meshes

    train_set, object_mesh, _ = tiny_data
    rows = np.arange(3)
    verts = np.asarray(object_mesh.verts, np.float32)
    normals = meshes.vertex_normals(object_mesh.verts, object_mesh.faces)
    poses = train_set.poses[rows]
    vf = feat.vertex_features(np.zeros((3, 8, 8, 4), np.float32), verts, object_mesh.faces,
                              normals, poses, train_set.focal[rows], train_set.principal[rows],
                              stride=4, render_stride=1)
    masks = np.zeros((3, 32, 32), bool)
    masks[:, :, :16] = True                                   # the left half is "object"
    cos = feat.view_weights(verts, normals, poses)
    out = np.asarray(estep.source_vertex_mask(
        vf, cos, masks, np.array([True, True, False]), min_view_cos=0.3))
    xy = np.asarray(vf.xy)
    centre = np.asarray(geometry.camera_center(poses[:, 0], poses[:, 1], poses[:, 3]))
    view = centre[:, None, :] - verts[None]
    view /= np.linalg.norm(view, axis=-1, keepdims=True)
    want_cos = np.abs(np.sum(view * normals[None], -1))
    left = np.floor(xy[..., 0]) < 16
    want = np.asarray(vf.visible) & (want_cos >= 0.3) & (left | np.array([0, 0, 1], bool)[:, None])
    np.testing.assert_array_equal(out, want)
    assert out[:2].sum() < np.asarray(vf.visible)[:2].sum()   # the mask did drop some
    # pseudo-labelled rows: a vertex survives where its feature is nearer its memory row
    d = 4
    memory = np.eye(d, dtype=np.float32)[np.arange(len(verts)) % 2]     # rows e0 / e1
    clutter = np.eye(d, dtype=np.float32)[2]
    feats = np.where((np.arange(len(verts)) % 3 == 0)[None, :, None], clutter, memory[None])
    vf2 = vf._replace(features=np.broadcast_to(feats, (3, len(verts), d)).astype(np.float32))
    out2 = np.asarray(estep.source_vertex_mask(
        vf2, cos, None, np.array([True, False, False]), memory=memory, clutter=clutter))
    background = np.arange(len(verts)) % 3 == 0
    np.testing.assert_array_equal(out2[0], np.asarray(vf.visible)[0])
    np.testing.assert_array_equal(out2[1:], np.asarray(vf.visible)[1:] & ~background[None])


def _look_alike_anchors(train_set, second_azimuth_offset):
    """Three anchors; anchor 1's feature map is anchor 0's, its pose anchor 0's turned
    by ``second_azimuth_offset`` about the vertical axis; anchor 2 is unrelated."""
    from nvsm_jax import geometry
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(3, 8, 8, 16)).astype(np.float32)
    maps[1] = maps[0]
    poses = np.array(train_set.poses[:3], np.float32)
    poses[1] = poses[0]
    poses[1, 0] = np.mod(poses[0, 0] + second_azimuth_offset, 2 * np.pi)
    poses[2, 0] = np.mod(poses[0, 0] + np.pi / 2, 2 * np.pi)
    src = _sources(maps, poses, train_set.focal[:3], train_set.principal[:3], [0, 1, 2],
                   [True, True, True])
    return src, poses, geometry


def test_holdout_check_never_uses_an_anchors_own_views_and_judges_by_its_label(tiny_data):
    """Anchor 0 held out: its best view must come from its look-alike anchor 1
    (its own views are excluded), at anchor 1's pose. Right when anchor 1's pose is
    15 deg from anchor 0's, wrong when it is 180 deg away: the label decides."""
    from nvsm_jax import parallel
    train_set, object_mesh, _ = tiny_data
    kw = dict(object_mesh=object_mesh, stride=4, mesh=parallel.make_mesh(1))
    cfg = _estep(mirror_sources=False)
    offsets = 2 * cfg.azimuth_steps + 1
    views_per_source = offsets * (2 * cfg.elevation_steps + 1)
    for turn, right in [(np.radians(15.0), True), (np.pi, False)]:
        src, poses, geometry = _look_alike_anchors(train_set, turn)
        hc = estep.holdout_check(cfg, src, **kw)
        assert hc.right.shape == (3,)
        np.testing.assert_array_equal(hc.views, 2 * views_per_source)   # the other two
        assert bool(hc.right[0]) is right
        # the oracle: anchor 0's best view is anchor 1's own pose (the identical map)
        table = estep.score_views(
            cfg, src.take([1, 2]), estep.Pool(src.maps[:1], src.focal[:1],
                                                        src.principal[:1], np.ones(1, bool)),
            **kw)
        # views come source-major, K per source, each within the offset grid of the
        # pose of the source whose id it carries
        np.testing.assert_array_equal(table.view_source, np.repeat([1, 2], views_per_source))
        np.testing.assert_array_equal(table.view_labelled, np.ones(2 * views_per_source, bool))
        near = geometry.pose_error(table.view_poses.astype(np.float64),
                                   poses[table.view_source].astype(np.float64))
        assert np.all(near <= cfg.azimuth_steps * cfg.azimuth_step + 1e-4), np.degrees(near)
        best = table.view_poses[np.argmax(table.scores[:, 0])]
        assert geometry.pose_error(best.astype(np.float64), poses[1].astype(np.float64)) < 1e-4
        assert hc.best_score[0] == pytest.approx(table.scores[:, 0].max(), abs=1e-6)



def test_safeguard_accepts_what_the_solver_agrees_with_and_stops_otherwise(tiny_data):
    """Pool images are copies of one anchor's map, so they match near the anchor's
    pose. The solver is a one-pose grid (azimuth 0) without refinement, so that is its
    pose for every image: with the anchor at azimuth 0 every match agrees and the
    safeguard keeps the plain E-step's result; with the anchor at 180 deg none does
    and the round accepts nothing."""
    from nvsm_jax import geometry, parallel
    from nvsm_jax.nemo import pose_solver
    train_set, object_mesh, _ = tiny_data
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(2, 8, 8, 16)).astype(np.float32)
    pool = np.repeat(maps[:1], 6, axis=0) + 0.05 * rng.normal(size=(6, 8, 8, 16))
    pool_set = estep.Pool(pool.astype(np.float32), np.full(6, train_set.focal[0]),
                                    np.repeat(train_set.principal[:1], 6, axis=0),
                                    np.ones(6, bool))
    kw = dict(object_mesh=object_mesh, stride=4, round_index=1, mesh=parallel.make_mesh(1))
    cfg = _estep(max_new=4, mirror_sources=False, agreement_angle=float(np.radians(40.0)),
                 agreement_min_count=2)
    elevation = np.radians(20.0)
    solver_cfg = pose_solver.SolverConfig(num_azimuth=1, elevations=(float(elevation),),
                                          thetas=(0.0,), steps=0)
    memory = rng.normal(size=(len(object_mesh.verts), 16)).astype(np.float32)
    solver = estep.SolverInputs(memory, memory.mean(0), solver_cfg)
    for azimuth, kept in [(0.0, 4), (np.pi, 0)]:
        poses = np.array(train_set.poses[:2], np.float32)
        poses[0, :3] = (azimuth, elevation, 0.0)
        poses[1, :3] = (np.mod(azimuth + np.pi / 2, 2 * np.pi), elevation, 0.0)
        sources = _sources(maps, poses, train_set.focal[:2], train_set.principal[:2], [0, 1],
                           [True, True])
        plain = estep.e_step(cfg, sources, pool_set, **kw)
        assert len(plain.new) == 4 and plain.agreement is None
        # the oracle of "agrees": each plain match against the solver's one grid pose
        err = geometry.pose_error(plain.new.poses.astype(np.float64),
                                  solver_cfg.grid()[:1].astype(np.float64))
        assert np.all(err < np.radians(40.0)) if kept else np.all(err > np.radians(40.0))
        gated = estep.e_step(cfg.replace(agreement_rate=0.75), sources, pool_set,
                                       solver=solver, **kw)
        assert len(gated.new) == kept
        np.testing.assert_array_equal(gated.new.index, plain.new.index[:kept])
        assert gated.agreement == pytest.approx(1.0 if kept else 0.0)
    with pytest.raises(ValueError, match="needs the solver"):
        estep.e_step(cfg.replace(agreement_rate=0.5), sources, pool_set, **kw)
    with pytest.raises(ValueError, match="agreement_rate"):
        _estep(agreement_rate=1.5)


def _pseudo(index, poses, round_index=1):
    from nvsm_jax.nvsm import pseudo_labels
    m = len(index)
    return pseudo_labels.PseudoLabels(np.asarray(index, np.int64), np.asarray(poses, np.float32),
                                      np.linspace(0.9, 0.5, m).astype(np.float32),
                                      np.zeros(m, np.int64), np.ones(m, bool),
                                      np.full(m, round_index, np.int64))


def test_training_set_repeats_the_anchors_to_their_minimum_fraction(tiny_data):
    """3 anchors and 10 pseudo-labels with ``labelled_min_fraction`` 0.5: the anchors
    must make up at least half the set, so they are repeated ceil(10 / 3) = 4 times
    (12 of 22 rows; 3 repeats would give 9 of 19 < 0.5). The pseudo-labelled rows
    follow, each with its own image and camera at its pseudo pose."""
    train_set, _, _ = tiny_data
    split = fewshot.make_fewshot_split(train_set, 3, seed=0)
    lab, unl = split.labelled, split.unlabelled
    rng = np.random.default_rng(5)
    idx = rng.permutation(len(unl))[:10]
    poses = np.stack([rng.uniform(0, 6, 10), rng.uniform(0, 0.5, 10), np.zeros(10),
                      np.full(10, 5.0)], -1)
    pl = _pseudo(idx, poses)
    data = rounds.training_set(lab, unl, pl, 0.5)
    assert len(data) == 22
    assert data.names[:12] == lab.names * 4
    np.testing.assert_array_equal(data.poses[:12], np.tile(lab.poses, (4, 1)))
    assert data.names[12:] == tuple(unl.names[i] for i in idx)
    np.testing.assert_array_equal(data.images[12:], unl.images[idx])
    np.testing.assert_array_equal(data.poses[12:], poses.astype(np.float32))
    np.testing.assert_array_equal(data.focal[12:], unl.focal[idx])
    np.testing.assert_array_equal(data.principal[12:], unl.principal[idx])
    # no minimum: each anchor once; 0.2: want 2.5 anchor rows -> still once
    assert len(rounds.training_set(lab, unl, pl)) == 13
    assert len(rounds.training_set(lab, unl, pl, 0.2)) == 13
    # 0.8: want 40 anchor rows -> ceil(40 / 3) = 14 repeats, 42 + 10 rows
    assert len(rounds.training_set(lab, unl, pl, 0.8)) == 52
    assert rounds.training_set(lab, unl, _pseudo([], np.zeros((0, 4))), 0.5).names \
        == lab.names


def test_round_sources_are_the_anchors_then_the_pseudo_labels_then_their_mirrors(tiny_data):
    """Hand-built pseudo-labels for pool images 5 and 2 (pool cameras made distinct):
    the sources are the 7 anchors (their maps, labels, cameras, object masks, ids
    0..6), then images 5 and 2 with the pool's maps of those rows, at their pseudo
    poses, with their own cameras, ids 5 and 2, not labelled, all-True masks; then
    the mirror of every row: the stand-in network's map of the flipped image (of
    the anchor, or of pool image 5 / 2), azimuth 2 pi - a, theta -t, principal
    x -> W - x, same id and labelled flag."""
    import dataclasses
    train_set, _, _ = tiny_data
    c = _config()
    split = fewshot.split_from_config(train_set, c.num_labelled, c)
    lab = split.labelled
    n = len(split.unlabelled)
    unl = dataclasses.replace(split.unlabelled, focal=np.linspace(150, 250, n).astype(np.float32),
                              principal=np.stack([np.linspace(10, 20, n),
                                                  np.linspace(12, 22, n)], -1).astype(np.float32))

    def fn(x):                              # a stand-in network: channel sums at stride 4
        x = np.asarray(x, np.float32)
        return x.reshape(len(x), 8, 4, 8, 4, 3).sum((2, 4))

    pool_maps = fn(unl.images) + 1000.0 * np.arange(n)[:, None, None, None]   # row-tagged
    pl_poses = np.array([[1.0, 0.2, 0.1, 5.0], [4.0, 0.3, -0.2, 4.5]], np.float32)
    src = estep.round_sources(c, fn, lab, unl, pool_maps, _pseudo([5, 2], pl_poses))
    m = 7 + 2
    assert len(src) == 2 * m
    np.testing.assert_array_equal(src.maps[:7], fn(lab.images))
    np.testing.assert_array_equal(src.maps[7:m], pool_maps[[5, 2]])
    np.testing.assert_array_equal(src.poses[:m], np.concatenate([lab.poses, pl_poses]))
    np.testing.assert_array_equal(src.focal[:m], np.concatenate([lab.focal, unl.focal[[5, 2]]]))
    np.testing.assert_array_equal(src.principal[:m],
                                  np.concatenate([lab.principal, unl.principal[[5, 2]]]))
    np.testing.assert_array_equal(src.ids, [0, 1, 2, 3, 4, 5, 6, 5, 2] * 2)
    np.testing.assert_array_equal(src.is_labelled, ([True] * 7 + [False] * 2) * 2)
    np.testing.assert_array_equal(src.masks[:7], lab.object_mask)
    assert src.masks[7:m].all()
    images = np.concatenate([lab.images, unl.images[[5, 2]]])
    np.testing.assert_array_equal(src.maps[m:], fn(images[:, :, ::-1]))
    want = src.poses[:m].copy()
    want[:, 0] = np.mod(2 * np.pi - want[:, 0], 2 * np.pi)
    want[:, 2] = -want[:, 2]
    np.testing.assert_allclose(src.poses[m:], want, atol=1e-6)
    np.testing.assert_allclose(src.principal[m:, 0], 32 - src.principal[:m, 0])
    np.testing.assert_array_equal(src.masks[m:], src.masks[:m, :, ::-1])
    c.estep.mirror_sources = False
    plain = estep.round_sources(c, fn, lab, unl, pool_maps, _pseudo([5, 2], pl_poses))
    assert len(plain) == m
    np.testing.assert_array_equal(plain.maps, src.maps[:m])


def test_round_entries_report_the_pseudo_labels_quality_against_the_hidden_poses(tiny_data,
                                                                               reference):
    """Each round's median error, flip rate and covered sectors, recomputed here from the
    hidden poses with scipy's rotations (an independent geodesic)."""
    from scipy.spatial.transform import Rotation
    train_set, _, _ = tiny_data
    c = _config()
    unl = fewshot.split_from_config(train_set, c.num_labelled, c).unlabelled
    hidden = fewshot.hidden_poses(train_set, unl.names)
    pl = reference["pseudo_labels"]

    def rot(p):
        return Rotation.from_euler("ZXZ", np.stack([p[:, 2], -(np.pi / 2 - p[:, 1]), -p[:, 0]], -1))

    for r in reference["rounds"][1:]:
        so_far = pl.take(pl.round <= r["round"])
        true = hidden[so_far.index].astype(np.float64)
        err = np.degrees((rot(so_far.poses.astype(np.float64)).inv() * rot(true)).magnitude())
        assert r["median_err_deg"] == pytest.approx(np.median(err), abs=1e-3)
        assert r["flip_rate"] == pytest.approx(np.mean(err > 150))
        assert r["sectors_covered"] == len({int(np.degrees(a) % 360 // 30) for a in true[:, 0]})


@pytest.mark.parametrize("oracle", ["true_poses", "random_true"])
def test_oracle_rows_train_on_hidden_poses(tiny_data, reference, tmp_path, oracle):
    """The diagnosis rows: ``true_poses`` keeps the E-step's images (round 1 is the
    reference's: the same round-0 model) at their hidden poses; ``random_true`` draws
    as many not-yet-labelled images per round. Both end with exact pseudo-labels."""
    train_set, _, _ = tiny_data
    c = _config()
    c.nvsm_oracle = oracle
    out = _run(tiny_data, str(tmp_path / oracle), config=c)
    unl = fewshot.split_from_config(train_set, c.num_labelled, c).unlabelled
    hidden = fewshot.hidden_poses(train_set, unl.names)
    pl = out["pseudo_labels"]
    assert len(pl) == 2 * c.estep.max_new and len(np.unique(pl.index)) == len(pl)
    np.testing.assert_allclose(pl.poses, hidden[pl.index])
    assert out["rounds"][-1]["median_err_deg"] == pytest.approx(0.0, abs=1e-3)
    ref1 = reference["pseudo_labels"].take(reference["pseudo_labels"].round == 1)
    got1 = pl.take(pl.round == 1)
    if oracle == "true_poses":
        np.testing.assert_array_equal(got1.index, ref1.index)
    else:
        assert np.all(got1.source == -1)
    c.nvsm_oracle = "truth"
    with pytest.raises(ValueError, match="nvsm_oracle"):
        _run(tiny_data, str(tmp_path / "bad"), config=c)
