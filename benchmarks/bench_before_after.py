"""Benchmark: in-process replay of this tree vs another revision, interleaved in one run.

For a refactor that must not slow the hot path: ``git worktree`` checks out
``--before`` into a temporary directory, then ``tickscore replay --speed max
--publish none --pin 1`` runs on the embedded data alternately in both trees
(``--runs`` each, after one warm-up run each that also fills the numba caches),
with this checkout's virtualenv.  Medians of p50 / p99 / throughput and their
ratios after / before are written as JSON.

    python benchmarks/bench_before_after.py --before 8a8fe1d --runs 7 \\
        --json benchmarks/results/before_after_layers.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _replay(tree: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "engine.cli", "replay", "--speed", "max", "--publish", "none",
           "--pin", "1", "--out", str(out), "--json"]  # fmt: skip
    run = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        raise RuntimeError(f"replay in {tree} failed: {run.stderr[-2000:]}")
    s = json.loads(run.stdout)
    return {"p50_ns": s["latency_ns"]["p50"], "p99_ns": s["latency_ns"]["p99"],
            "throughput_tps": s["throughput_tps"], "backend": s["backend"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git revision to compare with")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tickscore-before-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(before), rev], cwd=ROOT, check=True)
        try:
            trees = {"before": before, "after": ROOT}
            for name, tree in trees.items():  # warm-up: numba caches of each tree
                _replay(tree, Path(tmp) / f"warm-{name}")
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for r in range(args.runs):
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for name in order:
                    res = _replay(trees[name], Path(tmp) / f"{name}-{r}")
                    runs[name].append(res)
                    print(f"{name} run {r}: p50 {res['p50_ns']} ns p99 {res['p99_ns']} ns "
                          f"{res['throughput_tps']:,.0f} ticks/s", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("p50_ns", "p99_ns", "throughput_tps")}
           for k, v in runs.items()}  # fmt: skip
    out = {
        "command": "python benchmarks/bench_before_after.py " + " ".join(argv or sys.argv[1:]),
        "before": rev, "after": head,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "loadavg": list(os.getloadavg())},
        "runs": runs,
        "median": med,
        "after_over_before": {m: med["after"][m] / med["before"][m] for m in med["after"]},
    }  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"median": med, "after_over_before": out["after_over_before"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
