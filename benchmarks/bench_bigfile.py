"""Benchmark: replay a file larger than memory budgets in bounded chunks; peak RSS and throughput.

Generates (once, cached in ``--data-dir``) a seeded L1 file of ``--events``
events (default 50 million) chunk by chunk, plus a small file (``--small-events``,
default 1 million) from the same generator, then runs, each in a fresh process
under ``/usr/bin/time -v``:

* ``tickscore replay --data BIG --speed max --publish none --pin 1`` (chunked
  automatically: more than 5M rows), and the same on the small file
  (in memory), reporting peak RSS, throughput (scores/s) and latency;
* optionally (``--features``) ``tickscore features`` on the big file.

The small and the big replay alternate ``--repeats`` times (small, big, big,
small, ...: drift on a shared machine hits both alike); ``small`` / ``big`` hold
the run with the median throughput, ``repeats`` every run, and
``throughput_ratio_big_over_small`` is median(big) / median(small).

Memory: a chunked replay is two processes (the replay and its reader process,
sharing the chunk slots).  ``peak_rss_mb`` is the peak of the *sum* of the RSS of
the process tree, sampled every 50 ms (the shared slots counted in each process:
an upper bound), or the largest single process's peak from ``time -v`` if higher;
``peak_rss_shared_once_mb`` the same sum with shared memory counted once;
``peak_rss_mb_largest_process`` the ``time -v`` figure.

On a shared machine other work preempts the hot thread now and then: ``hot_thread``
gives its CPU time and its time runnable-but-waiting during the replay (from
``/proc/PID/task/PID/schedstat``), and ``cpu_throughput_ratio_big_over_small``
compares ticks per CPU-second of the hot thread, which that noise moves less.

    python benchmarks/bench_bigfile.py --json benchmarks/results/bigfile.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_big_l1(path: Path, n_events: int, block: int = 2_000_000) -> Path:
    """Write ``n_events`` generated L1 events as Parquet, block by block (bounded memory)."""
    import pyarrow.parquet as pq

    from replay.generator import DEFAULT_START_NS, generate_market

    tmp = path.with_suffix(".part")
    writer = None
    start = DEFAULT_START_NS
    left = n_events
    k = 0
    try:
        while left > 0:
            n = min(block, left)
            df = generate_market(n, seed=100 + k, start_ns=start)
            start = int(df["ts_event_ns"].max()) + 1_000_000
            tbl = df.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(tmp, tbl.schema, compression="zstd")
            writer.write_table(tbl, row_group_size=1 << 20)
            left -= n
            k += 1
            print(f"  generated {n_events - left:,}/{n_events:,}", file=sys.stderr)
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)
    return path


def _tree(pid: int) -> list[int]:
    """Return ``pid`` and all its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    """Return (VmRSS, RssShmem) of ``pid`` in kB, (0, 0) if it is gone.

    From /proc/PID/status (the kernel's counters): cheap, unlike smaps, whose page
    table walk would take the replay's mmap lock every sample.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return 0, 0
    rss = re.search(r"^VmRSS:\s+(\d+)", text, re.M)
    shm = re.search(r"^RssShmem:\s+(\d+)", text, re.M)
    return (int(rss.group(1)) if rss else 0, int(shm.group(1)) if shm else 0)


def _schedstat(pid: int) -> tuple[int, int] | None:
    """Return (ns on a CPU, ns runnable but waiting for one) of ``pid``'s main thread."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            run, wait = f.read().split()[:2]
        return int(run), int(wait)
    except (OSError, ValueError):
        return None


