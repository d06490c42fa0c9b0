"""``tickscore report`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from replay.report.gate import check_regression, parse_max_regress, pct
from replay.report.output import report_text, write_report
from replay.report.runs import DEFAULT_MAX_REGRESS, DEFAULT_OUT, RunLoadError, load_run


def register(subparsers) -> None:
    """Register the command's parser(s) on the ``tickscore`` subparsers."""
    p = subparsers.add_parser(
        "report",
        help="compare replay runs: percentile table, plots, HTML, regression check",
        description=(
            "Compare replay run directories (tickscore replay --out DIR): print a side-by-side "
            "latency table with ratios against the first run and write plots (and report.html). "
            "With --check, exit 1 if the candidate's p50 or p99 regressed by more than "
            "--max-regress against the baseline."
        ),
    )
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories; the first is the reference")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"directory for plots and report files (default ./{DEFAULT_OUT})")
    p.add_argument("--html", action="store_true", help="also write a self-contained report.html")
    p.add_argument("--no-plots", action="store_true", help="print the tables only, write no files")
    p.add_argument("--check", nargs=2, metavar=("BASELINE_DIR", "CANDIDATE_DIR"),
                   help="regression gate on service-time p50 and p99: exit 0 ok, 1 regressed, 2 usage")
    p.add_argument("--max-regress", metavar="R", default=None,
                   help="allowed increase for --check: '10%%' or '0.1' (default 10%%)")
    p.set_defaults(handler=cmd_report)


def _err(msg: str) -> int:
    print(f"tickscore report: error: {msg}", file=sys.stderr)
    return 2


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        limit = parse_max_regress(
            DEFAULT_MAX_REGRESS if args.max_regress is None else args.max_regress
        )
    except ValueError as exc:
        return _err(str(exc))
    base, cand = (load_run(d) for d in args.check)
    print(report_text([base, cand]))
    ok, messages = check_regression(base, cand, limit)
    print()
    print(f"regression check: {cand.name} against baseline {base.name}, max regress +{pct(limit)}")
    for m in messages:
        print(f"  {m}")
    print("PASS" if ok else "FAIL: candidate regressed beyond the limit")
    if args.out or args.html:
        _print_files(write_report([base, cand], args.out or DEFAULT_OUT, args.html))
    return 0 if ok else 1


def _print_files(files: dict[str, Path]) -> None:
    print()
    for name, path in files.items():
        print(f"  {name:<12} {path}")


def cmd_report(args: argparse.Namespace) -> int:
    """Run ``tickscore report`` with parsed ``args``; return the exit code (0, 1 or 2)."""
    try:
        if args.check:
            if args.runs:
                return _err("give either RUN_DIR ... or --check BASELINE_DIR CANDIDATE_DIR, not both")
            return _cmd_check(args)
        if args.max_regress is not None:
            return _err("--max-regress only applies with --check BASELINE_DIR CANDIDATE_DIR")
        if not args.runs:
            return _err("give at least one RUN_DIR (or --check BASELINE_DIR CANDIDATE_DIR)")
        if args.html and args.no_plots:
            return _err("--html needs the plots; drop --no-plots")
        runs = [load_run(d) for d in args.runs]
        print(report_text(runs))
        if not args.no_plots:
            _print_files(write_report(runs, args.out or DEFAULT_OUT, args.html))
        return 0
    except RunLoadError as exc:
        if getattr(args, "debug", False):
            raise
        return _err(str(exc))
