"""Scale-out: the partition function, shard configs, skipping other shards' ticks, and a live cluster.

The live test is the issue's check: ``serve --shards 2`` with a 6-instrument file
published once, an independent subscriber (plain ``msgpack`` and its own FNV-1a)
checking per-shard sequences and that each instrument is scored by exactly one
shard; ``kill -9`` of a shard, its restart seen in ``control status --cluster``
and at the subscriber (a new epoch), and only that shard's instruments lost
while it was down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from engine.config import ConfigError, parse_config
from engine.native_ingress import NativeZmqTickSource, fnv1a
from engine.partition import Partition, fnv1a64
from engine.sources import TickSlot, ZmqTickSource
from engine.subscribe import Score, ShardTracker
from engine.wire import Tick, encode_tick
from tests.conftest import ROOT, _free_port

SIX = ["ESZ6", "NQZ6", "CLF7", "GCG7", "ZNH7", "RTYZ6"]


def _fnv(data: bytes) -> int:
    """FNV-1a 64 as the README states it (independent of engine.partition)."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) % (1 << 64)
    return h


# ------------------------------------------------------------------------------------ partition
def test_fnv1a64_matches_the_published_vectors_and_the_compiled_lookup_hash():
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8
    for s in SIX + ["", "x" * 64, "ÄÖü-€"]:
        raw = s.encode()
        assert fnv1a64(raw) == _fnv(raw)
        assert fnv1a(np.frombuffer(raw or b"\0", np.uint8), 0, len(raw)) == np.int64(np.uint64(_fnv(raw)))


def test_partition_by_hash_and_by_lists():
    p = Partition(3)
    assert [p.shard_of(s) for s in SIX] == [_fnv(s.encode()) % 3 for s in SIX]
    assert sorted(sum((p.owned(SIX, k) for k in range(3)), [])) == sorted(SIX)
    q = Partition(2, [["ESZ6"], ["NQZ6", "CLF7"]])
    assert (q.shard_of("ESZ6"), q.shard_of("NQZ6"), q.shard_of("CLF7")) == (0, 1, 1)
    assert q.shard_of("GCG7") == _fnv(b"GCG7") % 2  # listed nowhere: hashed
    with pytest.raises(ValueError, match="listed for shards 0 and 1"):
        Partition(2, [["ESZ6"], ["ESZ6"]])
    with pytest.raises(ValueError, match="lists 1 shards"):
        Partition(2, [["ESZ6"]])


# ------------------------------------------------------------------------------------ configs
_CLUSTER = {
    "instruments": SIX,
    "cluster": {"shards": 2, "cores": [1, 3]},
    "sources": {"zmq": {"endpoint": "ipc:///tmp/t-ticks.ipc", "bind": False}},
    "sinks": {"zmq": {"endpoint": "tcp://127.0.0.1:{7100+shard}"}},
    "control": {"endpoint": "ipc:///tmp/t-ctl-{shard}.ipc"},
    "metrics": {"endpoint": "127.0.0.1:{9500+shard}"},
    "output": {"dir": "/tmp/t-out/{shard}"},
}


def test_a_shard_config_fills_in_its_placeholders_core_and_instruments():
    cfg = parse_config(_CLUSTER)
    s1 = cfg.for_shard(1)
    assert s1.effective_sinks.zmq.endpoint == "tcp://127.0.0.1:7101"
    assert s1.control.endpoint == "ipc:///tmp/t-ctl-1.ipc"
    assert s1.metrics.endpoint == "127.0.0.1:9501" and s1.output.dir == "/tmp/t-out/1"
    assert s1.effective_sources.zmq.endpoint == "ipc:///tmp/t-ticks.ipc"  # shared: published once
    assert s1.engine.pin == 3 and s1.cluster.shard == 1
    assert s1.aeron_dir.endswith("-shard1")  # one embedded driver per shard
    owned = [s for s in SIX if _fnv(s.encode()) % 2 == 1]
    assert s1.owned_instruments == owned and s1.tick_topics == owned
    assert s1.instrument_slots == len(owned)
    with pytest.raises(ConfigError, match="shards = 2 numbers them 0 .. 1"):
        cfg.for_shard(2)


