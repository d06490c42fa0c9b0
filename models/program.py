"""The fused program: a lowered model as two flat arrays and the cached ``@njit`` interpreter.

No code is generated per model: a new model (hot reload) is only new arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from models.metadata import ModelError

__all__ = ["UnsupportedGraph", "FusedProgram", "describe_program"]

# --------------------------------------------------------------------------- program
# Two arrays per model instance (few arguments = cheaper numba dispatch):
#   mi int32   = [header | op rows | integer constants | integer registers (2 x R)]
#   mf float32 = [float constants | x (F) | float registers (2 x R)]
# Header: mi[0] n_ops, mi[1] F, mi[2] offset of the first op row, mi[3] index of
# the score in mf, mi[4] offset of x in mf.
# Op row (``_ROW`` int32): op, n_in, n_out, src, dst, p0, p1, p2, p3, p4; src/dst are
# register offsets (in mi or mf by op), p* offsets of constants (-1 = none).
# The integer GEMMs' weights are stored in blocks of ``LANES`` outputs: block q holds,
# for k = 0..n_in-1, the weights W[k, Lq:Lq+L] (zero past n_out); their biases are
# padded to whole blocks, and every register is a whole number of blocks wide, so a
# block's lanes are read and written whole (:func:`_make_gemm_blocks`).
_HDR = 5
_ROW = 10
OP_SUB, OP_MUL, OP_ADD, OP_CLIP = 1, 2, 3, 4
OP_QUANT, OP_DEQUANT = 5, 6
OP_GEMM_F, OP_GEMM_I2F, OP_GEMM_I2Q = 7, 8, 9
OP_RELU, OP_TANH, OP_SIGMOID = 10, 11, 12
OP_COPY = 13
OP_AFFINE_QUANT = 14
#: outputs per block of the integer GEMMs (one 256-bit vector of int32; 16 lanes measured slower)
LANES = 8
#: inputs per int32 lane of the packed u8 x s8 GEMM weights (:data:`PACKED_U8S8`)
QUAD = 4


def _host_avx2() -> bool:
    """Whether numba compiles for this CPU (no other ``NUMBA_CPU_NAME``) and it has AVX2."""
    from llvmlite import binding as llvm
    from numba.core import config

    if config.CPU_NAME not in (None, "host"):
        return False  # a portable target: no CPU-specific intrinsics
    feats = config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    return "+avx2" in feats.split(",")


#: Where numba compiles for an AVX2 CPU the integer GEMMs run on packed weights (right after the
#: GEMM's ints block, whose last value is the mode, :func:`models.lowering._gemm_mode`): saturated
#: u8 x s8 ones (onnxruntime's on CPUs without VNNI) with onnxruntime's own ``vpmaddubsw`` +
#: ``vpmaddwd`` on 4 inputs per int32 lane (mode 2), exact ones with ``vpmaddwd`` on 2 int16 inputs
#: per lane (mode 3).  Elsewhere (no AVX2, or a portable numba target) the same sums in int32 lanes
#: (modes 0 and 1).  The kernel holds one form per kind; a program of the other forms is refused.
PACKED_U8S8 = _host_avx2()
_OP_NAMES = {
    OP_SUB: "sub", OP_MUL: "mul", OP_ADD: "add", OP_CLIP: "clip", OP_QUANT: "quantize",
    OP_DEQUANT: "dequantize", OP_GEMM_F: "gemm_f32", OP_GEMM_I2F: "gemm_int_to_f32",
    OP_GEMM_I2Q: "gemm_int_requant", OP_RELU: "relu", OP_TANH: "tanh", OP_SIGMOID: "sigmoid",
    OP_COPY: "copy", OP_AFFINE_QUANT: "affine_quantize",
}


@njit(cache=True, nogil=True, inline="always")
def _u(i):
    """Return ``i`` as uint64 (indices that are provably >= 0 skip numba's wraparound branch)."""
    return np.uint64(i)


@njit(cache=True, nogil=True, inline="always")
def _quantize(x, s, lo, hi, zp):
    """QuantizeLinear of float32 ``x``: ``sat(rne(x / s)) + zp``, bounds relative to ``zp``, NaN to ``lo``."""
    v = x / s
    if v < lo or v != v:
        v = lo
    if v > hi:
        v = hi
    return np.int32(np.rint(v)) + zp


def _make_gemm_blocks(nb: int):
    """Return an intrinsic that computes ``nb`` consecutive blocks of an integer GEMM (see below)."""

    @intrinsic
    def gemm_blocks(typingctx, mi_addr, src, wblk, ibias, n_in, zpa, dst_addr, m, lo, hi, zpo, fbias_addr,
                    sat):  # fmt: skip
        i64 = types.int64
        sig = types.void(i64, i64, i64, i64, i64, i64, i64, types.float32, types.float32, types.float32,
                         i64, i64, i64)  # fmt: skip

        def codegen(context, builder, signature, args):
            mi_a, src_, wblk_, ibias_, n_in_, zpa_, dst_a, m_, lo_, hi_, zpo_, fb_a, sat_ = args
            i32, f32, int64 = ir.IntType(32), ir.FloatType(), ir.IntType(64)
            vi, vf = ir.VectorType(i32, LANES), ir.VectorType(f32, LANES)
            zeros = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)
            base = builder.inttoptr(mi_a, i32.as_pointer())

            def splat(x, vt):
                v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(i32, 0))
                mask = ir.Constant(ir.VectorType(i32, vt.count), [0] * vt.count)
                return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), mask)

            def vload(ptr, vt):
                return builder.load(builder.bitcast(ptr, vt.as_pointer()), align=4)

            def off(x, n):
                return builder.add(x, ir.Constant(int64, n))

            def at(addr, q, vt):  # block q of an output or float bias at byte address addr
                return builder.inttoptr(off(addr, 4 * q * LANES), vt.as_pointer())

            accs = [cgutils.alloca_once(builder, vi) for _ in range(nb)]
            with builder.if_else(builder.icmp_signed(">=", ibias_, ir.Constant(int64, 0))) as (yes, no):
                with yes:
                    for q, acc in enumerate(accs):
                        builder.store(vload(builder.gep(base, [off(ibias_, q * LANES)]), vi), acc)
                with no:
                    for acc in accs:
                        builder.store(ir.Constant(vi, [0] * LANES), acc)
            zpa32 = builder.trunc(zpa_, i32)
            stride = builder.mul(n_in_, ir.Constant(int64, LANES))  # from one block's weights to the next

            def x_at(k):  # input k less the zero point, splat
                return splat(builder.sub(builder.load(builder.gep(base, [builder.add(src_, k)])), zpa32), vi)

            def w_at(k, q):  # block q's weights of input k
                wk = builder.add(wblk_, builder.mul(k, ir.Constant(int64, LANES)))
                wq = builder.add(wk, builder.mul(stride, ir.Constant(int64, q)))
                return vload(builder.gep(base, [wq]), vi)

            def pair_sums():  # sat 1: inputs 2j and 2j + 1 summed first, that sum saturated to int16
                smin, smax = ir.Constant(vi, [-32768] * LANES), ir.Constant(vi, [32767] * LANES)
                n_pairs = builder.sdiv(builder.add(n_in_, ir.Constant(int64, 1)), ir.Constant(int64, 2))
                last = builder.sub(n_in_, ir.Constant(int64, 1))
                with cgutils.for_range(builder, n_pairs) as loop:
                    k0 = builder.mul(loop.index, ir.Constant(int64, 2))
                    has_k1 = builder.icmp_signed("<", k0, last)
                    k1 = builder.select(has_k1, builder.add(k0, ir.Constant(int64, 1)), k0)
                    x0 = x_at(k0)
                    x1 = builder.select(has_k1, x_at(k1), zeros)  # an odd last input pairs with 0
                    for q, acc in enumerate(accs):
                        p = builder.add(builder.mul(x0, w_at(k0, q)), builder.mul(x1, w_at(k1, q)))
                        p = builder.select(builder.icmp_signed("<", p, smin), smin, p)
                        p = builder.select(builder.icmp_signed(">", p, smax), smax, p)
                        builder.store(builder.add(builder.load(acc), p), acc)

            def packed_acc(word, j, w0, q_stride, vt, mac):
                # each block's acc += mac(word splat, its packed weights of group j), both seen as vt
                a = builder.bitcast(splat(word, vi), vt)
                for q, acc in enumerate(accs):
                    wq = builder.add(builder.add(w0, builder.mul(q_stride, ir.Constant(int64, q))),
                                     builder.mul(j, ir.Constant(int64, LANES)))  # fmt: skip
                    w = builder.bitcast(vload(builder.gep(base, [wq]), vi), vt)
                    builder.store(builder.add(builder.load(acc), mac(a, w)), acc)

            def packed_sums():
                # sat = the packed weights' offset: the same sums with MLAS's own instructions.
                # Inputs 4j..4j+3 as the 4 bytes of an int32, splat to every lane; block q's
                # weights at sat + q nq L + j L, lane o holding W[4j..4j+3, o] as 4 bytes; vpmaddubsw
                # gives the two int16-saturated pair sums of each lane, vpmaddwd with 1s their int32 sum
                i8, i16 = ir.IntType(8), ir.IntType(16)
                v32i8, v16i16 = ir.VectorType(i8, 32), ir.VectorType(i16, 16)
                ubsw = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i16, [v32i8, v32i8]),
                                                      "llvm.x86.avx2.pmadd.ub.sw")  # fmt: skip
                wd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi, [v16i16, v16i16]),
                                                    "llvm.x86.avx2.pmadd.wd")  # fmt: skip
                ones = ir.Constant(v16i16, [1] * 16)
                four = ir.Constant(int64, QUAD)
                n_full = builder.udiv(n_in_, four)
                n_q = builder.udiv(builder.add(n_in_, ir.Constant(int64, QUAD - 1)), four)
                q_stride = builder.mul(n_q, ir.Constant(int64, LANES))

                def accumulate(quad, j):
                    def mac(a, w):
                        return builder.call(wd, [builder.call(ubsw, [a, w]), ones])

                    packed_acc(quad, j, sat_, q_stride, v32i8, mac)

                v4i32, v4i8 = ir.VectorType(i32, QUAD), ir.VectorType(i8, QUAD)
                with cgutils.for_range(builder, n_full) as loop:  # whole quads: one vector load each
                    j = loop.index
                    x4 = vload(builder.gep(base, [builder.add(src_, builder.mul(j, four))]), v4i32)
                    accumulate(builder.bitcast(builder.trunc(x4, v4i8), i32), j)
                k0 = builder.mul(n_full, four)
                with builder.if_then(builder.icmp_signed("<", k0, n_in_)):  # the last 1-3 inputs, 0 after
                    quad = ir.Constant(i32, 0)
                    for t in range(QUAD - 1):
                        kt = builder.add(k0, ir.Constant(int64, t))
                        ok = builder.icmp_signed("<", kt, n_in_)
                        x = builder.load(builder.gep(base, [builder.add(src_, builder.select(ok, kt, k0))]))
                        x = builder.and_(builder.select(ok, x, ir.Constant(i32, 0)), ir.Constant(i32, 255))
                        quad = builder.or_(quad, builder.shl(x, ir.Constant(i32, 8 * t)))
                    accumulate(quad, n_full)

            def int16_pair_sums():
                # sat < 0: exact sums with vpmaddwd, weights packed at -sat: inputs 2j, 2j+1 less the
                # zero point as two int16 of an int32, splat; lane o of block q, pair j holds W[2j, o],
                # W[2j+1, o] as int16 (every 8-bit value less its zero point fits); vpmaddwd sums the
                # two products per lane in int32, exactly (|sum| <= 2 x 255 x 255)
                i16 = ir.IntType(16)
                v16i16, v2i32, v2i16 = ir.VectorType(i16, 16), ir.VectorType(i32, 2), ir.VectorType(i16, 2)
                wd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi, [v16i16, v16i16]),
                                                    "llvm.x86.avx2.pmadd.wd")  # fmt: skip
                pw = builder.neg(sat_)
                two = ir.Constant(int64, 2)
                n_full = builder.udiv(n_in_, two)
                q_stride = builder.mul(builder.udiv(builder.add(n_in_, ir.Constant(int64, 1)), two),
                                       ir.Constant(int64, LANES))  # fmt: skip

                def accumulate(pair, j):
                    packed_acc(pair, j, pw, q_stride, v16i16, lambda a, w: builder.call(wd, [a, w]))

                za2 = splat(zpa32, v2i32)
                with cgutils.for_range(builder, n_full) as loop:
                    j = loop.index
                    x2 = vload(builder.gep(base, [builder.add(src_, builder.mul(j, two))]), v2i32)
                    x2 = builder.sub(x2, za2)
                    accumulate(builder.bitcast(builder.trunc(x2, v2i16), i32), j)
                k0 = builder.mul(n_full, two)
                with builder.if_then(builder.icmp_signed("<", k0, n_in_)):  # an odd last input, 0 after it
                    x = builder.sub(builder.load(builder.gep(base, [builder.add(src_, k0)])), zpa32)
                    accumulate(builder.and_(x, ir.Constant(i32, 0xFFFF)), n_full)

            def int32_sums():  # sat 0: one int32 vector multiply-add per input
                with cgutils.for_range(builder, n_in_) as loop:
                    k = loop.index
                    x = x_at(k)
                    for q, acc in enumerate(accs):
                        builder.store(builder.add(builder.load(acc), builder.mul(x, w_at(k, q))), acc)

            # one form per kind, chosen when compiled: with both in the fused tick it ran no faster
            # than with the int32 forms alone (the packed alone: -6 % p50, +6 % ticks/s)
            exact_sums = builder.icmp_signed("<=", sat_, ir.Constant(int64, 0))
            with builder.if_else(exact_sums) as (exact, pairs):
                with exact:
                    int16_pair_sums() if PACKED_U8S8 else int32_sums()
                with pairs:
                    packed_sums() if PACKED_U8S8 else pair_sums()
            vs = [builder.fmul(builder.sitofp(builder.load(acc), vf), splat(m_, vf)) for acc in accs]
            requant = builder.icmp_signed("!=", zpo_, ir.Constant(int64, -(2**63)))
            with builder.if_else(requant) as (yes, no):
                with yes:
                    vlo, vhi = splat(lo_, vf), splat(hi_, vf)
                    rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf]),
                                                          f"llvm.rint.v{LANES}f32")  # fmt: skip
                    zpo = splat(builder.trunc(zpo_, i32), vi)
                    for q, v in enumerate(vs):
                        c = builder.select(builder.fcmp_ordered("<", v, vlo), vlo, v)
                        c = builder.select(builder.fcmp_ordered(">", c, vhi), vhi, c)
                        r = builder.add(builder.fptosi(builder.call(rint, [c]), vi), zpo)
                        builder.store(r, at(dst_a, q, vi), align=4)
                with no:
                    outs = [cgutils.alloca_once_value(builder, v) for v in vs]
                    with builder.if_then(builder.icmp_signed("!=", fb_a, ir.Constant(int64, 0))):
                        for q, (v, o) in enumerate(zip(vs, outs, strict=True)):
                            builder.store(builder.fadd(v, builder.load(at(fb_a, q, vf), align=4)), o)
                    for q, o in enumerate(outs):
                        builder.store(builder.load(o), at(dst_a, q, vf), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return gemm_blocks


#: ``_gemm1(mi_addr, src, wblk, ibias, n_in, zpa, dst_addr, m, lo, hi, zpo, fbias_addr, sat)``: one
#: block of :data:`LANES` outputs of an integer GEMM as vector code, ``_gemm2`` two consecutive
#: blocks (the input is read once for both).  Per block:
#: ``acc = ibias[0:L] (or 0) + sum_k (mi[src + k] - zpa) * mi[wblk + L k : wblk + L k + L]``
#: in int32 (wrapping, as onnxruntime's kernels and the scalar form do; with ``sat`` > 0, as
#: onnxruntime's u8s8 kernel without VNNI does: ``zpa`` is 0, folded into the bias by the lowering,
#: and inputs ``2j`` and ``2j + 1`` are summed first, ``x[2j] w[2j] + x[2j+1] w[2j+1]``, and that
#: pair sum saturated to int16, the ``vpmaddubsw`` of MLAS's AVX2 / AVX-512BW kernels).  ``sat``
#: 0 and 1 read the blocked int32 weights at ``wblk``; ``sat`` > 1 (saturated) and < 0 (exact)
#: are the offset (negated) of this block's packed weights (:data:`PACKED_U8S8`), then
#: ``v = float32(acc) * m``, and either (requantise) the int32 ``rint(clamp(v, lo, hi)) + zpo``
#: stored at byte address ``dst_addr``, or (``zpo`` = :data:`_NO_REQUANT`, float output)
#: ``v [+ fbias[0:L]]`` stored as float32 (``fbias_addr`` 0 = none).  The same float32
#: operations per lane as the scalar loops they replace, so scores are bit for bit the
#: same, with one vector multiply-add per input instead of a dot product and its
#: horizontal sum per output (the default model's program: ~130 -> ~90 ns).  The caller
#: guarantees every lane read or written exists (:func:`check_program`).
_gemm1, _gemm2 = _make_gemm_blocks(1), _make_gemm_blocks(2)
_NO_REQUANT = np.int64(-(2**63))


@njit(cache=True, nogil=True, error_model="numpy")
def _run_program(mi, mf):
    """Run the lowered model on ``x = mf[xo:xo + F]``; return the score (float64 of a float32).

    ``mi`` int32: header, op rows, integer constants, integer registers;
    ``mf`` float32: float constants, x, float registers (see :class:`FusedProgram`).
    The score is also left in ``mf[mi[3]]``.  Allocates: no.

    Offsets are used as uint64 so numba emits no negative-index wraparound
    branches and LLVM can vectorise the float loops (5x faster than int64
    offsets for a 16x16 float layer).  Integer GEMMs accumulate in int32, as
    onnxruntime's kernels do (the same wraparound), as vector code written
    directly in LLVM IR (:func:`_make_gemm_blocks`): LLVM's own vectorisation
    of the per-output dot products spent most of their time in horizontal sums.

    Divisions are IEEE's (``error_model="numpy"``: no zero-divisor branch before each
    quantize; a zero scale gives +-inf or NaN, saturated to the bounds, not an exception):
    the input chain's op 16 -> 11 ns for the default model, the same bits.
    """
    n_ops = mi[0]
    base = mi[2]
    mi_a, mf_a = mi.ctypes.data, mf.ctypes.data
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
        if op == OP_AFFINE_QUANT:
            # the input chain fused: ((x - c) * m), clip to [lo, hi], quantize; each step is
            # optional (offset -1) and the same float32 operations as the separate ops
            csub = _u(p0)
            cmul = _u(p1)
            clo = mf[p2] if p2 >= 0 else np.float32(0.0)
            chi = mf[p2 + 1] if p2 >= 0 else np.float32(0.0)
            s = mf[p3]
            zp = mi[p4]
            lo = np.float32(mi[p4 + 1] - zp)
            hi = np.float32(mi[p4 + 2] - zp)
            for k in range(n_in):
                a = mf[src + k]
                if p0 >= 0:
                    a = a - mf[csub + k]
                if p1 >= 0:
                    a = a * mf[cmul + k]
                if p2 >= 0:
                    if a < clo:
                        a = clo
                    if a > chi:
                        a = chi
                mi[dst + k] = _quantize(a, s, lo, hi, zp)
        elif op == OP_GEMM_I2Q or op == OP_GEMM_I2F:
            # int GEMM [+ int32 bias], by blocks of LANES outputs, two at a time; requantised
            # (q = sat(rne(f32(acc) * M) + zp)) or float (f32(acc) * M [+ float bias])
            if op == OP_GEMM_I2Q:
                zpo = np.int64(mi[p1 + 1])
                lo = np.float32(mi[p1 + 2] - zpo)
                hi = np.float32(mi[p1 + 3] - zpo)
                ib, fb, d_a = p3, -1, mi_a
                sat = np.int64(mi[p1 + 4])
                pk = np.int64(p1) + 5  # packed weights follow the ints block
            else:
                zpo, lo, hi = _NO_REQUANT, np.float32(0.0), np.float32(0.0)
                ib, fb, d_a = p4, p3, mf_a
                sat = np.int64(mi[p1 + 1])
                pk = np.int64(p1) + 2
            # the kernel's sat: 0 / 1 as stored; 2 -> the u8 x s8 quads' offset; 3 -> minus the int16 pairs'
            q_pack = np.int64(0)  # packed weights per block
            if sat == 2:
                sat, q_pack = pk, ((np.int64(n_in) + (QUAD - 1)) // QUAD) * LANES
            elif sat == 3:
                sat, q_pack = -pk, -(((np.int64(n_in) + 1) // 2) * LANES)
            nb = (np.int64(n_out) + (LANES - 1)) // LANES
            s_o, k_n, zpa, m = np.int64(src), np.int64(n_in), np.int64(mi[p1]), mf[p2]
            q = np.int64(0)
            while q < nb:
                b = q * LANES
                w_o = p0 + b * np.int64(n_in)
                ib_o = ib + b if ib >= 0 else -1
                d_o = d_a + 4 * (np.int64(dst) + b)
                fb_a = mf_a + 4 * (fb + b) if fb >= 0 else 0
                sat_o = sat + q * q_pack
                if q + 2 <= nb:
                    _gemm2(mi_a, s_o, w_o, ib_o, k_n, zpa, d_o, m, lo, hi, zpo, fb_a, sat_o)
                    q += 2
                else:
                    _gemm1(mi_a, s_o, w_o, ib_o, k_n, zpa, d_o, m, lo, hi, zpo, fb_a, sat_o)
                    q += 1
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
                mi[dst + k] = _quantize(mf[src + k], s, lo, hi, zp)
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
    saturated_pairs : bool
        Some integer GEMM sums its u8 x s8 products in int16-saturated pairs, as onnxruntime
        does on this CPU (:func:`models.lowering.ort_saturates_u8s8`).
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
    saturated_pairs: bool = False

    def __post_init__(self) -> None:
        check_program(self.mi, self.mf)

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




_INT_SRC = (OP_DEQUANT, OP_GEMM_I2F, OP_GEMM_I2Q)  # ops whose src is an integer register
_INT_DST = (OP_QUANT, OP_GEMM_I2Q, OP_AFFINE_QUANT)  # ops whose dst is an integer register


def check_program(mi: np.ndarray, mf: np.ndarray) -> None:
    """Raise :class:`UnsupportedGraph` unless every read and write of the program is inside ``mi`` / ``mf``.

    The interpreter indexes without bounds checks (and the integer GEMMs read and write
    whole blocks of :data:`LANES` as vectors), so a program is checked once, when it is made.
    """
    ni, nf = mi.shape[0], mf.shape[0]

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UnsupportedGraph(f"fused program: {what} is outside its arrays (mi {ni}, mf {nf})")

    need(ni >= _HDR, "the header")
    n_ops, F, base, score, xo = (int(v) for v in mi[:_HDR])
    need(n_ops >= 0 and base >= _HDR and base + n_ops * _ROW <= ni, "the op table")
    need(0 <= xo and xo + F <= nf and 0 <= score < nf, "x or the score")
    for o in range(n_ops):
        op, n_in, n_out, src, dst, *p = (int(v) for v in mi[base + o * _ROW: base + (o + 1) * _ROW])
        name = _OP_NAMES.get(op, f"op {op}")
        need(op in _OP_NAMES and n_in >= 0 and n_out >= 0, f"row {o} ({name})")
        gemm_i = op in (OP_GEMM_I2Q, OP_GEMM_I2F)
        width = -(-n_out // LANES) * LANES if gemm_i else n_out
        need(0 <= src and src + n_in <= (ni if op in _INT_SRC else nf), f"row {o} ({name}) input")
        need(0 <= dst and dst + width <= (ni if op in _INT_DST else nf), f"row {o} ({name}) output")
        need(all(-1 <= v < max(ni, nf) for v in p), f"row {o} ({name}) constants")
        if gemm_i:
            need(p[0] >= 0 and p[0] + width * n_in <= ni, f"row {o} ({name}) weights")
            n_ints = 5 if op == OP_GEMM_I2Q else 2
            need(0 <= p[1] and p[1] + n_ints <= ni and 0 <= p[2] < nf,
                 f"row {o} ({name}) zero points and scale")  # fmt: skip
            mode = int(mi[p[1] + n_ints - 1])
            need(mode in ((2, 3) if PACKED_U8S8 else (0, 1)), f"row {o} ({name}) GEMM mode {mode}")
            per_lane = {2: QUAD, 3: 2}.get(mode, 0)  # inputs per packed int32 lane
            packed = -(-n_out // LANES) * -(-n_in // per_lane) * LANES if per_lane else 0
            need(p[1] + n_ints + packed <= ni, f"row {o} ({name}) packed weights")
            ibias, fbias = (p[3], -1) if op == OP_GEMM_I2Q else (p[4], p[3])
            need(ibias < 0 or ibias + width <= ni, f"row {o} ({name}) integer bias")
            need(fbias < 0 or fbias + width <= nf, f"row {o} ({name}) float bias")


def describe_program(prog: FusedProgram) -> str:
    """Return a short text of the lowered ops (for logs)."""
    return f"{prog.lowering}: " + " -> ".join(prog.ops)
