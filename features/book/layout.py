"""The L3 book state: its flat-array layout (header, per-instrument blocks, order records).

Also the bit helpers of the order records and state creation / checking.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.schema import (
    CROSSING_ADD_POLICIES,
)

INT64_MIN = np.iinfo(np.int64).min


#: Default limit of live orders (all instruments); the table has >= 2x slots.
DEFAULT_MAX_ORDERS = 1 << 16


#: Default number of price levels kept per instrument and side.
DEFAULT_MAX_LEVELS = 4096


# ----------------------------------------------------------------------------- header
H_N_INST = 0


H_CAP = 1


H_MASK = 2


H_LEVELS = 3


H_LIVE = 4


H_MAX_LIVE = 5


H_NEXT_LEVEL_ID = 6


H_OFF_INST = 7


H_OFF_ORD = 8


H_F_OFF_LEVELS = 9


H_MAGIC = 11


H_CROSSING = 12  #: crossing-add policy of this state (CROSS_*), or -1: the ``uncross`` param decides


HEADER = 16


_MAGIC = 0x4C33424F4F4B  # "L3BOOK"


# ----------------------------------------------------------------------------- per-instrument ints
I_LAST_TS = 0  #: last accepted ts_event_ns (INT64_MIN: none)


I_FIRST_TS = 1  #: first accepted ts_event_ns (INT64_MIN: none)


I_N_EVENTS = 2  #: accepted events


I_NB = 3  #: bid levels in use


I_NA = 4  #: ask levels in use


I_LAST_TRADE_TS = 5  #: ts of the last trade (INT64_MIN: none)


I_LAST_TOP_TS = 6  #: ts of the last change of best bid or ask price (INT64_MIN: none)


I_N_BOOK = 7  #: accepted book events (add / modify / delete)


I_ANOM = 8  #: first anomaly counter


ANOMALY_NAMES = (
    "duplicate_add",
    "fill_unknown_order",
    "oversized_reduce",
    "crossed_book",
    "locked_book",
    "uncrossed_levels",
    "snapshot",
    "same_ts",
    "level_overflow",
    "book_clear",
    "orphan_order",
    "taker_add",
    "taker_rested",
    "taker_dropped",
)


N_ANOMALIES = len(ANOMALY_NAMES)


A_DUP_ADD = 0


A_FILL_UNKNOWN = 1


A_OVERSIZED = 2


A_CROSSED = 3


A_LOCKED = 4


A_UNCROSSED = 5


A_SNAPSHOT = 6


A_SAME_TS = 7


A_LEVEL_OVERFLOW = 8


A_CLEAR = 9


A_ORPHAN = 10


A_TAKER_ADD = 11


A_TAKER_RESTED = 12


A_TAKER_DROPPED = 13


#: shallowest level depth (0 = best level) changed per side (+0 bid, +1 ask) since the feature
#: kernel last reset it; 0 in a new state (all changed).  Lets the kernel skip re-summing the
#: depth of a side whose first levels did not change.
I_DEPTH_CHG = I_ANOM + N_ANOMALIES


DEPTH_CLEAN = np.int64(1) << 62  #: value of an ``I_DEPTH_CHG`` column: nothing changed


#: pending takers (``aggressor`` policy): their count, then up to MAX_TAKERS order keys, oldest first
I_N_TAKERS = I_DEPTH_CHG + 2


I_TAKERS = I_N_TAKERS + 1


MAX_TAKERS = 4


I_SPARE = I_TAKERS + MAX_TAKERS  #: first of 5 columns free for the feature kernel


NI_INST = I_SPARE + 5


# ----------------------------------------------------------------------------- per-instrument floats
FB_LAST_TRADE_PX = 0  #: last trade price (0: none); book-owned, used as the band reference


NF_INST = 40  #: columns reserved per instrument; the feature kernel uses 1..NF_INST-1


# ----------------------------------------------------------------------------- order records
OREC = 4  # [key, meta = level id << 33 | ask << 32 | inst + 1, price (f64 bits), size (f64 bits)]


O_KEY = 0


O_META = 1


O_PX = 2


O_SZ = 3


_LOW32 = (1 << 32) - 1


_LEVEL_ID_MOD = 1 << 30


#: level id of a pending taker: in the order table, on no level (never given to a real level)
PENDING_LEVEL = _LEVEL_ID_MOD - 1


# ----------------------------------------------------------------------------- params used by the book
# (indices into the feature set's params vector, shared with features.kernels_l3)
P_MAX_PRICE = 0


P_PRICE_BAND = 1


P_UNCROSS = 2


N_BOOK_PARAMS = 3


# ----------------------------------------------------------------------------- crossing-add policies
CROSS_KEEP = 0  #: keep every order as received (the book may rest crossed)


CROSS_UNCROSS = 1  #: a crossing add drops the opposite levels strictly through its price (stale)


CROSS_AGGRESSOR = 2  #: a marketable add is an incoming taker: held off the book while it crosses


#: Policy names (``crossing_add`` in a column mapping) -> code.
CROSSING_POLICIES = {name: code for code, name in enumerate(CROSSING_ADD_POLICIES)}


assert CROSSING_POLICIES == {"keep": CROSS_KEEP, "uncross": CROSS_UNCROSS, "aggressor": CROSS_AGGRESSOR}


_U_GOLD = np.uint64(0x9E3779B97F4A7C15)


_U_M1 = np.uint64(0xBF58476D1CE4E5B9)


_U_M2 = np.uint64(0x94D049BB133111EB)


_U30 = np.uint64(30)


_U27 = np.uint64(27)


_U31 = np.uint64(31)


#: low order-id bits kept as a slot offset (see :func:`_home`)
RUN_BITS = 4


_U_RUN = np.uint64(RUN_BITS)


_U_RUN_MASK = np.uint64((1 << RUN_BITS) - 1)


@intrinsic
def _f2i(typingctx, x):
    """Return the bits of float64 ``x`` as an int64 (no conversion, no array view)."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))

    return types.int64(types.float64), codegen


