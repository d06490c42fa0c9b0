"""Duty-cycle agents in the style of Aeron/Agrona, and the runner that drives them.

An :class:`Agent` does a bounded amount of work per ``do_work()`` call and returns
how much it did; an :class:`IdleStrategy` decides what to do when that is 0.
:class:`AgentRunner` runs one agent on the *calling* thread (the process's main
thread, so signal handlers keep working): it pins the thread, warms the agent,
freezes the GC and loops until the agent is done or ``stop()`` is called.
Replay and the live service step the same agent, so replay measures the code that
runs live.  An exception from ``do_work`` goes to the error handler and a counter;
the loop keeps running.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.log import log

__all__ = [
    "Agent",
    "allowed_cpus",
    "IdleStrategy",
    "BusySpinIdle",
    "YieldIdle",
    "BackoffIdle",
    "SleepIdle",
    "make_idle",
    "IDLE_STRATEGIES",
    "PinResult",
    "pin_current_thread",
    "set_realtime_priority",
    "AgentRunner",
]



class Agent:
    """Base class: override :meth:`do_work`; the rest is optional."""

    role_name = "agent"
    #: Set by the agent when it has nothing more to do (e.g. a replay source is exhausted).
    done = False

    def on_start(self) -> None:
        """Prepare resources (called on the runner's thread before pinning)."""

    def warmup(self) -> None:
        """JIT-compile and exercise the hot path (called after pinning, before GC freeze)."""

    def do_work(self) -> int:
        """Do a bounded unit of work; return the amount done (0 = idle)."""
        raise NotImplementedError

    def housekeeping(self, now_ns: int) -> bool | None:
        """Periodic off-tick work (progress, stats); called every few thousand duty cycles.

        Return True when this call replaced the agent's ``do_work`` (e.g. a hot
        model reload swapped in a backend with another per-tick path): the
        runner then binds the new one.  Anything else keeps the bound method.
        """

    def keep_warm(self) -> bool:
        """Exercise the hot path on throwaway state while idle (``keep_warm_ns``); return whether it ran."""
        return False

    def on_close(self) -> None:
        """Release resources; called once, also after an error or a stop."""


class IdleStrategy:
    """What the loop does when ``do_work`` returned 0."""

    name = "idle"

    def idle(self) -> None:  # pragma: no cover - interface
        """Wait a little, according to the strategy."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget back-off state (called after work was done)."""


class BusySpinIdle(IdleStrategy):
    """Spin: lowest wake-up latency, burns the (pinned) core. Use only with a core to spare."""

    name = "busy-spin"

    def idle(self) -> None:
        """Return immediately."""


class YieldIdle(IdleStrategy):
    """Yield the CPU to another runnable thread (``sched_yield``)."""

    name = "yield"

    def idle(self) -> None:
        """Yield once."""
        os.sched_yield()


class BackoffIdle(IdleStrategy):
    """Spin, then yield, then sleep with exponential back-off up to ``max_park_ns``."""

    name = "backoff"

    def __init__(
        self,
        max_spins: int = 100,
        max_yields: int = 20,
        min_park_ns: int = 1_000,
        max_park_ns: int = 1_000_000,
    ) -> None:
        self.max_spins = max_spins
        self.max_yields = max_yields
        self.min_park_ns = min_park_ns
        self.max_park_ns = max_park_ns
        self.reset()

    def reset(self) -> None:
        """Restart from the spinning phase."""
        self._spins = 0
        self._yields = 0
        self._park_ns = self.min_park_ns

    def idle(self) -> None:
        """Advance one step of spin → yield → park."""
        if self._spins < self.max_spins:
            self._spins += 1
        elif self._yields < self.max_yields:
            self._yields += 1
            os.sched_yield()
        else:
            time.sleep(self._park_ns * 1e-9)
            self._park_ns = min(self._park_ns * 2, self.max_park_ns)


class SleepIdle(IdleStrategy):
    """Sleep a fixed period (lowest CPU use, highest wake-up latency)."""

    name = "sleep"

    def __init__(self, period_ns: int = 1_000_000) -> None:
        self.period_s = period_ns * 1e-9

    def idle(self) -> None:
        """Sleep one period."""
        time.sleep(self.period_s)


IDLE_STRATEGIES: dict[str, type[IdleStrategy]] = {
    "busy-spin": BusySpinIdle,
    "yield": YieldIdle,
    "backoff": BackoffIdle,
    "sleep": SleepIdle,
}


def make_idle(name: str) -> IdleStrategy:
    """Return a new idle strategy by name (``busy-spin``, ``yield``, ``backoff``, ``sleep``)."""
    try:
        return IDLE_STRATEGIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown idle strategy {name!r}; choose one of {sorted(IDLE_STRATEGIES)}"
        ) from None


