"""Streaming feature kernels (numba) and versioned feature sets.

Hot path: :func:`update_tick` (one numba call per tick); research / replay:
:func:`compute_batch` (same per-event core, :func:`apply_tick`).  Feature names,
formulas and ranges: :mod:`features.featureset`.
"""

from features.featureset import (
    DEFAULT_FEATURE_SET,
    FeatureSet,
    get_feature_set,
    known_feature_sets,
)
from features.kernels import (
    FEATURE_NAMES,
    N_FEATURES,
    N_PARAMS,
    NF_STATE,
    NI_STATE,
    PARAM_NAMES,
    apply_tick,
    compute_batch,
    new_state,
    reset_state,
    update_tick,
)
from features.validate import validate_batch, validate_tick

__all__ = [
    "DEFAULT_FEATURE_SET",
    "FEATURE_NAMES",
    "FeatureSet",
    "N_FEATURES",
    "N_PARAMS",
    "NF_STATE",
    "NI_STATE",
    "PARAM_NAMES",
    "apply_tick",
    "compute_batch",
    "get_feature_set",
    "known_feature_sets",
    "new_state",
    "reset_state",
    "update_tick",
    "validate_batch",
    "validate_tick",
]
