"""Per-tick fused kernels: validate, update the features and run the program in one numba call.

The kernel reads the tick, the state and the model arrays through one
:class:`TickContext` (its address is the only argument besides the tick index),
so a call costs one numba dispatch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from engine.schema import TICK_DTYPE
from features.common import drop_stale_numba_cache
from features.kernels import apply_tick as _l1_apply_tick
from features.kernels_l3 import apply_tick as _l3_apply_tick
from features.kernels_trades import apply_tick as _trades_apply_tick
from features.registry import kernels_for
from models.program import UnsupportedGraph, _run_program

# The fused kernels below take the feature set's apply_tick and the program interpreter
# inlined (numba IR inlining; ``error_model="numpy"`` as both are compiled on their own, so
# the same operations and bits): called, each took its arrays as dozens of scalar arguments
# and the two could not overlap.  Measured on the default L1 model over the default data
# (2-vCPU AVX2 VM, exact integer GEMMs): the fused tick 270-275 -> 237-243 ns.
_INLINE = {"nogil": True, "inline": "always", "error_model": "numpy"}
_l1_apply_inl = njit(**_INLINE)(_l1_apply_tick.py_func)
_trades_apply_inl = njit(**_INLINE)(_trades_apply_tick.py_func)
_l3_apply_inl = njit(**_INLINE)(_l3_apply_tick.py_func)
_run_program_inl = njit(**_INLINE)(_run_program.py_func)

__all__ = ["TickContext", "tick_kernel_for", "tick_cfunc_address", "TICK_CFUNC_SIG"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tick kernels compile in every feature kernel, the book and the program interpreter
drop_stale_numba_cache(__file__, [os.path.join(_ROOT, "features", "kernels*.py"),
                                  os.path.join(_ROOT, "features", "common.py"),
                                  os.path.join(_ROOT, "features", "fastlog.py"),
                                  os.path.join(_ROOT, "features", "validate.py"),
                                  os.path.join(_ROOT, "features", "book", "*.py"),
                                  os.path.join(_ROOT, "models", "program.py"),
                                  os.path.join(_ROOT, "engine", "schema.py")])  # fmt: skip

# --------------------------------------------------------------------------- per-tick kernels
# A numba call costs ~45 ns per array argument (and ~150 ns more for the record
# array of ticks, whose type numba cannot look up on its fast path), so the hot
# call takes two integers: the tick index and the address of ``ctx``, an int64
# array holding the address and shape of every array the tick touches (ticks,
# feature state, params, counters, model arrays).  The kernel rebuilds views
# with ``numba.carray`` (no allocation, no reference counting).
# :class:`TickContext` owns ``ctx`` and keeps every referenced array alive;
# measured 0.8 vs 1.3 us per tick against passing the eight arrays.
_CTX_TICKS, _CTX_N_TICKS = 0, 1
_CTX_F, _CTX_F0, _CTX_F1 = 2, 3, 4
_CTX_I, _CTX_I0, _CTX_I1 = 5, 6, 7
_CTX_P, _CTX_NP = 8, 9
_CTX_C, _CTX_NC = 10, 11
_CTX_MI, _CTX_NMI = 12, 13
_CTX_MF, _CTX_NMF = 14, 15
_CTX_LEN = 16


@intrinsic
def _ptr(typingctx, addr, ty):
    """Return the int64 address ``addr`` as a typed pointer (``ty``: a numpy dtype or scalar class)."""
    if isinstance(ty, types.DType):
        elem = ty.dtype
    elif isinstance(ty, types.NumberClass):
        elem = ty.instance_type
    else:
        return None
    ptrty = types.CPointer(elem)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptrty))

    return ptrty(addr, ty), codegen


@njit(cache=True, nogil=True, inline="always")
def _ctx_of(addr):
    return carray(_ptr(addr, np.int64), (_CTX_LEN,))


@njit(cache=True, nogil=True, inline="always")
def _ticks_of(ctx):
    return carray(_ptr(ctx[_CTX_TICKS], TICK_DTYPE), (ctx[_CTX_N_TICKS],))


@njit(cache=True, nogil=True, inline="always")
def _rest_of(ctx):
    params = carray(_ptr(ctx[_CTX_P], np.float64), (ctx[_CTX_NP],))
    counters = carray(_ptr(ctx[_CTX_C], np.int64), (ctx[_CTX_NC],))
    mi = carray(_ptr(ctx[_CTX_MI], np.int32), (ctx[_CTX_NMI],))
    mf = carray(_ptr(ctx[_CTX_MF], np.float32), (ctx[_CTX_NMF],))
    return params, counters, mi, mf


@njit(cache=True, nogil=True, error_model="numpy")
def _l1_fused_tick(i, ctx_addr):
    """Validate + apply tick ``i`` and score it: L1 features and model in one call.

    ``ctx_addr`` is the address of a :class:`TickContext` array (int64) that
    locates the ticks, the feature state, params, counters and the model arrays.  The features go into
    ``x = mf[xo:xo + F]``, the score into ``mf[mi[3]]`` (preallocated).  Returns
    ``(flags, score)``: flags >= 0 and the score, or ``(-reason, -1.0)`` for a
    rejected tick (model not run).  Times are int64 ns.  Allocates: no arrays
    (the returned tuple is the only Python object).
    """
    ctx = _ctx_of(ctx_addr)
    ticks = _ticks_of(ctx)
    fstate = carray(_ptr(ctx[_CTX_F], np.float64), (ctx[_CTX_F0], ctx[_CTX_F1]))
    istate = carray(_ptr(ctx[_CTX_I], np.int64), (ctx[_CTX_I0], ctx[_CTX_I1]))
    params, counters, mi, mf = _rest_of(ctx)
    xo = mi[4]
    flags = _l1_apply_inl(ticks, i, fstate, istate, params, mf[xo : xo + mi[1]], counters)
    if flags >= 0:
        return flags, _run_program_inl(mi, mf)
    return flags, -1.0


@njit(cache=True, nogil=True, error_model="numpy")
def _trades_fused_tick(i, ctx_addr):
    """:func:`_l1_fused_tick` for the trade-only feature set (2-D state; cached on disk)."""
    ctx = _ctx_of(ctx_addr)
    ticks = _ticks_of(ctx)
    fstate = carray(_ptr(ctx[_CTX_F], np.float64), (ctx[_CTX_F0], ctx[_CTX_F1]))
    istate = carray(_ptr(ctx[_CTX_I], np.int64), (ctx[_CTX_I0], ctx[_CTX_I1]))
    params, counters, mi, mf = _rest_of(ctx)
    xo = mi[4]
    flags = _trades_apply_inl(ticks, i, fstate, istate, params, mf[xo : xo + mi[1]], counters)
    if flags >= 0:
        return flags, _run_program_inl(mi, mf)
    return flags, -1.0


@njit(cache=True, nogil=True, error_model="numpy")
def _l3_fused_tick(i, ctx_addr):
    """:func:`_l1_fused_tick` for the L3 feature set (1-D book state; cached on disk)."""
    ctx = _ctx_of(ctx_addr)
    ticks = _ticks_of(ctx)
    fstate = carray(_ptr(ctx[_CTX_F], np.float64), (ctx[_CTX_F0],))
    istate = carray(_ptr(ctx[_CTX_I], np.int64), (ctx[_CTX_I0],))
    params, counters, mi, mf = _rest_of(ctx)
    xo = mi[4]
    flags = _l3_apply_inl(ticks, i, fstate, istate, params, mf[xo : xo + mi[1]], counters)
    if flags >= 0:
        return flags, _run_program_inl(mi, mf)
    return flags, -1.0


#: the fused kernels compiled once and cached on disk: (apply_tick, f_ndim, i_ndim) -> kernel
_CACHED_TICK_KERNELS = {
    (_l1_apply_tick, 2, 2): _l1_fused_tick,
    (_trades_apply_tick, 2, 2): _trades_fused_tick,
    (_l3_apply_tick, 1, 1): _l3_fused_tick,
}


# C-callable forms of the tick kernels, for a compiled caller that takes the kernel by address
# (engine.native_loop: one loop kernel, cached on disk, for every feature set):
# ``double tick(int64 i, int64 ctx_addr, int64 *flags)``.
TICK_CFUNC_SIG = "float64(int64, int64, CPointer(int64))"


def _l1_tick_c(i, ctx_addr, flags_out):
    flags, score = _l1_fused_tick(i, ctx_addr)
    flags_out[0] = flags
    return score


def _trades_tick_c(i, ctx_addr, flags_out):
    flags, score = _trades_fused_tick(i, ctx_addr)
    flags_out[0] = flags
    return score


def _l3_tick_c(i, ctx_addr, flags_out):
    flags, score = _l3_fused_tick(i, ctx_addr)
    flags_out[0] = flags
    return score


# compiled (or loaded from the disk cache) on first use: a cfunc compiles when it is made
_CACHED_TICK_CFUNCS = {_l1_fused_tick: _l1_tick_c, _trades_fused_tick: _trades_tick_c,
                       _l3_fused_tick: _l3_tick_c}  # fmt: skip
_TICK_CFUNCS: dict[Any, Any] = {}


def tick_cfunc_address(tick: Callable) -> int:
    """Return the address of ``tick``'s C-callable form (see :data:`TICK_CFUNC_SIG`).

    The shipped feature sets' forms are cached on disk; another kernel's is compiled once per process.
    """
    c = _TICK_CFUNCS.get(tick)
    if c is None and tick in _CACHED_TICK_CFUNCS:
        c = _TICK_CFUNCS[tick] = cfunc(TICK_CFUNC_SIG, cache=True, nogil=True)(_CACHED_TICK_CFUNCS[tick])
    if c is None:

        def tick_c(i, ctx_addr, flags_out):
            flags, score = tick(i, ctx_addr)
            flags_out[0] = flags
            return score

        c = _TICK_CFUNCS[tick] = cfunc(TICK_CFUNC_SIG, nogil=True)(tick_c)
    return int(c.address)


def _make_tick_kernel(apply_tick: Callable, f_ndim: int, i_ndim: int) -> Callable:
    """Return a ``tick(i, ctx_addr) -> (flags, score)`` kernel for another feature set's ``apply_tick``."""
    if f_ndim not in (1, 2) or i_ndim not in (1, 2):
        raise UnsupportedGraph("feature state arrays must be 1-D or 2-D for the fused backend")
    two_f, two_i = f_ndim == 2, i_ndim == 2

    @njit(nogil=True, inline="always")
    def fview(ctx):
        if two_f:
            return carray(_ptr(ctx[_CTX_F], np.float64), (ctx[_CTX_F0], ctx[_CTX_F1]))
        return carray(_ptr(ctx[_CTX_F], np.float64), (ctx[_CTX_F0],))

    @njit(nogil=True, inline="always")
    def iview(ctx):
        if two_i:
            return carray(_ptr(ctx[_CTX_I], np.int64), (ctx[_CTX_I0], ctx[_CTX_I1]))
        return carray(_ptr(ctx[_CTX_I], np.int64), (ctx[_CTX_I0],))

    def fused_tick(i, ctx_addr):
        ctx = _ctx_of(ctx_addr)
        ticks = _ticks_of(ctx)
        params, counters, mi, mf = _rest_of(ctx)
        xo = mi[4]
        flags = apply_tick(ticks, i, fview(ctx), iview(ctx), params, mf[xo : xo + mi[1]], counters)
        if flags >= 0:
            return flags, _run_program(mi, mf)
        return flags, -1.0

    return njit(nogil=True)(fused_tick)


