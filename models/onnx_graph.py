"""Hand-built ONNX graph of the risk model (standardise -> MLP -> sigmoid).

The graph is written with :mod:`onnx.helper` rather than converted with
skl2onnx, so it has one fixed, simple shape that a fused numba backend can
parse::

    x  float32 [N, F]  (N dynamic)
    -> Sub(x, mean)            "norm_sub"     initializer "norm_mean"     [F]
    -> Mul(., inv_std)         "norm_mul"     initializer "norm_inv_std"  [F]
    -> Clip(., -c, c)          "norm_clip"    initializers "norm_clip_min"/"norm_clip_max"
                                              (scalars; only if ``clip`` is set)
    -> MatMul(., W0)           "fc0_matmul"   initializer "fc0_W"         [F, H0]
    -> Add(., b0)              "fc0_add"      initializer "fc0_b"         [H0]
    -> Relu                    "fc0_relu"
    ...                        (one MatMul/Add/Relu triple per hidden layer)
    -> MatMul(., Wk)           "out_matmul"   initializer "out_W"         [Hk, 1]
    -> Add(., bk)              "out_add"      initializer "out_b"         [1]
    -> Sigmoid                 "out_sigmoid"
    score float32 [N, 1]

A logistic regression is the same graph with no hidden layer.

Why the optional ``Clip``: the standardised inputs have heavy tails (e.g. the
quote age reaches ~40 standard deviations).  int8 static quantization uses one
scale per tensor, so without a clip the few extreme rows set the input range
and every ordinary row is quantized with steps of ~0.25 std, which costs the
int8 model most of its AUC.  Clipping the standardised input to ``[-c, c]`` in
the model itself (fp32 and int8 alike, and during training) bounds
the step to ``2c / 255`` (0.03 std with the default ``c = 4``), and fp32 and int8
compute the same function.  On the default model (``python -m models.train``)
clipping at 4 std did not cost fp32 accuracy (test AUC 0.688 vs 0.676 without
a clip) and brought the int8 model from AUC 0.657 / max |int8 - fp32| 0.30 to
AUC 0.689 / 0.085.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "OPSET",
    "IR_VERSION",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "MLPWeights",
    "build_graph",
    "sklearn_layers",
    "weights_from_sklearn",
    "weights_from_graph",
    "forward_numpy",
]

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; loadable by onnxruntime >= 1.13
INPUT_NAME = "x"
OUTPUT_NAME = "score"


@dataclass(frozen=True, slots=True)
class MLPWeights:
    """Weights of the standardise -> MLP -> sigmoid model.

    Attributes
    ----------
    mean : ndarray, float32, shape (F,)
        Subtracted from the input.
    inv_std : ndarray, float32, shape (F,)
        Multiplied after the subtraction (1 / standard deviation).
    clip : float or None
        If set, the standardised input is clipped to ``[-clip, clip]``.
    layers : tuple of (W, b)
        ``W`` float32 (n_in, n_out), ``b`` float32 (n_out,).  Every layer but the
        last is followed by ReLU; the last has ``n_out == 1`` and a sigmoid.
    """

    mean: np.ndarray
    inv_std: np.ndarray
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    clip: float | None = None

    def __post_init__(self) -> None:
        """Check shapes and cast to C-contiguous float32."""
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        object.__setattr__(self, "mean", f32(self.mean).reshape(-1))
        object.__setattr__(self, "inv_std", f32(self.inv_std).reshape(-1))
        layers = tuple((f32(w), f32(b).reshape(-1)) for w, b in self.layers)
        object.__setattr__(self, "layers", layers)
        if self.mean.shape != self.inv_std.shape:
            raise ValueError("mean and inv_std must have the same shape")
        if not layers:
            raise ValueError("at least one layer is required")
        n_in = self.mean.shape[0]
        for i, (w, b) in enumerate(layers):
            if w.ndim != 2 or w.shape[0] != n_in or b.shape != (w.shape[1],):
                raise ValueError(f"layer {i}: W {w.shape} / b {b.shape} do not chain from {n_in}")
            n_in = w.shape[1]
        if n_in != 1:
            raise ValueError(f"last layer must have one output, has {n_in}")
        if self.clip is not None:
            if not self.clip > 0:
                raise ValueError(f"clip must be > 0, got {self.clip}")
            object.__setattr__(self, "clip", float(np.float32(self.clip)))

    @property
    def n_features(self) -> int:
        """Return the number of input features F."""
        return int(self.mean.shape[0])

    @property
    def hidden(self) -> tuple[int, ...]:
        """Return the hidden layer widths (empty for a logistic regression)."""
        return tuple(int(w.shape[1]) for w, _ in self.layers[:-1])


def build_graph(weights: MLPWeights, *, graph_name: str = "tickscore_risk") -> onnx.ModelProto:
    """Return the ONNX model of ``weights`` (checked with :func:`onnx.checker.check_model`).

    The input is ``x`` float32 ``[N, F]`` with a dynamic batch dimension ``N``;
    the output is ``score`` float32 ``[N, 1]`` in [0, 1].
    """
    F = weights.n_features
    inits = [
        numpy_helper.from_array(weights.mean, "norm_mean"),
        numpy_helper.from_array(weights.inv_std, "norm_inv_std"),
    ]
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "norm_mean"], ["x_centered"], name="norm_sub"),
        helper.make_node("Mul", ["x_centered", "norm_inv_std"], ["x_norm"], name="norm_mul"),
    ]
    cur = "x_norm"
    if weights.clip is not None:
        c = np.float32(weights.clip)
        inits += [
            numpy_helper.from_array(np.array(-c, dtype=np.float32), "norm_clip_min"),
            numpy_helper.from_array(np.array(c, dtype=np.float32), "norm_clip_max"),
        ]
        nodes.append(
            helper.make_node("Clip", [cur, "norm_clip_min", "norm_clip_max"], ["x_clipped"], name="norm_clip")
        )
        cur = "x_clipped"
    n_layers = len(weights.layers)
    for i, (w, b) in enumerate(weights.layers):
        last = i == n_layers - 1
        p = "out" if last else f"fc{i}"
        inits += [numpy_helper.from_array(w, f"{p}_W"), numpy_helper.from_array(b, f"{p}_b")]
        nodes.append(helper.make_node("MatMul", [cur, f"{p}_W"], [f"{p}_mm"], name=f"{p}_matmul"))
        nodes.append(helper.make_node("Add", [f"{p}_mm", f"{p}_b"], [f"{p}_z"], name=f"{p}_add"))
        if last:
            nodes.append(helper.make_node("Sigmoid", [f"{p}_z"], [OUTPUT_NAME], name="out_sigmoid"))
        else:
            nodes.append(helper.make_node("Relu", [f"{p}_z"], [f"{p}_h"], name=f"{p}_relu"))
            cur = f"{p}_h"
    graph = helper.make_graph(
        nodes,
        graph_name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", F])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="tickscore.models.onnx_graph",
        doc_string="tickscore risk model: standardise -> MLP -> sigmoid",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def sklearn_layers(clf: Any) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Return the ``(W, b)`` layers of a fitted binary sklearn classifier.

    Parameters
    ----------
    clf : MLPClassifier or LogisticRegression
        Binary classifier; an MLP must use ``activation="relu"``.
    """
    if hasattr(clf, "coefs_"):  # MLPClassifier
        if clf.activation != "relu":
            raise ValueError(f"only relu MLPs are supported, got {clf.activation!r}")
        if clf.out_activation_ != "logistic":
            raise ValueError("only binary (logistic output) MLPs are supported")
        return tuple((w, b) for w, b in zip(clf.coefs_, clf.intercepts_, strict=True))
    if hasattr(clf, "coef_"):  # LogisticRegression and friends
        coef = np.asarray(clf.coef_)
        if coef.shape[0] != 1:
            raise ValueError("only binary linear classifiers are supported")
        return ((coef.T, np.asarray(clf.intercept_).reshape(1)),)
    raise TypeError(f"unsupported classifier {type(clf).__name__}")


