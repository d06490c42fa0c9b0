"""Benchmark: aggregate scored ticks/s of 1 and 2 shards on this host, and each shard's latency.

One run, alternating the configurations ``--repeats`` times (medians reported):

* ``one_shard``: one ``tickscore serve`` (the cluster config with ``shards = 1``), hot loop on core 1;
* ``two_shards_core1``: ``serve --shards 2``, both hot loops on core 1 (``idle = "backoff"``:
  on a 2-vCPU host the second core is the OS's, the publisher's and the subscriber's);
* ``two_shards_cores01``: ``serve --shards 2`` with shard 0 on core 0 and shard 1 on core 1
  (busy-spin), sharing core 0 with the publisher and the subscriber.

Each run: a 6-instrument file (3 instruments per shard by the hash) published once for all
shards over ZeroMQ ipc, back to back (``publish --cluster --rate max``, pinned to core 0);
an independent subscriber on core 0 connected to every shard counts the scores per shard and
checks seq per shard.  Each repeat also measures one shard's capacity: the same file
replayed in-process through the native loop on core 1 (``replay --publish none``), what
one core scores when nothing else bounds it.  Reported: the publisher's send rate (the
feed's fan-out: one Python publisher is the bound it measures), the aggregate scored
rate at the subscriber (scores / (last - first receive)), and each shard's
tick-to-decision percentiles (its ``summary.json``).

    python benchmarks/bench_cluster.py --json benchmarks/results/cluster.json
    python benchmarks/bench_cluster.py --configs one_shard --events 200000 --batch 256 \
        --json benchmarks/results/cluster_one_shard_batch256.json   # the live batch's effect
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

SIX = ["ESZ6", "NQZ6", "CLF7", "GCG7", "ZNH7", "RTYZ6"]

_SUB = r"""
import json, os, sys, time, msgspec, zmq
os.sched_setaffinity(0, {0})
out, eps = sys.argv[1], sys.argv[2:]
ctx = zmq.Context(); s = ctx.socket(zmq.SUB); s.setsockopt(zmq.RCVHWM, 0); s.setsockopt(zmq.SUBSCRIBE, b"")
for e in eps:
    s.connect(e)
print("ready", flush=True)
dec = msgspec.msgpack.Decoder()
per, nxt, gaps, first, last = {}, {}, 0, None, None
while True:
    if not s.poll(3000 if first else 180000):
        break
    topic, p = s.recv_multipart()
    last = time.perf_counter_ns()
    first = first or last
    m = dec.decode(p)
    sh, seq = m[9], m[2]
    per[sh] = per.get(sh, 0) + 1
    if seq != nxt.get(sh, seq):
        gaps += 1
    nxt[sh] = seq + 1
json.dump({"count": sum(per.values()), "per_shard": per, "seq_gaps": gaps,
           "span_ns": (last - first) if first else 0}, open(out, "w"))
"""


def _config(tmp: Path, name: str, shards: int, cores: list[int], idle: str, batch: int | None) -> Path:
    d = tmp / name
    d.mkdir(exist_ok=True)
    cfg = d / "cluster.toml"
    place = "{shard}" if shards > 1 else "0"
    cfg.write_text(f"""
