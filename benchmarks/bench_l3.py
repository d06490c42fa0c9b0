"""Benchmark: L3 book + features in batch mode, and L3 vs L1 replay latency in one run.

1. **Batch**: ``features.kernels_l3.compute_batch`` (book update + features, one
   numba loop, no Python per event) over a generated L3 stream, single thread,
   best of ``--repeat`` runs; then the ``tickscore features`` path
   (:func:`replay.batch_features.compute_features`: Parquet in, Parquet out) with
   1 thread and with instrument-parallel threads.  Events/s are reported by
   wall clock and by process CPU time (the host is shared: CPU time shows the
   kernel's own cost when other processes compete for the two cores).
2. **Latency**: in-process replay (``tickscore replay`` code path, ``--speed
   max``, ``--publish none``) of an L1 file and an L3 file of the same length,
   interleaved ``--repeat`` times in this one process, same backend for both;
   reports tick-to-decision p50/p99/p99.9 and the ratio L3 p99 / L1 p99.

    python benchmarks/bench_l3.py --json benchmarks/results/l3.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def bench_batch(ticks: np.ndarray, n_inst: int, repeat: int) -> dict:
    """Time the single-thread batch kernels over ``ticks``: the default table, and the grown one."""
    from engine.schema import N_REJECT_REASONS
    from features import kernels_l3 as K
    from features.featureset import L3_FEATURE_SET

    p = L3_FEATURE_SET.params_array()
    X = np.zeros((len(ticks), K.N_FEATURES), np.float32)  # touched once: no page faults in the loop
    fl = np.zeros(len(ticks), np.int32)
    fs, is_ = K.new_state(n_inst)
    K.compute_batch(ticks[:1000], fs, is_, p, X, fl, np.zeros(N_REJECT_REASONS, np.int64))  # JIT / cache load
    K.compute_batch_auto(
        ticks[:1000], list(K.new_state(n_inst, max_orders=64)), p, X, fl, np.zeros(N_REJECT_REASONS, np.int64)
    )
    out = {"events": len(ticks)}
    for name in ("compute_batch", "compute_batch_auto"):
        runs = []
        for _ in range(repeat):
            c = np.zeros(N_REJECT_REASONS, np.int64)
            w0, c0 = time.perf_counter(), time.process_time()
            if name == "compute_batch":
                fs, is_ = K.new_state(n_inst)
                K.compute_batch(ticks, fs, is_, p, X, fl, c)
            else:  # the batch-mode path: a small order table, grown 4x when full
                K.compute_batch_auto(ticks, list(K.new_state(n_inst, max_orders=4096)), p, X, fl, c)
            w, cpu = time.perf_counter() - w0, time.process_time() - c0
            runs.append(
                {
                    "wall_s": w,
                    "cpu_s": cpu,
                    "events_per_s_wall": len(ticks) / w,
                    "events_per_s_cpu": len(ticks) / cpu,
                    "accepted": int(c[0]),
                }
            )
        out[name] = {
            "runs": runs,
            "best_events_per_s_wall": max(r["events_per_s_wall"] for r in runs),
            "best_events_per_s_cpu": max(r["events_per_s_cpu"] for r in runs),
        }
    return out


def bench_parallel(ticks: np.ndarray, n_inst: int, threads: int, repeat: int) -> dict:
    """Time the batch kernels with instruments split over ``threads`` (each group its own state).

    This is how ``tickscore features --threads N`` computes a chunk; the split
    (gather) is done before the clock starts, so this is the kernels' rate.
    """
    from concurrent.futures import ThreadPoolExecutor

    from engine.schema import N_REJECT_REASONS
    from features import kernels_l3 as K
    from features.featureset import L3_FEATURE_SET

    p = L3_FEATURE_SET.params_array()
    counts = np.bincount(ticks["instrument"], minlength=n_inst)
    order = np.argsort(-counts, kind="stable")
    load = np.zeros(threads)
    group = np.zeros(n_inst, dtype=np.int64)
    for i in order:
        g = int(np.argmin(load))
        group[i] = g
        load[g] += counts[i]
    parts = [np.ascontiguousarray(ticks[group[ticks["instrument"]] == g]) for g in range(threads)]
    Xs = [np.zeros((len(t), K.N_FEATURES), np.float32) for t in parts]
    fls = [np.zeros(len(t), np.int32) for t in parts]
    runs = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeat):
            states = [list(K.new_state(n_inst, max_orders=4096)) for _ in range(threads)]
            cs = [np.zeros(N_REJECT_REASONS, np.int64) for _ in range(threads)]
            w0 = time.perf_counter()
            list(
                pool.map(
                    lambda g, st=states, cs=cs: K.compute_batch_auto(
                        parts[g], st[g], p, Xs[g], fls[g], cs[g]
                    ),
                    range(threads),
                )
            )
            w = time.perf_counter() - w0
            runs.append({"wall_s": w, "events_per_s_wall": len(ticks) / w})
    return {
        "threads": threads,
        "instruments": n_inst,
        "group_events": [len(t) for t in parts],
        "runs": runs,
        "best_events_per_s_wall": max(r["events_per_s_wall"] for r in runs),
    }


def bench_features_cli(path: str, threads: list[int]) -> dict:
    from replay.batch_features import compute_features

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for th in threads:
            c0 = time.process_time()
            res = compute_features(path, Path(tmp) / f"f{th}.parquet", shape="l3", threads=th, progress=False)
            res["cpu_s"] = time.process_time() - c0
            out[f"threads_{th}"] = {
                k: res[k]
                for k in (
                    "events",
                    "threads",
                    "wall_s",
                    "kernel_s",
                    "events_per_s",
                    "kernel_events_per_s",
                    "cpu_s",
                )
            }
    return out


def bench_latency(l1: str, l3: str, repeat: int, backend: str, pin: int | None, warmup: int) -> dict:
    from replay.run import ReplayOptions, run_inprocess

    runs: dict[str, list] = {"l1": [], "l3": []}
    for _ in range(repeat):
        for name, path in (("l1", l1), ("l3", l3)):
            opts = ReplayOptions(
                data=path, backend=backend, pin=pin, publish="none", progress=False, warmup_ticks=warmup
            )
            s = run_inprocess(opts).summary
            runs[name].append(
                {
                    "latency_ns": s["latency_ns"],
                    "throughput_tps": s["throughput_tps"],
                    "backend": s["backend"],
                    "scores": s["scores"],
                    "rejected": s["rejected"],
                    "feature_set": s["feature_set"],
                }
            )
    med = {}
    for name, rs in runs.items():
        med[name] = {
            k: statistics.median(r["latency_ns"][k] for r in rs) for k in ("p50", "p90", "p99", "p999")
        }
        med[name]["throughput_tps"] = statistics.median(r["throughput_tps"] for r in rs)
    ratios = [
        b["latency_ns"]["p99"] / a["latency_ns"]["p99"] for a, b in zip(runs["l1"], runs["l3"], strict=True)
    ]
    return {
        "backend": backend,
        "pin": pin,
        "runs": runs,
        "median": med,
        "p99_ratio_l3_over_l1_median": statistics.median(ratios),
        "p99_ratio_per_repeat": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=5_000_000, help="L3 events for the batch benchmark")
    ap.add_argument("--symbols", default="ESZ6,NQZ6,CLF7,6EZ6", help="instruments of the batch stream")
    ap.add_argument("--latency-events", type=int, default=300_000, help="events per replay file")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", default="auto,ort", help="replay backends to compare L3 vs L1 with")
    ap.add_argument("--pin", default="1", help="hot-loop core ('none' to leave unpinned)")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    pin = None if args.pin == "none" else int(args.pin)

    from replay.generator import write_market
    from replay.generator_l3 import write_l3
    from replay.reader import read_ticks

    result: dict = {
        "command": "python benchmarks/bench_l3.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_start": _loadavg()},
        "created_unix": time.time(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-l3-") as tmp:
        if not args.skip_batch:
            big = str(Path(tmp) / "l3_batch.parquet")
            write_l3(big, args.events, [x for x in args.symbols.split(",") if x], seed=11)
            td = read_ticks(big, shape="l3")
            ticks = np.ascontiguousarray(td.ticks)
            result["batch_kernel"] = bench_batch(ticks, len(td.symbols), args.repeat)
            result["batch_parallel_2_threads"] = bench_parallel(ticks, len(td.symbols), 2, args.repeat)
            del ticks, td
            result["features_cli"] = bench_features_cli(big, [1, 2])
            bk = result["batch_kernel"]
            summary = {
                k: {m: bk[k][m] for m in ("best_events_per_s_wall", "best_events_per_s_cpu")}
                for k in ("compute_batch", "compute_batch_auto")
            }
            summary["parallel_2_threads"] = result["batch_parallel_2_threads"]["best_events_per_s_wall"]
            print(json.dumps({"batch": summary, "features_cli": result["features_cli"]}, indent=2))
        if not args.skip_latency:
            l1 = str(Path(tmp) / "l1.parquet")
            l3 = str(Path(tmp) / "l3.parquet")
            write_market(l1, args.latency_events, seed=3)
            write_l3(l3, args.latency_events, seed=3)
            result["latency"] = {}
            for b in [x.strip() for x in args.backends.split(",") if x.strip()]:
                r = bench_latency(l1, l3, args.repeat, b, pin, 1_000)
                result["latency"][b] = r
                print(
                    json.dumps(
                        {
                            "backend": b,
                            "median": r["median"],
                            "p99_ratio_l3_over_l1_median": r["p99_ratio_l3_over_l1_median"],
                        },
                        indent=2,
                    )
                )
    result["host"]["loadavg_end"] = _loadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
