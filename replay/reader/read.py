"""Whole-file reads and shape detection; the explanation of rejects."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.schema import (
    KIND_BOOK_ADD,
    KIND_BOOK_DELETE,
    KIND_BOOK_MODIFY,
    KIND_QUOTE,
    N_REJECT_REASONS,
    REJECT_ABSURD_VALUE,
    REJECT_MALFORMED,
    REJECT_NONFINITE,
    REJECT_OK,
    TICK_DTYPE,
)
from features.validate import absurd_rows, validate_rows
from replay.mapping import IDENTITY, KIND_CLEAR, ColumnMapping
from replay.reader.base import SHAPES, TickData, _reasons
from replay.reader.files import _iter_frames, _read_frame
from replay.reader.normalise import _codes, _column, _count_same_ts, _normalise, _text
from replay.reader.plan import _make_plan


def resolve_shape(path: str | Path, mapping: ColumnMapping | None = None, shape: str | None = None) -> str:
    """Return the event shape of a file as every command finds it.

    ``shape`` (``--shape``), else the mapping's ``shape``, else
    :func:`detect_shape` on the file's first rows.
    """
    return shape or (mapping.shape if mapping is not None else None) or detect_shape(path, mapping)


def detect_shape(path: str | Path, mapping: ColumnMapping | None = None, sample_rows: int = 100_000) -> str:
    """Return the event shape of a file from its first rows: ``l3``, ``trades`` or ``l1``.

    ``l3`` if any row is a book event (add / modify / delete / clear), ``trades``
    if there are trade rows only and no quote columns, else ``l1``.
    """
    mp = mapping or IDENTITY
    if mp.shape:
        return mp.shape
    p = Path(path)
    frame = next(_iter_frames(p, mp, sample_rows), None)
    if frame is None or frame.height == 0:
        return "l1"
    try:
        plan = _make_plan(frame.columns, mp, "l3", p)
    except ValueError:
        try:
            plan = _make_plan(frame.columns, mp, "trades", p)
        except ValueError:
            return "l1"
    raw_kind = _column(frame, plan, "kind")
    if raw_kind is None:
        return "trades"
    kind = _codes(raw_kind, mp.kinds, keep_ints=True)
    if kind.is_in([KIND_BOOK_ADD, KIND_BOOK_MODIFY, KIND_BOOK_DELETE, KIND_CLEAR]).any():
        return "l3"
    if "bid_px" not in plan.cols and not (kind == KIND_QUOTE).any():
        return "trades"
    return "l1"


def explain_rejects(
    path: str | Path,
    mapping: ColumnMapping | None,
    shape: str,
    rejected: dict[str, int],
    sample_rows: int = 200_000,
) -> list[str]:
    """Return lines that say why rows were rejected and what to change (for a failed run).

    Off the hot path: it re-reads the first ``sample_rows`` rows and names the
    event / side codes no ``kinds.X`` / ``sides.X`` maps (with counts), the
    mapped fields that are empty, and the flag that fixes the common reasons.
    """
    p = Path(path)
    mp = mapping or IDENTITY
    lines: list[str] = []
    if rejected.get("malformed"):
        try:
            frame = next(_iter_frames(p, mp, sample_rows), None)
            plan = _make_plan(frame.columns, mp, shape, p) if frame is not None else None
        except (ValueError, OSError):
            frame = plan = None
        if frame is not None and plan is not None and frame.height:
            for fld, table, key in (("kind", mp.kinds, "kinds"), ("side", mp.sides, "sides")):
                raw = _column(frame, plan, fld)
                if raw is None:
                    continue
                codes = _codes(raw, table, keep_ints=(fld == "kind"))
                present = _text(raw).is_not_null() if not raw.dtype.is_numeric() else raw.is_not_null()
                unmapped = codes.is_null()
                if fld == "side":
                    unmapped = unmapped | ~codes.is_in([-1, 0, 1]).fill_null(False)
                bad = _text(raw).filter(present & unmapped)
                if len(bad):
                    vc = bad.value_counts(sort=True).head(8)
                    vals = ", ".join(f"{v!r} ({c:,})" for v, c in vc.iter_rows())
                    col = "|".join(plan.cols.get(fld, [])) or fld
                    lines.append(
                        f"column {col!r} ({fld}) has values that no {key}.X maps: {vals} "
                        f"(first {frame.height:,} rows); map them, e.g. --map {key}.{vc.item(0, 0)}=..."
                    )
            need = ["ts_event", "symbol"] + (["price", "size"] if shape != "l1" else [])
            for fld in need:
                raw = _column(frame, plan, fld)
                if raw is not None and raw.null_count() == frame.height:
                    lines.append(f"field {fld} is empty in every row (column {'|'.join(plan.cols[fld])})")
    if rejected.get("time_backwards"):
        lines.append("time_backwards: the file is not in exchange-time order; pass --sort-by-exchange-time")
    if rejected.get("bad_kind"):
        lines.append(
            f"bad_kind: events of a kind the {shape!r} feature set does not consume (e.g. quotes in an "
            "L3 file); check --shape and the kinds.X mapping"
        )
    if rejected.get("unknown_order"):
        lines.append(
            "unknown_order: deletes / changes of orders never added: the file starts mid-book (a "
            "snapshot is missing) or the order_id column is not the venue's order id"
        )
    if rejected.get("unknown_instrument"):
        lines.append("unknown_instrument: symbols outside the instrument table")
    return lines


def _symbol_table(symbols: Sequence[str] | None) -> list[str] | None:
    if symbols is None:
        return None
    if isinstance(symbols, str):
        raise TypeError("symbols must be a sequence of str, not one str")
    table = [str(s) for s in symbols]
    if len(set(table)) != len(table):
        raise ValueError(f"symbols table has duplicates: {table}")
    return table


# =========================================================================== whole file
def read_ticks(
    path: str | Path,
    *,
    symbols: Sequence[str] | None = None,
    mapping: ColumnMapping | None = None,
    shape: str | None = None,
    sort_by_exchange_time: bool = False,
    max_rows: int | None = None,
) -> TickData:
    """Read a Parquet/CSV/CSV.gz market file and return its ticks.

    Parameters
    ----------
    path : str or Path
        File in the normalised schema (see the module docstring) or in the
        layout described by ``mapping``.
    symbols : sequence of str, optional
        Instrument table: symbol ``symbols[i]`` gets instrument id ``i`` and
        rows of any other symbol are rejected as ``unknown_instrument``.  If
        omitted, the table is the sorted unique symbols of the file.
    mapping : ColumnMapping, optional
        Vendor layout (:mod:`replay.mapping`); default: the normalised schema.
    shape : str, optional
        ``l1`` (default), ``trades`` or ``l3``; default: the mapping's shape, else ``l1``.
    sort_by_exchange_time : bool
        Stable sort by ``ts_event_ns`` (file order kept for equal times) before
        validation.
    max_rows : int, optional
        Read only the file's first ``max_rows`` rows (rejects are counted over
        those rows only).

    Returns
    -------
    TickData
        Ticks (:data:`engine.schema.TICK_DTYPE`), the instrument table, rows read,
        rejected counts per reason and anomaly counts.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file cannot be read (corrupt, empty, wrong format), lacks required
        columns or the mapping names columns the file does not have; the message
        names the file, the problem and the expected schema.  Bad *rows* never
        raise: they are counted in ``TickData.rejected``.
    """
    p = Path(path)
    mp = mapping or IDENTITY
    shp = shape or mp.shape or "l1"
    if shp not in SHAPES:
        raise ValueError(f"unknown shape {shp!r}; known: {list(SHAPES)}")
    table_given = _symbol_table(symbols)
    frame = _read_frame(p, mp)
    if max_rows is not None:
        frame = frame.head(max(int(max_rows), 0))
    plan = _make_plan(frame.columns, mp, shp, p)
    if table_given is None:
        sym = _text(_column(frame, plan, "symbol"))  # type: ignore[arg-type]
        table = sorted(sym.drop_nulls().unique().to_list())
    else:
        table = table_given
    index = {s: i for i, s in enumerate(table)}
    norm = _normalise(frame, plan, mp, index)
    counts = np.zeros(N_REJECT_REASONS, dtype=np.int64)
    counts[REJECT_MALFORMED] += norm.n_malformed
    counts[REJECT_NONFINITE] += norm.n_nonfinite_ts
    anomalies: dict[str, int] = {"skipped": norm.n_skipped}
    cand = _drop_absurd(norm.ticks, counts)
    recv = cand["ts_recv_ns"]
    if len(recv) > 1:
        anomalies["recv_backwards"] = int(np.count_nonzero(recv[1:] < recv[:-1]))
    if sort_by_exchange_time and len(cand):
        ts = cand["ts_event_ns"]
        anomalies["reordered"] = int(np.count_nonzero(ts < np.maximum.accumulate(ts)))
        cand = cand[np.argsort(ts, kind="stable")]
    if shp == "l1":
        reasons = np.empty(len(cand), dtype=np.uint8)
        last_ts = np.full(len(table), np.iinfo(np.int64).min, dtype=np.int64)
        n_ok = validate_rows(cand, last_ts, reasons, counts)
        accepted = cand if n_ok == len(cand) else cand[reasons == REJECT_OK]
    else:
        accepted = cand
    if shp != "l3":  # (the L3 kernel counts its own, per accepted event)
        anomalies["same_ts"] = _count_same_ts(accepted, np.full(len(table), np.iinfo(np.int64).min))
    assert accepted.dtype == TICK_DTYPE
    return TickData(
        ticks=accepted, symbols=table, rows=frame.height, rejected=_reasons(counts), path=str(p),
        anomalies={k: v for k, v in anomalies.items() if v}, shape=shp,
    )  # fmt: skip


def _drop_absurd(cand: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Count the rows the live sources would reject as ``absurd_value`` and return the others."""
    bad = absurd_rows(cand)
    n = int(np.count_nonzero(bad))
    if not n:
        return cand
    counts[REJECT_ABSURD_VALUE] += n
    return cand[~bad]


# =========================================================================== chunks
#: Rows per frame of the pre-scan (symbol column only): more only holds more memory.
