"""Fused backend: features and model in one numba call per tick.

The ONNX graph is lowered to a small *program* (flat int32/float32 arrays) that
one cached ``@njit`` interpreter runs; the per-tick kernel calls the feature
set's ``apply_tick`` and then the program, and writes the score into a
preallocated array.  No code is generated per model, so a new model (hot
reload) costs no JIT compilation: it is only new arrays.

Supported graphs (a chain from ``x`` [N, F] to ``score`` [N, 1]):

* element-wise ``Sub`` / ``Mul`` / ``Add`` with a constant (scalar or [F]),
  ``Clip``, ``Identity``;
* ``MatMul`` / ``Gemm`` (+ ``Add`` bias), ``Relu`` / ``Tanh`` / ``Sigmoid``:
  linear/logistic regression and MLPs, fp32;
* their QDQ int8 forms: ``QuantizeLinear`` / ``DequantizeLinear`` per tensor
  (uint8 or int8 activations, int8 weights), lowered to integer arithmetic.

Any other op (or a non-chain graph, per-channel quantization, ...) raises
:class:`UnsupportedGraph`, whose message names the op and node.

Why int8 results match onnxruntime: onnxruntime does not execute the QDQ graph
as written.  With all graph optimisations (as :class:`models.ort_backend.OrtBackend`
runs it) it rewrites ``DQ -> MatMul -> Add -> Relu -> Q`` into a ``QGemm`` with
an int32 bias and a requantised uint8 output, and the last layer into a float
``FusedGemm`` on dequantised inputs (onnxruntime 1.31; other versions may
choose other fusions).  Rounding the bias to int32 and requantising directly
change the integer codes of hidden activations near rounding boundaries, so a
kernel that follows the QDQ graph literally differs from onnxruntime by a few
hidden steps on a fraction of rows.  The fused backend therefore lowers the
graph *onnxruntime actually runs* (saved with ``optimized_model_filepath``,
same session options) when it only contains ops it knows (``QGemm``,
``FusedGemm``, ``MatMulIntegerToFloat``, ``QLinearMatMul``, the ops above),
reproducing MLAS's arithmetic: ``QuantizeLinear`` = ``x / scale`` in float32,
clamp, round half to even, add zero point; integer GEMM accumulated exactly in
int32 (+ int32 bias); requantisation = ``float32(acc) * (sa * sb / sy)``,
clamp, round half to even, add zero point; ``DequantizeLinear`` =
``float32(q - zp) * scale``.  Otherwise it falls back to the literal QDQ
semantics of the original graph (``lowering = "reference"``; on the shipped
int8 model that differs from onnxruntime by up to 2 output steps on ~4 % of
rows).  Float GEMMs accumulate in float32 in input order (onnxruntime's
sgemm uses FMA and its own order), so fp32 graphs agree to ~4e-7.  (On CPUs
without VNNI, MLAS's u8s8 AVX2 kernel can saturate int16 pair sums; the
parity check would show that.)

Before a fused backend is used, :func:`check_parity` compares it with the
onnxruntime backend on >= 100,000 feature vectors: fp32 max abs diff <= 1e-5;
int8 max abs diff <= one *output quantization step*, defined as the largest
score change one step of the last quantized activation can cause,
``0.25 * s_last * max |W_out|`` (0.25 = max slope of the sigmoid).
:func:`select_backend` implements ``--backend auto|ort|fused``.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numba import carray, njit, types
from numba.extending import intrinsic
from onnx import numpy_helper

from engine.schema import N_REJECT_REASONS, TICK_DTYPE
from features.kernels import apply_tick as _l1_apply_tick
from features.kernels_l3 import apply_tick as _l3_apply_tick
from features.kernels_trades import apply_tick as _trades_apply_tick
from features.registry import kernels_for
from models.loader import FeatureSetLike, load_checked
from models.metadata import ModelError, ModelMetadata
from models.ort_backend import OrtBackend, make_session_options
from replay.generator import default_data_path
from replay.reader import read_ticks

__all__ = [
    "UnsupportedGraph",
    "FusedProgram",
    "FusedBackend",
    "ParityReport",
    "BackendChoice",
    "lower_graph",
    "lower_model",
    "check_parity",
    "check_tick_kernel",
    "parity_vectors",
    "select_backend",
    "BACKEND_KINDS",
    "PARITY_ROWS",
    "FP32_TOLERANCE",
    "SUPPORTED_OPS",
]

log = logging.getLogger("tickscore.fused")

BACKEND_KINDS = ("auto", "ort", "fused")
#: Feature vectors of the pre-use parity check.
PARITY_ROWS = 100_000
#: fp32 parity tolerance (max abs score difference).
FP32_TOLERANCE = 1e-5

#: Ops of the original graph the lowering understands.
SUPPORTED_OPS = (
    "Sub", "Mul", "Add", "Clip", "Identity", "MatMul", "Gemm", "Relu", "Tanh", "Sigmoid",
    "QuantizeLinear", "DequantizeLinear",
)
#: Extra (com.microsoft) ops of onnxruntime-optimised graphs it understands.
_ORT_FUSED_OPS = ("QGemm", "FusedGemm", "MatMulIntegerToFloat", "QLinearMatMul")

# --------------------------------------------------------------------------- program
# Two arrays per model instance (few arguments = cheaper numba dispatch):
#   mi int32   = [header | op rows | integer constants | integer registers (2 x R)]
#   mf float32 = [float constants | x (F) | float registers (2 x R)]
# Header: mi[0] n_ops, mi[1] F, mi[2] offset of the first op row, mi[3] index of
# the score in mf, mi[4] offset of x in mf.
# Op row (``_ROW`` int32): op, n_in, n_out, src, dst, p0, p1, p2, p3, p4; src/dst are
# register offsets (in mi or mf by op), p* offsets of constants (-1 = none).
_HDR = 5
_ROW = 10
OP_SUB, OP_MUL, OP_ADD, OP_CLIP = 1, 2, 3, 4
OP_QUANT, OP_DEQUANT = 5, 6
OP_GEMM_F, OP_GEMM_I2F, OP_GEMM_I2Q = 7, 8, 9
OP_RELU, OP_TANH, OP_SIGMOID = 10, 11, 12
OP_COPY = 13
_OP_NAMES = {
    OP_SUB: "sub", OP_MUL: "mul", OP_ADD: "add", OP_CLIP: "clip", OP_QUANT: "quantize",
    OP_DEQUANT: "dequantize", OP_GEMM_F: "gemm_f32", OP_GEMM_I2F: "gemm_int_to_f32",
    OP_GEMM_I2Q: "gemm_int_requant", OP_RELU: "relu", OP_TANH: "tanh", OP_SIGMOID: "sigmoid",
    OP_COPY: "copy",
}


@njit(cache=True, nogil=True, inline="always")
def _u(i):
    """Return ``i`` as uint64 (indices that are provably >= 0 skip numba's wraparound branch)."""
    return np.uint64(i)


@njit(cache=True, nogil=True)
def _run_program(mi, mf):
    """Run the lowered model on ``x = mf[xo:xo + F]``; return the score (float64 of a float32).

    ``mi`` int32: header, op rows, integer constants, integer registers;
    ``mf`` float32: float constants, x, float registers (see :class:`FusedProgram`).
    The score is also left in ``mf[mi[3]]``.  Allocates: no.

    Offsets are used as uint64 so numba emits no negative-index wraparound
    branches and LLVM can vectorise the dot products (5x faster than int64
    offsets for a 16x16 layer).
    """
    n_ops = mi[0]
    base = mi[2]
    for o in range(n_ops):
        r = base + o * _ROW
        op = mi[r]
        n_in = _u(mi[r + 1])
        n_out = _u(mi[r + 2])
        src = _u(mi[r + 3])
        dst = _u(mi[r + 4])
        p0 = mi[r + 5]
        p1 = mi[r + 6]
        p2 = mi[r + 7]
        p3 = mi[r + 8]
        p4 = mi[r + 9]
        if op == OP_GEMM_I2Q:
            # int GEMM + int32 bias, requantised: q = sat(rne(f32(acc) * M) + zp)
            m = mf[p2]
            zpa = mi[p1]
            zpo = mi[p1 + 1]
            lo = np.float32(mi[p1 + 2] - zpo)
            hi = np.float32(mi[p1 + 3] - zpo)
            for j in range(n_out):
                iacc = 0
                wo = _u(p0) + j * n_in
                for k in range(n_in):
                    iacc += (mi[src + k] - zpa) * mi[wo + k]
                if p3 >= 0:
                    iacc += mi[_u(p3) + j]
                v = np.float32(iacc) * m
                if v < lo:
                    v = lo
                if v > hi:
                    v = hi
                mi[dst + j] = np.int32(np.rint(v)) + zpo
        elif op == OP_GEMM_I2F:
            # int GEMM, float output: f32(acc [+ int bias]) * M [+ float bias]
            m = mf[p2]
            zpa = mi[p1]
            for j in range(n_out):
                iacc = 0
                wo = _u(p0) + j * n_in
                for k in range(n_in):
                    iacc += (mi[src + k] - zpa) * mi[wo + k]
                if p4 >= 0:
                    iacc += mi[_u(p4) + j]
                v = np.float32(iacc) * m
                if p3 >= 0:
                    v = v + mf[_u(p3) + j]
                mf[dst + j] = v
        elif op == OP_GEMM_F:
            # float32 GEMM, W (n_in, n_out) row-major: y[j] = b[j] + sum_k x[k] W[k, j],
            # summed over k in order (vectorised across j, no reassociation).
            for j in range(n_out):
                mf[dst + j] = np.float32(0.0)
            for k in range(n_in):
                xk = mf[src + k]
                wo = _u(p0) + k * n_out
                for j in range(n_out):
                    mf[dst + j] += xk * mf[wo + j]
            if p1 >= 0:
                for j in range(n_out):
                    mf[dst + j] += mf[_u(p1) + j]
        elif op == OP_QUANT:
            s = mf[p0]
            zp = mi[p1]
            lo = np.float32(mi[p1 + 1] - zp)
            hi = np.float32(mi[p1 + 2] - zp)
            for k in range(n_in):
                v = mf[src + k] / s
                if v < lo or v != v:
                    v = lo
                if v > hi:
                    v = hi
                mi[dst + k] = np.int32(np.rint(v)) + zp
        elif op == OP_DEQUANT:
            s = mf[p0]
            zp = mi[p1]
            for k in range(n_in):
                mf[dst + k] = np.float32(mi[src + k] - zp) * s
        elif op == OP_SUB or op == OP_MUL or op == OP_ADD:
            c0 = _u(p0)
            cs = _u(p1)
            for k in range(n_in):
                a = mf[src + k]
                c = mf[c0 + k * cs]
                if op == OP_SUB:
                    mf[dst + k] = a - c
                elif op == OP_MUL:
                    mf[dst + k] = a * c
                else:
                    mf[dst + k] = a + c
        elif op == OP_CLIP:
            lo = mf[p0]
            hi = mf[p0 + 1]
            for k in range(n_in):
                v = mf[src + k]
                if v < lo:
                    v = lo
                if v > hi:
                    v = hi
                mf[dst + k] = v
        elif op == OP_RELU:
            for k in range(n_in):
                v = mf[src + k]
                mf[dst + k] = v if v > 0 else np.float32(0.0)
        elif op == OP_SIGMOID:
            for k in range(n_in):
                mf[dst + k] = np.float32(1.0 / (1.0 + math.exp(-np.float64(mf[src + k]))))
        elif op == OP_TANH:
            for k in range(n_in):
                mf[dst + k] = np.float32(math.tanh(np.float64(mf[src + k])))
        elif op == OP_COPY:
            for k in range(n_in):
                mf[dst + k] = mf[src + k]
    return np.float64(mf[mi[3]])


@njit(cache=True, nogil=True)
def _score_rows(X, mi, mf, out):
    """Score every row of ``X`` (float32 (n, F)) into ``out`` (float64 (n,)). Allocates: no."""
    F = mi[1]
    xo = mi[4]
    for i in range(X.shape[0]):
        for k in range(F):
            mf[xo + k] = X[i, k]
        out[i] = _run_program(mi, mf)


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


@njit(cache=True, nogil=True)
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
    flags = _l1_apply_tick(ticks, i, fstate, istate, params, mf[xo : xo + mi[1]], counters)
    if flags >= 0:
        return flags, _run_program(mi, mf)
    return flags, -1.0


@njit(cache=True, nogil=True)
def _trades_fused_tick(i, ctx_addr):
    """:func:`_l1_fused_tick` for the trade-only feature set (2-D state; cached on disk)."""
    ctx = _ctx_of(ctx_addr)
    ticks = _ticks_of(ctx)
    fstate = carray(_ptr(ctx[_CTX_F], np.float64), (ctx[_CTX_F0], ctx[_CTX_F1]))
    istate = carray(_ptr(ctx[_CTX_I], np.int64), (ctx[_CTX_I0], ctx[_CTX_I1]))
    params, counters, mi, mf = _rest_of(ctx)
    xo = mi[4]
    flags = _trades_apply_tick(ticks, i, fstate, istate, params, mf[xo : xo + mi[1]], counters)
    if flags >= 0:
        return flags, _run_program(mi, mf)
    return flags, -1.0


@njit(cache=True, nogil=True)
def _l3_fused_tick(i, ctx_addr):
    """:func:`_l1_fused_tick` for the L3 feature set (1-D book state; cached on disk)."""
    ctx = _ctx_of(ctx_addr)
    ticks = _ticks_of(ctx)
    fstate = carray(_ptr(ctx[_CTX_F], np.float64), (ctx[_CTX_F0],))
    istate = carray(_ptr(ctx[_CTX_I], np.int64), (ctx[_CTX_I0],))
    params, counters, mi, mf = _rest_of(ctx)
    xo = mi[4]
    flags = _l3_apply_tick(ticks, i, fstate, istate, params, mf[xo : xo + mi[1]], counters)
    if flags >= 0:
        return flags, _run_program(mi, mf)
    return flags, -1.0


#: the fused kernels compiled once and cached on disk: (apply_tick, f_ndim, i_ndim) -> kernel
_CACHED_TICK_KERNELS = {
    (_l1_apply_tick, 2, 2): _l1_fused_tick,
    (_trades_apply_tick, 2, 2): _trades_fused_tick,
    (_l3_apply_tick, 1, 1): _l3_fused_tick,
}


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


# --------------------------------------------------------------------------- lowering
class UnsupportedGraph(ModelError):
    """The fused backend cannot run this graph (the message names the op/node)."""


@dataclass
class FusedProgram:
    """A lowered model: arrays for :func:`_run_program` and a description.

    Attributes
    ----------
    mi : ndarray int32
        Header, op rows, integer weights/biases/zero points, integer registers.
    mf : ndarray float32
        Float constants (weights, biases, scales, clip bounds), x, float registers.
    n_features : int
        Input width F.
    x_offset : int
        ``x`` is ``mf[x_offset:x_offset + F]``.
    score_index : int
        The score is left in ``mf[score_index]``.
    lowering : str
        ``"ort-optimized"`` (the graph onnxruntime runs) or ``"reference"``.
    ops : list of str
        Op names, for reports.
    out_step : float or None
        Score change of one step of the last quantized activation (int8 graphs),
        ``0.25 * s_last * max |W_out|``; None for float graphs.
    quantized : bool
        The program contains integer arithmetic.
    """

    mi: np.ndarray
    mf: np.ndarray
    n_features: int
    x_offset: int
    score_index: int
    lowering: str
    ops: list[str]
    out_step: float | None
    quantized: bool

    def new_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return private copies ``(mi, mf)`` (each user needs its own registers)."""
        return self.mi.copy(), self.mf.copy()

    def score_rows(self, X: np.ndarray) -> np.ndarray:
        """Return the scores of the rows of ``X`` (float32 (n, F)) as float64 (n,). Allocates."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (n, {self.n_features}), got {X.shape}")
        mi, mf = self.new_arrays()
        out = np.empty(X.shape[0], dtype=np.float64)
        _score_rows(X, mi, mf, out)
        return out


