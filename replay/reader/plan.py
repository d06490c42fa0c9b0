"""The column plan: which file column feeds which normalised field (through the mapping)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.schema import (
    KIND_TRADE,
)
from replay.mapping import ColumnMapping
from replay.reader.base import _NORM_COL, _SCHEMA_HINT, QUOTE_COLUMNS, REQUIRED_COLUMNS, TRADE_COLUMNS


@dataclass
class _Plan:
    """Which frame columns (or constants) feed each field, decided once per file."""

    cols: dict[str, list[str]]
    const: dict[str, str]
    shape: str
    default_kind: int | None = None
    ts_unit: str | None = None
    ts_recv_unit: str | None = None
    oid_hash: bool | None = None
    #: code tables of the fast path (:func:`_code_lut`), built on first use per dtype
    luts: dict | None = None


def _find(columns: list[str], name: str) -> str | None:
    if name in columns:
        return name
    low = name.strip().lower()
    hits = [c for c in columns if c.strip().lower() == low]
    return hits[0] if len(hits) == 1 else None


def _make_plan(columns: list[str], mp: ColumnMapping, shape: str, path: Path) -> _Plan:
    cols: dict[str, list[str]] = {}
    const = dict(mp.constants)
    if not mp.explicit:
        # normalised schema: the field's own column name (case-insensitive)
        for fld, name in _NORM_COL.items():
            c = _find(columns, name)
            if c is not None:
                cols[fld] = [c]
        have = {_NORM_COL[f] for f in cols}
        problems = []
        need = list(REQUIRED_COLUMNS)
        if shape == "trades":
            need = [c for c in need if c != "kind"]
        missing = [c for c in need if c not in have]
        if missing:
            problems.append(f"missing required columns {missing}")
        groups = [(QUOTE_COLUMNS, "quote"), (TRADE_COLUMNS, "trade")]
        for group, label in groups:
            got = [c for c in group if c in have]
            if got and len(got) < len(group):
                lack = [c for c in group if c not in have]
                problems.append(f"incomplete {label} columns: missing {lack} (have {got})")
        if not any(c in have for c in QUOTE_COLUMNS + TRADE_COLUMNS):
            problems.append(
                f"neither quote columns {list(QUOTE_COLUMNS)} nor trade columns "
                f"{list(TRADE_COLUMNS)} present"
            )
        if problems:
            raise ValueError(
                f"{path}: not in the normalised tick schema: {'; '.join(problems)}. "
                f"Found columns {columns}; {_SCHEMA_HINT}"
            )
    else:
        for fld in _NORM_COL:
            names = mp.source(fld)
            if not names:
                if fld in const:
                    continue
                c = _find(columns, _NORM_COL[fld]) or (_find(columns, fld) if fld != _NORM_COL[fld] else None)
                if c is not None:
                    cols[fld] = [c]
                continue
            found = [c for c in (_find(columns, n) for n in names) if c is not None]
            if not found:
                raise ValueError(
                    f"{path}: mapping: column {'|'.join(names)!r} for {fld} not found; "
                    f"the file has columns {columns}"
                    + ("" if mp.header else " (no header: columns are column_1, column_2, ...)")
                )
            cols[fld] = found
        if "ts_event" not in cols and "ts_event" not in const:
            raise ValueError(
                f"{path}: mapping: no column for ts_event (map it, e.g. --map ts_event=time); "
                f"the file has columns {columns}"
            )
        if "symbol" not in cols and "symbol" not in const:
            stem = path.name
            for suf in (".gz", ".csv", ".tsv", ".txt", ".parquet", ".pq"):
                if stem.lower().endswith(suf):
                    stem = stem[: -len(suf)]
            const["symbol"] = stem
        groups = ((("bid_px", "bid_sz", "ask_px", "ask_sz"), "quote"), (("price", "size"), "trade"))
        for group, label in groups:
            got = [f for f in group if f in cols or f in const]
            if got and len(got) < len(group):
                lack = [f for f in group if f not in got]
                raise ValueError(
                    f"{path}: mapping: {label} field(s) {lack} not mapped (mapped: {got}); "
                    f"map all of {list(group)}, e.g. --map {lack[0]}=COLUMN; the file has columns {columns}"
                )
        if not any(f in cols for f in ("price", "bid_px")):
            raise ValueError(
                f"{path}: mapping: neither price/size nor bid/ask columns are mapped; "
                f"the file has columns {columns}"
            )
    plan = _Plan(cols=cols, const=const, shape=shape)
    if "kind" not in cols and "kind" not in const:
        has_quotes = "bid_px" in cols
        if shape == "trades" or (mp.explicit and not has_quotes and shape != "l3"):
            plan.default_kind = KIND_TRADE
        else:
            raise ValueError(
                f"{path}: no kind column; map it (--map kind=COLUMN) or use --shape trades "
                f"for a trade-only file; the file has columns {columns}"
            )
    return plan


# =========================================================================== column parsing
