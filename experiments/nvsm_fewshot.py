"""The NVSM few-shot experiment (variants: the ``nvsm`` config, ``nvsm:demo``, ``:paper``, ``:tiny``).

    nvsm-fewshot --config=nvsm:demo --workdir runs/nvsm_demo
    nvsm-fewshot --config=nvsm:tiny --workdir /tmp/nvsm_tiny

Rows, trained and evaluated on the same splits: ``cls_baseline`` (pose-bin
classifier on the labelled images), ``nemo`` (NeMo on the labelled images),
``nvsm`` and ``nemo_full`` (NeMo on every training label, the upper bound).
Writes ``results.json``, ``report.md`` and the pictures into the workdir. Every
finished (method, category, annotations) cell stores its rows and is skipped
on a rerun; unfinished ones resume from their own checkpoints.
"""

from __future__ import annotations

import os
import time

from absl import flags, logging

from . import run

from .configs import DEFINE_config

FLAGS = flags.FLAGS
DEFINE_config("config", "nvsm:demo")
flags.DEFINE_string("workdir", None, "Everything the run writes goes here.", required=True)


def main(argv):
    del argv
    from nvsm_jax import parallel, training
    from nvsm_jax.nvsm.experiment import train_and_evaluate

    parallel.reexec_with_huge_pages()
    parallel.quiet_backend_probe_logs()
    parallel.initialize()
    logging.set_verbosity(logging.INFO)
    training.quiet_checkpoint_logs()
    start = time.time()
    report = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(report)
    print(f"[nvsm_fewshot] done in {time.time() - start:.0f} s; results in "
          f"{os.path.join(FLAGS.workdir, 'results.json')} and report.md")
    print(f"[nvsm_fewshot] report with tables and figures: "
          f"{os.path.join(FLAGS.workdir, 'report.md')}; each run's checkpoints, "
          f"metrics.jsonl and figures: the folders under {FLAGS.workdir}")
    print(f"[nvsm_fewshot] training curves: tensorboard --logdir {FLAGS.workdir}   "
          "(pip install 'nvsm_jax[tensorboard]')")


if __name__ == "__main__":
    run(main)
