"""Model metadata: what a tickscore ONNX file records about itself.

The metadata lives in the ONNX ``metadata_props`` (string key/value pairs), so
the model file is self-describing and nothing else has to travel with it.  Keys
(all strings; JSON where noted):

``tickscore.feature_set_id``
    Id of the feature set the model was trained on (checked at load).
``tickscore.feature_names``
    JSON list of feature names, in input-column order.
``tickscore.label``
    JSON object: ``definition`` (text), ``horizon_ms``, ``k`` and any further
    label parameters.
``tickscore.train_range``
    JSON object: data seed, number of events, first/last ``ts_event_ns`` of the
    train/validation/test periods.
``tickscore.seed``
    Integer seed used for training (as text).
``tickscore.quantization``
    ``"fp32"`` or ``"int8-qdq"``.
``tickscore.model_version``
    ``"risk-<quantization tag>-<10 hex of sha256 of the weights>"``, see
    :func:`weights_digest`.
``tickscore.metrics``
    JSON object of evaluation metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

__all__ = [
    "MAX_MODEL_BYTES",
    "check_model_file",
    "ModelError",
    "ModelMetadata",
    "METADATA_KEYS",
    "KEY_PREFIX",
    "QUANT_FP32",
    "QUANT_INT8_QDQ",
    "read_metadata",
    "metadata_from_model",
    "write_metadata",
    "weights_digest",
    "make_model_version",
]

KEY_PREFIX = "tickscore."
QUANT_FP32 = "fp32"
QUANT_INT8_QDQ = "int8-qdq"
_QUANT_TAGS = {QUANT_FP32: "fp32", QUANT_INT8_QDQ: "int8"}

#: Every key a tickscore model must carry.
METADATA_KEYS = (
    "tickscore.feature_set_id",
    "tickscore.feature_names",
    "tickscore.label",
    "tickscore.train_range",
    "tickscore.seed",
    "tickscore.quantization",
    "tickscore.model_version",
    "tickscore.metrics",
)


class ModelError(ValueError):
    """A model file is missing, unreadable, not a tickscore model or incompatible."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelMetadata:
    """Typed view of the ``tickscore.*`` metadata of a model file.

    Attributes
    ----------
    feature_set_id : str
        Id of the feature set the model expects.
    feature_names : tuple of str
        Feature names in input-column order.
    label : dict
        Label definition: ``definition`` (text), ``horizon_ms``, ``k``, ...
    train_range : dict
        Training data description (seed, events, per-split time ranges).
    seed : int
        Training seed.
    quantization : str
        ``"fp32"`` or ``"int8-qdq"``.
    model_version : str
        Version string published with every score.
    metrics : dict
        Evaluation metrics recorded at build time.
    """

    feature_set_id: str
    feature_names: tuple[str, ...]
    label: dict[str, Any] = field(default_factory=dict)
    train_range: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    quantization: str = QUANT_FP32
    model_version: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        """Return the number of input features."""
        return len(self.feature_names)

    def to_props(self) -> dict[str, str]:
        """Return the metadata as ``metadata_props`` strings (key -> value)."""
        return {
            "tickscore.feature_set_id": self.feature_set_id,
            "tickscore.feature_names": json.dumps(list(self.feature_names)),
            "tickscore.label": json.dumps(self.label, sort_keys=True),
            "tickscore.train_range": json.dumps(self.train_range, sort_keys=True),
            "tickscore.seed": str(int(self.seed)),
            "tickscore.quantization": self.quantization,
            "tickscore.model_version": self.model_version,
            "tickscore.metrics": json.dumps(self.metrics, sort_keys=True),
        }

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> ModelMetadata:
        """Return metadata decoded from ``metadata_props`` strings.

        Raises
        ------
        ModelError
            If keys are missing ("not a tickscore model, missing ...") or a value
            does not decode.
        """
        missing = [k for k in METADATA_KEYS if k not in props]
        if missing:
            raise ModelError(f"{source}: not a tickscore model, missing metadata {', '.join(missing)}")
        try:
            names = json.loads(props["tickscore.feature_names"])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("tickscore.feature_names is not a JSON list of strings")
            return cls(
                feature_set_id=props["tickscore.feature_set_id"],
                feature_names=tuple(names),
                label=json.loads(props["tickscore.label"]),
                train_range=json.loads(props["tickscore.train_range"]),
                seed=int(props["tickscore.seed"]),
                quantization=props["tickscore.quantization"],
                model_version=props["tickscore.model_version"],
                metrics=json.loads(props["tickscore.metrics"]),
            )
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            raise ModelError(f"{source}: bad tickscore metadata: {exc}") from exc


