"""Figures for the NVSM report (matplotlib, Agg backend; every function writes a PNG
and returns its path).

* :func:`plot_rounds` pseudo-label count and precision (and coverage, test
  ACC@pi/6 when present) per E-step round;
* :func:`plot_coverage` azimuth x elevation coverage per round (cumulative
  panels), pseudo-labels coloured by their rotation error, labelled images as
  black stars;
* :func:`feature_pca_rgb` a 3-component PCA of the backbone features shown as
  RGB: images, their feature maps, and the vertex memory on the mesh seen from a
  few viewpoints, all through the *same* PCA (as on the NVSM poster);
  :func:`fit_pca` / :func:`pca_rgb` are the mapping itself;
* :func:`draw_poses` predicted poses drawn as the mesh's outline over images
  (green when the error < pi/6, else red; ground truth in faint white), with a legend.

The error CDF lives in :func:`nvsm_jax.evaluation.plot_error_distribution`.
Angles are radians in, degrees on the axes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from nvsm_jax import geometry

__all__ = ["plot_rounds", "plot_coverage", "PCA", "fit_pca", "pca_rgb", "PCALayout",
           "feature_pca_rgb", "mesh_edges", "box_edges", "PoseDrawing", "draw_poses"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, dpi=100) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def _percent(values) -> np.ndarray:
    """Fractions in [0, 1] -> percent; values already in percent are left alone."""
    v = np.asarray(values, np.float64)
    finite = v[np.isfinite(v)]
    return v * 100.0 if finite.size and np.nanmax(np.abs(finite)) <= 1.0 else v


# --------------------------------------------------------------------------- rounds

def plot_rounds(rounds: Sequence[Mapping], path) -> str:
    """Pseudo-label count (left) and precision / coverage / test ACC@pi/6 (right) per round.

    rounds: dicts with ``round``, ``num_pseudo`` (new or cumulative count, as
    recorded), ``precision`` and ``coverage`` (fractions in [0, 1] or percent), and
    optionally ``test_acc_pi_6``. Missing values (None) are skipped.
    """
    plt = _plt()
    rows = sorted(rounds, key=lambda r: r["round"])
    r = np.array([row["round"] for row in rows])

    def col(key):
        return np.array([np.nan if row.get(key) is None else float(row[key]) for row in rows])

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    n = col("num_pseudo")
    bars = ax1.bar(r, np.nan_to_num(n), color="#4c72b0", width=0.6)
    for b, v in zip(bars, n):
        if np.isfinite(v):
            ax1.annotate(f"{int(v)}", (b.get_x() + b.get_width() / 2, b.get_height()),
                         ha="center", va="bottom", fontsize=8)
    ax1.set_xlabel("round")
    ax1.set_ylabel("pseudo-labels")
    ax1.set_title("pseudo-labels per round")
    ax1.set_xticks(r)
    ax1.grid(axis="y", alpha=0.3)
    series = [("precision", "precision (err < pi/6)", "o-", "#c44e52"),
              ("coverage", "pose coverage", "s--", "#55a868"),
              ("test_acc_pi_6", "test ACC@pi/6", "^-", "#8172b2")]
    for key, label, style, colour in series:
        v = _percent(col(key))
        if np.isfinite(v).any():
            ok = np.isfinite(v)
            ax2.plot(r[ok], v[ok], style, color=colour, label=label)
    ax2.set_ylim(0, 105)
    ax2.set_xlabel("round")
    ax2.set_ylabel("%")
    ax2.set_title("quality per round")
    ax2.set_xticks(r)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------- coverage

def plot_coverage(labelled_poses, pseudo_poses, pseudo_errors, pseudo_rounds, path, *,
                  max_error_deg: float = 90.0, ncols: int = 4) -> str:
    """Pose-space coverage: one azimuth x elevation panel per round, cumulative.

    labelled_poses: [L, >=2]; pseudo_poses: [M, >=2] (radians); pseudo_errors: [M]
    radians (NaN = unknown, drawn grey); pseudo_rounds: [M] int. Panel ``r`` shows
    the labelled images (black stars) and every pseudo-label accepted in rounds
    ``<= r``, coloured by error (0 .. ``max_error_deg``), the round's new ones
    outlined. The pi/6 threshold is marked on the colour bar; a legend under the
    panels names the marks.
    """
    plt = _plt()
    lab = np.asarray(labelled_poses, np.float64).reshape(-1, np.shape(labelled_poses)[-1])
    pse = np.asarray(pseudo_poses, np.float64).reshape(-1, np.shape(pseudo_poses)[-1])
    err = np.degrees(np.asarray(pseudo_errors, np.float64).reshape(-1))
    rnd = np.asarray(pseudo_rounds).reshape(-1)
    rounds = sorted(set(rnd.tolist())) or [0]
    ncols = max(1, min(ncols, len(rounds)))
    nrows = math.ceil(len(rounds) / ncols)
    key_cols = 4 if ncols > 1 else 2
    key_h, bar_w = 0.35 if ncols > 1 else 0.55, 1.3    # inches: key under, colour bar right
    width, height = 3.6 * ncols + bar_w, 2.8 * nrows + 0.4 + key_h
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height),
                             squeeze=False, sharex=True, sharey=True)
    cmap = plt.get_cmap("RdYlGn_r")
    sc = None
    for k, ax in enumerate(axes.flat):
        if k >= len(rounds):
            ax.axis("off")
            continue
        rd = rounds[k]
        sel = rnd <= rd
        new = rnd == rd
        a = np.degrees(np.mod(pse[:, 0], 2 * np.pi))
        e = np.degrees(pse[:, 1])
        known = np.isfinite(err)
        ax.scatter(a[sel & ~known], e[sel & ~known], s=10, c="lightgrey", lw=0)
        sc = ax.scatter(a[sel & known], e[sel & known], s=12, c=err[sel & known], cmap=cmap,
                        vmin=0, vmax=max_error_deg, lw=0)
        ax.scatter(a[new], e[new], s=22, facecolors="none", edgecolors="k", lw=0.4)
        if len(lab):
            ax.scatter(np.degrees(np.mod(lab[:, 0], 2 * np.pi)), np.degrees(lab[:, 1]),
                       marker="*", s=90, c="k", edgecolors="w", lw=0.5, zorder=5)
        good = np.sum(err[sel & known] < 30.0)
        ax.set_title(f"round {rd}: {int(sel.sum())} pseudo ({good} < 30°)", fontsize=9)
        ax.set_xlim(0, 360)
        ax.set_ylim(-90, 90)
        ax.set_xticks(range(0, 361, 90))
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("azimuth (°)")
    for ax in axes[:, 0]:
        ax.set_ylabel("elevation (°)")
    from matplotlib.lines import Line2D

    fig.tight_layout(rect=(0, key_h / height, 1 - bar_w / width, 1))
    if sc is not None:
        bottom = key_h / height + 0.1
        cax = fig.add_axes((1 - (bar_w - 0.15) / width, bottom, 0.15 / width, 0.9 - bottom))
        cb = fig.colorbar(sc, cax=cax)
        cb.set_label("pseudo-label rotation error (°)", fontsize=8)
        cb.ax.axhline(30.0, color="k", lw=1)
        cb.set_ticks([t for t in (0, 30, 60, 90, 120, 150, 180) if t <= max_error_deg])
        cb.ax.set_yticklabels([f"{t:.0f}" + (" = π/6" if t == 30 else "")
                               for t in cb.get_ticks()], fontsize=8)
    key = [Line2D([], [], ls="", marker="*", ms=10, mfc="k", mec="w", mew=0.5),
           Line2D([], [], ls="", marker="o", ms=4, mfc=cmap(0.25), mec="none"),
           Line2D([], [], ls="", marker="o", ms=4, mfc="lightgrey", mec="none"),
           Line2D([], [], ls="", marker="o", ms=5, mfc="none", mec="k", mew=0.5)]
    fig.legend(key, ["labelled images (anchors)", "pseudo-labels (colour: error)",
                     "pseudo-labels, error unknown", "new in this round"],
               loc="lower center", ncol=key_cols, fontsize=8, frameon=False,
               borderaxespad=0.2, columnspacing=1.2)
    return _save(fig, path)


# --------------------------------------------------------------------------- PCA

class PCA(NamedTuple):
    """A 3-component PCA with per-component ranges.

    mean: [D]; components: [3, D] (rows, unit, sign fixed so the largest-|.|
    loading is positive); low, high: [3] projection range mapped to [0, 1].
    """

    mean: np.ndarray
    components: np.ndarray
    low: np.ndarray
    high: np.ndarray


def fit_pca(features, *, num_samples: int = 20000, seed: int = 0,
            percentile: float = 1.0) -> PCA:
    """Fits the PCA on (a random sample of) feature vectors.

    features: [..., D] (e.g. feature maps [N, h, w, D]); the ranges are the
    ``percentile`` / ``100 - percentile`` percentiles of the sample's projections
    (0 = plain min-max).
    """
    x = np.asarray(features, np.float64).reshape(-1, np.shape(features)[-1])
    x = x[np.all(np.isfinite(x), -1)]
    if len(x) > num_samples:
        x = x[np.random.default_rng(seed).choice(len(x), num_samples, replace=False)]
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = np.zeros((3, x.shape[1]))
    comps[:min(3, len(vt))] = vt[:3]
    sign = np.sign(comps[np.arange(3), np.argmax(np.abs(comps), 1)])
    comps *= np.where(sign == 0, 1.0, sign)[:, None]
    proj = (x - mean) @ comps.T
    low = np.percentile(proj, percentile, axis=0)
    high = np.percentile(proj, 100.0 - percentile, axis=0)
    return PCA(mean, comps, low, np.maximum(high, low + 1e-12))


def pca_rgb(pca: PCA, features) -> np.ndarray:
    """features [..., D] -> RGB [..., 3] in [0, 1] (per-component range, clipped)."""
    x = np.asarray(features, np.float64)
    proj = (x - pca.mean) @ pca.components.T
    return np.clip((proj - pca.low) / (pca.high - pca.low), 0.0, 1.0)


def _default_views():
    return geometry.make_pose(np.radians([30.0, 120.0, 210.0, 300.0]), np.radians(20.0), 0.0,
                              geometry.NEMO_DISTANCE, xnp=np)


@dataclasses.dataclass(frozen=True)
class PCALayout:
    """The panels of :func:`feature_pca_rgb`.

    views: [K, 4] poses to show the mesh from (None: 4 azimuths at 20° elevation).
    max_images: at most this many images (and their feature maps) are shown.
    canvas: side of the square canvas the mesh is projected onto, pixels.
    """

    views: np.ndarray | None = None
    max_images: int = 6
    canvas: int = 160


def feature_pca_rgb(feature_maps, vertex_memory, verts, images, path, *,
                    layout: PCALayout = PCALayout(), num_samples: int = 20000, seed: int = 0,
                    return_colors: bool = False):
    """Features as RGB through one PCA: images / feature maps / vertex memory on the mesh.

    feature_maps: [N, h, w, D]; vertex_memory: [V, D]; verts: [V, 3] (the mesh the
    memory belongs to); images: [N, H, W, 3] uint8 (or float in [0, 1]).
    layout: :class:`PCALayout` (views [K, 4] to show the mesh from, max_images,
    canvas). The PCA is fitted on at most ``num_samples`` feature-map pixels
    (sampled with ``seed``, :func:`fit_pca`); the vertex memory goes through the
    same mapping, so equal features get equal colours in every panel.
    Returns the PNG path, or with ``return_colors`` ``(path, map_rgb [N, h, w, 3],
    vertex_rgb [V, 3])``.
    """
    views, max_images, canvas = layout.views, layout.max_images, layout.canvas
    plt = _plt()
    fm = np.asarray(feature_maps, np.float64)
    mem = np.asarray(vertex_memory, np.float64)
    verts = np.asarray(verts, np.float64)
    imgs = np.asarray(images)
    pca = fit_pca(fm, num_samples=num_samples, seed=seed)
    map_rgb = pca_rgb(pca, fm)
    vert_rgb = pca_rgb(pca, mem)
    views = _default_views() if views is None else np.asarray(views, np.float64).reshape(-1, 4)
    n = min(len(fm), max_images)
    ncols = max(n, len(views))
    fig, axes = plt.subplots(3, ncols, figsize=(2.0 * ncols, 6.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        hh, ww = imgs.shape[1:3]
        axes[0, i].imshow(imgs[i], extent=(0, ww, hh, 0))
        axes[0, i].set_title(f"image {i}", fontsize=8)
        axes[1, i].imshow(map_rgb[i], extent=(0, ww, hh, 0), interpolation="nearest")
        axes[1, i].set_title("features (PCA)", fontsize=8)
    radius = max(np.max(np.linalg.norm(verts, axis=-1)), 1e-6)
    for k, pose in enumerate(views):
        pose = pose.copy()
        pose[3] = max(pose[3], 3.0 * radius)        # keep the whole mesh in front
        focal = 0.45 * canvas * (pose[3] - radius) / radius
        scr = geometry.project_to_screen(verts, pose, focal, np.array([canvas / 2, canvas / 2]),
                                         xnp=np)
        order = np.argsort(-scr[:, 2])              # far first, near drawn on top
        ax = axes[2, k]
        ax.scatter(scr[order, 0], scr[order, 1], c=vert_rgb[order], s=14, lw=0)
        ax.set_xlim(0, canvas)
        ax.set_ylim(canvas, 0)
        ax.set_aspect("equal")
        ax.set_title(f"memory, az {np.degrees(pose[0]):.0f}° el {np.degrees(pose[1]):.0f}°",
                     fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    return (out, map_rgb, vert_rgb) if return_colors else out


# --------------------------------------------------------------------------- poses

def mesh_edges(faces, *, max_edges: int | None = None, seed: int = 0) -> np.ndarray:
    """Unique undirected edges of a triangle mesh: faces [F, 3] -> [E, 2] int
    (a seeded random subset of ``max_edges`` when given)."""
    f = np.asarray(faces, np.int64)
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    e = np.unique(np.sort(e, 1), axis=0)
    if max_edges is not None and len(e) > max_edges:
        e = e[np.sort(np.random.default_rng(seed).choice(len(e), max_edges, replace=False))]
    return e


def box_edges(verts) -> tuple[np.ndarray, np.ndarray]:
    """The axis-aligned bounding box of verts [V, 3]: (corners [8, 3], edges [12, 2])."""
    v = np.asarray(verts, np.float64)
    lo, hi = v.min(0), v.max(0)
    corners = np.array([[(hi if (k >> a) & 1 else lo)[a] for a in range(3)] for k in range(8)])
    edges = [(i, i | (1 << a)) for i in range(8) for a in range(3) if not (i >> a) & 1]
    return corners, np.array(edges, np.int64)


def _outline(verts, faces, outline: str, max_edges: int):
    if outline == "auto":
        outline = "box" if len(mesh_edges(faces)) > max_edges else "edges"
    if outline == "box":
        return box_edges(verts)
    if outline == "edges":
        return np.asarray(verts, np.float64), mesh_edges(faces, max_edges=max_edges)
    raise ValueError(f"outline must be 'auto', 'box' or 'edges', got {outline!r}")


@dataclasses.dataclass(frozen=True)
class PoseDrawing:
    """How :func:`draw_poses` draws.

    threshold: rotation error (radians) under which a prediction is green, else red.
    outline: ``"box"`` (the 12 edges of the bounding box: a NeMo cuboid's outer
    edges), ``"edges"`` (face edges, a random subset of ``max_edges``), or
    ``"auto"`` (box when the mesh has more than ``max_edges`` edges).
    max_edges: see ``outline``.
    ncols: panels per row (at most the number of images shown).
    max_images: at most this many images are drawn (the first ones).
    """

    threshold: float = np.pi / 6
    outline: str = "auto"
    max_edges: int = 300
    ncols: int = 4
    max_images: int = 16


def draw_poses(images, pred_poses, gt_poses, verts, faces, focal, principal, path, *,
               style: PoseDrawing = PoseDrawing()) -> str:
    """Predicted poses as mesh outlines over images.

    images: [N, H, W, 3]; pred_poses: [N, 4]; gt_poses: [N, 4] or None; verts:
    [V, 3]; faces: [F, 3]; focal: [N] pixels; principal: [N, 2] screen
    coordinates (x = column, pixel centres at +0.5).
    style: :class:`PoseDrawing` (threshold, outline, max_edges, ncols, max_images).
    Prediction in green when its error < ``style.threshold`` else red (blue without
    GT); GT in faint white; titles give the error in degrees; a legend under the
    panels names the colours used.
    """
    threshold, outline, max_edges = style.threshold, style.outline, style.max_edges
    ncols, max_images = style.ncols, style.max_images
    plt = _plt()
    imgs = np.asarray(images)
    pred = np.asarray(pred_poses, np.float64)
    gt = None if gt_poses is None else np.asarray(gt_poses, np.float64)
    focal = np.broadcast_to(np.asarray(focal, np.float64), (len(imgs),))
    principal = np.broadcast_to(np.asarray(principal, np.float64), (len(imgs), 2))
    pts, edges = _outline(verts, faces, outline, max_edges)
    n = min(len(imgs), max_images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    hh, ww = imgs.shape[1:3]
    scale = 2.6 / max(hh, ww)
    errors = None if gt is None else geometry.pose_error(pred, gt, xnp=np)
    deg = f"{np.degrees(threshold):.0f}°"
    key = [("ground truth", "white")] if gt is not None else []
    if gt is None:
        key.append(("prediction", "#1f77b4"))
    else:                                   # only the colours the panels use
        if np.any(errors[:n] < threshold):
            key.append((f"prediction, error < {deg}", "#2ca02c"))
        if np.any(~(errors[:n] < threshold)):
            key.append((f"prediction, error ≥ {deg}", "#d62728"))
    key_cols = len(key) if ncols > 1 else 1
    key_h = 0.22 * math.ceil(len(key) / key_cols) + 0.15      # inches under the panels
    width, height = ww * scale * ncols + 0.2, hh * scale * nrows + 0.45 * nrows + key_h
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def draw(ax, pose, i, **kw):
        scr = geometry.project_to_screen(pts, pose, focal[i], principal[i], xnp=np)
        front = scr[:, 2] > 1e-6
        for a, b in edges:
            if front[a] and front[b]:
                ax.plot(scr[[a, b], 0], scr[[a, b], 1], **kw)

    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(imgs[i], extent=(0, ww, hh, 0))
        if gt is not None:
            draw(ax, gt[i], i, color="white", alpha=0.55, lw=1.0)
            ok = errors[i] < threshold
            colour = "#2ca02c" if ok else "#d62728"
            ax.set_title(f"#{i}: {np.degrees(errors[i]):.1f}°", fontsize=9,
                         color="darkgreen" if ok else "darkred")
        else:
            colour = "#1f77b4"
            ax.set_title(f"#{i}", fontsize=9)
        draw(ax, pred[i], i, color=colour, lw=1.6)
        ax.set_xlim(0, ww)
        ax.set_ylim(hh, 0)
    from matplotlib.lines import Line2D

    fig.tight_layout(rect=(0, key_h / height, 1, 1))
    fig.legend([Line2D([], [], color=c, lw=1.6) for _, c in key], [t for t, _ in key],
               loc="lower center", ncol=key_cols, fontsize=7, facecolor="0.6", framealpha=1,
               handlelength=1.5, columnspacing=1.0, borderaxespad=0.2)
    return _save(fig, path)
