"""Logs of float32 features without libm's per-call cost, bit for bit libm's float32.

Most feature values are a ``log`` rounded to float32.  A float64 approximation of
``log`` with a relative error far below float32's half-ulp rounds to the same
float32 as libm's ``log`` unless it lies very near the midpoint between two
float32: that is checked from its own bits, and only where the check fails
(about 1 value in 2000) is libm called.  So these helpers change no feature bit;
they only make the logs cheaper:

* :func:`log_checked` (scalar, branch-free): the L3 batch kernels run it over a
  block of events, which LLVM vectorises;
* :func:`log8_checked` (8 lanes in one AVX-512 vector, written in LLVM IR): the
  per-event kernels take their logs of a tick at once (L1: ~10-20 ns less per tick
  than eight libm calls, measured in the replay without a socket).

Both compute ``x = 2**e * m``, ``m`` in ``[sqrt(1/2), sqrt(2))``,
``log(m) = 2 atanh(s)``, ``s = (m - 1) / (m + 1)``, ``|s| <= 0.1716``, as
``2 s (1 + s^2/3 + ... + s^14/15)``: truncation below ``0.1716**16 / 17 < 2**-44.7``
(measured: 2**-44.7 over 1.2e9 values), rounding below 2**-50.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from features.book.layout import _f2i, _i2f

__all__ = ["log_checked", "log_approx", "log8_checked", "log8_of", "LANES_OK", "clear_of"]

_LN2 = math.log(2.0)
_LOG_C = (1 / 3, 1 / 5, 1 / 7, 1 / 9, 1 / 11, 1 / 13, 1 / 15)
_F32_DROP_MASK = (1 << 29) - 1  # float64 mantissa bits below float32's
_F32_HALF = 1 << 28  # ... the rounding midpoint
#: how far (in units of the float64 mantissa's last bit) from the float32 rounding midpoint an
#: approximation must be: 2**-36 to 2**-35 relative, 200-500x the approximation's and libm's errors
_F32_MARGIN = 1 << 17
_LOG_X_MIN = 2.0**-1000
_LOG_X_MAX = 2.0**1000
_MANT_MASK = (1 << 52) - 1
_EXP_ONE = 1023 << 52
_EXP_STEP = 1 << 52
_SQRT2_BITS = 0x3FF6A09E667F3BCD  # float64 bits of sqrt(2)
_N = 8
#: :func:`log8_checked`'s mask when every lane is certain
LANES_OK = (1 << _N) - 1


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def log_checked(x):
    """Return ``(y, ok)``: y ~ log(x); if ok, float32(y) == float32(math.log(x)) exactly.

    Branch-free (the batch kernels run it over a whole block in SIMD).  y is
    within 2**-44 (relative) of log(x) (see :func:`log_approx`) and libm's log
    within 0.52 ulp (2**-52), so they round to the same float32 unless y lies
    near the midpoint between two float32: ``ok`` requires the 29 float64
    mantissa bits that float32 rounding drops to be more than 2**17 (>= 2**-36
    relative, 200x the two errors together) away from that midpoint, and x in
    [2**-1000, 2**1000].  (Then y is 0 (x = 1, exactly, as libm's) or
    |y| > 2**-54: a normal float32, which the mantissa test is right for.)
    Fails for about 1 value in 2000 (then the caller uses libm).
    """
    inr = (x >= _LOG_X_MIN) & (x <= _LOG_X_MAX)
    y = log_approx(x if inr else 1.0)
    low = _f2i(y) & _F32_DROP_MASK
    return y, inr & (abs(low - _F32_HALF) > _F32_MARGIN)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def log_approx(x):
    """Return log(x) for a normal, finite x > 0 with a relative error below 2**-44 (see the module)."""
    b = _f2i(x)
    e = (b >> 52) - 1023
    mb = (b & _MANT_MASK) | _EXP_ONE
    big = mb > _SQRT2_BITS
    mb = mb - _EXP_STEP if big else mb  # m / 2
    e = e + 1 if big else e
    f = _i2f(mb) - 1.0  # exact (Sterbenz)
    s = f / (2.0 + f)
    z = s * s
    p = _LOG_C[6]
    p = p * z + _LOG_C[5]
    p = p * z + _LOG_C[4]
    p = p * z + _LOG_C[3]
    p = p * z + _LOG_C[2]
    p = p * z + _LOG_C[1]
    p = p * z + _LOG_C[0]
    s2 = s + s
    return np.float64(e) * _LN2 + (s2 + s2 * (z * p))


@intrinsic
def log8_checked(typingctx, u, w):
    """``(p, ok)`` for two 8-tuples of float64: ``p[k] ~ log(u[k]) * (w[k] / (u[k] - 1))``.

    Lane by lane in one vector: ``log(u)`` as :func:`log_approx` (its polynomial by
    Estrin's scheme with fused multiply-adds: the same bound), times ``w / (u - 1)``;
    a lane with ``u == 1`` gives ``w`` itself.  Bit ``k`` of the int64 ``ok`` is set
    when ``float32(p[k])`` is certainly ``float32`` of the same expression with
    libm's ``log`` (the test of :func:`log_checked`, on ``p``; a factor ``w / (u - 1)``
    near 1 keeps the error bound) and always for ``u == 1``; :data:`LANES_OK` = all.

    Two forms of feature: ``w = u - 1`` gives ``log(u)`` (the factor is exactly 1;
    ``u == 1`` gives 0), and ``u = 1 + v, w = v`` gives ``log1p(v)`` in
    :func:`features.common.log1p`'s form (``log(u) * v / (u - 1)``, ``v`` where ``u == 1``).
    """
    if not (isinstance(u, types.UniTuple) and isinstance(w, types.UniTuple) and u.count == _N
            and w.count == _N and u.dtype == types.float64 and w.dtype == types.float64):  # fmt: skip
        return None
    ret = types.Tuple((types.UniTuple(types.float64, _N), types.int64))

    def codegen(context, builder, sig, args):
        f64, i64, i32 = ir.DoubleType(), ir.IntType(64), ir.IntType(32)
        vd, vi = ir.VectorType(f64, _N), ir.VectorType(i64, _N)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vd, [vd, vd, vd]),
                                             f"llvm.fma.v{_N}f64")  # fmt: skip

        def cd(x):
            return ir.Constant(vd, [float(x)] * _N)

        def ci(x):
            return ir.Constant(vi, [int(x)] * _N)

        def mad(a, b, c):
            return builder.call(fma, [a, b, c])

        def pack(tup):
            vec = ir.Constant(vd, ir.Undefined)
            for k in range(_N):
                vec = builder.insert_element(vec, builder.extract_value(tup, k), ir.Constant(i32, k))
            return vec

        U, W = pack(args[0]), pack(args[1])
        inr = builder.and_(builder.fcmp_ordered(">=", U, cd(_LOG_X_MIN)),
                           builder.fcmp_ordered("<=", U, cd(_LOG_X_MAX)))  # fmt: skip (NaN: False)
        b = builder.bitcast(builder.select(inr, U, cd(2.0)), vi)
        e = builder.sub(builder.ashr(b, ci(52)), ci(1023))
        mb = builder.or_(builder.and_(b, ci(_MANT_MASK)), ci(_EXP_ONE))
        big = builder.icmp_signed(">", mb, ci(_SQRT2_BITS))
        mb = builder.select(big, builder.sub(mb, ci(_EXP_STEP)), mb)  # m / 2
        e = builder.select(big, builder.add(e, ci(1)), e)
        f = builder.fsub(builder.bitcast(mb, vd), cd(1.0))  # exact (Sterbenz)
        s = builder.fdiv(f, builder.fadd(cd(2.0), f))
        z = builder.fmul(s, s)
        z2 = builder.fmul(z, z)
        c = [cd(x) for x in _LOG_C]
        lo = mad(mad(c[3], z, c[2]), z2, mad(c[1], z, c[0]))
        hi = mad(c[6], z2, mad(c[5], z, c[4]))
        poly = mad(hi, builder.fmul(z2, z2), lo)
        s2 = builder.fadd(s, s)
        y = builder.fadd(builder.fmul(builder.sitofp(e, vd), cd(_LN2)),
                         builder.fadd(s2, builder.fmul(s2, builder.fmul(z, poly))))  # fmt: skip
        one = builder.fcmp_ordered("==", U, cd(1.0))
        P = builder.select(one, W, builder.fmul(y, builder.fdiv(W, builder.fsub(U, cd(1.0)))))
        low = builder.and_(builder.bitcast(P, vi), ci(_F32_DROP_MASK))
        d = builder.sub(low, ci(_F32_HALF))
        far = builder.or_(builder.icmp_signed(">", d, ci(_F32_MARGIN)),
                          builder.icmp_signed("<", d, ci(-_F32_MARGIN)))  # fmt: skip
        ok = builder.or_(one, builder.and_(inr, far))
        mask = builder.zext(builder.bitcast(ok, ir.IntType(_N)), i64)
        lanes = [builder.extract_element(P, ir.Constant(i32, k)) for k in range(_N)]
        p = context.make_tuple(builder, sig.return_type.types[0], lanes)
        return context.make_tuple(builder, sig.return_type, [p, mask])

    return ret(u, w), codegen



@njit(cache=True, nogil=True, inline="always")
def log8_of(u):
    """:func:`log8_checked` in its ``log(u)`` form: ``(p, ok)``, ``p[k] ~ log(u[k])`` (``w = u - 1``)."""
    return log8_checked(u, (u[0] - 1.0, u[1] - 1.0, u[2] - 1.0, u[3] - 1.0, u[4] - 1.0, u[5] - 1.0,
                            u[6] - 1.0, u[7] - 1.0))  # fmt: skip

#: :func:`clear_of`'s margin, relative: far above the vector log's error (2**-44) and libm's
_BOUND_MARGIN = 2.0**-40


@njit(cache=True, nogil=True, inline="always")
def clear_of(y, bound):
    """True when ``y`` (a :func:`log8_checked` lane) is certainly on the same side of ``+-bound`` as
    libm's value: clipping either gives the same value and the same ``clipped`` flag."""
    return abs(abs(y) - bound) > abs(y) * _BOUND_MARGIN
