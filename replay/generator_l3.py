"""Seeded synthetic order-by-order (L3) and trade-only markets.

**L3** (:func:`generate_l3`, :class:`L3Simulator`): a numba simulation of
limit-order books on an integer tick grid, one per instrument, emitting the
events an exchange publishes order by order (LOBSTER / Databento MBO style):

* an opening snapshot burst: ``snapshot_orders`` resting orders per side, all
  at the first timestamp of the instrument;
* **add** (kind 3): a new limit order, mostly a few ticks behind its side's
  best price, sometimes improving a spread wider than one tick;
* **delete** (kind 5): a full cancel (``size`` = remaining size) or a partial
  cancel (``size`` = cancelled quantity) of a random live order;
* **modify** (kind 4): a live order's size reduced, or its price moved one tick
  away from the market (new price, new size);
* **market orders** as **fills** (kind 2 with the resting ``order_id``): an
  aggressor consumes the best opposite level in time priority; one trade event
  per resting order filled, all at the same timestamp, ``side`` = aggressor.

A latent order-flow pressure (Ornstein-Uhlenbeck) tilts which side adds and
which side aggresses, together with the depth imbalance of the first levels,
so book features carry some information about the next mid moves.  The
simulator is resumable: :meth:`L3Simulator.next_chunk` continues the same
market, so files of any length are written chunk by chunk
(:func:`write_l3`) in bounded memory.

**Trade-only** (:func:`generate_trades`): the trades of the L1 generator
(:func:`replay.generator.generate_market`): time, symbol, price, size,
aggressor side; quotes dropped.

Randomness is the splitmix64 stream of :mod:`replay.generator`, so output
depends only on the arguments.  Command line::

    python -m replay.generator_l3 --shape l3 --events 1000000 --out l3.parquet
    python -m replay.generator_l3 --shape trades --events 200000 --out trades.csv.gz
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl
from numba import njit

from engine.schema import KIND_BOOK_ADD, KIND_BOOK_DELETE, KIND_BOOK_MODIFY, KIND_TRADE
from replay.generator import (
    DEFAULT_CHUNK_EVENTS,
    DEFAULT_SEED,
    DEFAULT_START_NS,
    DEFAULT_SYMBOLS,
    _check_symbols,
    _geometric0,
    _next_u64,
    _normal,
    _uniform,
    check_output_path,
    generate_market,
    instrument_spec,
    write_chunks,
)

__all__ = [
    "L3_SCHEMA",
    "TRADES_SCHEMA",
    "L3Simulator",
    "generate_l3",
    "write_l3",
    "generate_trades",
    "write_trades",
    "main",
]

#: Columns of a generated L3 frame (the normalised schema, L3 subset).
L3_SCHEMA: dict[str, pl.DataType] = {
    "ts_event_ns": pl.Int64(),
    "ts_recv_ns": pl.Int64(),
    "symbol": pl.String(),
    "kind": pl.Int8(),
    "side": pl.Int8(),
    "price": pl.Float64(),
    "size": pl.Float64(),
    "order_id": pl.UInt64(),
}
#: Columns of a generated trade-only frame.
TRADES_SCHEMA: dict[str, pl.DataType] = {
    "ts_event_ns": pl.Int64(),
    "ts_recv_ns": pl.Int64(),
    "symbol": pl.String(),
    "price": pl.Float64(),
    "size": pl.Float64(),
    "side": pl.Int8(),
}

_G = 8192  # price grid (ticks) per instrument
_M = 4096  # live-order capacity per instrument
_MIN_LIVE = 60
_EVENT_RATE = 120.0  # events / s per instrument (before bursts)
_P_ADD, _P_CANCEL, _P_MODIFY = 0.44, 0.38, 0.08  # rest: market orders
_TAU_P = 5.0  # pressure time constant, s
_W_PRESS, _W_IMB = 0.8, 1.2  # logit weights of the aggressor side
_LAT_MIN_NS, _LAT_MED_NS, _LAT_SIGMA = 8_000.0, 12_000.0, 0.5


@njit(cache=True, nogil=True)
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@njit(cache=True, nogil=True)
def _emit(out_i, out_f, row, ts, recv, inst, kind, side, px, size, oid):
    out_i[row, 0] = ts
    out_i[row, 1] = recv
    out_i[row, 2] = inst
    out_i[row, 3] = kind
    out_i[row, 4] = side
    out_i[row, 5] = px
    out_i[row, 6] = oid
    out_f[row] = size


@njit(cache=True, nogil=True)
def _best_bid(lvl, i, start):
    g = start
    while g >= 0 and lvl[i, 0, g] <= 0.0:
        g -= 1
    return g


@njit(cache=True, nogil=True)
def _best_ask(lvl, i, start):
    g = start
    while g < lvl.shape[2] and lvl[i, 1, g] <= 0.0:
        g += 1
    return g


@njit(cache=True, nogil=True)
def _remove_live(live_n, o_id, o_side, o_g, o_sz, i, k):
    last = live_n[i] - 1
    o_id[i, k] = o_id[i, last]
    o_side[i, k] = o_side[i, last]
    o_g[i, k] = o_g[i, last]
    o_sz[i, k] = o_sz[i, last]
    live_n[i] = last


@njit(cache=True, nogil=True)
def _add_order(st, lvl, live_n, o_id, o_side, o_g, o_sz, i, sd, g, size):
    k = live_n[i]
    oid = st[1]
    st[1] = oid + 1
    o_id[i, k] = oid
    o_side[i, k] = sd
    o_g[i, k] = g
    o_sz[i, k] = size
    live_n[i] = k + 1
    lvl[i, 0 if sd > 0 else 1, g] += size
    return oid


@njit(cache=True, nogil=True)
def _run(n, rng, st, t_s, start_ns, base, tick_depth, tmean, lvl, live_n, o_id, o_side, o_g, o_sz,
         bb, ba, press, started, out_i, out_f):
    """Simulate ``n`` rows; return rows written (the last market order may spill: n >= rows)."""
    m = base.shape[0]
    lat_mu = math.log(_LAT_MED_NS)
    row = 0
    # opening snapshot bursts
    for i in range(m):
        if started[i]:
            continue
        started[i] = 1
        t_s[0] += 1e-6
        ts = start_ns + np.int64(t_s[0] * 1e9)
        mid = _G // 2
        for sd in (1, -1):
            for q in range(st[2]):
                if row >= n:
                    return row
                off = q // 3
                g = mid - 1 - off if sd > 0 else mid + 1 + off
                size = 1.0 + _geometric0(rng, tick_depth[i])
                oid = _add_order(st, lvl, live_n, o_id, o_side, o_g, o_sz, i, sd, g, size)
                recv = max(st[0], ts + np.int64(_LAT_MIN_NS + math.exp(lat_mu + _LAT_SIGMA * _normal(rng))))
                st[0] = recv
                _emit(out_i, out_f, row, ts, recv, i, KIND_BOOK_ADD, sd, base[i] + g, size, oid)
                row += 1
        bb[i] = mid - 1
        ba[i] = mid + 1
    while row < n:
        i = np.int64(_next_u64(rng) % np.uint64(m))
        t_s[0] += -math.log(_uniform(rng)) / (_EVENT_RATE * m)
        ts = start_ns + np.int64(t_s[0] * 1e9)
        recv = max(st[0], ts + np.int64(_LAT_MIN_NS + math.exp(lat_mu + _LAT_SIGMA * _normal(rng))))
        st[0] = recv
        # pressure: OU step, pulled back toward the grid centre
        centre = (0.5 * (bb[i] + ba[i]) - _G / 2) / (_G / 8)
        press[i] = press[i] * 0.995 + 0.1 * _normal(rng) - 0.002 * centre
        nl = live_n[i]
        u = _uniform(rng)
        if nl < _MIN_LIVE or (u < _P_ADD and nl < _M - 1):
            # add
            sd = 1 if _uniform(rng) < _sigmoid(0.5 * press[i]) else -1
            k = _geometric0(rng, 2.0)
            if bb[i] >= 0 and ba[i] < _G and ba[i] - bb[i] > 1 and _uniform(rng) < 0.5:
                g = bb[i] + 1 if sd > 0 else ba[i] - 1
            elif sd > 0:
                g = bb[i] - k if bb[i] >= 0 else ba[i] - 1 - k
            else:
                g = ba[i] + k if ba[i] < _G else bb[i] + 1 + k
            if g < 1 or g > _G - 2:
                continue
            size = 1.0 + _geometric0(rng, tick_depth[i])
            oid = _add_order(st, lvl, live_n, o_id, o_side, o_g, o_sz, i, sd, g, size)
            if sd > 0 and g > bb[i]:
                bb[i] = g
            if sd < 0 and g < ba[i]:
                ba[i] = g
            _emit(out_i, out_f, row, ts, recv, i, KIND_BOOK_ADD, sd, base[i] + g, size, oid)
            row += 1
        elif u < _P_ADD + _P_CANCEL or nl >= _M - 1:
            k = np.int64(_next_u64(rng) % np.uint64(nl))
            sd = o_side[i, k]
            g = o_g[i, k]
            rem = o_sz[i, k]
            s = 0 if sd > 0 else 1
            if rem > 1.0 and _uniform(rng) < 0.2:
                part = 1.0 + np.floor(_uniform(rng) * (rem - 1.0))
                o_sz[i, k] = rem - part
                lvl[i, s, g] -= part
                _emit(out_i, out_f, row, ts, recv, i, KIND_BOOK_DELETE, sd, base[i] + g, part, o_id[i, k])
            else:
                lvl[i, s, g] -= rem
                if lvl[i, s, g] < 0.5:
                    lvl[i, s, g] = 0.0
                _emit(out_i, out_f, row, ts, recv, i, KIND_BOOK_DELETE, sd, base[i] + g, rem, o_id[i, k])
                _remove_live(live_n, o_id, o_side, o_g, o_sz, i, k)
                if sd > 0 and g == bb[i]:
                    bb[i] = _best_bid(lvl, i, g)
                if sd < 0 and g == ba[i]:
                    ba[i] = _best_ask(lvl, i, g)
            row += 1
        elif u < _P_ADD + _P_CANCEL + _P_MODIFY:
            k = np.int64(_next_u64(rng) % np.uint64(nl))
            sd = o_side[i, k]
            g = o_g[i, k]
            rem = o_sz[i, k]
            s = 0 if sd > 0 else 1
            if rem > 1.0 and _uniform(rng) < 0.6:
                new = 1.0 + np.floor(_uniform(rng) * (rem - 1.0))
                lvl[i, s, g] -= rem - new
                o_sz[i, k] = new
                _emit(out_i, out_f, row, ts, recv, i, KIND_BOOK_MODIFY, sd, base[i] + g, new, o_id[i, k])
            else:
                g2 = g - 1 if sd > 0 else g + 1
                if g2 < 1 or g2 > _G - 2:
                    continue
                lvl[i, s, g] -= rem
                if lvl[i, s, g] < 0.5:
                    lvl[i, s, g] = 0.0
                lvl[i, s, g2] += rem
                o_g[i, k] = g2
                if sd > 0 and g == bb[i]:
                    bb[i] = _best_bid(lvl, i, g)
                if sd < 0 and g == ba[i]:
                    ba[i] = _best_ask(lvl, i, g)
                _emit(out_i, out_f, row, ts, recv, i, KIND_BOOK_MODIFY, sd, base[i] + g2, rem, o_id[i, k])
            row += 1
        else:
            # market order: aggressor side from pressure and top-5 depth imbalance
            db = 0.0
            da = 0.0
            for q in range(5):
                if bb[i] - q >= 0:
                    db += lvl[i, 0, bb[i] - q]
                if ba[i] + q < _G:
                    da += lvl[i, 1, ba[i] + q]
            imb = (db - da) / (db + da) if db + da > 0 else 0.0
            agg = 1 if _uniform(rng) < _sigmoid(_W_PRESS * press[i] + _W_IMB * imb) else -1
            want = 1.0 + _geometric0(rng, tmean[i])
            s = 1 if agg > 0 else 0  # side consumed
            levels = 0
            while want > 0.0 and levels < 3:
                g = ba[i] if agg > 0 else bb[i]
                if g < 0 or g >= _G:
                    break
                # oldest order at that level (smallest id)
                best_k = -1
                best_id = np.int64(-1)
                for q in range(live_n[i]):
                    if o_g[i, q] == g and o_side[i, q] == -agg and (best_k < 0 or o_id[i, q] < best_id):
                        best_k = q
                        best_id = o_id[i, q]
                if best_k < 0:
                    lvl[i, s, g] = 0.0
                    levels += 1
                    if agg > 0:
                        ba[i] = _best_ask(lvl, i, g)
                    else:
                        bb[i] = _best_bid(lvl, i, g)
                    continue
                rem = o_sz[i, best_k]
                fill = rem if rem <= want else want
                want -= fill
                _emit(out_i, out_f, row, ts, recv, i, KIND_TRADE, agg, base[i] + g, fill, best_id)
                row += 1
                lvl[i, s, g] -= fill
                if fill >= rem:
                    _remove_live(live_n, o_id, o_side, o_g, o_sz, i, best_k)
                    if lvl[i, s, g] < 0.5:
                        lvl[i, s, g] = 0.0
                        levels += 1
                        if agg > 0:
                            ba[i] = _best_ask(lvl, i, g)
                        else:
                            bb[i] = _best_bid(lvl, i, g)
                else:
                    o_sz[i, best_k] = rem - fill
                if row >= out_f.shape[0]:
                    return row
            # nudge pressure toward the trade (momentum in order flow)
            press[i] += 0.05 * agg
    return row


class L3Simulator:
    """Resumable L3 market simulation; :meth:`next_chunk` returns the next events as a frame.

    Parameters
    ----------
    symbols : sequence of str
        Instruments; tick size and price level from
        :func:`replay.generator.instrument_spec`.
    seed : int
    start_ns : int
        Exchange time of the first event, ns since the epoch.
    snapshot_orders : int
        Resting orders per side in each instrument's opening snapshot burst.
    """

    def __init__(
        self,
        symbols: Sequence[str] = DEFAULT_SYMBOLS,
        seed: int = DEFAULT_SEED,
        start_ns: int = DEFAULT_START_NS,
        snapshot_orders: int = 30,
    ) -> None:
        self.symbols = _check_symbols(symbols)
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        m = len(self.symbols)
        specs = [instrument_spec(s) for s in self.symbols]
        self.tick_num = np.array([s.tick_num for s in specs], dtype=np.int64)
        self.tick_den = np.array([s.tick_den for s in specs], dtype=np.float64)
        self.base = np.array([s.start_ticks - _G // 2 for s in specs], dtype=np.int64)
        self.depth = np.array([max(1.0, s.depth / 20.0) for s in specs])
        self.tmean = np.array([max(1.0, s.trade_mean * 2.0) for s in specs])
        self.rng = np.empty(1, dtype=np.uint64)
        self.rng[0] = np.uint64((int(seed) * 0xD1B54A32D192ED03 + 0x5851F42D4C957F2D) & (2**64 - 1))
        # st: [last recv ns, next order id, snapshot orders per side]
        self.st = np.array([-(2**62), 1_000_001, int(snapshot_orders)], dtype=np.int64)
        self.t_s = np.zeros(1)
        self.start_ns = int(start_ns)
        self.lvl = np.zeros((m, 2, _G))
        self.live_n = np.zeros(m, dtype=np.int64)
        self.o_id = np.zeros((m, _M), dtype=np.int64)
        self.o_side = np.zeros((m, _M), dtype=np.int64)
        self.o_g = np.zeros((m, _M), dtype=np.int64)
        self.o_sz = np.zeros((m, _M))
        self.bb = np.zeros(m, dtype=np.int64)
        self.ba = np.zeros(m, dtype=np.int64)
        self.press = np.zeros(m)
        self.started = np.zeros(m, dtype=np.int64)

    def next_chunk(self, n: int) -> pl.DataFrame:
        """Return the next events (a frame in :data:`L3_SCHEMA`).

        At least ``n`` rows; a market order in progress at row ``n`` finishes, so a
        few more rows may come (the next chunk then continues consistently).
        """
        n = int(n)
        out_i = np.zeros((n + 64, 7), dtype=np.int64)
        out_f = np.zeros(n + 64)
        rows = _run(n, self.rng, self.st, self.t_s, self.start_ns, self.base, self.depth, self.tmean,
                    self.lvl, self.live_n, self.o_id, self.o_side, self.o_g, self.o_sz, self.bb,
                    self.ba, self.press, self.started, out_i, out_f)
        inst = out_i[:rows, 2]
        px = (out_i[:rows, 5] * self.tick_num[inst]).astype(np.float64) / self.tick_den[inst]
        return pl.DataFrame(
            [
                pl.Series("ts_event_ns", out_i[:rows, 0]),
                pl.Series("ts_recv_ns", out_i[:rows, 1]),
                pl.Series("symbol", self.symbols, dtype=pl.String).gather(inst),
                pl.Series("kind", out_i[:rows, 3].astype(np.int8)),
                pl.Series("side", out_i[:rows, 4].astype(np.int8)),
                pl.Series("price", px),
                pl.Series("size", out_f[:rows]),
                pl.Series("order_id", out_i[:rows, 6].astype(np.uint64)),
            ]
        )


def generate_l3(
    n_events: int,
    symbols: Sequence[str] = DEFAULT_SYMBOLS,
    seed: int = DEFAULT_SEED,
    start_ns: int = DEFAULT_START_NS,
    *,
    snapshot_orders: int = 30,
) -> pl.DataFrame:
    """Return ``n_events`` simulated L3 events (see the module docstring)."""
    return L3Simulator(symbols, seed, start_ns, snapshot_orders).next_chunk(n_events).head(n_events)


def write_l3(
    path: str | Path,
    n_events: int,
    symbols: Sequence[str] = DEFAULT_SYMBOLS,
    seed: int = DEFAULT_SEED,
    *,
    start_ns: int = DEFAULT_START_NS,
    chunk_rows: int = DEFAULT_CHUNK_EVENTS,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``n_events`` L3 events to Parquet / CSV / CSV.gz chunk by chunk (bounded memory).

    ``progress`` is called with the rows written so far after each chunk.
    """
    sim = L3Simulator(symbols, seed, start_ns)
    return write_chunks(path, n_events, chunk_rows, lambda n, final: sim.next_chunk(n), progress)


