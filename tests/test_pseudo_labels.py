"""E-step decisions on hand-built score tables."""

import numpy as np
import pytest

from nvsm_jax import geometry, pseudo_labels as pl


def test_offset_grid_and_targets():
    off = pl.offset_grid(np.radians(15), 2, np.radians(10), 1)
    assert off.shape == (15, 4)
    np.testing.assert_array_equal(off[0], 0)
    assert np.all(off[:, 2:] == 0)
    src = np.array([[np.radians(350), np.radians(85), 0.1, 5.0]], np.float32)
    t = pl.propose_targets(src, off, elevation_range=(-np.pi / 2, np.radians(88)))
    assert t.shape == (1, 15, 4)
    assert np.all((t[..., 0] >= 0) & (t[..., 0] < 2 * np.pi))
    assert t[..., 1].max() <= np.radians(88) + 1e-6
    np.testing.assert_allclose(t[0, :, 2], 0.1)
    with pytest.raises(ValueError, match="NaN"):
        pl.propose_targets(np.array([[np.nan, 0, 0, 5]]), off)


def test_select_applies_threshold_margin_cap_and_candidates():
    # 4 views: two close poses (0 and 10 deg azimuth), two far ones (90, 180 deg)
    az = np.radians([0, 10, 90, 180])
    view_poses = geometry.make_pose(az, 0.2, 0.0, 5.0, xnp=np)
    scores = np.array([
        # img0: clear winner view 1 (close view 0 may score high too)
        # img1: ambiguous between far views 0 and 2 -> rejected by the margin
        # img2: below threshold; img3: clear winner view 3; img4: already labelled
        [0.80, 0.70, 0.20, 0.10, 0.90],
        [0.85, 0.10, 0.10, 0.10, 0.10],
        [0.10, 0.69, 0.30, 0.10, 0.10],
        [0.10, 0.10, 0.10, 0.95, 0.10],
    ])
    out = pl.select(scores, view_poses, np.array([0, 0, 1, 2]), np.array([True, True, False, True]),
                    threshold=0.5, margin=0.05, margin_angle=np.radians(30), max_new=None,
                    round_index=3, candidates=np.array([True, True, True, True, False]))
    np.testing.assert_array_equal(out.index, [3, 0])          # sorted by score
    np.testing.assert_allclose(out.poses, view_poses[[3, 1]])
    np.testing.assert_allclose(out.score, [0.95, 0.85])
    np.testing.assert_array_equal(out.source, [2, 0])
    np.testing.assert_array_equal(out.round, [3, 3])
    capped = pl.select(scores, view_poses, np.zeros(4, int), np.ones(4, bool), threshold=0.5,
                       margin=0.05, margin_angle=np.radians(30), max_new=1, round_index=0)
    np.testing.assert_array_equal(capped.index, [3])
    empty = pl.select(np.zeros((0, 5)), view_poses[:0], [], [], threshold=0.5, margin=0,
                      margin_angle=1, max_new=None, round_index=0)
    assert len(empty) == 0


def test_pseudo_labels_extend_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    a = pl.PseudoLabels(np.array([1, 2]), rng.normal(size=(2, 4)).astype(np.float32),
                        np.array([0.7, 0.4], np.float32), np.array([3, 0]),
                        np.array([True, False]), np.array([1, 2]))
    np.savez(tmp_path / "pl.npz", **a.to_dict())              # the per-round file format
    for b in (pl.PseudoLabels.from_dict(a.to_dict()),
              pl.PseudoLabels.from_dict(np.load(tmp_path / "pl.npz"))):
        for f in ("index", "poses", "score", "source", "source_is_labelled", "round"):
            np.testing.assert_array_equal(getattr(b, f), getattr(a, f), err_msg=f)
            assert getattr(b, f).dtype == getattr(a, f).dtype, f
    b = pl.PseudoLabels.from_dict(a.to_dict())
    b.index = np.array([5, 6])
    c = a.extend(b)
    np.testing.assert_array_equal(c.index, [1, 2, 5, 6])
    np.testing.assert_array_equal(c.source_is_labelled, [True, False, True, False])
    np.testing.assert_allclose(c.take([3, 0]).score, [0.4, 0.7], rtol=1e-6)
    with pytest.raises(ValueError, match="already"):
        c.extend(a)


