"""Multi-host, on this one machine: four network namespaces ("hosts") joined by veth pairs on a bridge.

* host 1 publishes the ticks once over ZeroMQ tcp (``publish --cluster``, binding 10.231.x.1);
* hosts 2 and 3 each run one shard under their own supervisor (``serve --shards 2 --only K``),
  receiving their instruments over ZeroMQ tcp and publishing Scores over ``aeron:udp`` to host 4
  (each shard has its own embedded media driver in its own namespace);
* host 4 runs an Aeron media driver and ``tickscore subscribe --cluster`` on the shared channel.

Checks: every instrument is scored by exactly one shard, the right one; shard 0 scores
every one of its ticks exactly once (contiguous seq); ``kill -9`` of shard 1 loses only
shard 1's instruments while it is down, and its restart shows at the subscriber as a new
epoch whose seq starts at 0.  Skipped, with the reason, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from engine.control import request
from tests.conftest import ROOT
from tests.test_cluster import SIX, _fnv

HOSTS = {"pub": 1, "s0": 2, "s1": 3, "sub": 4}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


@pytest.fixture
def hosts():
    """Create the namespaces (``{name: (netns, address)}``); delete them afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed: cannot create network namespaces")
    tag = uuid.uuid4().hex[:6]
    net = 200 + int(tag[:2], 16) % 50  # 10.231.<net>.0/24, unlikely to clash with a second run
    br = f"tsn{tag}-br"
    made: list[str] = []
    try:
        try:
            _ip("netns", "add", br)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create network namespaces here (needs root / CAP_NET_ADMIN): "
                        f"{exc.stderr.strip()}")  # fmt: skip
        made.append(br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        out = {}
        for name, i in HOSTS.items():
            ns = f"tsn{tag}-{name}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", f"v{i}", "netns", ns, "type", "veth", "peer", "name", f"b{i}", "netns", br)
            _ip("-n", br, "link", "set", f"b{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"10.231.{net}.{i}/24", "dev", f"v{i}")
            _ip("-n", ns, "link", "set", f"v{i}", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            out[name] = (ns, f"10.231.{net}.{i}")
        yield out
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _in(ns: str, *args, log: Path | None = None) -> subprocess.Popen:
    err = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the process owns it
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip


def _status(ctl: str) -> dict | None:
    try:
        return request(ctl, "status", timeout_s=1.0)
    except Exception:  # noqa: BLE001 - down
        return None


def test_shards_on_two_hosts_over_zmq_tcp_and_aeron_udp_lose_only_the_killed_shards_instruments(
        hosts, tmp_path):  # fmt: skip
    data = tmp_path / "six.parquet"
    subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--out", str(data), "--events", "15000",
                    "--symbols", ",".join(SIX)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)  # fmt: skip
    syms = pl.read_parquet(data)["symbol"].to_list()
    tag = uuid.uuid4().hex[:8]
    run = Path(f"/tmp/tsn-{tag}")
    run.mkdir()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(f"""
instruments = {json.dumps(SIX)}
[cluster]
shards = 2
restart_backoff_ms = 500
[engine]
pin = "none"
idle = "backoff"
keep_warm_us = 0
[aeron]
dir = "{shm}/tsn-{tag}-{{shard}}"
[sources.zmq]
endpoint = "tcp://{hosts['pub'][1]}:6000"
bind = false
[sinks.aeron]
channel = "aeron:udp?endpoint={hosts['sub'][1]}:40124"
[control]
endpoint = "ipc://{run}/ctl-{{shard}}.ipc"
""")
    ctl = [f"ipc://{run}/ctl-{k}.ipc" for k in (0, 1)]
    sub_dir = f"{shm}/tsn-{tag}-sub"
    driver = ("import signal, time, pyaeron\n"
              f"d = pyaeron.MediaDriver(dir={sub_dir!r}, dir_delete_on_start=True,\n"
              "                        dir_delete_on_shutdown=True)\n"
              "signal.signal(signal.SIGTERM, lambda *a: (d.close(), exit(0)))\n"
              "while True: time.sleep(1)\n")  # fmt: skip
    procs: dict[str, subprocess.Popen] = {}
    out = tmp_path / "scores.parquet"
    try:
        procs["driver"] = _in(hosts["sub"][0], "-c", driver, log=tmp_path / "driver.log")
        for k in (0, 1):
            procs[f"s{k}"] = _in(hosts[f"s{k}"][0], "-m", "engine.cli", "serve", "--shards", 2, "--only", k,
                                 "--config", cfg, log=tmp_path / f"host-s{k}.log")  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(
                (st := _status(c)) is not None and st["state"] == "running" for c in ctl):  # fmt: skip
            for k in (0, 1):
                assert procs[f"s{k}"].poll() is None, (tmp_path / f"host-s{k}.log").read_text()
            time.sleep(0.5)
        first = [_status(c) for c in ctl]
        assert all(st is not None and st["state"] == "running" for st in first), first
        procs["sub"] = _in(hosts["sub"][0], "-m", "engine.cli", "subscribe", "--cluster", cfg, "--aeron-dir",
                           sub_dir, "--quiet", "--out", out, log=tmp_path / "sub.log")  # fmt: skip
        time.sleep(3)  # the subscriber's driver and the shards' publications connect
        procs["pub"] = _in(hosts["pub"][0], "-m", "engine.cli", "publish", "--cluster", cfg, "--data", data,
                           "--rate", 1200, "--limit", 15000, "--no-progress",
                           log=tmp_path / "pub.log")  # fmt: skip
        time.sleep(4)
        os.kill(first[1]["pid"], signal.SIGKILL)  # shard 1 dies; its host's supervisor restarts it
        assert procs["pub"].wait(timeout=90) == 0, (tmp_path / "pub.log").read_text()
        deadline = time.monotonic() + 60
        while (again := _status(ctl[1])) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert again is not None and again["cluster"]["restarts"] == 1, again
        time.sleep(2)
        procs["sub"].send_signal(signal.SIGTERM)
        assert procs["sub"].wait(timeout=30) == 0, (tmp_path / "sub.log").read_text()
        for k in (0, 1):
            procs[f"s{k}"].send_signal(signal.SIGTERM)
            assert procs[f"s{k}"].wait(timeout=60) == 0, (tmp_path / f"host-s{k}.log").read_text()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(run, ignore_errors=True)

    df = pl.read_parquet(out)
    owner = {s: _fnv(s.encode()) % 2 for s in SIX}
    shards_of = df.group_by("instrument").agg(pl.col("shard").unique())
    assert {r["instrument"]: r["shard"] for r in shards_of.iter_rows(named=True)} == {
        s: [owner[s]] for s in SIX}
    # exactly once: the scored (instrument, event time) pairs are the sent ones (times rebased by a
    # constant; the first tick was scored, both shards were up), none twice, shard 0's all of them
    src = pl.read_parquet(data).head(15000)
    shift = int(df["ts_event_ns"].min()) - int(src["ts_event_ns"].min())
    sent_at = Counter(zip(src["symbol"].to_list(), src["ts_event_ns"].to_list(), strict=True))
    got_at = Counter(zip(df["instrument"].to_list(), (df["ts_event_ns"] - shift).to_list(), strict=True))
    assert not got_at - sent_at  # nothing scored that was not sent, nothing twice
    assert all(got_at[k] == v for k, v in sent_at.items() if owner[k[0]] == 0)
    sent = Counter(syms[:15000])
    got = Counter(df["instrument"].to_list())
    epochs = {k: df.filter(pl.col("shard") == k)["epoch"].unique().sort().to_list() for k in (0, 1)}
    assert len(epochs[0]) == 1 and len(epochs[1]) == 2  # shard 1 restarted: a new epoch
    for k in (0, 1):
        for e in epochs[k]:
            seq = df.filter((pl.col("shard") == k) & (pl.col("epoch") == e))["seq"].to_list()
            assert seq == list(range(len(seq))) and seq  # contiguous from 0 in each epoch
    for s in SIX:
        if owner[s] == 0:
            assert got[s] == sent[s]  # the live shard lost nothing
        else:
            assert 0 < got[s] < sent[s]  # only the killed shard's instruments lost ticks