def generate_trades(
    n_events: int,
    symbols: Sequence[str] = DEFAULT_SYMBOLS,
    seed: int = DEFAULT_SEED,
    start_ns: int = DEFAULT_START_NS,
) -> pl.DataFrame:
    """Return ``n_events`` trades (trade-only shape) from the L1 generator's market."""
    if int(n_events) < 0:
        raise ValueError(f"n_events must be >= 0, got {n_events}")
    frames = []
    got = 0
    k = 0
    while got < n_events:
        need = n_events - got
        f = generate_market(max(7 * need, 1000), symbols, seed + 1000 * k, start_ns)
        f = f.filter(pl.col("kind") == KIND_TRADE).select(list(TRADES_SCHEMA)).head(need)
        if frames:  # continue in time after the previous block
            shift = frames[-1]["ts_event_ns"][-1] - f["ts_event_ns"][0] + 1_000
            f = f.with_columns(pl.col("ts_event_ns") + shift, pl.col("ts_recv_ns") + shift)
        frames.append(f)
        got += f.height
        k += 1
    if not frames:
        return pl.DataFrame(schema=TRADES_SCHEMA)
    return pl.concat(frames).cast(TRADES_SCHEMA)  # type: ignore[arg-type]


def write_trades(
    path: str | Path,
    n_events: int,
    symbols: Sequence[str] = DEFAULT_SYMBOLS,
    seed: int = DEFAULT_SEED,
    *,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``n_events`` trades to Parquet / CSV / CSV.gz (made in memory, then written)."""
    check_output_path(path)
    frame = generate_trades(n_events, symbols, seed)
    return write_chunks(path, n_events, max(n_events, 1), lambda n, final: frame, progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Write a synthetic L3 or trade-only file (``python -m replay.generator_l3``)."""
    p = argparse.ArgumentParser(prog="python -m replay.generator_l3", description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=("l3", "trades"), default="l3")
    p.add_argument("--out", required=True, type=Path, help=".parquet, .csv or .csv.gz")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--symbols", default=",".join(DEFAULT_SYMBOLS))
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = p.parse_args(argv)
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    t0 = time.perf_counter()
    if args.shape == "l3":
        out = write_l3(args.out, args.events, symbols, args.seed)
    else:
        out = write_trades(args.out, args.events, symbols, args.seed)
    print(f"wrote {out}: {args.events:,} {args.shape} events, symbols {symbols}, seed {args.seed}, "
          f"{out.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
