"""Benchmark: ``tickscore train`` on big generated files of each shape: wall time and peak RSS.

For each shape and each size in ``--events`` a seeded file is generated, then
``tickscore train --data FILE --shape SHAPE`` runs in a child process
(``OMP_NUM_THREADS=1``); its wall time and peak resident set size (the
child's ``VmHWM``: ``ru_maxrss`` would carry the parent's high-water mark over
fork + exec) are recorded with the test AUC of both models.  Two sizes show
whether memory is bounded: the peak must not grow with the file.

    python benchmarks/bench_train.py --events 5000000,10000000 --json benchmarks/results/train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _train(data: Path, shape: str, out: Path, chunk_rows: int | None = None) -> dict:
    cmd = [sys.executable, "-c",
           "import sys; from engine.cli import main; rc = main(sys.argv[1:]); "
           "hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]; "
           "print('MAXRSS_KB', hwm, file=sys.stderr); sys.exit(rc)",
           "train", "--data", str(data), "--shape", shape, "--out", str(out), "--json",
           *(["--chunk-rows", str(chunk_rows)] if chunk_rows else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"train {shape} failed: {run.stderr[-2000:]}")
    rss_kb = int(next(ln.split()[1] for ln in run.stderr.splitlines() if ln.startswith("MAXRSS_KB")))
    rep = json.loads(run.stdout)
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(rss_kb / 1024, 1),
        "events": rep["rows"]["generated"],
        "usable_rows": rep["rows"]["usable"],
        "sample": rep["sample"],
        "test_auc": {"fp32": rep["fp32"]["test"]["auc"], "int8": rep["int8"]["test"]["auc"]},
        "timing_s": rep["timing_s"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", default="5000000,10000000", help="comma-separated file sizes")
    ap.add_argument("--shapes", default="l1,trades,l3")
    ap.add_argument("--chunk-rows", type=int, default=None,
                    help="train's --chunk-rows (default: the reader's 1M-row chunks)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from replay.generator import write_market
    from replay.generator_l3 import write_l3, write_trades

    out: dict = {"command": "python benchmarks/bench_train.py " + " ".join(argv or sys.argv[1:]),
                 "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                / 2**30, 1),
                          "loadavg_start": list(os.getloadavg())},
                 "shapes": {}}  # fmt: skip
    writers = {"l1": write_market, "trades": write_trades, "l3": write_l3}
    with tempfile.TemporaryDirectory(prefix="tickscore-bench-train-") as tmp:
        for shape in args.shapes.split(","):
            out["shapes"][shape] = {}
            for events in (int(e) for e in args.events.split(",")):
                data = writers[shape](Path(tmp) / f"{shape}.parquet", events)
                res = _train(data, shape, Path(tmp) / f"{shape}.onnx", args.chunk_rows)
                res["chunk_rows"] = args.chunk_rows
                out["shapes"][shape][str(events)] = res
                print(f"{shape}: {res['events']:,} events, {res['wall_s']} s, peak RSS "
                      f"{res['peak_rss_mb']:,} MB, test AUC {res['test_auc']}", file=sys.stderr)
                data.unlink()
    out["host"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: {e: {kk: r[kk] for kk in ("wall_s", "peak_rss_mb")} for e, r in v.items()}
                      for k, v in out["shapes"].items()}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
