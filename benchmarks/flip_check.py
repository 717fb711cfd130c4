"""Can a model's own render-and-compare tell a pseudo-label from its symmetric poses?

Reads a finished NVSM workdir (one cell, e.g. ``runs/v/nvsm_car_7``): its recorded
config, the pseudo-labels of every round (``pseudo_labels/round_RRR.npz``) and the
checkpoints kept. For each checkpoint and each accepted pseudo-label it scores the
label's pose and its three symmetric poses
(:func:`nvsm_jax.nvsm.pseudo_labels.symmetric_poses`: the opposite view and the two
mirrors) with NeMo's loss on the image's own features, as they are (``--steps 0``)
and after refining each start by render-and-compare (``--steps N``). Reported for
the labels first accepted in the last round, those of the earlier rounds, and all:

The checkpoint that ran the last round's E-step (the one before its M-step) has
not trained on that round's labels: its row for them is a held-out check.

* how many flips (label > 150 deg from the hidden pose) the check would turn to a
  symmetric pose, and how many right labels it would turn away;
* the flips left if every label took the best-scoring of its four poses;
* AUC: the chance that a right label's margin (best symmetric loss - the label's
  loss) exceeds a flip's (0.5: no signal).

The hidden poses are read for this report only: a diagnosis, never a method.

    python -m benchmarks.flip_check --cell runs/i28/v_n50_car/nvsm_car_7 --steps 0,30 \\
        --json runs/bench/flip_check_car.json
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
from absl import app, flags

from benchmarks.common import print_table, write_json

FLAGS = flags.FLAGS
flags.DEFINE_string("cell", None, "an NVSM cell's workdir (config.json, checkpoints/, "
                    "pseudo_labels/)", required=True)
flags.DEFINE_string("checkpoints", "", "comma-separated steps (default: every one kept)")
flags.DEFINE_string("steps", "0,30", "refinement steps from each start (0: the starts as they are)")
flags.DEFINE_string("json", "", "write the rows here")


def _config(cell):
    import ml_collections

    def tup(d):
        return {k: tup(v) if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v
                for k, v in d.items()}
    with open(os.path.join(cell, "config.json")) as f:
        return ml_collections.ConfigDict(tup(json.load(f)))


def main(argv):
    del argv
    import jax.numpy as jnp

    from nvsm_jax.nemo import features, pose_solver, train
    from nvsm_jax.nemo.settings import NemoConfig
    from nvsm_jax import geometry, parallel, training
    from nvsm_jax.nvsm import pseudo_labels
    from nvsm_jax.nvsm import estep
    from nvsm_jax.data import fewshot, loaders

    training.quiet_checkpoint_logs()
    config = _config(FLAGS.cell)
    train_set = loaders.load_pose_set(config.data_root, config.category, "L0")
    object_mesh = loaders.load_model_mesh(config.data_root, config.category)
    unlabelled = fewshot.split_from_config(train_set, int(config.num_labelled), config).unlabelled
    hidden = fewshot.hidden_poses(train_set, unlabelled.names)       # the report only
    files = sorted(glob.glob(os.path.join(FLAGS.cell, "pseudo_labels", "round_*.npz")))
    if not files:
        raise SystemExit(f"{FLAGS.cell}: no pseudo_labels/round_*.npz")
    first_round = np.full(len(unlabelled), -1)
    for path in files[::-1]:                 # the round each image was first accepted in
        r = int(os.path.basename(path)[6:9])
        first_round[pseudo_labels.PseudoLabels.from_dict(np.load(path)).index] = r
    pl = pseudo_labels.PseudoLabels.from_dict(np.load(files[-1]))
    last = int(os.path.basename(files[-1])[6:9])
    mesh = parallel.make_mesh(1)
    nemo_cfg = NemoConfig.of(config, recorded=True)     # a record: maybe an earlier version's
    model = train.build_model(nemo_cfg.model)
    state = train.init_state(nemo_cfg, model, len(object_mesh.verts), train_set.image_size,
                             mesh)
    ckpt = training.Checkpointer(os.path.join(FLAGS.cell, "checkpoints"), 10 ** 9)
    steps = ([int(s) for s in FLAGS.checkpoints.split(",")] if FLAGS.checkpoints
             else sorted(ckpt.manager.all_steps()))
    solver_cfg = nemo_cfg.solver
    stride = int(nemo_cfg.model.stride)
    verts = jnp.asarray(object_mesh.verts, jnp.float32)
    faces = jnp.asarray(object_mesh.faces, jnp.int32)
    starts = np.concatenate([pl.poses[:, None], pseudo_labels.symmetric_poses(pl.poses)],
                            1).astype(np.float32)                          # [M, 4, 4]
    truth = hidden[pl.index].astype(np.float64)
    err = geometry.pose_error(pl.poses.astype(np.float64), truth)
    flip = err > np.radians(150)
    rows = []
    for ck in steps:
        s = ckpt.restore(state, step=ck)
        maps = estep.extract_features(
            train.feature_fn(train.nemo_model(nemo_cfg, model, s, object_mesh)),
            unlabelled.images[pl.index], int(nemo_cfg.eval_batch_size))
        clutter = features.clutter_prototype(s.aux.clutter)
        for n in [int(x) for x in FLAGS.steps.split(",")]:
            refine_cfg = dataclasses.replace(solver_cfg, steps=max(n, 1),
                                             lr=solver_cfg.lr if n > 0 else 0.0)
            losses = []
            for b in range(0, len(pl), 50):
                rows_b = slice(b, b + 50)
                _, loss, _ = pose_solver.refine(
                    jnp.asarray(maps[rows_b]), s.aux.vertex, clutter, verts, faces,
                    unlabelled.focal[pl.index][rows_b] / stride,
                    unlabelled.principal[pl.index][rows_b] / stride,
                    jnp.asarray(starts[rows_b]), refine_cfg)
                losses.append(np.asarray(loss))
            loss = np.concatenate(losses)                                   # [M, 4]
            pick = np.argmin(loss, 1)
            margin = loss[:, 1:].min(1) - loss[:, 0]
            picked_err = geometry.pose_error(starts[np.arange(len(pl)), pick].astype(np.float64),
                                             truth)
            for name, g in ((f"round {last}", first_round[pl.index] == last),
                            (f"rounds < {last}", first_round[pl.index] < last),
                            ("all", np.ones(len(pl), bool))):
                f_, ok = g & flip, g & ~flip
                auc = (float(np.mean(margin[ok][:, None] > margin[f_][None, :]))
                       if f_.any() and ok.any() else float("nan"))
                rows.append({"checkpoint": int(ck), "refine_steps": n, "labels": name,
                             "n": int(g.sum()), "flips": int(f_.sum()),
                             "flips_turned": int(np.sum(pick[f_] > 0)),
                             "right_turned": int(np.sum(pick[ok] > 0)),
                             "flips_after": int(np.sum(g & (picked_err > np.radians(150)))),
                             "auc": auc})
    print_table(rows)
    if FLAGS.json:
        write_json(FLAGS.json, rows)


if __name__ == "__main__":
    app.run(main)
