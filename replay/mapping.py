"""Column mapping: replay another vendor's file layout without converting it by hand.

A mapping says which vendor column feeds which field of the normalised tick
schema (:mod:`replay.reader`), in which units, and how event and side codes
translate.  It is given on the command line (``--map``, repeatable) or in a
small TOML file (``--map-file``); both use the same keys.

Syntax
------

Flat (CLI): comma-separated ``key=value`` pairs::

    --map ts_event=exchange_timestamp,price=Price,size=Qty,ts_unit=us
    --map symbol==BTCUSDT                      # a value starting with '=' is a constant
    --map kinds.A=add,kinds.C=delete,sides.B=buy,sides.A=sell

TOML (``--map-file``): the same keys at top level, code tables as tables::

    preset = "lobster"
    ts_date = "2012-06-21"
    symbol = "=AAPL"
    [kinds]
    "1" = "add"

Later keys override earlier ones: preset, then the file, then ``--map`` flags
in order.

Every key (fields, units, timestamps, price encodings, event and side codes,
``crossing_add`` for L3 venues) is documented once, in the README's
"Bringing your own data"; :data:`FIELDS` lists the fields and
:func:`build_mapping` checks every key and value with a message naming it.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import tomllib
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.schema import CROSSING_ADD_POLICIES

__all__ = [
    "FIELDS",
    "KIND_CODES",
    "PRESETS",
    "ColumnMapping",
    "parse_map_args",
    "load_map_file",
    "build_mapping",
    "mapping_from_cli",
    "IDENTITY",
]

#: Normalised fields a mapping can feed.
FIELDS = (
    "ts_event", "ts_recv", "symbol", "kind", "side", "price", "size",
    "bid_px", "bid_sz", "ask_px", "ask_sz", "order_id",
)  # fmt: skip
_FIELD_ALIASES = {"ts_event_ns": "ts_event", "ts_recv_ns": "ts_recv"}

# Internal kind codes of the reader: the schema kinds 1..5 plus special actions.
KIND_SKIP = -1
KIND_CLEAR = -2
KIND_PRINT = -3
#: Kind names a code can map to -> internal code.
KIND_CODES: dict[str, int] = {
    "quote": 1,
    "trade": 2,
    "fill": 2,
    "add": 3,
    "modify": 4,
    "delete": 5,
    "cancel": 5,
    "book_add": 3,
    "book_modify": 4,
    "book_delete": 5,
    "print": KIND_PRINT,
    "clear": KIND_CLEAR,
    "skip": KIND_SKIP,
}
_DEFAULT_KINDS: dict[str, int] = {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5, **KIND_CODES}
_SIDE_NAMES = {"buy": 1, "sell": -1, "none": 0, "+1": 1, "1": 1, "-1": -1, "0": 0}
_DEFAULT_SIDES: dict[str, int] = {
    "1": 1, "+1": 1, "b": 1, "buy": 1, "bid": 1,
    "-1": -1, "s": -1, "sell": -1, "a": -1, "ask": -1, "offer": -1,
    "0": 0, "n": 0, "none": 0,
}  # fmt: skip
_TS_UNITS = ("auto", "ns", "us", "ms", "s", "datetime")
_SEPARATORS = {"comma": ",", "tab": "\t", "semicolon": ";", "pipe": "|", "space": " "}
_SHAPES = ("l1", "trades", "l3")

#: Built-in presets (key sets applied before the user's keys).
PRESETS: dict[str, dict[str, Any]] = {
    # The normalised schema itself (what a file without --map is read with).
    "normalised": {},
    # LOBSTER message file: Time(s after midnight), Type, Order ID, Size, Price(x10000), Direction.
    "lobster": {
        "shape": "l3",
        "header": "false",
        "ts_event": "column_1",
        "kind": "column_2",
        "order_id": "column_3",
        "size": "column_4",
        "price": "column_5",
        "side": "column_6",
        "ts_unit": "s",
        "ts_tz": "America/New_York",
        "price_scale": "0.0001",
        "trade_side": "resting",
        "crossing_add": "uncross",  # ITCH: a marketable order executes before it is ever added
        "kinds": {"1": "add", "2": "delete", "3": "delete", "4": "fill", "5": "print",
                  "6": "print", "7": "skip"},  # fmt: skip
        "sides": {"1": "buy", "-1": "sell"},
    },
    # Databento MBO (CSV or Parquet export, with or without pretty_px / pretty_ts).
    "databento-mbo": {
        "shape": "l3",
        "ts_event": "ts_event",
        "ts_recv": "ts_recv",
        "symbol": "symbol|instrument_id",
        "kind": "action",
        "side": "side",
        "price": "price",
        "size": "size",
        "order_id": "order_id",
        "price_int_scale": "1e-9",
        "crossing_add": "uncross",  # MBO: the aggressor is never added; fills arrive as C/M of makers
        "kinds": {"A": "add", "M": "modify", "C": "cancel", "R": "clear", "T": "print",
                  "F": "skip", "N": "skip"},  # fmt: skip
        "sides": {"B": "buy", "A": "sell", "N": "none"},
    },
}


@dataclass(frozen=True)
class ColumnMapping:
    """A validated mapping (see the module docstring for every key).

    ``columns[field]`` is a tuple of vendor column names (coalesced row by row);
    ``constants[field]`` a constant text value.  Code tables map lower-cased
    vendor codes to internal kind codes / side signs.
    """

    columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    constants: dict[str, str] = field(default_factory=dict)
    shape: str | None = None
    format: str = "auto"
    header: bool = True
    separator: str = ","
    ts_unit: str = "auto"
    ts_recv_unit: str | None = None
    ts_format: str | None = None
    ts_tz: str = "UTC"
    ts_date: str | None = None
    price_scale: float = 1.0
    price_int_scale: float = 1.0
    size_scale: float = 1.0
    kinds: dict[str, int] = field(default_factory=lambda: dict(_DEFAULT_KINDS))
    sides: dict[str, int] = field(default_factory=lambda: dict(_DEFAULT_SIDES))
    trade_side: str = "aggressor"
    order_id_hash: str = "auto"
    crossing_add: str | None = None
    preset: str | None = None
    explicit: bool = True
    #: every key the mapping was built from (preset first), as given: the run summary records it
    keys: dict[str, Any] = field(default_factory=dict)

    def source(self, fld: str) -> tuple[str, ...]:
        """Return the vendor columns of ``fld`` (the field's own name if not mapped)."""
        return self.columns.get(fld, ())

    def describe(self) -> str:
        """Return a one-line human summary (for progress / errors)."""
        parts = [f"{k}<-{'|'.join(v)}" for k, v in self.columns.items()]
        parts += [f"{k}=={v}" for k, v in self.constants.items()]
        opts = f"ts_unit={self.ts_unit}"
        if self.ts_date:
            opts += f", ts_date={self.ts_date}"
        if self.ts_tz != "UTC":
            opts += f", ts_tz={self.ts_tz}"
        if self.crossing_add is not None:
            opts += f", crossing_add={self.crossing_add}"
        if self.price_scale != 1.0:
            opts += f", price_scale={self.price_scale:g}"
        if self.price_int_scale != 1.0:
            opts += f", price_int_scale={self.price_int_scale:g}"
        return f"{', '.join(parts)} ({opts})"


#: Mapping of a file in the normalised schema (ts in ns), used when no mapping is given.
IDENTITY = ColumnMapping(ts_unit="ns", explicit=False)


def _split_flat(text: str) -> list[str]:
    out, cur, quote = [], [], ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
            else:
                cur.append(ch)
        elif ch in "\"'":
            quote = ch
        elif ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def parse_map_args(items: Iterable[str]) -> dict[str, Any]:
    """Return the key dict of ``--map`` values (``k=v,k=v``; ``kinds.X=..`` nest).

    Raises ValueError on an item without ``=``.
    """
    spec: dict[str, Any] = {}
    for item in items:
        for pair in _split_flat(item):
            if "=" not in pair:
                raise ValueError(f"--map: expected key=value, got {pair!r}")
            key, value = pair.split("=", 1)
            key = key.strip()
            if "." in key and key.split(".", 1)[0] in ("kinds", "sides"):
                table, code = key.split(".", 1)
                spec.setdefault(table, {})[code] = value.strip()
            else:
                spec[key] = value.strip()
    return spec


def load_map_file(path: str | Path) -> dict[str, Any]:
    """Return the key dict of a TOML mapping file (``[const]`` table: constants)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"mapping file not found: {p}")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML: {e}") from e
    spec: dict[str, Any] = {}
    for k, v in doc.items():
        if k in ("const", "constants") and isinstance(v, dict):
            for f, c in v.items():
                spec[f] = "=" + str(c)
        elif k in ("kinds", "sides"):
            if not isinstance(v, dict):
                raise ValueError(f"{p}: [{k}] must be a table of code = name")
            spec[k] = {str(c): str(n) for c, n in v.items()}
        elif k in ("columns", "map") and isinstance(v, dict):
            spec.update({f: str(c) for f, c in v.items()})
        else:
            spec[k] = v
    return spec


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if k in ("kinds", "sides") and isinstance(v, Mapping):
            out[k] = {**out.get(k, {}), **v}
        else:
            out[k] = v
    return out


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    t = str(v).strip().lower()
    if t in ("true", "yes", "1", "on"):
        return True
    if t in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"mapping: {key} must be true or false, got {v!r}")


def _scale(key: str, v: Any) -> float:
    try:
        if isinstance(v, str) and "/" in v:
            a, b = v.split("/", 1)
            x = float(a) / float(b)
        else:
            x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"mapping: {key} must be a number like 0.0001 or 1/10000, got {v!r}") from None
    if not x > 0 or x != x or x == float("inf"):
        raise ValueError(f"mapping: {key} must be > 0, got {v!r}")
    return x


def norm_code(text: str) -> str:
    """Return the lookup form of a vendor code: trimmed, lower case, integral floats as ints."""
    t = str(text).strip().lower()
    try:
        f = float(t)
    except ValueError:
        return t
    if f == f and f not in (float("inf"), float("-inf")) and f == int(f) and "e" not in t:
        return str(int(f)) if not t.startswith("+") else t
    return t


def build_mapping(spec: Mapping[str, Any]) -> ColumnMapping:
    """Return a validated :class:`ColumnMapping` from a key dict (preset applied first).

    Raises
    ------
    ValueError
        Unknown key, bad value, unknown kind/side name; the message lists the
        valid choices.
    """
    spec = dict(spec)
    preset = spec.get("preset")
    if preset is not None:
        preset = str(preset).strip().lower().replace("_", "-")
        if preset not in PRESETS:
            raise ValueError(f"mapping: unknown preset {spec['preset']!r}; known: {sorted(PRESETS)}")
        spec = _merge(PRESETS[preset], {k: v for k, v in spec.items() if k != "preset"})
    columns: dict[str, tuple[str, ...]] = {}
    constants: dict[str, str] = {}
    kw: dict[str, Any] = {"preset": preset}
    kinds = dict(_DEFAULT_KINDS)
    sides = dict(_DEFAULT_SIDES)
    for key, value in spec.items():
        k = _FIELD_ALIASES.get(key, key)
        if k in FIELDS:
            text = str(value)
            if text.startswith("="):
                constants[k] = text[1:]
                columns.pop(k, None)
            else:
                names = tuple(c.strip() for c in text.split("|") if c.strip())
                if not names:
                    raise ValueError(f"mapping: {key} needs a column name")
                columns[k] = names
                constants.pop(k, None)
        elif k == "kinds":
            for code, name in dict(value).items():
                n = str(name).strip().lower()
                if n not in KIND_CODES:
                    raise ValueError(
                        f"mapping: kinds.{code} = {name!r} is not a kind; known: {sorted(KIND_CODES)}"
                    )
                kinds[norm_code(code)] = KIND_CODES[n]
        elif k == "sides":
            for code, name in dict(value).items():
                n = str(name).strip().lower()
                if n not in _SIDE_NAMES:
                    raise ValueError(f"mapping: sides.{code} = {name!r}; use buy, sell or none")
                sides[norm_code(code)] = _SIDE_NAMES[n]
        elif k == "shape":
            v = str(value).strip().lower()
            if v not in _SHAPES:
                raise ValueError(f"mapping: shape must be one of {list(_SHAPES)}, got {value!r}")
            kw["shape"] = v
        elif k == "format":
            v = str(value).strip().lower()
            if v not in ("auto", "csv", "parquet"):
                raise ValueError(f"mapping: format must be auto, csv or parquet, got {value!r}")
            kw["format"] = v
        elif k == "header":
            kw["header"] = _bool(k, value)
        elif k == "separator":
            v = str(value)
            v = _SEPARATORS.get(v.strip().lower(), v)
            if v == "\\t":
                v = "\t"
            if len(v) != 1:
                raise ValueError(f"mapping: separator must be one character or one of {list(_SEPARATORS)}")
            kw["separator"] = v
        elif k in ("ts_unit", "ts_recv_unit"):
            v = str(value).strip().lower()
            if v not in _TS_UNITS:
                raise ValueError(f"mapping: {k} must be one of {list(_TS_UNITS)}, got {value!r}")
            kw[k] = v
        elif k in ("ts_format", "ts_tz", "ts_date"):
            kw[k] = str(value).strip()
        elif k in ("price_scale", "price_int_scale", "size_scale"):
            kw[k] = _scale(k, value)
        elif k == "trade_side":
            v = str(value).strip().lower()
            if v not in ("aggressor", "resting"):
                raise ValueError(f"mapping: trade_side must be aggressor or resting, got {value!r}")
            kw[k] = v
        elif k == "order_id_hash":
            v = str(value).strip().lower()
            if v not in ("auto", "true", "false"):
                raise ValueError(f"mapping: order_id_hash must be auto, true or false, got {value!r}")
            kw[k] = v
        elif k == "crossing_add":
            v = str(value).strip().lower()
            if v not in CROSSING_ADD_POLICIES:
                raise ValueError(
                    f"mapping: crossing_add must be one of {list(CROSSING_ADD_POLICIES)}, got {value!r}"
                )
            kw[k] = v
        else:
            known = sorted(set(FIELDS) | {"kinds", "sides", "shape", "preset", "format", "header",
                                          "separator", "ts_unit", "ts_recv_unit", "ts_format", "ts_tz",
                                          "ts_date", "price_scale", "price_int_scale", "size_scale",
                                          "trade_side", "order_id_hash", "crossing_add"})  # fmt: skip
            raise ValueError(f"mapping: unknown key {key!r}; known keys: {known}")
    if "ts_date" in kw:
        try:
            _dt.date.fromisoformat(kw["ts_date"])
        except ValueError:
            raise ValueError(f"mapping: ts_date must be YYYY-MM-DD, got {kw['ts_date']!r}") from None
        if kw.get("ts_unit", "auto") == "auto":
            kw["ts_unit"] = "s"
    if "ts_tz" in kw:
        _check_tz(kw["ts_tz"])
    keys = {"preset": preset, **spec} if preset else spec  # (spec: the preset's keys, then the user's)
    return ColumnMapping(columns=columns, constants=constants, kinds=kinds, sides=sides, keys=keys, **kw)


def _check_tz(name: str) -> None:
    """Raise ValueError naming ``ts_tz`` unless ``name`` is an IANA time zone (close names suggested)."""
    try:
        zoneinfo.ZoneInfo(name)
        return
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        pass
    zones = zoneinfo.available_timezones()
    by_lower = {z.lower(): z for z in zones}
    tail = {z.rsplit("/", 1)[-1].lower(): z for z in zones}
    close = [z for z in (by_lower.get(name.lower()), tail.get(name.lower().replace(" ", "_"))) if z]
    close += [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)]
    hint = f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else " (e.g. UTC, America/New_York)"
    raise ValueError(f"mapping: ts_tz = {name!r} is not a time zone name (IANA, like America/Chicago){hint}")


def mapping_from_cli(
    map_items: Iterable[str] | None = None,
    map_file: str | Path | None = None,
    shape: str | None = None,
) -> ColumnMapping | None:
    """Return the mapping of ``--map-file`` then ``--map`` flags (None if neither is given).

    ``shape`` (``--shape``) overrides the mapping's ``shape`` key.
    """
    items = list(map_items or [])
    if map_file is None and not items:
        return None
    spec: dict[str, Any] = {}
    if map_file is not None:
        spec = _merge(spec, load_map_file(map_file))
    spec = _merge(spec, parse_map_args(items))
    m = build_mapping(spec)
    if shape is not None:
        m = replace(m, shape=shape)
    return m
