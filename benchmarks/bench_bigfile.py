"""Benchmark: replay a file larger than memory budgets in bounded chunks; peak RSS and throughput.

Generates (once, cached in ``--data-dir``) a seeded L1 file of ``--events``
events (default 50 million) chunk by chunk, plus a small file (``--small-events``,
default 1 million) from the same generator, then runs, each in a fresh process
under ``/usr/bin/time -v``:

* ``tickscore replay --data BIG --speed max --publish none --pin 1`` (chunked
  automatically: more than 5M rows), and the same on the small file
  (in memory), reporting peak RSS, throughput (scores/s) and latency;
* optionally (``--features``) ``tickscore features`` on the big file.

    python benchmarks/bench_bigfile.py --json benchmarks/results/bigfile.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
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


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; return wall s, peak RSS (MB), stdout, return code."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    return {
        "cmd": " ".join(cmd),
        "rc": r.returncode,
        "wall_s": wall,
        "peak_rss_mb": int(m.group(1)) / 1024 if m else None,
        "stdout": r.stdout,
        "stderr_tail": r.stderr[-2000:],
    }


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
    res = timed(cmd)
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
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=50_000_000)
    ap.add_argument("--small-events", type=int, default=1_000_000)
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "tickscore-bench")
    ap.add_argument("--pin", default="1")
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
    with tempfile.TemporaryDirectory(prefix="bench-big-") as tmp:
        result["small"] = replay(small, Path(tmp) / "small", args.pin)
        print(json.dumps({"small": result["small"]["summary"], "rss_mb": result["small"]["peak_rss_mb"]}))
        result["big"] = replay(big, Path(tmp) / "big", args.pin)
        print(json.dumps({"big": result["big"]["summary"], "rss_mb": result["big"]["peak_rss_mb"]}))
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
            result["features_big"] = f
            print(json.dumps({"features_rss_mb": f["peak_rss_mb"], "wall_s": f["wall_s"]}))
    b, s = result["big"]["summary"], result["small"]["summary"]
    result["throughput_ratio_big_over_small"] = b["throughput_tps"] / s["throughput_tps"]
    result["host"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                "big_peak_rss_mb": result["big"]["peak_rss_mb"],
                "throughput_ratio_big_over_small": result["throughput_ratio_big_over_small"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
