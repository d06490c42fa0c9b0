"""Fused backend: graph lowering, parity with onnxruntime, one-call tick kernel, selection."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.schema import N_REJECT_REASONS
from features.featureset import DEFAULT_FEATURE_SET
from features.kernels import compute_batch, new_state
from models.backend_choice import FP32_TOLERANCE, PARITY_ROWS, check_parity, parity_vectors, select_backend
from models.fused import FusedBackend
from models.loader import default_model_path
from models.lowering import lower_graph, lower_model
from models.metadata import QUANT_FP32, QUANT_INT8_QDQ, ModelMetadata, make_model_version, write_metadata
from models.onnx_graph import OPSET, MLPWeights, build_graph
from models.ort_backend import OrtBackend
from models.program import UnsupportedGraph
from models.quantize import quantize_int8
from replay.generator import default_data_path
from replay.reader import read_ticks

ROOT = Path(__file__).resolve().parents[1]
FS = DEFAULT_FEATURE_SET
F = len(FS.names)


@pytest.fixture(scope="module")
def data_ticks():
    return read_ticks(default_data_path())


@pytest.fixture(scope="module")
def vectors(data_ticks):
    """>= 100k feature vectors of the embedded (real-looking) data plus wide-tailed rows."""
    X = parity_vectors(FS, data_ticks.ticks)
    assert X.shape[0] >= PARITY_ROWS
    return X


def _save(model: onnx.ModelProto, path: Path, quant: str = QUANT_FP32) -> Path:
    meta = ModelMetadata(
        feature_set_id=FS.id,
        feature_names=tuple(FS.names),
        label={"definition": "test"},
        train_range={},
        seed=0,
        quantization=quant,
        model_version=make_model_version(model, quant),
        metrics={},
    )
    write_metadata(model, meta)
    onnx.save(model, str(path))
    return path


def _random_weights(seed: int, hidden=(16, 8), clip=4.0) -> MLPWeights:
    rng = np.random.default_rng(seed)
    sizes = [F, *hidden, 1]
    layers = tuple(
        (rng.normal(size=(a, b)) / math.sqrt(a), rng.normal(size=b) * 0.1)
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    )
    Xs = parity_vectors(FS)[:20000]
    return MLPWeights(mean=Xs.mean(0), inv_std=1.0 / (Xs.std(0) + 1e-6), layers=layers, clip=clip)


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_shipped_model_fused_matches_onnxruntime_on_100k_real_feature_vectors(quant, vectors):
    path = default_model_path(quant)
    fused = FusedBackend(path, FS)
    rep = check_parity(fused, OrtBackend(path, FS), vectors)
    assert rep.rows >= PARITY_ROWS
    assert rep.passed, rep.describe()
    if quant == "fp32":
        assert rep.max_abs_diff <= FP32_TOLERANCE
    else:
        # int8: within one output quantization step; in practice the lowering of
        # onnxruntime's optimised graph reproduces its integer codes exactly.
        assert rep.lowering == "ort-optimized"
        assert rep.max_steps <= 1.0
        assert rep.max_abs_diff < 1e-5
    print(f"\n{quant}: {rep.describe()}")


@pytest.mark.parametrize(
    "hidden,activation_type",
    [((), "uint8"), ((8,), "int8"), ((32, 16), "uint8"), ((16, 8, 4), "int8")],
)
def test_random_mlps_and_their_qdq_forms_match_onnxruntime(tmp_path, hidden, activation_type):
    w = _random_weights(len(hidden) + 11, hidden)
    X = parity_vectors(FS)[:30000]
    fp32 = build_graph(w)
    p32 = _save(fp32, tmp_path / "m32.onnx")
    q = quantize_int8(fp32, tmp_path / "q.onnx", X[:20000], activation_type=activation_type)
    p8 = _save(q, tmp_path / "m8.onnx", QUANT_INT8_QDQ)
    for path in (p32, p8):
        rep = check_parity(FusedBackend(path, FS), OrtBackend(path, FS), X)
        assert rep.passed, rep.describe()


def _gemm_graph(act: str, trans_b: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    W1 = rng.normal(size=(F, 6)).astype(np.float32) * 0.3
    W2 = rng.normal(size=(6, 1)).astype(np.float32)
    inits = [
        numpy_helper.from_array(W1.T.copy() if trans_b else W1, "W1"),
        numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "b1"),
        numpy_helper.from_array(W2, "W2"),
        numpy_helper.from_array(np.array([0.1], np.float32), "b2"),
        numpy_helper.from_array(np.full(F, 0.01, np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("Gemm", ["xs", "W1", "b1"], ["h"], transB=1 if trans_b else 0, alpha=0.5),
        helper.make_node(act, ["h"], ["ha"]),
        helper.make_node("MatMul", ["ha", "W2"], ["z0"]),
        helper.make_node("Add", ["z0", "b2"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["score"]),
    ]
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", F])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        initializer=inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


@pytest.mark.parametrize("act,trans_b", [("Tanh", True), ("Sigmoid", False), ("Relu", True)])
def test_gemm_graphs_with_tanh_sigmoid_relu_match_onnxruntime(tmp_path, act, trans_b):
    path = _save(_gemm_graph(act, trans_b), tmp_path / "g.onnx")
    X = parity_vectors(FS)[:20000]
    rep = check_parity(FusedBackend(path, FS), OrtBackend(path, FS), X)
    assert rep.passed and rep.max_abs_diff <= FP32_TOLERANCE, rep.describe()


def test_graph_with_an_unsupported_op_is_refused_naming_the_op(tmp_path):
    model = _gemm_graph("Relu", False)
    for n in model.graph.node:
        if n.op_type == "Relu":
            n.op_type = "LeakyRelu"
            n.name = "act0"
    with pytest.raises(UnsupportedGraph, match=r"op 'LeakyRelu' \(node 'act0'\)"):
        lower_graph(model)


def test_unsupported_graph_falls_back_to_onnxruntime_and_says_why(tmp_path):
    model = _gemm_graph("Relu", False)
    for n in model.graph.node:
        if n.op_type == "Relu":
            n.op_type = "Softplus"
    path = _save(model, tmp_path / "soft.onnx")
    said: list[str] = []
    for kind in ("auto", "fused"):
        choice = select_backend(kind, path, FS, parity_X=parity_vectors(FS)[:1000], logger=said.append)
        assert choice.kind == "ort" and isinstance(choice.backend, OrtBackend)
        assert "Softplus" in choice.reason and "falling back to onnxruntime" in choice.reason
    assert len(said) == 2
    assert select_backend("ort", path, FS).kind == "ort"


def test_failed_parity_falls_back_to_onnxruntime(monkeypatch):
    import models.fused as mf

    real = mf.lower_model

    def corrupted(model, source="model"):
        prog = real(model, source)
        prog.mf[: prog.x_offset] *= np.float32(1.01)  # perturb every float constant
        return prog

    monkeypatch.setattr(mf, "lower_model", corrupted)
    choice = select_backend("auto", default_model_path("fp32"), FS, parity_X=parity_vectors(FS)[:5000])
    assert choice.kind == "ort"
    assert choice.parity is not None and not choice.parity.passed
    assert "parity FAILED" in choice.reason


# --------------------------------------------------------------------------- tick kernel
def test_fused_tick_equals_batch_features_then_onnxruntime_tick_by_tick(data_ticks):
    ticks = np.ascontiguousarray(data_ticks.ticks[:20000])
    n_inst = len(data_ticks.symbols)
    params = FS.params_array()
    # Reference: batch features, then onnxruntime on each accepted row.
    fs0, is0 = new_state(n_inst)
    X = np.empty((len(ticks), F), np.float32)
    flags_ref = np.empty(len(ticks), np.int32)
    compute_batch(ticks, fs0, is0, params, X, flags_ref, np.zeros(N_REJECT_REASONS, np.int64))
    ok = flags_ref >= 0
    path = default_model_path("int8")
    ref = OrtBackend(path, FS).score_batch(X[ok]).astype(np.float64)
    # Fused: one call per tick.
    fb = FusedBackend(path, FS)
    fstate, istate = new_state(n_inst)
    counters = np.zeros(N_REJECT_REASONS, np.int64)
    tick, tctx = fb.make_tick(fstate, istate, params, counters, ticks)
    got_flags = np.empty(len(ticks), np.int64)
    got = np.full(len(ticks), np.nan)
    for i in range(len(ticks)):
        got_flags[i], got[i] = tick(i, tctx.addr)
    assert np.array_equal(got_flags, flags_ref)
    assert np.array_equal(fstate, fs0) and np.array_equal(istate, is0)
    assert np.max(np.abs(got[ok] - ref)) < 1e-5
    assert fb.mf[fb.program.score_index] == np.float32(got[np.flatnonzero(ok)[-1]])


def test_fused_tick_allocates_nothing_per_tick(data_ticks):
    ticks = np.ascontiguousarray(data_ticks.ticks[:30000])
    fb = FusedBackend(default_model_path("int8"), FS)
    fstate, istate = new_state(len(data_ticks.symbols))
    tick, tctx = fb.make_tick(fstate, istate, FS.params_array(), np.zeros(N_REJECT_REASONS, np.int64), ticks)
    ctx = tctx.addr
    for i in range(5000):
        tick(i, ctx)
    before = sys.getallocatedblocks()
    for i in range(5000, 30000):
        tick(i, ctx)
    assert sys.getallocatedblocks() - before < 50  # no per-tick growth (25k ticks)


def test_tick_context_rejects_arrays_of_the_wrong_dtype_or_layout(data_ticks):
    fb = FusedBackend(default_model_path("int8"), FS)
    fstate, istate = new_state(3)
    c = np.zeros(N_REJECT_REASONS, np.int64)
    with pytest.raises(ValueError, match="fstate"):
        fb.make_tick(fstate.astype(np.float32), istate, FS.params_array(), c)
    with pytest.raises(ValueError, match="C-contiguous"):
        fb.make_tick(fstate, istate, FS.params_array(), c, data_ticks.ticks[::2])


# --------------------------------------------------------------------------- CLI
def test_replay_backend_auto_chooses_fused_and_records_it(tmp_path):
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "engine.cli", "replay", "--limit", "20000", "--publish", "none",
         "--out", str(out), "--no-progress", "--pin", "none"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "using fused backend" in run.stderr and "parity ok" in run.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["backend"] == "fused"
    sel = s["backend_selection"]
    assert sel["requested"] == "auto" and sel["used"] == "fused"
    assert sel["parity"]["passed"] and sel["parity"]["rows"] >= PARITY_ROWS
    assert s["scores"] == 20000 - s["rejected"]


def test_lowering_is_one_program_for_the_ort_optimized_int8_graph():
    prog = lower_model(onnx.load(str(default_model_path("int8"))))
    assert prog.quantized and prog.lowering == "ort-optimized"
    assert "gemm_int_requant" in prog.ops and prog.ops[-1] == "sigmoid"
    assert prog.out_step is not None and 0 < prog.out_step < 0.1


@pytest.mark.parametrize("name", ["risk_int8", "risk_trades_int8", "risk_l3_int8"])
@pytest.mark.parametrize("ort_ops", [False, True])
def test_fused_input_chain_scores_bit_for_bit_as_the_separate_ops(name, ort_ops, vectors):
    from models.lowering import _ort_optimized_model

    model = onnx.load(str(ROOT / "models" / "default" / f"{name}.onnx"))
    if ort_ops:
        model = _ort_optimized_model(model)
    fused = lower_graph(model, name, ort_ops=ort_ops)
    apart = lower_graph(model, name, ort_ops=ort_ops, fuse=False)
    assert fused.ops[0] == "sub+mul+clip+quantize" and apart.ops[:4] == ["sub", "mul", "clip", "quantize"]
    assert len(fused.ops) == len(apart.ops) - 3 and fused.out_step == apart.out_step
    rng = np.random.default_rng(3)
    n = fused.n_features
    X = (rng.normal(size=(20000, n)) * rng.choice([1e-3, 1.0, 1e2, 1e7], size=(20000, 1))).astype(np.float32)
    X[::97, 0], X[::89, 1], X[::83, 2], X[::7, 3] = np.nan, np.inf, -np.inf, -0.0
    X = np.concatenate([X, vectors[:20000, :n]]) if n == F else X
    a, b = fused.score_rows(X), apart.score_rows(X)
    np.testing.assert_array_equal(a.view(np.uint64), b.view(np.uint64))


def test_an_input_chain_whose_intermediate_is_read_later_is_not_fused():
    from models.lowering import _dead_after, _Val
    from models.program import OP_GEMM_F, OP_MUL, OP_SUB

    run = [[OP_SUB, 4, 4, 0, 10, 0, 1, -1, -1, -1], [OP_MUL, 4, 4, 10, 20, 4, 1, -1, -1, -1]]
    out = _Val("f", 1, 30)
    reads_sub = [[OP_GEMM_F, 4, 1, 10, 30, 8, -1, -1, -1, -1]]
    rewrites_first = [[OP_SUB, 4, 4, 0, 10, 0, 1, -1, -1, -1], [OP_MUL, 4, 4, 0, 20, 4, 1, -1, -1, -1],
                      [OP_GEMM_F, 4, 1, 10, 30, 8, -1, -1, -1, -1]]  # fmt: skip
    assert not _dead_after(run, reads_sub, out)
    assert _dead_after(run, rewrites_first, out)
    assert not _dead_after(run, [], _Val("f", 4, 20))  # the graph output is an intermediate


def test_a_tick_kernel_that_differs_from_batch_features_is_refused(monkeypatch):
    from numba import njit

    import models.backend_choice as bc
    import models.tick_kernels as tk

    @njit
    def stale(i, ctx):  # stands in for a kernel compiled against old feature code
        fl, s = tk._l1_fused_tick(i, ctx)
        return fl, s + 1e-3

    monkeypatch.setattr(bc, "tick_kernel_for", lambda *a, **k: stale)
    choice = select_backend("fused", default_model_path("int8"), FS, parity_X=parity_vectors(FS)[:2000])
    assert choice.kind == "ort" and "per-tick kernel differs" in choice.reason


@pytest.mark.parametrize("hidden", [(13, 9), (40, 24, 3), (1,), (8, 17)])
@pytest.mark.parametrize("saturate", [False, True], ids=["exact", "u8s8_pairs"])
def test_blocked_integer_gemms_equal_the_integer_arithmetic_at_any_width(tmp_path, hidden, saturate,
                                                                        monkeypatch):  # fmt: skip
    """The vector GEMMs (blocks of LANES outputs, padded) give exactly numpy's int32 arithmetic.

    Layer by layer from the interpreter's own quantized input (row offsets are absolute):
    int32 accumulation of ``(x - zpa) * W`` (+ int32 bias), then float32 ``acc * M``,
    clamped and rounded half to even (requantised rows) or ``+ float bias`` (the float
    row), compared bit for bit.  Lowered as for a CPU whose onnxruntime saturates u8 x s8
    pair sums (``u8s8_pairs``), the accumulation is of the raw inputs, ``x[2j] W[2j] +
    x[2j+1] W[2j+1]`` clamped to int16 per pair, with ``- zpa * sum(W)`` in the bias.  The
    forms of this host's numba target: packed weights (``vpmaddwd`` / ``vpmaddubsw``) with AVX2,
    else int32 lanes (the test below runs this one for the other target).
    """
    import models.lowering
    from models.lowering import _ort_optimized_model
    from models.program import _ROW, LANES, OP_AFFINE_QUANT, OP_GEMM_I2F, OP_GEMM_I2Q, _run_program

    packed = models.lowering.PACKED_U8S8
    monkeypatch.setattr(models.lowering, "_SATURATES", [saturate])
    w = _random_weights(len(hidden) + 5, hidden)
    X = parity_vectors(FS)[:3000]
    q = quantize_int8(build_graph(w), tmp_path / "q.onnx", X[:2000], activation_type="uint8")
    prog = lower_graph(_ort_optimized_model(q), "t", ort_ops=True)
    assert prog.saturated_pairs == saturate
    mi, mf = prog.new_arrays()
    rows = [mi[mi[2] + o * _ROW: mi[2] + (o + 1) * _ROW].astype(np.int64) for o in range(mi[0])]
    assert [r[0] for r in rows[:-1]] == [OP_AFFINE_QUANT] + [OP_GEMM_I2Q] * len(hidden) + [OP_GEMM_I2F]
    n_ops, xo = int(mi[0]), int(mi[4])
    for x in X[::7]:
        mf[xo:xo + F] = x
        mi[0] = 1  # the quantized input, as the interpreter makes it
        _run_program(mi, mf)
        a = mi[rows[0][4]: rows[0][4] + F].astype(np.int64)
        for t, (op, n_in, n_out, _src, dst, p0, p1, p2, p3, p4) in enumerate(rows[1:-1], start=1):
            mi[0] = t + 1  # up to this row (registers are reused by later rows)
            _run_program(mi, mf)
            nb = -(-n_out // LANES)
            W = mi[p0: p0 + nb * LANES * n_in].astype(np.int64).reshape(nb, n_in, LANES)
            W = W.transpose(0, 2, 1).reshape(nb * LANES, n_in)[:n_out]
            ib = p4 if op == OP_GEMM_I2F else p3
            sat = mi[p1 + 4] if op == OP_GEMM_I2Q else mi[p1 + 1]
            # (the last, float layer is never saturated: onnxruntime's float GEMM of dequantized values)
            sat_row = saturate and op == OP_GEMM_I2Q
            want = (2 if sat_row else 3) if packed else int(sat_row)
            assert sat == want and (not sat_row or mi[p1] == 0)
            if sat_row:  # products of inputs 2j and 2j + 1 summed, clamped to int16, then summed
                prod = np.pad(W * a[None, :], ((0, 0), (0, n_in % 2)))
                acc = np.clip(prod[:, 0::2] + prod[:, 1::2], -32768, 32767).sum(axis=1)
            else:
                acc = W @ (a - mi[p1])
            acc = acc + (mi[ib: ib + n_out] if ib >= 0 else 0)
            v = ((acc + 2**31) % 2**32 - 2**31).astype(np.int32).astype(np.float32) * mf[p2]
            if op == OP_GEMM_I2Q:
                zpo = mi[p1 + 1]
                v = np.clip(v, np.float32(mi[p1 + 2] - zpo), np.float32(mi[p1 + 3] - zpo))
                a = np.rint(v).astype(np.int64) + zpo
                np.testing.assert_array_equal(mi[dst: dst + n_out], a)
            else:
                if p3 >= 0:
                    v = v + mf[p3: p3 + n_out]
                np.testing.assert_array_equal(mf[dst: dst + n_out].view(np.uint32), v.view(np.uint32))
        mi[0] = n_ops


@pytest.mark.skipif(not __import__("models.program").program.PACKED_U8S8,
                    reason="this host's numba target runs the int32 forms: the test above checks them")
def test_the_int32_gemm_forms_of_a_portable_target_equal_the_integer_arithmetic(tmp_path):
    # numba compiling for a generic x86-64 (NUMBA_CPU_NAME=generic): no AVX2 intrinsics, the
    # GEMMs in int32 lanes (modes 0 and 1); the same test in a process of that target
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    test = f"{__file__}::test_blocked_integer_gemms_equal_the_integer_arithmetic_at_any_width"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                       cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True, text=True,
                       timeout=1800)  # fmt: skip
    assert r.returncode == 0 and "8 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_a_program_whose_block_would_leave_its_arrays_is_refused():
    from models.program import check_program

    prog = lower_model(onnx.load(str(default_model_path("int8"))))
    check_program(prog.mi, prog.mf)
    with pytest.raises(UnsupportedGraph, match="outside its arrays"):
        check_program(prog.mi[:-3], prog.mf)  # the last register no longer holds a whole block
    mi = prog.mi.copy()
    mi[mi[2] + 10 + 5] = mi.shape[0] - 10  # the first GEMM's weights (row 1) start too near the end
    with pytest.raises(UnsupportedGraph, match="outside its arrays"):
        check_program(mi, prog.mf)


def test_the_affine_op_with_infinite_clip_bounds_scores_as_without_a_clip():
    # the fused input chain's clip step: bounds of -inf/+inf must change no bit (NaN, inf, -0
    # included) against the same program with the clip step left out
    from models.program import OP_AFFINE_QUANT, _score_rows

    prog = lower_model(onnx.load(str(default_model_path("int8"))))
    mi, mf = prog.new_arrays()
    r = int(mi[2])  # the first op row
    assert mi[r] == OP_AFFINE_QUANT and min(mi[r + 5], mi[r + 6], mi[r + 7]) >= 0
    p2 = int(mi[r + 7])
    mf_inf = mf.copy()
    mf_inf[p2], mf_inf[p2 + 1] = -np.inf, np.inf
    mi_noclip = mi.copy()
    mi_noclip[r + 7] = -1  # no clip step
    rng = np.random.default_rng(11)
    n = prog.n_features
    X = (rng.normal(size=(50000, n)) * rng.choice([1e-3, 1.0, 1e2, 1e9], size=(50000, 1))).astype(np.float32)
    X[::97, 0], X[::89, 1], X[::83, 2], X[::7, 3] = np.nan, np.inf, -np.inf, -0.0
    a, b = np.empty(len(X)), np.empty(len(X))
    _score_rows(X, mi.copy(), mf_inf, a)
    _score_rows(X, mi_noclip, mf.copy(), b)
    np.testing.assert_array_equal(a.view(np.uint64), b.view(np.uint64))
    assert len(np.unique(a)) > 100  # the scores vary: the comparison is not of constants