def _check_array(name: str, a: np.ndarray, dtype: Any, ndims: tuple[int, ...]) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.dtype(dtype) or a.ndim not in ndims:
        got = f"{getattr(a, 'dtype', type(a))} {getattr(a, 'ndim', '?')}-D"
        raise ValueError(f"fused tick: {name} must be a {np.dtype(dtype)} {ndims}-D array, got {got}")
    if not a.flags.c_contiguous or not a.flags.writeable and name not in ("ticks", "params"):
        raise ValueError(f"fused tick: {name} must be C-contiguous and writeable")
    return a


class TickContext:
    """The ``ctx`` array of a fused tick kernel and the arrays it points to (kept alive here).

    Parameters
    ----------
    fstate, istate : ndarray
        Feature state (float64 / int64, 1-D or 2-D, C-contiguous), updated in place.
    params : ndarray float64
        Feature-set parameters.
    counters : ndarray int64
        Reject counters, updated in place.
    mi, mf : ndarray
        The model's program arrays (:class:`FusedProgram`), registers updated in place.
    ticks : ndarray of TICK_DTYPE, optional
        The source's tick buffer (C-contiguous); see :meth:`set_ticks`.
    """

    def __init__(self, fstate, istate, params, counters, mi, mf, ticks=None) -> None:
        self.ctx = np.zeros(_CTX_LEN, dtype=np.int64)
        #: What the tick kernel takes: the address of ``ctx`` (valid while this object lives).
        self.addr: int = int(self.ctx.ctypes.data)
        self._keep: dict[str, np.ndarray] = {}
        c = self.ctx
        f = self._hold("fstate", fstate, np.float64, (1, 2))
        c[_CTX_F], c[_CTX_F0], c[_CTX_F1] = f.ctypes.data, f.shape[0], f.shape[-1]
        s = self._hold("istate", istate, np.int64, (1, 2))
        c[_CTX_I], c[_CTX_I0], c[_CTX_I1] = s.ctypes.data, s.shape[0], s.shape[-1]
        p = self._hold("params", params, np.float64, (1,))
        c[_CTX_P], c[_CTX_NP] = p.ctypes.data, p.shape[0]
        k = self._hold("counters", counters, np.int64, (1,))
        c[_CTX_C], c[_CTX_NC] = k.ctypes.data, k.shape[0]
        a = self._hold("mi", mi, np.int32, (1,))
        c[_CTX_MI], c[_CTX_NMI] = a.ctypes.data, a.shape[0]
        b = self._hold("mf", mf, np.float32, (1,))
        c[_CTX_MF], c[_CTX_NMF] = b.ctypes.data, b.shape[0]
        self.ticks: np.ndarray | None = None
        if ticks is not None:
            self.set_ticks(ticks)

    def _hold(self, name: str, a: np.ndarray, dtype: Any, ndims: tuple[int, ...]) -> np.ndarray:
        self._keep[name] = _check_array(name, a, dtype, ndims)
        return a

    def set_ticks(self, ticks: np.ndarray) -> None:
        """Point the context at ``ticks`` (TICK_DTYPE, C-contiguous); keeps a reference."""
        if ticks.dtype != TICK_DTYPE or ticks.ndim != 1 or not ticks.flags.c_contiguous:
            raise ValueError("fused tick: ticks must be a C-contiguous 1-D TICK_DTYPE array")
        self.ticks = ticks
        self.ctx[_CTX_TICKS] = ticks.ctypes.data
        self.ctx[_CTX_N_TICKS] = ticks.shape[0]


_TICK_KERNELS: dict[Any, Callable] = {}


def tick_kernel_for(feature_set: Any, f_ndim: int = 2, i_ndim: int = 2) -> Callable:
    """Return the fused ``tick(i, ctx_addr) -> (flags, score)`` kernel of ``feature_set``.

    The shipped feature sets (L1, trades, L3 with their own state layouts) use
    module-level kernels cached on disk; any other ``apply_tick`` (from
    ``features.registry.kernels_for``) is composed once per process and state
    layout.
    """
    kern = kernels_for(feature_set)
    apply = getattr(kern, "apply_tick", None)
    if apply is None:
        fs_id = getattr(feature_set, "id", feature_set)
        raise UnsupportedGraph(f"feature set {fs_id!r} has no apply_tick kernel")
    cached = _CACHED_TICK_KERNELS.get((apply, f_ndim, i_ndim))
    if cached is not None:
        return cached
    key = (id(apply), f_ndim, i_ndim)
    k = _TICK_KERNELS.get(key)
    if k is None:
        k = _TICK_KERNELS[key] = _make_tick_kernel(apply, f_ndim, i_ndim)
    return k
