"""Keeping the hot path warm: start-up warm-up helpers and the idle-time :class:`KeepWarm` mixin.

A hot path left cold for a few hundred microseconds (code, the model's weights,
branch predictors) runs its next tick several times slower.  :class:`KeepWarm`
gives :class:`engine.scorer.ScoringAgent` its ``keep_warm`` (run by the runner
while idle): one synthetic tick through features, model and encoder on
throwaway state.  The synthetic ticks and throwaway fused contexts here also
serve the start-up warm-up and a reload's warm-up (:mod:`engine.reload`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engine.schema import N_REJECT_REASONS, TICK_DTYPE
from engine.wire import SCORE_SCHEMA_ID
from models.tick_kernels import TickContext

__all__ = ["KeepWarm", "synthetic_ticks", "warm_tick", "throwaway_tick"]


class KeepWarm:
    """Mixin of :class:`engine.scorer.ScoringAgent`: ``keep_warm`` on throwaway state.

    Uses the agent's ``backend``, ``new_state``, ``update``, ``params``, ``_x``,
    ``_run``, ``_tick``, ``_encode_row``, ``_version`` and ``_reloading``.
    """

    _WARM_TICKS = 4096

    def _prepare_warm(self) -> None:
        """Build the throwaway ticks, state and buffers :meth:`keep_warm` runs on."""
        ticks = synthetic_ticks(self._WARM_TICKS)
        fstate, istate = self.new_state(1)
        counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
        w = {"ticks": ticks, "fstate": fstate, "istate": istate, "counters": counters,
             "x": np.zeros_like(self._x), "buf": bytearray(), "j": 0, "backend": self.backend}
        if self._tick is not None:
            w["tick"], w["tctx"] = throwaway_tick(self.backend, fstate, istate, self.params, counters, ticks)
            if self._native is not None:  # the native loop's kernel, publishing nothing
                w["native"] = self._native.throwaway(w["tick"])
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
        if w is None or w["backend"] is not self.backend or ("native" in w) != (self._native is not None):
            # first call, a model was swapped in, or the loop changed
            self._prepare_warm()
            w = self._warm
        j = w["j"]
        if j == self._WARM_TICKS:  # the warm ticks' times would go backwards: fresh state
            fstate, istate = self.new_state(1)
            w["fstate"][:] = fstate
            w["istate"][:] = istate
            j = 0
        w["j"] = j + 1
        if "native" in w and self._native is not None:  # the native duty cycle, on throwaway state
            w["native"].run(w["tctx"].addr, j, j + 1)
            return True
        if self._tick is not None:
            flags, score = w["tick"](j, w["tctx"].addr)
        else:
            flags = self.update(w["ticks"], j, w["fstate"], w["istate"], self.params, w["x"], w["counters"])
            score = self._run()
        self._encode_row((SCORE_SCHEMA_ID, "W", j, j, j, j, score, self._version, max(flags, 0),
                          self.shard, self.epoch), w["buf"])
        return True


def synthetic_ticks(n: int) -> np.ndarray:
    """Return ``n`` plain quotes and trades (1 ms apart, one instrument) for warm-up and keep-warm."""
    ticks = np.zeros(n, dtype=TICK_DTYPE)
    ticks["ts_event_ns"] = np.arange(n, dtype=np.int64) * 1_000_000
    ticks["ts_recv_ns"] = ticks["ts_event_ns"]
    ticks["kind"] = np.where(np.arange(n) % 3 == 2, 2, 1)
    ticks["bid_px"], ticks["ask_px"] = 100.0, 100.25
    ticks["bid_sz"], ticks["ask_sz"] = 5.0 + np.arange(n) % 7, 7.0
    ticks["price"], ticks["size"], ticks["side"] = 100.25, 1.0, 1
    return ticks


def throwaway_tick(backend, fstate, istate, params, counters, ticks):
    """Return ``(tick, ctx)``: a fused backend's kernel over these arrays and a copy of its model arrays.

    The copy keeps the live model registers untouched.
    """
    tick, _ = backend.make_tick(fstate, istate, params, counters, ticks)
    mi, mf = backend.program.new_arrays()
    return tick, TickContext(fstate, istate, params, counters, mi, mf, ticks)


def warm_tick(backend, new_state: Callable, params: np.ndarray, n: int) -> None:
    """Compile and exercise a fused backend's tick kernel on throwaway state and ticks."""
    fstate, istate = new_state(1)
    counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
    tick, tctx = throwaway_tick(backend, fstate, istate, params, counters, synthetic_ticks(n))
    for i in range(n):
        tick(i, tctx.addr)
