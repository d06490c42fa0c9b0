"""Hot model reload: swapped in between two ticks, every tick scored, one version switch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from engine.agent import AgentRunner, BusySpinIdle
from engine.reload import ReloadAt, WatchModel
from engine.schema import N_REJECT_REASONS
from engine.scorer import ScoringAgent
from engine.wire import decode_score
from features.featureset import DEFAULT_FEATURE_SET
from features.kernels import compute_batch, new_state
from models.backend_choice import select_backend
from models.loader import default_model_path
from models.ort_backend import OrtBackend
from replay.generator import default_data_path
from replay.reader import read_ticks
from replay.source import ReplaySource
from tests.holding_source import HoldingSource

ROOT = Path(__file__).resolve().parents[1]
FS = DEFAULT_FEATURE_SET
A = default_model_path("int8")
B = default_model_path("fp32")


class _Capture:
    """Sink that decodes every published Score (test only: allocates per tick)."""

    def __init__(self) -> None:
        self.seq: list[int] = []
        self.version: list[str] = []
        self.score: list[float] = []

    def publish(self, topic, payload) -> bool:
        s = decode_score(bytes(payload))
        self.seq.append(s.seq)
        self.version.append(s.model_version)
        self.score.append(s.score)
        return True


@pytest.fixture(scope="module")
def ticks():
    return np.ascontiguousarray(read_ticks(default_data_path()).ticks[:30_000])


@pytest.fixture(scope="module")
def offline(ticks):
    """Offline predictions of both models on the accepted ticks, in seq order."""
    fstate, istate = new_state(3)
    X = np.empty((len(ticks), len(FS.names)), np.float32)
    flags = np.empty(len(ticks), np.int32)
    compute_batch(ticks, fstate, istate, FS.params_array(), X, flags, np.zeros(N_REJECT_REASONS, np.int64))
    X = X[flags >= 0]
    return {p: OrtBackend(p, FS).score_batch(X).astype(np.float64) for p in (A, B)}


def _run(ticks, first_kind, reload_kind, reload_path, at_seq=4000, speed=150.0):
    first = select_backend(first_kind, A, FS)
    src = HoldingSource(ticks, speed, hold_from=len(ticks) - 500)
    sink = _Capture()
    trigger = ReloadAt(at_seq, str(reload_path))
    agent = ScoringAgent(
        src, first.backend, [sink], ["ESZ6", "NQZ6", "CLF7"], FS.params_array(),
        recorder_capacity=len(ticks), backend_kind=reload_kind, feature_set=FS,
        triggers=[trigger], parity_X=first.parity_X,
    )
    src.agent = agent
    runner = AgentRunner(agent, BusySpinIdle(), pin_core=None, housekeeping_every=256)
    runner.run()
    assert runner.errors == 0
    return agent, sink, trigger.ticket


def _assert_one_clean_switch(agent, sink, ticket, offline, before, after, n_expected):
    info = f"{ticket!r}, scored {len(sink.seq)} of {n_expected}, agent.seq {agent.seq}"
    # every accepted tick scored, seq contiguous
    assert len(sink.seq) == n_expected == agent.seq, info
    assert sink.seq == list(range(n_expected)), info
    # versions switch exactly once, at the ticket's swap_seq
    v = np.array(sink.version)
    switches = np.flatnonzero(v[1:] != v[:-1]) + 1
    assert ticket.status == "swapped", info
    assert switches.tolist() == [ticket.swap_seq], info
    assert ticket.requested_seq >= 4000 and 4000 <= ticket.swap_seq < n_expected, info
    assert set(v[: ticket.swap_seq]) == {before.version}
    assert set(v[ticket.swap_seq:]) == {after}
    # scores before/after match each model's offline predictions
    s = np.array(sink.score)
    k = ticket.swap_seq
    assert np.max(np.abs(s[:k] - offline[A][:k])) < 1e-5, info
    assert np.max(np.abs(s[k:] - offline[B][k:])) < 1e-5, info


def test_reload_mid_replay_scores_every_tick_and_switches_version_once(ticks, offline):
    agent, sink, ticket = _run(ticks, "auto", "auto", B)
    new_version = onnx.load(str(B)).metadata_props
    after = {p.key: p.value for p in new_version}["tickscore.model_version"]
    _assert_one_clean_switch(agent, sink, ticket, offline, OrtBackend(A, FS), after, len(offline[A]))
    assert ticket.backend == "fused" and "parity ok" in ticket.message
    assert agent.backend.version == after


def test_reload_from_ort_to_fused_switches_the_runner_to_the_fused_do_work(ticks, offline):
    agent, sink, ticket = _run(ticks, "ort", "auto", B)
    after = OrtBackend(B, FS).version
    _assert_one_clean_switch(agent, sink, ticket, offline, OrtBackend(A, FS), after, len(offline[A]))
    assert ticket.backend == "fused"
    assert agent.do_work == agent._do_work_fused  # the runner re-read it after the swap


def test_model_of_another_feature_set_is_rejected_and_old_model_keeps_serving(ticks, offline, tmp_path):
    bad = tmp_path / "other_fs.onnx"
    m = onnx.load(str(B))
    for p in m.metadata_props:
        if p.key == "tickscore.feature_set_id":
            p.value = "l1.v1.000000000000"
    onnx.save(m, str(bad))
    agent, sink, ticket = _run(ticks, "auto", "auto", bad, speed=600.0)
    assert ticket.status == "rejected"
    assert "old model keeps serving" in ticket.message and "feature set" in ticket.message
    assert ticket.swap_seq is None
    assert set(sink.version) == {OrtBackend(A, FS).version}
    assert sink.seq == list(range(len(offline[A])))
    assert np.max(np.abs(np.array(sink.score) - offline[A])) < 1e-5


def test_a_tampered_model_keeping_the_original_version_is_refused(ticks, offline, tmp_path):
    """Issue: operable service, defect 2: a changed output bias must not score under the old version."""
    from onnx import numpy_helper

    bad = tmp_path / "tampered.onnx"
    m = onnx.load(str(A))
    bias = next(i for i in m.graph.initializer if i.name == "out_b")  # the output bias
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) - 1e4, "out_b"))  # every score ~0
    onnx.save(m, str(bad))  # metadata (with the original model_version) copied unchanged
    agent, sink, ticket = _run(ticks, "auto", "auto", bad, speed=600.0)
    assert ticket.status == "rejected" and "does not match the file's weights" in ticket.message, ticket
    assert set(sink.version) == {OrtBackend(A, FS).version}
    assert np.max(np.abs(np.array(sink.score) - offline[A])) < 1e-5


def test_reload_refuses_unreadable_and_oversized_files_alike_and_models_over_the_budget(ticks, tmp_path):
    """Issue: operable service, defect 8: bounded size, bounded cost, no file-existence probe."""
    import os

    from models.metadata import MAX_MODEL_BYTES

    first = select_backend("ort", A, FS)
    agent = ScoringAgent(ReplaySource(ticks[:10]), first.backend, [_Capture()], ["a", "b", "c"],
                         FS.params_array(), backend_kind="ort", max_model_call_us=1e-3)  # fmt: skip
    unreadable = tmp_path / "secret.onnx"
    unreadable.write_bytes(b"x")
    unreadable.chmod(0o000)
    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:  # sparse: no disk, no memory
        f.truncate(MAX_MODEL_BYTES + 1)
    answers = {}
    for path in (tmp_path / "missing.onnx", unreadable, tmp_path):
        t = agent.request_reload(str(path))
        assert t.wait(30) and t.status == "rejected"
        answers[path] = t.message.split(": ", 2)[-1]
    if not os.access(unreadable, os.R_OK):  # (root reads anything: then it is just not ONNX)
        assert len(set(answers.values())) == 1, answers  # missing, unreadable, a directory: one answer
    t = agent.request_reload(str(big))
    assert t.wait(30) and t.status == "rejected" and "over the 64 MiB limit" in t.message
    t = agent.request_reload(str(B))  # a valid model, but over this agent's 0.001 us budget
    assert t.wait(60) and t.status == "rejected" and "over the budget" in t.message, t.message
    assert agent.backend is first.backend


def test_missing_model_is_rejected_with_a_clear_message(ticks):
    first = select_backend("ort", A, FS)
    agent = ScoringAgent(ReplaySource(ticks[:10]), first.backend, [_Capture()], ["a", "b", "c"],
                         FS.params_array(), backend_kind="ort")
    t = agent.request_reload("/nonexistent/model.onnx")
    assert t.wait(30) and t.status == "rejected"
    assert "/nonexistent/model.onnx" in t.message and "no readable model file there" in t.message
    assert agent.backend is first.backend


def test_watch_model_requests_a_reload_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "live.onnx"
    shutil.copy(A, path)
    asked: list[str] = []

    class _Agent:
        def request_reload(self, p):
            asked.append(p)

    w = WatchModel(str(path), period_s=0.0)
    w(_Agent(), time.perf_counter_ns())
    assert asked == []
    tmp = tmp_path / "next.onnx"
    shutil.copy(B, tmp)
    tmp.replace(path)
    w(_Agent(), time.perf_counter_ns())
    assert asked == [str(path)]


_SUB = r"""
import json, sys, msgpack, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.SUB); s.setsockopt(zmq.RCVHWM, 0)
s.setsockopt(zmq.SUBSCRIBE, b""); s.connect(sys.argv[1]); print("ready", flush=True)
n = gaps = switches = 0; last_seq = -1; last_v = None; switch_seq = []; versions = []
while s.poll(4000 if n else 60000):
    topic, payload = s.recv_multipart(); m = msgpack.unpackb(payload)
    seq, v = m[2], m[7]
    gaps += seq != last_seq + 1; last_seq = seq; n += 1
    if v != last_v:
        if last_v is not None:
            switches += 1; switch_seq.append(seq)
        versions.append(v); last_v = v
