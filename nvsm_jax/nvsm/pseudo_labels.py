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
  against the unlabelled pool (:mod:`nvsm_jax.nvsm.synthesis`, :mod:`nvsm_jax.nvsm.matching`)
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
  Issue 28 adds (f) a flip check: the best view must beat the best view near
  the matched pose's symmetric counterparts (:func:`symmetric_poses`: the
  opposite view and the two mirrors, the matches a front-to-back or left-right
  flip makes) by ``flip_margin`` (:func:`flip_margins`), and (g) caps per
  source and per 30-degree azimuth sector, applied best score first, so one
  easy source or one pose cannot take a whole round.
* **Diagnosis rows** (:func:`oracle_labels`, the experiment's ``nvsm_oracle``,
  reporting only): the round's acceptances at their hidden poses, the same with
  the flips kept, or as many images drawn uniformly at their hidden poses;
  :func:`label_quality` measures a pseudo-labelled set against the hidden poses
  (median error, flip rate, azimuth sectors covered).

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

from nvsm_jax import evaluation, geometry

__all__ = ["PseudoLabels", "Selection", "offset_grid", "propose_targets", "novel_views", "table_report",
           "select", "symmetric_poses", "flip_margins", "agree_with_solver", "agreement_cut",
           "coverage", "ORACLES", "oracle_labels", "label_quality"]


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
    flip_margin: minimum lead over the best view near the matched pose's
      symmetric counterparts (:func:`symmetric_poses`, within ``flip_window``
      radians; None = off): the label-free check against front-back and
      left-right flips.
    max_per_source: at most this many of a round's acceptances matched to views
      of one source (a source and its mirror image count as one; None = no cap).
    max_per_sector: at most this many per ``sectors`` azimuth sector of the
      matched pose (None = no cap).
    """

    threshold: float = -1.0
    margin: float = -1.0
    margin_angle: float = float(np.pi / 6)
    max_new: int | None = None
    flip_margin: float | None = None
    flip_window: float = float(np.radians(20.0))
    max_per_source: int | None = None
    max_per_sector: int | None = None
    sectors: int = 12

    def __post_init__(self):
        for name in ("threshold", "margin", "margin_angle", "flip_window"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"Selection.{name} must be finite, got {getattr(self, name)}")
        if self.flip_margin is not None and not np.isfinite(self.flip_margin):
            raise ValueError(f"Selection.flip_margin must be finite or None, "
                             f"got {self.flip_margin}")
        for name in ("max_new", "max_per_source", "max_per_sector"):
            v = getattr(self, name)
            if v is not None and v < (0 if name == "max_new" else 1):
                raise ValueError(f"Selection.{name} must be >= {0 if name == 'max_new' else 1} "
                                 f"or None, got {v}")
        if self.sectors < 1:
            raise ValueError(f"Selection.sectors must be >= 1, got {self.sectors}")


def symmetric_poses(poses) -> np.ndarray:
    """The poses an object symmetric front-to-back and left-to-right (a cuboid, a
    coarse mesh) shows alike or mirrored: [M, >=3] -> [M, 3, 4].

    For each pose (a, e, t, d): the opposite view (a + pi, e, t, d), the mirror
    view (2 pi - a, e, -t, d) and the mirror's opposite (pi - a, e, -t, d)
    (azimuths wrapped to [0, 2 pi)). These are the matches a flip makes.
    """
    p = np.asarray(poses, np.float64)
    if p.ndim != 2 or p.shape[-1] < 3:
        raise ValueError(f"symmetric_poses: poses must be [M, >=3], got {p.shape}")
    d = p[:, 3] if p.shape[-1] > 3 else np.zeros(len(p))
    a, e, t = p[:, 0], p[:, 1], p[:, 2]
    out = np.stack([np.stack([a + np.pi, e, t, d], -1),
                    np.stack([-a, e, -t, d], -1),
                    np.stack([np.pi - a, e, -t, d], -1)], 1)
    out[..., 0] = np.mod(out[..., 0], 2 * np.pi)
    return out


def flip_margins(scores, view_poses, best, window: float, exclude: float) -> np.ndarray:
    """Each image's best score minus its best score among the views near the best
    view's symmetric poses (:func:`symmetric_poses`, geodesic distance < ``window``)
    that lie at least ``exclude`` from the best view itself (a front view's mirror
    is itself). scores: [K, N]; view_poses: [K, 4]; best: [N] view index per image
    -> [N] (+inf where no view lies near a symmetric pose: nothing to check)."""
    scores = np.asarray(scores, np.float64)
    n = scores.shape[1]
    vp = np.asarray(view_poses, np.float64)
    views = np.unique(best)                              # the distinct best views
    sym = symmetric_poses(vp[views])                     # [U, 3, 4]
    rot = lambda p: geometry.rotation_pascal(p[..., 0], p[..., 1], p[..., 2], xnp=np)  # noqa: E731
    r_views, r_sym = rot(vp), rot(sym)                   # [K, 3, 3], [U, 3, 3, 3]
    near_sym = (geometry.rotation_error(r_views[None, None], r_sym[:, :, None], xnp=np)
                < window).any(1)                         # [U, K]
    own = geometry.rotation_error(r_views[None], r_views[views][:, None], xnp=np) < exclude
    rival = near_sym & ~own                              # [U, K]
    slot = np.searchsorted(views, best)                  # [N] row of each image's best view
    rival_score = np.where(rival[slot].T, scores, -np.inf).max(axis=0)              # [N]
    return scores[best, np.arange(n)] - rival_score


def select(scores, view_poses, view_source, view_source_is_labelled, selection: Selection, *,
           round_index: int, candidates=None) -> PseudoLabels:
    """Accepts pseudo-labels from a score table: each image its best view, then
    ``selection``'s threshold, margin and flip margin, then, best score first, the
    per-source, per-sector and per-round caps.

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
    view_source = np.asarray(view_source)
    view_source_is_labelled = np.asarray(view_source_is_labelled, bool)
    best = np.argmax(scores, axis=0)                                  # [N]
    best_score = scores[best, np.arange(n)]
    # Geodesic distance of every view's pose to each image's best pose: [K, N]
    dist = geometry.pose_error(view_poses[:, None, :].astype(np.float64),
                               view_poses[best][None].astype(np.float64))
    far = np.where(dist > selection.margin_angle, scores, -np.inf)
    runner_up = far.max(axis=0)
    ok = (candidates & (best_score >= selection.threshold)
          & (best_score - runner_up >= selection.margin))
    if selection.flip_margin is not None:
        ok &= flip_margins(scores, view_poses, best, selection.flip_window,
                           selection.margin_angle) >= selection.flip_margin
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-best_score[idx], kind="stable")]
    idx = _capped(idx, best, view_source, view_source_is_labelled, view_poses, selection)
    view = best[idx]
    return PseudoLabels(index=idx.astype(np.int64), poses=view_poses[view],
                        score=best_score[idx], source=view_source[view].astype(np.int64),
                        source_is_labelled=view_source_is_labelled[view],
                        round=np.full(len(idx), round_index, np.int64))


