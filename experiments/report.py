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
import sys

from absl import flags

from . import run

FLAGS = flags.FLAGS
flags.DEFINE_string("results", None, "A results folder (config.results_dir).", required=True)
flags.DEFINE_string("out", None, "Where to write the report (default RESULTS/report.md).")


def main(argv):
    del argv
    from nvsm_jax import results

    try:
        cells = results.load_cells(FLAGS.results)
        report = results.format_report(cells)
    except (FileNotFoundError, ValueError) as err:
        print(f"[report] {err}", file=sys.stderr)
        return 1
    out = FLAGS.out or os.path.join(FLAGS.results, "report.md")
    with open(out, "w") as f:
        f.write(report)
    print(report)
    print(f"[report] {len(cells)} cells -> {out}")
    return 0


if __name__ == "__main__":
    run(main)
