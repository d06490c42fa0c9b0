"""End to end: `tickscore replay` in one process, an independent ZeroMQ SUB in another."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBSCRIBER = ROOT / "tests" / "score_subscriber.py"

CONTRACT_KEYS = {
    "ticks", "scores", "dropped", "rejected", "wall_s", "throughput_tps", "latency_ns",
    "mode", "backend", "model", "data", "host",
}


def _tickscore(*args, timeout=300):
    cmd = [sys.executable, "-m", "engine.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _start_subscriber(endpoint, out, idle_s=3.0):
    proc = subprocess.Popen(
        [sys.executable, str(SUBSCRIBER), endpoint, str(out), str(idle_s)],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_subscriber_in_another_process_receives_every_score_with_contiguous_seq(tmp_path):
    endpoint = f"ipc://{tmp_path}/scores.ipc"
    sub_out = tmp_path / "sub.json"
    sub = _start_subscriber(endpoint, sub_out)
    try:
        run = _tickscore(
            "replay", "--limit", "30000", "--publish", endpoint, "--wait-subscribers", "1",
            "--out", str(tmp_path / "run"), "--no-progress", "--pin", "none",
        )
        assert run.returncode == 0, run.stderr
        sub.wait(timeout=60)
    finally:
        if sub.poll() is None:
            sub.kill()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    got = json.loads(sub_out.read_text())
    assert summary["dropped"] == 0
    assert summary["scores"] == summary["ticks"] - summary["rejected"]
    assert summary["zmq"]["drained"] is True and summary["zmq"]["sent"] == summary["scores"]
    assert got["bad"] == 0
    assert got["count"] == summary["scores"] > 0
    assert got["first_seq"] == 0 and got["last_seq"] == summary["scores"] - 1
    assert got["contiguous"]
    assert got["topics_match_instrument"]
    assert got["model_versions"] == [summary["model"]["version"]]
    assert 0.0 <= got["score_min"] <= got["score_max"] <= 1.0
    assert len(got["instruments"]) >= 3


def test_replay_out_dir_has_contract_summary_hgrm_and_plot(tmp_path):
    out = tmp_path / "run"
    run = _tickscore("replay", "--limit", "20000", "--publish", "none", "--out", str(out),
                     "--no-progress", "--pin", "none")
    assert run.returncode == 0, run.stderr
    s = json.loads((out / "summary.json").read_text())
    assert CONTRACT_KEYS <= set(s)
    assert set(s["latency_ns"]) == {"p50", "p90", "p99", "p999", "p9999", "max", "mean"}
    lat = s["latency_ns"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["p9999"]
    assert lat["p9999"] <= lat["max"] * 1.001  # histogram buckets are within 0.1 %
    # --backend auto (default): fused when supported and parity passes, else ort
    assert s["mode"] == "inprocess" and s["backend"] in ("ort", "fused")
    assert s["model"]["quantization"] == "int8-qdq"
    assert s["scores"] == 20000 - s["rejected"] and s["throughput_tps"] > 0
    assert s["data"]["rows"] == s["ticks"] == 20000  # --limit: the first N rows of the file
    hgrm = (out / "latency.hgrm").read_text()
    assert "Percentile" in hgrm and "#[Max" in hgrm
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the printed table shows the same p50 as the summary (µs, 2 decimals)
    assert f"{lat['p50'] / 1000:,.2f}" in run.stdout


def test_paced_replay_keeps_recorded_pace_and_reports_latency_from_intended_time(tmp_path):
    import numpy as np

    from replay.reader import read_ticks

    ticks = read_ticks(ROOT / "replay" / "default" / "market.parquet").ticks[:3000]
    span_s = (int(ticks["ts_event_ns"][-1]) - int(ticks["ts_event_ns"][0])) / 1e9
    speed = max(1.0, span_s / 1.5)  # about 1.5 s of wall time
    out = tmp_path / "paced"
    run = _tickscore("replay", "--limit", "3000", "--speed", f"{speed:.6f}", "--publish", "none",
                     "--out", str(out), "--no-progress", "--pin", "none", "--warmup-ticks", "100")
    assert run.returncode == 0, run.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["speed"] == pytest.approx(speed, rel=1e-5)
    # ticks were released at the recorded pace: the run lasted span/speed, not less
    assert s["wall_s"] == pytest.approx(span_s / speed, rel=0.05, abs=0.05)
    raw = np.load(out / "latency_raw.npz")
    intended = raw["intended"]
    rel_intended = (intended - intended[0]) / 1e9
    rel_events = (ticks["ts_event_ns"] - ticks["ts_event_ns"][0]) / 1e9 / speed
    assert np.allclose(rel_intended, rel_events, atol=1e-6)
    assert (raw["t_in"] >= intended).all()  # never released early
    corr = s["latency_from_intended_ns"]
    assert s["latency_ns"]["p50"] <= corr["p50"] < 50_000_000  # corrected is >= service, sane
    assert (out / "latency_intended.hgrm").exists()
    assert "from intended" in run.stdout


def test_missing_data_file_is_a_one_line_error_not_a_traceback(tmp_path):
    run = _tickscore("replay", "--data", str(tmp_path / "nope.parquet"), "--publish", "none")
    assert run.returncode == 2
    assert "nope.parquet" in run.stderr and "Traceback" not in run.stderr


def test_bad_speed_value_is_rejected_by_the_parser():
    run = _tickscore("replay", "--speed", "fast")
    assert run.returncode == 2 and "--speed" in run.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity API")
def test_pinning_to_a_core_that_does_not_exist_is_reported_not_fatal(tmp_path):
    run = _tickscore("replay", "--limit", "2000", "--publish", "none", "--pin", "999",
                     "--no-progress", "--json")
    assert run.returncode == 0, run.stderr
    s = json.loads(run.stdout)
    assert "core 999 is not available" in s["pin"]
    assert s["scores"] > 0


_STALLED_SUB = r"""
import sys, time, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.SUB); s.setsockopt(zmq.RCVHWM, 10)
s.setsockopt(zmq.RCVBUF, 4096); s.setsockopt(zmq.SUBSCRIBE, b""); s.connect(sys.argv[1])
print("ready", flush=True)
time.sleep(float(sys.argv[2]))   # never reads: a subscriber that has stalled
"""


def _replay_to_a_stalled_subscriber(tmp_path, *args):
    """Replay 40k rows to a subscriber that never reads; return the replay's summary and stderr."""
    endpoint = f"ipc://{tmp_path}/stalled.ipc"
    sub = subprocess.Popen([sys.executable, "-c", _STALLED_SUB, endpoint, "120"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert sub.stdout.readline().strip() == "ready"
        run = _tickscore("replay", "--limit", "40000", "--publish", endpoint, "--wait-subscribers", "1",
                         "--no-progress", "--pin", "none", "--json", *args, timeout=120)  # fmt: skip
    finally:
        sub.kill()
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout), run.stderr


def test_stalled_subscriber_costs_counted_drops_and_never_blocks_the_loop(tmp_path):
    s, _ = _replay_to_a_stalled_subscriber(tmp_path, "--hwm", "10")
    assert s["scores"] == 40000 - s["rejected"]  # every tick scored, none waited for the subscriber
    assert s["dropped"] > 0
    assert s["dropped"] < s["scores"]  # the first messages did fit in the queues
    assert s["zmq"]["drained"] is True  # the few queued went to the OS's socket buffer at close


def test_scores_still_queued_for_a_subscriber_when_the_linger_runs_out_are_reported_lost(tmp_path):
    """Unbounded queue (--hwm 0), a subscriber that stopped reading: the run cannot end with every
    Score delivered; it waits the linger (saying so), then says libzmq discarded the rest."""
    s, err = _replay_to_a_stalled_subscriber(tmp_path, "--hwm", "0", "--linger-ms", "1500")
    assert s["dropped"] == 0 and s["zmq"]["sent"] == s["scores"] > 30000  # all queued: none refused
    assert s["zmq"]["drained"] is False and s["zmq"]["linger_ms"] == 1500 and s["zmq"]["close_s"] >= 1.4
    assert "delivering the Scores still queued" in err and "(up to 1.5 s)" in err
    assert "libzmq discarded the rest" in err


def test_raw_send_skips_pyzmqs_python_wrapper_and_still_delivers_and_raises_again(tmp_path):
    """The per-tick send is the Cython ``zmq.backend.Socket.send``, with its behaviour."""
    import zmq

    from engine.zmq_io import raw_send

    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        pub.setsockopt(zmq.SNDHWM, 1)
        endpoint = f"ipc://{tmp_path}/raw.ipc"
        pub.bind(endpoint)
        send = raw_send(pub)
        assert send.__func__ is zmq.backend.Socket.send  # not zmq.Socket.send (the sugar)
        with pytest.raises(zmq.Again):  # no peer yet: NOBLOCK send refuses, as the wrapper did
            send(b"x", zmq.NOBLOCK)
        sub.connect(endpoint)
        send(b"topic", zmq.SNDMORE)
        send(b"payload", 0)
        assert sub.poll(5000)
        assert sub.recv_multipart() == [b"topic", b"payload"]
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()
