"""Keep-warm while idle: the runner exercises the hot path between ticks, and nothing live changes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine.agent import Agent, AgentRunner, BusySpinIdle
from engine.reload import ReloadAt
from engine.scorer import ScoringAgent
from engine.wire import decode_score
from features.featureset import DEFAULT_FEATURE_SET
from models.backend_choice import select_backend
from models.loader import default_model_path
from replay.generator import default_data_path
from replay.reader import read_ticks
from replay.source import ReplaySource
from tests.holding_source import HoldingSource

FS = DEFAULT_FEATURE_SET
A = default_model_path("int8")
B = default_model_path("fp32")
SYMBOLS = ["ESZ6", "NQZ6", "CLF7"]


class _IdleThenWork(Agent):
    """Idle (return 0) for ``idle_ns`` before each of ``n`` units of work; count keep_warm calls."""

    def __init__(self, n: int, idle_ns: int) -> None:
        self.n, self.idle_ns = n, idle_ns
        self.done_units = 0
        self.warm_calls_at: list[int] = []  # units done when keep_warm ran
        self._next = time.perf_counter_ns() + idle_ns

    def do_work(self) -> int:
        if time.perf_counter_ns() < self._next:
            return 0
        self.done_units += 1
        self.done = self.done_units >= self.n
        self._next = time.perf_counter_ns() + self.idle_ns
        return 1

    def keep_warm(self) -> bool:
        self.warm_calls_at.append(self.done_units)
        return True


def test_runner_keeps_the_agent_warm_only_while_idle_and_only_when_asked():
    agent = _IdleThenWork(5, idle_ns=3_000_000)
    runner = AgentRunner(agent, BusySpinIdle(), freeze_gc=False, keep_warm_ns=500_000)
    runner.run()
    calls = len(agent.warm_calls_at)
    assert runner.warm_calls == calls
    # 5 idle stretches of 3 ms at one call per >= 0.5 ms: at most 6 per stretch
    assert 5 <= calls <= 5 * 6, calls
    assert set(agent.warm_calls_at) <= set(range(5))  # never after the last unit

    off = _IdleThenWork(5, idle_ns=1_000_000)
    runner = AgentRunner(off, BusySpinIdle(), freeze_gc=False)  # default: off
    runner.run()
    assert off.warm_calls_at == [] and runner.warm_calls == 0


class _Capture:
    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def publish(self, topic, payload) -> bool:
        s = decode_score(bytes(payload))
        self.rows.append((topic, s.instrument, s.seq, s.ts_event_ns, s.score, s.model_version, s.flags))
        return True


@pytest.fixture(scope="module")
def ticks():
    t = np.ascontiguousarray(read_ticks(default_data_path()).ticks[:1500])
    # a few ticks the feature kernel rejects, so the counters are exercised too
    t["bid_px"][[100, 700]] = np.nan
    return t


def _run(ticks, kind: str, keep_warm_ns: int, *, triggers=(), model=A, reload_kind="auto"):
    choice = select_backend(kind, model, FS)
    sink = _Capture()
    # mean event gap ~13 ms; speed 30 -> ~0.4 ms of idle between ticks
    src = HoldingSource(ticks, 30.0, hold_from=600)
    agent = ScoringAgent(src, choice.backend, [sink], SYMBOLS,
                         FS.params_array(), recorder_capacity=len(ticks), backend_kind=reload_kind,
                         feature_set=FS, triggers=triggers, parity_X=choice.parity_X)
    src.agent = agent
    runner = AgentRunner(agent, BusySpinIdle(), pin_core=None, housekeeping_every=64,
                         keep_warm_ns=keep_warm_ns)
    runner.run()
    assert runner.errors == 0
    return agent, sink, runner


@pytest.mark.parametrize("kind", ["ort", "fused"])
def test_keep_warm_changes_no_score_no_state_and_no_counter(ticks, kind):
    cold, cold_sink, cold_runner = _run(ticks, kind, 0)
    warm, warm_sink, warm_runner = _run(ticks, kind, 50_000)
    assert cold_runner.warm_calls == 0
    assert warm_runner.warm_calls > 100  # it did run, many times
    assert warm._warm is not None and warm._warm["j"] > 0
    assert warm_sink.rows == cold_sink.rows  # same topics, seq, scores, versions, flags
    assert warm.seq == cold.seq == len(ticks) - 2
    assert np.array_equal(warm.counters, cold.counters) and warm.counters[1:].sum() == 2
    assert np.array_equal(warm.fstate, cold.fstate, equal_nan=True)
    assert np.array_equal(warm.istate, cold.istate)


def test_keep_warm_follows_a_hot_reload_to_the_new_model(ticks):
    trigger = ReloadAt(300, str(B))
    # fused -> ort: the warm context changes kind (ort reloads fast: no parity check)
    agent, sink, runner = _run(ticks, "fused", 50_000, triggers=[trigger], reload_kind="ort")
    ticket = trigger.ticket
    assert ticket.status == "swapped", ticket
    versions = [r[5] for r in sink.rows]
    k = ticket.swap_seq
    assert len(set(versions[:k])) == 1 and set(versions[k:]) == {agent.backend.version}
    assert [r[2] for r in sink.rows] == list(range(len(sink.rows)))
    # the next warm call (if the replay ended before an idle moment) rebuilds the warm
    # context for the swapped-in backend and changes nothing live
    seq, counters = agent.seq, agent.counters.copy()
    agent.keep_warm()
    assert agent._warm["backend"] is agent.backend
    assert agent.seq == seq and np.array_equal(agent.counters, counters)
    # scores after the swap equal a run that used the new model from the start
    assert agent._tick is None  # the ort path, warmed by the ort branch of keep_warm
    ref_agent, ref_sink, _ = _run(ticks, "ort", 0, model=B)
    assert [r[4] for r in sink.rows[k:]] == pytest.approx([r[4] for r in ref_sink.rows[k:]], abs=1e-6)


def test_keep_warm_stands_aside_while_a_reload_is_validated(ticks):
    """Keep-warm's GIL round trips made each nogil call of the validation thread wait (~25x slower)."""
    import threading

    from models.ort_backend import OrtBackend
    from replay.source import ReplaySource

    gate = threading.Event()

    def loader(path):
        gate.wait(30)
        return OrtBackend(path, FS)

    choice = select_backend("ort", A, FS)
    agent = ScoringAgent(ReplaySource(ticks[:10], None), choice.backend, [_Capture()], SYMBOLS,
                         FS.params_array(), backend_loader=loader, feature_set=FS)
    assert agent.keep_warm() is True
    ticket = agent.request_reload(str(B))
    j = agent._warm["j"]
    assert agent.keep_warm() is False and agent._warm["j"] == j  # validating: nothing ran
    gate.set()
    deadline = time.monotonic() + 60
    while ticket.status == "pending" and time.monotonic() < deadline:
        agent.housekeeping(time.perf_counter_ns())  # the swap happens here, between two ticks
        time.sleep(0.005)
    assert ticket.status == "swapped", ticket.message
    assert agent.keep_warm() is True and agent._warm["backend"] is agent.backend


