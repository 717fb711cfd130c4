"""Few-shot splits: a few labelled images, the rest of the pool without poses.

Anchor rule ``"azimuth_ring"`` (default; the paper picked its 7 anchors by
hand, and this is the pick of a person choosing informative views): the first
:data:`NUM_ANCHORS` images are the ones geodesically closest to the upright
views (theta 0) at the pool's median elevation and the azimuths
``2 pi k / NUM_ANCHORS`` (k = 0 is the front view); the later ones continue by
farthest-point sampling from them (below). On the synthetic car it gives NeMo
on 7 images 8-13 more points of ACC@pi/6 than ``"pose_coverage"``
(WORKSPACE.md, "Anchor rule").

Rule ``"pose_coverage"`` (the default before that measurement):

1. every image's rotation ``R_i = rotation_pascal(azimuth, elevation, theta)``;
2. the *mean rotation* is the chordal mean (``sum_i R_i`` projected onto SO(3)
   by SVD); the first anchor is the image whose rotation is geodesically
   closest to it;
3. farthest-point sampling in rotation space: each next image is the one whose
   geodesic distance to the already chosen set is largest (ties: the first
   in a permutation of the pool drawn from ``seed``, so seed 0 and a pool
   without ties give the same order for any seed). Spreading over the whole
   rotation space, it also picks the extreme elevations and in-plane angles.

Neither order depends on ``num_labelled``, so the first 7 (the
anchors) are inside the first 20, which are inside the first 50: the annotated
subsets are nested. Rule ``"random"``: a seeded permutation (also nested).

The unlabelled part is an :class:`UnlabelledSet`, which holds **no pose at
all** (it is built from images, focal and principal only, never from the
PoseSet's pose array), so training code cannot read hidden labels from it.
Evaluation/reporting code reads them separately with :func:`hidden_poses`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nvsm_jax import geometry
from nvsm_jax.data.loaders import PoseSet

__all__ = ["UnlabelledSet", "FewShotSplit", "make_fewshot_split", "hidden_poses",
           "anchor_order", "split_from_config", "NUM_ANCHORS", "ANCHOR_RULES",
           "DEFAULT_ANCHOR_RULE"]

NUM_ANCHORS = 7
ANCHOR_RULES = ("azimuth_ring", "pose_coverage", "random")
DEFAULT_ANCHOR_RULE = "azimuth_ring"


@dataclasses.dataclass(frozen=True)
class UnlabelledSet:
    """Images of one category without any pose.

    images: [N, H, W, 3] uint8; focal: [N] pixels; principal: [N, 2].
    """

    category: str
    names: tuple[str, ...]
    images: np.ndarray
    focal: np.ndarray
    principal: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])


@dataclasses.dataclass(frozen=True)
class FewShotSplit:
    """labelled: the first 7 rows are the anchors (nested 7 < 20 < 50)."""

    labelled: PoseSet
    unlabelled: UnlabelledSet

    @property
    def anchors(self) -> PoseSet:
        return self.labelled.subset(np.arange(min(NUM_ANCHORS, len(self.labelled))))


def _rotations(poses):
    p = np.asarray(poses, np.float64)
    return geometry.rotation_pascal(p[:, 0], p[:, 1], p[:, 2], xnp=np)


def anchor_order(poses: np.ndarray, *, rule: str = DEFAULT_ANCHOR_RULE, seed: int = 0,
                 count: int | None = None) -> np.ndarray:
    """The order in which images become labelled (first ``count`` of it).

    poses: [N, >=3]. Returns int64 indices, length ``min(count, N)``.
    """
    n = len(poses)
    count = n if count is None else min(count, n)
    rng = np.random.default_rng([seed, 7177])
    if rule not in ANCHOR_RULES:
        raise ValueError(f"unknown anchor rule {rule!r}; expected one of {ANCHOR_RULES}")
    if rule == "random":
        return rng.permutation(n)[:count].astype(np.int64)
    if count <= 0:
        return np.zeros(0, np.int64)
    rot = _rotations(poses)                                       # [N, 3, 3]

    def dist_to(r):                                               # geodesic angle to r
        cos = (np.einsum("nij,ij->n", rot, r) - 1.0) / 2.0
        return np.arccos(np.clip(cos, -1.0, 1.0))

    perm = rng.permutation(n)                                     # tie-breaking order

    def nearest(r, taken):
        d = dist_to(r)
        d[taken] = np.inf
        return int(perm[np.argmin(np.round(d[perm], 9))])

    if rule == "azimuth_ring":
        elevation = float(np.median(np.asarray(poses, np.float64)[:, 1]))
        views = geometry.rotation_pascal(2 * np.pi * np.arange(NUM_ANCHORS) / NUM_ANCHORS,
                                         np.full(NUM_ANCHORS, elevation), np.zeros(NUM_ANCHORS),
                                         xnp=np)
        order = []
        for r in views[:min(count, NUM_ANCHORS)]:
            order.append(nearest(r, order))
    else:
        u, _, vt = np.linalg.svd(rot.sum(0))
        mean = u @ np.diag([1, 1, np.sign(np.linalg.det(u @ vt))]) @ vt
        order = [nearest(mean, [])]
    mind = np.min([dist_to(rot[i]) for i in order], axis=0)
    mind[order] = -1.0
    while len(order) < count:
        nxt = int(perm[np.argmax(np.round(mind[perm], 9))])
        order.append(nxt)
        mind = np.minimum(mind, dist_to(rot[nxt]))
        mind[order] = -1.0
    return np.asarray(order, np.int64)


def make_fewshot_split(train: PoseSet, num_labelled: int, *, rule: str = DEFAULT_ANCHOR_RULE,
                       seed: int = 0) -> FewShotSplit:
    """Splits a training pool into ``num_labelled`` labelled images and the rest.

    The labelled images come in the anchor order (see module doc), so
    ``make_fewshot_split(t, 7).labelled`` is the first 7 rows of
    ``make_fewshot_split(t, 20).labelled``, etc.
    """
    if not 1 <= num_labelled <= len(train):
        raise ValueError(f"num_labelled={num_labelled} must be in [1, {len(train)}]")
    order = anchor_order(train.poses, rule=rule, seed=seed, count=num_labelled)
    labelled = train.subset(order)
    rest = np.setdiff1d(np.arange(len(train)), order)           # pool order
    unlabelled = UnlabelledSet(category=train.category,
                               names=tuple(train.names[i] for i in rest),
                               images=train.images[rest],
                               focal=train.focal[rest].copy(),
                               principal=train.principal[rest].copy())
    return FewShotSplit(labelled=labelled, unlabelled=unlabelled)


def split_from_config(train: PoseSet, num_labelled: int, config) -> FewShotSplit:
    """:func:`make_fewshot_split` with ``config.anchor_rule`` (default
    :data:`DEFAULT_ANCHOR_RULE`) and ``config.seed``: every method of an experiment
    takes its labelled images from here, so they share one split."""
    rule = getattr(config, "anchor_rule", None) or DEFAULT_ANCHOR_RULE
    return make_fewshot_split(train, num_labelled, rule=rule, seed=config.seed)


def hidden_poses(train: PoseSet, names) -> np.ndarray:
    """The ground-truth poses of ``names`` (e.g. an UnlabelledSet's names).

    **For evaluation and reporting only** (pseudo-label accuracy etc.): training
    code must never call this. Raises KeyError for a name not in ``train``.
    Returns [len(names), 4] float32.
    """
    index = {n: i for i, n in enumerate(train.names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise KeyError(f"hidden_poses: {len(missing)} names not in the {train.category} pool, "
                       f"e.g. {missing[:3]}")
    return train.poses[[index[n] for n in names]].copy()
