"""Lowering an ONNX graph to a fused program.

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
sgemm uses FMA and its own order), so fp32 graphs agree to ~4e-7.  On CPUs
without VNNI, MLAS's u8s8 kernel (``vpmaddubsw``) saturates the sum of the products
of inputs ``2j`` and ``2j + 1`` to int16; :func:`ort_saturates_u8s8` probes for it
once and the integer GEMMs of uint8 activations and int8 weights then do the same
(:attr:`FusedProgram.saturated_pairs`).

Before a fused backend is used, :func:`check_parity` compares it with the
onnxruntime backend on >= 100,000 feature vectors: fp32 max abs diff <= 1e-5;
int8 max abs diff <= one *output quantization step*, defined as the largest
score change one step of the last quantized activation can cause,
``0.25 * s_last * max |W_out|`` (0.25 = max slope of the sigmoid).
:func:`select_backend` implements ``--backend auto|ort|fused``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from models.ort_backend import make_session_options
from models.program import (
    _HDR,
    _INT_DST,
    _INT_SRC,
    _OP_NAMES,
    _ROW,
    LANES,
    OP_ADD,
    OP_AFFINE_QUANT,
    OP_CLIP,
    OP_DEQUANT,
    OP_GEMM_F,
    OP_GEMM_I2F,
    OP_GEMM_I2Q,
    OP_MUL,
    OP_QUANT,
    OP_RELU,
    OP_SIGMOID,
    OP_SUB,
    OP_TANH,
    PACKED_U8S8,
    QUAD,
    FusedProgram,
    UnsupportedGraph,
)

__all__ = ["SUPPORTED_OPS", "lower_graph", "lower_model"]

log = logging.getLogger("tickscore.fused")

#: Ops of the original graph the lowering understands.
SUPPORTED_OPS = (
    "Sub", "Mul", "Add", "Clip", "Identity", "MatMul", "Gemm", "Relu", "Tanh", "Sigmoid",
    "QuantizeLinear", "DequantizeLinear",
)
#: Extra (com.microsoft) ops of onnxruntime-optimised graphs it understands.
_ORT_FUSED_OPS = ("QGemm", "FusedGemm", "MatMulIntegerToFloat", "QLinearMatMul")


# --------------------------------------------------------------------------- lowering
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

    def __init__(self, model: onnx.ModelProto, source: str, allowed: tuple[str, ...],
                 fuse: bool = True, saturate_u8s8: bool = False) -> None:  # fmt: skip
        self.model = model
        self.fuse = fuse
        #: sum u8 x s8 products in int16-saturated pairs, as this machine's onnxruntime does
        self.saturate_u8s8 = saturate_u8s8
        self.saturated = False  # a GEMM was lowered so
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

    def addi_blocks(self, wt: np.ndarray) -> int:
        """Add integer GEMM weights ``wt`` (n_out, n_in) in the interpreter's blocked layout.

        Block q holds, for each input k, the weights of outputs ``L q .. L q + L - 1``
        (``L`` = :data:`~models.program.LANES`, zero past ``n_out``): what the interpreter's
        vector GEMM (:func:`models.program._make_gemm_blocks`) loads as one vector.
        """
        n_out, n_in = wt.shape
        nb = -(-n_out // LANES)
        packed = np.zeros((nb * LANES, n_in), dtype=np.int64)
        packed[:n_out] = wt
        return self.addi(packed.reshape(nb, LANES, n_in).transpose(0, 2, 1))

    @staticmethod
    def pad_blocks(a, n_out: int) -> np.ndarray:
        """``a`` (a per-output bias of ``n_out``) zero-padded to whole blocks of outputs."""
        a = np.asarray(a).reshape(-1)
        out = np.zeros(-(-n_out // LANES) * LANES, dtype=a.dtype)
        out[:n_out] = a
        return out

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
            za_k, mode, packed = _gemm_mode(a.zp, wt, False)
            ints = self.addi(np.r_[za_k, mode, packed])
            row = self.emit(
                OP_GEMM_I2F, n_in, n_out, a.reg, dst, self.addi_blocks(wt), ints,
                self.addf([m]), self.addf(self.pad_blocks(bias, n_out)) if bias is not None else -1, -1,
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
        # registers are whole blocks of the integer GEMMs' LANES outputs (they write a block whole)
        self.R = -(-(max(widths) if widths else F) // LANES) * LANES
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

    def fuse_input_chain(self, out: _Val) -> None:
        """Fuse each run ``[Sub|Add]? Mul? Clip? QuantizeLinear`` into one ``affine_quantize`` row.

        The scaler, clip and quantization in front of an int8 model are four passes over
        ``F`` floats; fused they are one (~35 ns less per tick for the default model).  The
        fused row does the very same float32 operations in the same order (an ``Add`` of
        ``c`` becomes a ``Sub`` of ``-c``: IEEE gives the same result), so scores are bit
        for bit those of the separate ops (``tests/test_fused.py`` checks it).  A run is
        fused only when each op reads the previous one's output at one width and no later
        op reads the intermediate registers (they are no longer written).
        """
        R = self.rows
        cf = np.concatenate(self.cf) if self.cf else np.zeros(0, np.float32)
        rows, names = [], []
        i = 0
        while i < len(R):
            run, k = [], i
            for allowed in ((OP_SUB, OP_ADD), (OP_MUL,), (OP_CLIP,)):
                if k < len(R) and R[k][0] in allowed and (not run or _chained(R[run[-1]], R[k])):
                    run.append(k)
                    k += 1
            if (run and k < len(R) and R[k][0] == OP_QUANT and _chained(R[run[-1]], R[k])
                    and _dead_after([R[j] for j in run], R[k + 1:], out)):  # fmt: skip
                w = R[run[0]][1]
                p = {R[j][0]: R[j] for j in run}
                csub = cmul = clip = -1
                if OP_SUB in p or OP_ADD in p:
                    r = p.get(OP_SUB) or p[OP_ADD]
                    c = cf[r[5] + np.arange(w) * r[6]]
                    csub = self.addf(c if r[0] == OP_SUB else -c)
                if OP_MUL in p:
                    r = p[OP_MUL]
                    cmul = self.addf(cf[r[5] + np.arange(w) * r[6]])
                if OP_CLIP in p:
                    clip = p[OP_CLIP][5]
                q = R[k]
                rows.append([OP_AFFINE_QUANT, w, w, R[run[0]][3], q[4], csub, cmul, clip, q[5], q[6]])
                names.append("+".join(self.op_names[j] for j in run + [k]))
                i = k + 1
                continue
            rows.append(R[i])
            names.append(self.op_names[i])
            i += 1
        self.rows, self.op_names = rows, names

    def finish(self, out: _Val) -> FusedProgram:
        out_step = self.output_step()  # before fusing: it finds the last GEMM by row index
        if self.fuse:
            self.fuse_input_chain(out)
        n_ops = len(self.rows)
        ops_off = _HDR
        ints_off = ops_off + n_ops * _ROW
        iregs_off = ints_off + self.ci_len
        x_off = self.cf_len
        rows = np.array(self.rows, dtype=np.int64).reshape(n_ops, _ROW)
        # Relocate: constant offsets into mi, integer and float registers.
        ci_fields = {OP_QUANT: (6,), OP_DEQUANT: (6,), OP_GEMM_I2F: (5, 6, 9), OP_GEMM_I2Q: (5, 6, 8),
                     OP_AFFINE_QUANT: (9,)}  # fmt: skip
        int_src, int_dst = _INT_SRC, _INT_DST
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
            out_step=out_step,
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
                    self.rows[-1][8] = self.addf(self.pad_blocks(bias, x.width))
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
        # onnxruntime's u8s8 kernel without VNNI (ort_saturates_u8s8): sum(x w) over the raw uint8
        # inputs in int16-saturated pairs, then - za * sum(w) per output; that correction goes into
        # the int32 bias (wrapping, as the accumulation), and the kernel gets za = 0
        sat = self.saturate_u8s8 and a.qmin == 0 and a.qmax == 255 and B.dtype == np.int8 and zb_v == 0
        corr = za_v * wt.sum(axis=1) if sat else None
        self.saturated |= sat

        def int_bias(bb: np.ndarray | None) -> int:
            if bb is None and corr is None:
                return -1
            v = np.zeros(n_out, np.int64)
            if bb is not None:
                v = np.broadcast_to(bb.reshape(-1), (n_out,)).astype(np.int64)
            if corr is not None:
                v = ((v - corr + 2**31) % 2**32) - 2**31  # int32 wrapping
            return self.addi(self.pad_blocks(v, n_out))

        za_k, sat_k, packed = _gemm_mode(za_v, wt, sat)
        if sy:  # requantised output
            sy_v = np.float32(c(sy).reshape(()))
            zy_arr = c(zy) if zy else np.array(0, dtype=np.uint8)
            qmin, qmax = _QRANGE[zy_arr.dtype]
            m = np.float32(np.float32(alpha * sa_v * sb_v) / sy_v)
            bb = None
            if bias:
                bb = c(bias)
                if bb.dtype != np.int32:
                    raise self.fail(node, "bias must be int32")
            ibias = int_bias(bb)
            dst = self.qreg(a.reg)
            row = self.emit(OP_GEMM_I2Q, n_in, n_out, a.reg, dst, self.addi_blocks(wt),
                            self.addi(np.r_[za_k, int(zy_arr), qmin, qmax, sat_k, packed]), self.addf([m]),
                            ibias)  # fmt: skip
            self.last_gemm = (row, a, bv)
            return _Val("q", n_out, dst, scale=float(sy_v), zp=int(zy_arr), qmin=qmin, qmax=qmax)
        m = np.float32(alpha * sa_v * sb_v)
        fbias, ib_arr = -1, None
        if bias:
            bb = c(bias)
            if bb.dtype == np.int32:
                ib_arr = bb
            else:
                fb = np.broadcast_to(bb.astype(np.float32).reshape(-1), (n_out,))
                fbias = self.addf(self.pad_blocks(fb, n_out))
        ibias = int_bias(ib_arr)
        dst = self.F
        row = self.emit(OP_GEMM_I2F, n_in, n_out, a.reg, dst, self.addi_blocks(wt),
                        self.addi(np.r_[za_k, sat_k, packed]), self.addf([m]), fbias, ibias)  # fmt: skip
        self.last_gemm = (row, a, bv)
        return _Val("f", n_out, dst)


def _chained(a: list[int], b: list[int]) -> bool:
    """Row ``b`` is an elementwise op reading all of float row ``a``'s output."""
    return b[3] == a[4] and b[1] == b[2] == a[1] == a[2]