json.dump({"n": n, "gaps": gaps, "switches": switches, "switch_seq": switch_seq,
           "versions": versions}, open(sys.argv[2], "w"))
"""


def test_cli_reload_at_with_a_subscriber_counting_versions_and_seq_gaps(tmp_path):
    endpoint = f"ipc://{tmp_path}/scores.ipc"
    sub = subprocess.Popen([sys.executable, "-c", _SUB, endpoint, str(tmp_path / "sub.json")],
                           stdout=subprocess.PIPE, text=True)
    assert sub.stdout.readline().strip() == "ready"
    try:
        run = subprocess.run(
            [sys.executable, "-m", "engine.cli", "replay", "--limit", "30000", "--speed", "100",
             "--publish", endpoint, "--wait-subscribers", "1", "--reload-at", f"2000={B}",
             "--out", str(tmp_path / "run"), "--no-progress", "--pin", "none"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 0, run.stderr
        sub.wait(timeout=60)
    finally:
        if sub.poll() is None:
            sub.kill()
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    got = json.loads((tmp_path / "sub.json").read_text())
    (reload,) = s["reloads"]
    assert reload["status"] == "swapped", reload["message"]
    assert got["n"] == s["scores"] and got["gaps"] == 0
    assert got["switches"] == 1 and got["switch_seq"] == [reload["swap_seq"]]
    assert got["versions"] == [s["model"]["version"], reload["version"]]
    assert s["model_version_final"] == reload["version"]
    assert "reload" in run.stdout and "swapped" in run.stdout


@pytest.mark.skipif(len(getattr(__import__("os"), "sched_getaffinity", lambda _: {0})(0)) < 2,
                    reason="needs two cores to keep the reload thread off the hot one")
def test_reload_thread_runs_off_the_hot_core(ticks):
    """A thread inherits its creator's affinity: the loader must move itself off the hot core."""
    import os
    import threading

    seen: dict = {}
    first = select_backend("ort", A, FS)

    def loader(path):
        seen["cpus"] = os.sched_getaffinity(0)
        return OrtBackend(path, FS)

    agent = ScoringAgent(
        ReplaySource(ticks[:10], None), first.backend, [_Capture()], ["ESZ6", "NQZ6", "CLF7"],
        FS.params_array(), backend_loader=loader,
    )
    allowed = os.sched_getaffinity(0)
    hot = max(allowed)
    box = {}

    def hot_thread():
        os.sched_setaffinity(0, {hot})  # what the runner does to the hot thread
        box["ticket"] = agent.request_reload(str(B))

    t = threading.Thread(target=hot_thread)
    t.start()
    t.join()
    deadline = time.monotonic() + 60
    while "cpus" not in seen and time.monotonic() < deadline:  # (the swap itself needs a running loop)
        time.sleep(0.01)
    assert seen.get("cpus") == allowed - {hot}, (seen, box["ticket"])
    assert box["ticket"].cpus == allowed - {hot}
