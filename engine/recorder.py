"""The latency recorder of the hot path: preallocated clock-reading rings, filled per tick."""

from __future__ import annotations

import numpy as np

__all__ = ["LatencyRecorder"]


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
