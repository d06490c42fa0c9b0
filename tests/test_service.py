"""`tickscore serve` in a subprocess, fed and read by independent processes over real sockets.

Publishers and subscribers are ``tests/wire_clients.py`` processes that encode
Ticks and decode Scores with the plain ``msgpack`` package and the README's
layouts.  Every endpoint is loopback / ipc under ``tmp_path`` / a unique Aeron
directory in /dev/shm; every subprocess is killed in ``finally``.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config, parse_config
from engine.control import ControlError, request
from tests.conftest import SYMBOLS, Svc, _aeron_dir, _free_port

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ROOT / "tests" / "wire_clients.py"
sys.path.insert(0, str(ROOT / "tests"))
from wire_clients import GARBAGE_EXPECTED, GARBAGE_EXPECTED_AERON  # noqa: E402


def _client(role: str, spec: dict, tmp: Path, name: str) -> subprocess.Popen:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, str(CLIENTS), role, str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise AssertionError(f"{name} not ready: {line!r} {proc.communicate()[1][-2000:]}")
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]


def _kill_all(*procs) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------------ config


def test_bad_config_key_or_value_is_a_clear_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'engine\.pinn'.*valid keys here: pin"):
        parse_config({"engine": {"pinn": 1}}, "svc.toml")
    with pytest.raises(ConfigError, match=r"sources\.aeron\.stream_id = 0: expected `int` >= 1"):
        parse_config({"sources": {"aeron": {"stream_id": 0}}}, "svc.toml")
    with pytest.raises(ConfigError, match=r"engine\.idle = 'spin'.*busy-spin, yield, backoff, sleep"):
        parse_config({"engine": {"idle": "spin"}}, "svc.toml")
    with pytest.raises(ConfigError, match=r"sinks\.zmq\.endpoint = 'http://x': not a ZeroMQ endpoint"):
        parse_config({"sinks": {"zmq": {"endpoint": "http://x"}}}, "svc.toml")
    with pytest.raises(ConfigError, match=r"sources\.zmq\.subscribe\[1\] = 2: expected `str`"):
        parse_config({"sources": {"zmq": {"subscribe": ["", 2]}}}, "svc.toml")
    with pytest.raises(ConfigError, match=r"model\.backend = 'onnx'.*auto, ort, fused"):
        parse_config({"model": {"backend": "onnx"}}, "svc.toml")
    assert parse_config({}, "svc.toml").model.backend == "auto"  # as the replay's --backend
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\npin = 1\n[engine]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    # the examples shipped with the project are valid
    for example in (ROOT / "engine" / "examples").glob("*.toml"):
        load_config(example)


def test_config_values_that_would_fail_late_are_refused_up_front(tmp_path):
    """Issue: operable service, defect 12: each of these failed at run time, or not at all."""
    with pytest.raises(ConfigError, match=r"engine\.recorder_capacity = 1099511627776: expected `int` <= "):
        parse_config({"engine": {"recorder_capacity": 2**40}}, "svc.toml")  # was a MemoryError
    with pytest.raises(ConfigError, match=r"engine\.keep_warm_us = .*expected `int` <= 1000000"):
        parse_config({"engine": {"keep_warm_us": 10**20}}, "svc.toml")
    with pytest.raises(ConfigError, match=r"engine\.helper_cpus = \[99\]: core\(s\) \[99\] are not"):
        parse_config({"engine": {"helper_cpus": [99]}}, "svc.toml")
    binary = tmp_path / "cfg.toml"
    binary.write_bytes(b"\x00\xff\xfe\x89PNG")
    with pytest.raises(ConfigError, match=r"cfg\.toml: not a text \(UTF-8\) TOML file"):
        load_config(binary)
    from engine.config import check_output_dir

    (tmp_path / "a_file").write_text("")  # a directory below a file cannot be made, even by root
    with pytest.raises(ConfigError, match=r"output\.dir = .*not writable"):
        check_output_dir(str(tmp_path / "a_file" / "out"))
    check_output_dir(str(tmp_path / "new" / "out"))  # created
    assert (tmp_path / "new" / "out").is_dir() and not list((tmp_path / "new" / "out").iterdir())


def test_serve_with_a_bad_config_exits_2_before_starting_anything(tmp_path):
    port = _free_port()
    cfg = tmp_path / "svc.toml"
    cfg.write_text(f'[control]\nendpoint = "tcp://127.0.0.1:{port}"\n[sinks.aeron]\nstream_id = "x"\n')
    run = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--config", str(cfg)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "sinks.aeron.stream_id = 'x'" in run.stderr and "Traceback" not in run.stderr
    assert "starting" not in run.stderr  # nothing was started


# ------------------------------------------------------------------------------ ZeroMQ


@pytest.fixture(scope="module")
def zmq_service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zmqsvc")
    svc = Svc(tmp, (
        '[engine]\npin = "none"\nidle = "backoff"\n'
        f'[sources.zmq]\nendpoint = "ipc://{tmp}/ticks.ipc"\n'
        f'[sinks.zmq]\nendpoint = "ipc://{tmp}/scores.ipc"\n'
    ))
    svc.ticks = f"ipc://{tmp}/ticks.ipc"
    svc.scores = f"ipc://{tmp}/scores.ipc"
    try:
        yield svc
    finally:
        svc.stop()


def test_zmq_n_ticks_in_give_n_scores_out_with_contiguous_seq(zmq_service, tmp_path):
    svc = zmq_service
    before = svc.status()
    n = 3000
    sub = pub = None
    try:
        sub = _client("subscribe", {"via": "zmq", "endpoint": svc.scores, "expect": n,
                                    "out": str(tmp_path / "sub.json")}, tmp_path, "sub")
        svc.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] > before["sinks"]["zmq"]["subscribers"], 10)
        pub = _client("publish", {"via": "zmq", "endpoint": svc.ticks, "n": n, "first": 100_000},
                      tmp_path, "pub")
        _finish(pub)
        _finish(sub)
    finally:
        _kill_all(pub, sub)
    got = json.loads((tmp_path / "sub.json").read_text())
    st = svc.status()
    assert got["bad"] == []
    assert got["count"] == n
    assert got["in_order"] and got["seqs_sorted_contiguous"]
    assert got["first_seq"] == before["scores_out"] and got["last_seq"] == before["scores_out"] + n - 1
    assert got["topics_match_instrument"] and got["scores_ok"]
    assert set(got["instruments"]) == set(SYMBOLS)
    assert got["model_versions"] == [st["model"]["version"]]
    assert st["ticks_in"] - before["ticks_in"] == n
    assert st["scores_out"] - before["scores_out"] == n
    assert st["drops"] == 0 and st["errors"] == 0
    lat = st["latency_ns"]
    assert lat["count"] == st["scores_out"] and 0 < lat["p50"] <= lat["max"]
    # no [model] backend in the config: "auto", as in the replay, picks the fused
    # numba backend for the shipped model (its graph is supported and parity passes)
    assert st["model"]["backend"] == "fused", st["model"]


def test_malformed_ticks_are_counted_by_reason_and_the_service_keeps_scoring(zmq_service, tmp_path):
    svc = zmq_service
    before = svc.status()
    n = 500
    sub = pub = None
    try:
        sub = _client("subscribe", {"via": "zmq", "endpoint": svc.scores, "expect": n,
                                    "out": str(tmp_path / "sub.json")}, tmp_path, "sub")
        svc.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] > before["sinks"]["zmq"]["subscribers"], 10)
        pub = _client("publish", {"via": "zmq", "endpoint": svc.ticks, "n": n, "first": 200_000,
                                  "garbage": True}, tmp_path, "pub")
        _finish(pub)
        _finish(sub)
    finally:
        _kill_all(pub, sub)
    st = svc.status()
    got = json.loads((tmp_path / "sub.json").read_text())
    rejected = {k: v - before["rejected_by_reason"].get(k, 0) for k, v in st["rejected_by_reason"].items()}
    assert {k: v for k, v in rejected.items() if v} == GARBAGE_EXPECTED
    # every good tick sent after the garbage was scored, in order
    assert got["count"] == n and got["in_order"] and got["seqs_sorted_contiguous"] and got["bad"] == []
    assert st["scores_out"] - before["scores_out"] == n
    assert st["ticks_in"] - before["ticks_in"] == n + sum(GARBAGE_EXPECTED.values())
    assert st["state"] == "running" and st["errors"] == 0


def test_tickscore_subscribe_records_scores_to_parquet(zmq_service, tmp_path):
    import polars as pl

    svc = zmq_service
    before = svc.status()
    n = 300
    out = tmp_path / "scores.parquet"
    sub = pub = None
    try:
        sub = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "subscribe", svc.scores, "--out", str(out),
             "--count", str(n), "--duration", "60"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        svc.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] > before["sinks"]["zmq"]["subscribers"], 10)
        pub = _client("publish", {"via": "zmq", "endpoint": svc.ticks, "n": n, "first": 300_000},
                      tmp_path, "pub")
        _finish(pub)
        stdout, stderr = sub.communicate(timeout=60)
    finally:
        _kill_all(pub, sub)
    assert sub.returncode == 0, stderr
    df = pl.read_parquet(out)
    assert df.columns == ["instrument", "seq", "ts_event_ns", "ts_in_ns", "ts_out_ns", "score",
                          "model_version", "flags", "shard", "epoch", "recv_ns"]
    assert df.height == n and df["seq"].diff().drop_nulls().to_list() == [1] * (n - 1)
    assert (df["recv_ns"] >= df["ts_out_ns"]).all() and (df["ts_out_ns"] >= df["ts_in_ns"]).all()
    assert stdout.count("seq=") == n  # one printed line per score


def test_control_rejects_unknown_commands_and_reload_swaps_the_model(zmq_service):
    svc = zmq_service
    bad = request(svc.control, "explode")
    assert bad["ok"] is False and "unknown command" in bad["error"]
    missing = request(svc.control, "reload")
    assert missing["ok"] is False and "model path" in missing["error"]
    fp32 = ROOT / "models" / "default" / "risk_fp32.onnx"
    reply = request(svc.control, json.dumps({"command": "reload", "path": str(fp32)}))
    assert reply["ok"], reply
    assert reply["status"] in ("pending", "swapped")
    st = svc.wait_for(lambda s: s.get("reloads", [{}])[-1].get("status") != "pending", 60)
    last = st["reloads"][-1]
    assert last["status"] == "swapped", last
    assert st["model"]["version"] == last["version"]


def test_control_survives_any_client_and_answers_every_bad_request(zmq_service):
    """Malformed control traffic never reaches the agent's error budget (issue: operable service, 3 and 4)."""
    import zmq

    svc = zmq_service
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 10_000)
    dealer.connect(svc.control)
    try:
        for _ in range(1_200):  # more than the runner's 1,000-error budget
            dealer.send_multipart([b"", b"status", b"x"])
            empty, reply = dealer.recv_multipart()
            assert empty == b"" and "one frame" in json.loads(reply)["error"]
    finally:
        dealer.close(0)
    nested = '{"command":"status","x":' + "[" * 20_000
    for text, why in ((nested, "not valid JSON"), ("stop now please", "stop takes no argument"),
                      ('{"command": "status", "extra": 1}', "unknown request fields"),
                      ("explode", "unknown command")):
        r = request(svc.control, text)
        assert r["ok"] is False and why in r["error"], (text[:30], r)
    with pytest.raises(ControlError):  # over MAX_REQUEST_BYTES: dropped by libzmq, no answer, no parse
        request(svc.control, "status " + "x" * (128 * 1024), timeout_s=1.0)
    st = svc.status()  # still answering, still running, no error charged to the hot agent
    assert st["ok"] and st["state"] == "running" and st["errors"] == 0