@pytest.mark.parametrize("key,table", [
    ("sinks.zmq.endpoint", {"sinks": {"zmq": {"endpoint": "ipc:///tmp/t-scores.ipc"}}}),
    ("control.endpoint", {"control": {"endpoint": "tcp://127.0.0.1:7200"}}),
    ("sources.zmq.endpoint", {"sources": {"zmq": {"endpoint": "ipc:///tmp/t-ticks.ipc", "bind": True}}}),
])  # fmt: skip
def test_an_endpoint_every_shard_would_bind_without_a_placeholder_is_a_clear_error(key, table):
    cfg = parse_config({**_CLUSTER, **table})
    with pytest.raises(ConfigError, match=f"{key} = .*put {{shard}} in it"):
        cfg.for_shard(0)


def test_bad_cluster_tables_are_refused_by_name():
    with pytest.raises(ConfigError, match="shard = 2: shards are numbered 0 .. 1"):
        parse_config({"cluster": {"shards": 2, "shard": 2}})
    with pytest.raises(ConfigError, match="partitions lists 3 shards"):
        parse_config({"cluster": {"shards": 2, "partitions": [["A"], ["B"], ["C"]]}})


# ------------------------------------------------------------------------------------ skipping
def _tick(sym: str, ts: int) -> bytes:
    return encode_tick(Tick(1, sym, ts, ts, 100.0, 1.0, 100.25, 2.0))


@pytest.mark.parametrize("native", [False, True])
def test_a_shard_skips_and_counts_other_shards_ticks_without_rejecting_them(native):
    """Subscribed to everything (max_instruments > 0): foreign ticks reach the shard and are skipped."""
    part = Partition(2)
    mine = [s for s in SIX if part.shard_of(s) == 0]
    slot = TickSlot(mine, capacity=8, owns=lambda s: part.shard_of(s) == 0)
    ctx = zmq.Context()
    ep = f"ipc:///tmp/tickscore-test-skip-{uuid.uuid4().hex[:8]}.ipc"
    pub = ctx.socket(zmq.PUB)
    pub.bind(ep)
    src = (NativeZmqTickSource if native else ZmqTickSource)(ctx, ep, bind=False, slot=slot)
    time.sleep(0.3)  # the subscription reaches the PUB
    sent = Counter()
    for k in range(200):
        s = SIX[k % len(SIX)]
        pub.send_multipart([s.encode(), _tick(s, 1_700_000_000_000_000_000 + k)])
        sent[s] += 1
    got = Counter()
    deadline = time.monotonic() + 10
    while sum(got.values()) < sum(sent[s] for s in mine) and time.monotonic() < deadline:
        i = src.poll()
        if i >= 0:
            got[mine[src.inst_list[i]]] += 1
    time.sleep(0.1)
    while src.poll() >= 0:  # anything left would be a foreign tick scored: must not happen
        got["?"] += 1
    skipped = slot.skipped + (src.native_skipped if native else 0)
    assert got == Counter({s: sent[s] for s in mine})
    assert skipped == sum(sent[s] for s in SIX if s not in mine)
    assert int(slot.counters.sum()) == 0  # nothing rejected
    assert sorted(slot.foreign) == sorted(s for s in SIX if s not in mine)
    if native:  # after the first sight, the compiled lookup skips them itself
        assert src.native_skipped >= skipped - len(slot.foreign)
    src.close()
    pub.close(0)
    ctx.term()


def test_the_subscribers_tracker_tells_gaps_restarts_and_duplicates():
    t = ShardTracker()

    def sc(shard, epoch, seq):
        return Score("ESZ6", seq, 1, 1, 1, 0.5, "v", 0, shard, epoch)

    assert [t.see(sc(0, 10, q)) for q in range(3)] == [None] * 3
    assert t.see(sc(0, 10, 5)) == "shard 0: gap of 2 scores (seq 3 .. 4)"
    assert "restarted" in t.see(sc(0, 20, 0))
    assert t.see(sc(0, 20, 1)) is None
    assert "duplicate or reordered" in t.see(sc(0, 20, 1))
    assert t.see(sc(1, 30, 7)) is None  # joined a running shard: not a gap
    assert t.summary()[0] == {"scores": 7, "missing": 2, "restarts": 1, "epoch": 20}


