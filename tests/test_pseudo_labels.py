"""E-step decisions on hand-built score tables."""

import numpy as np
import pytest

from nvsm_jax import geometry
from nvsm_jax.nvsm import pseudo_labels as pl


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
    rule = pl.Selection(threshold=0.5, margin=0.05, margin_angle=np.radians(30), max_new=None)
    out = pl.select(scores, view_poses, np.array([0, 0, 1, 2]), np.array([True, True, False, True]),
                    rule, round_index=3, candidates=np.array([True, True, True, True, False]))
    np.testing.assert_array_equal(out.index, [3, 0])          # sorted by score
    np.testing.assert_allclose(out.poses, view_poses[[3, 1]])
    np.testing.assert_allclose(out.score, [0.95, 0.85])
    np.testing.assert_array_equal(out.source, [2, 0])
    np.testing.assert_array_equal(out.round, [3, 3])
    capped = pl.select(scores, view_poses, np.zeros(4, int), np.ones(4, bool),
                       pl.Selection(0.5, 0.05, np.radians(30), max_new=1), round_index=0)
    np.testing.assert_array_equal(capped.index, [3])
    empty = pl.select(np.zeros((0, 5)), view_poses[:0], [], [], rule, round_index=0)
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


def test_agreement_cut_takes_the_longest_prefix_at_the_rate():
    T, F = True, False
    # prefix rates: 1, 1, 2/3, 3/4, 3/5, 4/6 -> at 0.7 the longest is 4 (3 of 4 agree)
    assert pl.agreement_cut([T, T, F, T, F, T], 0.7, min_count=1) == 4
    assert pl.agreement_cut([T, T, F, T, F, T], 0.6, min_count=1) == 6
    assert pl.agreement_cut([T, T, F, T, F, T], 1.0, min_count=1) == 2
    # prefixes shorter than min_count do not count: 2 agreeing then disagreement
    assert pl.agreement_cut([T, T, F, F, F, F], 0.5, min_count=5) == 0
    assert pl.agreement_cut([T, T, F, F, F, F], 0.5, min_count=4) == 4
    # a list shorter than min_count is judged whole
    assert pl.agreement_cut([T, T, F], 0.6, min_count=5) == 3
    assert pl.agreement_cut([F, F, F, F, F, F], 0.1) == 0
    assert pl.agreement_cut([], 0.5) == 0
    # a late run of agreement lifts a bad start back over the rate
    assert pl.agreement_cut([F, F, T, T, T, T, T, T], 0.7, min_count=1) == 8


def test_novel_views_drop_only_the_own_pose_of_pseudo_labelled_sources():
    off = pl.offset_grid(np.radians(15), 1, np.radians(10), 0)          # 0, -15, +15 deg
    keep = pl.novel_views(off, [True, False, False])
    np.testing.assert_array_equal(keep, [True, True, True, False, True, True, False, True, True])
    assert pl.novel_views(off, np.zeros(0, bool)).shape == (0,)


def test_selection_rejects_bad_values():
    with pytest.raises(ValueError, match="threshold"):
        pl.Selection(threshold=float("nan"))
    with pytest.raises(ValueError, match="max_new"):
        pl.Selection(max_new=-1)


def test_distance_scales_multiply_the_source_distance_and_keep_the_own_pose_rule():
    off = pl.offset_grid(np.radians(15), 1, np.radians(10), 0)          # 3 offsets
    src = np.array([[0.5, 0.1, 0.0, 5.0], [1.0, 0.2, 0.1, 4.0]], np.float32)
    t = pl.propose_targets(src, off, distance_scales=(0.9, 1.0, 1.1))
    assert t.shape == (2, 9, 4)
    np.testing.assert_allclose(t[1, :, 3], [3.6] * 3 + [4.0] * 3 + [4.4] * 3, rtol=1e-6)
    np.testing.assert_allclose(t[0, 3:6, :3], pl.propose_targets(src, off)[0, :, :3])
    keep = pl.novel_views(off, [True, False], (0.9, 1.0, 1.1))
    assert keep.shape == (18,)
    assert np.flatnonzero(~keep).tolist() == [9 + 3]                  # source 1, scale 1, zero
    with pytest.raises(ValueError, match="distance_scales"):
        pl.propose_targets(src, off, distance_scales=(0.0,))