def test_a_second_service_on_the_same_endpoints_fails_clearly_and_the_first_keeps_serving(zmq_service):
    """Issue: operable service, defect 6: the second start must not take the first one's ipc paths."""
    svc = zmq_service
    before = svc.status()
    run = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--config", str(svc.cfg)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert "is served by a running process" in run.stderr and "Traceback" not in run.stderr
    for path in (svc.ticks, svc.scores):  # the first service's socket files are still there ...
        assert os.path.exists(path[len("ipc://"):])
    after = svc.status()  # ... and it still answers, still bound: a publisher reaches it
    assert after["state"] == "running" and after["pid"] == before["pid"]
    sub = pub = None
    try:
        sub = _client("subscribe", {"via": "zmq", "endpoint": svc.scores, "expect": 50,
                                    "out": str(svc.tmp / "sub2.json")}, svc.tmp, "sub2")  # fmt: skip
        svc.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] > after["sinks"]["zmq"]["subscribers"], 10)
        pub = _client("publish", {"via": "zmq", "endpoint": svc.ticks, "n": 50, "first": 900_000},
                      svc.tmp, "pub2")  # fmt: skip
        _finish(pub)
        _finish(sub)
    finally:
        _kill_all(sub, pub)


# ------------------------------------------------------------------------------ Aeron


