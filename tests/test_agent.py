"""Agent runner: duty cycle, idle strategies, errors counted without killing the loop."""

import gc
import os

import pytest

from engine.agent import (
    Agent,
    AgentRunner,
    BackoffIdle,
    BusySpinIdle,
    make_idle,
    pin_current_thread,
)


class _CountingAgent(Agent):
    def __init__(self, n, fail_at=(), idle_every=0):
        self.n = n
        self.i = 0
        self.fail_at = set(fail_at)
        self.idle_every = idle_every
        self.idles = 0
        self.started = self.closed = self.warmed = False
        self.gc_enabled_in_loop = None
        self.hk_calls = 0

    def on_start(self):
        self.started = True

    def warmup(self):
        self.warmed = True

    def do_work(self):
        self.gc_enabled_in_loop = gc.isenabled()
        if self.idle_every and self.idles < self.idle_every:
            self.idles += 1
            return 0
        self.idles = 0
        i = self.i
        self.i += 1
        if i + 1 >= self.n:
            self.done = True
        if i in self.fail_at:
            raise ValueError(f"bad input {i}")
        return 1

    def housekeeping(self, now_ns):
        self.hk_calls += 1

    def on_close(self):
        self.closed = True


def test_exception_in_do_work_is_counted_and_the_loop_keeps_running():
    errors = []
    agent = _CountingAgent(100, fail_at=(3, 50))
    runner = AgentRunner(agent, BusySpinIdle(), error_handler=errors.append, freeze_gc=False)
    runner.run()
    assert agent.i == 100
    assert runner.errors == 2 and [str(e) for e in errors] == ["bad input 3", "bad input 50"]
    assert agent.started and agent.warmed and agent.closed


def test_runner_gives_up_after_max_errors_and_still_closes():
    agent = _CountingAgent(10_000, fail_at=range(10_000))
    runner = AgentRunner(agent, BusySpinIdle(), error_handler=lambda e: None, max_errors=5,
                         freeze_gc=False)
    with pytest.raises(RuntimeError, match="5 errors"):
        runner.run()
    assert agent.closed


def test_invoker_steps_the_agent_and_counts_errors_with_the_runner():
    errors = []
    agent = _CountingAgent(20, fail_at=[3, 7])
    runner = AgentRunner(agent, BusySpinIdle(), error_handler=errors.append, max_errors=3, freeze_gc=False)
    inv = runner.invoker
    assert [inv.invoke() for _ in range(6)] == [1] * 6  # an error counts as consumed input
    assert runner.errors == inv.errors == 1 and [str(e) for e in errors] == ["bad input 3"]
    runner.run()  # the loop counts into the same budget: the second error is the 2nd of 3
    assert runner.errors == 2 and agent.i == 20
    agent2 = _CountingAgent(10, fail_at=range(10))
    inv2 = AgentRunner(agent2, BusySpinIdle(), error_handler=lambda e: None, max_errors=2).invoker
    inv2.invoke()
    with pytest.raises(RuntimeError, match="2 errors"):
        inv2.invoke()


def test_gc_is_disabled_inside_the_loop_and_restored_after():
    agent = _CountingAgent(10)
    AgentRunner(agent, BusySpinIdle()).run()
    assert agent.gc_enabled_in_loop is False
    assert gc.isenabled()


def test_idle_strategy_runs_when_no_work_and_housekeeping_is_periodic():
    class _CountingIdle(BackoffIdle):
        idles = resets = 0

        def idle(self):
            self.idles += 1
            super().idle()

        def reset(self):
            self.resets += 1
            super().reset()

    agent = _CountingAgent(200, idle_every=3)  # 3 empty duty cycles before each unit of work
    idle = _CountingIdle(max_spins=1, max_yields=1, min_park_ns=1000, max_park_ns=2000)
    AgentRunner(agent, idle, housekeeping_every=64, freeze_gc=False).run()
    assert agent.i == 200
    assert idle.idles == 3 * 200  # once per empty duty cycle, never after work
    assert idle.resets >= 200  # back-off restarts after each unit of work
    assert agent.hk_calls >= 800 // 64


def test_stop_ends_the_loop_between_duty_cycles():
    class _Stopper(_CountingAgent):
        def do_work(self):
            if self.i == 10:
                runner.stop()
            return super().do_work()

    agent = _Stopper(1_000_000)
    runner = AgentRunner(agent, BusySpinIdle(), freeze_gc=False)
    runner.run()
    assert agent.i == 11


def test_unknown_idle_strategy_name_is_a_clear_error():
    with pytest.raises(ValueError, match="busy-spin"):
        make_idle("spinny")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity API")
def test_pinning_to_missing_core_is_reported_not_raised():
    before = os.sched_getaffinity(0)
    res = pin_current_thread(10_000)
    assert not res.ok and "not available" in res.message
    assert os.sched_getaffinity(0) == before


def test_refused_realtime_priority_is_reported_not_raised():
    from engine.agent import set_realtime_priority

    assert set_realtime_priority(None) == "default scheduler"
    msg = set_realtime_priority(500)  # out of range for SCHED_FIFO everywhere
    assert "refused" in msg or "not available" in msg


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity API")
def test_runner_restores_the_thread_affinity_after_the_run():
    before = os.sched_getaffinity(0)
    agent = _CountingAgent(10)
    AgentRunner(agent, BusySpinIdle(), pin_core=sorted(before)[-1], freeze_gc=False).run()
    assert os.sched_getaffinity(0) == before
