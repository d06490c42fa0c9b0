"""`tickscore publish`: a market file's ticks into a running service over ZeroMQ and Aeron."""

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import Svc, _aeron_dir

ROOT = Path(__file__).resolve().parents[1]


def _publish(*args, timeout=120):
    cmd = [sys.executable, "-m", "engine.cli", "publish", "--no-progress", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_publish_over_zmq_and_aeron_into_one_service_every_tick_scored(tmp_path):
    adir = _aeron_dir()
    ticks = f"ipc://{tmp_path}/ticks.ipc"
    svc = Svc(tmp_path, f'[engine]\npin = "none"\nidle = "backoff"\n'
                        f'[sources.zmq]\nendpoint = "{ticks}"\n[sources.aeron]\nchannel = "aeron:ipc"\n'
                        f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/scores.ipc"\n'
                        f'[aeron]\ndir = "{adir}"\n')
    try:
        # recorded times into a fresh service, then twice rebased after what it saw (asked
        # on --control), once over Aeron: all accepted
        runs = [
            _publish(ticks, "--limit", "300", "--rate", "max", "--keep-times", "--control", svc.control),
            _publish(ticks, "--limit", "300", "--rate", "5000", "--control", svc.control),
            _publish("aeron:ipc", "--aeron-dir", adir, "--limit", "200", "--rate", "max",
                     "--control", svc.control),
        ]
        for r in runs:
            assert r.returncode == 0, r.stderr[-2000:]
        assert "sent 300 ticks (CLF7, ESZ6, NQZ6)" in runs[0].stderr
        assert "sent 200 ticks" in runs[2].stderr
        st = svc.wait_for(lambda s: s["ticks_in"] >= 800)
        assert st["ticks_in"] == 800 and st["scores_out"] == 800 and st["rejected"] == 0
        # the recorded times again, now older than what the service saw: counted rejects
        r = _publish(ticks, "--limit", "100", "--rate", "max", "--keep-times", "--control", svc.control)
        assert r.returncode == 0, r.stderr[-2000:]
        st = svc.wait_for(lambda s: s["ticks_in"] >= 900)
        assert st["scores_out"] == 800 and st["rejected_by_reason"] == {"time_backwards": 100}
    finally:
        svc.stop()
        shutil.rmtree(adir, ignore_errors=True)  # the killed service's embedded driver left it


def test_publish_without_a_service_is_a_clear_error(tmp_path):
    r = _publish(f"ipc://{tmp_path}/nobody.ipc", "--connect-timeout", "1", "--control", "", timeout=60)
    assert r.returncode != 0
    assert "no service subscribed to the ticks" in r.stderr and "Traceback" not in r.stderr
    r = _publish(f"ipc://{tmp_path}/nobody.ipc", "--data", str(tmp_path / "missing.parquet"), timeout=60)
    assert r.returncode != 0 and "missing.parquet" in r.stderr and "Traceback" not in r.stderr
    crossed = tmp_path / "crossed.csv"  # every quote crossed: nothing acceptable to send
    crossed.write_text("ts,bid,ask\n1700000000000,101.0,100.0\n1700000000001,101.5,100.5\n")
    r = _publish(f"ipc://{tmp_path}/nobody.ipc", "--data", str(crossed), "--control", "",
                 "--map", "kind==quote,symbol==X,ts_event=ts,bid_px=bid,ask_px=ask,bid_sz==1,ask_sz==1",
                 timeout=60)
    assert r.returncode != 0 and "no acceptable ticks to send (rejected: crossed 2)" in r.stderr


def test_publish_refuses_a_file_the_running_service_cannot_score_and_warns_on_a_partial_fit(tmp_path):
    from replay.generator_l3 import write_l3, write_trades

    ticks = f"ipc://{tmp_path}/ticks.ipc"
    svc = Svc(tmp_path, f'[engine]\npin = "none"\nidle = "backoff"\n[sources.zmq]\nendpoint = "{ticks}"\n'
                        f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/scores.ipc"\n')
    try:
        l3 = write_l3(tmp_path / "l3.parquet", 500)
        r = _publish(ticks, "--data", str(l3), "--control", svc.control, "--connect-timeout", "5")
        assert r.returncode == 2
        assert "a 'l3' file but the service scores feature set l1." in r.stderr
        assert "risk_l3_int8.onnx" in r.stderr and "Traceback" not in r.stderr
        trades = write_trades(tmp_path / "trades.parquet", 200)  # the L1 model takes trades, in part
        r = _publish(ticks, "--data", str(trades), "--control", svc.control, "--rate", "max")
        assert r.returncode == 0, r.stderr[-2000:]
        assert "cannot compute" in r.stderr and "a 'trades' file" in r.stderr
        st = svc.wait_for(lambda s: s["ticks_in"] >= 200)
        assert st["shape"] == "l1" and st["scores_out"] == 200
    finally:
        svc.stop()


def test_service_takes_new_symbols_on_first_sight_up_to_max_instruments(tmp_path):
    import polars as pl

    from replay.generator import write_market

    data = write_market(tmp_path / "m.parquet", 400, symbols=["AAA", "BBB", "CCC", "DDD"])
    arrival = list(dict.fromkeys(pl.read_parquet(data)["symbol"].to_list()))
    ticks = f"ipc://{tmp_path}/ticks.ipc"
    svc = Svc(tmp_path, f'max_instruments = 3\n'
                        f'[engine]\npin = "none"\nidle = "backoff"\n[sources.zmq]\nendpoint = "{ticks}"\n'
                        f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/scores.ipc"\n', instruments=[arrival[-1]])
    try:
        r = _publish(ticks, "--data", str(data), "--control", svc.control, "--rate", "max")
        assert r.returncode == 0, r.stderr[-2000:]
        st = svc.wait_for(lambda s: s["ticks_in"] >= 400)
        # the listed symbol keeps id 0; the next two seen take ids 1, 2 in arrival order
        assert st["instruments"] == {arrival[-1]: 0, arrival[0]: 1, arrival[1]: 2}
        assert st["instrument_slots"] == 3
        full = st["rejected_by_reason"].get("instruments_full", 0)
        assert full > 0 and st["scores_out"] + full == 400
    finally:
        svc.stop()


def test_service_stop_says_when_its_linger_ran_out_on_scores_a_subscriber_never_took(tmp_path):
    from engine.control import request
    from tests.test_replay_integration import _STALLED_SUB  # a subscriber that never reads

    ticks, scores = f"ipc://{tmp_path}/ticks.ipc", f"ipc://{tmp_path}/scores.ipc"
    svc = Svc(tmp_path, f'[engine]\npin = "none"\nidle = "backoff"\n[sources.zmq]\nendpoint = "{ticks}"\n'
                        f'[sinks.zmq]\nendpoint = "{scores}"\nsndhwm = 0\nlinger_ms = 300\n')  # fmt: skip
    sub = subprocess.Popen([sys.executable, "-c", _STALLED_SUB, scores, "120"], stdout=subprocess.PIPE,
                           text=True)  # fmt: skip
    try:
        assert sub.stdout.readline().strip() == "ready"
        r = _publish(ticks, "--limit", "40000", "--rate", "max", "--control", svc.control)
        assert r.returncode == 0, r.stderr[-2000:]
        st = svc.wait_for(lambda s: s["scores_out"] + s["rejected"] >= 40000)
        assert st["scores_out"] > 30000 and st["drops"] == 0  # all queued for the stalled subscriber
        assert request(svc.control, "stop", timeout_s=30)["ok"]
        assert svc.proc.wait(timeout=30) == 0
    finally:
        sub.kill()
        svc.stop()
    log = svc.log.read_text()
    assert "a subscriber had not taken every Score when the 300 ms linger" in log, log[-3000:]