def _capped(idx, best, view_source, view_labelled, view_poses, selection: Selection):
    """The images ``idx`` (best first) that fit the per-source, per-sector and
    per-round caps, taken greedily in order."""
    if selection.max_per_source is None and selection.max_per_sector is None:
        return idx if selection.max_new is None else idx[:selection.max_new]
    view = best[idx]
    source = view_source[view] * 2 + view_labelled[view]            # (id, labelled) as one key
    sector = geometry.azimuth_sector(view_poses[view, 0], selection.sectors)
    inf = float("inf")
    cap_source = inf if selection.max_per_source is None else selection.max_per_source
    cap_sector = inf if selection.max_per_sector is None else selection.max_per_sector
    per_source, per_sector, keep = {}, {}, []
    for i, s, c in zip(idx, source, sector):
        if selection.max_new is not None and len(keep) >= selection.max_new:
            break
        if per_source.get(s, 0) >= cap_source or per_sector.get(c, 0) >= cap_sector:
            continue
        per_source[s] = per_source.get(s, 0) + 1
        per_sector[c] = per_sector.get(c, 0) + 1
        keep.append(i)
    return np.asarray(keep, np.int64)


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


FLIP_ANGLE = float(np.radians(150.0))
ORACLES = ("none", "true_poses", "true_but_flips", "random_true")