def test_table_report_against_a_hand_built_table():
    # views at azimuth 0, 90, 180 deg; images truly at 0, 90, 180, 270 deg
    views = geometry.make_pose(np.radians([0.0, 90.0, 180.0]), 0.1, 0.0, 5.0, xnp=np)
    truth = geometry.make_pose(np.radians([0.0, 90.0, 180.0, 270.0]), 0.1, 0.0,
                               np.array([5.0, 5.0, 4.0, 5.0]), xnp=np)
    scores = np.array([[0.9, 0.1, 0.6, 0.2],       # image 0 right (0.9)
                       [0.2, 0.8, 0.1, 0.7],       # image 1 right (0.8); image 3 wrong (0.7)
                       [0.1, 0.3, 0.5, 0.1]])      # image 2: best view 0 (0.6) wrong, right 0.5
    rep = pl.table_report(scores, views, truth, ks=(1, 2, 4))
    assert rep["precision@1"] == 1.0 and rep["precision@2"] == 1.0
    assert rep["precision@4"] == 0.5
    assert rep["best_view_right"] == 0.5 and rep["right_view_exists"] == 0.75
    assert rep["gap"] == pytest.approx(0.5 - 0.6)             # only image 2 counts
    assert rep["by_sector"][0] == 1.0 and rep["by_sector"][6] == 0.0 and rep["by_sector"][9] == 0.0
    assert rep["by_sector"][1] is None
    d = rep["precision_by_distance_error"]
    assert [b["count"] for b in d] == [3, 0, 1]                # image 2: 5 vs 4 -> 25 %
    assert d[2]["precision"] == 0.0
    # The solver: right on images 0 and 2, agrees with the (right) match of image 0
    # and the (wrong) match of image 3, disagrees with the others.
    solver = geometry.make_pose(np.radians([5.0, 200.0, 180.0, 95.0]), 0.1, 0.0, 5.0, xnp=np)
    rep = pl.table_report(scores, views, truth, ks=(1, 2, 4), solver_poses=solver,
                          agree_angle=np.radians(30.0))
    assert rep["solver_right"] == 0.5
    # score order: image 0 (0.9), 1 (0.8), 3 (0.7), 2 (0.6); agreeing: 0, 3
    assert rep["agree@1"] == 1.0 and rep["agree@2"] == 0.5 and rep["agree@4"] == 0.5
    assert rep["precision_agree@1"] == 1.0 and rep["precision_agree@2"] == 0.5
    assert rep["num_agree"] == 2
    assert rep["precision_agreeing_top"] == 0.5 and rep["precision_disagreeing_top"] == 0.5


def test_select_on_a_table_across_the_azimuth_seam():
    """Views at azimuth 355, 5, 120 and 240 deg (elevation 0.2): 355 and 5 deg are
    10 deg apart (geodesic), so a high score at 5 deg is no rival to the best view at
    355 deg; 120 and 240 deg are 120 deg apart. Rule: threshold 0.5 (inclusive),
    margin 0.05 over views more than 30 deg away. By hand:
    img0: best 355 (0.90), rival far views 0.30 -> accepted at 355 deg, from source 10
          (a plain |azimuth difference| would call 5 deg far: lead 0.02, rejected);
    img1: best 120 (0.70), 240 deg at 0.68 -> lead 0.02 < 0.05, rejected;
    img2: best 120 at exactly the threshold 0.5 -> accepted, from source 12;
    img3: best 240 (0.49) -> under the threshold, rejected;
    img4: best 5 (0.95) but no longer a candidate -> rejected;
    img5: best 240 (0.80), rivals 0.10 -> accepted, from source 13 (pseudo-labelled).
    Accepted in score order: img0, img5, img2; max_new=2 keeps img0 and img5."""
    view_poses = geometry.make_pose(np.radians([355.0, 5.0, 120.0, 240.0]), 0.2, 0.0, 5.0, xnp=np)
    scores = np.array([
        [0.90, 0.10, 0.10, 0.10, 0.10, 0.10],
        [0.88, 0.10, 0.10, 0.20, 0.95, 0.10],
        [0.30, 0.70, 0.50, 0.10, 0.10, 0.10],
        [0.30, 0.68, 0.10, 0.49, 0.10, 0.80],
    ], np.float32)
    source, labelled = np.array([10, 11, 12, 13]), np.array([True, True, True, False])
    candidates = np.array([True, True, True, True, False, True])
    rule = pl.Selection(threshold=0.5, margin=0.05, margin_angle=np.radians(30.0))
    out = pl.select(scores, view_poses, source, labelled, rule, round_index=2,
                    candidates=candidates)
    np.testing.assert_array_equal(out.index, [0, 5, 2])
    np.testing.assert_allclose(out.poses, view_poses[[0, 3, 2]], atol=1e-6)
    np.testing.assert_allclose(out.score, [0.90, 0.80, 0.50], atol=1e-6)
    np.testing.assert_array_equal(out.source, [10, 13, 12])
    np.testing.assert_array_equal(out.source_is_labelled, [True, False, True])
    np.testing.assert_array_equal(out.round, [2, 2, 2])
    capped = pl.select(scores, view_poses, source, labelled,
                       pl.Selection(0.5, 0.05, np.radians(30.0), max_new=2), round_index=2,
                       candidates=candidates)
    np.testing.assert_array_equal(capped.index, [0, 5])
    # without the margin rule img1 passes at 120 deg (0.70), ranked between img0 and img5
    loose = pl.select(scores, view_poses, source, labelled,
                      pl.Selection(0.5, -1.0, np.radians(30.0)), round_index=2,
                      candidates=candidates)
    np.testing.assert_array_equal(loose.index, [0, 5, 1, 2])


