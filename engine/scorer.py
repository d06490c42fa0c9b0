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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from engine.agent import Agent
from engine.schema import N_REJECT_REASONS, REJECT_NAMES, TICK_DTYPE
from engine.wire import Score, ScoreEncoder
from features.kernels import new_state as _l1_new_state
from features.kernels import update_tick as _l1_update_tick

__all__ = ["ScoringAgent", "LatencyRecorder"]


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
        self.seq = 0
        self.rejected_idx: list[int] = []
        self.progress = progress
        self.done = False
        self.model_version = backend.version
        self._bind()

    # -- wiring -------------------------------------------------------------------
    def _bind(self) -> None:
        """Cache bound methods/arrays used per tick (re-run after a model swap)."""
        self._x = self.backend.x_flat
        self._run = self.backend.run
        self._version = self.backend.version
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
        ticks = np.zeros(n, dtype=TICK_DTYPE)
        ticks["ts_event_ns"] = np.arange(n, dtype=np.int64) * 1_000_000
        ticks["kind"] = np.where(np.arange(n) % 3 == 2, 2, 1)
        ticks["bid_px"], ticks["ask_px"] = 100.0, 100.25
        ticks["bid_sz"], ticks["ask_sz"] = 5.0, 7.0
        ticks["price"], ticks["size"], ticks["side"] = 100.25, 1.0, 1
        fstate, istate = self.new_state(1)
        counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
        clock = time.perf_counter_ns
        update = self.update
        for i in range(n):
            t0 = clock()
            fl = update(ticks, i, fstate, istate, self.params, self._x, counters)
            s = self._run()
            self.encoder.encode(Score("W", i, i, t0, clock(), s, self._version, max(fl, 0)))
        self.backend.warmup()

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
        payload = self.encoder.encode(
            Score(self.symbols[inst], seq, src.ts_list[i], t_in, clock(), score, self._version, flags)
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
        t_model = clock()
        inst = src.inst_list[i]
        payload = self.encoder.encode(
            Score(self.symbols[inst], seq, src.ts_list[i], t_in, clock(), score, self._version, flags)
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

    def housekeeping(self, now_ns: int) -> None:
        """Report progress (off the per-tick path)."""
        if self.progress is not None:
            self.progress(self, now_ns)

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
