"""Ctrl-C and SIGTERM on the one-shot commands: a replay reports what it scored, a writer leaves no file.

Real processes and real signals: each command runs as ``python -m engine.cli`` and gets the
signal once its progress line shows it is in its main loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from replay.latency import LatencyHistogram

ROOT = Path(__file__).resolve().parents[1]


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _signal_when(proc: subprocess.Popen, prefix: str, sig: int, timeout: float = 300.0) -> list[str]:
    """Send ``sig`` once a stderr line starts with ``prefix`` (the command's progress line)."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(prefix):
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(seen)
    else:
        pytest.fail(f"no {prefix!r} line before the process ended:\n{''.join(seen)}")
    out, err = proc.communicate(timeout=120)
    return [*seen, *err.splitlines(keepends=True), *out.splitlines(keepends=True)]


@pytest.mark.parametrize(("sig", "rc", "word", "chunked"), [
    (signal.SIGINT, 130, "interrupted", False),
    (signal.SIGTERM, 143, "terminated", True),
])  # fmt: skip
def test_a_stopped_replay_reports_the_ticks_it_scored(tmp_path, sig, rc, word, chunked):
    out = tmp_path / "run"
    # the default data paced in real time: hours, so it is stopped in its main loop
    extra = ["--chunk-rows", "50000"] if chunked else []
    proc = _start("replay", "--speed", "1", "--publish", "none", "--out", str(out), *extra)
    lines = _signal_when(proc, "replay ", sig)
    text = "".join(lines)
    assert proc.returncode == rc, text
    assert f"tickscore: {word}" in text and "stopped early" in text, text
    s = json.loads((out / "summary.json").read_text())
    assert s["interrupted"] is True
    assert 0 < s["scores"] <= s["ticks"] < 250_000  # the ticks taken before the stop, not the file's
    assert s["scores"] + s["rejected"] == s["ticks"]
    assert s["latency_count"] > 0 and s["latency_ns"]["p50"] > 0  # a short run: 10 % warm-up, not all
    assert (out / "latency.hgrm").stat().st_size > 0


@pytest.mark.parametrize(("sig", "rc", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGTERM, 143, "terminated")])
def test_a_stopped_wire_replay_reports_the_ticks_it_sent(tmp_path, sig, rc, word):
    """replay --via: the publisher stops, the scores in flight still count, the service is stopped."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # its own process group, as a shell's foreground job: Ctrl-C goes to the group
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "replay", "--via", "zmq", "--rate", "5000",
                             "--out", str(out)], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, process_group=0)  # fmt: skip
    seen, service = [], None
    for line in proc.stderr:  # 250,000 ticks at 5,000/s: stopped 3 s into the sending
        seen.append(line)
        if "spawned service pid" in line:
            service = int(line.split("spawned service pid ")[1].split()[0])
        if "sending 250,000 ticks" in line:
            time.sleep(3.0)
            if sig == signal.SIGINT:
                os.killpg(proc.pid, sig)  # the terminal's Ctrl-C: the coordinator's group only
            else:
                proc.send_signal(sig)
            break
    else:
        pytest.fail("".join(seen))
    o, e = proc.communicate(timeout=180)
    text = "".join(seen) + e + o
    assert proc.returncode == rc, text
    assert "stopping: the publisher stops sending" in text and f"tickscore: {word}" in text, text
    s = json.loads((out / "summary.json").read_text())
    assert s["interrupted"] is True and s["mode"] == "zmq"
    assert 0 < s["ticks"] < 250_000  # what was sent before the stop, not the file
    assert s["scores"] + s["rejected"] + s["dropped"] == s["ticks"]
    assert s["scores"] >= s["ticks"] - 5  # the scores in flight were waited for
    assert s["service_final"] is not None  # the spawned service was stopped by its control socket
    assert (out / "latency.hgrm").stat().st_size > 0
    with pytest.raises(ProcessLookupError):
        os.kill(service, 0)


def test_a_terminated_generate_leaves_no_file(tmp_path):
    out = tmp_path / "big.parquet"
    proc = _start("generate", "--events", "40000000", "--out", str(out))  # ~30 s: stopped well before
    text = "".join(_signal_when(proc, "generate ", signal.SIGTERM))
    assert proc.returncode == 143, text
    assert "tickscore: terminated" in text
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part


def test_rewarm_counts_the_warm_up_ticks_a_short_run_keeps():
    rng = np.random.default_rng(3)
    v = rng.integers(100, 50_000, 300).astype(np.int64)
    a = LatencyHistogram(warmup=200)  # fed in pieces, as the chunked replay does
    a.add(v[:50], 0)
    t_out = np.zeros(256, np.int64)  # a ring of 256 holding seqs 50..249
    t_in = np.zeros(256, np.int64)
    idx = np.arange(50, 250) & 255
    t_out[idx], t_in[idx] = v[50:250] + 7, 7
    a.add_ring(t_in, t_out, 255, 50, 250)
    a.add(v[250:], 250)
    assert a.count == 100
    a.rewarm(30)
    b = LatencyHistogram(warmup=30)
    b.add(v, 0)
    want = (270, float(v[30:].sum()), v[30:].min(), v[30:].max())
    assert (a.count, a.total, a.vmin, a.vmax) == (b.count, b.total, b.vmin, b.vmax) == want
    assert np.array_equal(a.counts, b.counts)
    a.rewarm(100)  # never more than before
    assert a.count == 270
