"""Trains NeMo on one category (see experiments/configs/nemo.py for the commands).

    python -m experiments.train_nemo --config=nemo:default --workdir runs/nemo_car
    python -m experiments.train_nemo --config=nemo --workdir runs/nemo7 --config.num_labelled=7
    nvsm-train-nemo --config=nemo:tiny --config.data_root=syn/train --config.test_root=syn/test \\
        --workdir /tmp/nemo_tiny      # installed, from any folder (data: nvsm-make-synthetic)

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
    from nvsm_jax import train, training

    parallel.reexec_with_huge_pages()
    parallel.quiet_backend_probe_logs()
    parallel.initialize()
    logging.set_verbosity(logging.INFO)
    training.quiet_checkpoint_logs()
    config = FLAGS.config
    if FLAGS.evaluate:
        config.eval_at_end = True
    train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    run(main)
