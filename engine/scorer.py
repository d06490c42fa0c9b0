"""The hot path: one tick in → features → model → Score published.

:class:`ScoringAgent` is the agent both the replay harness and the live service
run.  Per tick it makes one numba call (validate + feature update, writing the
model's preallocated input), one model call, one msgspec encode into a reused
buffer and one publish per sink; it reads the clock at ingress and after publish
returns and stores both into preallocated int64 rings.  Everything else
(histograms, progress, summaries) happens after the run or in ``housekeeping``.

Sources, sinks and backends are the protocols of :mod:`engine.ports`.  An
``ort`` backend costs two calls per tick (feature kernel, model); a ``fused``
backend (:class:`models.fused.FusedBackend`) validates, updates the features
and runs the model in ONE numba call, and the agent then uses
:meth:`ScoringAgent._do_work_fused` as its ``do_work``.

This module holds the hot path only: hot reload (:mod:`engine.reload`),
keep-warm (:mod:`engine.keep_warm`) and the latency rings (:mod:`engine.recorder`)
are mixed in or used from their own modules.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from engine.agent import Agent, allowed_cpus
from engine.keep_warm import KeepWarm, synthetic_ticks, throwaway_tick, warm_tick
from engine.native_loop import L_REJ_N, L_SEQ, L_TAP_N, NativeLoop, native_loop_refusal
from engine.ports import Backend, ScoreSink, TickSource
from engine.recorder import LatencyRecorder
from engine.reload import HotReload, ReloadTicket
from engine.schema import N_REJECT_REASONS, REJECT_NAMES
from engine.wire import SCORE_SCHEMA_ID, ScoreEncoder
from features.kernels import new_state as _l1_new_state
from features.kernels import update_tick as _l1_update_tick

__all__ = ["ScoringAgent", "MAX_RELOAD_TICKETS", "LOOPS", "NativeLoopUnavailable"]

#: ``loop`` choices: ``auto`` = native where the backend is fused and every sink has a compiled path
LOOPS = ("auto", "native", "python")


def _nothing(k: int) -> None:
    """``consumed`` of a source whose ``poll`` already handed the tick out."""


class NativeLoopUnavailable(ValueError):
    """``loop="native"`` was asked for a run the native loop cannot serve (the message says why)."""

#: Reload tickets kept (status, summary); older ones are forgotten.
MAX_RELOAD_TICKETS = 64


class ScoringAgent(HotReload, KeepWarm, Agent):
    """Score every tick a source yields and publish it to the sinks.

    Parameters
    ----------
    source : engine.ports.TickSource
    backend : engine.ports.Backend
        ``kind == "fused"`` backends also provide ``make_tick`` (:class:`engine.ports.FusedBackendPort`).
    sinks : sequence of engine.ports.ScoreSink
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
        backend or raise with a clear message.  Default: :func:`models.backend_choice.select_backend`
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
        reloaded model (default: :func:`models.backend_choice.parity_vectors`).
    max_model_call_us
        A reloaded model whose median call costs more is refused (default
        :data:`engine.config.DEFAULT_MAX_MODEL_CALL_US`).
    loop
        ``"native"``: one compiled call per duty cycle scores up to ``batch`` ticks
        (:mod:`engine.native_loop`; fused backend only, raises
        :class:`NativeLoopUnavailable` otherwise); ``"python"``: the per-tick Python
        path; ``"auto"`` (default): native where it can serve, else python (logged).
        After a hot reload to an ``ort`` backend the agent runs the python path.
    batch
        Ticks per native duty cycle at most.
    shard, epoch
        Written into every Score: the shard of a cluster this agent is (0 when not
        sharded) and the run's epoch (default: the wall clock now, ns), which a
        subscriber sees change when the process restarts.
    """

    role_name = "scorer"

    def __init__(
        self,
        source: TickSource,
        backend: Backend,
        sinks: Sequence[ScoreSink],
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
        max_model_call_us: float | None = None,
        loop: str = "auto",
        batch: int = 256,
        shard: int = 0,
        epoch: int | None = None,
    ) -> None:
        if loop not in LOOPS:
            raise ValueError(f"loop {loop!r}: choose one of {', '.join(LOOPS)}")
        self.loop_requested = loop
        self.batch = max(1, int(batch))
        #: the loop running now (``native`` / ``python``) and why python where native was possible
        self.loop = "python"
        self.loop_reason = ""
        self._native: NativeLoop | None = None
        self._bound = False
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
        self.shard = int(shard)
        self.epoch = time.time_ns() if epoch is None else int(epoch)
        self.progress = progress
        self.done = False
        self.model_version = backend.version
        self.backend_kind = backend_kind
        self.feature_set = feature_set
        self.backend_loader = backend_loader
        self.triggers = list(triggers)
        self.parity_X = parity_X
        if max_model_call_us is not None:
            self.max_model_call_us = float(max_model_call_us)
        #: the latest reload tickets (bounded: a service may take reloads for months)
        self.reloads: deque[ReloadTicket] = deque(maxlen=MAX_RELOAD_TICKETS)
        self._pending: ReloadTicket | None = None
        self._reloading: ReloadTicket | None = None
        self._reload_lock = threading.Lock()
        # cores this process may use, read before the runner pins the hot thread:
        # reload threads go to these minus the hot thread's own
        self._process_cpus = allowed_cpus()
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
        if b.kind == "fused":  # features + model in one numba call
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
        self._bind_loop()
        if len(self.sinks) == 1:
            self._publish = self.sinks[0].publish
        else:
            pubs = tuple(s.publish for s in self.sinks)

            def _fanout(topic, payload, _pubs=pubs):
                for p in _pubs:
                    p(topic, payload)

            self._publish = _fanout

    def _bind_loop(self) -> None:
        """Choose the native or the python duty cycle for the current backend and sinks."""
        first, self._bound = not self._bound, True
        python = self.loop_requested == "python"
        why = "--loop python" if python else native_loop_refusal(self.backend, self.sinks)
        if why is not None:
            # at start a refusal of an explicit "native" is an error; after a swap to an ort
            # model the python loop takes over (the reload was validated for it)
            if self.loop_requested == "native" and first:
                raise NativeLoopUnavailable(f"--loop native: {why}")
            if self._native is not None:
                self._native.sync_sink_counters()
            self._native = None
            self.loop, self.loop_reason = "python", why if first else f"{why} (after a model swap)"
            return
        if self._native is not None:  # a model swap: the sinks' counters carry over
            self._native.sync_sink_counters()
        nl = NativeLoop(self._tick, self.symbols, self._version, self.sinks, self.recorder)
        nl.seq = self.seq
        nl.set_origin(self.shard, self.epoch)
        src = self.source
        if hasattr(src, "window"):
            self._window, self._consumed = src.window, src.consumed
        else:  # a one-tick-at-a-time source: its poll is the window
            self._window, self._consumed = self._poll_window, _nothing
        self._native = nl
        self._ticks = None  # the first native call (re)reads the source's ticks and pacing
        self.do_work = self._do_work_native
        self.loop, self.loop_reason = "native", ""

    def name_instrument(self, inst: int, symbol: str) -> None:
        """Name instrument ``inst`` (a symbol seen first on the wire) in the Scores from now on."""
        self.symbols[inst] = symbol
        self.topics[inst] = symbol.encode()
        if self._native is not None:
            self._native.set_symbols(self.symbols, self._version)

    def warmup(self, n: int = 2_000) -> None:
        """Compile and exercise features, model and encoder on synthetic ticks.

        Uses throwaway state, so the run's state, counters and seq are untouched.
        Publishes nothing.
        """
        ticks = synthetic_ticks(n)
        fstate, istate = self.new_state(1)
        counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
        clock = time.perf_counter_ns
        update = self.update
        for i in range(n):
            t0 = clock()
            fl = update(ticks, i, fstate, istate, self.params, self._x, counters)
            s = self._run()
            self.encoder.encode_row((SCORE_SCHEMA_ID, "W", i, i, t0, clock(), s, self._version, max(fl, 0),
                                     self.shard, self.epoch))
        if self._tick is not None:
            warm_tick(self.backend, self.new_state, self.params, n)
        if self._native is not None:
            self._warm_native(n)
        self.backend.warmup()
        compile_receive = getattr(self.source, "compile_receive", None)  # the compiled live sources
        if compile_receive is not None:
            compile_receive()

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
            src.on_reject(i)
            return 1
        seq = self.seq
        if not seq & self._stage_mask:
            return self._do_work_sampled(src, i, t_in, flags, seq)
        score = self._run()
        inst = src.inst_list[i]
        payload = self._buf  # a Score, encoded as its (schema id, *fields) row
        self._encode_row(
            (SCORE_SCHEMA_ID, self.symbols[inst], seq, src.ts_list[i], t_in, clock(), score,
             self._version, flags, self.shard, self.epoch),
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
             self._version, flags, self.shard, self.epoch),
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
        address of a :class:`models.tick_kernels.TickContext`, held in ``self._tctx``).
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
            src.on_reject(i)
            return 1
        seq = self.seq
        if not seq & self._stage_mask:
            return self._finish_fused_sampled(src, i, t_in, flags, score, seq)
        inst = src.inst_list[i]
        payload = self._buf  # a Score, encoded as its (schema id, *fields) row
        self._encode_row(
            (SCORE_SCHEMA_ID, self.symbols[inst], seq, src.ts_list[i], t_in, clock(), score,
             self._version, flags, self.shard, self.epoch),
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

    def _do_work_native(self) -> int:
        """Native duty cycle: one compiled call scores every tick the source has ready, up to ``batch``.

        Each tick's latency is its own (clock at ingress or when its turn came, clock after
        its publish returned), recorded in the kernel; see :mod:`engine.native_loop`.
        """
        src = self.source
        start, stop = self._window(self.batch)
        if start >= stop:
            if src.done:
                self.done = True
            return 0
        nl = self._native
        if src.ticks is not self._ticks:  # a new buffer (chunk switch) or the first call
            self._native_rebind_source(src)
        k = nl.kernel(self._ctx, nl.addr, start, stop)
        self._consumed(k)
        L = nl.L
        if L[L_REJ_N]:
            for i in nl.take_rejects():
                src.on_reject(int(i))
        if L[L_TAP_N]:
            nl.drain_tap()
        self.seq = int(L[L_SEQ])
        return k

    def _poll_window(self, limit: int) -> tuple[int, int]:
        i = self.source.poll()
        return (i, i + 1) if i >= 0 else (0, 0)

    def _native_rebind_source(self, src) -> None:
        self._ticks = src.ticks
        self._tctx.set_ticks(src.ticks)
        nl = self._native
        pacing = src.pacing() if hasattr(src, "pacing") else None
        if pacing is None:
            nl.set_pacing(0, 0, 0.0, None)
        else:
            nl.set_pacing(*pacing)
        nl.set_ingress(getattr(src, "ingress_ns", None))

    def _warm_native(self, n: int) -> None:
        """Compile and run the native loop kernel on throwaway state (publishes nothing)."""
        ticks = synthetic_ticks(n)
        fstate, istate = self.new_state(1)
        counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
        tick, tctx = throwaway_tick(self.backend, fstate, istate, self.params, counters, ticks)
        nl = self._native.throwaway(tick)
        i = 0
        while i < n:
            i += nl.run(tctx.addr, i, min(n, i + self.batch))

    def on_close(self) -> None:
        """Fold the native loop's send counts into the sinks; reject an unswapped reload."""
        if self._native is not None:
            self._native.sync_sink_counters()
        super().on_close()

    def housekeeping(self, now_ns: int) -> bool:
        """Swap in a validated model, run reload triggers, report progress (off the per-tick path).

        Returns True when a swap replaced ``do_work`` (the runner rebinds it).
        """
        swapped = self._pending is not None
        if swapped:
            self._swap()
        if self._native is not None:
            self._native.sync_sink_counters()
        for trigger in self.triggers:
            trigger(self, now_ns)
        if self.progress is not None:
            self.progress(self, now_ns)
        return swapped

    # -- results ------------------------------------------------------------------
    def rejected_by_reason(self, all_reasons: bool = False) -> dict[str, int]:
        """Return reject counts by reason name (non-zero only, unless ``all_reasons``)."""
        return {
            REJECT_NAMES[r]: int(self.counters[r])
            for r in range(1, N_REJECT_REASONS)
            if all_reasons or self.counters[r]
        }

    @property
    def native_errors(self) -> int:
        """Internal errors the native loop counted (an instrument beyond the symbol table ...); 0 normally."""
        return self._native.errors if self._native is not None else 0

    @property
    def rejected(self) -> int:
        """Return the number of rejected ticks."""
        return int(self.counters[1:].sum())
