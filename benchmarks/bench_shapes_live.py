"""Benchmark: serving trade-only and L3 data live vs replaying it in-process, same file, one run.

For each shape a seeded file is generated (``replay.generator_l3``), then
``tickscore replay`` runs it

* in-process (``--publish`` to a ZeroMQ ipc socket, hot loop pinned to core 1), and
* through a spawned service (``--via zmq``: publisher -> ``tickscore serve`` ->
  subscriber, paced at ``--rate``),

``--repeat`` times, interleaved.  Reported per shape: the service time
(``ts_out - ts_in``: what the hot loop spends per tick) of both, p50/p99, and
their ratio; the wire-to-wire latency of the live run for context (it carries
the VM's transport floor, see ``bench_floor.py``).

    python benchmarks/bench_shapes_live.py --json benchmarks/results/shapes_live.json
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
sys.path.insert(0, str(ROOT))


def _replay(*args: str) -> dict:
    cmd = [sys.executable, "-m", "engine.cli", "replay", "--no-progress", "--json", *args]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=20_000.0, help="live send rate, ticks/s")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from replay.generator_l3 import write_l3, write_trades

    out: dict = {"command": "python benchmarks/bench_shapes_live.py " + " ".join(argv or sys.argv[1:]),
                 "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "loadavg_start": list(os.getloadavg())},
                 "events": args.events, "rate_tps": args.rate, "shapes": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tickscore-bench-") as tmp:
        files = {"trades": write_trades(Path(tmp) / "trades.parquet", args.events),
                 "l3": write_l3(Path(tmp) / "l3.parquet", args.events)}  # fmt: skip
        for shape, path in files.items():
            rows = []
            for k in range(args.repeat):
                inproc = _replay("--data", str(path), "--publish", f"ipc://{tmp}/inproc-{k}.ipc")
                live = _replay("--via", "zmq", "--data", str(path), "--rate", str(args.rate))
                rows.append({
                    "inprocess_service_ns": inproc["latency_ns"],
                    "live_service_ns": live["service_time_ns"],
                    "live_wire_ns": live["latency_ns"],
                    "scores": [inproc["scores"], live["scores"]],
                    "backend": [inproc["backend"], live["backend"]],
                })  # fmt: skip
                a, b = inproc["latency_ns"], live["service_time_ns"]
                print(f"{shape} #{k}: in-process p50/p99 {a['p50'] / 1e3:.2f}/{a['p99'] / 1e3:.2f} us, "
                      f"live service {b['p50'] / 1e3:.2f}/{b['p99'] / 1e3:.2f} us",
                      file=sys.stderr)  # fmt: skip

            def med(key: str, p: str, rows=rows) -> float:
                return statistics.median(r[key][p] for r in rows)

            m = {
                "inprocess_p50_ns": med("inprocess_service_ns", "p50"),
                "inprocess_p99_ns": med("inprocess_service_ns", "p99"),
                "live_p50_ns": med("live_service_ns", "p50"),
                "live_p99_ns": med("live_service_ns", "p99"),
                "live_wire_p50_ns": med("live_wire_ns", "p50"),
            }
            m["live_over_inprocess_p50"] = m["live_p50_ns"] / m["inprocess_p50_ns"]
            m["live_over_inprocess_p99"] = m["live_p99_ns"] / m["inprocess_p99_ns"]
            out["shapes"][shape] = {"runs": rows, "median": m}
    out["host"]["loadavg_end"] = list(os.getloadavg())
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(json.dumps({s: v["median"] for s, v in out["shapes"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