def metadata_from_model(model: onnx.ModelProto, source: str = "model") -> ModelMetadata:
    """Return the tickscore metadata of an in-memory ONNX model.

    Raises
    ------
    ModelError
        If the model is not a tickscore model (see :meth:`ModelMetadata.from_props`).
    """
    props = {p.key: p.value for p in model.metadata_props}
    return ModelMetadata.from_props(props, source=source)


#: Largest model file loaded (bytes): a per-tick model is kilobytes; this bounds a reload's read.
MAX_MODEL_BYTES = 64 << 20


def check_model_file(path: str | Path, max_bytes: int = MAX_MODEL_BYTES) -> Path:
    """Return ``path`` if it is a readable file of at most ``max_bytes``; else raise :class:`ModelError`.

    A missing file, an unreadable one and a directory get the same answer, so
    a control client cannot probe which paths exist.  The size is checked
    before anything is read (a reload of a 2 GB file must not read it).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        ok = path.is_file() and os.access(path, os.R_OK)
    except OSError:
        ok = False
    if not ok:
        raise ModelError(f"{path}: no readable model file there")
    if size > max_bytes:
        raise ModelError(f"{path}: model file is {size / 2**20:,.1f} MiB, over the {max_bytes >> 20} MiB "
                         "limit for a per-tick model")  # fmt: skip
    return path


def read_metadata(path: str | Path) -> ModelMetadata:
    """Return the tickscore metadata stored in the ONNX file at ``path``.

    Raises
    ------
    ModelError
        If the file is missing, not ONNX, or has no tickscore metadata.
    """
    path = check_model_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, OSError, ...
        raise ModelError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {exc})") from exc
    return metadata_from_model(model, source=str(path))


def write_metadata(model: onnx.ModelProto, meta: ModelMetadata) -> onnx.ModelProto:
    """Store ``meta`` in ``model.metadata_props`` (in place) and return ``model``.

    Existing ``tickscore.*`` entries are replaced; other entries are kept.
    """
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(KEY_PREFIX)]
    del model.metadata_props[:]
    for key, value in [*keep, *meta.to_props().items()]:
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value
    return model


def weights_digest(model: onnx.ModelProto, n_hex: int = 10) -> str:
    """Return the first ``n_hex`` hex digits of a sha256 over the graph's weights.

    The hash covers every initializer (name, dtype, shape, little-endian values,
    in graph order) and the node list (op type, inputs, outputs), and nothing
    else: metadata does not change it, so a model's version is stable when only
    its description is edited.
    """
    h = hashlib.sha256()
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        h.update(init.name.encode())
        h.update(str(arr.dtype.str).encode())
        h.update(repr(tuple(arr.shape)).encode())
        h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    for node in model.graph.node:
        h.update(node.op_type.encode())
        h.update(",".join(node.input).encode())
        h.update(b"->")
        h.update(",".join(node.output).encode())
    return h.hexdigest()[:n_hex]


def make_model_version(model: onnx.ModelProto, quantization: str) -> str:
    """Return ``"risk-<fp32|int8>-<digest>"`` for ``model``."""
    tag = _QUANT_TAGS.get(quantization, quantization)
    return f"risk-{tag}-{weights_digest(model)}"
