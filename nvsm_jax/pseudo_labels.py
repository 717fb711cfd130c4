"""NVSM's E-step decisions as pure functions of arrays.

The reference never released its E-step; this is our design (WORKSPACE.md
records it and its measured effect):

* **Proposals.** Every *source* (a labelled or already pseudo-labelled image with
  a pose) proposes target poses a small step away: a grid of azimuth and
  elevation offsets (:func:`offset_grid`) added to its pose
  (:func:`propose_targets`). The source's own pose (offset 0) is included, so an
  unlabelled image that looks like the source itself is matched at its pose;
  :func:`novel_views` drops it for pseudo-labelled sources (``novel_views_only``:
  after an M-step has fitted them, their own, unsynthesised views win nearly all
  matches, so the E-step stops expanding).
* **Scores.** Views are synthesised from each source's features and matched
  against the unlabelled pool (:mod:`nvsm_jax.synthesis`, :mod:`nvsm_jax.matching`)
  -> a ``[num_views, num_images]`` score table.
* **Acceptance** (:func:`select`, settings in one :class:`Selection`). Each
  unlabelled image takes its best view, which gives a candidate pose. It is
  accepted when (a) its score passes ``threshold``, (b) it beats the best view
  whose pose lies more than ``margin_angle`` away by at least ``margin`` (a
  consistency rule: the match must prefer *this* pose over distant ones), and
  (c) it is within the ``max_new`` best-scoring candidates of the round.
  Optionally (d) the NeMo render-and-compare solver, run over its initial pose
  grid with the current vertex memory, must agree with the matched pose within
  ``agree_angle`` (:func:`agree_with_solver`); or (e) the safeguard: the
  current model's full render-and-compare runs on the round's candidates and
  the round keeps the longest score-ranked prefix that agrees with it at a
  given rate, none when no prefix does (:func:`agreement_cut`; the E-step's
  ``agreement_rate``). Each pseudo-label records its source, score and round.

  Rules measured, rejected and removed (the tree at commit 955f0d5 still has them;
  WORKSPACE.md, "E-step selection" and the 128 px variants, has the figures):
  per-view z-score claims (``view_top`` / ``per_view`` / ``z_threshold``; at
  128 px top-10/30/60 precision 0.50 / 0.33 / 0.35 against 0.70 / 0.70 / 0.60
  for the best view per image), an azimuth-sector quota (``bin_quota*``;
  precision 0.50 / 0.56 and L0 28 / 31 after rounds 1 / 2), a per-pose-cell
  cap (``view_cap``; up on stored tables, but in the full run 37 facing flips
  among 180 pseudo-labels against 21, L0 35), re-selection from the anchors
  every round (``reselect``; it re-selects its own mistakes and tracks the
  cumulative run), and ``frontier_only`` (never measured).
* **Coverage** (:func:`coverage`): the fraction of azimuth x elevation bins that
  hold at least one labelled or pseudo-labelled pose; expansion stops when it is
  full or when nothing new passes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nvsm_jax import geometry

__all__ = ["PseudoLabels", "Selection", "offset_grid", "propose_targets", "novel_views", "table_report",
           "select", "agree_with_solver", "agreement_cut", "coverage"]


@dataclasses.dataclass
class PseudoLabels:
    """The growing set of pseudo-labels (host numpy arrays, one row per image).

    index: [M] int, position in the unlabelled pool.
    poses: [M, 4] float32 matched (or refined) poses.
    score: [M] float32 matching score at acceptance.
    source: [M] int, the source's id (see ``source_is_labelled``).
    source_is_labelled: [M] bool, whether ``source`` indexes the labelled set
      (True) or the unlabelled pool (a pseudo-labelled source).
    round: [M] int, the round that accepted it.
    """

    index: np.ndarray
    poses: np.ndarray
    score: np.ndarray
    source: np.ndarray
    source_is_labelled: np.ndarray
    round: np.ndarray

    @classmethod
    def empty(cls) -> "PseudoLabels":
        return cls(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                   np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.index)

    def extend(self, other: "PseudoLabels") -> "PseudoLabels":
        overlap = np.intersect1d(self.index, other.index)
        if len(overlap):
            raise ValueError(f"images {overlap[:5].tolist()} are already pseudo-labelled")
        return PseudoLabels(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                              for f in dataclasses.fields(self)))

    def take(self, rows) -> "PseudoLabels":
        """The rows ``rows`` (indices, a slice or a bool mask) as a new set."""
        return PseudoLabels(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    def to_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d) -> "PseudoLabels":
        return cls(**{f.name: np.asarray(d[f.name]) for f in dataclasses.fields(cls)})


def offset_grid(azimuth_step: float, azimuth_steps: int, elevation_step: float,
                elevation_steps: int) -> np.ndarray:
    """Pose offsets ``[K, 4]`` on a (2a+1) x (2e+1) azimuth x elevation grid.

    Offsets are ``(i * azimuth_step, j * elevation_step, 0, 0)`` for
    ``|i| <= azimuth_steps``, ``|j| <= elevation_steps`` (radians); row 0 is the
    zero offset.
    """
    ia = np.arange(-azimuth_steps, azimuth_steps + 1)
    ie = np.arange(-elevation_steps, elevation_steps + 1)
    a, e = np.meshgrid(ia * azimuth_step, ie * elevation_step, indexing="ij")
    off = np.stack([a.ravel(), e.ravel(), np.zeros(a.size), np.zeros(a.size)], -1)
    order = np.argsort(np.abs(off[:, 0]) + np.abs(off[:, 1]), kind="stable")
    return off[order].astype(np.float32)


def novel_views(offsets, source_is_labelled, distance_scales=(1.0,)) -> np.ndarray:
    """Which views to keep when pseudo-labelled sources may not propose their own pose.

    offsets: [K, 4] (:func:`offset_grid`); source_is_labelled: [S] bool;
    distance_scales: [D] (:func:`propose_targets`) -> [S * D * K] bool in the row
    order of :func:`propose_targets`: False for the zero offset at scale 1 of every
    source that is not labelled.
    """
    offsets = np.asarray(offsets)
    labelled = np.asarray(source_is_labelled, bool).reshape(-1)
    scales = np.asarray(distance_scales, np.float64).reshape(-1)
    zero = np.all(offsets == 0, axis=-1)                                  # [K]
    own = (scales == 1.0)[:, None] & zero[None, :]                        # [D, K]
    return ~(own.reshape(-1)[None, :] & ~labelled[:, None]).reshape(-1)


def propose_targets(source_poses, offsets, elevation_range=(-np.pi / 2, np.pi / 2),
                    distance_scales=(1.0,)) -> np.ndarray:
    """Target poses around every source.

    source_poses: [S, 4]; offsets: [K, 4]; distance_scales: [D] factors on the
    source's distance (the object's scale in the image is unknown up to them) ->
    [S, D * K, 4] (scale-major: the K offsets at scale 0, then at scale 1, ...),
    azimuth wrapped to [0, 2 pi) and elevation clipped to ``elevation_range``.
    """
    source_poses = np.asarray(source_poses, np.float32)
    if source_poses.ndim != 2 or source_poses.shape[-1] != 4:
        raise ValueError(f"source_poses must be [S, 4], got {source_poses.shape}")
    if not np.all(np.isfinite(source_poses)):
        raise ValueError("source_poses contain NaN or Inf")
    scales = np.asarray(distance_scales, np.float32).reshape(-1)
    if scales.size == 0 or not np.all(np.isfinite(scales) & (scales > 0)):
        raise ValueError(f"distance_scales must be positive, got {scales.tolist()}")
    t = source_poses[:, None, :] + np.asarray(offsets, np.float32)[None]   # [S, K, 4]
    t[..., 0] = np.mod(t[..., 0], 2 * np.pi)
    t[..., 1] = np.clip(t[..., 1], *elevation_range)
    t = np.repeat(t[:, None], len(scales), axis=1)                        # [S, D, K, 4]
    t[..., 3] *= scales[None, :, None]
    return t.reshape(len(source_poses), -1, 4)


@dataclasses.dataclass(frozen=True)
class Selection:
    """How :func:`select` accepts matches (the ``estep`` block's fields of the same name).

    threshold: minimum score of the best view (-1 = off for mean cosines).
    margin: its minimum lead over the best view whose pose lies more than
      ``margin_angle`` (radians) away (-1 = off).
    max_new: at most this many images per round, best first (None = all that pass).
    """

    threshold: float = -1.0
    margin: float = -1.0
    margin_angle: float = float(np.pi / 6)
    max_new: int | None = None

    def __post_init__(self):
        for name in ("threshold", "margin", "margin_angle"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"Selection.{name} must be finite, got {getattr(self, name)}")
        if self.max_new is not None and self.max_new < 0:
            raise ValueError(f"Selection.max_new must be >= 0 or None, got {self.max_new}")


def select(scores, view_poses, view_source, view_source_is_labelled, selection: Selection, *,
           round_index: int, candidates=None) -> PseudoLabels:
    """Accepts pseudo-labels from a score table: each image its best view, then
    ``selection``'s threshold, margin and per-round cap.

    scores: [K, N] score of view k against unlabelled image n.
    view_poses: [K, 4]; view_source: [K] int; view_source_is_labelled: [K] bool.
    candidates: [N] bool, images still unlabelled (default all).
    Returns the accepted images as :class:`PseudoLabels` (sorted by score, best
    first).
    """
    scores = np.asarray(scores, np.float32)
    view_poses = np.asarray(view_poses, np.float32)
    k, n = scores.shape
    if k == 0 or n == 0:
        return PseudoLabels.empty()
    if candidates is None:
        candidates = np.ones(n, bool)
    candidates = np.asarray(candidates, bool)
    best = np.argmax(scores, axis=0)                                  # [N]
    best_score = scores[best, np.arange(n)]
    # Geodesic distance of every view's pose to each image's best pose: [K, N]
    dist = geometry.pose_error(view_poses[:, None, :].astype(np.float64),
                               view_poses[best][None].astype(np.float64))
    far = np.where(dist > selection.margin_angle, scores, -np.inf)
    runner_up = far.max(axis=0)
    ok = (candidates & (best_score >= selection.threshold)
          & (best_score - runner_up >= selection.margin))
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-best_score[idx], kind="stable")]
    if selection.max_new is not None:
        idx = idx[:selection.max_new]
    view = best[idx]
    return PseudoLabels(index=idx.astype(np.int64), poses=view_poses[view],
                        score=best_score[idx], source=np.asarray(view_source)[view].astype(np.int64),
                        source_is_labelled=np.asarray(view_source_is_labelled)[view].astype(bool),
                        round=np.full(len(idx), round_index, np.int64))


def agree_with_solver(matched_poses, solver_poses, agree_angle: float) -> np.ndarray:
    """[M] bool: the matched pose lies within ``agree_angle`` (geodesic, radians)
    of the solver's pose. matched_poses, solver_poses: [M, 4]."""
    matched = np.asarray(matched_poses, np.float64).reshape(-1, 4)
    solved = np.asarray(solver_poses, np.float64).reshape(-1, 4)
    if matched.shape != solved.shape:
        raise ValueError(f"agree_with_solver: {matched.shape} matched vs {solved.shape} solver poses")
    return geometry.pose_error(matched, solved) <= agree_angle


def agreement_cut(agrees, min_rate: float, min_count: int = 5) -> int:
    """How many of a score-ranked list to accept: the longest prefix whose agreement
    rate is at least ``min_rate``, 0 when no prefix of at least ``min_count`` entries
    (or the whole list, if shorter) reaches it.

    agrees: [M] bool, best-scoring first (e.g. :func:`agree_with_solver` of the
    round's candidates). A label-free stopping rule: when the model's own
    render-and-compare disagrees with too many of the E-step's best matches, the
    round accepts nothing.
    """
    agrees = np.asarray(agrees, bool).reshape(-1)
    m = len(agrees)
    if m == 0:
        return 0
    k = np.arange(1, m + 1)
    rate = np.cumsum(agrees) / k
    ok = (rate >= min_rate - 1e-9) & (k >= min(int(min_count), m))
    return int(k[ok].max()) if np.any(ok) else 0


DEFAULT_ELEVATION_EDGES = tuple(np.radians([-10.0, 5.0, 20.0, 40.0]))


def coverage(poses, azimuth_bins: int = 12, elevation_edges=DEFAULT_ELEVATION_EDGES) -> float:
    """Fraction of azimuth x elevation bins holding at least one pose.

    poses: [M, >=2]. Elevations outside the edges are ignored. The default
    bins cover where PASCAL3D+ (and our synthetic set) puts most elevations:
    [-10, 5), [5, 20), [20, 40) degrees, by 12 azimuth sectors of 30 degrees.
    """
    poses = np.asarray(poses)
    edges = np.asarray(elevation_edges)
    n_el = len(edges) - 1
    if len(poses) == 0:
        return 0.0
    a_bin = geometry.azimuth_sector(poses[:, 0], azimuth_bins)
    e_bin = np.searchsorted(edges, poses[:, 1], side="right") - 1
    keep = (e_bin >= 0) & (e_bin < n_el)
    hit = np.zeros((azimuth_bins, n_el), bool)
    hit[a_bin[keep], e_bin[keep]] = True
    return float(hit.mean())


def table_report(scores, view_poses, true_poses, ks=(30, 60, 100), sectors: int = 12,
                 correct_angle: float = float(np.pi / 6), solver_poses=None,
                 agree_angle: float = float(np.pi / 6)) -> dict:
    """How good one E-step's score table is, against the hidden poses (reporting only).

    scores: [K, N]; view_poses: [K, 4]; true_poses: [N, 4] the pool's hidden poses.
    Each image's best view is right when its pose lies within ``correct_angle``.
    Returns ``precision@k`` (the k best-scoring images, the default acceptance
    order), ``right_view_exists`` (fraction of images some view gets right),
    ``best_view_right`` (fraction whose best view is right), ``by_sector`` (that
    fraction per ``sectors`` azimuth sectors of the true pose, and the counts),
    ``gap`` (mean score of the best right view minus the chosen wrong view's, over
    images whose best view is wrong but that have a right view: how far the right
    answer is from winning) and ``precision_by_distance_error`` (top max(ks)
    precision by the chosen view's |d / d_true - 1|: < 5 %, 5-10 %, >= 10 %).

    solver_poses: [N, 4], the current model's own render-and-compare prediction
    per pool image (optional). Adds ``solver_right`` (its accuracy on the pool),
    ``agree@k`` (fraction of the k best-scoring images whose match lies within
    ``agree_angle`` of the solver), ``precision_agree@k`` (precision of the k
    best-scoring *agreeing* images: the agreement rule's acceptance) and, over the
    top max(ks), the precision of the agreeing and of the disagreeing matches.
    """
    scores = np.asarray(scores, np.float64)
    view_poses = np.asarray(view_poses, np.float64)
    true_poses = np.asarray(true_poses, np.float64)
    k, n = scores.shape
    err = geometry.pose_error(view_poses[:, None, :], true_poses[None, :, :])   # [K, N]
    best = np.argmax(scores, axis=0)
    best_score = scores[best, np.arange(n)]
    right = err[best, np.arange(n)] < correct_angle
    order = np.argsort(-best_score, kind="stable")
    out = {f"precision@{kk}": float(np.mean(right[order[:kk]])) for kk in ks if kk <= n}
    has_right = (err < correct_angle).any(axis=0)
    out["right_view_exists"] = float(np.mean(has_right))
    out["best_view_right"] = float(np.mean(right))
    sector = geometry.azimuth_sector(true_poses[:, 0], sectors)
    out["by_sector"] = [float(np.mean(right[sector == i])) if np.any(sector == i) else None
                        for i in range(sectors)]
    out["sector_counts"] = [int(np.sum(sector == i)) for i in range(sectors)]
    right_score = np.where(err < correct_angle, scores, -np.inf).max(axis=0)
    lost = ~right & has_right
    out["gap"] = float(np.mean(right_score[lost] - best_score[lost])) if lost.any() else 0.0
    top = order[:max(ks)]
    rel = np.abs(view_poses[best[top], 3] / true_poses[top, 3] - 1.0)
    bins = [(0.0, 0.05), (0.05, 0.10), (0.10, np.inf)]
    out["precision_by_distance_error"] = [
        {"range": [lo, None if hi == np.inf else hi], "count": int(np.sum((rel >= lo) & (rel < hi))),
         "precision": float(np.mean(right[top][(rel >= lo) & (rel < hi)]))
         if np.any((rel >= lo) & (rel < hi)) else None} for lo, hi in bins]
    if solver_poses is not None:
        solver_poses = np.asarray(solver_poses, np.float64)
        out["solver_right"] = float(np.mean(geometry.pose_error(solver_poses, true_poses)
                                            < correct_angle))
        agree = geometry.pose_error(view_poses[best], solver_poses) <= agree_angle   # [N]
        agreeing = order[agree[order]]
        for kk in ks:
            if kk <= n:
                out[f"agree@{kk}"] = float(np.mean(agree[order[:kk]]))
                out[f"precision_agree@{kk}"] = (float(np.mean(right[agreeing[:kk]]))
                                                if len(agreeing) else None)
        out["num_agree"] = int(agree.sum())
        out["precision_agreeing_top"] = (float(np.mean(right[top][agree[top]]))
                                         if agree[top].any() else None)
        out["precision_disagreeing_top"] = (float(np.mean(right[top][~agree[top]]))
                                            if (~agree[top]).any() else None)
    return out
