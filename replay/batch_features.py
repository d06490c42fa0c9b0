"""``tickscore features``: the feature matrix of a whole file, with the live kernels.

Reads the file in bounded chunks (:func:`replay.reader.iter_tick_chunks`, with
the same ``--map`` / ``--map-file`` / ``--shape`` / ``--sort-by-exchange-time``
options as ``tickscore replay``), runs the feature set's ``compute_batch``
kernel over every chunk with the state carried from chunk to chunk (exactly
the values the live loop computes tick by tick, no per-tick Python), and
writes one Parquet row per event::

    ts_event_ns  int64    exchange time
    symbol       string   (dictionary encoded)
    kind         uint8    event kind (engine.schema.KIND_*)
    flags        int32    feature flags (>= 0) or -reject reason (< 0; features NaN)
    <features>   float32  one column per feature, in the feature set's order

Parallelism: instruments never share feature state, so with ``--threads N``
(default: the usable cores, at most the number of instruments) each chunk is
split by instrument into N groups computed concurrently by the ``nogil``
kernels, each group with its own state; the output is identical to one thread
(for the L3 book the live-order limit then applies per group).

The feature set: ``--feature-set`` (id or family name), else the one of
``--model``, else the default set of the event shape.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from engine.schema import N_REJECT_REASONS, REJECT_NAMES
from features.featureset import DEFAULT_BY_SHAPE, get_feature_set
from features.kernels_l3 import compute_batch_auto, new_state
from features.registry import kernels_for
from models.metadata import read_metadata
from replay.reader import detect_shape, iter_tick_chunks

__all__ = [ "compute_features"]


def _resolve_feature_set(feature_set: str | None, model: str | None, shape: str):
    if feature_set:
        return get_feature_set(feature_set)
    if model:
        return get_feature_set(read_metadata(model).feature_set_id)
    return DEFAULT_BY_SHAPE[shape]


_L3_START_ORDERS = 4096


class _Groups:
    """Per-thread instrument groups, each with its own kernel state."""

    def __init__(self, kern, n_inst: int, n_groups: int, counts: np.ndarray | None,
                 crossing_add: str | None = None) -> None:
        self.n = max(1, min(n_groups, n_inst))
        self.group_of = np.zeros(max(n_inst, 1), dtype=np.int64)
        if self.n > 1:
            # greedy balance by event counts of the first chunk
            load = np.zeros(self.n)
            order = np.argsort(-(counts if counts is not None else np.ones(n_inst)), kind="stable")
            for i in order:
                g = int(np.argmin(load))
                self.group_of[i] = g
                load[g] += 1.0 if counts is None else max(float(counts[i]), 1.0)
        if kern.family == "l3":
            # a small order table stays in the CPU caches; it grows when it fills up

            self.states = [list(new_state(n_inst, max_orders=_L3_START_ORDERS, crossing_add=crossing_add))
                           for _ in range(self.n)]
        else:
            self.states = [list(kern.new_state(n_inst)) for _ in range(self.n)]
        self.grow = kern.family == "l3"

    def run(self, kern, g: int, ticks, params, X, flags, counters) -> None:
        """Compute group ``g``'s rows (its state carried, grown if needed)."""
        st = self.states[g]
        if self.grow:
            compute_batch_auto(ticks, st, params, X, flags, counters)
        else:
            kern.compute_batch(ticks, st[0], st[1], params, X, flags, counters)


