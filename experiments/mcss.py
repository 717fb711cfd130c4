"""MCSS experiment binary (the experiment itself: :mod:`nvsm_jax.mcss.experiment`).

    python -m experiments.mcss --config=mcss:demo --workdir runs/mcss_demo
    nvsm-mcss --config=mcss:tiny --workdir /tmp/mcss_tiny     # installed, from any folder
"""

from absl import flags, logging

from . import run

from nvsm_jax import parallel, training
from nvsm_jax.mcss.experiment import train_and_evaluate

from .configs import DEFINE_config

FLAGS = flags.FLAGS
DEFINE_config("config", "mcss:demo")
flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
    del argv
    parallel.reexec_with_huge_pages()
    parallel.quiet_backend_probe_logs()
    logging.set_verbosity(logging.INFO)
    training.quiet_checkpoint_logs()         # orbax logs every save at INFO
    parallel.initialize()
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    run(main)
