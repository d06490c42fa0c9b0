"""Recorded scores (``replay --record-scores``): ``DIR/scores.parquet``, one row per score.

Columns: ``seq`` (uint64), ``instrument`` (str), ``ts_event_ns`` (int64),
``score`` (float64, bit for bit as on the wire), ``flags`` (uint32),
``model_version`` (str).  In-process replay records what its agent published
(:class:`ScoreRecorder`, a sink next to the ZeroMQ publisher); wire mode
records what its subscriber received.  The same file from both is how "live
equals replay" is checked (:func:`compare_scores`).

A replay in wire mode shifts event times to the present (differences, hence
features and scores, are kept); the file records the times the scores carry,
so compare wire and in-process files on everything but ``ts_event_ns`` or
after subtracting each file's first time.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import polars as pl

from engine.wire import decode_score

__all__ = ["ScoreRecorder", "write_scores", "read_scores", "compare_scores", "SCORES_FILE"]

SCORES_FILE = "scores.parquet"


class ScoreRecorder:
    """A sink that keeps a copy of every published Score payload (opt-in: it allocates per tick)."""

    name = "record"
    #: the native loop copies every payload out for it after each batch (engine.native_loop)
    native = "tap"
    drops = 0

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def publish(self, topic: bytes, payload) -> bool:
        self.payloads.append(bytes(payload))
        return True

    def close(self) -> None:
        pass


def write_scores(path: str | Path, payloads: Iterable[bytes]) -> int:
    """Decode Score payloads (the wire format) and write them as ``scores.parquet``; return rows."""
    cols: dict[str, list] = {k: [] for k in ("seq", "instrument", "ts_event_ns", "score", "flags",
                                             "model_version")}  # fmt: skip
    for p in payloads:
        s = decode_score(p)
        cols["seq"].append(s.seq)
        cols["instrument"].append(s.instrument)
        cols["ts_event_ns"].append(s.ts_event_ns)
        cols["score"].append(s.score)
        cols["flags"].append(s.flags)
        cols["model_version"].append(s.model_version)
    schema = {"seq": pl.UInt64, "instrument": pl.String, "ts_event_ns": pl.Int64, "score": pl.Float64,
              "flags": pl.UInt32, "model_version": pl.String}  # fmt: skip
    df = pl.DataFrame(cols, schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path)
    return df.height


def read_scores(path: str | Path):
    """Return the recorded scores of ``path`` (a file or a run directory) as a polars DataFrame."""
    p = Path(path)
    return pl.read_parquet(p / SCORES_FILE if p.is_dir() else p)


def compare_scores(a, b, *, times: str = "relative") -> str | None:
    """Return None if two recordings hold the same scores tick by tick, else the first difference.

    Same count; per instrument the same order; ``score`` bit-identical, same
    ``flags``.  ``times="relative"`` compares each instrument's event times
    relative to the recording's first event (wire mode shifts them),
    ``"exact"`` as they are, ``"ignore"`` not at all.
    """
    if a.height != b.height:
        return f"{a.height:,} scores vs {b.height:,}"
    t0a = a["ts_event_ns"].min() if a.height else 0
    t0b = b["ts_event_ns"].min() if b.height else 0
    for sym in sorted(set(a["instrument"].unique()) | set(b["instrument"].unique())):
        x = a.filter(a["instrument"] == sym)
        y = b.filter(b["instrument"] == sym)
        if x.height != y.height:
            return f"instrument {sym}: {x.height:,} scores vs {y.height:,}"
        sx = x["score"].to_numpy().view(np.uint64)
        sy = y["score"].to_numpy().view(np.uint64)
        fx, fy = x["flags"].to_numpy(), y["flags"].to_numpy()
        bad = np.flatnonzero((sx != sy) | (fx != fy))
        if times != "ignore":
            tx = x["ts_event_ns"].to_numpy() - (t0a if times == "relative" else 0)
            ty = y["ts_event_ns"].to_numpy() - (t0b if times == "relative" else 0)
            bad = np.union1d(bad, np.flatnonzero(tx != ty))
        if bad.size:
            k = int(bad[0])
            return (f"instrument {sym}, its score #{k} (seq {x['seq'][k]} vs {y['seq'][k]}): "
                    f"score {x['score'][k]!r} vs {y['score'][k]!r}, flags {x['flags'][k]} vs "
                    f"{y['flags'][k]}, ts_event_ns {x['ts_event_ns'][k]} vs "
                    f"{y['ts_event_ns'][k]}")  # fmt: skip
    return None