def weights_from_sklearn(
    mean: np.ndarray, std: np.ndarray, clf: Any, clip: float | None = None
) -> MLPWeights:
    """Return :class:`MLPWeights` from standardisation moments and a fitted classifier.

    Parameters
    ----------
    mean, std : ndarray, shape (F,)
        Standardisation moments (``std`` must be > 0); the graph multiplies by
        ``float32(1 / std)``.
    clf : MLPClassifier or LogisticRegression
        See :func:`sklearn_layers`; fitted on standardised (and clipped) inputs.
    clip : float, optional
        Clip of the standardised input the classifier was trained with.
    """
    std = np.asarray(std, dtype=np.float64)
    if np.any(~(std > 0)):
        raise ValueError("std must be > 0 for every feature")
    return MLPWeights(mean=mean, inv_std=1.0 / std, layers=sklearn_layers(clf), clip=clip)


def weights_from_graph(model: onnx.ModelProto) -> MLPWeights:
    """Return the weights of an fp32 graph built by :func:`build_graph`.

    Raises
    ------
    ValueError
        If the graph does not have the documented shape (e.g. a QDQ graph).
    """
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    if ops[:2] != ["Sub", "Mul"] or ops[-1] != "Sigmoid":
        raise ValueError(f"unexpected graph shape: {ops}")
    layers = []
    i = 0
    while f"fc{i}_W" in inits:
        layers.append((inits[f"fc{i}_W"], inits[f"fc{i}_b"]))
        i += 1
    if "out_W" not in inits:
        raise ValueError("graph has no out_W initializer")
    layers.append((inits["out_W"], inits["out_b"]))
    clip = None
    if "Clip" in ops:
        clip = float(inits["norm_clip_max"])
        if float(inits["norm_clip_min"]) != -clip:
            raise ValueError("only a symmetric Clip is supported")
    return MLPWeights(mean=inits["norm_mean"], inv_std=inits["norm_inv_std"], layers=tuple(layers), clip=clip)


def forward_numpy(weights: MLPWeights, X: np.ndarray) -> np.ndarray:
    """Return the scores of ``X`` (float32, (N, F)) as float32 (N,) with plain numpy.

    Computes in float32, in the same operation order as the graph (including the
    optional clip); a reference
    for the ONNX and fused backends.
    """
    h = (np.asarray(X, dtype=np.float32) - weights.mean) * weights.inv_std
    if weights.clip is not None:
        c = np.float32(weights.clip)
        np.clip(h, -c, c, out=h)
    n_layers = len(weights.layers)
    for i, (w, b) in enumerate(weights.layers):
        h = h @ w + b
        if i < n_layers - 1:
            np.maximum(h, np.float32(0.0), out=h)
    z = h[:, 0].astype(np.float64)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
