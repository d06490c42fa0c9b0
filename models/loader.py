"""Load and validate a tickscore model file before any backend uses it.

:func:`load_model` fails fast, with a message that names the file, when the
model cannot serve the running feature set: missing file, not ONNX, not a
tickscore model, feature-set id or names differ, input width differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import onnx

from models.metadata import (
    ModelError,
    ModelMetadata,
    check_model_file,
    make_model_version,
    metadata_from_model,
)
from models.onnx_graph import INPUT_NAME, OUTPUT_NAME

__all__ = [
    "FeatureSetLike",
    "ModelError",
    "DEFAULT_MODEL_NAME",
    "default_model_path",
    "load_model",
    "load_checked",
]

#: File name of the model the service loads by default (int8 QDQ).
DEFAULT_MODEL_NAME = "risk_int8.onnx"


class FeatureSetLike(Protocol):
    """What the loader needs from a feature set: its id and ordered feature names."""

    @property
    def id(self) -> str:
        """Return the feature-set id (stored in the model as ``tickscore.feature_set_id``)."""
        ...

    @property
    def names(self) -> tuple[str, ...]:
        """Return the feature names in input-column order."""
        ...


def default_model_path(quantization: str = "int8") -> Path:
    """Return the path of the shipped default model (``"int8"`` or ``"fp32"``)."""
    if quantization not in ("int8", "fp32"):
        raise ValueError(f"quantization must be 'int8' or 'fp32', got {quantization!r}")
    return Path(__file__).resolve().parent / "default" / f"risk_{quantization}.onnx"


def _first_difference(a: tuple[str, ...], b: tuple[str, ...]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first differing feature at column {i}: model {x!r} vs running {y!r}"
    if len(a) != len(b):
        return f"model has {len(a)} features, running feature set has {len(b)}"
    return "feature names are identical"


def _input_width(model: onnx.ModelProto, source: str) -> int:
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise ModelError(
            f"{source}: expected one graph input {INPUT_NAME!r}, found {[i.name for i in inputs]}"
        )
    outputs = [o.name for o in model.graph.output]
    if outputs != [OUTPUT_NAME]:
        raise ModelError(f"{source}: expected one graph output {OUTPUT_NAME!r}, found {outputs}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise ModelError(f"{source}: input {INPUT_NAME!r} must have shape [N, F] with a fixed F")
    return int(dims[1].dim_value)


def load_checked(path: str | Path, feature_set: FeatureSetLike) -> tuple[onnx.ModelProto, ModelMetadata]:
    """Return the parsed model and its metadata after every compatibility check.

    See :func:`load_model`; this variant also returns the ``ModelProto`` so a
    backend does not parse the file twice.
    """
    path = check_model_file(path)
    src = str(path)
    try:
        model = onnx.load(src, load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, ValidationError, OSError
        raise ModelError(f"{src}: not a valid ONNX model ({type(exc).__name__}: {exc})".strip()) from exc
    meta = metadata_from_model(model, source=src)
    fs_id = feature_set.id
    fs_names = tuple(feature_set.names)
    if meta.feature_set_id != fs_id:
        msg = (
            f"{src}: model was trained on feature set {meta.feature_set_id!r} "
            f"but the running feature set is {fs_id!r}"
        )
        if meta.feature_names != fs_names:
            msg += f"; {_first_difference(meta.feature_names, fs_names)}"
        raise ModelError(msg)
    if meta.feature_names != fs_names:
        raise ModelError(
            f"{src}: feature set {fs_id!r} has the same id but different feature names; "
            f"{_first_difference(meta.feature_names, fs_names)}"
        )
    width = _input_width(model, src)
    if width != len(fs_names):
        raise ModelError(
            f"{src}: model input has {width} features, feature set {fs_id!r} has {len(fs_names)}"
        )
    content = make_model_version(model, meta.quantization)
    if meta.model_version != content:
        # Every score carries model_version: it must name these weights, not whatever the metadata says.
        raise ModelError(
            f"{src}: the metadata's model_version {meta.model_version!r} does not match the file's "
            f"weights ({content!r}): the graph was changed after it was stamped; stamp it again "
            "(tickscore adopt) or use the original file"
        )
    return model, meta


def load_model(path: str | Path, feature_set: FeatureSetLike) -> ModelMetadata:
    """Return the metadata of the model at ``path`` after checking it can serve ``feature_set``.

    Parameters
    ----------
    path : str or Path
        ONNX model file.
    feature_set : FeatureSetLike
        The running feature set (``.id``, ``.names``).

    Raises
    ------
    ModelError
        If the file is missing, is not ONNX, has no tickscore metadata, was
        trained on another feature set (the message names both ids and, if the
        names differ, the first differing feature), or its input width is not
        the number of features.
    """
    return load_checked(path, feature_set)[1]
