"""A tracked folder of finished few-shot cells, and the report over whatever is in it.

Runs live in ``runs/`` and are lost with the machine; their results should not be.
With ``config.results_dir`` set, :func:`nvsm_jax.nvsm.experiment.train_and_evaluate`
records every finished (method, category, annotations, seed) cell as one small
JSON file (:func:`record_cell`)::

    RESULTS/<method>_<category>_<annotations>_seed<seed>/results.json
        method, category, annotations, seed, rows (one per occlusion level, as
        nvsm_jax.evaluation.make_row), errors_deg {level: [per-image error]},
        rounds (NVSM: each round's pseudo-label count and precision), config,
        inputs (the data roots, their fingerprints (:func:`data_fingerprint`) and
        the checkpoint step evaluated; absent in older records)

Cells from different sessions, seeds and commands accumulate in one folder and
:func:`format_report` (``nvsm-report --results RESULTS``)
aggregates whatever is there: mean over seeds with its standard error, the
seed's table layout, per category, per occlusion level, the paired NVSM - NeMo
difference on the same test images, and NVSM's per-round precision. Cells of
one (method, category, annotations) must share their settings (the config
outside seed, paths and run-control keys) and, where both record it, one test
set: mixing two settings or two test sets in one mean raises an error naming
both cells.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict

import numpy as np

from nvsm_jax import training
from nvsm_jax.data import loaders
from nvsm_jax.data.format import DataError, subset_name
from nvsm_jax.errors import RunStateError

__all__ = ["cell_name", "recorded_method", "record_cell", "load_cells", "aggregate",
           "paired_differences", "format_report", "rounds_table", "SETTINGS_FREE_KEYS",
           "data_fingerprint"]

# config keys that may differ between cells averaged together: the seed, where the
# data and runs live, and run control (training.RESUME_FREE_KEYS)
SETTINGS_FREE_KEYS = training.RESUME_FREE_KEYS + (
    "seed", "cls.seed", "category", "num_labelled", "data_root", "test_root",
    "pretrain_workdir", "results_dir", "compilation_cache")
METRICS = ("acc_pi_6", "acc_pi_18", "med_err_deg")
_METHOD_ORDER = ("cls_baseline", "nemo", "nvsm", "nemo_full")


def cell_name(method: str, category: str, annotations, seed: int) -> str:
    return f"{method}_{category}_{annotations}_seed{int(seed)}"


def _config_dict(config) -> dict:
    if isinstance(config, dict):
        return config
    return json.loads(config.to_json_best_effort())


def data_fingerprint(root, category: str, occlusion="L0", limit: int | None = None) -> dict:
    """What one subset of a data root holds, cheaply: ``{"count": N, "hash": h}``.

    h: 16 hex digits of a SHA-256 over the listed names (the first ``limit``), each
    annotation file's bytes and each image file's name and size (images are not read).
    The same files give the same fingerprint wherever the root lives; an added,
    removed or renamed image, a changed annotation or image size, or another
    ``limit`` gives another. A missing list, annotation or image raises DataError
    naming it.
    """
    names = loaders.list_names(root, category, occlusion)
    if limit is not None:
        names = names[:int(limit)]
    sub = subset_name(category, occlusion)
    digest = hashlib.sha256()
    for name in names:
        ann = os.path.join(os.fspath(root), "annotations", sub, name + ".npz")
        try:
            with open(ann, "rb") as f:
                ann_hash = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError as err:
            raise DataError(f"{ann}: annotation not found (listed in {root}/lists/{sub})") from err
        img = loaders._find_image(root, sub, name)
        digest.update(f"{name}\0{ann_hash}\0{os.path.basename(img)}\0"
                      f"{os.path.getsize(img)}\n".encode())
    return {"count": len(names), "hash": digest.hexdigest()[:16]}


def recorded_method(method: str, oracle: str = "none") -> str:
    """The name a cell is recorded under: NVSM's diagnosis rows (``nvsm_oracle``, which
    read hidden poses) as ``nvsm_<oracle>``, never as the method itself."""
    return f"{method}_{oracle}" if method == "nvsm" and oracle not in ("", "none") else method


def record_cell(results_dir, *, method: str, category: str, annotations, seed: int, rows,
                errors, config, rounds=None, inputs=None) -> str:
    """Writes one finished cell's record (atomically) and returns its path.

    rows: the cell's result rows (one per occlusion level); errors: {level: [N]
    radians}; config: the cell's config (ml_collections or dict); rounds: NVSM's
    round entries (``rounds.run_nvsm``'s ``rounds.jsonl``), or None;
    inputs: what the rows were computed from (``{"train_root", "test_root",
    "train": {level: fingerprint}, "test": {level: fingerprint}, "checkpoint_step"}``,
    :func:`data_fingerprint`), or None when unknown.
    """
    cell = os.path.join(os.fspath(results_dir), cell_name(method, category, annotations, seed))
    os.makedirs(cell, exist_ok=True)
    keep = ("round", "num_pseudo", "num_new", "precision", "precision_new", "coverage",
            "agreement", "test_acc_pi_6", "median_err_deg", "flip_rate", "sectors_covered",
            "median_err_new_deg", "flip_rate_new", "matched_median_err_new_deg")
    record = {
        "method": method, "category": category, "annotations": annotations, "seed": int(seed),
        "rows": [dict(r) for r in rows],
        "errors_deg": {occ: np.round(np.degrees(np.asarray(e, np.float64)), 2).tolist()
                       for occ, e in errors.items()},
        "rounds": None if rounds is None else [{k: r.get(k) for k in keep if k in r}
                                                for r in rounds],
        "config": _config_dict(config),
        "inputs": inputs,
    }
    path = os.path.join(cell, "results.json")
    training.write_atomic(path, lambda f: json.dump(          # compact: hundreds of cells
        record, f, separators=(",", ":"), sort_keys=True))      # live in the repository
    return path


def load_cells(results_dir) -> list[dict]:
    """Every ``*/results.json`` under ``results_dir`` (sorted), each with ``path``."""
    results_dir = os.fspath(results_dir)
    if not os.path.isdir(results_dir):
        raise FileNotFoundError(f"results folder {results_dir} does not exist")
    cells = []
    for name in sorted(os.listdir(results_dir)):
        path = os.path.join(results_dir, name, "results.json")
        if not os.path.isfile(path):
            continue
        cell = training.read_json(path, "record of a finished cell",
                                  "delete the cell's folder, or rerun the cell to rewrite it")
        if not isinstance(cell, dict):
            raise RunStateError(f"{path}: not a cell record (a JSON {type(cell).__name__}, not an "
                                "object); delete the cell's folder, or rerun the cell to rewrite it")
        missing = [k for k in ("method", "category", "annotations", "seed", "rows", "config")
                   if k not in cell]
        if missing:
            raise RunStateError(f"{path}: not a cell record (missing {missing}); delete the "
                                "cell's folder, or rerun the cell to rewrite it")
        cell["path"] = path
        cells.append(cell)
    return cells


def _test_sets(cell) -> dict:
    """``{level: (count, hash)}`` of the test set a cell record names ({} if unknown)."""
    test = (cell.get("inputs") or {}).get("test") or {}
    return {occ: (fp.get("count"), fp.get("hash")) for occ, fp in test.items()}


def _same_test_sets(a, b) -> bool:
    """Whether two cell records name the same test set on every level both record."""
    ta, tb = _test_sets(a), _test_sets(b)
    return all(ta[occ] == tb[occ] for occ in set(ta) & set(tb))


def _check_settings(cells) -> None:
    by_key = defaultdict(list)
    for c in cells:
        by_key[(c["method"], c["category"], str(c["annotations"]))].append(c)
    for key, group in by_key.items():
        first = group[0]
        for other in group[1:]:
            diffs = training.config_differences(first["config"], other["config"],
                                                SETTINGS_FREE_KEYS)
            if diffs:
                raise RunStateError(
                    f"{first['path']} and {other['path']}: cells of {key} ran with other "
                    f"settings ({'; '.join(diffs[:6])}); keep one setting per results folder")
            if not _same_test_sets(first, other):
                raise RunStateError(
                    f"{first['path']} and {other['path']}: cells of {key} were evaluated on "
                    f"other test sets ({first['inputs'].get('test_root')}: "
                    f"{_test_sets(first)} vs {other['inputs'].get('test_root')}: "
                    f"{_test_sets(other)}); keep one test set per results folder")
        seeds = [c["seed"] for c in group]
        if len(set(seeds)) != len(seeds):
            raise RunStateError(f"cells of {key}: seed recorded twice ({sorted(seeds)}); delete "
                                "one of the cells' folders")


def _se(values) -> float:
    v = np.asarray(values, np.float64)
    return float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def aggregate(cells) -> list[dict]:
    """Mean over seeds per (method, category, annotations, occlusion), and a "Mean"
    category over the categories present.

    Each row: the three metrics (means over seeds), ``seeds`` (count),
    ``num_images`` (per seed), and ``acc_pi_6_se``: the standard error over seeds
    when there are at least two, otherwise the binomial one over the test images
    (sqrt(p (1 - p) / N)). The Mean rows average the categories' values; their SE
    is sqrt(sum se^2) / C.
    """
    _check_settings(cells)
    groups = defaultdict(list)
    for c in cells:
        for r in c["rows"]:
            groups[(c["method"], c["category"], str(c["annotations"]), r["occlusion"])].append(r)
    out = []
    for (method, category, ann, occ), rs in sorted(groups.items()):
        row = {"method": method, "category": category, "annotations": ann, "occlusion": occ,
               "seeds": len(rs), "num_images": int(rs[0].get("num_images", 0))}
        for m in METRICS:
            row[m] = float(np.mean([r[m] for r in rs]))
        if len(rs) > 1:
            row["acc_pi_6_se"] = _se([r["acc_pi_6"] for r in rs])
        else:
            p, n = row["acc_pi_6"] / 100.0, max(row["num_images"], 1)
            row["acc_pi_6_se"] = float(100.0 * np.sqrt(p * (1 - p) / n))
        out.append(row)
    means = defaultdict(list)
    for r in out:
        means[(r["method"], r["annotations"], r["occlusion"])].append(r)
    for (method, ann, occ), rs in sorted(means.items()):
        row = {"method": method, "category": "Mean", "annotations": ann, "occlusion": occ,
               "categories": len(rs), "seeds": min(r["seeds"] for r in rs),
               "num_images": int(sum(r["num_images"] for r in rs))}
        for m in METRICS:
            row[m] = float(np.mean([r[m] for r in rs]))
        row["acc_pi_6_se"] = float(np.sqrt(np.sum(np.square([r["acc_pi_6_se"] for r in rs])))
                                   / len(rs))
        out.append(row)
    return out


def paired_differences(cells, method: str = "nvsm", against: str = "nemo",
                       threshold_deg: float = 30.0) -> list[dict]:
    """``method`` minus ``against`` in ACC@pi/6 (points) on the same test images, per
    (category, annotations, occlusion), over the seeds both ran.

    Per seed the difference of the two accuracies; ``se``: over seeds when at
    least two, else the paired per-image SE (sd of the per-image difference of
    the hit indicators / sqrt N). Cells evaluated on other test sets (recorded
    fingerprints that differ, or stored errors of another length) are skipped.
    """
    by = {(c["method"], c["category"], str(c["annotations"]), c["seed"]): c for c in cells}
    groups = defaultdict(list)
    for (m, cat, ann, seed), c in by.items():
        other = by.get((against, cat, ann, seed))
        if m != method or other is None or not _same_test_sets(c, other):
            continue
        for occ, err in (c.get("errors_deg") or {}).items():
            e2 = (other.get("errors_deg") or {}).get(occ)
            if e2 is None or len(e2) != len(err) or not len(err):
                continue
            hits = (np.asarray(err) < threshold_deg).astype(np.float64)
            hits2 = (np.asarray(e2) < threshold_deg).astype(np.float64)
            groups[(cat, ann, occ)].append(hits - hits2)
    out = []
    for (cat, ann, occ), diffs in sorted(groups.items()):
        per_seed = [100.0 * float(np.mean(d)) for d in diffs]
        se = _se(per_seed) if len(per_seed) > 1 else \
            float(100.0 * np.std(diffs[0], ddof=1) / np.sqrt(len(diffs[0])))
        out.append({"category": cat, "annotations": ann, "occlusion": occ,
                    "diff": float(np.mean(per_seed)), "se": se, "seeds": len(per_seed),
                    "per_seed": per_seed})
    return out


def _fmt(v, fmt=".1f"):
    return "-" if v is None or not np.isfinite(v) else format(v, fmt)


def _acc(row) -> str:
    se = row.get("acc_pi_6_se")
    return f"{row['acc_pi_6']:.1f} ± {_fmt(se)}"


def _method_key(m):
    return (_METHOD_ORDER.index(m) if m in _METHOD_ORDER else len(_METHOD_ORDER), m)


def _table(columns, row_keys, cell):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for key in row_keys:
        lines.append("| " + " | ".join(cell(key)) + " |")
    return lines


def format_report(cells) -> str:
    """The markdown report of a results folder's cells (see the module docstring)."""
    if not cells:
        return "# NVSM few-shot results\n\nNo finished cells.\n"
    rows = aggregate(cells)
    get = {(r["method"], r["category"], r["annotations"], r["occlusion"]): r for r in rows}
    methods = sorted({r["method"] for r in rows}, key=_method_key)
    categories = sorted({r["category"] for r in rows if r["category"] != "Mean"})
    anns = sorted({r["annotations"] for r in rows if r["annotations"] != "all"},
                  key=lambda a: int(a) if a.isdigit() else 10 ** 6)
    occs = sorted({r["occlusion"] for r in rows})
    seeds = sorted({c["seed"] for c in cells})
    parts = ["# NVSM few-shot results", "",
             f"{len(cells)} cells; categories: {', '.join(categories)}; seeds: "
             f"{', '.join(map(str, seeds))}. ACC in %, ± its standard error (over seeds "
             "where a cell has several, else binomial over the test images); MedErr in "
             "degrees.", "",
             f"## L0, mean over the {len(categories)} categories (the seed's layout)", ""]

    def seed_row(m):
        ran = max({r.get("categories") for r in rows
                   if r["method"] == m and r["category"] == "Mean"} - {None},
                  default=len(categories))
        cells_ = [f"{m} (mean of {ran})" if ran < len(categories) else m]
        for metric in METRICS:
            for a in anns:
                r = get.get((m, "Mean", "all" if m == "nemo_full" else a, "L0"))
                if r is None:
                    cells_.append("-")
                elif metric == "acc_pi_6":
                    cells_.append(_acc(r))
                else:
                    cells_.append(_fmt(r[metric]))
        return cells_

    cols = ["method"] + [f"{name} {a}" for name in ("ACC pi/6", "ACC pi/18", "MedErr")
                         for a in anns]
    parts += _table(cols, methods, seed_row) + [""]
    parts += ["## L0 ACC@pi/6 per category", ""]
    combos = [(m, a) for m in methods for a in (["all"] if m == "nemo_full" else anns)
              if any((m, c, a, "L0") in get for c in categories)]
    parts += _table(["method", "annotations"] + categories + ["Mean"], combos,
                    lambda k: [k[0], k[1]] + [
                        _acc(get[(k[0], c, k[1], "L0")]) if (k[0], c, k[1], "L0") in get
                        else "-" for c in categories + ["Mean"]]) + [""]
    parts += ["## Occlusion levels, mean over categories (ACC@pi/6)", ""]
    parts += _table(["method", "annotations"] + occs, combos,
                    lambda k: [k[0], k[1]] + [
                        _acc(get[(k[0], "Mean", k[1], o)]) if (k[0], "Mean", k[1], o) in get
                        else "-" for o in occs]) + [""]
    diffs = [d for m in methods if m.startswith("nvsm")
             for d in (dict(x, method=m) for x in paired_differences(cells, method=m))]
    if diffs:
        parts += ["## NVSM - NeMo on the same labels and test images (ACC@pi/6 points)", "",
                  "SE over seeds where there are several, else paired over the images.", ""]
        parts += _table(["method", "category", "annotations", "occlusion", "difference",
                         "seeds", "per seed"], diffs,
                        lambda d: [d["method"], d["category"], d["annotations"], d["occlusion"],
                                   f"{d['diff']:+.1f} ± {_fmt(d['se'])}", str(d["seeds"]),
                                   " / ".join(f"{v:+.1f}" for v in d["per_seed"])]) + [""]
    nv = [c for c in cells if c.get("rounds")]
    if nv:
        parts += ["## NVSM pseudo-labels per round", ""] + rounds_table(nv) + [""]
    return "\n".join(parts)


def rounds_table(cells) -> list[str]:
    """Markdown lines: one row per NVSM cell (``category``, ``annotations``, ``seed``,
    ``rounds`` as in :func:`record_cell`), its cumulative pseudo-labels and their
    precision after every round, and the solver agreement where the safeguard ran."""
    lines = ["Per round (1, 2, ...): cumulative pseudo-labels @ their precision (hidden "
             "poses, reporting only); solver agreement where the safeguard ran. Final: the "
             "pseudo-labels' median error, flip rate (error > 150 deg) and the 30-deg "
             "azimuth sectors (of 12) their true poses cover.", "",
             "| category | annotations | seed | rounds | final median | flips | sectors |",
             "|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["category"], str(c["annotations"]), c["seed"])):
        seq = []
        for r in c["rounds"]:
            if r.get("round", 0) == 0:
                continue
            txt = f"{r.get('num_pseudo', 0)} @ {_fmt(r.get('precision'), '.2f')}"
            if r.get("agreement") is not None:
                txt += f" (agree {r['agreement']:.2f})"
            seq.append(txt)
        last = c["rounds"][-1] if c["rounds"] else {}
        flips = last.get("flip_rate")
        lines.append(f"| {c['category']} | {c['annotations']} | {c['seed']} | "
                     + (" / ".join(seq) or "none accepted")
                     + f" | {_fmt(last.get('median_err_deg'), '.1f')}"
                     + f" | {'-' if flips is None else format(100 * flips, '.1f') + ' %'}"
                     + f" | {last.get('sectors_covered', '-')} |")
    return lines