def _scipy_rotation(a, e, t):
    """The PASCAL3D+ rotation Rz(t) Rx(-(pi/2 - e)) Rz(-a), built by scipy."""
    from scipy.spatial.transform import Rotation
    return Rotation.from_euler("ZXZ", [t, -(np.pi / 2 - e), -a]).as_matrix()


def test_symmetric_poses_are_the_object_turned_half_way_and_mirrored():
    # oracle: the opposite view is the object turned by pi about its vertical (z) axis,
    # R(opp) = R(p) Rz(pi); the mirror view is the image and the object reflected in x,
    # R(mirror) = D R(p) D with D = diag(-1, 1, 1); the third is both
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(0)
    p = np.stack([rng.uniform(0, 2 * np.pi, 6), rng.uniform(-0.3, 0.8, 6),
                  rng.uniform(-0.4, 0.4, 6), np.full(6, 5.0)], -1)
    sym = pl.symmetric_poses(p)
    assert sym.shape == (6, 3, 4)
    assert np.all((sym[..., 0] >= 0) & (sym[..., 0] < 2 * np.pi))
    np.testing.assert_allclose(sym[..., 3], 5.0)
    rz = Rotation.from_euler("z", np.pi).as_matrix()
    d = np.diag([-1.0, 1.0, 1.0])
    for i in range(6):
        r = _scipy_rotation(*p[i, :3])
        want = [r @ rz, d @ r @ d, d @ r @ rz @ d]
        for j in range(3):
            np.testing.assert_allclose(_scipy_rotation(*sym[i, j, :3]), want[j], atol=1e-9)
    with pytest.raises(ValueError, match="M, >=3"):
        pl.symmetric_poses(np.zeros(4))


def test_flip_margins_compare_with_the_symmetric_views_only():
    az = np.radians([0, 10, 180, 90, 270, 45])
    vp = geometry.make_pose(az, 0.2, 0.0, 5.0, xnp=np)
    scores = np.array([
        # img0: best view 0 deg; its near twin at 10 deg does not count, 180 deg does
        # img1: best view 90 deg; its opposite and mirror are 270 deg (0.5), pi - a is itself
        # img2: best view 45 deg; no view lies near 225 / 315 / 135 deg -> +inf
        [0.90, 0.10, 0.10],
        [0.89, 0.10, 0.10],
        [0.85, 0.20, 0.10],
        [0.10, 0.80, 0.10],
        [0.20, 0.50, 0.10],
        [0.10, 0.10, 0.70],
    ])
    best = scores.argmax(0)
    fm = pl.flip_margins(scores, vp, best, np.radians(20), np.radians(30))
    np.testing.assert_allclose(fm[:2], [0.90 - 0.85, 0.80 - 0.50])
    assert fm[2] == np.inf
    # select: a flip margin of 0.1 rejects img0 only
    out = pl.select(scores, vp, np.arange(6), np.ones(6, bool),
                    pl.Selection(flip_margin=0.1), round_index=1)
    np.testing.assert_array_equal(np.sort(out.index), [1, 2])


