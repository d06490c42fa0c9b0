"""`tickscore replay --via zmq|aeron`: publisher, service and subscriber in separate processes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from replay.wire_mode import match_scores

ROOT = Path(__file__).resolve().parents[1]

CONTRACT_KEYS = {
    "ticks", "scores", "dropped", "rejected", "wall_s", "throughput_tps", "latency_ns",
    "mode", "backend", "model", "data", "host",
}


def _replay(*args, timeout=300):
    cmd = [sys.executable, "-m", "engine.cli", "replay", "--no-progress", "--pin", "none", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_scores_are_matched_to_ticks_in_send_order_skipping_missing_and_foreign_ones():
    pub_inst = np.array([0, 1, 0, 2, 1], dtype=np.int32)
    pub_ts = np.array([10, 10, 20, 20, 30], dtype=np.int64)
    # tick 2 was rejected (no score), a foreign score (inst 2, ts 99) arrived in between
    sub_inst = np.array([0, 1, 2, 2, 1], dtype=np.int32)
    sub_ts = np.array([10, 10, 99, 20, 30], dtype=np.int64)
    ti, si = match_scores(pub_inst, pub_ts, sub_inst, sub_ts)
    assert ti.tolist() == [0, 1, 3, 4] and si.tolist() == [0, 1, 3, 4]
    same = match_scores(pub_inst, pub_ts, pub_inst, pub_ts)
    assert same[0].tolist() == same[1].tolist() == [0, 1, 2, 3, 4]


def _check_run(out: Path, mode: str, n: int) -> dict:
    from replay.report import load_run

    s = json.loads((out / "summary.json").read_text())
    assert CONTRACT_KEYS <= set(s)
    assert s["mode"] == mode
    assert s["ticks"] == n and s["scores"] == n and s["rejected"] == 0 and s["dropped"] == 0
    lat = s["latency_ns"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert s["model"]["version"] and s["backend"] in ("ort", "fused")
    raw = np.load(out / "latency_raw.npz")
    # one CLOCK_MONOTONIC across the three processes: every tick was sent no earlier than
    # intended, reached the service after it was sent, and the score arrived after it left
    assert (raw["t_in"] <= raw["t_sent"]).all()
    assert (raw["t_sent"] <= raw["t_svc_in"]).all()
    assert (raw["t_svc_in"] <= raw["t_svc_out"]).all() and (raw["t_svc_out"] <= raw["t_out"]).all()
    assert np.all(np.diff(raw["seq"]) == 1)  # scores of the run are contiguous in seq
    # `tickscore report` recomputes exactly the summary's numbers from the raw arrays
    run = load_run(out)
    assert run.summary_mismatches() == []
    assert (out / "latency.hgrm").read_text().count("Percentile") >= 1
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return s


@pytest.mark.parametrize("via", ["zmq", "aeron"])
def test_replay_over_the_wire_with_a_spawned_service_reports_wire_to_wire_latency(tmp_path, via):
    out = tmp_path / "run"
    n = 3000
    run = _replay("--via", via, "--limit", str(n), "--rate", "3000", "--warmup-ticks", "200",
                  "--out", str(out), "--idle", "backoff")
    assert run.returncode == 0, run.stderr[-3000:]
    s = _check_run(out, via, n)
    # wire-to-wire from the intended send time includes the service time
    assert s["latency_ns"]["p50"] >= s["service_time_ns"]["p50"]
    assert s["rate_tps"] == 3000 and s["service"] == "spawned"
    assert s["service_final"]["scores"] == n and s["service_final"]["stop_reason"] == "control stop"
    assert "wire (intended)" in run.stdout


def test_replay_over_the_wire_against_a_running_service_twice(tmp_path):
    from tests.conftest import Svc

    svc = Svc(tmp_path, (
        '[engine]\npin = "none"\nidle = "backoff"\n'
        f'[sources.zmq]\nendpoint = "ipc://{tmp_path}/ticks.ipc"\n'
        f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/scores.ipc"\n'
    ))
    try:
        n = 1500
        for k in range(2):  # the second run's ticks are not "backwards": event times are shifted
            out = tmp_path / f"run{k}"
            run = _replay("--via", "zmq", "--service-config", str(svc.cfg), "--limit", str(n),
                          "--rate", "3000", "--warmup-ticks", "100", "--out", str(out))
            assert run.returncode == 0, run.stderr[-3000:]
            s = _check_run(out, "zmq", n)
            assert s["service"] == str(svc.cfg)
            assert int(np.load(out / "latency_raw.npz")["seq"][0]) == k * n
        st = svc.status()
        assert st["scores_out"] == 2 * n and st["rejected"] == 0
    finally:
        svc.stop()


def test_replay_over_the_wire_reads_a_vendor_layout_with_the_map_flags(tmp_path):
    # a Tardis-style quotes file (microsecond times, vendor column names) sent through a real service
    n = 600
    rng = np.random.default_rng(7)
    mid = 100 + np.cumsum(rng.normal(0, 0.01, n)).round(2)
    ts = 1_598_918_400_000_000 + np.arange(n) * 1000
    lines = ["exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount"]
    lines += [f"venue,BTCUSDT,{t},{t + 150},{1 + i % 5},{m + 0.01:.2f},{m:.2f},{2 + i % 3}"
              for i, (t, m) in enumerate(zip(ts.tolist(), mid.tolist(), strict=True))]
    data = tmp_path / "quotes.csv"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    run = _replay("--via", "zmq", "--data", str(data), "--rate", "3000", "--warmup-ticks", "50",
                  "--map", "kind==quote,ts_event=timestamp,ts_recv=local_timestamp",
                  "--map", "bid_px=bid_price,bid_sz=bid_amount,ask_px=ask_price,ask_sz=ask_amount",
                  "--out", str(out), "--idle", "backoff")
    assert run.returncode == 0, run.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["ticks"] == n and s["scores"] == n and s["rejected"] == 0


def test_replay_over_the_wire_serves_an_l3_file_with_a_spawned_l3_service(tmp_path):
    data = tmp_path / "AAPL_2012-06-21_34200000_57600000_message_10.csv"
    data.write_text("34200.004241176,1,16113575,18,5853300,1\n34200.025552208,1,16120456,18,5859100,-1\n")
    run = _replay("--via", "zmq", "--data", str(data), "--map", "preset=lobster,ts_date=2012-06-21",
                  "--out", str(tmp_path / "run"), "--warmup-ticks", "0", timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["ticks"] == 2 and s["scores"] == 2  # the L3 model of the file's shape scored both adds
    assert s["model"]["version"].startswith("risk-int8-") and "Traceback" not in run.stderr


def test_replay_over_the_wire_to_a_service_that_is_not_running_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "service.toml"
    cfg.write_text(f'[control]\nendpoint = "tcp://127.0.0.1:{port}"\n')
    r = _replay("--via", "zmq", "--service-config", str(cfg), timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"does not answer on tcp://127.0.0.1:{port} (is it running?)" in r.stderr
    assert "Traceback" not in r.stderr