class _RawCapture:
    def __init__(self) -> None:
        self.payloads: list[tuple[bytes, bytes]] = []

    def publish(self, topic, payload) -> bool:
        self.payloads.append((bytes(topic), bytes(payload)))
        return True


@pytest.mark.parametrize("kind", ["ort", "fused"])
def test_the_inlined_and_the_stage_sampled_publish_paths_send_the_same_bytes(ticks, kind):
    """do_work / _do_work_fused inline _finish_sampled's publish on purpose: they must agree byte for byte."""
    from engine.wire import ScoreEncoder

    runs = {}
    for stage_every in (1, 1 << 20):  # every tick through the sampled path / all but seq 0 inlined
        choice = select_backend(kind, A, FS)
        sink = _RawCapture()
        agent = ScoringAgent(ReplaySource(ticks), choice.backend, [sink], SYMBOLS, FS.params_array(),
                             recorder_capacity=len(ticks), stage_every=stage_every, feature_set=FS,
                             backend_kind=kind, parity_X=choice.parity_X)  # fmt: skip
        AgentRunner(agent, BusySpinIdle(), pin_core=None, freeze_gc=False).run()
        runs[stage_every] = sink.payloads
    sampled, inlined = runs[1], runs[1 << 20]
    assert len(sampled) == len(inlined) == len(ticks) - 2
    enc = ScoreEncoder()
    for k, ((t1, p1), (t2, p2)) in enumerate(zip(sampled, inlined, strict=True)):
        s1, s2 = decode_score(p1), decode_score(p2)
        assert t1 == t2 and s1.instrument.encode() == t1, k
        # equal apart from the two clock readings and the run's epoch; each payload is the canonical encoding
        assert s1.epoch != s2.epoch  # two runs
        assert s1.__replace__(ts_in_ns=0, ts_out_ns=0, epoch=0) == s2.__replace__(ts_in_ns=0, ts_out_ns=0,
                                                                                 epoch=0), k
        assert bytes(enc.encode(s1)) == p1 and bytes(enc.encode(s2)) == p2, k


def test_warmup_compiles_a_live_source_s_receive_before_the_first_poll(ticks):
    """The compiled live sources' receive kernel is compiled (or loaded from numba's cache) in
    the agent's warm-up, before ``ready``: cold, the first poll took ~0.4 s in the hot loop."""

    class _Compiled(ReplaySource):
        compiled = 0

        def compile_receive(self) -> None:
            self.compiled += 1

    src = _Compiled(ticks[:10], None)
    choice = select_backend("fused", A, FS)
    agent = ScoringAgent(src, choice.backend, [], SYMBOLS, FS.params_array(), feature_set=FS)
    assert src.compiled == 0
    agent.warmup(200)
    assert src.compiled == 1 and agent.seq == 0
