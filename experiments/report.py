"""The report over a tracked results folder: every finished cell there, aggregated.

    nvsm-report --results results/nvsm_demo_scale
    nvsm-report --results results/nvsm_demo_scale --out /tmp/report.md

Cells are recorded by the few-shot experiment (``nvsm-fewshot``) run with
``--config.results_dir=DIR``
(one ``<method>_<category>_<annotations>_seed<seed>/results.json`` each); cells
from several sessions and seeds accumulate there. Writes ``DIR/report.md`` (or
``--out``) and prints it.
"""

from __future__ import annotations

import os

from absl import flags

from . import run

FLAGS = flags.FLAGS
flags.DEFINE_string("results", None, "A results folder (config.results_dir).", required=True)
flags.DEFINE_string("out", None, "Where to write the report (default RESULTS/report.md).")


def main(argv):
    del argv
    from nvsm_jax import results
    from nvsm_jax.errors import InputError

    cells = results.load_cells(FLAGS.results)       # a missing folder: one line, exit 2
    if not cells:
        raise InputError(
            f"{FLAGS.results}: no finished cells (<method>_<category>_<annotations>_seed<seed>/"
            "results.json); nothing written. nvsm-report reads the folder an nvsm-fewshot run "
            "was given as --config.results_dir; a few-shot workdir has its own report.md")
    report = results.format_report(cells)
    out = FLAGS.out or os.path.join(FLAGS.results, "report.md")
    with open(out, "w") as f:
        f.write(report)
    print(report)
    print(f"[report] {len(cells)} cells -> {out}")
    return 0


if __name__ == "__main__":
    run(main)
