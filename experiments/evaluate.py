"""Evaluates a trained NeMo workdir on a test root (all occlusion levels found).

    python -m experiments.evaluate --workdir runs/nemo_car --data data/synthetic/test
    python -m experiments.evaluate --workdir runs/nemo_car --data data/synthetic/test \\
        --solver reference --limit 50
    python -m experiments.evaluate --workdir runs/nemo_car --top_k 3 --out runs/nemo_car/top3

Writes ``WORKDIR/results.json`` (``{"rows": [...]}``, accuracies in percent),
``results.md``, ``errors.npz`` and ``error_distribution.png``.
"""

from __future__ import annotations

from absl import app, flags

from nvsm_jax import train, training

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A train_nemo workdir.", required=True)
flags.DEFINE_string("data", None, "Test root (default: config.test_root).")
flags.DEFINE_string("solver", "config", "'config' (the workdir's config.solver), 'reference' "
                    "(NeMo's 300 steps) or 'fast'.")
flags.DEFINE_integer("limit", None, "At most this many images per occlusion level.")
flags.DEFINE_integer("top_k", None, "Refine the best k grid poses per image (default: the "
                     "solver setting's).")
flags.DEFINE_list("occlusions", None, "Levels to evaluate (default config.eval_occlusions).")
flags.DEFINE_string("method", "NeMo", "Method name in the rows.")
flags.DEFINE_string("out", None, "Output directory (default: the workdir).")


def main(argv):
    del argv
    training.quiet_checkpoint_logs()
    train.evaluate_workdir(FLAGS.workdir, FLAGS.data, solver=FLAGS.solver, limit=FLAGS.limit,
                     occlusions=FLAGS.occlusions, method=FLAGS.method, out_dir=FLAGS.out,
                     top_k=FLAGS.top_k)


if __name__ == "__main__":
    app.run(main)
