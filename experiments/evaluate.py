"""Evaluates a trained NeMo workdir on a test root (all occlusion levels found).

    nvsm-evaluate --workdir runs/nemo_car --data data/synthetic/test
    nvsm-evaluate --workdir runs/nemo_car --data data/synthetic/test \\
        --solver reference --limit 50
    nvsm-evaluate --workdir runs/nemo_car --top_k 3 --out runs/nemo_car/top3

``runs/nemo_car`` is an ``nvsm-train-nemo`` workdir; ``nvsm-make-synthetic --out
data/synthetic`` makes the test root ``data/synthetic/test``.

Writes ``WORKDIR/results.json`` (``{"rows": [...]}``, accuracies in percent),
``results.md``, ``predictions_<level>.npz`` and ``error_distribution.png``.

A missing ``--data`` folder, or one with none of the levels, exits 2 naming it and
writes nothing; a level the root lacks is a row marked missing (with the reason)
in ``results.md`` / ``results.json``. A bad test image or annotation exits 2
naming the file; ``--skip_bad`` skips it instead and lists it in the results.

The latest checkpoint is evaluated. On a run stopped before its last step (killed,
or still running) a warning names the step, and ``results.json`` (``checkpoint``)
and ``results.md`` record it; ``results.json`` also records the test root's
fingerprints (``test_data``). A model with NaN or infinite weights, or a missing or
damaged ``config.json``, exits 2 naming the workdir or file.
"""

from __future__ import annotations

from absl import flags

from nvsm_jax import parallel, training
from nvsm_jax.nemo import evaluate as nemo_evaluate

from . import run

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
flags.DEFINE_bool("skip_bad", False, "Skip (and list in the results) test images whose file "
                  "or annotation is bad, instead of stopping.")


def main(argv):
    del argv
    parallel.reexec_with_huge_pages()
    parallel.quiet_backend_probe_logs()
    training.quiet_checkpoint_logs()
    nemo_evaluate.evaluate_workdir(
        FLAGS.workdir, FLAGS.data, solver=FLAGS.solver, limit=FLAGS.limit,
        occlusions=FLAGS.occlusions, method=FLAGS.method, out_dir=FLAGS.out, top_k=FLAGS.top_k,
        skip_bad=FLAGS.skip_bad)
    import os

    out = FLAGS.out or FLAGS.workdir
    print(f"[evaluate] results: {os.path.join(out, 'results.md')} and results.json; "
          f"per-image poses: {os.path.join(out, 'predictions_<level>.npz')}; error curve: "
          f"{os.path.join(out, 'error_distribution.png')}")


if __name__ == "__main__":
    run(main)
