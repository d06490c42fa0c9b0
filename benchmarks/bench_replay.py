"""Benchmark: in-process replay at max speed, ZeroMQ publish included, hot loop pinned.

Runs the same code as ``tickscore replay`` (features + model + encode + publish),
with an independent SUB process draining the scores so the publish cost is the
real one, for each requested backend, ``--repeat`` times, interleaved
(backend A, B, A, B, ...) so machine noise hits all alike.  Writes JSON with every
run's percentiles and the median across repeats.

    python benchmarks/bench_replay.py --backends ort --repeat 3 --json benchmarks/results/replay.json
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_DRAIN = r"""
import os, sys, zmq
try:
    os.sched_setaffinity(0, {int(sys.argv[3])})  # keep the subscriber off the hot core
except (OSError, ValueError):
    pass
ctx = zmq.Context(); s = ctx.socket(zmq.SUB); s.setsockopt(zmq.RCVHWM, 0)
s.setsockopt(zmq.SUBSCRIBE, b""); s.connect(sys.argv[1]); print("ready", flush=True)
n = 0
while s.poll(int(float(sys.argv[2]) * 1000)) or n == 0:
    s.recv_multipart(); n += 1
print(n, flush=True)
"""


def _one_run(backend: str, data: str | None, model: str | None, pin: int | None,
             limit: int | None, subscriber: bool, rt_priority: int | None = None) -> dict:
    from replay.run import ReplayOptions, run_inprocess

    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/bench.ipc"
        drain = None
        if subscriber:
            sub_core = str(0 if pin != 0 else 1)
            drain = subprocess.Popen([sys.executable, "-c", _DRAIN, endpoint, "3", sub_core],
                                     stdout=subprocess.PIPE, text=True)
            drain.stdout.readline()
        opts = ReplayOptions(data=data, model=model, backend=backend, pin=pin, publish=endpoint,
                             wait_subscribers=1 if subscriber else 0, progress=False, limit=limit,
                             rt_priority=rt_priority)
        res = run_inprocess(opts)
        received = None
        if drain is not None:
            out, _ = drain.communicate(timeout=120)
            received = int(out.strip().splitlines()[-1])
    s = res.summary
    return {
        "backend": backend,
        "backend_used": s["backend"],
        "backend_selection": s.get("backend_selection"),
        "latency_ns": s["latency_ns"],
        "throughput_tps": s["throughput_tps"],
        "scores": s["scores"],
        "dropped": s["dropped"],
        "received_by_subscriber": received,
        "model_version": s["model"]["version"],
        "pinned": s["host"]["pinned"],
        "pin": s["pin"],
        "scheduler": s["scheduler"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="ort", help="comma-separated backends (default ort)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--pin", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--no-subscriber", action="store_true")
    ap.add_argument("--rt-priority", type=int, default=None, help="SCHED_FIFO priority for the hot loop")
    ap.add_argument("--json", required=True, help="output JSON path")
    args = ap.parse_args()

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    runs: list[dict] = []
    for r in range(args.repeat):
        for b in backends:
            run = _one_run(b, args.data, args.model, args.pin, args.limit, not args.no_subscriber,
                           args.rt_priority)
            run["repeat"] = r
            runs.append(run)
            lat = run["latency_ns"]
            print(f"[{r}] {b:>6}: p50 {lat['p50'] / 1e3:7.2f} µs  p99 {lat['p99'] / 1e3:7.2f} µs  "
                  f"p99.9 {lat['p999'] / 1e3:7.2f} µs  max {lat['max'] / 1e3:9.2f} µs  "
                  f"{run['throughput_tps']:,.0f} ticks/s", flush=True)
    median = {}
    for b in backends:
        rs = [x for x in runs if x["backend"] == b]
        median[b] = {
            k: statistics.median(x["latency_ns"][k] for x in rs)
            for k in ("p50", "p90", "p99", "p999", "p9999", "max", "mean")
        }
        median[b]["throughput_tps"] = statistics.median(x["throughput_tps"] for x in rs)
    ratios = {}
    if len(backends) > 1:
        base = backends[0]
        for b in backends[1:]:
            ratios[f"{base}_p50_over_{b}_p50"] = median[base]["p50"] / median[b]["p50"]
            ratios[f"{base}_p99_over_{b}_p99"] = median[base]["p99"] / median[b]["p99"]
    out = {
        "benchmark": "inprocess replay, max speed, ZeroMQ publish to a draining SUB process",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "machine": platform.machine(), "kernel": platform.release()},
        "median_of_repeats_ns": median,
        "ratios": ratios,
        "runs": runs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
