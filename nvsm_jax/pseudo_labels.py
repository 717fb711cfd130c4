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
* **Acceptance** (:func:`select`). Under the default rule each unlabelled image
  takes its best view; under ``view_top`` each view claims its best images by
  per-view z-score, which keeps views with a large silhouette from claiming
  everything (at 64 px it was the better rule, at 128 px the worse one:
  WORKSPACE.md). The view gives a candidate pose. It is accepted when (a) its
  score passes ``threshold``, (b) it beats the best view whose pose lies more
  than ``margin_angle`` away by at least ``margin`` (a consistency rule: the
  match must prefer *this* pose over distant ones), and (c) it is within the
  ``max_new`` best-scoring candidates of the round (at most ``bin_quota`` per
  azimuth sector, if set). Optionally (d) the NeMo render-and-compare solver,
  run over its initial pose grid with the current vertex memory, must agree
  with the matched pose within ``agree_angle`` (:func:`agree_with_solver`). Each
  pseudo-label records its source, score and round.
* **Coverage** (:func:`coverage`): the fraction of azimuth x elevation bins that
  hold at least one labelled or pseudo-labelled pose; expansion stops when it is
  full or when nothing new passes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nvsm_jax import geometry

__all__ = ["PseudoLabels", "offset_grid", "propose_targets", "novel_views", "standardize_views",
           "select", "agree_with_solver", "coverage"]


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


def novel_views(offsets, source_is_labelled) -> np.ndarray:
    """Which views to keep when pseudo-labelled sources may not propose their own pose.

    offsets: [K, 4] (:func:`offset_grid`); source_is_labelled: [S] bool ->
    [S * K] bool in the row order of :func:`propose_targets` (source-major):
    False for the zero offset of every source that is not labelled.
    """
    offsets = np.asarray(offsets)
    labelled = np.asarray(source_is_labelled, bool).reshape(-1)
    zero = np.all(offsets == 0, axis=-1)                                  # [K]
    return ~(zero[None, :] & ~labelled[:, None]).reshape(-1)


def propose_targets(source_poses, offsets, elevation_range=(-np.pi / 2, np.pi / 2)) -> np.ndarray:
    """Target poses around every source.

    source_poses: [S, 4]; offsets: [K, 4] -> [S, K, 4] with azimuth wrapped to
    [0, 2 pi) and elevation clipped to ``elevation_range``.
    """
    source_poses = np.asarray(source_poses, np.float32)
    if source_poses.ndim != 2 or source_poses.shape[-1] != 4:
        raise ValueError(f"source_poses must be [S, 4], got {source_poses.shape}")
    if not np.all(np.isfinite(source_poses)):
        raise ValueError("source_poses contain NaN or Inf")
    t = source_poses[:, None, :] + np.asarray(offsets, np.float32)[None]
    t[..., 0] = np.mod(t[..., 0], 2 * np.pi)
    t[..., 1] = np.clip(t[..., 1], *elevation_range)
    return t


def standardize_views(scores, candidates):
    """Per-view z-scores over the candidate images: [K, N] -> [K, N].

    Removes a view's overall bias (a side view of a car, with its large
    silhouette, scores well against every image) before views compete.
    """
    c = scores[:, candidates]
    mean = c.mean(axis=1, keepdims=True) if c.size else 0.0
    std = c.std(axis=1, keepdims=True) + 1e-6 if c.size else 1.0
    return (scores - mean) / std