def compute_features(
    data: str | Path,
    out: str | Path,
    *,
    feature_set: str | None = None,
    model: str | None = None,
    mapping: Any = None,
    shape: str | None = None,
    sort_by_exchange_time: bool = False,
    chunk_rows: int = 1_000_000,
    threads: int | None = None,
    drop_rejected: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute the feature matrix of ``data`` into the Parquet file ``out``; return a summary."""
    import pyarrow as pa  # deferred: pyarrow only on this file-format path
    import pyarrow.parquet as pq  # deferred: pyarrow only on this file-format path

    t_start = time.perf_counter()
    shp = shape or (mapping.shape if mapping is not None else None)
    if shp is None and model and not feature_set:
        shp = read_metadata(model).feature_set_id.split(".", 1)[0]
    if shp is None and feature_set:
        shp = feature_set.split(".", 1)[0]
    if shp is None:
        shp = detect_shape(data, mapping)
    fs = _resolve_feature_set(feature_set, model, shp)
    kern = kernels_for(fs)
    params = fs.params_array()
    chunks = iter_tick_chunks(data, chunk_rows, mapping=mapping, shape=shp,
                              sort_by_exchange_time=sort_by_exchange_time)  # fmt: skip
    symbols = chunks.symbols
    n_inst = len(symbols)
    cores = len(os.sched_getaffinity(0))
    n_threads = max(1, threads if threads is not None else cores)
    F = len(fs.names)

    # reader thread: parse and normalise the next chunk while this one is computed
    q: queue.Queue = queue.Queue(maxsize=2)
    err: list[BaseException] = []

    def produce() -> None:
        try:
            for ch in chunks:
                q.put(ch.ticks)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            err.append(e)
        finally:
            q.put(None)

    threading.Thread(target=produce, name="tickscore-features-read", daemon=True).start()

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # written under a temporary name and renamed at the end: an error never leaves a partial
    # (or empty) Parquet file behind, nor clobbers an existing one
    part_path = out_path.with_name(f".{out_path.name}.partial")
    sym_arr = pa.array(symbols, type=pa.string())
    schema = pa.schema(
        [("ts_event_ns", pa.int64()), ("symbol", pa.dictionary(pa.int32(), pa.string())),
         ("kind", pa.uint8()), ("flags", pa.int32())]
        + [(n, pa.float32()) for n in fs.names],
        metadata={b"tickscore.feature_set_id": fs.id.encode(), b"tickscore.shape": shp.encode()},
    )  # fmt: skip
    writer = pq.ParquetWriter(part_path, schema, compression="zstd")
    counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
    groups: _Groups | None = None
    pool = ThreadPoolExecutor(max_workers=n_threads) if n_threads > 1 else None
    n_events = n_written = 0
    t_kernel = 0.0
    last_print = time.perf_counter()
    try:
        while True:
            ticks = q.get()
            if ticks is None:
                break
            n = len(ticks)
            if n == 0:
                continue
            if groups is None:
                counts = np.bincount(ticks["instrument"][ticks["instrument"] >= 0], minlength=n_inst)
                groups = _Groups(kern, n_inst, n_threads if n_inst > 1 else 1, counts,
                                 getattr(mapping, "crossing_add", None))
            X = np.empty((n, F), dtype=np.float32)
            flags = np.empty(n, dtype=np.int32)
            t0 = time.perf_counter()
            if groups.n == 1:
                groups.run(kern, 0, ticks, params, X, flags, counters)
            else:
                inst = ticks["instrument"]
                g_of = np.where((inst >= 0) & (inst < n_inst), groups.group_of[np.clip(inst, 0, None)], 0)
                parts = [np.flatnonzero(g_of == g) for g in range(groups.n)]
                sub_c = [np.zeros(N_REJECT_REASONS, dtype=np.int64) for _ in range(groups.n)]

                def run(g: int, parts=parts, sub_c=sub_c, ticks=ticks, X=X, flags=flags, groups=groups):
                    idx = parts[g]
                    sub = ticks[idx]
                    Xg = np.empty((len(idx), F), dtype=np.float32)
                    fg = np.empty(len(idx), dtype=np.int32)
                    groups.run(kern, g, sub, params, Xg, fg, sub_c[g])
                    X[idx] = Xg
                    flags[idx] = fg

                list(pool.map(run, range(groups.n)))  # type: ignore[union-attr]
                for c in sub_c:
                    counters += c
            t_kernel += time.perf_counter() - t0
            n_events += n
            keep = flags >= 0 if drop_rejected else None
            cols = [
                pa.array(ticks["ts_event_ns"]),
                pa.DictionaryArray.from_arrays(pa.array(ticks["instrument"].astype(np.int32)), sym_arr),
                pa.array(ticks["kind"]),
                pa.array(flags),
            ] + [pa.array(X[:, k]) for k in range(F)]
            tbl = pa.Table.from_arrays(cols, schema=schema)
            if keep is not None and not keep.all():
                tbl = tbl.filter(pa.array(keep))
            writer.write_table(tbl)
            n_written += tbl.num_rows
            now = time.perf_counter()
            if progress and (now - last_print > 2.0):
                last_print = now
                el = now - t_start
                done = chunks.rows_read
                rate = done / el if el > 0 else 0.0
                eta = (chunks.total_rows - done) / rate if rate > 0 else float("nan")
                sys.stderr.write(
                    f"features {100.0 * done / max(chunks.total_rows, 1):5.1f}%  {done:,}/"
                    f"{chunks.total_rows:,} rows  {rate:,.0f} rows/s  ETA {eta:,.0f}s\n"
                )
    except BaseException:
        writer.close()
        part_path.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    writer.close()
    if err:
        part_path.unlink(missing_ok=True)
        raise err[0]
    part_path.replace(out_path)
    wall = time.perf_counter() - t_start
    anomalies = dict(chunks.anomalies)
    if groups is not None:
        for _fstate, istate in groups.states:
            for k, v in kern.anomalies(istate).items():
                anomalies[k] = anomalies.get(k, 0) + v
    rejected = dict(chunks.rejected)
    for r in range(1, N_REJECT_REASONS):
        if counters[r]:
            rejected[REJECT_NAMES[r]] = rejected.get(REJECT_NAMES[r], 0) + int(counters[r])
    return {
        "data": str(data),
        "out": str(out_path),
        "shape": shp,
        "feature_set": fs.id,
        "features": list(fs.names),
        "rows": int(chunks.rows_read),
        "events": int(n_events),
        "written": int(n_written),
        "accepted": int(counters[0]),
        "rejected_by_reason": rejected,
        "anomalies": {k: v for k, v in anomalies.items() if v},
        "threads": groups.n if groups is not None else 1,
        "wall_s": wall,
        "kernel_s": t_kernel,
        "events_per_s": n_events / wall if wall > 0 else 0.0,
        "kernel_events_per_s": n_events / t_kernel if t_kernel > 0 else 0.0,
    }