instruments = {json.dumps(SIX)}
[cluster]
shards = {shards}
cores = {json.dumps(cores)}
[engine]
pin = {cores[0]}
idle = "{idle}"
keep_warm_us = 0
warmup_ticks = 1000
{f"batch = {batch}" if batch else ""}
[sources.zmq]
endpoint = "ipc://{d}/ticks.ipc"
bind = false
rcvhwm = 0
[sinks.zmq]
endpoint = "ipc://{d}/scores-{place}.ipc"
sndhwm = 0
[control]
endpoint = "ipc://{d}/ctl-{place}.ipc"
[output]
dir = "{d}/out-{place}"
""")
    return cfg


def _status(ep: str) -> dict | None:
    from engine.control import request

    try:
        return request(ep, "status", timeout_s=1.0)
    except Exception:  # noqa: BLE001 - not up yet
        return None


def _one(name: str, shards: int, cores: list[int], idle: str, data: str, n: int, tmp: Path, k: int,
         batch: int | None) -> dict:
    cfg = _config(tmp, f"{name}-{k}", shards, cores, idle, batch)
    d = cfg.parent
    place = [str(s) for s in range(shards)] if shards > 1 else ["0"]
    args = ["serve", "--config", str(cfg)] + (["--shards", str(shards)] if shards > 1 else [])
    log = open(d / "serve.log", "w")  # noqa: SIM115 - closed below
    svc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=log)  # fmt: skip
    sub = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            sts = [_status(f"ipc://{d}/ctl-{p}.ipc") for p in place]
            if all(st is not None and st["state"] == "running" for st in sts):
                break
            if svc.poll() is not None:
                raise RuntimeError((d / "serve.log").read_text()[-3000:])
            time.sleep(0.3)
        sub = subprocess.Popen([sys.executable, "-c", _SUB, str(d / "sub.json"),
                                *[f"ipc://{d}/scores-{p}.ipc" for p in place]],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert sub.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        pub = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "engine.cli", "publish",
                              "--cluster", str(cfg), "--data", data, "--rate", "max", "--limit", str(n),
                              "--no-progress"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
        if pub.returncode != 0:
            raise RuntimeError(pub.stderr[-3000:])
        sub.wait(timeout=600)
        got = json.loads((d / "sub.json").read_text())
    finally:
        svc.send_signal(signal.SIGTERM)
        svc.wait(timeout=120)
        log.close()
        if sub is not None and sub.poll() is None:
            sub.kill()
    sent_line = [ln for ln in pub.stderr.splitlines() if "sent " in ln][-1]
    pub_rate = float(sent_line.rsplit(", ", 1)[-1].split()[0].replace(",", ""))
    per = {}
    for p in place:
        s = json.loads((d / f"out-{p}" / "summary.json").read_text())
        lat = s["latency_ns"]
        per[p] = {"scores": s["scores"], "p50_ns": lat["p50"], "p99_ns": lat["p99"], "p999_ns": lat["p999"],
                  "loop": s.get("loop"), "pin": s.get("pin")}  # fmt: skip
    return {"publisher_ticks_per_s": pub_rate, "sent": n, "subscriber": got,
            "aggregate_scores_per_s": got["count"] / (got["span_ns"] / 1e9) if got["span_ns"] else 0.0,
            "shards": per}  # fmt: skip


CONFIGS = {
    "one_shard": (1, [1], "busy-spin"),
    "two_shards_core1": (2, [1, 1], "backoff"),
    "two_shards_cores01": (2, [0, 1], "busy-spin"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=600_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batch", type=int, default=None,
                    help="the shards' [engine] batch (default: the service's default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    capacity: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tsbc-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        data = str(tmp / "six.parquet")
        subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--out", data, "--events",
                        str(args.events), "--symbols", ",".join(SIX)], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        for k in range(args.repeats):
            # what one shard's hot loop can score, fed from memory: the per-core capacity
            out = tmp / f"capacity-{k}"
            subprocess.run([sys.executable, "-m", "engine.cli", "replay", "--data", data, "--publish", "none",
                            "--loop", "native", "--pin", "1", "--no-progress", "--out", str(out)], cwd=ROOT,
                           check=True, capture_output=True)  # fmt: skip
            cap = json.loads((out / "summary.json").read_text())
            capacity.append({"ticks_per_s": cap["throughput_tps"], "p50_ns": cap["latency_ns"]["p50"],
                             "p99_ns": cap["latency_ns"]["p99"]})  # fmt: skip
            print(f"capacity (in-process, one core) run {k}: {cap['throughput_tps'] / 1e3:.0f}k/s",
                  file=sys.stderr)
            for n in names:
                shards, cores, idle = CONFIGS[n]
                r = _one(n, shards, cores, idle, data, args.events, tmp, k, args.batch)
                runs[n].append(r)
                print(f"{n:20s} run {k}: publisher {r['publisher_ticks_per_s'] / 1e3:.0f}k/s, scored "
                      f"{r['aggregate_scores_per_s'] / 1e3:.0f}k/s, {r['subscriber']}, "
                      + ", ".join(f"shard {p}: p50 {v['p50_ns']} p99 {v['p99_ns']} ns"
                                  for p, v in r["shards"].items()), file=sys.stderr)  # fmt: skip

    def med(vals) -> float:
        return float(np.median(vals))

    summary = {}
    for n in names:
        rs = runs[n]
        summary[n] = {
            "publisher_ticks_per_s": med([r["publisher_ticks_per_s"] for r in rs]),
            "aggregate_scores_per_s": med([r["aggregate_scores_per_s"] for r in rs]),
            "shards": {p: {q: med([r["shards"][p][q] for r in rs]) for q in ("p50_ns", "p99_ns", "p999_ns")}
                       for p in rs[0]["shards"]},
        }  # fmt: skip
    summary["one_shard_capacity_inprocess"] = {
        q: med([c[q] for c in capacity]) for q in ("ticks_per_s", "p50_ns", "p99_ns")}
    checks = {
        "every_tick_scored_once": all(r["subscriber"]["count"] == r["sent"] for n in names for r in runs[n]),
        "no_seq_gap": all(r["subscriber"]["seq_gaps"] == 0 for n in names for r in runs[n]),
    }
    report = {
        "benchmark": "cluster",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
        "events": args.events,
        "repeats": args.repeats,
        "batch": args.batch or "service default",
        "median_of_runs": summary,
        "checks": checks,
        "runs": runs,
        "capacity_runs": capacity,
    }
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