def oracle_labels(mode: str, new: PseudoLabels, hidden, candidates, rng) -> PseudoLabels:
    """A diagnosis row's round: the E-step's acceptances ``new`` changed by the hidden
    poses (reporting only, never a method: it reads the labels NVSM must not see).

    mode: ``"none"`` (``new`` as it is), ``"true_poses"`` (the same images at their
    true poses), ``"true_but_flips"`` (true poses, but matches off by more than
    :data:`FLIP_ANGLE` keep their wrong pose), ``"random_true"`` (as many images
    drawn uniformly from ``candidates``, at their true poses).
    hidden: [N, 4] the pool's true poses; candidates: [N] bool, images not yet
    labelled; rng: a ``np.random.Generator``.
    """
    if mode not in ORACLES:
        raise ValueError(f"nvsm_oracle={mode!r} (expected one of {ORACLES})")
    hidden = np.asarray(hidden, np.float32)
    if mode == "none" or len(new) == 0:
        return new
    if mode == "random_true":
        pool = np.flatnonzero(np.asarray(candidates, bool))
        idx = np.sort(rng.choice(pool, size=min(len(new), len(pool)), replace=False))
        m = len(idx)
        return PseudoLabels(idx.astype(np.int64), hidden[idx], np.full(m, np.nan, np.float32),
                            np.full(m, -1, np.int64), np.zeros(m, bool),
                            np.full(m, int(new.round[0]), np.int64))
    true = hidden[new.index]
    if mode == "true_but_flips":
        flipped = geometry.pose_error(np.asarray(new.poses, np.float64),
                                      true.astype(np.float64)) > FLIP_ANGLE
        true = np.where(flipped[:, None], new.poses, true)
    return dataclasses.replace(new, poses=true.astype(np.float32))


def label_quality(poses, true_poses, sectors: int = 12) -> dict:
    """How good a set of pseudo-labels is, against the hidden poses (reporting only).

    poses, true_poses: [M, 4] -> ``median_err_deg``, ``p90_err_deg``, ``acc_pi_6``,
    ``flip_rate`` (error > :data:`FLIP_ANGLE`), ``sectors_covered`` (of ``sectors``
    azimuth sectors, those holding the true pose of some pseudo-labelled image) and
    ``count``; errors None for an empty set.
    """
    poses = np.asarray(poses, np.float64).reshape(-1, 4)
    true_poses = np.asarray(true_poses, np.float64).reshape(-1, 4)
    if len(poses) == 0:
        return {"count": 0, "median_err_deg": None, "p90_err_deg": None, "acc_pi_6": None,
                "flip_rate": None, "sectors_covered": 0}
    err = evaluation.rotation_errors(poses, true_poses)          # radians, NaN-safe
    deg = np.degrees(err)
    return {"count": int(len(poses)), "median_err_deg": float(np.median(deg)),
            "p90_err_deg": float(np.percentile(deg, 90)),
            "acc_pi_6": float(np.mean(err < np.pi / 6)),
            "flip_rate": float(np.mean(err > FLIP_ANGLE)),
            "sectors_covered": int(len(np.unique(geometry.azimuth_sector(true_poses[:, 0],
                                                                          sectors))))}


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
