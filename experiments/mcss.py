"""MCSS experiment binary (the experiment itself: :mod:`nvsm_jax.mcss.experiment`).

    python -m experiments.mcss --config experiments/configs/mcss.py:demo --workdir runs/mcss_demo
"""

from absl import app, flags, logging
from ml_collections import config_flags

from nvsm_jax import parallel, training
from nvsm_jax.mcss.experiment import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiments/configs/mcss.py:demo")
flags.DEFINE_string("workdir", None, "output directory")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    training.quiet_checkpoint_logs()         # orbax logs every save at INFO
    parallel.initialize()
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