def test_aeron_ipc_and_zmq_both_ways_at_once_every_tick_scored_on_both_sinks(tmp_path):
    adir = _aeron_dir()
    n_zmq, n_aeron = 1500, 1500
    svc = sub_a = sub_z = pub_a = pub_z = None
    try:
        # default engine settings: hot loop pinned to core 1, busy-spin
        svc = Svc(tmp_path, (
            f'[sources.zmq]\nendpoint = "ipc://{tmp_path}/ticks.ipc"\n'
            f'[sources.aeron]\nchannel = "aeron:ipc"\n'
            f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/scores.ipc"\n'
            f'[sinks.aeron]\nchannel = "aeron:ipc"\n'
            f'[aeron]\ndir = "{adir}"\n'
        ))
        n = n_zmq + n_aeron
        aer = {"via": "aeron", "aeron_dir": adir}
        sub_a = _client("subscribe", {**aer, "channel": "aeron:ipc", "stream_id": 1002, "expect": n,
                                      "out": str(tmp_path / "sub_a.json")}, tmp_path, "sub_a")
        sub_z = _client("subscribe", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/scores.ipc", "expect": n,
                                      "out": str(tmp_path / "sub_z.json")}, tmp_path, "sub_z")
        svc.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] >= 1 and s["sinks"]["aeron"]["connected"], 10)
        # disjoint instruments, so the two streams' event times never interleave backwards
        pub_a = _client("publish", {**aer, "channel": "aeron:ipc", "stream_id": 1001, "n": n_aeron,
                                    "garbage": True, "rate": 5000, "symbols": ["CLF7", "ESZ6"]},
                        tmp_path, "pub_a")
        pub_z = _client("publish", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/ticks.ipc", "n": n_zmq,
                                    "rate": 5000, "symbols": ["NQZ6"]}, tmp_path, "pub_z")
        _finish(pub_a)
        _finish(pub_z)
        _finish(sub_a)
        _finish(sub_z)
        st = svc.status()
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(timeout=60) == 0, svc.log.read_text()
    finally:
        _kill_all(pub_a, pub_z, sub_a, sub_z)
        if svc is not None:
            svc.stop()
        shutil.rmtree(adir, ignore_errors=True)
    for name in ("sub_a", "sub_z"):
        got = json.loads((tmp_path / f"{name}.json").read_text())
        assert got["count"] == n, (name, got)
        assert got["seqs_sorted_contiguous"] and got["in_order"] and got["bad"] == [] and got["scores_ok"]
    assert st["scores_out"] == n
    assert {k: v for k, v in st["rejected_by_reason"].items() if v} == GARBAGE_EXPECTED_AERON
    assert st["sinks"]["aeron"]["sent"] == n and st["sinks"]["zmq"]["sent"] == n and st["drops"] == 0
    assert st["aeron"]["dir"] == adir and st["aeron"]["embedded"]
    # both received in compiled code, one call per duty cycle for the two (NativeMultiSource)
    assert st["loop"] == "native" and st["ingress"] == ["NativeZmqTickSource", "NativeAeronTickSource"]
    s = svc.summary()
    assert s["mode"] == "zmq+aeron" and s["scores"] == n
    assert s["ticks"] == s["scores"] + s["rejected"]
    assert "pinned to core 1" in s["pin"] or "not available" in s["pin"] or "refused" in s["pin"]
    assert not os.path.exists(adir)  # the embedded driver removed its directory


