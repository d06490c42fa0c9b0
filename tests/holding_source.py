"""Paced replay source that holds its last ticks while a model reload is still pending (tests only)."""

from __future__ import annotations

from replay.source import ReplaySource


class HoldingSource:
    """Paced replay source that stops yielding ticks at ``hold_from`` while a reload is pending.

    Ticks keep flowing at the paced rate while the new model is validated; the
    hold only guarantees the swap lands mid-stream on a slow (or busy CI) machine.
    Set ``agent`` before the run.
    """

    def __init__(self, ticks, speed, hold_from) -> None:
        self._src = ReplaySource(ticks, speed)
        self._poll = self._src.poll
        self.ticks, self.inst_list, self.ts_list = ticks, self._src.inst_list, self._src.ts_list
        self.hold_from = hold_from
        self.agent = None

    @property
    def done(self) -> bool:
        return self._src.done

    @property
    def position(self) -> int:
        return self._src.position

    def on_reject(self, i: int) -> None:
        self._src.on_reject(i)

    def poll(self) -> int:
        if self._src.position >= self.hold_from and any(t.status == "pending" for t in self.agent.reloads):
            return -1
        return self._poll()
