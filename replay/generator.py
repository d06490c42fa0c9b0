"""Seeded synthetic market: L1 quotes and trades for several instruments.

The generator is a small event-driven market simulation, written as one numba
kernel so millions of events take seconds.  Per instrument it keeps an L1 book
on an integer tick grid and simulates, in continuous time:

* **Volatility regimes**: a two-state Markov chain (calm / volatile) switching
  at random times; the volatile state multiplies event rates, makes price moves
  more frequent, spreads wider and jumps more likely.
* **Clustered activity**: trades arrive as a self-exciting (Hawkes) process
  with an exponential kernel (branching ratio 0.7) on top of a regime-modulated
  base rate; each trade also excites quote updates.  All arrivals are simulated
  exactly by Ogata thinning, so event spacing is irregular (integer ns).
* **Book dynamics**: quote events are either size updates (adds / cancels,
  mean-reverting to an instrument depth, skewed by a latent order-flow
  pressure) or mid moves.  A move is usually 1-2 ticks; occasionally a jump of
  several ticks.  Spreads are redrawn in ticks on every move (wider when
  volatile and after jumps), tighten when a new order improves inside the
  spread, and are never crossed or locked.  After a move the level left
  behind is rebuilt thin, so imbalance leans against the last move (bid-ask
  bounce: consecutive move signs are slightly negatively correlated, while the
  mid stays close to a martingale at longer horizons).
* **Trades** print at the ask (buyer-initiated, ``side=+1``) or at the bid
  (seller-initiated, ``side=-1``), consume the queue they hit and, when they
  exhaust it, move that side of the book one tick away.  Each trade is followed
  by the resulting quote at the same exchange time.
* **Information**: the direction of the next mid move is tilted by the size
  imbalance ``(bid_sz - ask_sz) / (bid_sz + ask_sz)`` and by recent signed
  trade flow (a hidden, mean-reverting order-flow pressure skews both); the
  probability of a big move (jump) rises with ``|imbalance|`` and ``|flow|``.
  On the default data the correlation of imbalance with the sign of the next
  mid move is about 0.3: a model fed book and flow features can learn
  something real, but far from everything.

Every event row gets ``ts_recv_ns = ts_event_ns + latency`` with a positive,
jittered latency (about 8 us + 12 us median), kept non-decreasing in file
order like a single feed handler's receive clock.  Events of all instruments
are interleaved in event-time order.

Randomness comes from a splitmix64 stream implemented in the kernel, so the
output depends only on the arguments (not on numpy's or numba's generators):
the same arguments give an identical frame.  The shipped default data set
(:func:`default_data_path`) is ``generate_market(DEFAULT_EVENTS,
DEFAULT_SYMBOLS, DEFAULT_SEED)``; regenerate it with::

    python -m replay.generator --out replay/default/market.parquet

Instrument parameters (tick size, price level, rates, queue depth, trade size)
come from the symbol's root (``ES``, ``NQ``, ``CL`` are built in, e.g.
``ESZ6`` -> ``ES``); other symbols get generic parameters and a price level
derived from a stable hash of the symbol.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gzip
import math
import os
import re
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from numba import njit

from engine.schema import KIND_QUOTE, KIND_TRADE

__all__ = [
    "DEFAULT_EVENTS",
    "DEFAULT_SEED",
    "DEFAULT_START_NS",
    "DEFAULT_SYMBOLS",
    "MARKET_SCHEMA",
    "InstrumentSpec",
    "default_data_path",
    "generate_market",
    "inject_bad_rows",
    "instrument_spec",
    "main",
    "write_market",
]

#: Symbols of the shipped default data set (E-mini S&P, E-mini Nasdaq, WTI crude).
DEFAULT_SYMBOLS: tuple[str, ...] = ("ESZ6", "NQZ6", "CLF7")
#: Number of events of the shipped default data set.
DEFAULT_EVENTS = 250_000
#: events per chunk when a generated file is written chunk by chunk (bounded memory)
DEFAULT_CHUNK_EVENTS = 2_000_000
#: Seed of the shipped default data set.
DEFAULT_SEED = 1
#: Default start time: Monday 2026-11-16 14:30:00 UTC (09:30 New York), in ns.
DEFAULT_START_NS = int(
    _dt.datetime(2026, 11, 16, 14, 30, tzinfo=_dt.UTC).timestamp()
) * 1_000_000_000

#: Column names and polars dtypes of a generated frame (the normalised file schema).
MARKET_SCHEMA: dict[str, pl.DataType] = {
    "ts_event_ns": pl.Int64(),
    "ts_recv_ns": pl.Int64(),
    "symbol": pl.String(),
    "kind": pl.Int8(),
    "bid_px": pl.Float64(),
    "bid_sz": pl.Float64(),
    "ask_px": pl.Float64(),
    "ask_sz": pl.Float64(),
    "price": pl.Float64(),
    "size": pl.Float64(),
    "side": pl.Int8(),
}

_DEFAULT_FILE = Path(__file__).resolve().parent / "default" / "market.parquet"


@dataclass(frozen=True, slots=True)
class InstrumentSpec:
    """Static parameters of one simulated instrument.

    Attributes
    ----------
    tick_num, tick_den : int
        Tick size as the fraction ``tick_num / tick_den`` (ES: 1/4 = 0.25);
        prices are ``ticks * tick_num / tick_den``, exactly on the grid.
    start_ticks : int
        Initial best bid, in ticks.
    quote_rate, trade_rate : float
        Calm-regime base rates of quote updates and trades, events per second.
    depth : float
        Typical top-of-book queue size, lots.
    trade_mean : float
        Mean trade size, lots (>= 1).
    """

    tick_num: int
    tick_den: int
    start_ticks: int
    quote_rate: float
    trade_rate: float
    depth: float
    trade_mean: float

    @property
    def tick_size(self) -> float:
        """Return the tick size as a float."""
        return self.tick_num / self.tick_den


# root -> (tick_num, tick_den, price level, quote rate, trade rate, depth, trade mean)
_ROOTS: dict[str, tuple[int, int, float, float, float, float, float]] = {
    "ES": (1, 4, 6850.0, 18.0, 1.6, 350.0, 4.0),
    "NQ": (1, 4, 25400.0, 14.0, 1.2, 12.0, 2.0),
    "CL": (1, 100, 61.5, 10.0, 0.9, 20.0, 3.0),
}
_FUTURES_SUFFIX = re.compile(r"[FGHJKMNQUVXZ]\d{1,2}$")


def instrument_spec(symbol: str) -> InstrumentSpec:
    """Return the simulation parameters used for ``symbol``.

    Parameters
    ----------
    symbol : str
        Instrument symbol; a futures month code and year (``Z6``) is stripped to
        find the root (``ESZ6`` -> ``ES``).

    Returns
    -------
    InstrumentSpec
        Built-in parameters for a known root, else generic ones (tick 0.01) with
        a price level in [20, 500) derived from a stable CRC32 of the symbol.
    """
    root = _FUTURES_SUFFIX.sub("", symbol) or symbol
    if root in _ROOTS:
        num, den, level, qr, tr, depth, tmean = _ROOTS[root]
    else:
        num, den = 1, 100
        level = 20.0 + (zlib.crc32(symbol.encode()) % 48_000) / 100.0
        qr, tr, depth, tmean = 8.0, 0.6, 30.0, 3.0
    start_ticks = round(level * den / num)
    return InstrumentSpec(num, den, start_ticks, qr, tr, depth, tmean)


def default_data_path() -> Path:
    """Return the path of the shipped default data set (``replay/default/market.parquet``).

    The file holds ``generate_market(DEFAULT_EVENTS, DEFAULT_SYMBOLS, DEFAULT_SEED)``
    (250,000 events of ESZ6, NQZ6 and CLF7) as zstd Parquet in the normalised
    schema of :mod:`replay.reader`.
    """
    return _DEFAULT_FILE


# --------------------------------------------------------------------------- kernel
# Model constants (units: seconds, ticks, lots).  Index 0 = calm, 1 = volatile.
_RATE_MULT = (1.0, 3.0)  # multiplier of base quote/trade rates
_SWITCH_RATE = (1.0 / 900.0, 1.0 / 150.0)  # regime leave rate, 1/s
_P_MOVE = (0.08, 0.15)  # share of quote events that move the mid
_P_JUMP = (0.001, 0.005)  # share of moves that are jumps, before tilt
_HAWKES_ALPHA = 2.8  # trade intensity added per trade, 1/s
_HAWKES_BETA = 4.0  # decay of the excitation, 1/s (branching ratio 0.7)
_QUOTE_EXCITE = 1.5  # quote intensity per unit of trade excitation
_TAU_PRESSURE = 5.0  # latent pressure (OU) time constant, s
_TAU_FLOW = 2.0  # signed trade-flow EWMA time constant, s
_DIR_IMB, _DIR_FLOW = 2.5, 0.8  # logit weights of move direction
_JUMP_IMB, _JUMP_FLOW = 3.0, 3.0  # jump probability tilt by |imbalance|, |flow|
_TRADE_PRESSURE, _TRADE_IMB = 0.6, 0.8  # logit weights of trade side
_SIZE_PRESSURE = 0.1  # add-vs-cancel tilt by pressure
_NEW_LEVEL = 0.5  # mean size of a newly formed level, in units of depth
_P_IMPROVE = 0.6  # chance an add improves a spread wider than one tick
_LAT_MIN_NS, _LAT_MED_NS, _LAT_SIGMA = 8_000.0, 12_000.0, 0.5  # receive latency


@njit(cache=True, nogil=True)
def _next_u64(state):
    """Advance a splitmix64 state (uint64[1]) and return the next 64-bit output."""
    state[0] += np.uint64(0x9E3779B97F4A7C15)
    z = state[0]
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def _uniform(state):
    """Return a uniform float64 in the open interval (0, 1)."""
    return (float(_next_u64(state) >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)


@njit(cache=True, nogil=True)
def _normal(state):
    """Return a standard normal draw (Box-Muller)."""
    r = math.sqrt(-2.0 * math.log(_uniform(state)))
    return r * math.cos(6.283185307179586 * _uniform(state))


@njit(cache=True, nogil=True)
def _geometric0(state, mean):
    """Return a geometric count >= 0 with the given mean (0 if mean <= 0)."""
    if mean <= 0.0:
        return 0
    q = mean / (1.0 + mean)  # P(k) = (1 - q) q^k
    return int(math.floor(math.log(_uniform(state)) / math.log(q)))


@njit(cache=True, nogil=True)
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@njit(cache=True, nogil=True)
def _queue(state, depth):
    """Return a fresh top-of-book queue size in lots (lognormal around ``depth``, >= 1)."""
    return max(1.0, math.floor(depth * math.exp(0.6 * _normal(state) - 0.18) + 0.5))


@njit(cache=True, nogil=True)
def _spread(state, regime, extra):
    """Return a new spread in ticks (>= 1) for the regime, plus ``extra`` ticks."""
    u = _uniform(state)
    if regime == 0:
        s = 1 if u < 0.9 else (2 if u < 0.98 else 3)
    else:
        s = 1 if u < 0.45 else (2 if u < 0.75 else (3 if u < 0.92 else 4))
    return s + extra


@njit(cache=True, nogil=True)
def _recv_after(state, t_ns, prev_recv, lat_mu):
    """Return the receive time of an event at ``t_ns``: positive jittered latency, monotone."""
    lat = _LAT_MIN_NS + math.exp(lat_mu + _LAT_SIGMA * _normal(state))
    return max(prev_recv, t_ns + np.int64(lat))


@njit(cache=True, nogil=True, inline="always")
def _put_quote(state, row, i, t_ns, prev_recv, lat_mu, b, a, bq, aq,
               ts, recv, inst, kind, bid, ask, bsz, asz):  # fmt: skip
    """Write instrument ``i``'s quote at exchange time ``t_ns`` as row ``row``; return its receive time."""
    ts[row] = t_ns
    prev_recv = _recv_after(state, t_ns, prev_recv, lat_mu)
    recv[row] = prev_recv
    inst[row] = i
    kind[row] = KIND_QUOTE
    bid[row] = b[i]
    ask[row] = a[i]
    bsz[row] = bq[i]
    asz[row] = aq[i]
    return prev_recv


