"""The hot path: one tick in → features → model → Score published.

:class:`ScoringAgent` is the agent both the replay harness and the live service
run.  Per tick it makes one numba call (validate + feature update, writing the
model's preallocated input), one model call, one msgspec encode into a reused
buffer and one publish per sink; it reads the clock at ingress and after publish
returns and stores both into preallocated int64 rings.  Everything else
(histograms, progress, summaries) happens after the run or in ``housekeeping``.

Source protocol (duck-typed, see :mod:`replay.source` and the network sources):

* ``poll() -> int``: index of the next tick in ``source.ticks`` (TICK_DTYPE), or -1
  if none is ready now; sets ``source.done`` when exhausted for good.
* ``ticks``: the TICK_DTYPE buffer ``poll`` indexes into.
* ``inst_list`` / ``ts_list``: Python ints (instrument id, ts_event_ns) for the same
  indices, so the hot path never boxes numpy scalars.

Backends: an ``ort``-style backend (``x_flat``, ``run()``) costs two calls per tick
(feature kernel, model).  A backend with a ``tick`` kernel (:class:`models.fused.FusedBackend`)
validates, updates the features and runs the model in ONE numba call; the agent
then uses :meth:`ScoringAgent._do_work_fused` as its ``do_work``.

Hot reload: :meth:`ScoringAgent.request_reload` loads and validates a new model on a
background thread; the hot thread swaps it in between two ticks (in
``housekeeping``), so every Score's ``model_version`` changes at exactly one ``seq``
(the ticket's ``swap_seq``).  A model that fails validation is rejected and the
old one keeps serving.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.agent import Agent
from engine.schema import N_REJECT_REASONS, REJECT_NAMES, TICK_DTYPE
from engine.wire import SCORE_SCHEMA_ID, ScoreEncoder
from features.featureset import DEFAULT_FEATURE_SET
from features.kernels import new_state as _l1_new_state
from features.kernels import update_tick as _l1_update_tick
from models.fused import TickContext, select_backend

__all__ = ["ScoringAgent", "LatencyRecorder", "ReloadTicket", "ReloadAt", "WatchModel"]

#: GIL switch interval while a reload is prepared in the background (s).
_RELOAD_SWITCH_INTERVAL_S = 1e-4


def _pow2(n: int) -> int:
    cap = 1
    while cap < max(n, 1):
        cap <<= 1
    return cap


class LatencyRecorder:
    """Preallocated int64 rings of ingress and publish-returned clock readings (ns).

    Index = ``seq & mask``.  For a replay the capacity covers every tick, so nothing
    wraps; a live service keeps the latest ``capacity`` ticks.

    Stage samples: every ``stage_every``-th scored tick (seq multiple of it) also
    records the clock after the feature kernel and after the model, into
    ``stage_t_features`` / ``stage_t_model`` at index ``(seq // stage_every) & stage_mask``.
    Sampled ticks take a sibling code path, so the common path pays one bit test.
    """

    def __init__(self, capacity: int, stage_every: int = 64) -> None:
        cap = _pow2(capacity)
        self.capacity = cap
        self.mask = cap - 1
        self.t_in = np.zeros(cap, dtype=np.int64)
        self.t_out = np.zeros(cap, dtype=np.int64)
        self.stage_every = _pow2(stage_every)
        self.stage_shift = self.stage_every.bit_length() - 1
        scap = _pow2(cap // self.stage_every + 1)
        self.stage_mask = scap - 1
        self.stage_t_features = np.zeros(scap, dtype=np.int64)
        self.stage_t_model = np.zeros(scap, dtype=np.int64)

    def stage_snapshot(self, n_recorded: int) -> dict[str, np.ndarray]:
        """Return the sampled stage timings (seq, t_in, t_features, t_model, t_out) in seq order."""
        seqs = np.arange(0, n_recorded, self.stage_every, dtype=np.int64)
        seqs = seqs[-(self.stage_mask + 1):]
        seqs = seqs[seqs >= n_recorded - self.capacity]
        k = (seqs >> self.stage_shift) & self.stage_mask
        r = seqs & self.mask
        return {
            "stage_seq": seqs,
            "stage_t_in": self.t_in[r].copy(),
            "stage_t_features": self.stage_t_features[k].copy(),
            "stage_t_model": self.stage_t_model[k].copy(),
            "stage_t_out": self.t_out[r].copy(),
        }

    def snapshot(self, n_recorded: int) -> tuple[np.ndarray, np.ndarray]:
        """Return copies of (t_in, t_out) in seq order for the last ``min(n, capacity)`` ticks."""
        n = min(n_recorded, self.capacity)
        start = n_recorded - n
        idx = (np.arange(start, n_recorded, dtype=np.int64)) & self.mask
        return self.t_in[idx].copy(), self.t_out[idx].copy()


def _allowed_cpus() -> set[int]:
    """Cores the calling thread may run on (empty where the OS cannot say)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set()


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

    def __call__(self, agent: ScoringAgent, now_ns: int) -> None:
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

    def __call__(self, agent: ScoringAgent, now_ns: int) -> None:
        if now_ns < self._next:
            return
        self._next = now_ns + self.period_ns
        sig = self._stat()
        if sig is not None and sig != self._sig:
            self._sig = sig
            self.tickets.append(agent.request_reload(self.path))


class ScoringAgent(Agent):
    """Score every tick a source yields and publish it to the sinks.

    Parameters
    ----------
    source
        Object following the source protocol above.
    backend
        Model backend: ``x_flat`` (float32 input written by the feature kernel),
        ``run() -> float``, ``warmup()``, ``version``.
    sinks
        Objects with ``publish(topic: bytes, payload) -> bool``.
    symbols
        Instrument id → symbol.
    params
        Feature-set parameter array (float64).
    recorder_capacity
        Ticks whose latencies are kept (replay: all of them).
    progress
        Optional ``callback(agent, now_ns)`` called from housekeeping.
    update, new_state
        Feature kernels of the feature set (default: the L1 set).  ``update`` has the
        signature of :func:`features.kernels.update_tick`; ``new_state(n)`` returns
        ``(fstate, istate)``.  Other feature sets (trade-only, L3 book) pass their own.
    backend_loader
        ``loader(path) -> backend`` used by :meth:`request_reload` (on a background
        thread): must load, validate (feature set, parity) and return a ready
        backend or raise with a clear message.  Default: :func:`models.fused.select_backend`
        with ``backend_kind`` and ``feature_set``.
    backend_kind
        ``"auto"`` / ``"ort"`` / ``"fused"`` for the default loader.
    feature_set
        The running feature set (default :data:`features.featureset.DEFAULT_FEATURE_SET`);
        a reloaded model must have been trained on it.
    triggers
        Callables ``trigger(agent, now_ns)`` run in housekeeping (e.g.
        :class:`ReloadAt`, :class:`WatchModel`).
    parity_X
        Feature vectors (float32 (n, F)) for the fused-vs-ort parity check of a
        reloaded model (default: :func:`models.fused.parity_vectors`).
    """

    role_name = "scorer"

    def __init__(
        self,
        source,
        backend,
        sinks: Sequence,
        symbols: Sequence[str],
        params: np.ndarray,
        *,
        recorder_capacity: int = 1 << 20,
        stage_every: int = 64,
        progress: Callable | None = None,
        update: Callable = _l1_update_tick,
        new_state: Callable = _l1_new_state,
        backend_loader: Callable[[str], Any] | None = None,
        backend_kind: str = "auto",
        feature_set: Any = None,
        triggers: Sequence[Callable] = (),
        parity_X: np.ndarray | None = None,
    ) -> None:
        self.source = source
        self.backend = backend
        self.sinks = list(sinks)
        self.symbols = list(symbols)
        self.topics = [s.encode() for s in self.symbols]
        self.params = np.ascontiguousarray(params, dtype=np.float64)
        self.update = update
        self.new_state = new_state
        self.fstate, self.istate = new_state(len(self.symbols))
        self.counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
        self.recorder = LatencyRecorder(recorder_capacity, stage_every)
        self._stage_mask = self.recorder.stage_every - 1
        self.encoder = ScoreEncoder()
        self._encode_row, self._buf = self.encoder.encode_row_into, self.encoder.buf
        self.seq = 0
        self.rejected_idx: list[int] = []
        self.progress = progress
        self.done = False
        self.model_version = backend.version
        self.backend_kind = backend_kind
        self.feature_set = feature_set
        self.backend_loader = backend_loader
        self.triggers = list(triggers)
        self.parity_X = parity_X
        self.reloads: list[ReloadTicket] = []
        self._pending: ReloadTicket | None = None
        self._reloading: ReloadTicket | None = None
        self._reload_lock = threading.Lock()
        # cores this process may use, read before the runner pins the hot thread:
        # reload threads go to these minus the hot thread's own
        self._process_cpus = _allowed_cpus()
        self._warm: dict | None = None
        self._bind()

    # -- wiring -------------------------------------------------------------------
    def _bind(self) -> None:
        """Cache bound methods/arrays used per tick and pick ``do_work`` (re-run after a swap)."""
        b = self.backend
        self._x = b.x_flat
        self._run = b.run
        self._version = b.version
        self.model_version = b.version
        if hasattr(b, "make_tick"):  # fused: features + model in one numba call
            prepared, self._prepared_tick = getattr(self, "_prepared_tick", None), None
            tick, tctx = prepared or b.make_tick(self.fstate, self.istate, self.params, self.counters)
            ticks = getattr(self.source, "ticks", None)
            if ticks is not None:
                tctx.set_ticks(ticks)
            self._tick, self._tctx, self._ctx = tick, tctx, tctx.addr
            self._ticks = ticks
            self.do_work = self._do_work_fused
        else:
            self._tick = None
            self.__dict__.pop("do_work", None)  # back to the class's ort path
        if len(self.sinks) == 1:
            self._publish = self.sinks[0].publish
        else:
            pubs = tuple(s.publish for s in self.sinks)

            def _fanout(topic, payload, _pubs=pubs):
                for p in _pubs:
                    p(topic, payload)

            self._publish = _fanout

    def warmup(self, n: int = 2_000) -> None:
        """Compile and exercise features, model and encoder on synthetic ticks.

        Uses throwaway state, so the run's state, counters and seq are untouched.
        Publishes nothing.
        """
        ticks = _synthetic_ticks(n)
        fstate, istate = self.new_state(1)
        counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
        clock = time.perf_counter_ns
        update = self.update
        for i in range(n):
            t0 = clock()
            fl = update(ticks, i, fstate, istate, self.params, self._x, counters)
            s = self._run()
            self.encoder.encode_row((SCORE_SCHEMA_ID, "W", i, i, t0, clock(), s, self._version, max(fl, 0)))
        if self._tick is not None:
            _warm_tick(self.backend, self.new_state, self.params, n)
        self.backend.warmup()

    # -- keeping the path warm while idle -----------------------------------------
    _WARM_TICKS = 4096

    def _prepare_warm(self) -> None:
        """Build the throwaway ticks, state and buffers :meth:`keep_warm` runs on."""
        ticks = _synthetic_ticks(self._WARM_TICKS)
        fstate, istate = self.new_state(1)
        counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
        w = {"ticks": ticks, "fstate": fstate, "istate": istate, "counters": counters,
             "x": np.zeros_like(self._x), "buf": bytearray(), "j": 0, "backend": self.backend}
        if self._tick is not None:
            w["tick"], w["tctx"] = _throwaway_tick(self.backend, fstate, istate, self.params, counters, ticks)
        self._warm = w

    def keep_warm(self) -> bool:
        """Run one synthetic tick through features, model and encoder; touch nothing live.

        Called by the runner while idle (``keep_warm_ns``).  Features go to
        throwaway state and a scratch input row; the ort backend's model runs on its
        bound input (the last tick's features, unchanged: a real tick rewrites it
        before scoring); the fused kernel runs on a throwaway context; the Score is
        encoded into a scratch buffer.  Nothing is published and no counter moves.
        Returns whether it ran: not while a reload is being validated.

        During a reload the validation thread runs thousands of short GIL-releasing
        calls (the fused tick check).  A keep-warm call releases the GIL too (nogil
        kernel, onnxruntime) and then claims it back, so every one of those calls
        waited a switch interval: a reload took ~10 s instead of ~0.4 s (`--reload-at`
        at 40x speed: swapped 53k ticks after the request instead of 2.4k).
        """
        if self._reloading is not None:
            return False
        w = self._warm
        if w is None or w["backend"] is not self.backend:  # first call, or a model was swapped in
            self._prepare_warm()
            w = self._warm
        j = w["j"]
        if j == self._WARM_TICKS:  # the warm ticks' times would go backwards: fresh state
            fstate, istate = self.new_state(1)
            w["fstate"][:] = fstate
            w["istate"][:] = istate
            j = 0
        w["j"] = j + 1
        if self._tick is not None:
            flags, score = w["tick"](j, w["tctx"].addr)
        else:
            flags = self.update(w["ticks"], j, w["fstate"], w["istate"], self.params, w["x"], w["counters"])
            score = self._run()
        self._encode_row((SCORE_SCHEMA_ID, "W", j, j, j, j, score, self._version, max(flags, 0)), w["buf"])
        return True

    # -- hot path -----------------------------------------------------------------
    def do_work(self) -> int:
        """Process at most one tick; return 1 if one was consumed, else 0. Allocates: no arrays."""
        src = self.source
        i = src.poll()
        if i < 0:
            if src.done:
                self.done = True
            return 0
        clock = time.perf_counter_ns
        t_in = clock()
        flags = self.update(src.ticks, i, self.fstate, self.istate, self.params, self._x, self.counters)
        if flags < 0:
            self.rejected_idx.append(i)
            return 1
        seq = self.seq
        if not seq & self._stage_mask:
            return self._do_work_sampled(src, i, t_in, flags, seq)
        score = self._run()
        inst = src.inst_list[i]
        payload = self._buf  # a Score, encoded as its (schema id, *fields) row
        self._encode_row(
            (SCORE_SCHEMA_ID, self.symbols[inst], seq, src.ts_list[i], t_in, clock(), score,
             self._version, flags),
            payload,
        )
        self._publish(self.topics[inst], payload)
        t_out = clock()
        rec = self.recorder
        k = seq & rec.mask
        rec.t_in[k] = t_in
        rec.t_out[k] = t_out
        self.seq = seq + 1
        return 1

    def _do_work_sampled(self, src, i: int, t_in: int, flags: int, seq: int) -> int:
        """Finish a stage-sampled tick: same work as do_work plus two clock reads."""
        clock = time.perf_counter_ns
        t_feat = clock()
        score = self._run()
        return self._finish_sampled(src, i, t_in, t_feat, clock(), flags, score, seq)

    def _finish_sampled(
        self, src, i: int, t_in: int, t_feat: int, t_model: int, flags: int, score: float, seq: int
    ) -> int:
        """Publish and record a stage-sampled tick (1 in ``stage_every``; both backends).

        The per-tick paths (:meth:`do_work`, :meth:`_do_work_fused`) inline the same
        publish-and-record steps on purpose: a Python call per tick is the main cost.
        """
        clock = time.perf_counter_ns
        inst = src.inst_list[i]
        payload = self._buf  # a Score, encoded as its (schema id, *fields) row
        self._encode_row(
            (SCORE_SCHEMA_ID, self.symbols[inst], seq, src.ts_list[i], t_in, clock(), score,
             self._version, flags),
            payload,
        )
        self._publish(self.topics[inst], payload)
        t_out = clock()
        rec = self.recorder
        k = seq & rec.mask
        rec.t_in[k] = t_in
        rec.t_out[k] = t_out
        j = (seq >> rec.stage_shift) & rec.stage_mask
        rec.stage_t_features[j] = t_feat
        rec.stage_t_model[j] = t_model
        self.seq = seq + 1
        return 1

    def _do_work_fused(self) -> int:
        """Fused path of :meth:`do_work`: one numba call validates, updates features and scores.

        The kernel reads the tick, state and model through ``self._ctx`` (the
        address of a :class:`models.fused.TickContext`, held in ``self._tctx``).
        The state arrays must be reset in place, never rebound.  Allocates: no arrays
        (the kernel returns a ``(flags, score)`` tuple).
        """
        src = self.source
        i = src.poll()
        if i < 0:
            if src.done:
                self.done = True
            return 0
        clock = time.perf_counter_ns
        t_in = clock()
        if src.ticks is not self._ticks:  # the source swapped its buffer (rare)
            self._ticks = src.ticks
            self._tctx.set_ticks(src.ticks)
        flags, score = self._tick(i, self._ctx)
        if flags < 0:
            self.rejected_idx.append(i)
            return 1
        seq = self.seq
        if not seq & self._stage_mask:
            return self._finish_fused_sampled(src, i, t_in, flags, score, seq)
        inst = src.inst_list[i]
        payload = self._buf  # a Score, encoded as its (schema id, *fields) row
        self._encode_row(
            (SCORE_SCHEMA_ID, self.symbols[inst], seq, src.ts_list[i], t_in, clock(), score,
             self._version, flags),
            payload,
        )
        self._publish(self.topics[inst], payload)
        t_out = clock()
        rec = self.recorder
        k = seq & rec.mask
        rec.t_in[k] = t_in
        rec.t_out[k] = t_out
        self.seq = seq + 1
        return 1

    def _finish_fused_sampled(self, src, i: int, t_in: int, flags: int, score: float, seq: int) -> int:
        """Stage-sampled fused tick: features and model are one call, so t_features = t_model."""
        t_model = time.perf_counter_ns()
        return self._finish_sampled(src, i, t_in, t_model, t_model, flags, score, seq)

    def housekeeping(self, now_ns: int) -> None:
        """Swap in a validated model, run reload triggers, report progress (off the per-tick path)."""
        if self._pending is not None:
            self._swap()
        for trigger in self.triggers:
            trigger(self, now_ns)
        if self.progress is not None:
            self.progress(self, now_ns)

    # -- hot model reload -------------------------------------------------------------
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
        hot = _allowed_cpus()  # the calling (hot) thread's cores
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
            backend = self._load_for_reload(ticket.path)
            if backend.n_features != len(self._x):
                raise ValueError(
                    f"model has {backend.n_features} inputs, the running feature set has {len(self._x)}"
                )
            _check_scores(backend)
            prepared = None
            if hasattr(backend, "make_tick"):
                _warm_tick(backend, self.new_state, self.params, 2_000)
                prepared = backend.make_tick(self.fstate, self.istate, self.params, self.counters)
            backend.warmup()
        except Exception as exc:  # noqa: BLE001 - any failure rejects the reload
            with self._reload_lock:
                self._reloading = None
            ticket._reject(f"reload of {ticket.path} rejected, old model keeps serving: {exc}")
            return
        if ticket.status != "pending":  # the agent stopped meanwhile
            return
        ticket.version = backend.version
        ticket.backend = getattr(backend, "kind", "ort")
        parity = getattr(backend, "parity", None)
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

    # -- results ------------------------------------------------------------------
    def rejected_by_reason(self) -> dict[str, int]:
        """Return reject counts by reason name (non-zero only)."""
        return {
            REJECT_NAMES[r]: int(self.counters[r])
            for r in range(1, N_REJECT_REASONS)
            if self.counters[r]
        }

    @property
    def rejected(self) -> int:
        """Return the number of rejected ticks."""
        return int(self.counters[1:].sum())


def _synthetic_ticks(n: int) -> np.ndarray:
    """Return ``n`` plain quotes and trades (1 ms apart, one instrument) for warm-up and keep-warm."""
    ticks = np.zeros(n, dtype=TICK_DTYPE)
    ticks["ts_event_ns"] = np.arange(n, dtype=np.int64) * 1_000_000
    ticks["ts_recv_ns"] = ticks["ts_event_ns"]
    ticks["kind"] = np.where(np.arange(n) % 3 == 2, 2, 1)
    ticks["bid_px"], ticks["ask_px"] = 100.0, 100.25
    ticks["bid_sz"], ticks["ask_sz"] = 5.0 + np.arange(n) % 7, 7.0
    ticks["price"], ticks["size"], ticks["side"] = 100.25, 1.0, 1
    return ticks


def _throwaway_tick(backend, fstate, istate, params, counters, ticks):
    """Return ``(tick, ctx)``: a fused backend's kernel over these arrays and a copy of its model arrays.

    The copy keeps the live model registers untouched.
    """
    tick, _ = backend.make_tick(fstate, istate, params, counters, ticks)
    mi, mf = backend.program.new_arrays()
    return tick, TickContext(fstate, istate, params, counters, mi, mf, ticks)


def _warm_tick(backend, new_state: Callable, params: np.ndarray, n: int) -> None:
    """Compile and exercise a fused backend's tick kernel on throwaway state and ticks."""
    fstate, istate = new_state(1)
    counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
    tick, tctx = _throwaway_tick(backend, fstate, istate, params, counters, _synthetic_ticks(n))
    for i in range(n):
        tick(i, tctx.addr)


def _check_scores(backend) -> None:
    """Raise if the backend gives non-finite or out-of-[0, 1] scores on probe rows."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, backend.n_features)).astype(np.float32) * 3.0
    s = np.asarray(backend.score_batch(X), dtype=np.float64)
    if not np.all(np.isfinite(s)) or s.min() < 0.0 or s.max() > 1.0:
        raise ValueError("model gives non-finite or out-of-range scores on probe inputs")