def set_realtime_priority(priority: int | None) -> str:
    """Give the calling thread SCHED_FIFO at ``priority`` (1-99); return what happened.

    ``None`` or 0 leaves the scheduler alone.  Refusal (no privilege, no API) is
    reported in the returned message, never raised.  A busy-spinning FIFO thread
    owns its core: use it only with a core reserved for the hot loop.
    """
    if not priority:
        return "default scheduler"
    if not hasattr(os, "sched_setscheduler"):
        return "SCHED_FIFO not available on this OS; default scheduler"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (OSError, ValueError) as exc:
        return f"SCHED_FIFO {priority} refused ({exc}); default scheduler"
    return f"SCHED_FIFO priority {priority}"


@dataclass
class PinResult:
    """Outcome of a pinning request (never fatal: the OS may refuse)."""

    requested: int | None
    pinned: list[int] = field(default_factory=list)
    message: str = ""

    @property
    def ok(self) -> bool:
        """Return True when the thread runs only on the requested core."""
        return self.requested is not None and self.pinned == [self.requested]


def allowed_cpus() -> set[int]:
    """Cores the calling thread may run on (empty where the OS cannot say)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set()


def pin_current_thread(core: int | None) -> PinResult:
    """Pin the calling thread to ``core``; report (do not raise) if the OS refuses.

    ``None`` leaves the affinity alone and reports the current CPU set.  Threads
    created *after* this call inherit the affinity, so create helper threads
    (ZeroMQ I/O, Aeron driver) before pinning, or give them their own affinity.
    """
    if not hasattr(os, "sched_setaffinity"):
        return PinResult(core, [], "sched_setaffinity is not available on this OS")
    if core is None:
        return PinResult(None, sorted(os.sched_getaffinity(0)), "not pinned (no core requested)")
    allowed = os.sched_getaffinity(0)
    if core not in allowed:
        return PinResult(
            core,
            sorted(allowed),
            f"core {core} is not available (allowed: {sorted(allowed)}); running unpinned",
        )
    try:
        os.sched_setaffinity(0, {core})
    except OSError as exc:
        return PinResult(core, sorted(os.sched_getaffinity(0)), f"pinning refused: {exc}")
    return PinResult(core, sorted(os.sched_getaffinity(0)), f"pinned to core {core}")


def _default_error_handler(exc: BaseException) -> None:
    log("agent", f"error in agent loop (loop continues): {exc!r}", event="error", level=logging.ERROR)


class AgentInvoker:
    """Step an agent's duty cycle from the caller's own loop (Agrona's ``AgentInvoker``).

    :meth:`invoke` runs one ``do_work`` and handles an exception the way the
    runner does: count it, pass it to ``error_handler``, carry on; after
    ``max_errors`` it raises ``RuntimeError`` (the agent is broken, not the
    input).  The service's drain after a stop steps the agent through the
    runner's invoker, so both count into one ``errors``.
    """

    def __init__(self, agent: Agent, error_handler: Callable[[BaseException], None] = _default_error_handler,
                 max_errors: int = 1000) -> None:  # fmt: skip
        self.agent = agent
        self.error_handler = error_handler
        self.max_errors = max_errors
        self.errors = 0

    def invoke(self) -> int:
        """Run one duty cycle; return its work count (1 after a handled error: the input was consumed)."""
        try:
            return self.agent.do_work()
        except Exception as exc:  # noqa: BLE001 - error handler + counter, the caller's loop survives
            self.on_error(exc)
            return 1

    def on_error(self, exc: BaseException) -> None:
        """Count and hand on ``exc``; raise once ``max_errors`` is reached."""
        self.errors += 1
        self.error_handler(exc)
        if self.errors >= self.max_errors:
            raise RuntimeError(
                f"agent {self.agent.role_name!r} raised {self.errors} errors; giving up"
            ) from exc


class AgentRunner:
    """Run one agent on the calling thread: pin, warm up, freeze GC, duty-cycle loop.

    Parameters
    ----------
    agent : Agent
    idle : IdleStrategy
    pin_core : int or None
        Core for the hot thread; refused pinning is reported in ``pin``.
    freeze_gc : bool
        ``gc.collect(); gc.freeze(); gc.disable()`` before the loop, re-enabled after.
    housekeeping_every : int
        Duty cycles between ``agent.housekeeping`` calls (power of two); a cycle that did
        work counts as the amount it did (``do_work``'s return: ticks scored).
    error_handler : callable
        Receives exceptions raised by ``do_work``; ``errors`` counts them.
    max_errors : int
        After this many errors the runner gives up (the agent is broken, not the input).
    keep_warm_ns : int
        While idle, call ``agent.keep_warm()`` once per this many ns without work
        (0 = never).  A hot path left cold for a few hundred microseconds (the code,
        the model's weights, the branch predictors) runs its next tick several times
        slower; exercising it on throwaway state keeps the first real tick fast.
    """

    def __init__(
        self,
        agent: Agent,
        idle: IdleStrategy,
        *,
        pin_core: int | None = None,
        freeze_gc: bool = True,
        housekeeping_every: int = 4096,
        error_handler: Callable[[BaseException], None] = _default_error_handler,
        max_errors: int = 1000,
        rt_priority: int | None = None,
        keep_warm_ns: int = 0,
    ) -> None:
        if housekeeping_every & (housekeeping_every - 1):
            raise ValueError("housekeeping_every must be a power of two")
        self.agent = agent
        self.idle = idle
        self.pin_core = pin_core
        self.freeze_gc = freeze_gc
        self._hk_mask = housekeeping_every - 1
        #: error counting and handling, shared with callers that step the agent themselves
        self.invoker = AgentInvoker(agent, error_handler, max_errors)
        self.keep_warm_ns = max(0, int(keep_warm_ns))
        #: Calls of ``agent.keep_warm`` so far.
        self.warm_calls = 0
        self.running = False
        self.pin: PinResult | None = None
        self.rt_priority = rt_priority
        self.scheduler = "default scheduler"

    @property
    def errors(self) -> int:
        """Exceptions raised by ``do_work`` so far (in the loop and through :attr:`invoker`)."""
        return self.invoker.errors

    def stop(self) -> None:
        """Ask the loop to end after the current duty cycle (safe from a signal handler)."""
        self.running = False

    def run(self) -> None:
        """Start, loop until done or stopped, close.  Re-raises only start-up errors."""
        agent = self.agent
        agent.on_start()
        affinity_before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        try:
            self.pin = pin_current_thread(self.pin_core)
            agent.warmup()
            self.scheduler = set_realtime_priority(self.rt_priority)
            if self.freeze_gc:
                gc.collect()
                gc.freeze()
                gc.disable()
            self.running = True
            self._loop()
        finally:
            self.running = False
            if self.rt_priority and hasattr(os, "sched_setscheduler"):
                try:  # back to normal scheduling for reporting and teardown
                    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                except OSError:
                    pass
            if affinity_before is not None:
                # unpin: threads created later in this process (a next run's ZeroMQ I/O
                # thread, ...) must not inherit the hot core
                try:
                    os.sched_setaffinity(0, affinity_before)
                except OSError:
                    pass
            if self.freeze_gc:
                gc.enable()
                gc.unfreeze()
            agent.on_close()

    def _loop(self) -> None:
        agent = self.agent
        do_work = agent.do_work
        idle = self.idle.idle
        reset = self.idle.reset
        hk = agent.housekeeping
        every = self._hk_mask + 1
        clock = time.perf_counter_ns
        # housekeeping every ``every`` units: an idle cycle is one, a cycle that did work is as
        # many as it did (a native duty cycle scores a batch), so a batch loop is not a slower clock
        left = every
        idled = False
        warm_ns = self.keep_warm_ns
        keep_warm = agent.keep_warm
        warm_due = 0
        while self.running and not agent.done:
            try:
                while self.running and not agent.done:
                    worked = do_work()
                    if worked:
                        left -= worked
                        if idled:
                            reset()
                            idled = False
                    else:
                        left -= 1
                        if warm_ns:
                            now = clock()
                            if not idled:
                                warm_due = now + warm_ns
                            elif now >= warm_due:
                                if keep_warm():
                                    self.warm_calls += 1
                                warm_due = clock() + warm_ns
                        idle()
                        idled = True
                    if left <= 0:
                        left = every
                        if hk(clock()):  # True: the agent replaced do_work
                            do_work = agent.do_work
            except Exception as exc:  # noqa: BLE001 - error handler + counter, loop survives
                self.invoker.on_error(exc)
        hk(clock())