def test_native_aeron_ingress_and_sink_score_every_tick_and_count_the_garbage(tmp_path):
    adir = _aeron_dir()
    n = 2000
    svc = sub = pub = None
    try:
        svc = Svc(tmp_path, (
            '[engine]\nloop = "native"\n'  # native_aeron_ingress: the default
            f'[sources.aeron]\nchannel = "aeron:ipc"\n[sinks.aeron]\nchannel = "aeron:ipc"\n'
            f'[aeron]\ndir = "{adir}"\n'
        ))
        aer = {"via": "aeron", "aeron_dir": adir}
        sub = _client("subscribe", {**aer, "channel": "aeron:ipc", "stream_id": 1002, "expect": n,
                                    "out": str(tmp_path / "sub.json")}, tmp_path, "sub")  # fmt: skip
        svc.wait_for(lambda s: s["sinks"]["aeron"]["connected"], 10)
        pub = _client("publish", {**aer, "channel": "aeron:ipc", "stream_id": 1001, "n": n, "garbage": True,
                                  "rate": 5000}, tmp_path, "pub")  # fmt: skip
        _finish(pub)
        _finish(sub)
        st = svc.status()
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(timeout=60) == 0, svc.log.read_text()
    finally:
        _kill_all(pub, sub)
        if svc is not None:
            svc.stop()
        shutil.rmtree(adir, ignore_errors=True)
    got = json.loads((tmp_path / "sub.json").read_text())
    assert got["count"] == n and got["seqs_sorted_contiguous"] and got["bad"] == [] and got["scores_ok"]
    assert st["loop"] == "native" and st["scores_out"] == n
    assert {k: v for k, v in st["rejected_by_reason"].items() if v} == GARBAGE_EXPECTED_AERON
    assert st["sinks"]["aeron"]["sent"] == n and st["drops"] == 0
    assert st["ingress"] == ["NativeAeronTickSource"] and st["messages_received"] >= n
    # the tick log was found, checked and touched ahead of the reader while idle
    touch = st["aeron"]["touch_ahead"]
    assert touch["state"] in ("touching", "done", "looking") and touch["pages"] > 0, touch