@njit(cache=True, nogil=True)
def _simulate(n, final, sim_i, sim_f, state, reg, hx, b, a, bq, aq, zp, zt, fnum, fden, ft, lam,
              start_ns, qrate, trate, depth, tmean,
              ts, recv, inst, kind, side, bid, ask, bsz, asz, tpx, tsz):  # fmt: skip
    """Simulate the next ``n`` rows into the preallocated output arrays; return rows written.

    The market's state lives in the arrays :class:`MarketSimulator` makes (``sim_i``:
    opened, last receive time; ``sim_f``: time in s; ``state``: the RNG; the per-instrument
    arrays), so calls continue one market.  A trade is followed by the quote it leaves in
    the same step: unless ``final``, a step that reaches ``n`` rows finishes (``n + 1``
    rows; the output arrays hold one more), so a market made in several calls has exactly
    the rows of one call (``final`` on the last: it stops at ``n`` as a single call does).
    Prices are written in integer ticks (``bid``, ``ask``, ``tpx``); on trade rows the
    book fields are left as they are, on quote rows ``tpx``/``tsz``.  The output arrays
    must be zero-initialised by the caller.
    """
    m = qrate.shape[0]
    lat_mu = math.log(_LAT_MED_NS)
    prev_recv = sim_i[1]
    t = sim_f[0]
    row = 0
    if sim_i[0] == 0:  # opening snapshot: one quote per instrument, 1 us apart (MarketSimulator
        sim_i[0] = 1  # makes the first call cover it whole)
        for i in range(m):
            bq[i] = _queue(state, depth[i])
            aq[i] = _queue(state, depth[i])
            zp[i] = _normal(state)
        for i in range(m):
            if row >= n:
                break
            t = (i + 1) * 1e-6
            t_ns = start_ns + np.int64(t * 1e9)
            prev_recv = _put_quote(state, row, i, t_ns, prev_recv, lat_mu, b, a, bq, aq,
                                   ts, recv, inst, kind, bid, ask, bsz, asz)  # fmt: skip
            row += 1
        zt[:] = t
        ft[:] = t
    while row < n:
        # Ogata thinning: between events every intensity only decays, so the
        # total at the last candidate bounds it until the next one.
        lam_bar = 0.0
        for i in range(m):
            mult = _RATE_MULT[reg[i]]
            lam_bar += (qrate[i] + trate[i]) * mult + (1.0 + _QUOTE_EXCITE) * hx[i]
            lam_bar += _SWITCH_RATE[reg[i]]
        dt = -math.log(_uniform(state)) / lam_bar
        t += dt
        decay = math.exp(-_HAWKES_BETA * dt)
        total = 0.0
        for i in range(m):
            hx[i] *= decay
            mult = _RATE_MULT[reg[i]]
            lam[3 * i] = qrate[i] * mult + _QUOTE_EXCITE * hx[i]
            lam[3 * i + 1] = trate[i] * mult + hx[i]
            lam[3 * i + 2] = _SWITCH_RATE[reg[i]]
            total += lam[3 * i] + lam[3 * i + 1] + lam[3 * i + 2]
        u = _uniform(state) * lam_bar
        if u >= total:
            continue  # thinned candidate
        c = 0
        acc = lam[0]
        while acc <= u and c < 3 * m - 1:
            c += 1
            acc += lam[c]
        i = c // 3
        comp = c - 3 * i
        if comp == 2:
            reg[i] = 1 - reg[i]  # silent regime switch
            continue

        # Bring the instrument's latent pressure and trade flow to time t.
        e = math.exp(-(t - zt[i]) / _TAU_PRESSURE)
        zp[i] = zp[i] * e + math.sqrt(1.0 - e * e) * _normal(state)
        zt[i] = t
        e = math.exp(-(t - ft[i]) / _TAU_FLOW)
        fnum[i] *= e
        fden[i] *= e
        ft[i] = t
        imb = (bq[i] - aq[i]) / (bq[i] + aq[i])
        flow = fnum[i] / fden[i] if fden[i] > 1e-9 else 0.0
        t_ns = start_ns + np.int64(t * 1e9)

        if comp == 1:  # trade at the touch
            s = 1 if _uniform(state) < _sigmoid(_TRADE_PRESSURE * zp[i] + _TRADE_IMB * imb) else -1
            q = 1.0 + _geometric0(state, tmean[i] - 1.0)
            if _uniform(state) < 0.03:  # occasional block
                q *= 1.0 + _geometric0(state, 4.0)
            hit = aq[i] if s > 0 else bq[i]
            exhausted = q >= hit
            if exhausted:
                q = hit
            ts[row] = t_ns
            prev_recv = _recv_after(state, t_ns, prev_recv, lat_mu)
            recv[row] = prev_recv
            inst[row] = i
            kind[row] = KIND_TRADE
            side[row] = s
            tpx[row] = a[i] if s > 0 else b[i]
            tsz[row] = q
            row += 1
            hx[i] += _HAWKES_ALPHA
            fnum[i] += s * q
            fden[i] += q
            if s > 0:
                if exhausted:
                    a[i] += 1
                    aq[i] = _queue(state, depth[i])
                else:
                    aq[i] -= q
            else:
                if exhausted:
                    b[i] -= 1
                    bq[i] = _queue(state, depth[i])
                else:
                    bq[i] -= q
            if row >= n and final:
                break
        elif _uniform(state) < _P_MOVE[reg[i]]:  # mid move
            p_up = _sigmoid(_DIR_IMB * imb + _DIR_FLOW * flow)
            d = 1 if _uniform(state) < p_up else -1
            p_jump = _P_JUMP[reg[i]] * (1.0 + _JUMP_IMB * abs(imb) + _JUMP_FLOW * abs(flow))
            extra = 0
            if _uniform(state) < p_jump:
                k = 3 + _geometric0(state, 2.0)
                extra = 1
                hx[i] += 3.0 * _HAWKES_ALPHA
                if reg[i] == 0 and _uniform(state) < 0.5:
                    reg[i] = 1
            else:
                k = 1 if _uniform(state) < 0.9 else 2
            sp = _spread(state, reg[i], extra)
            if d < 0 and b[i] - k - sp < 1:
                d = 1  # keep prices positive
            target = a[i] + b[i] + 2 * d * k  # new bid + ask, ticks
            if (target - sp) % 2 != 0:
                target += d
            b[i] = (target - sp) // 2
            a[i] = b[i] + sp
            # The level the book moved away from is rebuilt thin (a new level),
            # the one it moved towards is an established queue: the imbalance
            # after a move leans against it (bid-ask bounce).
            thin = _queue(state, _NEW_LEVEL * depth[i])
            thick = _queue(state, depth[i])
            bq[i] = thin if d > 0 else thick
            aq[i] = thick if d > 0 else thin
        else:  # size update: add or cancel at one side, may improve the spread
            on_bid = _uniform(state) < 0.5
            own = bq[i] if on_bid else aq[i]
            tilt = _SIZE_PRESSURE * zp[i] if on_bid else -_SIZE_PRESSURE * zp[i]
            p_add = min(0.95, max(0.05, 0.5 + 0.25 * (1.0 - own / depth[i]) + tilt))
            amount = 1.0 + _geometric0(state, 0.15 * depth[i])
            if _uniform(state) < p_add:
                if a[i] - b[i] > 1 and _uniform(state) < _P_IMPROVE:
                    if on_bid:
                        b[i] += 1
                    else:
                        a[i] -= 1
                    own = amount
                else:
                    own += amount
            else:
                own = max(1.0, own - amount)
            if on_bid:
                bq[i] = own
            else:
                aq[i] = own
        # The resulting L1 quote (after a trade: same exchange time as the print).
        prev_recv = _put_quote(state, row, i, t_ns, prev_recv, lat_mu, b, a, bq, aq,
                               ts, recv, inst, kind, bid, ask, bsz, asz)  # fmt: skip
        row += 1
    sim_i[1] = prev_recv
    sim_f[0] = t
    return row


