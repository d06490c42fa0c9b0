"""Versioned feature sets: names, column order, parameters and a stable id.

The id is stored in the model file and checked at load, so a model is never fed
columns it was not trained on, nor columns computed with other half-lives.

Three families, one per event shape (their kernels: :mod:`features.registry`):

* ``l1`` (below): L1 quotes and trades, :mod:`features.kernels`;
* ``trades``: trade-only feeds (time, price, size, optional aggressor side),
  :mod:`features.kernels_trades`; no feature needs a book;
* ``l3``: order-by-order events rebuilt into a book,
  :mod:`features.kernels_l3` and :mod:`features.book`.

Each feature set says what each of its features needs (``FeatureSet.requires``:
``"book"`` = a quote or a rebuilt book, ``"depth"`` = levels beyond the top,
``"trades"``) and :meth:`FeatureSet.unavailable` lists the features a given
event shape cannot provide; the replay warns when a model is fed such a shape
(those features are then neutral and every score carries ``FLAG_NO_BOOK``).

What each feature means (formulas, units, ranges, the notation) is in
:mod:`features.describe`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import numpy as np

from features import kernels_l3, kernels_trades
from features.describe import l1_rows, l3_rows, trades_rows
from features.kernels import FEATURE_NAMES, PARAM_NAMES

__all__ = [
    "FeatureSet",
    "DEFAULT_FEATURE_SET",
    "TRADES_FEATURE_SET",
    "L3_FEATURE_SET",
    "DEFAULT_BY_SHAPE",
    "SHAPES",
    "get_feature_set",
    "known_feature_sets",
]

_DEFAULT_PARAMS: dict[str, float] = {
    "hl_ret_fast_ns": 100e6,
    "hl_ret_mid_ns": 1e9,
    "hl_ret_slow_ns": 10e9,
    "hl_trade_ns": 1e9,
    "hl_vwap_ns": 10e9,
    "hl_spread_ns": 10e9,
    "hl_quote_ns": 1e9,
    "warmup_events": 50.0,
    "warmup_ns": 10e9,
    "stale_quote_ns": 1e9,
    "spread_max_bps": 1000.0,
    "ret_max_bps": 500.0,
    "vol_max_bps_sqrt_s": 1000.0,
    "rate_max_per_s": 1e5,
    "vwap_dev_max_bps": 500.0,
    "age_max_s": 86400.0,
    "spread_floor_bps": 0.1,
    "spread_rel_max": 5.0,
}

# Parameters that may be 0 (all others must be > 0).
_MAY_BE_ZERO = ("warmup_events", "warmup_ns", "uncross")

#: Event shapes and what each provides.
SHAPES: dict[str, frozenset[str]] = {
    "l1": frozenset({"book", "trades"}),
    "trades": frozenset({"trades"}),
    "l3": frozenset({"book", "depth", "trades"}),
}


def _family_specs() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Return ``{family: (feature names, param names)}`` from the kernels modules."""
    return {
        "l1": (FEATURE_NAMES, PARAM_NAMES),
        "trades": (kernels_trades.FEATURE_NAMES, kernels_trades.PARAM_NAMES),
        "l3": (kernels_l3.FEATURE_NAMES, kernels_l3.PARAM_NAMES),
    }


_L1_BOOK = ("spread_bps", "micro_offset_bps", "l1_imbalance", "ret_fast_bps", "ret_mid_bps",
            "ret_slow_bps", "log_vol_fast", "log_vol_mid", "log_vol_slow", "spread_rel",
            "log_quote_rate", "vwap_dev_bps", "log_quote_age_s")  # fmt: skip
_L3_BOOK = ("spread_bps", "micro_offset_bps", "l1_imbalance", "ret_fast_bps", "ret_mid_bps",
            "ret_slow_bps", "log_vol_fast", "log_vol_mid", "log_vol_slow", "vwap_dev_bps",
            "log_top_age_s")  # fmt: skip
_L3_DEPTH = ("depth_imb_short", "depth_imb_long", "log_book_rate", "order_flow_imb", "cancel_share")

