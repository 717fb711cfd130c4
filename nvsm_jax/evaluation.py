"""Pose metrics and result tables (shared by the NeMo and NVSM experiments).

* :func:`rotation_errors` geodesic errors of predicted vs ground-truth poses
  (NaN/Inf -> pi/2 as PASCAL3D+);
* :func:`accuracy_at` (percent under a threshold), :func:`median_error_deg`;
* :func:`make_row` one ``results.json`` row; :func:`mean_rows` the "Mean"
  rows weighted by image count; :func:`rows_to_markdown`;
  :func:`write_results` (``results.json`` + ``results.md``);
  :func:`plot_error_distribution` (PNG);
* :func:`accuracy_by_azimuth` ACC@pi/6 per azimuth sector (where a few-shot
  model fails: front and back views, facing flips), :func:`azimuth_table`.

A row is ``{"method", "category", "annotations", "occlusion", "acc_pi_6",
"acc_pi_18", "med_err_deg", "num_images"}`` with accuracies in percent.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np

from nvsm_jax import geometry

__all__ = ["rotation_errors", "accuracy_at", "median_error_deg", "make_row", "mean_rows",
           "rows_to_markdown", "write_results", "plot_error_distribution",
           "accuracy_by_azimuth", "azimuth_table"]


def rotation_errors(pred_poses, gt_poses) -> np.ndarray:
    """[N, >=3] x [N, >=3] -> [N] radians (non-finite predictions count as pi/2)."""
    pred = np.asarray(pred_poses, np.float64)
    gt = np.asarray(gt_poses, np.float64)
    err = np.asarray(geometry.pose_error(pred, gt, xnp=np), np.float64)
    bad = ~np.all(np.isfinite(pred[..., :3]), axis=-1)
    return np.where(bad | ~np.isfinite(err), np.pi / 2, err)


def _clean(errors):
    e = np.asarray(errors, np.float64).reshape(-1)
    return np.where(np.isfinite(e), e, np.pi / 2)


def accuracy_at(errors, threshold: float = np.pi / 6) -> float:
    """Percent of errors (radians) strictly below ``threshold``; NaN for no errors."""
    e = _clean(errors)
    return float(100.0 * np.mean(e < threshold)) if e.size else float("nan")


def median_error_deg(errors) -> float:
    e = _clean(errors)
    return float(np.degrees(np.median(e))) if e.size else float("nan")


def make_row(method: str, category: str, num_labelled, occlusion: str, errors) -> dict:
    """A results row from rotation errors (radians). ``num_labelled`` (an int, or "all")
    goes in the column ``annotations``, the published tables' name for it."""
    e = _clean(errors)
    return {"method": method, "category": category, "annotations": num_labelled,
            "occlusion": occlusion, "acc_pi_6": accuracy_at(e, np.pi / 6),
            "acc_pi_18": accuracy_at(e, np.pi / 18), "med_err_deg": median_error_deg(e),
            "num_images": int(e.size)}