def test_aeron_udp_loopback_between_separate_media_drivers(tmp_path):
    adir = _aeron_dir()
    t_port, s_port = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_DGRAM)
    t_ch = f"aeron:udp?endpoint=127.0.0.1:{t_port}"
    s_ch = f"aeron:udp?endpoint=127.0.0.1:{s_port}"
    n = 2000
    svc = sub = pub = None
    try:
        svc = Svc(tmp_path, (
            '[engine]\npin = "none"\nidle = "backoff"\n'
            f'[sources.aeron]\nchannel = "{t_ch}"\n[sinks.aeron]\nchannel = "{s_ch}"\n'
            f'[aeron]\ndir = "{adir}"\n'
        ))
        # publisher and subscriber each run their own embedded driver: real UDP between drivers
        sub = _client("subscribe", {"via": "aeron", "embedded": True, "channel": s_ch, "stream_id": 1002,
                                    "expect": n, "out": str(tmp_path / "sub.json")}, tmp_path, "sub")
        svc.wait_for(lambda s: s["sinks"]["aeron"]["connected"], 20)
        pub = _client("publish", {"via": "aeron", "embedded": True, "channel": t_ch, "stream_id": 1001,
                                  "n": n, "rate": 10000}, tmp_path, "pub")
        _finish(pub)
        _finish(sub)
        st = svc.status()
    finally:
        _kill_all(pub, sub)
        if svc is not None:
            svc.stop()
        shutil.rmtree(adir, ignore_errors=True)
    got = json.loads((tmp_path / "sub.json").read_text())
    assert got["count"] == n and got["seqs_sorted_contiguous"] and got["in_order"] and got["bad"] == []
    assert st["ticks_in"] == n and st["scores_out"] == n and st["rejected"] == 0