def test_coverage_counts_bins():
    assert pl.coverage(np.zeros((0, 4))) == 0.0
    a = np.radians(np.arange(0, 360, 30) + 5)
    full = np.stack(np.meshgrid(a, np.radians([0, 10, 30]), indexing="ij"), -1).reshape(-1, 2)
    assert pl.coverage(full) == 1.0
    assert pl.coverage(full[:18]) == pytest.approx(0.5)
    assert pl.coverage(np.array([[0.1, np.radians(80)]])) == 0.0  # outside the bins


def test_view_top_rule_lets_every_view_claim_its_own_best_image():
    # view 0 (a "side view") scores high on everything; per-image argmax gives it
    # every image, per-view z-scores let view 1 and view 2 claim their matches.
    az = np.radians([90, 0, 180])
    view_poses = geometry.make_pose(az, 0.1, 0.0, 5.0, xnp=np)
    scores = np.array([[0.90, 0.91, 0.92, 0.90],
                       [0.50, 0.85, 0.40, 0.45],
                       [0.55, 0.50, 0.88, 0.52]])
    kw = dict(threshold=0.0, margin=-1.0, margin_angle=np.radians(30), max_new=None, round_index=1)
    best = pl.select(scores, view_poses, np.arange(3), np.ones(3, bool), **kw)
    np.testing.assert_array_equal(np.sort(best.index), [0, 1, 2, 3])
    assert np.all(best.poses[:, 0] == np.float32(np.radians(90)))
    top = pl.select(scores, view_poses, np.arange(3), np.ones(3, bool), rule="view_top", **kw)
    claimed = dict(zip(top.index.tolist(), np.degrees(top.poses[:, 0]).round().tolist()))
    assert claimed[1] == 0 and claimed[2] == 180           # each view's own best image
    # at most one claim per view; view 0's only claim (image 2) loses to view 2's
    assert len(top) == 2
    with pytest.raises(ValueError, match="rule"):
        pl.select(scores, view_poses, np.arange(3), np.ones(3, bool), rule="nope", **kw)


def test_agree_with_solver_uses_the_geodesic_angle_and_take_keeps_rows_aligned():
    matched = np.array([[0.0, 0.2, 0.0, 5.0],           # same pose
                        [0.0, 0.2, 0.0, 5.0],           # 20 deg of azimuth away
                        [np.pi, 0.2, 0.0, 5.0]])        # front/back flip
    solved = np.array([[0.0, 0.2, 0.0, 5.0],
                       [np.radians(20.0), 0.2, 0.0, 5.0],
                       [0.0, 0.2, 0.0, 5.0]])
    # an azimuth change of 20 deg at elevation e is a rotation by 20 deg about the vertical
    np.testing.assert_array_equal(
        pl.agree_with_solver(matched, solved, np.radians(25.0)), [True, True, False])
    np.testing.assert_array_equal(
        pl.agree_with_solver(matched, solved, np.radians(15.0)), [True, False, False])
    with pytest.raises(ValueError, match="matched"):
        pl.agree_with_solver(matched, solved[:2], 1.0)
    labels = pl.PseudoLabels(np.array([4, 7, 9]), matched.astype(np.float32),
                                    np.array([0.9, 0.8, 0.7], np.float32), np.array([0, 1, 2]),
                                    np.array([True, True, False]), np.zeros(3, np.int64))
    kept = labels.take(np.array([True, False, True]))
    np.testing.assert_array_equal(kept.index, [4, 9])
    np.testing.assert_array_equal(kept.source_is_labelled, [True, False])
    np.testing.assert_allclose(kept.poses[1], matched[2])
    assert len(labels.take(slice(0, 2))) == 2