def test_select_caps_per_source_and_per_sector_in_score_order():
    az = np.radians([5, 15, 100, 110, 200])
    vp = geometry.make_pose(az, 0.2, 0.0, 5.0, xnp=np)
    source = np.array([0, 0, 1, 1, 0])            # view 3: pool image 1, not anchor 1
    labelled = np.array([True, True, True, False, True])
    # image i's best view is view best[i] with score s[i]
    best = np.array([0, 1, 2, 3, 4, 0])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    scores = np.full((5, 6), 0.0)
    scores[best, np.arange(6)] = s
    one = pl.select(scores, vp, source, labelled, pl.Selection(max_per_source=1), round_index=1)
    # anchor 0 (views 0, 1, 4) gives only its best image; anchor 1 and pool image 1 one each
    np.testing.assert_array_equal(one.index, [0, 2, 3])
    sec = pl.select(scores, vp, source, labelled, pl.Selection(max_per_sector=1), round_index=1)
    # sectors of 30 deg: 5 and 15 deg share sector 0, 100 and 110 deg sector 3
    np.testing.assert_array_equal(sec.index, [0, 2, 4])
    both = pl.select(scores, vp, source, labelled,
                     pl.Selection(max_per_source=2, max_per_sector=2, max_new=3), round_index=1)
    np.testing.assert_array_equal(both.index, [0, 1, 2])
    with pytest.raises(ValueError, match="max_per_source"):
        pl.Selection(max_per_source=0)
    with pytest.raises(ValueError, match="flip_margin"):
        pl.Selection(flip_margin=np.nan)


def test_oracle_labels_swap_in_the_hidden_poses_as_named():
    hidden = geometry.make_pose(np.radians([0, 40, 80, 120, 160, 200]), 0.1, 0.0, 5.0,
                                xnp=np).astype(np.float32)
    matched = hidden[[1, 3, 5]].copy()
    matched[0, 0] += np.radians(20)           # 20 deg off
    matched[1, 0] += np.pi                    # a flip (180 deg)
    new = pl.PseudoLabels(np.array([1, 3, 5]), matched, np.array([0.9, 0.8, 0.7], np.float32),
                          np.array([0, 1, 2]), np.ones(3, bool), np.full(3, 2))
    cand = np.array([True, True, False, True, False, True])
    same = pl.oracle_labels("none", new, hidden, cand, np.random.default_rng(0))
    assert same is new
    true = pl.oracle_labels("true_poses", new, hidden, cand, np.random.default_rng(0))
    np.testing.assert_array_equal(true.index, new.index)
    np.testing.assert_allclose(true.poses, hidden[[1, 3, 5]])
    keep = pl.oracle_labels("true_but_flips", new, hidden, cand, np.random.default_rng(0))
    np.testing.assert_allclose(keep.poses[[0, 2]], hidden[[1, 5]])
    np.testing.assert_allclose(keep.poses[1], matched[1])
    rnd = pl.oracle_labels("random_true", new, hidden, cand, np.random.default_rng(3))
    assert len(rnd) == 3 and set(rnd.index.tolist()) <= {0, 1, 3, 5}
    np.testing.assert_allclose(rnd.poses, hidden[rnd.index])
    np.testing.assert_array_equal(rnd.round, [2, 2, 2])
    again = pl.oracle_labels("random_true", new, hidden, cand, np.random.default_rng(3))
    np.testing.assert_array_equal(again.index, rnd.index)
    with pytest.raises(ValueError, match="nvsm_oracle"):
        pl.oracle_labels("truth", new, hidden, cand, np.random.default_rng(0))


def test_label_quality_by_hand():
    true = geometry.make_pose(np.radians([10, 100, 190, 280, 350]), 0.1, 0.0, 5.0, xnp=np)
    pred = true.copy()
    pred[1, 0] += np.radians(40)              # 40 deg (elevation 0.1 rad: geodesic ~ 40)
    pred[2, 0] += np.pi                       # a flip
    q = pl.label_quality(pred, true)
    err = np.degrees(geometry.pose_error(pred, true))
    assert err[2] > 150 and 35 < err[1] < 41
    assert q["count"] == 5 and q["flip_rate"] == 0.2 and q["acc_pi_6"] == 0.6
    assert q["median_err_deg"] == pytest.approx(0.0, abs=1e-4)
    assert q["sectors_covered"] == 5          # sectors 0, 3, 6, 9, 11 of the true azimuths
    assert pl.label_quality(np.zeros((0, 4)), np.zeros((0, 4)))["median_err_deg"] is None