def _dead_after(run: list[list[int]], later: list[list[int]], out: _Val) -> bool:
    """No row of ``later`` (nor the graph output) reads a float register of ``run`` before it is rewritten."""
    live = {c for r in run for c in range(r[4], r[4] + r[2])}
    for r in later:
        if r[0] not in _INT_SRC and live & set(range(r[3], r[3] + r[1])):
            return False
        if r[0] not in _INT_DST:
            live -= set(range(r[4], r[4] + r[2]))
    return out.kind != "f" or not live & set(range(out.reg, out.reg + out.width))


def lower_graph(model: onnx.ModelProto, source: str = "model", *, ort_ops: bool = False,
                fuse: bool = True) -> FusedProgram:  # fmt: skip
    """Return the program of ``model`` (original ops, or also onnxruntime's fused ops).

    ``fuse=False`` keeps the input chain as separate ops (to check the fused row against them).

    Raises
    ------
    UnsupportedGraph
        If the graph has an op (or a shape) the fused backend does not support;
        the message names the op and node.
    """
    allowed = SUPPORTED_OPS + (_ORT_FUSED_OPS if ort_ops else ())
    low = _Lowerer(model, source, allowed, fuse, saturate_u8s8=ort_ops and ort_saturates_u8s8())
    prog = low.run()
    prog.lowering = "ort-optimized" if ort_ops else "reference"
    prog.saturated_pairs = low.saturated
    return prog


