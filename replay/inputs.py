"""What a replay reads and with which feature set: data shape, model, kernels, source.

:func:`open_replay_data` decides, before the agent is built:

* the **event shape** (``l1`` / ``trades`` / ``l3``): ``--shape``, else the
  mapping's ``shape``, else the model's feature-set family when ``--model`` is
  given, else detected from the file's first rows
  (:func:`replay.reader.detect_shape`);
* the **model**: ``--model``, else the shipped default model of the shape
  (``models/default/risk_int8.onnx``, ``risk_trades_int8.onnx``,
  ``risk_l3_int8.onnx``);
* the **feature set and kernels**: from the model's metadata
  (``feature_set_id`` -> :func:`features.featureset.get_feature_set` ->
  :func:`features.registry.kernels_for`), so the features are always the ones
  the model was trained on;
* **in memory or chunked**: files with more than ``CHUNK_AUTO_ROWS`` rows (or
  any file when ``--chunk-rows`` is given) replay through a
  :class:`replay.source.ChunkedReplaySource` in bounded memory.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.featureset import get_feature_set
from features.registry import kernels_for
from models.loader import default_model_path
from models.metadata import read_metadata
from replay.reader import DEFAULT_CHUNK_ROWS, detect_shape, iter_tick_chunks, read_ticks
from replay.source import ChunkedReplaySource, ReplaySource

__all__ = ["ReplayData", "open_replay_data", "default_model_for_shape", "CHUNK_AUTO_ROWS"]

#: Files with more rows than this replay in chunks even without ``--chunk-rows``.
CHUNK_AUTO_ROWS = 5_000_000
#: Runs up to this many ticks keep every raw latency (latency_raw.npz, plot).
FULL_RAW_TICKS = 4_000_000

_MODEL_FILES = {"l1": "risk_int8.onnx", "trades": "risk_trades_int8.onnx", "l3": "risk_l3_int8.onnx"}


def default_model_for_shape(shape: str) -> Path:
    """Return the shipped default model file of an event shape."""
    if shape not in _MODEL_FILES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(_MODEL_FILES)}")
    return default_model_path().parent / _MODEL_FILES[shape]


@dataclass
class ReplayData:
    """Everything the replay needs to know about its input (see the module docstring)."""

    path: str
    shape: str
    model_path: str
    feature_set: Any
    kernels: Any
    symbols: list[str]
    source: Any  # ReplaySource or ChunkedReplaySource
    first_ticks: np.ndarray  # ticks for the backend's parity check
    total: int  # ticks (in memory) or rows (chunked) for progress
    rows: int
    chunked: bool
    reader_rejected: dict[str, int] = field(default_factory=dict)
    reader_anomalies: dict[str, int] = field(default_factory=dict)
    td: Any = None
    chunks: Any = None
    unavailable: list[str] = field(default_factory=list)
    mapping: Any = None

    @property
    def recorder_capacity(self) -> int:
        """Return the latency ring size: every tick in memory, a window when chunked."""
        if not self.chunked:
            return max(len(self.source.ticks), 1)
        ring = max(2 * self.chunks.chunk_rows, 1 << 22)
        return max(min(self.total, FULL_RAW_TICKS), ring)

    def finish(self) -> None:
        """Stop background reading (chunked) and collect the reader's final account."""
        if self.chunked:
            self.source.finish()
            self.reader_rejected = dict(self.chunks.rejected)
            self.reader_anomalies = dict(self.chunks.anomalies)
            self.rows = int(self.chunks.rows_read)

    def ticks_total(self) -> int:
        """Return ticks handed to the agent plus rows the reader rejected."""
        if self.chunked:
            return int(self.source.handed) + sum(self.reader_rejected.values())
        return len(self.source.ticks) + sum(self.reader_rejected.values())


def _model_family(path: str) -> str:
    meta = read_metadata(path)
    return meta.feature_set_id.split(".", 1)[0]


def open_replay_data(opts: Any, data_path: str) -> ReplayData:
    """Open the replay input of ``opts`` (a :class:`replay.run.ReplayOptions`)."""
    mapping = getattr(opts, "mapping", None)
    shape = getattr(opts, "shape", None) or (mapping.shape if mapping is not None else None)
    if shape is None and opts.model:
        shape = _model_family(opts.model)
        if shape not in _MODEL_FILES:
            shape = None
    if shape is None:
        shape = detect_shape(data_path, mapping)
    model_path = opts.model or str(default_model_for_shape(shape))
    if not Path(model_path).is_file():
        raise FileNotFoundError(
            f"no model for event shape {shape!r}: {model_path} does not exist; pass --model "
            "(train one with: python -m models.train --feature-set " + shape + ")"
        )
    meta = read_metadata(model_path)
    fs = get_feature_set(meta.feature_set_id)
    unavailable = fs.unavailable(shape)
    if unavailable and len(unavailable) == len(fs.names):
        raise ValueError(
            f"model {model_path} uses feature set {fs.id}, whose kernels cannot consume "
            f"{shape!r} events; use a model of that shape (default: {default_model_for_shape(shape)})"
        )
    if unavailable:
        print(
            f"tickscore: warning: a {shape!r} file cannot provide {len(unavailable)} feature(s) of "
            f"{fs.id} ({', '.join(unavailable)}): they stay neutral and scores carry flag no_book; "
            f"the {shape!r} default model is {default_model_for_shape(shape).name}",
            file=sys.stderr,
        )
    sort = bool(getattr(opts, "sort_by_exchange_time", False))
    chunk_rows = getattr(opts, "chunk_rows", None)
    chunks = None
    limit = opts.limit  # the file's first N rows: ticks, rejects and scores all count those
    if chunk_rows is None:
        chunks = iter_tick_chunks(data_path, DEFAULT_CHUNK_ROWS, mapping=mapping, shape=shape,
                                  sort_by_exchange_time=sort, max_rows=limit)  # fmt: skip
        if chunks.total_rows <= CHUNK_AUTO_ROWS:
            chunks = None
    else:
        chunks = iter_tick_chunks(data_path, int(chunk_rows), mapping=mapping, shape=shape,
                                  sort_by_exchange_time=sort, max_rows=limit)  # fmt: skip
    kern = kernels_for(fs, crossing_add=getattr(mapping, "crossing_add", None))
    if chunks is None:
        td = read_ticks(data_path, mapping=mapping, shape=shape, sort_by_exchange_time=sort, max_rows=limit)
        ticks = td.ticks
        source = ReplaySource(np.ascontiguousarray(ticks), opts.speed)
        return ReplayData(
            path=data_path, shape=shape, model_path=model_path, feature_set=fs, kernels=kern,
            symbols=list(td.symbols), source=source, first_ticks=ticks, total=len(ticks),
            rows=td.rows, chunked=False, reader_rejected=dict(td.rejected),
            reader_anomalies=dict(td.anomalies), td=td, unavailable=unavailable, mapping=mapping,
        )  # fmt: skip
    cpus = None
    if opts.pin is not None:
        cpus = set(os.sched_getaffinity(0)) - {opts.pin} or None
    source = ChunkedReplaySource(chunks, opts.speed, cpus=cpus,
                                 warmup=getattr(opts, "warmup_ticks", 0))  # fmt: skip
    return ReplayData(
        path=data_path, shape=shape, model_path=model_path, feature_set=fs, kernels=kern,
        symbols=list(chunks.symbols), source=source, first_ticks=source.ticks[:20_000],
        total=source.total, rows=chunks.total_rows, chunked=True, chunks=chunks,
        unavailable=unavailable, mapping=mapping,
    )  # fmt: skip
