"""Aeron ingress of the live service: polled in compiled code or from Python (issue: native duty cycle).

For each variant a ``tickscore serve`` is started (fused backend, native loop, hot loop
pinned to core 1, embedded media driver, ticks in and scores out over ``aeron:ipc``) with
``[engine] native_aeron_ingress`` true (``native``: the subscription is polled and every
message decoded in one compiled call per duty cycle, engine.native_ingress, which touches
the tick log's pages ahead of the reader while idle) or false (``python``: pyaeron's poll,
msgspec decode, one tick per duty cycle); ``native_untouched`` is ``native`` with
``[aeron] pre_touch = false`` (no touch-ahead of the tick log, nor pre-touch of the score
log); ``native_both`` / ``python_both`` add a ZeroMQ tick source beside (idle: the ticks come
over Aeron), so both are received in one compiled call (NativeMultiSource) or both polled
from Python.  Then ``tickscore replay --via aeron --service-config`` sends ``--limit`` ticks at
``--rate`` (or ``max``: back to back) from a publisher process and a subscriber process
receives every Score (both on core 0).  Variants alternate ``--repeats`` times; medians of
the per-run figures are reported.

* ``wire``: the publisher's intended send time -> the subscriber's receive (CLOCK_MONOTONIC);
* ``service``: ``ts_out - ts_in`` of the Scores.  Not the same span in both: the native
  ingress reads ``ts_in`` when the message is read (before the decode and the Python
  return to the duty cycle), the python path after the decode;
* ``throughput_tps``: Scores per second of the replay's wall time (with ``--rate max``:
  how fast the service drains a burst);
* ``touch_ahead``: the service's ``status`` after the run (state and pages touched).

    python benchmarks/bench_aeron_ingress.py --repeats 5 --json benchmarks/results/aeron_ingress.json
    python benchmarks/bench_aeron_ingress.py --repeats 5 --rate max --limit 200000 \
        --json benchmarks/results/aeron_ingress_burst.json
    python benchmarks/bench_aeron_ingress.py --repeats 5 --rate max --limit 200000 \
        --variants native_both,python_both --json benchmarks/results/aeron_ingress_both_burst.json
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from live_clients import free_port, start_service  # noqa: E402

from engine.control import request  # noqa: E402

SYMBOLS = ["CLF7", "ESZ6", "NQZ6"]


#: variant -> ([engine] native_aeron_ingress, [aeron] pre_touch, a ZeroMQ tick source beside)
VARIANTS = {"native": (True, True, False), "python": (False, True, False),
            "native_untouched": (True, False, False),
            "native_both": (True, True, True), "python_both": (False, True, True)}  # fmt: skip
DEFAULT_VARIANTS = "native,python,native_untouched"


def run_variant(name: str, args, tmp: Path, k: int) -> dict:
    native, touch, zmq_too = VARIANTS[name]
    control = free_port()
    adir = f"/dev/shm/tickscore-bench-ingress-{os.getpid()}-{k}-{name}"
    cfg = tmp / f"{name}-{k}.toml"
    cfg.write_text(
        f"instruments = {json.dumps(SYMBOLS)}\n[engine]\npin = 1\nwarmup_ticks = {args.warmup}\n"
        f"native_aeron_ingress = {'true' if native else 'false'}\n"
        f'[model]\nbackend = "fused"\n'
        f'[sources.aeron]\nchannel = "aeron:ipc"\n[sinks.aeron]\nchannel = "aeron:ipc"\n'
        + (f'[sources.zmq]\nendpoint = "ipc://{tmp}/{name}-{k}-ticks.ipc"\n' if zmq_too else "")
        + f'[aeron]\ndir = "{adir}"\npre_touch = {"true" if touch else "false"}\n'
        f'[control]\nendpoint = "tcp://127.0.0.1:{control}"\n'
        f'[output]\ndir = "{tmp / (name + "-out-" + str(k))}"\n'
    )
    svc = start_service(cfg, tmp / f"{name}-{k}.log")
    try:
        cmd = [sys.executable, "-m", "engine.cli", "replay", "--via", "aeron", "--service-config", str(cfg),
               "--rate", str(args.rate), "--limit", str(args.limit), "--no-progress", "--json"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"replay --via aeron failed: {out.stderr[-2000:]}")
        s = json.loads(out.stdout)
        st = request(f"tcp://127.0.0.1:{control}", "status", 10.0)
    finally:
        svc.send_signal(signal.SIGTERM)
        try:
            svc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            svc.kill()
    log = (tmp / f"{name}-{k}.log").read_text()
    compiled = "(compiled receive)" in log.split("ready:", 1)[-1].split("\n", 1)[0]
    expect = ["NativeZmqTickSource"] * zmq_too + ["NativeAeronTickSource"] if native else None
    if compiled != native or (expect is not None and st["ingress"] != expect):
        raise RuntimeError(f"the service's ingress is not the {name} one: {st['ingress']} {log[-2000:]}")
    return {"variant": name, "scores": s["scores"], "dropped": s["dropped"], "compiled_receive": compiled,
            "wire_p50_ns": s["latency_ns"]["p50"], "wire_p99_ns": s["latency_ns"]["p99"],
            "wire_max_ns": s["latency_ns"]["max"],
            "service_p50_ns": s["service_time_ns"]["p50"], "service_p99_ns": s["service_time_ns"]["p99"],
            "throughput_tps": s["throughput_tps"], "touch_ahead": (st.get("aeron") or {}).get("touch_ahead")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=30_000)
    ap.add_argument("--rate", default="2000", help="ticks per second, or max (a burst: how fast it drains)")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {n: [] for n in args.variants.split(",")}
    with tempfile.TemporaryDirectory(prefix="tickscore-bench-ingress-") as tmp:
        for k in range(args.repeats):
            for name in runs:
                r = run_variant(name, args, Path(tmp), k)
                runs[name].append(r)
                w, v = (r["wire_p50_ns"], r["wire_p99_ns"]), (r["service_p50_ns"], r["service_p99_ns"])
                print(f"{name:7s} run {k}: wire p50 {w[0] / 1e3:.1f} p99 {w[1] / 1e3:.1f} µs, service p50 "
                      f"{v[0] / 1e3:.2f} p99 {v[1] / 1e3:.2f} µs, {r['scores']:,} scores at "
                      f"{r['throughput_tps']:,.0f}/s", file=sys.stderr)
    keys = ("wire_p50_ns", "wire_p99_ns", "service_p50_ns", "service_p99_ns", "throughput_tps")
    med = {n: {q: float(np.median([r[q] for r in rs])) for q in keys} for n, rs in runs.items()}
    report = {"benchmark": "aeron_ingress",
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "machine": platform.machine()},
              "when": time.strftime("%Y-%m-%d"), "limit": args.limit, "rate": args.rate,
              "repeats": args.repeats, "median_of_runs": med,
              "checks": {"every_score": all(r["scores"] == args.limit and r["dropped"] == 0
                                            for rs in runs.values() for r in rs)},
              "runs": runs}  # fmt: skip
    print(json.dumps({"median_of_runs": med, "checks": report["checks"]}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