# --------------------------------------------------------------------------- public API
def _check_symbols(symbols: Sequence[str]) -> list[str]:
    if isinstance(symbols, str):
        raise TypeError("symbols must be a sequence of str, not one str (use ['ESZ6'])")
    out = [str(s) for s in symbols]
    if not out:
        raise ValueError("symbols must not be empty")
    if any(not s for s in out):
        raise ValueError("symbols must be non-empty strings")
    if len(set(out)) != len(out):
        raise ValueError(f"symbols must be unique, got {out}")
    return out


class MarketSimulator:
    """The L1 market of :func:`generate_market`, made chunk by chunk (bounded memory).

    ``next_chunk(n)`` returns the next rows; chunks continue one market, and the
    chunks' rows together are exactly :func:`generate_market`'s rows for their total
    (a test checks this), so a file of any size can be written in bounded memory.
    """

    def __init__(self, symbols: Sequence[str] = DEFAULT_SYMBOLS, seed: int = DEFAULT_SEED,
                 start_ns: int = DEFAULT_START_NS) -> None:  # fmt: skip
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        self.symbols = _check_symbols(symbols)
        specs = [instrument_spec(s) for s in self.symbols]
        f64 = np.float64
        m = len(specs)
        start_ticks = np.array([s.start_ticks for s in specs], dtype=np.int64)
        self.qrate = np.array([s.quote_rate for s in specs], dtype=f64)
        self.trate = np.array([s.trade_rate for s in specs], dtype=f64)
        self.depth = np.array([s.depth for s in specs], dtype=f64)
        self.tmean = np.array([s.trade_mean for s in specs], dtype=f64)
        self.num = np.array([s.tick_num for s in specs], dtype=np.int64)
        self.den = np.array([s.tick_den for s in specs], dtype=f64)
        self.start_ns = int(start_ns)
        self.state = np.empty(1, dtype=np.uint64)  # the RNG
        self.state[0] = np.uint64((int(seed) * 0xD1B54A32D192ED03 + 0x2545F4914F6CDD1D) & (2**64 - 1))
        self.sim_i = np.array([0, -(2**62)], dtype=np.int64)  # opened, last receive time (ns)
        self.sim_f = np.zeros(1)  # time since the start, s
        self.reg = np.zeros(m, dtype=np.int64)  # 0 calm, 1 volatile
        self.hx = np.zeros(m)  # Hawkes excitation of trades, 1/s
        self.b = start_ticks.copy()  # best bid, ticks
        self.a = start_ticks + 1  # best ask, ticks
        self.bq = np.empty(m)  # bid queue, lots
        self.aq = np.empty(m)
        self.zp = np.zeros(m)  # latent order-flow pressure (OU, sd 1)
        self.zt = np.zeros(m)  # time of its last update, s
        self.fnum = np.zeros(m)  # signed trade volume EWMA
        self.fden = np.zeros(m)  # unsigned trade volume EWMA
        self.ft = np.zeros(m)
        self.lam = np.empty(3 * m)  # per instrument: quote, trade, regime switch intensity

    def next_chunk(self, n: int, final: bool = False) -> pl.DataFrame:
        """Return the next rows of the market (a frame in :data:`MARKET_SCHEMA`).

        ``n`` rows, or ``n + 1`` when the last step is a trade and the quote it leaves
        (unless ``final``: then exactly ``n``, and the market ends there).  The first
        chunk holds at least the opening quote of every instrument, or all ``n`` rows.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"n_events must be >= 0, got {n}")
        if not self.sim_i[0] and n < len(self.symbols) and not final:
            raise ValueError(f"the first chunk holds the opening quote of every instrument: at least "
                             f"{len(self.symbols)} rows, got {n}")  # fmt: skip
        f64 = np.float64
        cap = n + 1
        ts = np.zeros(cap, dtype=np.int64)
        recv = np.zeros(cap, dtype=np.int64)
        inst = np.zeros(cap, dtype=np.int32)
        kind = np.zeros(cap, dtype=np.int8)
        side = np.zeros(cap, dtype=np.int8)
        bid = np.zeros(cap, dtype=np.int64)
        ask = np.zeros(cap, dtype=np.int64)
        bsz = np.zeros(cap, dtype=f64)
        asz = np.zeros(cap, dtype=f64)
        tpx = np.zeros(cap, dtype=np.int64)
        tsz = np.zeros(cap, dtype=f64)
        rows = _simulate(n, bool(final), self.sim_i, self.sim_f, self.state, self.reg, self.hx, self.b,
                         self.a, self.bq, self.aq, self.zp, self.zt, self.fnum, self.fden, self.ft, self.lam,
                         self.start_ns, self.qrate, self.trate, self.depth, self.tmean,
                         ts, recv, inst, kind, side, bid, ask, bsz, asz, tpx, tsz)  # fmt: skip
        assert rows == n or (rows == n + 1 and not final), (rows, n, final)
        ts, recv, inst, kind, side = ts[:rows], recv[:rows], inst[:rows], kind[:rows], side[:rows]
        bid, ask, bsz, asz, tpx, tsz = bid[:rows], ask[:rows], bsz[:rows], asz[:rows], tpx[:rows], tsz[:rows]
        num = self.num[inst]
        den = self.den[inst]
        is_q = kind == KIND_QUOTE

        def _col(name: str, values: np.ndarray, on: np.ndarray) -> pl.Series:
            return pl.Series(name, np.where(on, values, np.nan), nan_to_null=True)

        return pl.DataFrame(
            [
                pl.Series("ts_event_ns", ts),
                pl.Series("ts_recv_ns", recv),
                pl.Series("symbol", self.symbols, dtype=pl.String).gather(inst),
                pl.Series("kind", kind),
                # ticks * num / den: both exact integers, so the division is correctly
                # rounded: the nearest float64 to the decimal price (e.g. 61.37).
                _col("bid_px", (bid * num).astype(f64) / den, is_q),
                _col("bid_sz", bsz, is_q),
                _col("ask_px", (ask * num).astype(f64) / den, is_q),
                _col("ask_sz", asz, is_q),
                _col("price", (tpx * num).astype(f64) / den, ~is_q),
                _col("size", tsz, ~is_q),
                pl.Series("side", side),
            ]
        )


def generate_market(
    n_events: int,
    symbols: Sequence[str] = DEFAULT_SYMBOLS,
    seed: int = DEFAULT_SEED,
    start_ns: int = DEFAULT_START_NS,
    *,
    bad_fraction: float = 0.0,
) -> pl.DataFrame:
    """Return ``n_events`` simulated L1 quotes and trades in the normalised schema.

    Parameters
    ----------
    n_events : int
        Number of rows (quotes + trades, all instruments).  The first rows are
        an opening quote per instrument.
    symbols : sequence of str
        Instrument symbols; parameters per symbol from :func:`instrument_spec`.
    seed : int
        Seed in ``[0, 2**63)``; the same arguments always give the same frame.
    start_ns : int
        Exchange time of the start of the simulation, ns since the Unix epoch.
    bad_fraction : float
        Fraction of rows to corrupt with :func:`inject_bad_rows` (tests of the
        reader's rejection); 0 keeps every row valid.

    Returns
    -------
    polars.DataFrame
        Columns and dtypes of :data:`MARKET_SCHEMA`, rows in event-time order:
        ``kind`` 1 (quote: ``bid_*``/``ask_*`` set, ``price``/``size`` null) or
        2 (trade: ``price``/``size``/``side`` set, book fields null).  Prices
        are exactly on each instrument's tick grid, sizes are whole lots.
    """
    n = int(n_events)
    if n < 0:
        raise ValueError(f"n_events must be >= 0, got {n_events}")
    frame = MarketSimulator(symbols, seed, start_ns).next_chunk(n, final=True)
    if bad_fraction:
        frame, _ = inject_bad_rows(frame, bad_fraction, seed=seed)
    return frame


_BAD_KINDS = ("nonfinite", "nonpositive", "crossed", "time_backwards")


def inject_bad_rows(
    frame: pl.DataFrame, fraction: float, seed: int = DEFAULT_SEED
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Return a copy of a generated frame with a fraction of rows made invalid.

    ``round(fraction * len(frame))`` distinct rows are corrupted, split evenly
    over four faults, each of which the reader rejects with exactly one reason:

    * ``nonfinite``: NaN or +inf in ``bid_px`` (quote) or ``price`` (trade);
    * ``nonpositive``: ``ask_sz = 0`` (quote) or negative ``size`` (trade);
    * ``crossed``: a quote with bid and ask prices swapped (bid > ask);
    * ``time_backwards``: ``ts_event_ns`` 1 ms before the instrument's first event.

    The first row of every instrument is never touched, so it is accepted and a
    backwards time is always judged against an accepted earlier row.

    Parameters
    ----------
    frame : polars.DataFrame
        A valid frame from :func:`generate_market`.
    fraction : float
        In ``[0, 1)``.
    seed : int
        Seed of the choice of rows (numpy ``default_rng``).

    Returns
    -------
    (polars.DataFrame, dict[str, int])
        The corrupted frame and the number of corrupted rows per reject reason
        name (keys as in ``engine.schema.REJECT_NAMES``), all four keys present.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n = frame.height
    k_total = round(fraction * n)
    counts = {name: k_total // 4 + int(j < k_total % 4) for j, name in enumerate(_BAD_KINDS)}
    if k_total == 0:
        return frame, counts
    rng = np.random.default_rng([int(seed), 0xBAD])
    first = frame.with_row_index("_i").group_by("symbol").agg(pl.col("_i").min())
    first = first["_i"].to_numpy()
    eligible = np.ones(n, dtype=bool)
    eligible[first] = False
    is_q = (frame["kind"] == KIND_QUOTE).to_numpy()
    order = rng.permutation(np.flatnonzero(eligible))
    picks: dict[str, np.ndarray] = {}
    used = np.zeros(n, dtype=bool)
    # Crossed needs quotes: pick those first, then the rest from what is left.
    cand = order[is_q[order]]
    picks["crossed"] = cand[: counts["crossed"]]
    used[picks["crossed"]] = True
    rest = order[~used[order]]
    pos = 0
    for name in ("nonfinite", "nonpositive", "time_backwards"):
        picks[name] = rest[pos : pos + counts[name]]
        pos += counts[name]
    if any(len(picks[k]) != counts[k] for k in _BAD_KINDS):
        raise ValueError(f"frame of {n} rows is too small for fraction {fraction}")

    def mask(idx: np.ndarray, quotes: bool | None = None) -> pl.Series:
        m = np.zeros(n, dtype=bool)
        m[idx] = True
        if quotes is not None:
            m &= is_q if quotes else ~is_q
        return pl.Series(m)

    bad_val = np.where(rng.random(n) < 0.5, np.nan, np.inf)
    first_ts = frame.group_by("symbol").agg(pl.col("ts_event_ns").min().alias("_t0"))
    back_ts = frame.join(first_ts, on="symbol", how="left", maintain_order="left")["_t0"] - 1_000_000
    def swap_in(cond: pl.Series, value: pl.Expr | pl.Series | float, column: str) -> pl.Expr:
        return pl.when(cond).then(value).otherwise(pl.col(column)).alias(column)

    out = frame.with_columns(
        swap_in(mask(picks["nonfinite"], True), pl.Series(bad_val), "bid_px"),
        swap_in(mask(picks["nonfinite"], False), pl.Series(bad_val), "price"),
        swap_in(mask(picks["nonpositive"], True), 0.0, "ask_sz"),
        swap_in(mask(picks["nonpositive"], False), -pl.col("size"), "size"),
        swap_in(mask(picks["time_backwards"]), back_ts, "ts_event_ns"),
    )
    crossed = mask(picks["crossed"])
    out = out.with_columns(
        swap_in(crossed, pl.col("ask_px"), "bid_px"), swap_in(crossed, pl.col("bid_px"), "ask_px")
    )
    return out, counts


def check_output_path(path: str | Path) -> Path:
    """Return ``path`` as a Path if its suffix names a format the generators write, else raise ValueError."""
    out = Path(path)
    if not out.name.lower().endswith((".parquet", ".pq", ".csv", ".csv.gz")):
        raise ValueError(f"{out}: unknown output format; use a .parquet, .csv or .csv.gz file name")
    return out


def write_market(
    path: str | Path,
    n_events: int = DEFAULT_EVENTS,
    symbols: Sequence[str] = DEFAULT_SYMBOLS,
    seed: int = DEFAULT_SEED,
    *,
    start_ns: int = DEFAULT_START_NS,
    bad_fraction: float = 0.0,
    chunk_rows: int = DEFAULT_CHUNK_EVENTS,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Generate a market with :func:`generate_market` and write it (format by suffix).

    Parameters
    ----------
    path : str or Path
        Output file, ``.parquet`` (zstd), ``.csv`` or ``.csv.gz``; its directory
        is created if needed.  It is written as ``PATH.part`` and renamed when
        complete, so an interrupted run leaves no partial file under ``PATH``.
    n_events, symbols, seed, start_ns, bad_fraction
        As in :func:`generate_market`.
    chunk_rows : int
        More events than this (and no ``bad_fraction``) are made and written chunk by
        chunk with :class:`MarketSimulator`: the same rows in bounded memory.
    progress : callable, optional
        Called with the rows written so far after each chunk.

    Returns
    -------
    Path
        The written file.
    """
    out = check_output_path(path)
    n = int(n_events)
    if n > chunk_rows and not bad_fraction:
        sim = MarketSimulator(symbols, seed, start_ns)
        return write_chunks(out, n, max(int(chunk_rows), len(sim.symbols)), sim.next_chunk, progress)
    frame = generate_market(n, symbols, seed, start_ns, bad_fraction=bad_fraction)
    name = out.name.lower()
    with _part_file(out) as part:
        if name.endswith(".csv"):
            frame.write_csv(part)
        elif name.endswith(".csv.gz"):
            with gzip.open(part, "wb", compresslevel=_GZIP_LEVEL) as f:
                frame.write_csv(f)
        else:
            frame.write_parquet(part, compression="zstd", compression_level=9, statistics=True)
    return out


#: gzip's own default level: 3.7x faster than Python's default 9 here, files 3% larger
_GZIP_LEVEL = 6


@contextlib.contextmanager
def _part_file(out: Path):
    """Yield ``OUT.part`` to write; rename it to ``out`` on success, remove it on any error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    try:
        yield part
        os.replace(part, out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def write_chunks(
    path: str | Path,
    n_events: int,
    chunk_rows: int,
    next_chunk: Callable[[int, bool], pl.DataFrame],
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``next_chunk(k, final)`` frames to Parquet / CSV / CSV.gz until ``n_events`` rows.

    ``k`` is at most ``chunk_rows``; ``final`` is true for the chunk that reaches
    ``n_events``.  Bounded memory: one chunk at a time.  Written as ``PATH.part``, renamed
    when complete; 0 events writes the columns of ``next_chunk(0, True)`` and no rows.
    """
    import pyarrow.parquet as pq  # deferred: pyarrow only on this file-format path

    out = check_output_path(path)
    name = out.name.lower()
    left = int(n_events)
    if left < 0:
        raise ValueError(f"n_events must be >= 0, got {n_events}")
    done = 0
    with _part_file(out) as part:
        if name.endswith((".parquet", ".pq")):
            writer = None
            try:
                while left > 0 or writer is None:  # 0 events: a file with the schema and no rows
                    k = min(chunk_rows, left)
                    tbl = next_chunk(k, k >= left).to_arrow()
                    if writer is None:
                        writer = pq.ParquetWriter(part, tbl.schema, compression="zstd")
                    writer.write_table(tbl, row_group_size=1 << 20)
                    left -= tbl.num_rows
                    done += tbl.num_rows
                    if progress is not None:
                        progress(done)
            finally:
                if writer is not None:
                    writer.close()
        else:
            gz = name.endswith(".gz")
            with gzip.open(part, "wb", compresslevel=_GZIP_LEVEL) if gz else open(part, "wb") as f:
                first = True
                while left > 0 or first:  # 0 events: the header alone
                    k = min(chunk_rows, left)
                    df = next_chunk(k, k >= left)
                    f.write(df.write_csv(include_header=first).encode())
                    first = False
                    left -= df.height
                    done += df.height
                    if progress is not None:
                        progress(done)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line: generate a market and write it as Parquet.

    ``python -m replay.generator`` with no arguments regenerates the shipped
    default data set in place.
    """
    p = argparse.ArgumentParser(
        prog="python -m replay.generator",
        description="Write a seeded synthetic L1 market (quotes + trades) as zstd Parquet.",
    )
    p.add_argument("--out", type=Path, default=default_data_path(),
                   help="output Parquet file (default: the shipped %(default)s)")
    p.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="rows (default %(default)s)")
    p.add_argument("--symbols", default=",".join(DEFAULT_SYMBOLS),
                   help="comma-separated symbols (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed (default %(default)s)")
    p.add_argument("--start-ns", type=int, default=DEFAULT_START_NS,
                   help="start time, ns since epoch (default %(default)s)")
    p.add_argument("--bad-fraction", type=float, default=0.0,
                   help="fraction of rows to corrupt, for reader tests (default 0)")
    args = p.parse_args(argv)
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    t0 = time.perf_counter()
    out = write_market(args.out, args.events, symbols, args.seed,
                       start_ns=args.start_ns, bad_fraction=args.bad_fraction)
    wall = time.perf_counter() - t0
    size_mb = out.stat().st_size / 1e6
    print(f"wrote {out}: {args.events} events, symbols {symbols}, seed {args.seed}, "
          f"{size_mb:.2f} MB in {wall:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
