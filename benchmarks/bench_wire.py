"""Benchmark: wire-to-wire latency of the service over Aeron IPC and ZeroMQ ipc.

Each run is ``tickscore replay --via aeron|zmq`` with a spawned service
(onnxruntime int8 backend, hot loop pinned to core 1, busy-spin), a publisher
process paced at ``--rate`` ticks/s and a subscriber process, both on the other
core(s).  Latency = subscriber receive CLOCK_MONOTONIC - intended send time.
Transports are interleaved (aeron, zmq, aeron, zmq, ...) so machine noise hits
both alike.  The CPU time *other* processes used during each run is measured
(``foreign_busy_during``: all CPU time from /proc/stat minus this benchmark's
process tree); a run where it exceeds ``--max-foreign`` is marked ``disturbed``,
kept in the JSON but left out of the medians, and repeated: on a shared 2-core
machine a neighbour's job shows up directly in the tail.

    python benchmarks/bench_wire.py --repeat 3 --json benchmarks/results/wire.json

Writes every run's percentiles (wire-to-wire from intended send time, from the
actual send time, the service's own ts_out - ts_in, and the publisher's send
lag), the median over repeats, the best run, and the targets of the issue.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Targets (ns) from the issue: onnxruntime int8 backend, this 2-core machine.
TARGETS = {"aeron": {"p50": 20_000, "p99": 60_000}, "zmq": {"p50": 60_000, "p99": 150_000}}
KEYS = ("p50", "p90", "p99", "p999", "p9999", "max")


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def background_busy(seconds: float = 1.0) -> float:
    """Return the fraction of all CPUs busy over ``seconds`` (run when nothing of ours runs)."""
    b0, t0 = _cpu_times()
    time.sleep(seconds)
    b1, t1 = _cpu_times()
    return (b1 - b0) / max(t1 - t0, 1)


def one_run(via: str, args) -> dict:
    cmd = [
        sys.executable, "-m", "engine.cli", "replay", "--via", via, "--limit", str(args.limit),
        "--rate", str(args.rate), "--backend", args.backend, "--pin", str(args.pin), "--json",
        "--no-progress", "--warmup-ticks", str(args.warmup), "--client-idle", args.client_idle[via],
        "--client-rt-priority", str(args.client_rt_priority), "--keep-warm-us", str(args.keep_warm_us),
        "--loop", args.loop,
    ]
    bg = background_busy()
    t0 = time.time()
    busy0, total0 = _cpu_times()
    ours0 = _children_cpu_s()
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    busy1, total1 = _cpu_times()
    ours = _children_cpu_s() - ours0
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    s = json.loads(run.stdout)
    tick = os.sysconf("SC_CLK_TCK")
    wall_cpu_s = (total1 - total0) / tick  # CPU-seconds available on all cores during the run
    foreign = max(0.0, (busy1 - busy0) / tick - ours) / max(wall_cpu_s, 1e-9)
    return {
        "via": via,
        "command": "tickscore " + " ".join(cmd[3:]),
        "background_busy_before": round(bg, 3),
        "foreign_busy_during": round(foreign, 3),
        "disturbed": foreign > args.max_foreign,
        "loadavg_after": os.getloadavg()[0],
        "started_unix": t0,
        "ticks": s["ticks"],
        "scores": s["scores"],
        "dropped": s["dropped"],
        "rejected": s["rejected"],
        "backend": s["backend"],
        "model": s["model"],
        "wire_ns": {k: s["latency_ns"][k] for k in KEYS},
        "from_send_ns": {k: s["latency_from_send_ns"][k] for k in KEYS},
        "service_ns": {k: s["service_time_ns"][k] for k in KEYS},
        "send_lag_ns": {k: s["send_lag_ns"][k] for k in KEYS},
        "publisher": s.get("publisher"),
        "subscriber": s.get("subscriber"),
    }


def _median(runs: list[dict], series: str) -> dict:
    return {k: int(statistics.median(r[series][k] for r in runs)) for k in KEYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--via", default="aeron,zmq", help="comma-separated transports (default aeron,zmq)")
    ap.add_argument("--limit", type=int, default=30_000, help="ticks per run (default 30000)")
    ap.add_argument("--rate", type=float, default=2000.0, help="ticks/s (default 2000)")
    ap.add_argument("--warmup", type=int, default=1000, help="first N latencies excluded (default 1000)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--loop", default="auto", choices=["auto", "native", "python"],
                    help="the spawned service's duty cycle (default auto: native with the fused backend)")
    ap.add_argument("--pin", default="1")
    ap.add_argument("--keep-warm-us", type=int, default=100,
                    help="service keep-warm period while idle, us (0 = off; default 100, as the service)")
    ap.add_argument("--client-rt-priority", type=int, default=10,
                    help="publisher SCHED_FIFO priority while paced (0 = off; default 10, as replay --via)")
    ap.add_argument("--zmq-client-idle", default="auto", choices=["auto", "spin", "yield", "block"])
    ap.add_argument("--aeron-client-idle", default="auto", choices=["auto", "spin", "yield"])
    ap.add_argument("--max-foreign", type=float, default=0.05,
                    help="a run during which other processes used more than this fraction of the "
                    "CPUs is marked disturbed and repeated (default 0.05)")
    ap.add_argument("--max-attempts", type=int, default=4, help="attempts per wanted clean run (default 4)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    args.client_idle = {"aeron": args.aeron_client_idle, "zmq": args.zmq_client_idle}
    vias = [v.strip() for v in args.via.split(",") if v.strip()]
    runs: list[dict] = []
    clean = dict.fromkeys(vias, 0)
    attempts = 0
    while min(clean.values()) < args.repeat and attempts < args.repeat * args.max_attempts:
        attempts += 1
        for via in vias:
            if clean[via] >= args.repeat:
                continue
            r = one_run(via, args)
            runs.append(r)
            clean[via] += not r["disturbed"]
            w = r["wire_ns"]
            print(f"[{clean[via]}/{args.repeat}] {via:<5} wire p50 {w['p50'] / 1e3:8.1f} us  p99 "
                  f"{w['p99'] / 1e3:9.1f} us  max {w['max'] / 1e3:9.1f} us  (service p50 "
                  f"{r['service_ns']['p50'] / 1e3:.1f} us; other processes used "
                  f"{r['foreign_busy_during']:.0%} of the CPUs"
                  f"{' -> disturbed, not counted' if r['disturbed'] else ''})",
                  flush=True)
    summary = {}
    for via in vias:
        mine = [r for r in runs if r["via"] == via]
        rs = [r for r in mine if not r["disturbed"]] or mine
        best = min(rs, key=lambda r: r["wire_ns"]["p99"])
        med = _median(rs, "wire_ns")
        summary[via] = {
            "runs": len(rs),
            "disturbed_runs_excluded": sum(1 for r in runs if r["via"] == via and r["disturbed"]),
            "median_wire_ns": med,
            "median_from_send_ns": _median(rs, "from_send_ns"),
            "median_service_ns": _median(rs, "service_ns"),
            "median_send_lag_ns": _median(rs, "send_lag_ns"),
            "best_run_wire_ns": best["wire_ns"],
            "target_ns": TARGETS.get(via),
            "median_meets_target": {k: med[k] <= v for k, v in TARGETS.get(via, {}).items()},
        }
    out = {
        "benchmark": "wire-to-wire latency, tickscore replay --via (spawned service)",
        "params": {"limit": args.limit, "rate_tps": args.rate, "warmup": args.warmup, "repeat": args.repeat,
                   "backend": args.backend, "loop": args.loop, "pin": args.pin,
                   "client_rt_priority": args.client_rt_priority,
                   "keep_warm_us": args.keep_warm_us, "client_idle": args.client_idle},
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                 "machine": platform.machine()},
        "created_unix": time.time(),
        "summary": summary,
        "runs": runs,
    }
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    for via, s in summary.items():
        m = s["median_wire_ns"]
        t = s["target_ns"]
        print(f"{via:<5} median of {s['runs']}: wire p50 {m['p50'] / 1e3:.1f} us, "
              f"p99 {m['p99'] / 1e3:.1f} us (target p50 <= {t['p50'] / 1e3:.0f}, "
              f"p99 <= {t['p99'] / 1e3:.0f})")


if __name__ == "__main__":
    main()