#: Which kernels consume which shapes (kinds outside a kernel's set are rejected as bad_kind).
_CONSUMES = {"l1": ("l1", "trades"), "trades": ("trades", "l1", "l3"), "l3": ("l3",)}


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """A versioned feature set: column names/order and kernel parameters.

    Parameters
    ----------
    name : str
        Family name: ``"l1"``, ``"trades"`` or ``"l3"``.
    version : int
        Bumped whenever a formula changes (parameters changes show in ``id``).
    names : tuple of str
        Column names in the order of ``x`` (the family kernel's ``FEATURE_NAMES``).
    params : dict of str to float
        Half-lives (ns), thresholds and clip bounds, keyed by the family
        kernel's ``PARAM_NAMES``.  Copied at construction; treat as read-only.
    """

    name: str
    version: int
    names: tuple[str, ...]
    params: dict[str, float]

    def __post_init__(self) -> None:
        specs = _family_specs()
        if self.name not in specs:
            raise ValueError(f"unknown feature-set family {self.name!r}; known: {sorted(specs)}")
        kernel_names, param_names = specs[self.name]
        names = tuple(self.names)
        if len(names) != len(kernel_names):
            raise ValueError(f"names must have {len(kernel_names)} entries, got {len(names)}")
        if names != kernel_names:
            raise ValueError(
                f"names must be the kernel's column order {kernel_names}, got {names}"
            )
        params = {k: float(v) for k, v in self.params.items()}
        missing = sorted(set(param_names) - set(params))
        extra = sorted(set(params) - set(param_names))
        if missing or extra:
            raise ValueError(f"bad params: missing {missing}, unknown {extra}")
        for k, v in params.items():
            positive = k not in _MAY_BE_ZERO
            if not math.isfinite(v) or v < 0.0 or (positive and v == 0.0):
                bound = "> 0" if positive else ">= 0"
                raise ValueError(f"param {k} must be finite and {bound}, got {v}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "params", {k: params[k] for k in param_names})

    def __hash__(self) -> int:
        return hash(self.id)

    def canonical_json(self) -> str:
        """Return the canonical JSON (sorted keys, no spaces) the id is hashed from."""
        doc = {
            "name": self.name,
            "version": int(self.version),
            "names": list(self.names),
            "params": {k: float(v) for k, v in self.params.items()},
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)

    @property
    def id(self) -> str:
        """Return ``"<name>.v<version>.<first 12 hex of sha256(canonical_json)>"``."""
        digest = hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()
        return f"{self.name}.v{int(self.version)}.{digest[:12]}"

    def params_array(self) -> np.ndarray:
        """Return the kernel parameter vector (float64, order of the family's ``PARAM_NAMES``)."""
        return np.array(list(self.params.values()), dtype=np.float64)

    def with_params(self, **overrides: float) -> FeatureSet:
        """Return a copy with some parameters replaced (the id changes accordingly)."""
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            raise KeyError(f"unknown params {unknown}; known: {list(self.params)}")
        return dataclasses.replace(self, params={**self.params, **overrides})

    @property
    def requires(self) -> dict[str, str]:
        """Return what each feature needs: ``"book"``, ``"depth"`` or ``"trades"``."""
        if self.name == "l1":
            return {n: ("book" if n in _L1_BOOK else "trades") for n in self.names}
        if self.name == "l3":
            return {
                n: ("book" if n in _L3_BOOK else "depth" if n in _L3_DEPTH else "trades")
                for n in self.names
            }
        return {n: "trades" for n in self.names}

    @property
    def shapes(self) -> tuple[str, ...]:
        """Return the event shapes whose events this feature set's kernel consumes."""
        return _CONSUMES[self.name]

    def unavailable(self, shape: str) -> list[str]:
        """Return the features that a file of event ``shape`` cannot provide (neutral values).

        Raises ``ValueError`` for an unknown shape.  A shape the kernel does not
        consume at all (e.g. L3 events for the ``l1`` set) makes every feature
        unavailable.
        """
        if shape not in SHAPES:
            raise ValueError(f"unknown event shape {shape!r}; known: {sorted(SHAPES)}")
        if shape not in self.shapes:
            return list(self.names)
        have = SHAPES[shape]
        return [n for n, need in self.requires.items() if need not in have]

    def describe(self) -> list[dict[str, Any]]:
        """Return one dict per feature (name, unit, range, neutral, formula, description)."""
        rows = {"l1": l1_rows, "trades": trades_rows, "l3": l3_rows}[self.name](self.params)
        assert tuple(r["name"] for r in rows) == self.names
        return rows


DEFAULT_FEATURE_SET = FeatureSet(name="l1", version=1, names=FEATURE_NAMES, params=_DEFAULT_PARAMS)


def _make_default_sets() -> tuple[FeatureSet, FeatureSet]:
    trades = FeatureSet(
        name="trades", version=1, names=kernels_trades.FEATURE_NAMES,
        params=kernels_trades.DEFAULT_PARAMS,
    )  # fmt: skip
    l3 = FeatureSet(name="l3", version=1, names=kernels_l3.FEATURE_NAMES, params=kernels_l3.DEFAULT_PARAMS)
    return trades, l3


#: Default trade-only feature set (``trades``) and L3 book feature set (``l3``).
TRADES_FEATURE_SET, L3_FEATURE_SET = _make_default_sets()
#: Default feature set per event shape.
DEFAULT_BY_SHAPE: dict[str, FeatureSet] = {
    "l1": DEFAULT_FEATURE_SET,
    "trades": TRADES_FEATURE_SET,
    "l3": L3_FEATURE_SET,
}

_REGISTRY: dict[str, FeatureSet] = {
    fs.id: fs for fs in (DEFAULT_FEATURE_SET, TRADES_FEATURE_SET, L3_FEATURE_SET)
}


def known_feature_sets() -> list[str]:
    """Return the ids of the registered feature sets."""
    return sorted(_REGISTRY)


def get_feature_set(id_or_name: str) -> FeatureSet:
    """Return a registered feature set by id (``"l1.v1.<hash>"``) or by name (latest version).

    Raises
    ------
    KeyError
        If no registered feature set has that id or name; the message lists the
        known ids.
    """
    fs = _REGISTRY.get(id_or_name)
    if fs is not None:
        return fs
    by_name = [f for f in _REGISTRY.values() if f.name == id_or_name]
    if by_name:
        return max(by_name, key=lambda f: f.version)
    raise KeyError(f"unknown feature set {id_or_name!r}; known ids: {known_feature_sets()}")
