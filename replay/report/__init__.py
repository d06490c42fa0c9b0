"""Compare replay runs: percentile table, plots, self-contained HTML and a regression gate.

Input is one or more run directories written by ``tickscore replay --out DIR``
(``summary.json`` + ``latency_raw.npz``, see :func:`replay.latency.write_outputs`).
Every latency number is recomputed from the raw int64 arrays with
:func:`replay.latency.latency_stats`, after dropping the same warm-up the replay
dropped, so the report's table equals the replay's printed table and
``summary.json`` to the nanosecond.

Series per run:

* **service time**: ``t_out - t_in`` per scored tick (the replay's "service" column);
* **from intended send time (CO-corrected)**: ``t_out - intended`` for paced runs,
  where ``intended`` is when the tick should have been released; a stall then
  shows up in every tick queued behind it, so coordinated omission is not hidden.

Command line (:mod:`engine.commands.report`)::

    tickscore report RUN_DIR [RUN_DIR ...] [--out DIR] [--html] [--no-plots]
    tickscore report --check BASELINE_DIR CANDIDATE_DIR [--max-regress 10%]

The package, one concern per module: :mod:`~replay.report.runs` (loading),
:mod:`~replay.report.tables`, :mod:`~replay.report.plots`,
:mod:`~replay.report.output` (text, JSON, HTML), :mod:`~replay.report.gate`
(regression check); the command line is :mod:`engine.commands.report`.
"""

from replay.report.gate import check_regression, parse_max_regress
from replay.report.output import write_report
from replay.report.runs import CO_LABEL, SERVICE_LABEL, Run, RunLoadError, StageStats, load_run
from replay.report.tables import compare_table, stage_table

__all__ = [
    "CO_LABEL",
    "SERVICE_LABEL",
    "Run",
    "RunLoadError",
    "StageStats",
    "check_regression",
    "compare_table",
    "load_run",
    "parse_max_regress",
    "stage_table",
    "write_report",
]