# ------------------------------------------------------------------------------ graceful stop


def test_sigterm_mid_stream_exits_0_with_final_report_and_no_accepted_tick_unscored(tmp_path):
    svc = sub = pub = None
    n = 20_000
    try:
        svc = Svc(tmp_path, (
            '[engine]\npin = "none"\nidle = "yield"\n'
            f'[sources.zmq]\nendpoint = "ipc://{tmp_path}/ticks.ipc"\n'
            f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/scores.ipc"\n'
        ))
        sub = _client("subscribe", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/scores.ipc", "idle_s": 3.0,
                                    "out": str(tmp_path / "sub.json")}, tmp_path, "sub")
        svc.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] >= 1, 10)
        pub = _client("publish", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/ticks.ipc", "n": n,
                                  "rate": 4000, "garbage": True}, tmp_path, "pub")
        svc.wait_for(lambda s: s["scores_out"] >= 2000, 30)
        svc.proc.send_signal(signal.SIGTERM)
        code = svc.proc.wait(timeout=60)
        pub.kill()
        _finish(sub)
    finally:
        _kill_all(pub, sub)
        if svc is not None:
            svc.stop()
    log = svc.log.read_text()
    assert code == 0, log
    assert "stopped (SIGTERM)" in log and "final report" in log and "Traceback" not in log
    s = svc.summary()
    got = json.loads((tmp_path / "sub.json").read_text())
    assert 2000 <= s["scores"] < n  # stopped mid-stream
    assert s["ticks"] == s["scores"] + s["rejected"]  # every accepted tick was scored
    assert s["rejected_by_reason"] == GARBAGE_EXPECTED
    assert s["stop_reason"] == "SIGTERM" and s["errors"] == 0 and s["dropped"] == 0
    # ... and published: the subscriber got every score, seq 0 .. scores-1
    assert got["count"] == s["scores"] and got["first_seq"] == 0 and got["last_seq"] == s["scores"] - 1
    assert got["seqs_sorted_contiguous"] and got["in_order"]
    assert (svc.out / "latency.hgrm").exists() and (svc.out / "latency_raw.npz").exists()


def test_control_stop_replies_with_the_final_report_and_exits_0(tmp_path):
    svc = None
    try:
        svc = Svc(tmp_path, (
            '[engine]\npin = "none"\nidle = "sleep"\n'
            f'[sources.zmq]\nendpoint = "ipc://{tmp_path}/ticks.ipc"\n'
            f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/scores.ipc"\n'
        ))
        reply = request(svc.control, "stop", timeout_s=30)
        assert svc.proc.wait(timeout=30) == 0
    finally:
        if svc is not None:
            svc.stop()
    assert reply["ok"] and reply["command"] == "stop"
    assert reply["report"]["stop_reason"] == "control stop" and reply["report"]["ticks"] == 0
    assert json.loads((svc.out / "summary.json").read_text())["stop_reason"] == "control stop"
