"""ONNX risk model: metadata, loading/validation, runtime backends, training.

Public surface for the service::

    from models import OrtBackend, default_model_path, load_model

* :mod:`models.metadata`: ``tickscore.*`` metadata stored in the ONNX file.
* :mod:`models.loader`: :func:`load_model` validates a file against the running
  feature set; :func:`default_model_path` is the shipped int8 model.
* :mod:`models.ort_backend`: :class:`OrtBackend`, onnxruntime one-row scoring
  with preallocated, pre-bound buffers.
* :mod:`models.onnx_graph`, :mod:`models.quantize`, :mod:`models.label`,
  :mod:`models.train`: how the default model is built
  (``python -m models.train --out-dir models/default``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from models.loader import default_model_path, load_model
from models.metadata import ModelError, ModelMetadata, read_metadata, write_metadata

if TYPE_CHECKING:
    from models.ort_backend import OrtBackend

__all__ = [
    "ModelError",
    "ModelMetadata",
    "OrtBackend",
    "default_model_path",
    "load_model",
    "read_metadata",
    "write_metadata",
]


def __getattr__(name: str) -> Any:
    """Import :class:`OrtBackend` on first use (keeps ``python -m models.ort_backend`` clean)."""
    if name == "OrtBackend":
        from models.ort_backend import OrtBackend

        return OrtBackend
    raise AttributeError(f"module 'models' has no attribute {name!r}")
