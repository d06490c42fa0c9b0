"""Kernels of each feature-set family: ``kernels_for(feature_set) -> Kernels``.

Every family's kernels have the signatures of :mod:`features.kernels`:

* ``update_tick(ticks, i, fstate, istate, params, x_out, counters) -> int``
  (live: one numba dispatch per tick);
* ``compute_batch(ticks, fstate, istate, params, X_out, flags_out, counters) -> int``;
* ``new_state(n_instruments) -> (fstate, istate)``;
* ``apply_tick``: the ``@njit`` per-event core both of the above run, for use
  inside other ``@njit`` code (a fused features + model kernel).

``anomalies(istate) -> dict`` returns the per-family counters of accepted
events that needed a documented messy-data rule (L3 book only; empty for the
other families).

Usage::

    from features.featureset import get_feature_set
    from features.registry import kernels_for

    fs = get_feature_set(model_metadata.feature_set_id)
    k = kernels_for(fs)
    fstate, istate = k.new_state(len(symbols))
    k.compute_batch(ticks, fstate, istate, fs.params_array(), X, flags, counters)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from features import book
from features import kernels as k_l1
from features import kernels_l3 as k_l3
from features import kernels_trades as k_trades
from features.book import layout as book_layout

__all__ = ["Kernels", "kernels_for", "FAMILIES"]

#: Feature-set families with kernels.
FAMILIES = ("l1", "trades", "l3")


class Kernels(NamedTuple):
    """The kernels of one feature-set family (see the module docstring)."""

    update_tick: Callable
    compute_batch: Callable
    new_state: Callable
    apply_tick: Callable
    family: str
    n_features: int
    anomalies: Callable[[np.ndarray], dict[str, int]]
    #: ``trades_seen(istate) -> int``: instruments that have seen a trade (-1: the family needs none)
    trades_seen: Callable[[np.ndarray], int] = lambda istate: -1


def _no_anomalies(istate: np.ndarray) -> dict[str, int]:
    return {}


def _l1_trades_seen(istate: np.ndarray) -> int:
    return int((istate[:, k_l1.I_LAST_TRADE_TS] != np.iinfo(np.int64).min).sum())


def _l3_trades_seen(istate: np.ndarray) -> int:
    n = int(istate[book_layout.H_N_INST])
    off = int(istate[book_layout.H_OFF_INST])
    blk = istate[off : off + n * book_layout.NI_INST].reshape(n, book_layout.NI_INST)
    return int((blk[:, book_layout.I_LAST_TRADE_TS] != np.iinfo(np.int64).min).sum())


@functools.cache
def _family(name: str, max_orders: int | None, max_levels: int | None,
            crossing_add: str | None = None) -> Kernels:
    if name == "l1":
        m = k_l1
        return Kernels(m.update_tick, m.compute_batch, m.new_state, m.apply_tick, "l1",
                       m.N_FEATURES, _no_anomalies, _l1_trades_seen)  # fmt: skip
    if name == "trades":
        m = k_trades
        return Kernels(m.update_tick, m.compute_batch, m.new_state, m.apply_tick, "trades",
                       m.N_FEATURES, _no_anomalies)  # fmt: skip
    if name == "l3":
        m = k_l3
        kw = {}
        if max_orders is not None:
            kw["max_orders"] = int(max_orders)
        if max_levels is not None:
            kw["max_levels"] = int(max_levels)
        if crossing_add is not None:
            kw["crossing_add"] = str(crossing_add)
        new_state = functools.partial(m.new_state, **kw) if kw else m.new_state
        return Kernels(m.update_tick, m.compute_batch, new_state, m.apply_tick, "l3",
                       m.N_FEATURES, book.anomaly_counts, _l3_trades_seen)  # fmt: skip
    raise KeyError(f"no kernels for feature-set family {name!r}; known: {list(FAMILIES)}")


def kernels_for(
    feature_set: Any, *, max_orders: int | None = None, max_levels: int | None = None,
    crossing_add: str | None = None,
) -> Kernels:
    """Return the :class:`Kernels` of ``feature_set`` (a FeatureSet, its id or family name).

    ``max_orders`` / ``max_levels`` size the L3 book (live orders of all
    instruments, price levels per side) and ``crossing_add`` says what a
    marketable add means on the venue; none of them is a feature parameter (see
    :func:`features.kernels_l3.new_state`).  Ignored by the other families.
    """
    if isinstance(feature_set, str):
        name = feature_set.split(".", 1)[0]
    else:
        name = getattr(feature_set, "name", None)
        if name is None:
            raise TypeError(f"expected a FeatureSet, an id or a family name, got {feature_set!r}")
    return _family(name, max_orders, max_levels, crossing_add)
