"""Cross-view pose retrieval benchmark.

Queries: every frame of one camera (``query_view``) of the test sequences.
Gallery: every frame of the *other* cameras of the same test set (all
sequences). For each query, the top-k gallery frames by embedding distance are
scored by the PA-MPJPE between the query's true pose and theirs (root-relative
camera-frame poses, mm). Reported: mean over queries of the mean PA-MPJPE of the
top-k (k = 1, 5, 10, 20) and Hit@k = the fraction of queries with at least one
of the top-k under ``threshold`` mm.

Cross-subject (:func:`cross_subject_scores`): the same queries, but each query's
gallery holds only the *other* test subjects' frames (of the other cameras), so
the person's appearance cannot lead to the right frame: only the pose can.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nvsm_jax.mcss import metrics

__all__ = ["retrieve", "retrieval_scores", "cross_subject_scores", "save_retrieval_figure"]


def retrieve(query_emb, gallery_emb, k: int, chunk: int = 1024) -> np.ndarray:
    """Top-``k`` gallery indices by Euclidean distance: [Q, k] int."""
    g = jnp.asarray(gallery_emb, jnp.float32)
    out = []
    for s in range(0, len(query_emb), chunk):
        q = jnp.asarray(query_emb[s:s + chunk], jnp.float32)
        d = (jnp.sum(q * q, -1)[:, None] + jnp.sum(g * g, -1)[None]
             - 2 * jnp.matmul(q, g.T, precision=jax.lax.Precision.HIGHEST))
        out.append(np.asarray(jax.lax.top_k(-d, k)[1]))
    return np.concatenate(out)


def retrieval_scores(emb: np.ndarray, pose3d: np.ndarray, view: np.ndarray, *, query_view: int = 0,
                     ks=(1, 5, 10, 20), threshold: float = 50.0) -> dict:
    """emb [N, D], pose3d [N, 17, 3] mm, view [N] -> dict with
    ``pa_mpjpe {k: mm}``, ``hit {k: fraction}``, ``neighbours [Q, kmax]`` (gallery
    indices into the full arrays), ``queries [Q]`` and ``errors [Q, kmax]`` mm."""
    q_idx = np.flatnonzero(view == query_view)
    g_idx = np.flatnonzero(view != query_view)
    top = g_idx[retrieve(emb[q_idx], emb[g_idx], max(ks))]          # [Q, kmax]
    return _score(pose3d, q_idx, top, ks, threshold)


def cross_subject_scores(emb: np.ndarray, pose3d: np.ndarray, view: np.ndarray,
                         subject: np.ndarray, *, query_view: int = 0, ks=(1, 5, 10, 20),
                         threshold: float = 50.0) -> dict | None:
    """As :func:`retrieval_scores`, but a query of subject s searches only the frames
    of the other subjects (other cameras). subject: [N] labels. None when the test
    set holds fewer than two subjects."""
    subject = np.asarray(subject)
    if len(np.unique(subject)) < 2:
        return None
    q_all, top_all = [], []
    for s in np.unique(subject):
        q_idx = np.flatnonzero((view == query_view) & (subject == s))
        g_idx = np.flatnonzero((view != query_view) & (subject != s))
        if len(q_idx) == 0:
            continue
        if len(g_idx) < max(ks):
            raise ValueError(f"cross_subject_scores: {len(g_idx)} gallery frames for subject "
                             f"{s!r}, fewer than k={max(ks)}")
        q_all.append(q_idx)
        top_all.append(g_idx[retrieve(emb[q_idx], emb[g_idx], max(ks))])
    return _score(pose3d, np.concatenate(q_all), np.concatenate(top_all), ks, threshold)


def _score(pose3d, q_idx, top, ks, threshold) -> dict:
    """PA-MPJPE of each query's top-k neighbours -> the scores dict."""
    q_pose = jnp.asarray(pose3d[q_idx], jnp.float32)[:, None]
    n_pose = jnp.asarray(pose3d[top], jnp.float32)
    err = np.asarray(jax.jit(metrics.pa_mpjpe)(jnp.broadcast_to(q_pose, n_pose.shape), n_pose))
    return {"pa_mpjpe": {str(k): float(err[:, :k].mean()) for k in ks},
            "hit": {str(k): float((err[:, :k] < threshold).any(axis=1).mean()) for k in ks},
            "neighbours": top, "queries": q_idx, "errors": err}


def save_retrieval_figure(path: str, images: np.ndarray, queries: np.ndarray, neighbours: np.ndarray,
                          errors: np.ndarray, view: np.ndarray, rows: int = 4, top: int = 5,
                          title: str = "", seed: int = 0) -> str:
    """A PNG grid: each row a query and its ``top`` neighbours from other views
    (labelled with view and PA-MPJPE in mm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(queries), size=min(rows, len(queries)), replace=False)
    fig, axes = plt.subplots(len(pick), top + 1, figsize=(1.6 * (top + 1), 1.75 * len(pick)))
    axes = np.atleast_2d(axes)
    for r, qi in enumerate(pick):
        axes[r, 0].imshow(images[queries[qi]])
        axes[r, 0].set_title(f"query v{view[queries[qi]]}", fontsize=7)
        for c in range(top):
            g = neighbours[qi, c]
            axes[r, c + 1].imshow(images[g])
            axes[r, c + 1].set_title(f"v{view[g]} {errors[qi, c]:.0f}mm", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
