"""Reader basics: the normalised columns, shapes, the result types and reject bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.schema import (
    N_REJECT_REASONS,
    REJECT_NAMES,
    REJECT_OK,
)

DEFAULT_CHUNK_ROWS = 1_000_000

#: Columns every file must have.
REQUIRED_COLUMNS: tuple[str, ...] = ("ts_event_ns", "symbol", "kind")
#: Quote columns (all or none).
QUOTE_COLUMNS: tuple[str, ...] = ("bid_px", "bid_sz", "ask_px", "ask_sz")
#: Trade columns (all or none).
TRADE_COLUMNS: tuple[str, ...] = ("price", "size")
#: Optional columns and their default.
OPTIONAL_COLUMNS: tuple[str, ...] = ("ts_recv_ns", "side", "order_id")
#: Event shapes.
SHAPES: tuple[str, ...] = ("l1", "trades", "l3")

_SCHEMA_HINT = (
    "expected columns: ts_event_ns (int64 ns), symbol (str), kind (1/'quote' or "
    "2/'trade'), quote columns bid_px, bid_sz, ask_px, ask_sz and/or trade columns "
    "price, size (float64); optional ts_recv_ns (int64), side (int8 +1/-1/0), "
    "order_id (uint64); a file in another layout needs a column mapping "
    "(--map / --map-file, see 'Bringing your own data' in the README)"
)
_PARQUET_SUFFIXES = (".parquet", ".pq")
_CSV_SUFFIXES = (".csv", ".csv.gz", ".gz", ".tsv", ".txt")
# field -> normalised column name
_NORM_COL = {"ts_event": "ts_event_ns", "ts_recv": "ts_recv_ns", "symbol": "symbol", "kind": "kind",
             "side": "side", "price": "price", "size": "size", "bid_px": "bid_px", "bid_sz": "bid_sz",
             "ask_px": "ask_px", "ask_sz": "ask_sz", "order_id": "order_id"}  # fmt: skip
_UNIT_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_INT64_MAX = np.iinfo(np.int64).max



@dataclass
class TickData:
    """Accepted ticks of one file and the account of what was read.

    Attributes
    ----------
    ticks : ndarray of TICK_DTYPE
        Accepted rows only (``l1``; for ``trades``/``l3``: every row that could be
        normalised, for the kernel to judge), in file order (or exchange-time order).
    symbols : list of str
        Instrument table: ``symbols[tick["instrument"]]`` is the symbol.
    rows : int
        Rows read from the file (accepted + rejected + skipped).
    rejected : dict of str to int
        Rejected rows per reason name of ``engine.schema.REJECT_NAMES``; only
        non-zero counts, never ``"ok"``.
    path : str
        The file read.
    anomalies : dict of str to int
        Rows kept or dropped by a documented rule (see the module docstring).
    shape : str
        Event shape the file was read as.
    """

    ticks: np.ndarray
    symbols: list[str]
    rows: int
    rejected: dict[str, int] = field(default_factory=dict)
    path: str = ""
    anomalies: dict[str, int] = field(default_factory=dict)
    shape: str = "l1"

    @property
    def rejected_total(self) -> int:
        """Return the number of rejected rows (all reasons)."""
        return sum(self.rejected.values())


@dataclass
class TickChunk:
    """One chunk of :func:`iter_tick_chunks`: ticks and what the reader rejected in it."""

    ticks: np.ndarray
    rejected: dict[str, int]


# =========================================================================== file access

def _reasons(counts: np.ndarray) -> dict[str, int]:
    return {REJECT_NAMES[r]: int(counts[r]) for r in range(N_REJECT_REASONS) if r != REJECT_OK and counts[r]}


def _add(acc: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        if v:
            acc[k] = acc.get(k, 0) + int(v)


# =========================================================================== shape and symbols
