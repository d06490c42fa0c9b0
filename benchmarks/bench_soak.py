"""Soak: a live service under paced load for a while; is its memory flat? (issue 15)

Starts ``tickscore serve`` (hot loop pinned to core 1, metrics on), a publisher
process sending quotes over ZeroMQ (tcp loopback) in 1 ms bursts at ``--rate``
ticks/s for ``--duration`` seconds, and a subscriber process reading every
score; scrapes ``/metrics`` every ``--every`` seconds (as Prometheus would) and
samples the service's RSS (VmRSS), open fds and threads from /proc, and its
scores/s from the scores counter.  Writes the samples and a verdict: RSS growth
from the end of warm-up (the first ``--warmup`` seconds) to the end.

    python benchmarks/bench_soak.py --duration 120 --json benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from live_clients import (  # noqa: E402
    connect_publisher,
    connect_subscriber,
    free_port,
    pin_core0,
    start_service,
)

SYMBOLS = ["CLF7", "ESZ6", "NQZ6"]


def role_pub(spec: dict) -> None:
    pin_core0()
    import msgpack

    ctx, sock = connect_publisher(spec["endpoint"])
    per_ms = max(1, round(spec["rate"] / 1000))
    end = time.monotonic() + spec["duration"]
    i = 0
    t0 = time.monotonic()
    k = 0
    while time.monotonic() < end:
        for _ in range(per_ms):
            sym = SYMBOLS[i % 3]
            bid = 100.0 + (i % 7) * 0.25
            ts = time.time_ns()
            sock.send_multipart([sym.encode(), msgpack.packb([1, 1, sym, ts, ts, bid, 5.0, bid + 0.25, 7.0,
                                                              0.0, 0.0, 0, 0])])
            i += 1
        k += 1
        wait = t0 + k / 1000 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    print(i, flush=True)
    sock.close(linger=5000)
    ctx.term()


def role_sub(spec: dict) -> None:
    pin_core0()

    ctx, sock = connect_subscriber(spec["endpoint"])
    print("ready", flush=True)
    n = 0
    last = time.monotonic()
    while time.monotonic() - last < 5:
        if sock.poll(200):
            sock.recv_multipart()
            n += 1
            last = time.monotonic()
    print(n, flush=True)


def _proc(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:"))
    threads = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("Threads:"))
    return {"rss_mb": rss / 1024, "threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _scores(url: str) -> float:
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith("tickscore_scores_total "):
            return float(line.split()[1])
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=["pub", "sub"], help=argparse.SUPPRESS)
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    ap.add_argument("--rate", type=float, default=20_000.0, help="ticks/s (default 20,000)")
    ap.add_argument("--every", type=float, default=5.0, help="sample period, s (default 5)")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds before the RSS baseline (default 20)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.role:
        (role_pub if args.role == "pub" else role_sub)(json.loads(args.spec))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="tickscore-soak-"))
    ticks, scores, control, mport = free_port(), free_port(), free_port(), free_port()
    cfg = tmp / "svc.toml"
    cfg.write_text(f'instruments = {json.dumps(SYMBOLS)}\n[engine]\npin = 1\n'
                   f'[sources.zmq]\nendpoint = "tcp://127.0.0.1:{ticks}"\n'
                   f'[sinks.zmq]\nendpoint = "tcp://127.0.0.1:{scores}"\n'
                   f'[control]\nendpoint = "tcp://127.0.0.1:{control}"\n'
                   f'[metrics]\nendpoint = "127.0.0.1:{mport}"\n[output]\ndir = "{tmp}/out"\n')
    svc = start_service(cfg, tmp / "svc.log")
    url = f"http://127.0.0.1:{mport}/metrics"
    samples = []
    try:
        me = [sys.executable, __file__, "--role"]
        sub = subprocess.Popen([*me, "sub", json.dumps({"endpoint": f"tcp://127.0.0.1:{scores}"})],
                               stdout=subprocess.PIPE, text=True)
        assert sub.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        pub = subprocess.Popen([*me, "pub", json.dumps({"endpoint": f"tcp://127.0.0.1:{ticks}",
                                                        "rate": args.rate, "duration": args.duration})],
                               stdout=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        prev_t, prev_n = t0, _scores(url)
        while pub.poll() is None:
            time.sleep(args.every)
            now, n = time.monotonic(), _scores(url)
            s = {"t_s": round(now - t0, 1), "scores": int(n), "scores_per_s": (n - prev_n) / (now - prev_t),
                 **_proc(svc.pid)}
            samples.append(s)
            prev_t, prev_n = now, n
            print(f"t={s['t_s']:6.1f}s  rss {s['rss_mb']:7.1f} MB  fds {s['fds']}  threads {s['threads']}  "
                  f"{s['scores_per_s']:,.0f} scores/s", file=sys.stderr)
        sent = int(pub.stdout.read().strip() or 0)
        received = int(sub.communicate(timeout=60)[0].strip().splitlines()[-1])
        svc.send_signal(signal.SIGTERM)
        svc.wait(timeout=60)
    finally:
        if svc.poll() is None:
            svc.kill()
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    base = [s for s in samples if s["t_s"] >= args.warmup]
    growth = base[-1]["rss_mb"] - base[0]["rss_mb"] if len(base) >= 2 else None
    doc = {"benchmark": "bench_soak", "duration_s": args.duration, "rate_tps": args.rate,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "sent": sent, "scored": summary["scores"], "rejected": summary["rejected"],
           "subscriber_received": received,
           "latency_ns": summary["latency_ns"],
           "rss_mb_after_warmup": base[0]["rss_mb"] if base else None,
           "rss_mb_end": samples[-1]["rss_mb"] if samples else None,
           "rss_growth_after_warmup_mb": growth,
           "fds": sorted({s["fds"] for s in samples}), "threads": sorted({s["threads"] for s in samples}),
           "samples": samples}
    print(f"sent {sent:,}  scored {summary['scores']:,}  received {received:,}  RSS growth after warm-up "
          f"{growth:+.1f} MB", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
