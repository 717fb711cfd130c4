"""MCSS experiment binary (the experiment itself: :mod:`nvsm_jax.mcss.experiment`).

    nvsm-mcss --config=mcss:demo --workdir runs/mcss_demo
    nvsm-mcss --config=mcss:tiny --workdir /tmp/mcss_tiny
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
    import os

    w = FLAGS.workdir
    print(f"[mcss] report: {os.path.join(w, 'report.md')}; results: "
          f"{os.path.join(w, 'results.json')}; each method's checkpoints and metrics.jsonl: "
          f"the folders under {w}")
    print(f"[mcss] training curves: tensorboard --logdir {w}   "
          "(pip install 'nvsm_jax[tensorboard]')")


if __name__ == "__main__":
    run(main)