@dataclass
class _Val:
    """Symbolic value of a tensor during lowering."""

    kind: str  # "const", "qconst", "f" (float reg), "q" (int reg)
    width: int = 0
    reg: int = -1  # register offset (float registers for "f", integer registers for "q")
    const: np.ndarray | None = None  # const: float array; qconst: int array
    scale: float = 1.0
    zp: int = 0
    qmin: int = 0
    qmax: int = 0
    dq: bool = False  # q-kind value that the graph already dequantized (float semantics)


_QRANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


class _Lowerer:
    """Walk a chain-shaped graph and emit program ops."""

    def __init__(self, model: onnx.ModelProto, source: str, allowed: tuple[str, ...]) -> None:
        self.model = model
        self.source = source
        self.allowed = allowed
        self.rows: list[list[int]] = []
        self.cf: list[np.ndarray] = []
        self.ci: list[np.ndarray] = []
        self.cf_len = 0
        self.ci_len = 0
        self.vals: dict[str, _Val] = {}
        self.op_names: list[str] = []
        self.last_gemm: tuple[int, _Val, _Val] | None = None  # (row, input, weights) of the last GEMM
        self.quantized = False
        self._last_dequant_scale: float | None = None

    # -- constant pools -------------------------------------------------------------
    def addf(self, a) -> int:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float32).reshape(-1))
        off = self.cf_len
        self.cf.append(a)
        self.cf_len += a.size
        return off

    def addi(self, a) -> int:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.int64).reshape(-1))
        if a.size and (a.max() > np.iinfo(np.int32).max or a.min() < np.iinfo(np.int32).min):
            raise UnsupportedGraph(f"{self.source}: integer constant out of int32 range")
        off = self.ci_len
        self.ci.append(a.astype(np.int32))
        self.ci_len += a.size
        return off

    def emit(self, op: int, n_in: int, n_out: int, src: int, dst: int, *p: int) -> int:
        params = list(p) + [-1] * (5 - len(p))
        self.rows.append([op, n_in, n_out, src, dst, *params])
        self.op_names.append(_OP_NAMES[op])
        return len(self.rows) - 1

    # -- registers --------------------------------------------------------------------
    def freg(self, width: int, avoid: int) -> int:
        """Return a float register (offset in w) different from ``avoid``."""
        a, b = self.F, self.F + self.R
        return b if avoid == a else a

    def qreg(self, avoid: int) -> int:
        return self.R if avoid == 0 else 0

    # -- helpers ------------------------------------------------------------------------
    def fail(self, node: onnx.NodeProto, why: str) -> UnsupportedGraph:
        return UnsupportedGraph(
            f"{self.source}: fused backend cannot run node {node.name or '?'!r} "
            f"(op {node.op_type!r}): {why}"
        )

    def const(self, name: str, node: onnx.NodeProto) -> np.ndarray:
        v = self.vals.get(name)
        if v is None or v.kind not in ("const", "qconst"):
            raise self.fail(node, f"input {name!r} must be a constant initializer")
        if v.kind == "qconst":
            return self.fold(v)
        return v.const

    def fold(self, v: _Val) -> np.ndarray:
        return (np.float32(v.scale) * (v.const - v.zp).astype(np.float32)).astype(np.float32)

    def scalar(self, name: str, node: onnx.NodeProto) -> np.ndarray:
        a = self.const(name, node) if self.vals[name].kind == "const" else self.vals[name].const
        if a.size != 1:
            raise self.fail(node, f"{name!r} must be a scalar (per-tensor quantization only)")
        return a.reshape(())

    def to_float(self, v: _Val) -> _Val:
        """Materialise a dequantized int value as a float register."""
        if v.kind == "f":
            return v
        if v.kind != "q":
            raise UnsupportedGraph(f"{self.source}: constant used as activation")
        dst = self.freg(v.width, -1)
        self.emit(OP_DEQUANT, v.width, v.width, v.reg, dst, self.addf([v.scale]), self.addi([v.zp]))
        return _Val("f", v.width, dst)

    def runtime_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [n for n in node.input if n and n in self.vals and self.vals[n].kind in ("f", "q")]

    # -- gemm -------------------------------------------------------------------------
    def gemm(
        self, node: onnx.NodeProto, a: _Val, b: _Val, bias: np.ndarray | None, alpha: float = 1.0
    ) -> _Val:
        n_in = a.width
        if b.const.ndim != 2 or b.const.shape[0] != n_in:
            raise self.fail(node, f"weight shape {b.const.shape} does not match input width {n_in}")
        n_out = int(b.const.shape[1])
        if bias is not None:
            bias = np.broadcast_to(np.asarray(bias, dtype=np.float32).reshape(-1), (n_out,))
        if a.kind == "q" and a.dq and b.kind == "qconst" and alpha == 1.0:
            # DQ(act) x DQ(W): exact int32 accumulation, float output.
            self.quantized = True
            wt = np.ascontiguousarray((b.const.astype(np.int64) - b.zp).T)
            m = np.float32(np.float32(a.scale) * np.float32(b.scale))
            dst = self.F
            row = self.emit(
                OP_GEMM_I2F, n_in, n_out, a.reg, dst, self.addi(wt), self.addi([a.zp]),
                self.addf([m]), self.addf(bias) if bias is not None else -1, -1,
            )
            out = _Val("f", n_out, dst)
            self.last_gemm = (row, a, b)
            return out
        a = self.to_float(a)
        W = self.fold(b) if b.kind == "qconst" else b.const
        W = np.asarray(W, dtype=np.float32)
        if alpha != 1.0:
            W = (W * np.float32(alpha)).astype(np.float32)
        dst = self.freg(n_out, a.reg)
        row = self.emit(
            OP_GEMM_F, n_in, n_out, a.reg, dst, self.addf(np.ascontiguousarray(W)),
            self.addf(bias) if bias is not None else -1,
        )
        self.last_gemm = (row, a, b)
        return _Val("f", n_out, dst)

    # -- main ---------------------------------------------------------------------------
    def run(self) -> FusedProgram:
        g = self.model.graph
        for t in g.initializer:
            arr = numpy_helper.to_array(t)
            self.vals[t.name] = _Val("const", int(arr.size), const=arr)
        for n in g.node:
            if n.op_type == "Constant":
                attr = {a.name: a for a in n.attribute}
                if "value" not in attr:
                    raise self.fail(n, "only tensor Constants are supported")
                arr = numpy_helper.to_array(attr["value"].t)
                self.vals[n.output[0]] = _Val("const", int(arr.size), const=arr)
        inputs = [i for i in g.input if i.name not in self.vals]
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            raise UnsupportedGraph(f"{self.source}: expected one graph input, found {names}")
        dims = inputs[0].type.tensor_type.shape.dim
        if len(dims) != 2 or not dims[1].HasField("dim_value"):
            raise UnsupportedGraph(f"{self.source}: input must have shape [N, F] with a fixed F")
        self.F = F = int(dims[1].dim_value)
        widths = [F]
        for t in g.initializer:
            widths.extend(int(d) for d in t.dims)
        self.R = max(widths) if widths else F
        self.vals[inputs[0].name] = _Val("f", F, 0)
        for node in g.node:
            if node.op_type == "Constant":
                continue
            self.node(node)
        if len(g.output) != 1:
            raise UnsupportedGraph(f"{self.source}: expected one graph output")
        out = self.vals.get(g.output[0].name)
        if out is None or out.kind not in ("f", "q"):
            raise UnsupportedGraph(
                f"{self.source}: output {g.output[0].name!r} is not computed from the input"
            )
        if out.kind == "q":
            if not out.dq:
                raise UnsupportedGraph(f"{self.source}: the graph output is quantized (not float)")
            out = self.to_float(out)
        if out.width != 1:
            raise UnsupportedGraph(f"{self.source}: output width must be 1, got {out.width}")
        if not self.rows:
            raise UnsupportedGraph(f"{self.source}: graph has no operations")
        return self.finish(out)

    def finish(self, out: _Val) -> FusedProgram:
        n_ops = len(self.rows)
        ops_off = _HDR
        ints_off = ops_off + n_ops * _ROW
        iregs_off = ints_off + self.ci_len
        x_off = self.cf_len
        rows = np.array(self.rows, dtype=np.int64).reshape(n_ops, _ROW)
        # Relocate: constant offsets into mi, integer and float registers.
        ci_fields = {OP_QUANT: (6,), OP_DEQUANT: (6,), OP_GEMM_I2F: (5, 6, 9), OP_GEMM_I2Q: (5, 6, 8)}
        int_src = (OP_DEQUANT, OP_GEMM_I2F, OP_GEMM_I2Q)
        int_dst = (OP_QUANT, OP_GEMM_I2Q)
        for r in rows:
            op = int(r[0])
            for f in ci_fields.get(op, ()):
                if r[f] >= 0:
                    r[f] += ints_off
            r[3] += iregs_off if op in int_src else x_off
            r[4] += iregs_off if op in int_dst else x_off
        header = np.array([n_ops, self.F, ops_off, x_off + out.reg, x_off], dtype=np.int64)
        ints = [a.astype(np.int64) for a in self.ci]
        mi = np.concatenate([header, rows.reshape(-1), *ints, np.zeros(2 * self.R, np.int64)])
        if mi.max() > np.iinfo(np.int32).max:
            raise UnsupportedGraph(f"{self.source}: model too large for the fused backend")
        mf = np.concatenate([*self.cf, np.zeros(self.F + 2 * self.R, np.float32)]).astype(np.float32)
        return FusedProgram(
            mi=np.ascontiguousarray(mi.astype(np.int32)),
            mf=np.ascontiguousarray(mf),
            n_features=self.F,
            x_offset=x_off,
            score_index=x_off + out.reg,
            lowering="",
            ops=self.op_names,
            out_step=self.output_step(),
            quantized=self.quantized,
        )

    def output_step(self) -> float | None:
        """Return 0.25 * s_last * max|W_out| for graphs whose last GEMM input is quantized."""
        if self.last_gemm is None:
            return None
        row, a, b = self.last_gemm
        op = self.rows[row][0]
        if a.kind == "q" or (op == OP_GEMM_F and self._last_dequant_scale is not None):
            s = a.scale if a.kind == "q" else self._last_dequant_scale
            W = self.fold(b) if b.kind == "qconst" else np.asarray(b.const, dtype=np.float32)
            return float(0.25 * s * np.abs(W).max())
        return None

    def node(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if op not in self.allowed:
            raise UnsupportedGraph(
                f"{self.source}: fused backend does not support op {op!r} (node {node.name or '?'!r}); "
                f"supported ops: {', '.join(SUPPORTED_OPS)}"
            )
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        rt = self.runtime_inputs(node)
        if len(rt) > 1:
            raise self.fail(node, "combines two runtime tensors; only chain graphs are supported")
        get = self.vals.get
        out_name = node.output[0]

        if op == "DequantizeLinear":
            x, s = get(node.input[0]), self.scalar(node.input[1], node)
            zp = self.scalar(node.input[2], node) if len(node.input) > 2 and node.input[2] else np.int32(0)
            if x is None:
                raise self.fail(node, f"unknown input {node.input[0]!r}")
            if x.kind == "const":
                if x.const.dtype not in _QRANGE and x.const.dtype != np.int32:
                    raise self.fail(node, f"unsupported quantized dtype {x.const.dtype}")
                self.vals[out_name] = _Val("qconst", x.width, const=x.const, scale=float(s), zp=int(zp))
            elif x.kind == "q":
                if abs(float(s) - x.scale) > 0 or int(zp) != x.zp:
                    # Different parameters than the producer: materialise exactly.
                    self.vals[out_name] = self.to_float(
                        _Val("q", x.width, x.reg, scale=float(s), zp=int(zp), dq=True)
                    )
                else:
                    self.vals[out_name] = _Val("q", x.width, x.reg, scale=x.scale, zp=x.zp,
                                               qmin=x.qmin, qmax=x.qmax, dq=True)
                self._last_dequant_scale = float(s)
            else:
                raise self.fail(node, "input must be a quantized tensor")
            return
        if op == "QuantizeLinear":
            x = get(node.input[0])
            s = self.scalar(node.input[1], node)
            zpv = get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            zp_arr = zpv.const if zpv is not None else np.array(0, dtype=np.uint8)
            if zp_arr.size != 1:
                raise self.fail(node, "per-channel quantization is not supported")
            if zp_arr.dtype not in _QRANGE:
                raise self.fail(node, f"quantized type {zp_arr.dtype} not supported (uint8/int8 only)")
            qmin, qmax = _QRANGE[zp_arr.dtype]
            if x is None or x.kind not in ("f", "q"):
                raise self.fail(node, "input must be a runtime tensor")
            x = self.to_float(x) if x.kind == "q" else x
            dst = self.qreg(-1)
            self.emit(OP_QUANT, x.width, x.width, x.reg, dst, self.addf([s]),
                      self.addi([int(zp_arr), qmin, qmax]))
            self.vals[out_name] = _Val(
                "q", x.width, dst, scale=float(s), zp=int(zp_arr), qmin=qmin, qmax=qmax
            )
            self.quantized = True
            return
        if op in ("Sub", "Mul", "Add"):
            a, b = get(node.input[0]), get(node.input[1])
            if a is None or b is None:
                raise self.fail(node, "unknown input")
            if a.kind in ("f", "q"):
                x, c = a, b
            elif op != "Sub" and b.kind in ("f", "q"):
                x, c = b, a
            else:
                raise self.fail(node, "needs a runtime tensor as first operand and a constant as second")
            if c.kind not in ("const", "qconst"):
                raise self.fail(node, "second operand must be constant")
            cv = np.asarray(self.fold(c) if c.kind == "qconst" else c.const, dtype=np.float32).reshape(-1)
            # Bias of the preceding GEMM (no bias yet): fold it into that op.
            if (
                op == "Add"
                and self.rows
                and self.rows[-1][0] in (OP_GEMM_F, OP_GEMM_I2F)
                and self.rows[-1][2] == x.width
                and x.kind == "f"
                and x.reg == self.rows[-1][4]
                and (self.rows[-1][6] if self.rows[-1][0] == OP_GEMM_F else self.rows[-1][8]) < 0
                and cv.size in (1, x.width)
            ):
                bias = np.broadcast_to(cv, (x.width,))
                if self.rows[-1][0] == OP_GEMM_F:
                    self.rows[-1][6] = self.addf(bias)
                else:
                    self.rows[-1][8] = self.addf(bias)
                self.vals[out_name] = x
                return
            x = self.to_float(x)
            if cv.size not in (1, x.width):
                raise self.fail(node, f"constant of size {cv.size} does not broadcast to width {x.width}")
            code = {"Sub": OP_SUB, "Mul": OP_MUL, "Add": OP_ADD}[op]
            dst = self.freg(x.width, x.reg)
            self.emit(code, x.width, x.width, x.reg, dst, self.addf(cv), 1 if cv.size > 1 else 0)
            self.vals[out_name] = _Val("f", x.width, dst)
            return
        if op == "Clip":
            x = get(node.input[0])
            ins = list(node.input) + ["", ""]
            lo = self.scalar(ins[1], node) if ins[1] else attrs.get("min", -np.inf)
            hi = self.scalar(ins[2], node) if ins[2] else attrs.get("max", np.inf)
            x = self.to_float(x)
            dst = self.freg(x.width, x.reg)
            self.emit(OP_CLIP, x.width, x.width, x.reg, dst, self.addf([lo, hi]))
            self.vals[out_name] = _Val("f", x.width, dst)
            return
        if op == "Identity":
            self.vals[out_name] = get(node.input[0])
            return
        if op in ("Relu", "Tanh", "Sigmoid"):
            x = self.to_float(get(node.input[0]))
            code = {"Relu": OP_RELU, "Tanh": OP_TANH, "Sigmoid": OP_SIGMOID}[op]
            self.emit(code, x.width, x.width, x.reg, x.reg)
            self.vals[out_name] = x
            return
        if op == "MatMul":
            a, b = get(node.input[0]), get(node.input[1])
            if a is None or a.kind not in ("f", "q") or b is None or b.kind not in ("const", "qconst"):
                raise self.fail(node, "only activation x constant-weight MatMul is supported")
            self.vals[out_name] = self.gemm(node, a, b, None)
            return
        if op in ("Gemm", "FusedGemm"):
            a, b = get(node.input[0]), get(node.input[1])
            if attrs.get("transA", 0):
                raise self.fail(node, "transA=1 is not supported")
            if a is None or a.kind not in ("f", "q") or b is None or b.kind not in ("const", "qconst"):
                raise self.fail(node, "only activation x constant-weight Gemm is supported")
            if attrs.get("transB", 0):
                b = _Val(b.kind, b.width, const=b.const.T, scale=b.scale, zp=b.zp)
            bias = None
            if len(node.input) > 2 and node.input[2]:
                bias = self.const(node.input[2], node) * np.float32(attrs.get("beta", 1.0))
            val = self.gemm(node, a, b, bias, float(attrs.get("alpha", 1.0)))
            act = attrs.get("activation", b"")
            act = act.decode() if isinstance(act, bytes) else act
            if act:
                code = {"Relu": OP_RELU, "Tanh": OP_TANH, "Sigmoid": OP_SIGMOID}.get(act)
                if code is None:
                    raise self.fail(node, f"fused activation {act!r} is not supported")
                self.emit(code, val.width, val.width, val.reg, val.reg)
            self.vals[out_name] = val
            return
        if op in ("QGemm", "MatMulIntegerToFloat", "QLinearMatMul"):
            self.vals[out_name] = self.int_gemm(node, attrs)
            return
        raise self.fail(node, "not implemented")  # pragma: no cover - guarded by `allowed`

    def int_gemm(self, node: onnx.NodeProto, attrs: dict) -> _Val:
        """Lower onnxruntime's integer GEMM contrib ops."""
        inp = list(node.input) + [""] * 9

        def c(name):
            return self.vals[name].const if name else None

        op = node.op_type
        if op == "QGemm":
            a_name, sa, za, b_name, sb, zb, bias, sy, zy = inp[:9]
            if attrs.get("transA", 0):
                raise self.fail(node, "transA=1 is not supported")
        elif op == "MatMulIntegerToFloat":
            a_name, b_name, sa, sb, za, zb, bias = inp[:7]
            sy = zy = ""
        else:  # QLinearMatMul
            a_name, sa, za, b_name, sb, zb, sy, zy = inp[:8]
            bias = ""
        a = self.vals.get(a_name)
        if a is None or a.kind != "q":
            raise self.fail(node, "input A must be a quantized activation")
        B = c(b_name)
        if B is None or self.vals[b_name].kind != "const" or B.dtype not in _QRANGE:
            raise self.fail(node, "input B must be a constant int8/uint8 weight")
        if op == "QGemm" and attrs.get("transB", 0):
            B = B.T
        for name in (sa, sb, za, zb, sy, zy):
            if name and c(name).size != 1:
                raise self.fail(node, "per-channel quantization is not supported")
        sa_v = np.float32(c(sa).reshape(()))
        sb_v = np.float32(c(sb).reshape(()))
        za_v = int(c(za).reshape(())) if za else 0
        zb_v = int(c(zb).reshape(())) if zb else 0
        if za_v != a.zp:
            raise self.fail(node, "activation zero point differs from its producer")
        alpha = np.float32(attrs.get("alpha", 1.0))
        n_in, n_out = a.width, int(B.shape[1])
        if B.shape[0] != n_in:
            raise self.fail(node, f"weight shape {B.shape} does not match input width {n_in}")
        wt = np.ascontiguousarray((B.astype(np.int64) - zb_v).T)
        self.quantized = True
        bv = _Val("qconst", B.size, const=B, scale=float(sb_v), zp=zb_v)
        if sy:  # requantised output
            sy_v = np.float32(c(sy).reshape(()))
            zy_arr = c(zy) if zy else np.array(0, dtype=np.uint8)
            qmin, qmax = _QRANGE[zy_arr.dtype]
            m = np.float32(np.float32(alpha * sa_v * sb_v) / sy_v)
            ibias = -1
            if bias:
                bb = c(bias)
                if bb.dtype != np.int32:
                    raise self.fail(node, "bias must be int32")
                ibias = self.addi(np.broadcast_to(bb.reshape(-1), (n_out,)))
            dst = self.qreg(a.reg)
            row = self.emit(OP_GEMM_I2Q, n_in, n_out, a.reg, dst, self.addi(wt),
                            self.addi([za_v, int(zy_arr), qmin, qmax]), self.addf([m]), ibias)
            self.last_gemm = (row, a, bv)
            return _Val("q", n_out, dst, scale=float(sy_v), zp=int(zy_arr), qmin=qmin, qmax=qmax)
        m = np.float32(alpha * sa_v * sb_v)
        fbias = ibias = -1
        if bias:
            bb = c(bias)
            if bb.dtype == np.int32:
                ibias = self.addi(np.broadcast_to(bb.reshape(-1), (n_out,)))
            else:
                fbias = self.addf(np.broadcast_to(bb.astype(np.float32).reshape(-1), (n_out,)))
        dst = self.F
        row = self.emit(OP_GEMM_I2F, n_in, n_out, a.reg, dst, self.addi(wt), self.addi([za_v]),
                        self.addf([m]), fbias, ibias)
        self.last_gemm = (row, a, bv)
        return _Val("f", n_out, dst)


def lower_graph(model: onnx.ModelProto, source: str = "model", *, ort_ops: bool = False) -> FusedProgram:
    """Return the program of ``model`` (original ops, or also onnxruntime's fused ops).

    Raises
    ------
    UnsupportedGraph
        If the graph has an op (or a shape) the fused backend does not support;
        the message names the op and node.
    """
    allowed = SUPPORTED_OPS + (_ORT_FUSED_OPS if ort_ops else ())
    prog = _Lowerer(model, source, allowed).run()
    prog.lowering = "ort-optimized" if ort_ops else "reference"
    return prog


def _ort_optimized_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return the graph onnxruntime runs for ``model`` with the backend's session options."""
    import onnxruntime as ort  # deferred: onnxruntime only where a session is made here

    with tempfile.TemporaryDirectory(prefix="tickscore-fused-") as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        so = make_session_options()
        so.optimized_model_filepath = path
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(path)


def lower_model(model: onnx.ModelProto, source: str = "model") -> FusedProgram:
    """Return the program to run for ``model``.

    The original graph must be supported (else :class:`UnsupportedGraph`).  For
    quantized graphs the graph onnxruntime actually executes is lowered instead
    when possible (exact integer parity, see the module docstring).
    """
    ref = lower_graph(model, source)
    if not ref.quantized:
        return ref
    try:
        return lower_graph(_ort_optimized_model(model), source, ort_ops=True)
    except Exception as exc:  # noqa: BLE001 - any failure: keep the reference lowering
        log.info("%s: onnxruntime-optimised graph not lowered (%s); using the QDQ reference", source, exc)
        return ref


# --------------------------------------------------------------------------- backend
class FusedBackend:
    """Fused features + model backend (same surface as :class:`models.ort_backend.OrtBackend`).

    Attributes
    ----------
    x_flat : ndarray float32 (F,)
        The model input (a view into ``mf``); the feature kernel writes it.
    mi, mf : ndarray
        This instance's program arrays (constants and registers).
    version, quantization, metadata, path, program, parity
    """

    kind = "fused"

    def __init__(
        self,
        path: str | Path,
        feature_set: FeatureSetLike,
        *,
        model: onnx.ModelProto | None = None,
        metadata: ModelMetadata | None = None,
    ) -> None:
        self.path = Path(path)
        if model is None or metadata is None:
            model, metadata = load_checked(self.path, feature_set)
        self.metadata = metadata
        self.version: str = metadata.model_version
        self.quantization: str = metadata.quantization
        self.n_features = metadata.n_features
        self.program = lower_model(model, str(self.path))
        if self.program.n_features != self.n_features:
            raise ModelError(
                f"{self.path}: graph input width {self.program.n_features} != {self.n_features}"
            )
        self.feature_set = feature_set
        self.mi, self.mf = self.program.new_arrays()
        xo = self.program.x_offset
        self.x_flat = self.mf[xo : xo + self.n_features]
        self.parity: ParityReport | None = None

    def run(self) -> float:
        """Return the score of the current ``x_flat`` (the model only). Allocates: the float."""
        return _run_program(self.mi, self.mf)

    def make_tick(self, fstate, istate, params, counters, ticks=None) -> tuple[Callable, TickContext]:
        """Return ``(tick, ctx)``: the fused kernel and its context over these arrays.

        ``tick(i, ctx.addr) -> (flags, score)`` validates tick ``i``, updates the
        feature state, runs the model and writes the score into
        ``mf[program.score_index]``: one numba call per tick.
        """
        kernel = tick_kernel_for(self.feature_set, np.ndim(fstate), np.ndim(istate))
        return kernel, TickContext(fstate, istate, params, counters, self.mi, self.mf, ticks)

    def score_batch(self, X: np.ndarray) -> np.ndarray:
        """Return the scores of the rows of ``X`` (float32 (N, F)) as float32 (N,)."""
        return self.program.score_rows(X).astype(np.float32)

    def warmup(self, n: int = 2000) -> None:
        """Call :meth:`run` ``n`` times (content of ``x_flat`` preserved)."""
        for _ in range(n):
            self.run()

    def __repr__(self) -> str:
        """Return a short description."""
        lowering = self.program.lowering
        return f"FusedBackend({str(self.path)!r}, version={self.version!r}, lowering={lowering!r})"


@dataclass
class ParityReport:
    """Fused vs onnxruntime on the same feature vectors."""

    rows: int
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    passed: bool
    quantization: str
    lowering: str
    out_step: float | None = None
    max_steps: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def describe(self) -> str:
        """Return a one-line summary."""
        s = (
            f"parity {'ok' if self.passed else 'FAILED'} on {self.rows:,} vectors: "
            f"max |fused - ort| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}"
        )
        if self.max_steps is not None:
            s += f"; {self.max_steps:.3g} output quantization steps of {self.out_step:.3g}"
        return s + f", lowering {self.lowering})"


def check_parity(fused: FusedBackend, ort_backend: Any, X: np.ndarray) -> ParityReport:
    """Return fused vs onnxruntime agreement on the rows of ``X`` (float32 (n, F)).

    fp32 graphs pass with max abs diff <= :data:`FP32_TOLERANCE`; quantized
    graphs with max abs diff <= one output quantization step
    (:attr:`FusedProgram.out_step`).
    """
    t0 = time.perf_counter()
    X = np.ascontiguousarray(X, dtype=np.float32)
    a = fused.program.score_rows(X)
    b = ort_backend.score_batch(X).astype(np.float64)
    d = np.abs(a - b)
    mx = float(d.max()) if d.size else 0.0
    prog = fused.program
    if prog.quantized:
        step = prog.out_step if prog.out_step else FP32_TOLERANCE
        tol = step
        steps = mx / step
    else:
        step, tol, steps = None, FP32_TOLERANCE, None
    ok = bool(np.isfinite(a).all()) and mx <= tol
    return ParityReport(
        rows=int(X.shape[0]), max_abs_diff=mx, mean_abs_diff=float(d.mean()) if d.size else 0.0,
        tolerance=float(tol), passed=ok, quantization=fused.quantization, lowering=prog.lowering,
        out_step=step, max_steps=steps, seconds=time.perf_counter() - t0,
    )


_PARITY_CACHE: dict[str, np.ndarray] = {}


def parity_vectors(
    feature_set: Any,
    ticks: np.ndarray | None = None,
    n: int = PARITY_ROWS,
    seed: int = 0,
) -> np.ndarray:
    """Return >= ``n`` float32 feature vectors for the parity check.

    Features of ``ticks`` (the data about to be replayed) computed with the
    feature set's batch kernel, topped up with the embedded dataset's features
    when there are fewer than ``n`` accepted rows, plus 5 % rows drawn around
    the data's moments with wide tails (so clipping and saturation are hit).
    """
    key = getattr(feature_set, "id", str(feature_set))
    parts = []
    if ticks is not None and len(ticks):
        parts.append(_features_of(ticks, feature_set))
    have = sum(p.shape[0] for p in parts)
    if have < n:
        if key not in _PARITY_CACHE:
            _PARITY_CACHE[key] = _features_of(read_ticks(default_data_path()).ticks, feature_set)
        parts.append(_PARITY_CACHE[key])
    X = np.concatenate(parts)
    real = X[np.isfinite(X).all(axis=1)]
    if real.shape[0] == 0:
        raise ValueError("no finite feature vectors for the parity check")
    rng = np.random.default_rng(seed)
    n_real = max(n - n // 20, 1)
    idx = np.linspace(0, real.shape[0] - 1, n_real).astype(np.int64)
    base = real[idx]
    mu, sd = real.mean(axis=0), real.std(axis=0) + 1e-6
    extra = (mu + sd * rng.standard_t(3, size=(n - n_real + 1, real.shape[1])) * 2).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([base, extra]), dtype=np.float32)


_TICKS_CACHE: dict[str, np.ndarray] = {}
TICK_CHECK_ROWS = 20_000


def check_tick_kernel(
    fused: FusedBackend, feature_set: Any, ticks: np.ndarray | None = None, n: int = TICK_CHECK_ROWS
) -> dict[str, Any]:
    """Return whether the composed per-tick kernel equals batch features + the program.

    Runs the fused ``tick`` over the first ``n`` ticks (``ticks`` or the embedded
    dataset) from a fresh state and compares flags, feature vectors and scores
    with the feature set's ``compute_batch`` followed by the lowered program.
    This catches a fused kernel that does not compute the live features, e.g.
    a stale numba cache after the feature kernels changed (numba's cache does
    not track functions of other files).  Keys: ``passed``, ``rows``,
    ``max_feature_diff``, ``max_score_diff``, ``flags_equal``.
    """
    if ticks is None or len(ticks) == 0:
        if "default" not in _TICKS_CACHE:
            _TICKS_CACHE["default"] = np.ascontiguousarray(read_ticks(default_data_path()).ticks[:n])
        ticks = _TICKS_CACHE["default"]
    ticks = np.ascontiguousarray(ticks[:n])
    kern = kernels_for(feature_set)
    n_inst = int(ticks["instrument"].max()) + 1
    F = len(feature_set.names)
    params = feature_set.params_array()
    fs0, is0 = kern.new_state(n_inst)
    X = np.empty((len(ticks), F), dtype=np.float32)
    flags = np.empty(len(ticks), dtype=np.int32)
    kern.compute_batch(ticks, fs0, is0, params, X, flags, np.zeros(N_REJECT_REASONS, dtype=np.int64))
    fstate, istate = kern.new_state(n_inst)
    counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
    mi, mf = fused.program.new_arrays()
    tick = tick_kernel_for(feature_set, fstate.ndim, istate.ndim)
    tctx = TickContext(fstate, istate, params, counters, mi, mf, ticks)
    ctx = tctx.addr
    xo = fused.program.x_offset
    got_flags = np.empty(len(ticks), dtype=np.int64)
    got_x = np.zeros((len(ticks), F), dtype=np.float32)
    got_s = np.zeros(len(ticks), dtype=np.float64)
    for i in range(len(ticks)):
        got_flags[i], got_s[i] = tick(i, ctx)
        got_x[i] = mf[xo : xo + F]
    ok = flags >= 0
    flags_equal = bool(np.array_equal(got_flags, flags))
    dx = float(np.max(np.abs(got_x[ok] - X[ok]))) if ok.any() else 0.0
    ref = fused.program.score_rows(X[ok]) if ok.any() else np.zeros(0)
    ds = float(np.max(np.abs(got_s[ok] - ref))) if ok.any() else 0.0
    return {
        "passed": flags_equal and dx == 0.0 and ds <= 1e-7,
        "rows": int(len(ticks)),
        "flags_equal": flags_equal,
        "max_feature_diff": dx,
        "max_score_diff": ds,
    }


def _features_of(ticks: np.ndarray, feature_set: Any) -> np.ndarray:
    kern = kernels_for(feature_set)
    n_inst = int(ticks["instrument"].max()) + 1 if len(ticks) else 0
    fstate, istate = kern.new_state(n_inst)
    X = np.empty((len(ticks), len(feature_set.names)), dtype=np.float32)
    flags = np.empty(len(ticks), dtype=np.int32)
    counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
    params = feature_set.params_array()
    kern.compute_batch(np.ascontiguousarray(ticks), fstate, istate, params, X, flags, counters)
    return X[flags >= 0]


@dataclass
class BackendChoice:
    """Outcome of :func:`select_backend`: the backend to use and why."""

    backend: Any
    kind: str
    requested: str
    reason: str
    parity: ParityReport | None = None
    messages: list[str] = field(default_factory=list)
    parity_X: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready summary (for run summaries)."""
        return {
            "requested": self.requested,
            "used": self.kind,
            "reason": self.reason,
            "parity": self.parity.as_dict() if self.parity else None,
        }


def select_backend(
    kind: str,
    path: str | Path,
    feature_set: Any,
    *,
    parity_X: np.ndarray | None = None,
    ticks: np.ndarray | None = None,
    logger: Callable[[str], None] | None = None,
) -> BackendChoice:
    """Return the backend for ``kind`` in ``auto | ort | fused`` and the reason for it.

    * ``ort``: onnxruntime.
    * ``fused``: the fused backend after the checks pass (graph supported, model
      parity with ort on ``parity_X`` or :func:`parity_vectors`, per-tick kernel
      equal to batch features + model, :func:`check_tick_kernel`); otherwise
      falls back to ``ort``, logged with the reason.
    * ``auto`` (the default of the CLI and config): the same rule, fused when
      possible, else ort.

    Raises :class:`models.metadata.ModelError` if the model cannot be loaded at
    all (missing file, wrong feature set, ...), whatever ``kind``.
    """
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}")
    say = logger or (lambda m: log.info(m))
    model, meta = load_checked(path, feature_set)
    ort_b = OrtBackend(path, feature_set)
    if kind == "ort":
        return BackendChoice(ort_b, "ort", kind, "requested")
    try:
        fused = FusedBackend(path, feature_set, model=model, metadata=meta)
    except UnsupportedGraph as exc:
        msg = f"fused backend refused: {exc}; falling back to onnxruntime"
        say(msg)
        return BackendChoice(ort_b, "ort", kind, msg, messages=[msg])
    X = parity_X if parity_X is not None else parity_vectors(feature_set, ticks)
    rep = check_parity(fused, ort_b, X)
    fused.parity = rep
    if not rep.passed:
        msg = f"fused backend {rep.describe()}; falling back to onnxruntime"
        say(msg)
        return BackendChoice(ort_b, "ort", kind, msg, parity=rep, messages=[msg], parity_X=X)
    try:
        tk = check_tick_kernel(fused, feature_set, ticks)
    except Exception as exc:  # noqa: BLE001 - e.g. a feature set without an apply_tick kernel
        msg = f"fused per-tick kernel unavailable: {exc}; falling back to onnxruntime"
        say(msg)
        return BackendChoice(ort_b, "ort", kind, msg, parity=rep, messages=[msg], parity_X=X)
    if not tk["passed"]:
        msg = (
            f"fused per-tick kernel differs from the batch features + model on {tk['rows']:,} ticks "
            f"(flags equal {tk['flags_equal']}, max feature diff {tk['max_feature_diff']:.3g}, "
            f"max score diff {tk['max_score_diff']:.3g}); a stale numba cache? falling back to onnxruntime"
        )
        say(msg)
        return BackendChoice(ort_b, "ort", kind, msg, parity=rep, messages=[msg], parity_X=X)
    msg = f"using fused backend ({meta.quantization}); {rep.describe()}"
    say(msg)
    return BackendChoice(fused, "fused", kind, msg, parity=rep, messages=[msg], parity_X=X)


def describe_program(prog: FusedProgram) -> str:
    """Return a short text of the lowered ops (for logs)."""
    return f"{prog.lowering}: " + " -> ".join(prog.ops)