# ------------------------------------------------------------------------------------ live cluster
def _cli(*args, timeout=120, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)  # fmt: skip
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _two_ports() -> int:
    for _ in range(50):
        p = _free_port()
        try:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


class _Subscriber(threading.Thread):
    """Plain msgpack over one SUB socket connected to every shard's score endpoint."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVHWM, 0)
        for e in endpoints:
            self.sock.connect(e)
        self.msgs: list[tuple[str, list]] = []
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            if self.sock.poll(100):
                topic, payload = self.sock.recv_multipart()
                self.msgs.append((topic.decode(), msgpack.unpackb(payload, raw=False)))
        self.sock.close(0)
        self.ctx.term()

    def wait_count(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.msgs) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.msgs) >= n, f"{len(self.msgs)} scores, expected {n}"


def _cluster_status(cfg: Path) -> dict:
    p = _cli("control", "status", "--cluster", cfg, check=False)
    return json.loads(p.stdout)


def test_two_shards_score_each_instrument_once_and_a_killed_shard_loses_only_its_own(tmp_path):
    data = tmp_path / "six.parquet"
    _cli("generate", "--out", data, "--events", 9000, "--symbols", ",".join(SIX))
    import polars as pl

    syms = pl.read_parquet(data)["symbol"].to_list()
    d = Path(f"/tmp/tsc-{uuid.uuid4().hex[:8]}")
    d.mkdir()
    port = _two_ports()
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(f"""
instruments = {json.dumps(SIX)}
[cluster]
shards = 2
restart_backoff_ms = 8000
[engine]
pin = "none"
idle = "backoff"
keep_warm_us = 0
[sources.zmq]
endpoint = "ipc://{d}/ticks.ipc"
bind = false
[sinks.zmq]
endpoint = "ipc://{d}/scores-{{shard}}.ipc"
[control]
endpoint = "tcp://127.0.0.1:{{{port}+shard}}"
""")
    log = open(tmp_path / "cluster.log", "w")  # noqa: SIM115 - closed below
    sup = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--shards", "2",
                            "--config", str(cfg)],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    sub = _Subscriber([f"ipc://{d}/scores-0.ipc", f"ipc://{d}/scores-1.ipc"])
    sub.start()
    try:
        deadline = time.monotonic() + 120
        st = {}
        while time.monotonic() < deadline:
            assert sup.poll() is None, (tmp_path / "cluster.log").read_text()
            st = _cluster_status(cfg)
            if st.get("shards_up") == 2 and all(s["state"] == "running" for s in st["shards"]):
                break
            time.sleep(0.5)
        assert st.get("shards_up") == 2, st
        owner = {s: _fnv(s.encode()) % 2 for s in SIX}
        assert {sh["shard"]: sh["instruments"] for sh in st["shards"]} == {
            k: sorted(s for s in SIX if owner[s] == k) for k in (0, 1)}
        time.sleep(0.5)  # the subscriber's connections

        # A: published once for both shards
        _cli("publish", "--cluster", cfg, "--data", data, "--rate", 20000, "--limit", 3000, "--no-progress")
        sub.wait_count(3000)

        # B: shard 1 killed; the publisher binds again and only shard 0 subscribes
        pid1 = st["shards"][1]["pid"]
        os.kill(pid1, signal.SIGKILL)
        time.sleep(0.5)
        _cli("publish", f"ipc://{d}/ticks.ipc", "--bind", "--control", f"tcp://127.0.0.1:{port}",
             "--data", data, "--rate", 20000, "--limit", 3000, "--no-progress")  # fmt: skip
        b0 = sum(1 for s in syms[:3000] if owner[s] == 0)
        sub.wait_count(3000 + b0)
        down = _cluster_status(cfg)
        assert down["shards"][0]["state"] == "running" and down["shards"][1]["state"] == "down", down

        # the restart (8 s back-off) is seen in control status --cluster
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            st2 = _cluster_status(cfg)
            if st2.get("shards_up") == 2:
                break
            time.sleep(0.5)
        assert st2["shards"][1]["restarts"] == 1 and st2["shards"][0]["restarts"] == 0, st2
        assert st2["shards"][1]["pid"] != pid1 and st2["shards"][1]["epoch"] != st["shards"][1]["epoch"]

        # C: once again, both shards
        _cli("publish", "--cluster", cfg, "--data", data, "--rate", 20000, "--limit", 3000, "--no-progress")
        sub.wait_count(6000 + b0)
        # D: a wire-mode replay against the running cluster (scores of both shards matched to its ticks)
        out = tmp_path / "wire"
        _cli("replay", "--via", "zmq", "--service-config", cfg, "--data", data, "--limit", 1000,
             "--rate", 5000, "--out", out, "--no-progress")  # fmt: skip
        wire = json.loads((out / "summary.json").read_text())
        assert (wire["ticks"], wire["scores"], wire["dropped"], wire["rejected"]) == (1000, 1000, 0, 0), wire
        sub.wait_count(7000 + b0)
        time.sleep(0.5)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=60) == 0, (tmp_path / "cluster.log").read_text()
    finally:
        sub.stop = True
        sub.join(timeout=5)
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        log.close()
        for p in d.glob("*"):
            p.unlink()
        d.rmdir()

    msgs = sub.msgs
    assert all(m[0] == 3 and len(m) == 11 and t == m[1] for t, m in msgs)  # Score v2, topic = symbol
    by_inst = defaultdict(set)
    for _, m in msgs:
        by_inst[m[1]].add(m[9])
    assert {s: sh for s, shs in by_inst.items() for sh in shs} == owner  # one shard each, the right one
    assert all(len(v) == 1 for v in by_inst.values())
    # per shard and epoch, seq contiguous from 0: no gap; shard 1 restarted once (a new epoch)
    seqs = defaultdict(list)
    for _, m in msgs:
        seqs[(m[9], m[10])].append(m[2])
    epochs = Counter(k[0] for k in seqs)
    assert epochs == Counter({0: 1, 1: 2})
    for v in seqs.values():
        assert v == list(range(len(v)))
    # every tick scored exactly once, except shard 1's instruments while it was down
    want = Counter(syms[:3000]) + Counter(s for s in syms[:3000] if owner[s] == 0) + Counter(syms[:3000]) \
        + Counter(syms[:1000])
    assert Counter(m[1] for _, m in msgs) == want


def test_a_restarted_l3_shard_flags_its_scores_until_its_books_are_rebuilt(tmp_path):
    """A restarted shard has empty books and joins the order flow mid-stream (README, Scale-out):
    deletes of orders it never saw are counted ``unknown_order``, and its first scores of each
    instrument carry ``warmup`` and, until both sides have orders, ``no_book``."""
    from replay.generator_l3 import generate_l3

    df = generate_l3(30_000, seed=3)
    mid = tmp_path / "mid.parquet"
    df.slice(15_000).write_parquet(mid)  # what a shard restarted in the middle of the session receives
    out = tmp_path / "out"
    _cli("replay", "--data", mid, "--out", out, "--record-scores", "--no-progress", "--pin", "none")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected_by_reason"].get("unknown_order", 0) > 0
    import polars as pl

    sc = pl.read_parquet(out / "scores.parquet")
    for inst in sc["instrument"].unique().to_list():
        fl = sc.filter(pl.col("instrument") == inst)["flags"].to_list()
        assert fl[0] & 1 and fl[0] & 4, (inst, fl[:5])  # warm-up, no book yet
        assert not fl[-1] & 5, (inst, fl[-5:])  # rebuilt by the end of the file


def test_a_routed_publish_sends_each_tick_only_to_its_instruments_shard(tmp_path):
    """Shards that bind their own endpoints: ``publish --cluster`` connects to each and routes by the hash."""
    data = tmp_path / "six.parquet"
    _cli("generate", "--out", data, "--events", 3000, "--symbols", ",".join(SIX))
    d = Path(f"/tmp/tsr-{uuid.uuid4().hex[:8]}")
    d.mkdir()
    cfg = tmp_path / "routed.toml"
    cfg.write_text(f"""