def _gemm_mode(za: int, wt: np.ndarray, saturate: bool) -> tuple[int, int, np.ndarray]:
    """Return an integer GEMM's zero point, mode and packed weights for its ints block.

    The mode is the block's last value, the packed weights follow it.  Where numba compiles for
    AVX2 (:data:`~models.program.PACKED_U8S8`): 2, int16-saturated pairs of raw u8 inputs (za 0:
    onnxruntime's u8s8 kernel without VNNI) on u8 x s8 quads (``vpmaddubsw``); 3, exact sums on
    int16 pairs (``vpmaddwd``: every 8-bit value less its zero point fits in int16).  Elsewhere
    the same sums in int32 lanes from the blocked weights: 1 saturated, 0 exact.
    """
    if not PACKED_U8S8:
        return (0, 1, np.zeros(0, np.int64)) if saturate else (za, 0, np.zeros(0, np.int64))
    if saturate:
        return 0, 2, pack_lanes(wt, QUAD)
    if np.abs(wt).max(initial=0) > 255 or not -255 <= za <= 255:
        raise UnsupportedGraph("integer GEMM with weights or zero point beyond 8 bits")
    return za, 3, pack_lanes(wt, 2)


def pack_lanes(wt: np.ndarray, per_lane: int) -> np.ndarray:
    """Integer GEMM weights ``wt`` (n_out, n_in) packed ``per_lane`` inputs to an int32 lane.

    ``per_lane`` 4: int8 weights as bytes, for the ``vpmaddubsw`` GEMM; 2: weights as int16,
    for the ``vpmaddwd`` GEMM (:data:`~models.program.PACKED_U8S8`).  Per block q of
    :data:`LANES` outputs and group j of inputs, ``LANES`` int32: lane o holds W[per_lane j + t,
    Lq + o] in its field t (little-endian, zero past ``n_out`` and ``n_in``), at offset
    ``(q * ceil(n_in / per_lane) + j) * LANES``.
    """
    bits = 32 // per_lane
    n_out, n_in = wt.shape
    nb, ng = -(-n_out // LANES), -(-n_in // per_lane)
    w = np.zeros((nb * LANES, ng * per_lane), np.int64)
    w[:n_out, :n_in] = wt
    f = (w & ((1 << bits) - 1)).reshape(nb, LANES, ng, per_lane)
    v = sum(f[..., t] << (bits * t) for t in range(per_lane))  # (q, o, j) as uint32
    v = (v.transpose(0, 2, 1) + 2**31) % 2**32 - 2**31  # (q, j, o) as int32
    return v.reshape(-1)


def _pair_saturated(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a @ w`` summing products of inputs ``2j`` and ``2j + 1`` first, each such sum clamped to int16."""
    p = a[:, :, None].astype(np.int64) * w[None, :, :].astype(np.int64)
    p = np.pad(p, ((0, 0), (0, p.shape[1] % 2), (0, 0)))
    return np.clip(p[:, 0::2] + p[:, 1::2], -32768, 32767).sum(axis=1)


_SATURATES: list[bool] = []
#: the probe: u8 rows x s8 weights whose pairs overflow int16
_PROBE_W = np.array([[127, -128], [127, -128], [127, -128], [127, -128]], np.int8)
_PROBES = np.array([[255, 255, 0, 0], [255, 0, 255, 0], [200, 255, 255, 1]], np.uint8)


def ort_saturates_u8s8() -> bool:
    """Whether this machine's onnxruntime computes u8 x s8 integer GEMMs with int16-saturated pair sums.

    MLAS's kernels for CPUs without VNNI (AVX2, AVX-512BW) multiply with ``vpmaddubsw``, which
    adds the products of inputs ``2j`` and ``2j + 1`` and saturates that sum to int16; with
    VNNI (``vpdpbusd``) the sums are exact.  Probed once per process with a 4 x 2
    ``MatMulInteger`` whose pairs overflow int16: True only if every probe row gives exactly
    the pair-saturated sums, False if they are exact (or anything else: then nothing is
    emulated and the parity check decides).
    """
    if not _SATURATES:
        _SATURATES.append(_probe_u8s8())
    return _SATURATES[0]


def _probe_u8s8() -> bool:
    import onnxruntime as ort  # deferred: onnxruntime only where a session is made here
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "W"], ["Y"])], "probe",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, 2])],
        [numpy_helper.from_array(_PROBE_W, "W")],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    try:
        sess = ort.InferenceSession(model.SerializeToString(), make_session_options(),
                                    providers=["CPUExecutionProvider"])  # fmt: skip
        got = np.vstack([sess.run(None, {"A": row[None, :]})[0] for row in _PROBES]).astype(np.int64)
    except Exception as exc:  # noqa: BLE001 - no probe: emulate nothing, the parity check decides
        log.info("onnxruntime u8s8 probe failed (%s): integer GEMMs lowered exact", exc)
        return False
    return bool(np.array_equal(got, _pair_saturated(_PROBES, _PROBE_W)))


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
