"""What each feature means: name, unit, range, neutral value, formula and description, per feature set.

:meth:`features.featureset.FeatureSet.describe` returns these rows (``tickscore
features`` and model metadata show them); the values in them (ranges,
half-lives) come from the feature set's parameters.

Feature set ``l1`` (version 1)
------------------------------

Computed by :mod:`features.kernels` on every accepted quote or trade, from the
instrument's state at the event time ``t`` (int64 ns).  Notation: ``b, a, B, A``
= bid/ask price and size of the last quote, ``m = (b + a) / 2``,
``r_i = 1e4 * (log m_i - log m_{i-1})`` the log-mid return of quote ``i`` in bps,
``w_h(s) = exp(-ln2 * (t - s) / h)`` the time-decay weight of an event at time
``s`` for half-life ``h`` (ns), ``lam_h = ln2 / h`` (per s when ``h`` is in s).
The three return/volatility half-lives are ``h_fast, h_mid, h_slow`` (defaults
100 ms, 1 s, 10 s).  Every feature is clipped to its range; a clip sets
``FLAG_CLIPPED``.  "Neutral" is the value written while a feature is undefined.

Each entry: ``name`` [unit, range with default params, neutral value] formula.

``spread_bps`` [bps, 0 .. 1000, 0]
    ``1e4 * (a - b) / m``.
``micro_offset_bps`` [bps, -500 .. 500, 0]
    ``1e4 * (micro - m) / m`` with ``micro = (b A + a B) / (A + B)``; computed as
    ``spread_bps * l1_imbalance / 2`` (identical, overflow-free).
``l1_imbalance`` [1, -1 .. 1, 0]
    ``(B - A) / (B + A)``.
``ret_fast_bps``, ``ret_mid_bps``, ``ret_slow_bps`` [bps, -500 .. 500, 0]
    ``sum_i r_i * w_h(t_i)``: time-decayed sum of log-mid returns, which equals
    ``1e4 * log m(t)`` minus its continuous-time EMA.
``log_vol_fast``, ``log_vol_mid``, ``log_vol_slow`` [log1p(bps/sqrt(s)), 0 .. log1p(1000), 0]
    ``log1p(sqrt(sum_i r_i^2 w_h(t_i) / T_h))`` with ``T_h = integral of w_h(s) ds``
    over the time the instrument had a book (s): realised vol per sqrt(second).
    Neutral (0) while ``T_h = 0`` (no event time elapsed since the first quote).
``spread_rel`` [log ratio, -5 .. 5, 0]
    ``log((spread_bps + f) / (E + f))``, ``E`` = continuous-time EMA (half-life
    ``hl_spread_ns``) of the spread held between events, ``f = spread_floor_bps``
    (0.1) so a locked quote stays finite.
``log_quote_rate`` [log1p(1/s), 0 .. log1p(1e5), 0]
    ``log1p(lam_q * sum_quotes w_q(t_j))``, half-life ``hl_quote_ns``.
``trade_flow_imb`` [1, -1 .. 1, 0]
    ``sum_j side_j v_j w_tr(t_j) / sum_j v_j w_tr(t_j)``, half-life ``hl_trade_ns``.
``log_trade_rate`` [log1p(1/s), 0 .. log1p(1e5), 0]
    ``log1p(lam_tr * sum_trades w_tr(t_j))``, half-life ``hl_trade_ns``.
``vwap_dev_bps`` [bps, -500 .. 500, 0]
    ``1e4 * log(m / VWAP)``, ``VWAP = sum p_j v_j w_vw(t_j) / sum v_j w_vw(t_j)``,
    half-life ``hl_vwap_ns``.  Neutral without a book or without trades.
``log_trade_age_s`` [log1p(s), 0 .. log1p(86400), see (1)]
    ``log1p((t - t_last_trade) / 1e9)``.
``log_quote_age_s`` [log1p(s), 0 .. log1p(86400), see (1)]
    ``log1p((t - t_last_quote) / 1e9)``; 0 on a quote.

(1) before the instrument's first trade (quote): seconds since its first accepted
event, a lower bound of the true age.  ``side_j`` is the aggressor sign (+1 buy,
-1 sell, 0 unknown: counts in the volume, not in the signed volume).

Why these forms: the returns feature is the time-decayed sum of returns, equal
to ``log m(t)`` minus the continuous-time EMA of the log mid, so it is defined for
any spacing (a simultaneous quote is not down-weighted as ``(1 - a) r`` would);
volatility divides decayed squared returns by decayed elapsed time, so it is a
per-time quantity (bps per sqrt(second)) that falls during quiet periods;
intensities are decayed counts times ``lam`` (steady state = the event rate).

Quotes move the book features, returns and volatility; trades move the trade
features.  All accumulators decay to ``t`` on every event.

Flags (``engine.schema.FLAG_*``) returned with each vector:

* ``FLAG_WARMUP``: fewer than ``warmup_events`` accepted events for the
  instrument (including this one), or less than ``warmup_ns`` since its first;
* ``FLAG_NO_BOOK``: no quote yet (book, return, volatility, spread_rel,
  quote-rate and VWAP features are neutral);
* ``FLAG_STALE_QUOTE``: on a trade, the last quote is older than
  ``stale_quote_ns`` (event time).  Not set when there is no quote at all;
* ``FLAG_CLIPPED``: at least one feature was clipped (or was NaN and replaced by
  its neutral value, e.g. after a price * size overflow).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["l1_rows", "trades_rows", "l3_rows"]


def l1_rows(p: dict[str, float]) -> list[dict[str, Any]]:
    """Return one dict per L1 feature (name, unit, range, neutral, formula, description)."""
    hl = {
        "fast": p["hl_ret_fast_ns"],
        "mid": p["hl_ret_mid_ns"],
        "slow": p["hl_ret_slow_ns"],
    }

    def _hl(ns: float) -> str:
        return f"{ns / 1e9:g} s"

    rows: list[dict[str, Any]] = [
        {
            "name": "spread_bps",
            "unit": "bps",
            "range": [0.0, p["spread_max_bps"]],
            "neutral": 0.0,
            "formula": "1e4 * (ask - bid) / mid",
            "description": "Quoted L1 spread relative to the mid.",
        },
        {
            "name": "micro_offset_bps",
            "unit": "bps",
            "range": [-0.5 * p["spread_max_bps"], 0.5 * p["spread_max_bps"]],
            "neutral": 0.0,
            "formula": "1e4 * (microprice - mid) / mid = spread_bps * l1_imbalance / 2",
            "description": "Size-weighted microprice offset from the mid.",
        },
        {
            "name": "l1_imbalance",
            "unit": "1",
            "range": [-1.0, 1.0],
            "neutral": 0.0,
            "formula": "(bid_sz - ask_sz) / (bid_sz + ask_sz)",
            "description": "L1 size imbalance of the last quote.",
        },
    ]
    for k in ("fast", "mid", "slow"):
        rows.append(
            {
                "name": f"ret_{k}_bps",
                "unit": "bps",
                "range": [-p["ret_max_bps"], p["ret_max_bps"]],
                "neutral": 0.0,
                "formula": "sum_i r_i * exp(-ln2 (t - t_i) / h), r_i = 1e4 dlog(mid)",
                "description": (
                    f"Time-decayed sum of log-mid returns, half-life {_hl(hl[k])} "
                    "(= log mid minus its continuous-time EMA)."
                ),
            }
        )
    for k in ("fast", "mid", "slow"):
        rows.append(
            {
                "name": f"log_vol_{k}",
                "unit": "log1p(bps/sqrt(s))",
                "range": [0.0, math.log1p(p["vol_max_bps_sqrt_s"])],
                "neutral": 0.0,
                "formula": "log1p(sqrt(sum_i r_i^2 w_i / decayed time with a book in s))",
                "description": f"Realised volatility per sqrt(second), half-life {_hl(hl[k])}.",
            }
        )
    rows += [
        {
            "name": "spread_rel",
            "unit": "log ratio",
            "range": [-p["spread_rel_max"], p["spread_rel_max"]],
            "neutral": 0.0,
            "formula": "log((spread_bps + f) / (EMA(spread_bps) + f)), f = spread_floor_bps",
            "description": (
                "Spread relative to its time-EMA (of the spread held between events), "
                f"half-life {_hl(p['hl_spread_ns'])}."
            ),
        },
        {
            "name": "log_quote_rate",
            "unit": "log1p(1/s)",
            "range": [0.0, math.log1p(p["rate_max_per_s"])],
            "neutral": 0.0,
            "formula": "log1p(ln2 / h * sum_quotes exp(-ln2 (t - t_j) / h))",
            "description": f"Quote intensity, half-life {_hl(p['hl_quote_ns'])}.",
        },
        {
            "name": "trade_flow_imb",
            "unit": "1",
            "range": [-1.0, 1.0],
            "neutral": 0.0,
            "formula": "sum side_j size_j w_j / sum size_j w_j",
            "description": (
                f"Signed (aggressor) trade volume share, half-life {_hl(p['hl_trade_ns'])}."
            ),
        },
        {
            "name": "log_trade_rate",
            "unit": "log1p(1/s)",
            "range": [0.0, math.log1p(p["rate_max_per_s"])],
            "neutral": 0.0,
            "formula": "log1p(ln2 / h * sum_trades exp(-ln2 (t - t_j) / h))",
            "description": f"Trade intensity, half-life {_hl(p['hl_trade_ns'])}.",
        },
        {
            "name": "vwap_dev_bps",
            "unit": "bps",
            "range": [-p["vwap_dev_max_bps"], p["vwap_dev_max_bps"]],
            "neutral": 0.0,
            "formula": "1e4 * log(mid / VWAP), VWAP = sum p_j v_j w_j / sum v_j w_j",
            "description": (
                f"Mid relative to the decayed VWAP, half-life {_hl(p['hl_vwap_ns'])}."
            ),
        },
        {
            "name": "log_trade_age_s",
            "unit": "log1p(s)",
            "range": [0.0, math.log1p(p["age_max_s"])],
            "neutral": "seconds since the instrument's first event (log1p)",
            "formula": "log1p((t - t_last_trade) / 1e9)",
            "description": "Event-time age of the last trade.",
        },
        {
            "name": "log_quote_age_s",
            "unit": "log1p(s)",
            "range": [0.0, math.log1p(p["age_max_s"])],
            "neutral": "seconds since the instrument's first event (log1p)",
            "formula": "log1p((t - t_last_quote) / 1e9)",
            "description": "Event-time age of the last quote (0 on a quote).",
        },
    ]
    return rows


def trades_rows(p: dict[str, float]) -> list[dict]:
    """Return one dict per feature (name, unit, range, neutral, formula, description)."""
    hl = {"fast": p["hl_ret_fast_ns"], "mid": p["hl_ret_mid_ns"], "slow": p["hl_ret_slow_ns"]}
    lg = math.log1p
    rows = []
    for k in ("fast", "mid", "slow"):
        rows.append({
            "name": f"ret_{k}_bps", "unit": "bps", "range": [-p["ret_max_bps"], p["ret_max_bps"]],
            "neutral": 0.0, "formula": "sum_i r_i w_h(t_i), r_i = 1e4 dlog(trade price)",
            "description": f"Time-decayed sum of trade-price log returns, half-life {hl[k] / 1e9:g} s.",
        })
    for k in ("fast", "mid", "slow"):
        rows.append({
            "name": f"log_vol_{k}", "unit": "log1p(bps/sqrt(s))",
            "range": [0.0, lg(p["vol_max_bps_sqrt_s"])], "neutral": 0.0,
            "formula": "log1p(sqrt(sum_i r_i^2 w_i / decayed time since the first trade))",
            "description": f"Realised volatility of trade prices, half-life {hl[k] / 1e9:g} s.",
        })
    rows += [
        {"name": "trade_flow_imb", "unit": "1", "range": [-1.0, 1.0], "neutral": 0.0,
         "formula": "sum side_j size_j w_j / sum size_j w_j (tick rule when side unknown)",
         "description": f"Signed volume share, half-life {p['hl_trade_ns'] / 1e9:g} s."},
        {"name": "log_trade_rate", "unit": "log1p(1/s)", "range": [0.0, lg(p["rate_max_per_s"])],
         "neutral": 0.0, "formula": "log1p(ln2 / h * sum_j w_h(t_j))",
         "description": f"Trade intensity, half-life {p['hl_trade_ns'] / 1e9:g} s."},
        {"name": "trade_rate_rel", "unit": "log ratio", "range": [-p["rate_rel_max"], p["rate_rel_max"]],
         "neutral": 0.0, "formula": "log((rate_fast + 1e-3) / (rate_slow + 1e-3))",
         "description": f"Trade intensity relative to its {p['hl_slow_ns'] / 1e9:g} s level."},
        {"name": "vwap_dev_bps", "unit": "bps", "range": [-p["vwap_dev_max_bps"], p["vwap_dev_max_bps"]],
         "neutral": 0.0, "formula": "1e4 * log(price / VWAP_slow)",
         "description": f"Trade price against the decayed VWAP, half-life {p['hl_slow_ns'] / 1e9:g} s."},
        {"name": "log_size_rel", "unit": "log ratio", "range": [-p["size_rel_max"], p["size_rel_max"]],
         "neutral": 0.0, "formula": "log(size / decayed mean size before the trade)",
         "description": "Trade size relative to recent trades."},
        {"name": "log_trade_gap_s", "unit": "log1p(s)", "range": [0.0, lg(p["age_max_s"])],
         "neutral": 0.0, "formula": "log1p((t - t_previous_trade) / 1e9)",
         "description": "Event-time gap since the instrument's previous trade (0 on the first)."},
    ]
    return rows


def l3_rows(p: dict[str, float]) -> list[dict]:
    """Return one dict per feature (name, unit, range, neutral, formula, description)."""
    lg = math.log1p
    sm = p["spread_max_bps"]
    hl = {"fast": p["hl_ret_fast_ns"], "mid": p["hl_ret_mid_ns"], "slow": p["hl_ret_slow_ns"]}
    ns, nl = int(p["depth_levels_short"]), int(p["depth_levels_long"])
    rows = [
        {"name": "spread_bps", "unit": "bps", "range": [0.0, sm], "neutral": 0.0,
         "formula": "1e4 * (best_ask - best_bid) / mid", "description": "Spread of the rebuilt book."},
        {"name": "micro_offset_bps", "unit": "bps", "range": [-sm / 2, sm / 2], "neutral": 0.0,
         "formula": "spread_bps * l1_imbalance / 2", "description": "Microprice offset from the mid."},
        {"name": "l1_imbalance", "unit": "1", "range": [-1.0, 1.0], "neutral": 0.0,
         "formula": "(B - A) / (B + A), sizes at the best levels", "description": "Top-level imbalance."},
        {"name": "depth_imb_short", "unit": "1", "range": [-1.0, 1.0], "neutral": 0.0,
         "formula": f"(sum bid sizes - sum ask sizes) / total over the first {ns} levels per side",
         "description": "Depth imbalance, short (defined on a one-sided book: +-1)."},
        {"name": "depth_imb_long", "unit": "1", "range": [-1.0, 1.0], "neutral": 0.0,
         "formula": f"same over the first {nl} levels per side", "description": "Depth imbalance, long."},
    ]
    for k in ("fast", "mid", "slow"):
        rows.append({
            "name": f"ret_{k}_bps", "unit": "bps", "range": [-p["ret_max_bps"], p["ret_max_bps"]],
            "neutral": 0.0, "formula": "sum_i r_i w_h(t_i), r_i = 1e4 dlog(mid) on top-of-book changes",
            "description": f"Time-decayed sum of mid returns, half-life {hl[k] / 1e9:g} s.",
        })
    for k in ("fast", "mid", "slow"):
        rows.append({
            "name": f"log_vol_{k}", "unit": "log1p(bps/sqrt(s))",
            "range": [0.0, lg(p["vol_max_bps_sqrt_s"])], "neutral": 0.0,
            "formula": "log1p(sqrt(sum_i r_i^2 w_i / decayed time with a two-sided book))",
            "description": f"Realised mid volatility, half-life {hl[k] / 1e9:g} s.",
        })
    hb = p["hl_book_ns"] / 1e9
    rows += [
        {"name": "log_book_rate", "unit": "log1p(1/s)", "range": [0.0, lg(p["rate_max_per_s"])],
         "neutral": 0.0, "formula": "log1p(ln2 / h * sum_book_events w_h)",
         "description": f"Add/modify/delete intensity (snapshot excluded), half-life {hb:g} s."},
        {"name": "order_flow_imb", "unit": "1", "range": [-1.0, 1.0], "neutral": 0.0,
         "formula": "sum side (added - cancelled) w / sum (added + cancelled) w",
         "description": f"Signed order-flow share of book events, half-life {hb:g} s."},
        {"name": "cancel_share", "unit": "1", "range": [0.0, 1.0], "neutral": 0.0,
         "formula": "cancelled / (added + cancelled), decayed",
         "description": f"Share of cancelled volume in book flow, half-life {hb:g} s."},
        {"name": "trade_flow_imb", "unit": "1", "range": [-1.0, 1.0], "neutral": 0.0,
         "formula": "sum aggressor_side size w / sum size w",
         "description": f"Signed trade volume share (fills: opposite of the resting side), half-life "
                        f"{p['hl_trade_ns'] / 1e9:g} s."},
        {"name": "log_trade_rate", "unit": "log1p(1/s)", "range": [0.0, lg(p["rate_max_per_s"])],
         "neutral": 0.0, "formula": "log1p(ln2 / h * sum_trades w_h)",
         "description": f"Trade intensity, half-life {p['hl_trade_ns'] / 1e9:g} s."},
        {"name": "vwap_dev_bps", "unit": "bps", "range": [-p["vwap_dev_max_bps"], p["vwap_dev_max_bps"]],
         "neutral": 0.0, "formula": "1e4 * log(mid / VWAP)",
         "description": f"Mid against the decayed VWAP, half-life {p['hl_vwap_ns'] / 1e9:g} s."},
        {"name": "log_trade_age_s", "unit": "log1p(s)", "range": [0.0, lg(p["age_max_s"])],
         "neutral": "seconds since the instrument's first event (log1p)",
         "formula": "log1p((t - t_last_trade) / 1e9)", "description": "Event-time age of the last trade."},
        {"name": "log_top_age_s", "unit": "log1p(s)", "range": [0.0, lg(p["age_max_s"])],
         "neutral": "seconds since the instrument's first event (log1p)",
         "formula": "log1p((t - t_last_top_change) / 1e9)",
         "description": "Event-time age of the best bid/ask prices."},
    ]
    return rows
