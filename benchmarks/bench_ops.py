"""What security and metrics cost the live service: CURVE on/off x metrics on/off (issue 15).

For each variant a ``tickscore serve`` is started (hot loop pinned to core 1), a
publisher process sends paced quotes over ZeroMQ (tcp on loopback) and a
subscriber process receives every score; both are CURVE clients when the
service runs CURVE.  With metrics on, ``/metrics`` is scraped every second
during the run (15x more often than a usual Prometheus interval).

Measured per variant:

* ``service``: tick-to-decision inside the service (its summary.json, warm-up
  excluded): what metrics could cost on the hot path;
* ``wire``: publisher send -> subscriber receive (the Tick's ``ts_event_ns`` is
  the publisher's CLOCK_MONOTONIC at send, the same clock as the subscriber's):
  what CURVE (encryption in ZeroMQ's I/O threads) adds on the wire.

Ratios are against the plain variant of the same run.  Variants run in the
order given, repeatedly (A B C D A B C D ...), and each statistic is the median of its
runs (``--reps``, default 3), so drift on this shared VM hits every variant alike.

    python benchmarks/bench_ops.py --json benchmarks/results/ops.json
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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

    ctx, sock = connect_publisher(spec["endpoint"], spec.get("curve"))
    n, rate = spec["n"], spec["rate"]
    t0 = time.perf_counter()
    for i in range(n):
        wait = t0 + i / rate - time.perf_counter()
        if wait > 0:  # sleep, never spin: core 0 is shared with the subscriber and ZeroMQ's I/O threads
            time.sleep(wait)
        sym = SYMBOLS[i % 3]
        bid = 100.0 + (i % 7) * 0.25
        ts = time.perf_counter_ns()  # CLOCK_MONOTONIC: the subscriber reads the same clock
        sock.send_multipart([sym.encode(), msgpack.packb([1, 1, sym, ts, ts, bid, 5.0, bid + 0.25, 7.0,
                                                          0.0, 0.0, 0, 0])])
    sock.close()
    ctx.term()


def role_sub(spec: dict) -> None:
    pin_core0()
    import msgpack

    ctx, sock = connect_subscriber(spec["endpoint"], spec.get("curve"))
    print("ready", flush=True)
    lat = np.zeros(spec["n"], dtype=np.int64)
    k = 0
    last = time.monotonic()
    while k < spec["n"] and time.monotonic() - last < 10:
        if sock.poll(100):
            frames = sock.recv_multipart()
            now = time.perf_counter_ns()
            lat[k] = now - msgpack.unpackb(frames[1])[3]
            k += 1
            last = time.monotonic()
    np.save(spec["out"], lat[:k])
    sock.close(0)
    ctx.term()


def _pct(a: np.ndarray) -> dict:
    return {"count": int(a.size), "p50_us": float(np.percentile(a, 50)) / 1e3,
            "p99_us": float(np.percentile(a, 99)) / 1e3}


def run_variant(name: str, curve: bool, metrics: bool, n: int, rate: float, tmp: Path, keys) -> dict:
    ticks, scores, control = free_port(), free_port(), free_port()
    mport = free_port()
    out = tmp / f"{name}-out"
    warm = min(2000, n // 5)  # latencies left out as warm-up, in the service and at the subscriber
    toml = (f'instruments = {json.dumps(SYMBOLS)}\n[engine]\npin = 1\nwarmup_ticks = {warm}\n'
            f'[sources.zmq]\nendpoint = "tcp://127.0.0.1:{ticks}"\n'
            f'[sinks.zmq]\nendpoint = "tcp://127.0.0.1:{scores}"\n'
            f'[control]\nendpoint = "tcp://127.0.0.1:{control}"\n[output]\ndir = "{out}"\n')
    if metrics:
        toml += f'[metrics]\nendpoint = "127.0.0.1:{mport}"\n'
    if curve:
        toml += (f'[security]\ncurve = true\nsecret_key = "{keys["server"]}"\n'
                 f'authorized_keys = "{keys["authorized"]}"\n')
    cfg = tmp / f"{name}.toml"
    cfg.write_text(toml)
    svc = start_service(cfg, tmp / f"{name}.log")
    ck = keys["client"] if curve else None
    try:
        me = [sys.executable, __file__, "--role"]
        sub_spec = {"endpoint": f"tcp://127.0.0.1:{scores}", "n": n, "out": str(tmp / f"{name}.npy"),
                    "curve": ck}
        sub = subprocess.Popen([*me, "sub", json.dumps(sub_spec)], stdout=subprocess.PIPE, text=True)
        assert sub.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        pub = subprocess.Popen([*me, "pub", json.dumps({"endpoint": f"tcp://127.0.0.1:{ticks}", "n": n,
                                                        "rate": rate, "curve": ck})])
        scrapes = 0
        while pub.poll() is None:
            time.sleep(1.0)
            if metrics:
                urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
                scrapes += 1
        sub.wait(timeout=60)
        svc.send_signal(signal.SIGTERM)
        svc.wait(timeout=60)
    finally:
        if svc.poll() is None:
            svc.kill()
    summary = json.loads((out / "summary.json").read_text())
    wire = np.load(tmp / f"{name}.npy")[warm:]  # the same warm-up as the service
    lat = summary["latency_ns"]
    return {"service": {"count": summary["scores"], "p50_us": lat["p50"] / 1e3, "p99_us": lat["p99"] / 1e3},
            "wire": _pct(wire), "scrapes": scrapes, "scores": summary["scores"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=["pub", "sub"], help=argparse.SUPPRESS)
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--ticks", type=int, default=30_000)
    ap.add_argument("--rate", type=float, default=5_000.0, help="ticks/s (default 5,000)")
    ap.add_argument("--reps", type=int, default=3, help="runs of each variant, interleaved (default 3)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.role == "pub":
        role_pub(json.loads(args.spec))
        return 0
    if args.role == "sub":
        role_sub(json.loads(args.spec))
        return 0
    from engine.security import keygen

    tmp = Path(tempfile.mkdtemp(prefix="tickscore-bench-ops-"))
    keygen(tmp / "keys" / "server")
    cpub, csec = keygen(tmp / "keys" / "client")
    (tmp / "keys" / "authorized").mkdir()
    (tmp / "keys" / "authorized" / "client.key").write_bytes(cpub.read_bytes())
    from engine.security import client_keys

    ck = client_keys(str(csec), str(tmp / "keys" / "server.key"))
    keys = {"server": str(tmp / "keys" / "server.key_secret"), "authorized": str(tmp / "keys" / "authorized"),
            "client": ck.as_text()}
    variants = [("plain", False, False), ("metrics", False, True), ("curve", True, False),
                ("curve+metrics", True, True)]
    runs: dict[str, list[dict]] = {v[0]: [] for v in variants}
    for rep in range(args.reps):
        for name, curve, metrics in variants:
            r = run_variant(f"{name}-{rep}", curve, metrics, args.ticks, args.rate, tmp, keys)
            runs[name].append(r)
            sv = r["service"]
            print(f"{name:<14} run {rep}: service p50 {sv['p50_us']:.2f} p99 {sv['p99_us']:.2f}"
                  f" | wire p50 {r['wire']['p50_us']:.1f} p99 {r['wire']['p99_us']:.1f} us", file=sys.stderr)
    res: dict = {}
    for name in runs:
        agg = {}
        for part in ("service", "wire"):
            agg[part] = {k: float(np.median([r[part][k] for r in runs[name]])) for k in ("p50_us", "p99_us")}
        agg["runs"] = runs[name]
        res[name] = agg
    base = res["plain"]
    ratios = {name: {f"{part}_{k}": res[name][part][k] / base[part][k] for part in ("service", "wire")
                     for k in ("p50_us", "p99_us")} for name in res if name != "plain"}
    doc = {"benchmark": "bench_ops", "ticks": args.ticks, "rate_tps": args.rate,
           "transport": "zmq tcp loopback",
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "variants": res, "ratios_vs_plain": ratios,
           "note": f"median of {args.reps} interleaved runs per variant; metrics scraped every second; "
                   "clients on core 0, the hot loop on core 1"}
    for name, r in ratios.items():
        print(f"{name:<14} / plain: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
