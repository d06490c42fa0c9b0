"""In-process replay source: hands ticks of an array to the scoring agent, paced or not.

Pacing: ``speed=None`` releases ticks as fast as the agent takes them; ``speed=s``
releases tick ``i`` at ``start + (ts_event[i] - ts_event[0]) / s`` on the
monotonic clock (``s=1`` is recorded speed).  The intended release time of every
tick is kept (``intended_ns``) so reports can measure latency from when a tick
*should* have been handled, which keeps coordinated omission visible.
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["ReplaySource", "parse_speed"]


def parse_speed(text: str | float | None) -> float | None:
    """Return the replay speed factor: ``None`` for ``"max"``, else a positive float."""
    if text is None:
        return None
    if isinstance(text, str):
        if text.strip().lower() in ("max", "inf", "0"):
            return None
        try:
            value = float(text.lower().rstrip("x"))
        except ValueError:
            raise ValueError(
                f"--speed must be 'max' or a positive number like 1, 10, 0.5; got {text!r}"
            ) from None
    else:
        value = float(text)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"--speed must be 'max' or a positive number; got {text!r}")
    return value


class ReplaySource:
    """Source over an in-memory TICK_DTYPE array (see the source protocol in engine.scorer).

    Parameters
    ----------
    ticks : ndarray of TICK_DTYPE
    speed : float or None
        None = as fast as possible; else the factor of recorded speed.
    """

    def __init__(self, ticks: np.ndarray, speed: float | None = None) -> None:
        self.ticks = ticks
        self.n = int(ticks.shape[0])
        self.inst_list = ticks["instrument"].tolist()
        self.ts_list = ticks["ts_event_ns"].tolist()
        self.speed = speed
        self.intended_ns = np.zeros(self.n, dtype=np.int64) if speed is not None else None
        self.done = self.n == 0
        self._i = 0
        self._start_ns = 0
        self._ts0 = self.ts_list[0] if self.n else 0
        self._inv_speed = 1.0 / speed if speed else 0.0
        if speed is not None:
            self.poll = self._poll_paced  # type: ignore[method-assign]

    def start(self, now_ns: int | None = None) -> None:
        """Fix the pacing origin; without a call, the first poll fixes it."""
        self._start_ns = time.perf_counter_ns() if now_ns is None else now_ns

    @property
    def position(self) -> int:
        """Return the number of ticks handed out so far."""
        return self._i

    def poll(self) -> int:
        """Return the next tick index, or -1 once exhausted (sets ``done``)."""
        i = self._i
        if i >= self.n:
            self.done = True
            return -1
        self._i = i + 1
        return i

    def _poll_paced(self) -> int:
        i = self._i
        if i >= self.n:
            self.done = True
            return -1
        now = time.perf_counter_ns()
        if not self._start_ns:
            self._start_ns = now
        due = self._start_ns + int((self.ts_list[i] - self._ts0) * self._inv_speed)
        if now < due:
            return -1
        self.intended_ns[i] = due
        self._i = i + 1
        return i
