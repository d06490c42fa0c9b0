"""A seeded venue that announces takers as orders (created at the limit price, then the fills).

Used by tests/test_venue_takers.py and tests/test_live_equals_replay.py.
"""

from __future__ import annotations

import numpy as np
import polars as pl

T0_US = 1_733_000_000_000_000
TICK = 0.01


def venue_feed(n_steps: int = 2500, seed: int = 3) -> tuple[pl.DataFrame, dict, np.ndarray]:
    """Return a taker-announcing venue's feed, its true final book ``{side: {price: size}}``
    and its true (best bid, best ask) after every row (NaN: side empty)."""
    rng = np.random.default_rng(seed)
    rows: list[tuple] = []
    trades: list[tuple] = []  # the venue's separate trade file: microtimestamp,price,amount,type
    tops: list[tuple[float, float]] = []
    book = {1: {}, -1: {}}  # side -> {order id: [price, size]}
    next_id = [1000]
    t = [T0_US]

    def emit(action, oid, side, price, amount):
        rows.append((t[0], action, oid, 0 if side > 0 else 1, round(price, 2), round(amount, 4)))
        bb, ba = best(1), best(-1)
        tops.append((np.nan if bb is None else bb, np.nan if ba is None else ba))

    def add(side, price, size):
        price = round(price, 2)  # on the tick grid, as the venue prints it
        oid = next_id[0]
        next_id[0] += 1
        book[side][oid] = [price, size]
        emit("created", oid, side, price, size)
        return oid

    def best(side):
        px = [p for p, _ in book[side].values()]
        return (max(px) if side > 0 else min(px)) if px else None

    for k in range(10):  # the starting book, one timestamp
        add(1, 100.0 - k * TICK, 1.0 + k % 3)
        add(-1, 100.01 + k * TICK, 1.0 + k % 3)
    for _ in range(n_steps):
        t[0] += int(rng.integers(1, 3000))
        u = rng.random()
        bb, ba = best(1), best(-1)
        if u < 0.55 or bb is None or ba is None:  # passive add behind the top
            side = 1 if rng.random() < 0.5 else -1
            ref = bb if side > 0 else ba
            ref = ref if ref is not None else (ba - TICK if side > 0 else bb + TICK)
            px = round(ref - side * TICK * int(rng.integers(0, 5)), 2)
            if side > 0 and ba is not None:
                px = min(px, round(ba - TICK, 2))
            if side < 0 and bb is not None:
                px = max(px, round(bb + TICK, 2))
            add(side, px, float(rng.choice([0.5, 1.0, 2.0])))
        elif u < 0.8:  # cancel a resting order
            side = 1 if rng.random() < 0.5 else -1
            if len(book[side]) > 3:
                oid = list(book[side])[int(rng.integers(0, len(book[side])))]
                book[side].pop(oid)
                emit("deleted", oid, side, 0.0, 0.0)
        else:  # a taker through 1-3 opposite levels, announced before its fills
            side = 1 if rng.random() < 0.5 else -1
            opp = -side
            levels = sorted({p for p, _ in book[opp].values()}, reverse=(opp > 0))
            if len(levels) < 4:
                continue
            depth = int(rng.integers(1, 4))
            limit = levels[depth - 1]
            want = sum(s for p, s in book[opp].values() if (p <= limit if side > 0 else p >= limit))
            size = round(want + float(rng.choice([-0.5, 0.0, 1.0])), 4)
            if size <= 0:
                continue
            taker = next_id[0]
            next_id[0] += 1
            emit("created", taker, side, limit, size)
            makers = sorted(((p, oid) for oid, (p, _) in book[opp].items()
                             if (p <= limit if side > 0 else p >= limit)),
                            key=lambda x: x[0] * side)  # fmt: skip
            plan, left = [], size
            for _p, oid in makers:  # price-time priority: fill plan of the taker
                if left <= 1e-9:
                    break
                fill = min(book[opp][oid][1], left)
                left = round(left - fill, 4)
                plan.append((oid, fill))
            for k, (oid, fill) in enumerate(plan):
                mp, ms = book[opp][oid]
                trades.append((t[0], round(mp, 2), round(fill, 4), 0 if side > 0 else 1))
                full = fill >= ms - 1e-9
                if full:
                    book[opp].pop(oid)
                else:
                    book[opp][oid][1] = round(ms - fill, 4)
                if k == len(plan) - 1 and left > 1e-9:  # the remainder rests on the venue now
                    book[side][taker] = [limit, left]
                emit("deleted" if full else "changed", oid, opp, mp, 0.0 if full else book[opp][oid][1])
            if left > 1e-9:  # the venue reports the resting remainder's amount
                emit("changed", taker, side, limit, left)
            else:
                emit("deleted", taker, side, limit, 0.0)
    df = pl.DataFrame(rows, schema=["microtimestamp", "action", "id", "order_type", "price", "amount"],
                      orient="row")  # fmt: skip
    truth = {}
    for side in (1, -1):
        lv: dict[float, float] = {}
        for p, s in book[side].values():
            lv[round(p, 2)] = round(lv.get(round(p, 2), 0.0) + s, 4)
        truth[side] = lv
    trades_df = pl.DataFrame(trades, schema=["microtimestamp", "price", "amount", "type"], orient="row")
    return df, truth, np.array(tops), trades_df
