"""The NVSM few-shot experiment, importable from a notebook.

``train_and_evaluate(config, workdir)`` (the CLI is ``nvsm-fewshot``)
composes the library; it computes nothing itself:

1. data: ``config.data_root`` and ``config.test_root`` (both or neither), or the
   synthetic benchmark rendered into ``workdir/data`` when they are empty and
   ``config.data.generate``; ``config.json`` is written once the config is checked
   and the data found;
2. per category and number of annotations, on the same few-shot split:
   ``cls_baseline`` (:mod:`nvsm_jax.baselines.classifier`), ``nemo`` (:mod:`nvsm_jax.nemo.train` on
   the labelled images), ``nvsm`` (:mod:`nvsm_jax.nvsm.rounds`); per category
   ``nemo_full`` (every training label);
3. evaluation on every occlusion level, ``results.json`` (rows as
   :mod:`nvsm_jax.evaluation`), ``report.md`` (the seed's table layouts, and
   L0 accuracy per ground-truth azimuth sector, which shows where the few-shot
   rows fail) and pictures;
4. with ``config.results_dir``: each finished cell's small record in that
   (tracked) folder, aggregated over seeds and sessions by :mod:`nvsm_jax.results`
   (``nvsm-report``).

Each finished cell (method, category, annotations) writes ``rows.json`` in its
own directory: its rows, the data roots and fingerprints
(:func:`nvsm_jax.results.data_fingerprint`) and the checkpoint step evaluated.
A rerun skips it when its data is unchanged, evaluates it again from its
checkpoints when the test set differs (another ``test_root``, files changed,
another ``eval_limit`` or levels), and refuses rows trained on other training
data; ``results.json`` and ``report.md`` so never mix test sets. Unfinished cells
resume from their checkpoints.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time

import numpy as np

from nvsm_jax import evaluation, figures, parallel, results, training
from nvsm_jax.baselines import classifier, pretrain
from nvsm_jax.data import fewshot, load_model_mesh, load_pose_set, synthetic
from nvsm_jax.errors import ConfigError, RunStateError
from nvsm_jax.nemo import train
from nvsm_jax.nemo.settings import NemoConfig
from nvsm_jax.nvsm import config_checks as nvsm_checks
from nvsm_jax.nvsm import rounds
from nvsm_jax.workdir_lock import locked

log = logging.getLogger(__name__)

__all__ = ["ensure_data", "train_and_evaluate", "format_report"]

METHODS = nvsm_checks.METHODS


def _synth_config(config) -> synthetic.SynthConfig:
    """The generator's settings ``config.data.synthetic``, with the experiment's
    categories, counts, image size, seed and occlusion levels."""
    sc = copy.deepcopy(config.data.synthetic)
    sc.categories = config.categories
    sc.num_train = config.data.num_train
    sc.num_test = config.data.num_test
    sc.image_size = tuple(config.data.image_size)
    sc.seed = config.data.seed
    sc.test_levels = tuple(config.eval_occlusions)
    return synthetic.SynthConfig.from_mapping(sc)


def _generated_differences(stats_path, wanted: synthetic.SynthConfig) -> list[str]:
    """``"key: recorded -> wanted"`` for each generator setting where a generated root's
    ``dataset.json`` differs from ``wanted``: categories and levels only when some are
    missing (each is generated alone), never the ones that do not change the files
    (threads, render batch)."""
    recorded = training.read_json(stats_path, "record of the generated data",
                                  "delete its data folder to generate it again")
    recorded = recorded.get("config", {}) if isinstance(recorded, dict) else {}
    out = []
    for k, v in wanted.to_json().items():
        old = recorded.get(k, "<absent>")
        if k in ("categories", "test_levels"):
            missing = sorted(set(v) - set(old)) if isinstance(old, list) else v
            if missing:
                out.append(f"{k}: {old!r} lacks {missing}")
        elif k not in ("workers", "batch_size") and old != v:
            out.append(f"{k}: {old!r} -> {v!r}")
    return out


def ensure_data(config, workdir) -> tuple[str, str]:
    """(train_root, test_root): ``config.data_root`` and ``config.test_root`` when given,
    else the synthetic benchmark in ``workdir/data``, generated there if needed
    (:func:`_synth_config`).

    A root given without the other, or a given root that is not a folder, is a
    ConfigError naming the key. Generated data whose recorded settings differ from
    the config's (another count, size, seed or level) is a ConfigError naming them:
    it is never silently reused."""
    train_root, test_root = config.data_root, config.test_root
    if bool(train_root) != bool(test_root):
        given, empty = ("data_root", "test_root") if train_root else ("test_root", "data_root")
        raise ConfigError(
            f"config.{given}={train_root or test_root!r} is given but config.{empty} is empty: "
            f"give both roots (training and test), or neither to use the synthetic benchmark "
            f"generated in {os.path.join(os.fspath(workdir), 'data')}")
    if train_root:
        for key, root in (("data_root", train_root), ("test_root", test_root)):
            if not os.path.isdir(root):
                raise ConfigError(f"config.{key}={root!r}: no such folder (a data root "
                                  "holds images/, annotations/, lists/ and CAD_single/)")
        return train_root, test_root
    out = os.path.join(os.fspath(workdir), "data")
    train_root, test_root = os.path.join(out, "train"), os.path.join(out, "test")
    wanted = _synth_config(config)
    stats = os.path.join(test_root, "dataset.json")
    if os.path.exists(stats):
        diffs = _generated_differences(stats, wanted)
        if diffs:
            raise ConfigError(
                f"{out} was generated with other settings ({'; '.join(diffs[:6])}); delete "
                f"that folder to generate it again, or use a new --workdir")
        return train_root, test_root
    if not config.data.generate:
        raise ConfigError("config.data_root and config.test_root are empty and "
                          "config.data.generate is False: give both roots, or set "
                          "data.generate=True")

    t0 = time.time()
    if parallel.is_main_process():      # one writer; the others wait, then read it
        log.info("generating the synthetic benchmark into %s", out)
        with training.heartbeat("generating the synthetic benchmark"):
            synthetic.generate(out, wanted, log=log.info)
        log.info("generated the synthetic benchmark in %.0f s", time.time() - t0)
    parallel.sync("synthetic benchmark generated")
    return train_root, test_root


def _cell(workdir, method, category, num_labelled):
    return os.path.join(workdir, f"{method}_{category}_{num_labelled}")


def _load_rows(cell):
    """(rows, inputs) of a finished cell, or None; inputs is None in records written
    before cells recorded them (a bare list of rows)."""
    path = os.path.join(cell, "rows.json")
    if not os.path.exists(path):
        return None
    record = training.read_json(path, "record of the cell's results",
                                "delete it to re-evaluate the cell from its checkpoints")
    if isinstance(record, list):
        return record, None
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
        raise RunStateError(f"{path}: not a record of the cell's results (expected "
                            "{\"rows\": [...], \"inputs\": {...}}); delete it to re-evaluate "
                            "the cell from its checkpoints")
    return record["rows"], record.get("inputs")


def _save_rows(cell, rows, errors, inputs):
    """Process 0 writes the cell's record (every process computed the same): rows.json
    holds ``{"rows": [...], "inputs": {...}}`` (:func:`_data_inputs` plus the
    ``checkpoint_step`` evaluated)."""
    if parallel.is_main_process():
        os.makedirs(cell, exist_ok=True)
        np.savez(os.path.join(cell, "errors.npz"), **errors)
        training.write_atomic(os.path.join(cell, "rows.json"), lambda f: json.dump(
            {"rows": rows, "inputs": inputs}, f, indent=1))
    parallel.sync(f"cell {cell} recorded")


def _data_inputs(config, category, train_root, test_root) -> dict:
    """What ``category``'s cells train and are evaluated on: both roots (absolute), the
    training pool's and each evaluated level's fingerprint
    (:func:`nvsm_jax.results.data_fingerprint`, the test levels cut at
    ``config.eval_limit``). Every listed file must exist (DataError otherwise)."""
    limit = config.get("eval_limit")
    return {"train_root": os.path.abspath(train_root), "test_root": os.path.abspath(test_root),
            "eval_limit": limit,
            "train": {"L0": results.data_fingerprint(train_root, category, "L0")},
            "test": {occ: results.data_fingerprint(test_root, category, occ, limit)
                     for occ in config.eval_occlusions}}


def _load_category(config, category, train_root, test_root):
    """(training pool, model mesh, {level: test set}) of ``category``."""
    train_set = load_pose_set(train_root, category, "L0")
    object_mesh = load_model_mesh(train_root, category, pose_set=train_set)
    test_sets = {occ: load_pose_set(test_root, category, occ, limit=config.eval_limit)
                 for occ in config.eval_occlusions}
    return train_set, object_mesh, test_sets


def _describe(inputs, part) -> str:
    root = inputs.get(f"{part}_root", "?")
    sets = ", ".join(f"{occ}: {fp['count']} images, {fp['hash']}"
                     for occ, fp in sorted(inputs.get(part, {}).items()))
    return f"{root} ({sets})"


def _stale(cell, stored, data) -> str | None:
    """Why a finished cell's rows (recorded ``stored`` inputs) do not describe ``data``
    (:func:`_data_inputs`), or None when they do; the cell is then evaluated again
    from its checkpoints. Rows of a model trained on other data are refused
    (RunStateError naming both roots): only retraining could fix them."""
    if stored is None:
        return "its record names no data (written by an older version)"
    if stored.get("train") != data["train"]:
        raise RunStateError(
            f"{cell}: trained on {_describe(stored, 'train')}, but the training data is now "
            f"{_describe(data, 'train')}; restore that data, or delete {cell} to train the "
            "cell again")
    if stored.get("test") != data["test"]:
        return (f"evaluated on {_describe(stored, 'test')}, the test set is now "
                f"{_describe(data, 'test')}")
    return None


def _rows(method, category, num_labelled, results):
    rows = [evaluation.make_row(method, category, num_labelled, occ, r["errors"])
            for occ, r in results.items()]
    return rows, {occ: np.asarray(r["errors"]) for occ, r in results.items()}


def _cell_config(config, category, train_root, test_root):
    """The config of ``category``'s cells, with the fields they really use (category,
    data roots) filled in: each cell's ``config.json`` then rebuilds its run
    (``nvsm-evaluate --workdir CELL``)."""
    c = copy.deepcopy(config)
    c.category = category
    c.data_root, c.test_root = os.path.abspath(train_root), os.path.abspath(test_root)
    return c


def _nemo_config(config, num_labelled, steps):
    c = copy.deepcopy(config)
    c.num_labelled = num_labelled
    c.num_steps = steps
    c.checkpoint_every = max(1, min(c.checkpoint_every, steps))
    return c


def _run_nemo(config, cell, train_set, object_mesh, test_sets, num_labelled, steps):
    c = _nemo_config(config, num_labelled, steps)
    state = train.train_and_evaluate(c, cell, train_set=train_set, object_mesh=object_mesh)
    settings = NemoConfig.of(c)
    nemo = train.nemo_model(settings, train.build_model(settings.model), state, object_mesh)
    return train.evaluate_nemo(nemo, test_sets), int(state.step)


def _run_cls(config, cell, labelled, test_sets):
    c = classifier.ClassifierConfig.from_config(config.cls)
    pretrained = None
    if config.pretrain_workdir:             # the encoder the NeMo rows start from, too
        pretrained = pretrain.load_pretrained_params(config.pretrain_workdir)
    state = classifier.train_classifier(c, labelled, cell, pretrained=pretrained)
    out = {}
    for occ, test in test_sets.items():
        pred = classifier.predict_classifier(state, test.images, config.eval_batch_size, config=c)
        out[occ] = {"errors": evaluation.rotation_errors(pred, test.poses), "pred": pred}
    return out, int(state.step)


def _nvsm_figures(cell, out, test_sets, object_mesh, config):
    """Pictures of one NVSM run (best effort: a failing plot never loses results)."""

    paths = {}
    log.info("drawing the NVSM figures into %s", cell)
    try:
        paths["rounds"] = figures.plot_rounds(out["rounds"], os.path.join(cell, "rounds.png"))
        pl = out["pseudo_labels"]
        err = evaluation.rotation_errors(pl.poses, out["hidden"][pl.index]) if len(pl) else np.zeros(0)
        paths["coverage"] = figures.plot_coverage(out["labelled"].poses, pl.poses, err, pl.round,
                                                  os.path.join(cell, "coverage.png"))
        test = test_sets.get("L0") or next(iter(test_sets.values()))
        k = min(8, len(test))
        nemo = train.nemo_model(config, train.build_model(config.model), out["state"], object_mesh)
        maps = np.asarray(train.feature_fn(nemo)(test.images[:k]))
        paths["pca"] = figures.feature_pca_rgb(maps, np.asarray(nemo.memory.vertex),
                                               object_mesh.verts, test.images[:k],
                                               os.path.join(cell, "features_pca.png"))
        pred = out["test"]["L0" if "L0" in out["test"] else next(iter(out["test"]))]["pred"]
        paths["poses"] = figures.draw_poses(test.images[:k], pred[:k], test.poses[:k],
                                            object_mesh.verts, object_mesh.faces, test.focal[:k],
                                            test.principal[:k],
                                            os.path.join(cell, "predicted_poses.png"))
    except Exception as err:  # noqa: BLE001 - figures are a by-product
        log.warning("NVSM figures failed: %s", err)
    return paths


def _run_nvsm(config, cell, train_set, object_mesh, test_sets, num_labelled):
    c = copy.deepcopy(config)
    c.num_labelled = num_labelled
    out = rounds.run_nvsm(c, cell, train_set=train_set, object_mesh=object_mesh,
                          test_sets=test_sets)
    if parallel.is_main_process():
        _nvsm_figures(cell, out, test_sets, object_mesh, c)
    return out["test"], int(out["state"].step)


def _with_pretrained_backbone(config, workdir, category, train_set):
    """The config every row of ``category`` uses: with ``config.pretrain_steps > 0``
    (and no ``pretrain_workdir`` given) the backbone is first pre-trained,
    self-supervised, on the category's training images (pixels only, no poses)
    in ``workdir/pretrain_<category>`` (resumable), and the NeMo and NVSM rows
    start from it."""
    steps = int(config.pretrain_steps)
    if steps <= 0 or config.pretrain_workdir:   # none wanted, or given from outside
        return config

    c = copy.deepcopy(config)
    c.pretrain_workdir = os.path.join(workdir, f"pretrain_{category}")
    pc = pretrain.pretrain_config("default").replace(
        num_steps=steps, batch_size=int(config.pretrain_batch), seed=config.seed)
    if not os.path.exists(os.path.join(c.pretrain_workdir, pretrain.PARAMS_FILE)):
        t0 = time.time()
        log.info("=== self-supervised pre-training, %s, %d steps", category, steps)
        pretrain.pretrain(pc, c, train_set, c.pretrain_workdir)
        log.info("pre-training done in %.0f s", time.time() - t0)
    return c


@locked     # one run per workdir (nvsm_jax.workdir_lock)
def train_and_evaluate(config, workdir) -> str:
    """Runs every configured row; returns the markdown report (also in report.md).
    Every enumerated option is checked first (:func:`nvsm_jax.nvsm.config_checks.check_config`)."""
    nvsm_checks.check_config(config)
    workdir = os.fspath(workdir)
    train_root, test_root = ensure_data(config, workdir)
    categories = [c for c in config.categories.split(",") if c]
    data = {c: _data_inputs(config, c, train_root, test_root) for c in categories}
    loaded = {c: _load_category(config, c, train_root, test_root) for c in categories[:1]}
    # the record, once the config and data are good; refuses a changed config on a rerun
    training.save_config(config, workdir, has_work=train.holds_work(workdir))
    all_rows, all_errors, by_azimuth = [], {}, []
    for category in categories:
        train_set, object_mesh, test_sets = (loaded.pop(category, None)
                                      or _load_category(config, category, train_root, test_root))
        cfg = _cell_config(_with_pretrained_backbone(config, workdir, category, train_set),
                           category, train_root, test_root)
        cells = [("nemo_full", "all")] if "nemo_full" in config.methods else []
        cells += [(m, n) for n in config.annotations for m in config.methods if m != "nemo_full"]
        for method, n in cells:
            cell = _cell(workdir, method, category, n)
            stored = _load_rows(cell)
            stale = None if stored is None else _stale(cell, stored[1], data[category])
            if stale is not None:
                log.warning("%s: %s; evaluating it again from its checkpoints", cell, stale)
            if stored is None or stale is not None:
                t0 = time.time()
                log.info("=== %s, %s, %s annotations", method, category, n)
                if method == "nemo_full":
                    res = _run_nemo(cfg, cell, train_set, object_mesh, test_sets, None,
                                    cfg.full_steps)
                elif method == "nemo":
                    res = _run_nemo(cfg, cell, train_set, object_mesh, test_sets, n,
                                    cfg.fewshot_steps)
                elif method == "cls_baseline":
                    labelled = fewshot.split_from_config(train_set, n, cfg).labelled
                    res = _run_cls(cfg, cell, labelled, test_sets)
                else:
                    res = _run_nvsm(cfg, cell, train_set, object_mesh, test_sets, n)
                rows, errors = _rows(method, category, n, res[0])
                for r in rows:
                    r["seconds"] = time.time() - t0
                inputs = dict(data[category], checkpoint_step=res[1])
                _save_rows(cell, rows, errors, inputs)
            else:
                rows, inputs = stored
                errors = dict(np.load(os.path.join(cell, "errors.npz")))
            if config.get("results_dir") and parallel.is_main_process():
                round_entries = (training.MetricsWriter(cell, "rounds.jsonl").read()
                                 if method == "nvsm" else None)
                results.record_cell(config.results_dir, method=results.recorded_method(
                                        method, config.get("nvsm_oracle", "none")),
                                    category=category,
                                    annotations=n, seed=int(cfg.seed), rows=rows,
                                    errors=errors, config=cfg, rounds=round_entries, inputs=inputs)
            all_rows += rows
            for r in rows:
                all_errors[(r["method"], r["category"], r["annotations"], r["occlusion"])] = \
                    errors[r["occlusion"]]
            occ = "L0" if "L0" in errors else sorted(errors)[0]
            if occ in test_sets and len(errors[occ]) == len(test_sets[occ]):
                acc, counts = evaluation.accuracy_by_azimuth(errors[occ], test_sets[occ].poses[:, 0])
                by_azimuth.append({"method": method, "category": category, "annotations": n,
                                   "occlusion": occ, "acc": acc.tolist(),
                                   "counts": counts.tolist()})
            else:       # a cell evaluated on another test subset: no per-image azimuths
                log.warning("%s: stored errors do not match the %s test set; no azimuth table",
                            cell, occ)
    all_rows += evaluation.mean_rows(all_rows, all_errors)
    report = format_report(all_rows, config, workdir, by_azimuth, data)
    if parallel.is_main_process():
        evaluation.write_results(workdir, all_rows, extra={"by_azimuth": by_azimuth,
                                                           "data": data})
        with open(os.path.join(workdir, "report.md"), "w") as f:
            f.write(report)
    return report


def _seed_table(rows, annotations, occlusion="L0"):
    """The poster's layout: a line per method, ACC@pi/6 | ACC@pi/18 | MedErr for each
    number of annotations and their mean (category "Mean")."""
    methods = [m for m in METHODS if m != "nemo_full"]
    get = {(r["method"], r["annotations"]): r for r in rows
           if r["category"] == "Mean" and r["occlusion"] == occlusion}
    ann = list(annotations)
    head = "| method | " + " | ".join(
        f"{metric} {a}" for metric in ("ACC pi/6", "ACC pi/18", "MedErr") for a in ann + ["Mean"]) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * (len(ann) + 1))]
    for m in methods + ["nemo_full"]:
        keys = ["all"] if m == "nemo_full" else ann
        cells = []
        for metric in ("acc_pi_6", "acc_pi_18", "med_err_deg"):
            vals = [get[(m, a)][metric] if (m, a) in get else np.nan for a in keys]
            if m == "nemo_full":
                vals = vals * len(ann)
            known = [v for v in vals if np.isfinite(v)]
            cells += ([f"{v:.1f}" if np.isfinite(v) else "-" for v in vals]
                      + [f"{np.mean(known):.1f}" if known else "-"])
        if any((m, a) in get for a in keys):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _occlusion_table(rows, occlusions):
    get = {(r["method"], r["annotations"], r["occlusion"]): r for r in rows if r["category"] == "Mean"}
    combos = sorted({(r["method"], r["annotations"]) for r in rows if r["category"] == "Mean"},
                    key=lambda x: (METHODS.index(x[0]), str(x[1])))
    lines = ["| method | annotations | " + " | ".join(f"ACC pi/6 {o}" for o in occlusions) + " | "
             + " | ".join(f"MedErr {o}" for o in occlusions) + " |",
             "|" + "---|" * (2 + 2 * len(occlusions))]
    for m, a in combos:
        accs = [get.get((m, a, o), {}).get("acc_pi_6", np.nan) for o in occlusions]
        meds = [get.get((m, a, o), {}).get("med_err_deg", np.nan) for o in occlusions]
        lines.append(f"| {m} | {a} | " + " | ".join(f"{v:.1f}" for v in accs) + " | "
                     + " | ".join(f"{v:.1f}" for v in meds) + " |")
    return "\n".join(lines)


def _azimuth_section(by_azimuth) -> list[str]:
    """One azimuth table per (category, occlusion level) of ``by_azimuth`` entries."""
    parts = []
    for category, occ in dict.fromkeys((e["category"], e["occlusion"]) for e in by_azimuth):
        ents = [{"label": f"{e['method']} ({e['annotations']})", "acc": np.asarray(e["acc"], float),
                 "counts": e["counts"]}
                for e in by_azimuth if (e["category"], e["occlusion"]) == (category, occ)]
        parts += [f"### {category}, {occ}", "", evaluation.azimuth_table(ents), ""]
    return parts


def format_report(rows, config, workdir, by_azimuth=None, data=None) -> str:
    """The workdir's report.md; data: ``{category: _data_inputs(...)}``, the data every
    row was computed on (one line naming the roots and the test sets)."""
    parts = ["# NVSM few-shot results", "",
             f"Categories: {config.categories}; annotations: {list(config.annotations)}; "
             f"config: see `{os.path.join(workdir, 'config.json')}` and the per-cell directories.", ""]
    if data:
        first = next(iter(data.values()))
        parts += [f"Data: training `{first['train_root']}`, test `{first['test_root']}` ("
                  + "; ".join(f"{c} {occ}: {fp['count']} test images, {fp['hash']}"
                              for c, d in data.items() for occ, fp in d["test"].items())
                  + ").", ""]
    parts += ["## L0 (unoccluded) test set, mean over categories", "",
              _seed_table(rows, config.annotations), "",
              "## Occlusion levels (ACC@pi/6 in %, MedErr in degrees)", "",
              _occlusion_table(rows, list(config.eval_occlusions)), "",
              "## Every row", "", evaluation.rows_to_markdown(rows), ""]
    nvsm_cells = []
    for name in sorted(os.listdir(workdir)):
        log_path = os.path.join(workdir, name, "rounds.jsonl")
        if name.startswith("nvsm_") and os.path.exists(log_path):
            _, category, ann = name.split("_", 2)
            nvsm_cells.append({"category": category, "annotations": ann, "seed": config.seed,
                               "rounds": training.MetricsWriter(os.path.join(workdir, name),
                                                                "rounds.jsonl").read()})
    if nvsm_cells:
        parts += ["## NVSM pseudo-labels per round", ""] + results.rounds_table(nvsm_cells) + [""]
    if by_azimuth:
        parts += ["## ACC@pi/6 (%) by ground-truth azimuth", "",
                  "30-degree sectors centred on the azimuth shown (0 = front view, 180 = back).", ""]
        parts += _azimuth_section(by_azimuth)
    pictures = []
    for name in sorted(os.listdir(workdir)):
        cell = os.path.join(workdir, name)
        if name.startswith("nvsm_") and os.path.isdir(cell):
            for png in ("rounds.png", "coverage.png", "features_pca.png", "predicted_poses.png"):
                if os.path.exists(os.path.join(cell, png)):
                    pictures.append(f"![{name} {png}]({name}/{png})")
    if pictures:
        parts += ["## Pictures", ""] + pictures + [""]
    return "\n".join(parts)
