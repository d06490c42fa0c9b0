"""Hot model reload: tickets, triggers and the :class:`HotReload` mixin of the scoring agent.

:meth:`HotReload.request_reload` loads and validates a new model on a
background thread; the hot thread swaps it in between two ticks (in
``housekeeping``), so every Score's ``model_version`` changes at exactly one
``seq`` (the ticket's ``swap_seq``).  A model that fails validation is
rejected and the old one keeps serving.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.agent import allowed_cpus
from engine.config import DEFAULT_MAX_MODEL_CALL_US
from engine.keep_warm import warm_tick
from features.featureset import DEFAULT_FEATURE_SET
from models.backend_choice import select_backend
from models.metadata import MAX_MODEL_BYTES

__all__ = ["HotReload", "ReloadTicket", "ReloadAt", "WatchModel"]

#: GIL switch interval while a reload is prepared in the background (s).
_RELOAD_SWITCH_INTERVAL_S = 1e-4


@dataclass(eq=False)
class ReloadTicket:
    """Progress of one hot model reload (returned by :meth:`ScoringAgent.request_reload`).

    Attributes
    ----------
    path : str
        Model file requested.
    status : str
        ``"pending"`` (loading / validating / waiting for the swap), ``"swapped"``
        or ``"rejected"``.
    message : str
        Why it was rejected, or what was loaded (backend, parity).
    swap_seq : int or None
        First ``seq`` scored by the new model (every earlier seq by the old one).
    version : str or None
        ``model_version`` of the new model once loaded.
    backend : str or None
        Backend kind of the new model (``"ort"`` / ``"fused"``).
    requested_seq : int
        The agent's ``seq`` when the reload was requested.
    sha256 : str
        SHA-256 (hex) of the file, computed on the loading thread before it is read.
    cpus : set of int
        Cores the loading thread runs on: the process's cores minus the hot
        thread's (empty = left where it started).
    """

    path: str
    status: str = "pending"
    message: str = ""
    swap_seq: int | None = None
    version: str | None = None
    backend: str | None = None
    requested_seq: int = 0
    sha256: str = ""
    cpus: set[int] = field(default_factory=set)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _swapped: threading.Event = field(default_factory=threading.Event, repr=False)
    _new: Any = field(default=None, repr=False)
    _prepared: Any = field(default=None, repr=False)
    _old: Any = field(default=None, repr=False)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until swapped or rejected; return False on timeout (not from the hot thread)."""
        return self._done.wait(timeout)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready summary."""
        return {
            "path": self.path,
            "status": self.status,
            "message": self.message,
            "swap_seq": self.swap_seq,
            "version": self.version,
            "backend": self.backend,
            "requested_seq": self.requested_seq,
            "sha256": self.sha256,
        }

    def _reject(self, message: str) -> None:
        self.status = "rejected"
        self.message = message
        self._new = None
        self._done.set()
        self._swapped.set()


class ReloadAt:
    """Housekeeping trigger: request a reload of ``path`` once ``seq >= at_seq`` (replay)."""

    def __init__(self, at_seq: int, path: str) -> None:
        self.at_seq = int(at_seq)
        self.path = str(path)
        self.ticket: ReloadTicket | None = None

    def __call__(self, agent: HotReload, now_ns: int) -> None:
        if self.ticket is None and agent.seq >= self.at_seq:
            self.ticket = agent.request_reload(self.path)


class WatchModel:
    """Housekeeping trigger: reload ``path`` whenever its mtime/size changes.

    Checks with one ``os.stat`` at most every ``period_s`` (on the hot thread, in
    housekeeping).  Write the new model elsewhere and ``os.replace`` it onto
    ``path`` so a half-written file is never read.
    """

    def __init__(self, path: str, period_s: float = 0.5) -> None:
        self.path = str(path)
        self.period_ns = int(period_s * 1e9)
        self.tickets: list[ReloadTicket] = []
        self._next = 0
        self._sig = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def __call__(self, agent: HotReload, now_ns: int) -> None:
        if now_ns < self._next:
            return
        self._next = now_ns + self.period_ns
        sig = self._stat()
        if sig is not None and sig != self._sig:
            self._sig = sig
            self.tickets.append(agent.request_reload(self.path))


class HotReload:
    """Mixin of :class:`engine.scorer.ScoringAgent`: load, validate and swap a model while scoring.

    A reload is refused when the new model's median call costs more than
    ``max_model_call_us`` (a valid but huge model would slow every tick).

    Uses the agent's ``backend``, ``backend_loader``, ``backend_kind``,
    ``feature_set``, ``parity_X``, ``params``, state arrays, ``seq``, ``reloads``,
    ``_pending`` / ``_reloading`` / ``_reload_lock`` and ``_bind``.
    """

    max_model_call_us: float = DEFAULT_MAX_MODEL_CALL_US

    def request_reload(self, path: str) -> ReloadTicket:
        """Start loading ``path`` in the background; return its ticket at once.

        The new model is loaded and validated (feature set, fused-vs-ort parity
        when fused, finite scores, warm-up) on a background thread, then swapped
        in by the hot thread between two ticks (next ``housekeeping``).  While a
        reload is in flight a second request is rejected.  Non-blocking.
        """
        ticket = ReloadTicket(str(path), requested_seq=self.seq)
        self.reloads.append(ticket)
        with self._reload_lock:
            if self._reloading is not None:
                ticket._reject(
                    f"reload of {path} rejected: a reload of {self._reloading.path} is in progress"
                )
                return ticket
            self._reloading = ticket
        hot = allowed_cpus()  # the calling (hot) thread's cores
        ticket.cpus = self._process_cpus - hot  # empty: nowhere else to go
        threading.Thread(
            target=self._prepare_reload, args=(ticket,), name="tickscore-reload", daemon=True
        ).start()
        return ticket

    def _load_for_reload(self, path: str):
        if self.backend_loader is not None:
            return self.backend_loader(path)

        fs = self.feature_set if self.feature_set is not None else DEFAULT_FEATURE_SET
        if not np.array_equal(fs.params_array(), self.params):
            raise ValueError(f"the running feature parameters are not those of feature set {fs.id}")
        return select_backend(self.backend_kind, path, fs, parity_X=self.parity_X).backend

    def _prepare_reload(self, ticket: ReloadTicket) -> None:
        """Background thread: load, validate, warm up; hand over to the hot thread.

        While it runs, the interpreter's GIL switch interval is lowered (5 ms ->
        0.1 ms) so the hot thread waits at most ~0.1 ms when this thread holds
        the GIL (Python-level loading work); restored afterwards.
        """
        if ticket.cpus:  # off the hot core (a new thread inherits its creator's affinity)
            try:
                os.sched_setaffinity(0, ticket.cpus)
            except OSError:
                pass  # stays where it is: it only shares a core, it is still correct
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, _RELOAD_SWITCH_INTERVAL_S))
        try:
            self._prepare_reload_inner(ticket)
        finally:
            sys.setswitchinterval(interval)

    def _prepare_reload_inner(self, ticket: ReloadTicket) -> None:
        try:
            ticket.sha256 = _sha256(ticket.path)
            backend = self._load_for_reload(ticket.path)
            if backend.n_features != len(self._x):
                raise ValueError(
                    f"model has {backend.n_features} inputs, the running feature set has {len(self._x)}"
                )
            _check_scores(backend)
            prepared = None
            if backend.kind == "fused":
                warm_tick(backend, self.new_state, self.params, 2_000)
                prepared = backend.make_tick(self.fstate, self.istate, self.params, self.counters)
            backend.warmup()
            cost_us = _call_cost_us(backend)
            if cost_us > self.max_model_call_us:
                raise ValueError(f"one model call costs {cost_us:,.1f} us (median of {_COST_CALLS}), "
                                 f"over the budget of {self.max_model_call_us:,.0f} us per tick")  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - any failure rejects the reload
            with self._reload_lock:
                self._reloading = None
            ticket._reject(f"reload of {ticket.path} rejected, old model keeps serving: {exc}")
            return
        if ticket.status != "pending":  # the agent stopped meanwhile
            return
        ticket.version = backend.version
        ticket.backend = backend.kind
        parity = backend.parity
        ticket.message = f"loaded {backend.version} ({ticket.backend})" + (
            f"; {parity.describe()}" if parity is not None else ""
        )
        ticket._new = backend
        ticket._prepared = prepared
        self._pending = ticket  # the hot thread swaps it in at its next housekeeping
        ticket._swapped.wait()
        # Drop the old backend here, not on the hot thread (freeing a session takes time).
        ticket._old = None

    def _swap(self) -> None:
        """Hot thread, between two ticks: make the pending backend current."""
        ticket = self._pending
        self._pending = None
        ticket._old = self.backend
        self.backend = ticket._new
        self._prepared_tick = ticket._prepared
        ticket._new = ticket._prepared = None
        self._bind()
        ticket.swap_seq = self.seq
        ticket.status = "swapped"
        with self._reload_lock:
            self._reloading = None
        ticket._done.set()
        ticket._swapped.set()

    def on_close(self) -> None:
        """Reject a reload that could not be swapped in before the agent stopped."""
        t = self._pending or self._reloading
        if t is not None and t.status == "pending":
            self._pending = None
            t._reject(f"reload of {t.path} not swapped in: the agent stopped first")


_COST_CALLS = 200


def _sha256(path: str) -> str:
    """Return the SHA-256 (hex) of a model file ("" when unreadable or over the model size bound)."""
    try:
        if os.stat(path).st_size > MAX_MODEL_BYTES:
            return ""  # refused by the loader with its own message; never read whole
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return ""


def _call_cost_us(backend) -> float:
    """Return the median time of one ``backend.run()`` (µs), on the reload thread, input preserved."""
    t = np.empty(_COST_CALLS, dtype=np.int64)
    clock = time.perf_counter_ns
    run = backend.run
    for k in range(_COST_CALLS):
        t0 = clock()
        run()
        t[k] = clock() - t0
    return float(np.median(t)) / 1e3


def _check_scores(backend) -> None:
    """Raise if the backend gives non-finite or out-of-[0, 1] scores on probe rows."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, backend.n_features)).astype(np.float32) * 3.0
    s = np.asarray(backend.score_batch(X), dtype=np.float64)
    if not np.all(np.isfinite(s)) or s.min() < 0.0 or s.max() > 1.0:
        raise ValueError("model gives non-finite or out-of-range scores on probe inputs")