@intrinsic
def _i2f(typingctx, x):
    """Return the int64 bits ``x`` as the float64 they encode."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return types.float64(types.int64), codegen


@intrinsic
def _prefetch(typingctx, arr, idx, off):
    """Hint the CPU to load the cache line ``off`` bytes into row ``idx`` of ``arr`` (``llvm.prefetch``).

    A hint: it changes no result (and a prefetch never faults).
    """
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None
    if not isinstance(off, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        inds = [args[1]] + [zero] * (aryty.ndim - 1)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, inds, wraparound=False)
        i8p = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        i8p = builder.gep(i8p, [args[2]])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [i8p, i32(0), i32(3), i32(1)])  # read, keep in all cache levels, data
        return context.get_dummy_value()

    return types.void(arr, idx, off), codegen


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _meta(inst, side, level_id):
    """Return the packed meta word of an order (see the module docstring)."""
    ask = np.int64(1) if side < 0 else np.int64(0)
    return (np.int64(level_id) << 33) | (ask << 32) | np.int64(inst + 1)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _m_side(meta):
    return -1 if (meta >> 32) & 1 else 1


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _m_level(meta):
    return meta >> 33


def _pow2_at_least(n: int) -> int:
    cap = 1
    while cap < n:
        cap <<= 1
    return cap


def new_book_state(
    n_instruments: int,
    *,
    max_orders: int = DEFAULT_MAX_ORDERS,
    max_levels: int = DEFAULT_MAX_LEVELS,
    crossing_add: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(fstate, istate)`` of an empty book for ``n_instruments`` instruments.

    Parameters
    ----------
    n_instruments : int
        Instrument ids ``0 .. n_instruments - 1``.
    max_orders : int
        Live orders the table accepts (all instruments together); an add beyond
        it is rejected as ``book_full``.  The table has a power of two >= 2x slots.
    max_levels : int
        Price levels kept per instrument and side (``L``).
    crossing_add : {None, "keep", "uncross", "aggressor"}
        What an add (or modify) at or through the opposite best price means:
        a property of the venue's feed, not of the model (see the module
        docstring).  ``None``: the feature set's ``uncross`` parameter decides
        (1 = ``uncross``, 0 = ``keep``).

    Memory: ``32 * cap`` bytes for the order table (``cap`` = the power of two
    >= ``2 * max_orders``; zero pages until touched) plus ``64 * max_levels``
    bytes per instrument.
    """
    if n_instruments < 0:
        raise ValueError(f"n_instruments must be >= 0, got {n_instruments}")
    if max_orders < 1 or max_levels < 2:
        raise ValueError(f"need max_orders >= 1 and max_levels >= 2, got {max_orders}, {max_levels}")
    if crossing_add is not None and crossing_add not in CROSSING_POLICIES:
        raise ValueError(f"crossing_add must be one of {sorted(CROSSING_POLICIES)}, got {crossing_add!r}")
    cap = _pow2_at_least(2 * int(max_orders))
    L = int(max_levels)
    n = int(n_instruments)
    off_inst = HEADER
    off_ord = off_inst + n * NI_INST
    istate = np.zeros(off_ord + cap * OREC, dtype=np.int64)
    f_off_levels = n * NF_INST
    fstate = np.zeros(f_off_levels + n * 2 * 4 * L, dtype=np.float64)
    istate[H_N_INST] = n
    istate[H_CAP] = cap
    istate[H_MASK] = cap - 1
    istate[H_LEVELS] = L
    istate[H_MAX_LIVE] = int(max_orders)
    istate[H_NEXT_LEVEL_ID] = 1
    istate[H_OFF_INST] = off_inst
    istate[H_OFF_ORD] = off_ord
    istate[H_F_OFF_LEVELS] = f_off_levels
    istate[H_MAGIC] = _MAGIC
    istate[H_CROSSING] = -1 if crossing_add is None else CROSSING_POLICIES[crossing_add]
    blk = istate[off_inst:off_ord].reshape(n, NI_INST)
    blk[:, I_LAST_TS] = INT64_MIN
    blk[:, I_FIRST_TS] = INT64_MIN
    blk[:, I_LAST_TRADE_TS] = INT64_MIN
    blk[:, I_LAST_TOP_TS] = INT64_MIN
    return fstate, istate


def check_book_state(fstate: np.ndarray, istate: np.ndarray) -> None:
    """Raise ValueError unless the arrays are a book state from :func:`new_book_state`."""
    if istate.ndim != 1 or istate.dtype != np.int64 or istate.shape[0] < HEADER:
        raise ValueError("istate is not an L3 book state (1-D int64 with a header)")
    if int(istate[H_MAGIC]) != _MAGIC:
        raise ValueError("istate is not an L3 book state (bad magic)")
    L = int(istate[H_LEVELS])
    if fstate.ndim != 1 or fstate.shape[0] != int(istate[H_F_OFF_LEVELS]) + int(istate[H_N_INST]) * 8 * L:
        raise ValueError("fstate does not match istate's layout")
