"""Trains NeMo on one category (the ``nemo`` config: ``nemo:default``, ``nemo:tiny``).

    nvsm-make-synthetic --out data/synthetic --categories car --train 1000 --test 200
    nvsm-train-nemo --config=nemo:default --workdir runs/nemo_car
    nvsm-train-nemo --config=nemo --workdir runs/nemo7 --config.num_labelled=7
    nvsm-make-synthetic --config=synthetic:tiny --categories car --out syn
    nvsm-train-nemo --config=nemo:tiny --config.data_root=syn/train --config.test_root=syn/test \\
        --workdir /tmp/nemo_tiny

The default data roots are ``data/synthetic/train`` and ``data/synthetic/test`` in
the current folder (the first command makes them).

A rerun with the same workdir resumes from the last checkpoint.
"""

from absl import flags, logging

from . import run

from nvsm_jax import parallel

from .configs import DEFINE_config

FLAGS = flags.FLAGS
DEFINE_config("config", "nemo")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here.", required=True)
flags.DEFINE_bool("evaluate", False, "Evaluate on config.test_root after training.")


def main(argv):
    del argv
    from nvsm_jax.nemo import train
    from nvsm_jax import training

    parallel.reexec_with_huge_pages()
    parallel.quiet_backend_probe_logs()
    parallel.initialize()
    logging.set_verbosity(logging.INFO)
    training.quiet_checkpoint_logs()
    config = FLAGS.config
    if FLAGS.evaluate:
        config.eval_at_end = True
    train.train_and_evaluate(config, FLAGS.workdir)
    import os

    w = FLAGS.workdir
    results = os.path.join(w, "results.md")
    print(f"[train_nemo] checkpoints: {os.path.join(w, 'checkpoints')}; metrics: "
          f"{os.path.join(w, 'metrics.jsonl')}"
          + (f"; results: {results} and results.json" if os.path.exists(results) else
             f"; evaluate it with: nvsm-evaluate --workdir {w}"
             + ("" if config.get("test_root") else " --data TEST_ROOT")))
    print(f"[train_nemo] training curves: tensorboard --logdir {w}   "
          "(pip install 'nvsm_jax[tensorboard]')")


if __name__ == "__main__":
    run(main)
