"""Trains NeMo on one category (see experiments/configs/nemo.py for the commands).

    python -m experiments.train_nemo --config experiments/configs/nemo.py:default --workdir runs/nemo_car
    python -m experiments.train_nemo --config experiments/configs/nemo.py --workdir runs/nemo7 \\
        --config.num_labelled=7

A rerun with the same workdir resumes from the last checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from nvsm_jax import parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "experiments/configs/nemo.py",
                                "ml_collections config file (path[:arg]).")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here.", required=True)
flags.DEFINE_bool("evaluate", False, "Evaluate on config.test_root after training.")


def main(argv):
    del argv
    from nvsm_jax import train, training

    parallel.initialize()
    logging.set_verbosity(logging.INFO)
    training.quiet_checkpoint_logs()
    config = FLAGS.config
    if FLAGS.evaluate:
        config.eval_at_end = True
    train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