instruments = {json.dumps(SIX)}
[cluster]
shards = 2
[sources.zmq]
endpoint = "ipc://{d}/ticks-{{shard}}.ipc"
[sinks.zmq]
endpoint = "ipc://{d}/scores-{{shard}}.ipc"
[control]
endpoint = ""
""")
    ctx = zmq.Context()
    subs = []
    for k in (0, 1):  # stand-ins for the shards' tick sockets: what reaches each
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.setsockopt(zmq.RCVHWM, 0)
        s.bind(f"ipc://{d}/ticks-{k}.ipc")
        subs.append(s)
    got = [Counter(), Counter()]
    try:
        pub = subprocess.Popen([sys.executable, "-m", "engine.cli", "publish", "--cluster", str(cfg),
                                "--data", str(data), "--rate", "50000", "--no-progress"], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
        # a bound SUB hands its subscription to a connecting peer only when its own thread
        # calls into it (libzmq processes the attach there): keep receiving, as a shard does
        quiet = 0
        while quiet < 5:
            n = 0
            for k, s in enumerate(subs):
                while s.poll(100):
                    topic, payload = s.recv_multipart()
                    assert msgpack.unpackb(payload)[2] == topic.decode()
                    got[k][topic.decode()] += 1
                    n += 1
            quiet = quiet + 1 if n == 0 and pub.poll() is not None else 0
        err = pub.stderr.read()
        assert pub.returncode == 0 and "2 shards (routed" in err, err
    finally:
        for s in subs:
            s.close(0)
        ctx.term()
        for f in d.glob("*"):
            f.unlink()
        d.rmdir()
    import polars as pl

    sent = Counter(pl.read_parquet(data)["symbol"].to_list())
    for k in (0, 1):
        assert got[k] == Counter({s: n for s, n in sent.items() if _fnv(s.encode()) % 2 == k})


def test_a_routed_publish_over_aeron_offers_each_tick_on_its_shards_channel(tmp_path):
    """Shards on their own ``aeron:udp`` channels: ``publish --cluster`` offers each tick on its shard's."""
    pytest.importorskip("pyaeron")
    import socket

    from engine.aeron_io import AeronRuntime

    data = tmp_path / "six.parquet"
    _cli("generate", "--out", data, "--events", 2000, "--symbols", ",".join(SIX))
    for _ in range(50):
        port = _free_port(socket.SOCK_DGRAM)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            continue
    rt = AeronRuntime(str(tmp_path / "aeron"), embedded=True)
    cfg = tmp_path / "routed-aeron.toml"
    cfg.write_text(f"""
instruments = {json.dumps(SIX)}
[cluster]
shards = 2
[aeron]
embedded = false
dir = "{rt.dir}"
[sources.aeron]
channel = "aeron:udp?endpoint=127.0.0.1:{{{port}+shard}}"
[sinks.zmq]
endpoint = "ipc://{tmp_path}/s-{{shard}}.ipc"
[control]
endpoint = ""
""")
    got = [Counter(), Counter()]
    try:
        subs = [rt.client.add_subscription(f"aeron:udp?endpoint=127.0.0.1:{port + k}", 1001) for k in (0, 1)]

        def on(k):
            def handler(buf, header):
                m = msgpack.unpackb(bytes(buf))
                got[k][m[2]] += 1
            return handler

        handlers = [on(0), on(1)]
        pub = subprocess.Popen([sys.executable, "-m", "engine.cli", "publish", "--cluster", str(cfg),
                                "--data", str(data), "--rate", "50000", "--aeron-dir", rt.dir,
                                "--no-progress"], cwd=ROOT, stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            n = sum(sub.poll(handlers[k], 100) for k, sub in enumerate(subs))
            if n == 0 and pub.poll() is not None and sum(map(sum, (c.values() for c in got))) >= 2000:
                break
            if n == 0:
                time.sleep(0.001)
        err = pub.stderr.read()
        assert pub.wait(timeout=30) == 0 and "2 shards (routed" in err, err
    finally:
        rt.close()
    import polars as pl

    sent = Counter(pl.read_parquet(data)["symbol"].to_list())
    for k in (0, 1):
        assert got[k] == Counter({s: n for s, n in sent.items() if _fnv(s.encode()) % 2 == k})
