"""The ports of the hot path: what a tick source, a score sink and a model backend provide.

:class:`engine.scorer.ScoringAgent` is written against these three protocols
and nothing else; live (:mod:`engine.sources`, :mod:`engine.zmq_io`,
:mod:`engine.aeron_io`) and replay (:mod:`replay.source`) plug in their own
implementations.  They are :class:`typing.Protocol` classes: structural, no
base class to inherit, no runtime cost (the agent never checks them; type
checkers and readers do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["TickSource", "ScoreSink", "Backend", "FusedBackendPort"]


class TickSource(Protocol):
    """Where ticks come from: one index per call, into an array of ``TICK_DTYPE``."""

    #: the tick array ``poll`` indexes (live: a one-slot array rewritten per tick)
    ticks: np.ndarray
    #: ``ticks["instrument"]`` / ``ticks["ts_event_ns"]`` as Python-int sequences (no boxing per tick)
    inst_list: Any
    ts_list: Any
    #: True once no tick will ever come again (replay end; live: never)
    done: bool

    def poll(self) -> int:
        """Return the index of the next tick in ``ticks``, or -1 if none is ready. Never raises."""
        ...

    def on_reject(self, i: int) -> None:
        """The agent rejected tick ``i`` (a rare path: counted by reason, no score)."""
        ...


class ScoreSink(Protocol):
    """Where encoded scores go (ZeroMQ PUB, Aeron publication, a recorder)."""

    def publish(self, topic: bytes, payload: bytes | bytearray | memoryview) -> bool:
        """Send one Score message; False if it was dropped (counted by the sink)."""
        ...


class Backend(Protocol):
    """A loaded model: score the feature vector in ``x_flat``."""

    #: ``"ort"`` or ``"fused"``
    kind: str
    path: Path
    #: ``tickscore.model_version`` of the file
    version: str
    quantization: str
    n_features: int
    #: the model's preallocated float32 input; the feature kernel writes it in place
    x_flat: np.ndarray
    #: the fused backend's parity report against onnxruntime (None for ``ort``)
    parity: Any

    def run(self) -> float:
        """Return the score of the current ``x_flat``."""
        ...

    def warmup(self, n: int = ...) -> None:
        """Call :meth:`run` ``n`` times (content of ``x_flat`` preserved)."""
        ...


class FusedBackendPort(Backend, Protocol):
    """A backend that also composes features + model into one compiled per-tick call."""

    def make_tick(self, fstate: np.ndarray, istate: np.ndarray, params: np.ndarray, counters: np.ndarray,
                  ticks: np.ndarray | None = None) -> tuple[Any, Any]:  # fmt: skip
        """Return ``(tick, context)``: ``tick(i, context.addr) -> (flags, score)``."""
        ...