def test_bin_quota_spreads_acceptance_over_azimuth_sectors():
    # 3 views: two side views (65 and 85 deg, one 30-degree sector) and a front view (5 deg);
    # 6 images: the side views score highest on 4 of them.
    view_poses = geometry.make_pose(np.radians([65.0, 85.0, 5.0]), 0.2, 0.0, 5.0, xnp=np)
    scores = np.array([
        [0.90, 0.89, 0.10, 0.10, 0.10, 0.10],
        [0.10, 0.10, 0.88, 0.87, 0.10, 0.10],
        [0.10, 0.10, 0.10, 0.10, 0.60, 0.55],
    ])
    kw = dict(threshold=0.0, margin=-1.0, margin_angle=np.radians(30), round_index=1)
    plain = pl.select(scores, view_poses, np.arange(3), np.ones(3, bool), max_new=4, **kw)
    np.testing.assert_array_equal(plain.index, [0, 1, 2, 3])            # all side views
    quota = pl.select(scores, view_poses, np.arange(3), np.ones(3, bool), max_new=4,
                      bin_quota=2, **kw)
    np.testing.assert_array_equal(quota.index, [0, 1, 4, 5])            # 2 per sector
    np.testing.assert_array_equal(geometry.azimuth_sector(quota.poses[:, 0], 12), [2, 2, 0, 0])
    # sectors wrap: -1 deg and 359 deg share the last sector
    np.testing.assert_array_equal(geometry.azimuth_sector(np.radians([-1.0, 359.0, 0.0, 30.0]), 12),
                                  [11, 11, 0, 1])


def test_round_quota_grows():
    from nvsm_jax.semi_supervised import bin_quota

    assert bin_quota({"bin_quota": None}, 3) is None
    assert [bin_quota({"bin_quota": 1, "bin_quota_growth": 2}, r) for r in (1, 2, 4)] == [1, 3, 7]
    assert bin_quota({"bin_quota": 2}, 5) == 2


def test_view_cap_limits_the_claims_of_one_view_pose():
    # views at azimuth 76 and 79 deg (two sources, one 15-degree cell), 110 deg and
    # 352 deg; the cell at 75 deg is the best view of 4 of the 6 images.
    az = np.radians([76.0, 79.0, 110.0, 352.0])
    view_poses = geometry.make_pose(az, np.radians(4.0), 0.0, 5.0, xnp=np)
    scores = np.array([
        [0.95, 0.94, 0.10, 0.10, 0.10, 0.10],
        [0.10, 0.10, 0.93, 0.92, 0.10, 0.10],
        [0.90, 0.90, 0.90, 0.90, 0.85, 0.10],
        [0.10, 0.10, 0.10, 0.10, 0.10, 0.80],
    ])
    kw = dict(threshold=0.0, margin=-1.0, margin_angle=np.radians(30), round_index=1,
              max_new=None)
    plain = pl.select(scores, view_poses, np.arange(4), np.ones(4, bool), **kw)
    np.testing.assert_array_equal(plain.index, [0, 1, 2, 3, 4, 5])
    capped = pl.select(scores, view_poses, np.arange(4), np.ones(4, bool), view_cap=2, **kw)
    np.testing.assert_array_equal(capped.index, [0, 1, 4, 5])    # images 2, 3: cell full
    np.testing.assert_allclose(np.degrees(capped.poses[:, 0]), [76, 76, 110, 352], atol=1e-4)
    # cells: 15 x 10 degrees centred on multiples of the steps; azimuth wraps at 360
    cells = pl.pose_cell(geometry.make_pose(np.radians([353.0, 0.0, 7.0, 8.0, 80.0, 80.0]),
                                            np.radians([0.0, 0.0, 0.0, 0.0, 4.0, 6.0]),
                                            0.0, 5.0, xnp=np), np.radians(15.0), np.radians(10.0))
    assert cells[0] == cells[1] == cells[2] != cells[3]
    assert cells[4] != cells[5]


def test_novel_views_drop_only_the_own_pose_of_pseudo_labelled_sources():
    off = pl.offset_grid(np.radians(15), 1, np.radians(10), 0)          # 0, -15, +15 deg
    keep = pl.novel_views(off, [True, False, False])
    np.testing.assert_array_equal(keep, [True, True, True, False, True, True, False, True, True])
    assert pl.novel_views(off, np.zeros(0, bool)).shape == (0,)