def timed(cmd: list[str], period_s: float = 0.05, pin: str | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; return wall s, peak RSS (MB) of the process tree, stdout, rc.

    Samples (every ``period_s``, from a thread kept off core ``pin``) the process
    tree's memory and the main thread's schedstat (``sched`` rows: monotonic ns,
    run ns, wait ns).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    affinity = os.sched_getaffinity(0)
    if pin is not None and pin.isdigit() and affinity - {int(pin)}:
        os.sched_setaffinity(0, affinity - {int(pin)})  # this thread only: sample off the hot core
    peak_rss = peak_once = 0
    peak_procs = 0
    sched: list[tuple[int, int, int]] = []
    try:
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(proc.communicate)
            while not fut.done():
                pids = _tree(proc.pid)[1:]  # not /usr/bin/time itself
                if pids:
                    st = _schedstat(pids[0])
                    if st is not None:
                        sched.append((time.monotonic_ns(), *st))
                mem = [_mem_kb(p) for p in pids]
                peak_rss = max(peak_rss, sum(m[0] for m in mem))
                if mem:  # the chunk slots (shared memory) once, not once per process
                    once = sum(m[0] - m[1] for m in mem) + max(m[1] for m in mem)
                    peak_once = max(peak_once, once)
                peak_procs = max(peak_procs, sum(1 for m in mem if m[0]))
                time.sleep(period_s)
            out, err = fut.result()
    finally:
        os.sched_setaffinity(0, affinity)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    largest = int(m.group(1)) / 1024 if m else None
    return {
        "cmd": " ".join(cmd),
        "rc": proc.returncode,
        "wall_s": wall,
        "peak_rss_mb": max(peak_rss / 1024, largest or 0.0),
        "peak_rss_shared_once_mb": peak_once / 1024,
        "peak_rss_mb_largest_process": largest,
        "processes": peak_procs,
        "stdout": out,
        "stderr_tail": err[-2000:],
        "sched": sched,
    }


def _hot_thread(sched: list[tuple[int, int, int]], start_ns: int, end_ns: int, ticks: int) -> dict | None:
    """Return the hot thread's CPU and wait time over [start_ns, end_ns] (interpolated samples).

    ``wait_s`` is time the thread was runnable but another task had its core (on a
    shared machine: other people's work); ``tps_per_cpu_s`` = ticks per second the
    thread actually ran, which that noise does not move.
    """
    import numpy as np

    a = np.asarray(sched, dtype=np.float64)
    if len(a) < 2 or not (a[0, 0] <= start_ns and end_ns <= a[-1, 0]):
        return None
    run = np.interp([start_ns, end_ns], a[:, 0], a[:, 1])
    wait = np.interp([start_ns, end_ns], a[:, 0], a[:, 2])
    run_s, wait_s = (run[1] - run[0]) / 1e9, (wait[1] - wait[0]) / 1e9
    return {"run_s": run_s, "wait_s": wait_s, "tps_per_cpu_s": ticks / run_s if run_s > 0 else None}


def replay(path: Path, out: Path, pin: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "engine.cli",
        "replay",
        "--data",
        str(path),
        "--speed",
        "max",
        "--publish",
        "none",
        "--pin",
        pin,
        "--no-progress",
        "--out",
        str(out),
    ]
    res = timed(cmd, pin=pin)
    if res["rc"] != 0:
        raise RuntimeError(f"replay failed: {res['stderr_tail']}")
    s = json.loads((out / "summary.json").read_text())
    res.pop("stdout")
    res["summary"] = {
        k: s[k]
        for k in (
            "ticks",
            "scores",
            "rejected",
            "wall_s",
            "throughput_tps",
            "latency_ns",
            "backend",
            "chunked",
            "shape",
        )
    }
    res["summary"]["chunks"] = s.get("chunks")
    import numpy as np

    with np.load(out / "latency_raw.npz") as raw:  # t_out: CLOCK_MONOTONIC ns, like the samples
        end = int(raw["t_out"][-1])
    res["hot_thread"] = _hot_thread(res.pop("sched"), end - int(s["wall_s"] * 1e9), end, s["scores"])
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=50_000_000)
    ap.add_argument("--small-events", type=int, default=1_000_000)
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "tickscore-bench")
    ap.add_argument("--pin", default="1")
    ap.add_argument("--repeats", type=int, default=3, help="small/big replay pairs, alternating")
    ap.add_argument("--features", action="store_true", help="also run tickscore features on the big file")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from replay.generator import write_market

    args.data_dir.mkdir(parents=True, exist_ok=True)
    big = args.data_dir / f"l1_{args.events}.parquet"
    small = args.data_dir / f"l1_small_{args.small_events}.parquet"
    t0 = time.perf_counter()
    if not big.exists():
        write_big_l1(big, args.events)
    if not small.exists():
        write_market(small, args.small_events, seed=100)
    gen_s = time.perf_counter() - t0
    result: dict = {
        "command": "python benchmarks/bench_bigfile.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": list(os.getloadavg()),
        },
        "files": {
            "big": {"path": str(big), "events": args.events, "bytes": big.stat().st_size},
            "small": {"path": str(small), "events": args.small_events, "bytes": small.stat().st_size},
        },
        "generate_s": gen_s,
    }
    runs: dict[str, list[dict]] = {"small": [], "big": []}
    paths = {"small": small, "big": big}
    with tempfile.TemporaryDirectory(prefix="bench-big-") as tmp:
        for r in range(args.repeats):
            order = ("small", "big") if r % 2 == 0 else ("big", "small")
            for which in order:
                res = replay(paths[which], Path(tmp) / f"{which}{r}", args.pin)
                res["loadavg_1m"] = os.getloadavg()[0]
                runs[which].append(res)
                line = {"repeat": r, which: res["summary"], "rss_mb": res["peak_rss_mb"],
                        "shared_once_mb": res["peak_rss_shared_once_mb"],
                        "hot_thread": res["hot_thread"]}  # fmt: skip
                print(json.dumps(line))
        if args.features:
            f = timed(
                [
                    sys.executable,
                    "-m",
                    "engine.cli",
                    "features",
                    "--data",
                    str(big),
                    "--out",
                    str(Path(tmp) / "feat.parquet"),
                    "--no-progress",
                    "--json",
                ]
            )
            f["summary"] = json.loads(f.pop("stdout")) if f["rc"] == 0 else None
            f.pop("sched")
            result["features_big"] = f
            print(json.dumps({"features_rss_mb": f["peak_rss_mb"], "wall_s": f["wall_s"]}))
    tps = {k: [x["summary"]["throughput_tps"] for x in v] for k, v in runs.items()}
    for k, v in runs.items():  # the median run (upper median for an even count)
        result[k] = sorted(v, key=lambda x: x["summary"]["throughput_tps"])[len(v) // 2]
    med = {k: statistics.median(v) for k, v in tps.items()}
    result["throughput_ratio_big_over_small"] = med["big"] / med["small"]
    result["repeats"] = {
        "n": args.repeats,
        "small_tps": tps["small"],
        "big_tps": tps["big"],
        "pair_ratios": [b / s for s, b in zip(tps["small"], tps["big"], strict=True)],
        "small_latency_ns": [x["summary"]["latency_ns"] for x in runs["small"]],
        "big_latency_ns": [x["summary"]["latency_ns"] for x in runs["big"]],
        "small_peak_rss_mb": [x["peak_rss_mb"] for x in runs["small"]],
        "big_peak_rss_mb": [x["peak_rss_mb"] for x in runs["big"]],
        "big_peak_rss_shared_once_mb": [x["peak_rss_shared_once_mb"] for x in runs["big"]],
        "loadavg_1m_after": {k: [x["loadavg_1m"] for x in v] for k, v in runs.items()},
        "hot_thread": {k: [x["hot_thread"] for x in v] for k, v in runs.items()},
    }
    cpu_tps = {k: [(x["hot_thread"] or {}).get("tps_per_cpu_s") for x in v] for k, v in runs.items()}
    if all(t is not None for v in cpu_tps.values() for t in v):
        cmed = {k: statistics.median(v) for k, v in cpu_tps.items()}  # type: ignore[type-var]
        result["cpu_throughput_ratio_big_over_small"] = cmed["big"] / cmed["small"]
    result["peak_rss_mb_max"] = {k: max(x["peak_rss_mb"] for x in v) for k, v in runs.items()}
    result["host"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                "big_peak_rss_mb": result["peak_rss_mb_max"]["big"],
                "throughput_ratio_big_over_small": result["throughput_ratio_big_over_small"],
                "pair_ratios": result["repeats"]["pair_ratios"],
                "cpu_throughput_ratio_big_over_small": result.get("cpu_throughput_ratio_big_over_small"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
