"""Reading the book from Python (tests, reports): levels, orders, anomaly counters."""

from __future__ import annotations

import numpy as np

from features.book.layout import (
    _LOW32,
    ANOMALY_NAMES,
    H_CAP,
    H_F_OFF_LEVELS,
    H_LEVELS,
    H_N_INST,
    H_OFF_INST,
    H_OFF_ORD,
    I_ANOM,
    I_NB,
    N_ANOMALIES,
    NI_INST,
    O_KEY,
    O_META,
    O_PX,
    O_SZ,
    OREC,
)


# ============================================================================= inspection (tests, reports)
def anomaly_counts(istate: np.ndarray) -> dict[str, int]:
    """Return the anomaly counters summed over instruments (non-zero only)."""
    n = int(istate[H_N_INST])
    off = int(istate[H_OFF_INST])
    blk = istate[off : off + n * NI_INST].reshape(n, NI_INST)
    tot = blk[:, I_ANOM : I_ANOM + N_ANOMALIES].sum(axis=0)
    return {name: int(v) for name, v in zip(ANOMALY_NAMES, tot, strict=True) if v}


def book_levels(fstate: np.ndarray, istate: np.ndarray, inst: int) -> dict[str, list[tuple]]:
    """Return ``{"bids": [(price, size, count), ...], "asks": [...]}``, best level first."""
    n_inst = int(istate[H_N_INST])
    if not 0 <= inst < n_inst:
        raise IndexError(f"instrument {inst} out of range 0..{n_inst - 1}")
    L = int(istate[H_LEVELS])
    ib = int(istate[H_OFF_INST]) + inst * NI_INST
    out: dict[str, list[tuple]] = {}
    for s, name in ((0, "bids"), (1, "asks")):
        base = int(istate[H_F_OFF_LEVELS]) + (inst * 2 + s) * 4 * L
        n = int(istate[ib + I_NB + s])
        rows = []
        for q in range(n - 1, -1, -1):
            key = float(fstate[base + q])
            rows.append((key if s == 0 else -key, float(fstate[base + L + q]), int(fstate[base + 2 * L + q])))
        out[name] = rows
    return out


def book_orders(fstate: np.ndarray, istate: np.ndarray, inst: int) -> dict[int, tuple[int, float, float]]:
    """Return the live orders of ``inst``: ``{order_id: (side, price, size)}``."""
    cap = int(istate[H_CAP])
    off = int(istate[H_OFF_ORD])
    rec = istate[off : off + cap * OREC].reshape(cap, OREC)
    meta = rec[:, O_META]
    sel = np.flatnonzero((meta != 0) & ((meta & _LOW32) == inst + 1))
    fv = rec.view(np.float64)
    ids = rec[:, O_KEY].view(np.uint64)
    side = np.where((meta >> 32) & 1, -1, 1)
    return {int(ids[j]): (int(side[j]), float(fv[j, O_PX]), float(fv[j, O_SZ])) for j in sel}