def select(scores, view_poses, view_source, view_source_is_labelled, *, threshold: float,
           margin: float, margin_angle: float, max_new: int | None, round_index: int,
           candidates=None, rule: str = "image_best", per_view: int = 1,
           z_threshold: float | None = None, bin_quota: int | None = None,
           quota_bins: int = 12, view_cap: int | None = None,
           view_cell: tuple[float, float] = (np.radians(15.0), np.radians(10.0))) -> PseudoLabels:
    """Accepts pseudo-labels from a score table.

    scores: [K, N] score of view k against unlabelled image n.
    view_poses: [K, 4]; view_source: [K] int; view_source_is_labelled: [K] bool.
    candidates: [N] bool, images still unlabelled (default all).
    rule: ``"image_best"`` - each image takes its best view; ``"view_top"`` -
      each view claims its ``per_view`` best images by per-view z-score
      (:func:`standardize_views`), an image claimed by several views takes the
      one with the highest z-score, and candidates are ranked by it
      (``z_threshold`` optionally bounds it from below).
    bin_quota: at most this many images per azimuth sector (``quota_bins``
      equal sectors of the matched pose's azimuth), taken best first. Raw scores
      favour poses with large silhouettes (a car's sides): without a quota a
      round's best matches pile up there and the pose space is never covered.
    view_cap: at most this many images per matched-pose cell (``view_cell`` =
      (azimuth, elevation) cell size in radians), taken best first: after a few
      M-steps a handful of views near the densest pseudo-labels outscore the
      right view for many images (hubs), and the cap keeps each view pose to its
      best few claims. It raised late-round precision on stored score tables
      but not in a full run (WORKSPACE.md), so the experiment leaves it off.
    Returns the accepted images as :class:`PseudoLabels` (sorted by rank, best
    first). ``max_new=None`` accepts every image that passes.
    """
    scores = np.asarray(scores, np.float32)
    view_poses = np.asarray(view_poses, np.float32)
    k, n = scores.shape
    if k == 0 or n == 0:
        return PseudoLabels.empty()
    if candidates is None:
        candidates = np.ones(n, bool)
    candidates = np.asarray(candidates, bool)
    if rule == "image_best":
        best = np.argmax(scores, axis=0)                              # [N]
        rank = scores[best, np.arange(n)]
        claimed = np.ones(n, bool)
    elif rule == "view_top":
        z = standardize_views(scores, candidates)
        z = np.where(candidates[None], z, -np.inf)
        top = np.argsort(-z, axis=1, kind="stable")[:, :per_view]     # [K, per_view]
        claims = np.full((k, n), -np.inf, np.float32)
        rows = np.repeat(np.arange(k), top.shape[1])
        claims[rows, top.ravel()] = z[rows, top.ravel()]
        best = np.argmax(claims, axis=0)
        rank = claims[best, np.arange(n)]
        claimed = np.isfinite(rank)
        if z_threshold is not None:
            claimed &= rank >= z_threshold
    else:
        raise ValueError(f"unknown selection rule {rule!r} (use 'image_best' or 'view_top')")
    best_score = scores[best, np.arange(n)]
    # Geodesic distance of every view's pose to each image's best pose: [K, N]
    dist = geometry.pose_error(view_poses[:, None, :].astype(np.float64),
                               view_poses[best][None].astype(np.float64))
    far = np.where(dist > margin_angle, scores, -np.inf)
    runner_up = far.max(axis=0)
    ok = candidates & claimed & (best_score >= threshold) & (best_score - runner_up >= margin)
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-rank[idx], kind="stable")]
    if bin_quota is not None:
        sector = geometry.azimuth_sector(view_poses[best[idx], 0], quota_bins)
        idx = idx[_first_per_group(sector, int(bin_quota))]
    if view_cap is not None:
        idx = idx[_first_per_group(pose_cell(view_poses[best[idx]], *view_cell), int(view_cap))]
    if max_new is not None:
        idx = idx[:max_new]
    view = best[idx]
    return PseudoLabels(index=idx.astype(np.int64), poses=view_poses[view],
                        score=best_score[idx], source=np.asarray(view_source)[view].astype(np.int64),
                        source_is_labelled=np.asarray(view_source_is_labelled)[view].astype(bool),
                        round=np.full(len(idx), round_index, np.int64))


def pose_cell(poses, azimuth_step: float, elevation_step: float) -> np.ndarray:
    """Cell of each pose on an azimuth x elevation grid centred on multiples of
    the steps (azimuth wraps): poses [M, 4] -> [M] int."""
    poses = np.asarray(poses, np.float64)
    cols = int(round(2 * np.pi / azimuth_step))
    a = np.round(np.mod(poses[:, 0], 2 * np.pi) / azimuth_step).astype(np.int64) % cols
    e = np.round(poses[:, 1] / elevation_step).astype(np.int64)
    return e * cols + a


def _first_per_group(groups, quota: int) -> np.ndarray:
    """Positions of the first ``quota`` members of each group, in input order."""
    groups = np.asarray(groups)
    seen: dict = {}
    keep = []
    for i, g in enumerate(groups.tolist()):
        if seen.get(g, 0) < quota:
            seen[g] = seen.get(g, 0) + 1
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
