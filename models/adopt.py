"""``tickscore adopt``: bring your own ONNX model (scikit-learn, LightGBM, XGBoost, PyTorch exports).

The hot path expects one float32 input ``x`` of shape ``[N, F]`` (the named
feature set's vector, in its order) and one output ``score`` of shape
``[N, 1]``: the probability of the positive class.  :func:`adopt` takes an
exported classifier and

1. checks its input width against the feature set and renames the input to ``x``;
2. wraps the positive-class probability into ``score``: a ``[N, C]``
   probability tensor (column ``positive_class``, default 1), a ``[N, 1]`` or
   ``[N]`` probability (a PyTorch model ending in a sigmoid) are taken; a
   ZipMap output (sequence of maps, scikit-learn's default) is refused with how
   to export without it (``options={id(clf): {"zipmap": False}}``); a double
   output is cast to float32; every other output is dropped;
3. stamps the tickscore metadata: feature set, label definition (from the
   flags, else marked unknown so ``evaluate`` refuses to guess), provenance
   (source file, its SHA-256, producer);
4. verifies it: on feature vectors of a data file, the adopted model's score
   equals the original's probability (max difference reported);
5. optionally quantizes it to int8 QDQ (``--int8``) when its graph has
   ``MatMul`` / ``Gemm`` nodes, calibrated on the same vectors.

The fused backend takes the graphs it supports (linear / MLP in tickscore's own
layout and their QDQ forms); any other graph runs on onnxruntime, and the
backend selection says why in one line.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from engine.builder import shape_sample_ticks
from features.featureset import DEFAULT_BY_SHAPE, get_feature_set
from models.backend_choice import _features_of
from models.loader import load_checked
from models.metadata import (
    QUANT_FP32,
    QUANT_INT8_QDQ,
    ModelError,
    ModelMetadata,
    make_model_version,
    write_metadata,
)
from models.onnx_graph import INPUT_NAME, OUTPUT_NAME
from models.quantize import quantize_int8
from models.train import int8_path_for
from replay.generator import default_data_path
from replay.reader import read_ticks

__all__ = ["adopt"]

_PROB_NAMES = ("probabilities", "output_probability", "probability", "probs", "prob", "score", "output")


def _feature_set(name: str):
    if name in DEFAULT_BY_SHAPE:
        return DEFAULT_BY_SHAPE[name]
    return get_feature_set(name)


def _tensor_dims(vi) -> list[int | None] | None:
    t = vi.type
    if not t.HasField("tensor_type"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]


def _pick_output(model: onnx.ModelProto, src: str) -> tuple[Any, list[int | None]]:
    """Return the output holding the class probabilities and its dims."""
    outs = list(model.graph.output)
    tensors = [(o, _tensor_dims(o)) for o in outs]
    seq = [o.name for o, d in tensors if d is None]
    real = (TensorProto.FLOAT, TensorProto.DOUBLE)
    floats = [(o, d) for o, d in tensors if d is not None and o.type.tensor_type.elem_type in real]
    if not floats:
        hint = ""
        if seq:
            hint = (f"; {seq} is a sequence of maps (ZipMap): export without it, e.g. skl2onnx "
                    "to_onnx(clf, X, options={id(clf): {'zipmap': False}}) or onnxmltools' zipmap=False")
        raise ModelError(f"{src}: no float probability output among {[o.name for o in outs]}{hint}")
    for name in _PROB_NAMES:
        for o, d in floats:
            if o.name.lower() == name:
                return o, d
    return floats[-1]


def _rename_input(model: onnx.ModelProto, old: str) -> None:
    if old == INPUT_NAME:
        return
    for node in model.graph.node:
        node.input[:] = [INPUT_NAME if n == old else n for n in node.input]
    for vi in model.graph.input:
        if vi.name == old:
            vi.name = INPUT_NAME


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sample_features(fs, data: str | Path | None, n: int = 20_000) -> np.ndarray:
    """Return up to ``n`` finite feature vectors of ``data`` (default: data of the shape)."""
    if data is not None:
        ticks = read_ticks(data, shape=fs.name).ticks
    else:
        ticks = shape_sample_ticks(fs.name)
        if ticks is None:
            ticks = read_ticks(default_data_path()).ticks
    X = _features_of(ticks, fs)  # the batch kernel's accepted rows, as the parity check uses
    X = X[np.isfinite(X).all(axis=1)]
    if len(X) == 0:
        raise ValueError("no finite feature vectors to verify the model on")
    return np.ascontiguousarray(X[np.linspace(0, len(X) - 1, min(n, len(X))).astype(np.int64)])


def adopt(
    src: str | Path,
    out: str | Path,
    feature_set: str,
    *,
    positive_class: int = 1,
    label: dict[str, Any] | None = None,
    data: str | Path | None = None,
    int8: bool = False,
) -> dict[str, Any]:
    """Wrap, stamp, verify (and optionally quantize) an external ONNX classifier; return a report."""
    import onnxruntime as ort  # deferred: onnxruntime only where a session is made here

    src, out = Path(src), Path(out)
    s = str(src)
    if not src.is_file():
        raise ModelError(f"{s}: model file not found")
    if out.suffix != ".onnx":
        raise ValueError(f"--out must name an .onnx file, got {out}")
    try:
        model = onnx.load(s)
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise ModelError(f"{s}: not a valid ONNX model ({type(exc).__name__}: {exc})") from exc
    fs = _feature_set(feature_set)
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise ModelError(f"{s}: expected one input (the feature vector), found {[i.name for i in inputs]}")
    dims = _tensor_dims(inputs[0]) or []
    if len(dims) != 2 or dims[1] != len(fs.names):
        raise ModelError(
            f"{s}: input {inputs[0].name!r} has shape {dims}; feature set {fs.id} needs [N, {len(fs.names)}] "
            f"({', '.join(fs.names)})"
        )
    if inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ModelError(f"{s}: input {inputs[0].name!r} must be float32 (export with FloatTensorType)")
    orig_input = inputs[0].name
    prob, pdims = _pick_output(model, s)

    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    g = wrapped.graph
    _rename_input(wrapped, orig_input)
    src_name = prob.name
    nodes = []
    if prob.type.tensor_type.elem_type == TensorProto.DOUBLE:
        nodes.append(helper.make_node("Cast", [src_name], ["tickscore_prob_f32"], to=TensorProto.FLOAT))
        src_name = "tickscore_prob_f32"
    if len(pdims) == 2 and pdims[1] not in (None, 1):
        if not 0 <= positive_class < pdims[1]:
            raise ValueError(f"--positive-class {positive_class}: the model has {pdims[1]} classes")
        g.initializer.extend([
            helper.make_tensor("tickscore_pos", TensorProto.INT64, [1], [positive_class]),
            helper.make_tensor("tickscore_pos_end", TensorProto.INT64, [1], [positive_class + 1]),
            helper.make_tensor("tickscore_axis1", TensorProto.INT64, [1], [1]),
        ])  # fmt: skip
        nodes.append(helper.make_node("Slice", [src_name, "tickscore_pos", "tickscore_pos_end",
                                                "tickscore_axis1"], [OUTPUT_NAME]))  # fmt: skip
        how = f"column {positive_class} of {prob.name!r} [N, {pdims[1]}]"
    elif len(pdims) == 2:
        nodes.append(helper.make_node("Identity", [src_name], [OUTPUT_NAME]))
        how = f"{prob.name!r} [N, 1]"
    elif len(pdims) == 1:
        g.initializer.append(helper.make_tensor("tickscore_axis1", TensorProto.INT64, [1], [1]))
        nodes.append(helper.make_node("Unsqueeze", [src_name, "tickscore_axis1"], [OUTPUT_NAME]))
        how = f"{prob.name!r} [N]"
    else:
        raise ModelError(f"{s}: output {prob.name!r} has shape {pdims}; expected [N, C], [N, 1] or [N]")
    g.node.extend(nodes)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, 1]))

    unknown = "unknown (adopted model; give --label-horizon-ms and --label-k to evaluate it)"
    lab = dict(label) if label else {"definition": unknown, "known": False}
    provenance = {"adopted_from": src.name, "source_sha256": _file_sha256(src),
                  "producer": f"{model.producer_name} {model.producer_version}".strip(),
                  "probability": how}  # fmt: skip

    meta = ModelMetadata(feature_set_id=fs.id, feature_names=tuple(fs.names), label=lab,
                         train_range=provenance, seed=0, quantization=QUANT_FP32,
                         model_version=make_model_version(wrapped, QUANT_FP32), metrics={})  # fmt: skip
    write_metadata(wrapped, meta)
    onnx.checker.check_model(wrapped)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(wrapped, str(out))

    # verify: the adopted score equals the original's probability on real feature vectors
    X = _sample_features(fs, data)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    orig = ort.InferenceSession(s, opts, providers=["CPUExecutionProvider"])
    p = np.asarray(orig.run([prob.name], {orig_input: X})[0], dtype=np.float64)
    p = p[:, positive_class] if p.ndim == 2 and p.shape[1] > 1 else p.reshape(-1)
    mine = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    got = np.asarray(mine.run([OUTPUT_NAME], {INPUT_NAME: X})[0], dtype=np.float64)[:, 0]
    diff = float(np.max(np.abs(got - p)))
    if diff > 1e-6:
        out.unlink(missing_ok=True)
        raise ModelError(f"{s}: the wrapped score differs from the model's probability by {diff:.3g}")
    if not ((got >= 0.0) & (got <= 1.0)).all():
        out.unlink(missing_ok=True)
        raise ModelError(f"{s}: output {prob.name!r} is not a probability (values outside [0, 1]); "
                         "export the probability (e.g. a sigmoid / softmax output)")  # fmt: skip

    load_checked(out, fs)
    report: dict[str, Any] = {"out": str(out), "feature_set": fs.id, "version": meta.model_version,
                              "probability": how, "verified_rows": int(len(X)),
                              "max_abs_diff_vs_source": diff, "label_known": bool(label)}  # fmt: skip
    if int8:
        report["int8"] = _quantize(wrapped, out, meta, X)
    return report


def _quantize(model: onnx.ModelProto, out: Path, meta: ModelMetadata, X: np.ndarray) -> dict[str, Any]:
    """Write ``OUT.int8.onnx`` (static int8 QDQ, calibrated on ``X``) when the graph has MatMul/Gemm."""
    ops = {n.op_type for n in model.graph.node}
    if not ops & {"MatMul", "Gemm"}:
        return {"written": False, "reason": f"no MatMul/Gemm to quantize (ops: {sorted(ops)}); kept fp32"}
    out8 = int8_path_for(out)
    q = quantize_int8(model, out8, X, op_types=tuple(sorted(ops & {"MatMul", "Gemm"})))
    meta8 = ModelMetadata(**{**{k: getattr(meta, k) for k in meta.__slots__},
                             "quantization": QUANT_INT8_QDQ,
                             "model_version": make_model_version(q, QUANT_INT8_QDQ)})  # fmt: skip
    write_metadata(q, meta8)
    onnx.save(q, str(out8))
    return {"written": True, "path": str(out8), "version": meta8.model_version}
