"""An operable, secure service: CURVE on every ZeroMQ socket, confined reloads, audit lines,
Prometheus metrics and health, JSON logs, one service per endpoint (issue 15).

Every test talks to a real ``tickscore serve`` subprocess over real sockets.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import zmq

from engine.config import ConfigError, parse_config
from engine.control import ControlError, request
from engine.security import SecurityError, client_keys, keygen, load_key_pair
from tests.conftest import ROOT, Svc, _free_port
from tests.test_service import _client, _finish, _kill_all

N = 2_000


def test_keygen_writes_a_pair_zmq_auth_reads_with_an_owner_only_secret(tmp_path):
    pub, sec = keygen(tmp_path / "keys" / "svc")
    assert pub.name == "svc.key" and sec.name == "svc.key_secret"
    assert (os.stat(sec).st_mode & 0o777) == 0o600
    public, secret = load_key_pair(sec)
    assert len(public) == 40 and len(secret) == 40
    assert zmq.auth.load_certificate(str(pub))[0] == public
    with pytest.raises(SecurityError, match="never overwritten"):
        keygen(tmp_path / "keys" / "svc")
    with pytest.raises(SecurityError, match="secret key file"):
        load_key_pair(pub)
    os.chmod(sec, 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_key_pair(sec)
    with pytest.raises(SecurityError, match="both keys"):
        client_keys(str(sec), None)


def test_keygen_cli_prints_the_public_key(tmp_path):
    r = subprocess.run([sys.executable, "-m", "engine.cli", "keygen", "--out", str(tmp_path / "k" / "a")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == zmq.auth.load_certificate(str(tmp_path / "k" / "a.key"))[0].decode()


def test_config_refuses_a_control_socket_off_loopback_without_curve_and_curve_without_keys():
    with pytest.raises(ConfigError, match="reachable from other hosts"):
        parse_config({"control": {"endpoint": "tcp://0.0.0.0:5590"}})
    with pytest.raises(ConfigError, match="reachable from other hosts"):
        parse_config({"control": {"endpoint": "tcp://*:5590"}})
    parse_config({"control": {"endpoint": "tcp://127.0.0.1:5590"}})
    parse_config({"control": {"endpoint": "ipc:///tmp/x.ipc"}})
    with pytest.raises(ConfigError, match="secret_key"):
        parse_config({"security": {"curve": True}})
    cfg = parse_config({"control": {"endpoint": "tcp://0.0.0.0:5590"},
                        "security": {"curve": True, "secret_key": "s", "authorized_keys": "d"}})
    assert cfg.security.curve
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_config({"metrics": {"endpoint": "9464"}})


@pytest.fixture(scope="module")
def curve_service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curve")
    keys = tmp / "keys"
    keygen(keys / "server")
    keygen(keys / "client")
    keygen(keys / "intruder")
    (keys / "authorized").mkdir()
    (keys / "authorized" / "client.key").write_bytes((keys / "client.key").read_bytes())
    models = tmp / "models"
    models.mkdir()
    fp32 = ROOT / "models" / "default" / "risk_fp32.onnx"
    (models / "fp32.onnx").write_bytes(fp32.read_bytes())
    (tmp / "outside.onnx").write_bytes(fp32.read_bytes())
    (models / "link.onnx").symlink_to(tmp / "outside.onnx")
    ck = client_keys(str(keys / "client.key_secret"), str(keys / "server.key"))
    port = _free_port()
    svc = Svc(tmp, (
        '[engine]\npin = "none"\nidle = "backoff"\n'
        f'[sources.zmq]\nendpoint = "tcp://127.0.0.1:{_free_port()}"\n'
        f'[sinks.zmq]\nendpoint = "ipc://{tmp}/scores.ipc"\n'
        f'[model]\nreload_dirs = ["{models}"]\n'
        f'[metrics]\nendpoint = "127.0.0.1:{port}"\n'
        f'[security]\ncurve = true\nsecret_key = "{keys}/server.key_secret"\n'
        f'authorized_keys = "{keys}/authorized"\n'
    ), keys=ck)
    cfg = svc.cfg.read_text()
    svc.ticks = cfg.split('[sources.zmq]\nendpoint = "')[1].split('"')[0]
    svc.scores = f"ipc://{tmp}/scores.ipc"
    svc.metrics = f"http://127.0.0.1:{port}"
    svc.keys_dir, svc.models = keys, models
    svc.curve = [k.decode() for k in ck]
    svc.intruder = [k.decode() for k in client_keys(str(keys / "intruder.key_secret"),
                                                       str(keys / "server.key"))]  # fmt: skip
    try:
        yield svc
    finally:
        svc.stop()


def _metrics(svc) -> dict[str, float]:
    text = urllib.request.urlopen(svc.metrics + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_unauthorized_clients_get_nothing_authorized_ones_everything(curve_service, tmp_path):
    svc = curve_service
    before = svc.status()
    good = bad_sub = nokey_sub = pub = bad_pub = None
    try:
        good = _client("subscribe", {"via": "zmq", "endpoint": svc.scores, "expect": N, "curve": svc.curve,
                                     "out": str(tmp_path / "good.json")}, tmp_path, "good")
        bad_sub = _client("subscribe", {"via": "zmq", "endpoint": svc.scores, "curve": svc.intruder,
                                        "max_s": 15, "out": str(tmp_path / "bad.json")}, tmp_path, "bad")
        nokey_sub = _client("subscribe", {"via": "zmq", "endpoint": svc.scores, "max_s": 15,
                                          "out": str(tmp_path / "nokey.json")}, tmp_path, "nokey")
        svc.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] > before["sinks"]["zmq"]["subscribers"], 10)
        # an unknown publisher's ticks never arrive (its XPUB sees no subscription: it gives up)
        bad_pub = subprocess.run(
            [sys.executable, "-m", "engine.cli", "publish", svc.ticks, "--limit", "50", "--control", "",
             "--connect-timeout", "3", "--no-progress",
             "--client-key", str(svc.keys_dir / "intruder.key_secret"),
             "--server-key", str(svc.keys_dir / "server.key")],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert bad_pub.returncode == 2 and "no service subscribed" in bad_pub.stderr, bad_pub.stderr
        pub = _client("publish", {"via": "zmq", "endpoint": svc.ticks, "n": N, "first": 7_000_000,
                                  "curve": svc.curve}, tmp_path, "pub")
        _finish(pub)
        _finish(good)
        _finish(bad_sub)
        _finish(nokey_sub)
    finally:
        _kill_all(good, bad_sub, nokey_sub, pub)
    assert json.loads((tmp_path / "good.json").read_text())["count"] == N
    assert json.loads((tmp_path / "bad.json").read_text())["count"] == 0
    assert json.loads((tmp_path / "nokey.json").read_text())["count"] == 0
    st = svc.status()
    assert st["ticks_in"] - before["ticks_in"] == N  # the intruder's 50 never counted
    refused = st["security"]["refused"]
    assert refused["ticks"] > before["security"]["refused"]["ticks"]
    assert refused["scores"] >= before["security"]["refused"]["scores"] + 2
    log = svc.log.read_text()
    assert "Unknown key" in log and "no or wrong CURVE key" in log


def test_a_control_client_without_an_authorized_key_gets_no_answer(curve_service):
    svc = curve_service
    refused0 = svc.status()["security"]["refused"]["control"]
    with pytest.raises(ControlError):
        request(svc.control, "stop", timeout_s=2)
    intruder = client_keys(str(svc.keys_dir / "intruder.key_secret"), str(svc.keys_dir / "server.key"))
    with pytest.raises(ControlError):
        request(svc.control, "stop", timeout_s=2, keys=intruder)
    st = svc.status()  # still running, with the right key
    assert st["state"] == "running" and st["security"]["refused"]["control"] >= refused0 + 2


def test_reload_is_confined_to_the_model_dirs_and_carries_the_sha256(curve_service):
    svc = curve_service
    outside = svc.tmp / "outside.onnx"
    for path in (outside, svc.models / "link.onnx", svc.models / ".." / "outside.onnx"):
        r = request(svc.control, json.dumps({"command": "reload", "path": str(path)}), keys=svc.keys)
        assert r["ok"] is False and r["refused"] and "not inside the model directories" in r["error"], r
    r = request(svc.control, json.dumps({"command": "reload", "path": str(svc.models / "fp32.onnx")}),
                keys=svc.keys)
    assert r["ok"], r
    st = svc.wait_for(lambda s: s["reloads"][-1]["status"] != "pending", 60)
    last = st["reloads"][-1]
    want = hashlib.sha256((svc.models / "fp32.onnx").read_bytes()).hexdigest()
    assert last["status"] == "swapped" and last["sha256"] == want
    assert st["model"]["version"] == last["version"]
    time.sleep(0.3)  # the completion line is written at the next slow housekeeping
    lines = svc.log.read_text().splitlines()
    client_pub = svc.curve[0]
    audit = [ln for ln in lines if "control reload from curve:" + client_pub in ln]
    assert len(audit) == 4 and sum("result=refused" in ln for ln in audit) == 3
    assert any(f"sha256={want}" in ln and "reload swapped" in ln for ln in lines)


def test_metrics_and_health_move_with_the_traffic(curve_service, tmp_path):
    svc = curve_service
    assert _get(svc.metrics + "/healthz")[0] == 200
    assert _get(svc.metrics + "/readyz") == (200, "ready\n")
    assert _get(svc.metrics + "/nope")[0] == 404
    m0 = _metrics(svc)
    pub = None
    try:
        pub = _client("publish", {"via": "zmq", "endpoint": svc.ticks, "n": N, "first": 9_000_000,
                                  "curve": svc.curve, "garbage": True}, tmp_path, "pub")
        _finish(pub)
    finally:
        _kill_all(pub)
    svc.wait_for(lambda s: s["ticks_in"] >= 0, 1)
    time.sleep(0.5)  # folded at the next slow housekeeping (100 ms)
    m1 = _metrics(svc)
    assert m1["tickscore_scores_total"] - m0["tickscore_scores_total"] == N
    count = "tickscore_tick_to_decision_seconds_count"
    assert m1[count] - m0[count] == N
    assert m1['tickscore_tick_to_decision_seconds_bucket{le="+Inf"}'] == m1[
        "tickscore_tick_to_decision_seconds_count"]
    malformed = 'tickscore_rejected_total{reason="malformed"}'
    assert m1[malformed] > m0[malformed]
    assert m1["tickscore_ready"] == 1 and m1["tickscore_up"] == 1
    assert any(k.startswith("tickscore_model_info{") for k in m1)
    st = svc.status()["cluster"]
    assert m1[f'tickscore_shard_info{{epoch="{st["epoch"]}",shard="0",shards="1"}}'] == 1  # not sharded
    assert m1["tickscore_restarts"] == 0 and m1["tickscore_skipped_total"] == 0
    assert "process_resident_memory_bytes" in m1


def test_json_logs_one_object_per_line_with_a_timestamp(tmp_path):
    svc = Svc(tmp_path, '[engine]\npin = "none"\n'
              f'[sources.zmq]\nendpoint = "ipc://{tmp_path}/t.ipc"\n'
              f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/s.ipc"\n', args=("--log-format", "json"))
    try:
        request(svc.control, "explode")
        svc.proc.send_signal(signal.SIGTERM)
        svc.proc.wait(timeout=60)
    finally:
        svc.stop()
    lines = [ln for ln in svc.log.read_text().splitlines() if ln.strip()]
    objs = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert all({"ts", "level", "event", "msg"} <= set(o) for o in objs)
    events = [o["event"] for o in objs]
    assert "starting" in events and "ready" in events and "stopped" in events
    bad = next(o for o in objs if o["event"] == "control")
    assert bad["command"] == "bad_request" and bad["result"] == "bad_request" and bad["who"]


def test_a_second_service_on_the_same_endpoints_fails_and_the_first_keeps_serving(tmp_path):
    toml = ('[engine]\npin = "none"\n'
            f'[sources.zmq]\nendpoint = "ipc://{tmp_path}/t.ipc"\n'
            f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/s.ipc"\n')
    first = Svc(tmp_path, toml, name="first")
    try:
        second_cfg = tmp_path / "second.toml"
        # same tick/score ipc paths, a free control port: the ipc check must catch it first
        second_cfg.write_text(first.cfg.read_text().replace(first.control, f"tcp://127.0.0.1:{_free_port()}"))
        r = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--config", str(second_cfg)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "served by a running process" in r.stderr, r.stderr
        third = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--config", str(first.cfg)],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert third.returncode == 2, third.stderr  # same everything: refused before binding anything
        pub = sub = None
        try:
            sub = _client("subscribe", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/s.ipc", "expect": 500,
                                        "out": str(tmp_path / "sub.json")}, tmp_path, "sub")
            first.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] >= 1, 10)
            pub = _client("publish", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/t.ipc", "n": 500,
                                      "first": 100}, tmp_path, "pub")
            _finish(pub)
            _finish(sub)
        finally:
            _kill_all(pub, sub)
        assert json.loads((tmp_path / "sub.json").read_text())["count"] == 500
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=60) == 0
        # nothing left behind: the ipc socket files are removed at exit
        assert not Path(f"{tmp_path}/t.ipc").exists() and not Path(f"{tmp_path}/s.ipc").exists()
    finally:
        first.stop()


def test_sigkill_then_restart_on_the_same_endpoints_starts_cleanly(tmp_path):
    toml = ('[engine]\npin = "none"\n'
            f'[sources.zmq]\nendpoint = "ipc://{tmp_path}/t.ipc"\n'
            f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/s.ipc"\n'
            '[sources.aeron]\nchannel = "aeron:ipc"\n'
            f'[aeron]\ndir = "/dev/shm/tickscore-test-kill-{os.getpid()}"\n')
    first = Svc(tmp_path, toml, name="a")
    aeron_dir = Path(f"/dev/shm/tickscore-test-kill-{os.getpid()}")
    assert (os.stat(aeron_dir).st_mode & 0o077) == 0  # owner-only Aeron directory
    first.proc.kill()
    first.proc.wait(timeout=10)
    first.stop()
    second = Svc(tmp_path, toml, name="a2")
    try:
        assert second.status()["state"] == "running"
    finally:
        second.proc.send_signal(signal.SIGTERM)
        second.proc.wait(timeout=60)
        second.stop()


def test_replay_via_a_running_curve_service_with_client_keys(curve_service, tmp_path):
    svc = curve_service
    base = [sys.executable, "-m", "engine.cli", "replay", "--via", "zmq", "--service-config", str(svc.cfg),
            "--limit", "2000", "--no-progress", "--json"]
    keys = ["--client-key", str(svc.keys_dir / "client.key_secret"),
            "--server-key", str(svc.keys_dir / "server.key")]
    r = subprocess.run([*base, *keys], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout[r.stdout.index("{"):])
    assert s["scores"] == 2000 and s["rejected"] == 0
    r = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)  # no key: refused
    assert r.returncode != 0