def accuracy_by_azimuth(errors, azimuths, sectors: int = 12,
                        threshold: float = np.pi / 6) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy per azimuth sector of the ground truth.

    errors: [N] radians; azimuths: [N] ground-truth azimuths (radians, any
    range); sectors: number of equal sectors, centred on multiples of
    ``2 pi / sectors`` (sector 0 holds azimuths within half a sector of 0, the
    front view). Returns (accuracy [sectors] in percent, NaN for an empty
    sector; counts [sectors] int).
    """
    e = _clean(errors)
    a = np.asarray(azimuths, np.float64).reshape(-1)
    if a.shape != e.shape:
        raise ValueError(f"accuracy_by_azimuth: {e.size} errors but {a.size} azimuths")
    if sectors < 1:
        raise ValueError(f"accuracy_by_azimuth: sectors must be >= 1, got {sectors}")
    idx = geometry.azimuth_sector(a + np.pi / sectors, sectors)        # centred sectors
    counts = np.bincount(idx, minlength=sectors)
    hits = np.bincount(idx, weights=(e < threshold).astype(np.float64), minlength=sectors)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, 100.0 * hits / np.maximum(counts, 1), np.nan)
    return acc, counts


def azimuth_table(entries: Sequence[Mapping], sectors: int = 12) -> str:
    """Markdown table of :func:`accuracy_by_azimuth` results.

    entries: dicts with ``label`` (the row name), ``acc`` [sectors] and
    ``counts`` [sectors] (the counts of the first entry head the table).
    """
    width = 360 / sectors
    head = "| | " + " | ".join(f"{k * width:.0f}" for k in range(sectors)) + " |"
    lines = [head, "|" + "---|" * (sectors + 1)]
    if entries:
        lines.append("| images | " + " | ".join(str(int(c)) for c in entries[0]["counts"]) + " |")
    for ent in entries:
        lines.append(f"| {ent['label']} | "
                     + " | ".join("-" if not np.isfinite(v) else f"{v:.0f}" for v in ent["acc"]) + " |")
    return "\n".join(lines)


def mean_rows(rows: Sequence[Mapping], errors: Mapping | None = None) -> list[dict]:
    """"Mean" rows per (method, annotations, occlusion) over categories.

    Accuracies are weighted by ``num_images``. The median needs the errors:
    pass ``errors[(method, category, annotations, occlusion)] = array`` to get
    the exact pooled median; otherwise the image-weighted mean of the per-category
    medians is reported (marked by ``"med_err_pooled": False``).
    """
    groups = defaultdict(list)
    for r in rows:
        if r["category"] == "Mean":
            continue
        groups[(r["method"], r["annotations"], r["occlusion"])].append(r)
    out = []
    for (method, ann, occ), rs in groups.items():
        n = np.array([r.get("num_images", 1) for r in rs], np.float64)
        w = n / max(n.sum(), 1.0)
        row = {"method": method, "category": "Mean", "annotations": ann, "occlusion": occ,
               "acc_pi_6": float(np.sum(w * [r["acc_pi_6"] for r in rs])),
               "acc_pi_18": float(np.sum(w * [r["acc_pi_18"] for r in rs])),
               "num_images": int(n.sum())}
        keys = [(method, r["category"], ann, occ) for r in rs]
        if errors is not None and all(k in errors for k in keys):
            row["med_err_deg"] = median_error_deg(np.concatenate([_clean(errors[k]) for k in keys]))
            row["med_err_pooled"] = True
        else:
            row["med_err_deg"] = float(np.sum(w * [r["med_err_deg"] for r in rs]))
            row["med_err_pooled"] = False
        out.append(row)
    return out


def rows_to_markdown(rows: Iterable[Mapping]) -> str:
    """A markdown table (one line per row)."""
    head = ("| method | category | annotations | occlusion | images | ACC@pi/6 (%) | "
            "ACC@pi/18 (%) | MedErr (deg) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['method']} | {r['category']} | {r.get('annotations', '')} | "
                     f"{r['occlusion']} | {r.get('num_images', '')} | {r['acc_pi_6']:.1f} | "
                     f"{r['acc_pi_18']:.1f} | {r['med_err_deg']:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(directory, rows: Sequence[Mapping], *, name: str = "results",
                  extra: Mapping | None = None) -> tuple[str, str]:
    """Writes ``{name}.json`` (``{"rows": [...], **extra}``) and ``{name}.md``."""
    os.makedirs(os.fspath(directory), exist_ok=True)
    jpath = os.path.join(os.fspath(directory), name + ".json")
    mpath = os.path.join(os.fspath(directory), name + ".md")
    with open(jpath, "w") as f:
        json.dump({"rows": list(rows), **(extra or {})}, f, indent=2)
    with open(mpath, "w") as f:
        f.write(rows_to_markdown(rows))
    return jpath, mpath


def plot_error_distribution(errors: Mapping[str, np.ndarray], path, *,
                            title: str = "rotation error") -> str:
    """Cumulative distribution of errors (degrees) per label on a log axis from
    0.5 to 180 deg (errors below 0.5 deg drawn at 0.5), with the pi/18 and pi/6
    thresholds marked and labelled, written to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low = 0.5
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, e in errors.items():
        d = np.sort(np.maximum(np.degrees(_clean(e)), low))
        if d.size:
            ax.plot(d, np.arange(1, d.size + 1) / d.size * 100, label=f"{label} (n={d.size})")
    for t, name in ((10, "π/18"), (30, "π/6")):
        ax.axvline(t, color="grey", ls="--", lw=0.8)
        ax.text(t * 1.06, 3, f"{name} = {t}°", rotation=90, va="bottom", fontsize=8,
                color="dimgrey")
    ax.set_xscale("log")
    ax.set_xlim(low, 180)
    ticks = [1, 3, 10, 30, 90, 180]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xticks([], minor=True)
    ax.set_ylim(0, 102)
    ax.set_xlabel("rotation error (degrees)")
    ax.set_ylabel("images with error below (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)
