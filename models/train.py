"""Train the default risk model and write the shipped ONNX files.

Pipeline (all seeds fixed, single-threaded BLAS, so a rebuild with the same
arguments gives the same weights and predictions):

1. Generate a synthetic market with :func:`replay.generator.generate_market`
   (seed 7 by default, distinct from the demo dataset's seed 1) and read it
   back through :func:`replay.reader.read_ticks`, so training sees exactly the
   validated ticks the service would.
2. Features with :func:`features.kernels.compute_batch` (the same kernels as
   the live path; features at ``t`` use only events ``<= t``).
3. Labels with :func:`models.label.compute_labels` (large mid move within H ms).
4. Time-based split train / validation / test (60 / 20 / 20 % of the event-time
   span) with a gap of ``H`` between parts, so no label of one part looks into
   the next.  Rejected rows, rows without a defined label and warm-up rows
   (``FLAG_WARMUP``) are dropped from every part.
5. Standardisation moments from the training part; an sklearn ``MLPClassifier``
   (ReLU, Adam, fixed ``random_state``) trained epoch by epoch with early
   stopping on validation log-loss (or a logistic regression if no hidden
   layers are requested).
6. A hand-built fp32 ONNX graph (:mod:`models.onnx_graph`) checked against
   ``predict_proba`` (max abs diff <= 1e-5), and its int8 QDQ form
   (:mod:`models.quantize`) calibrated on training-period rows; both are
   evaluated on the test part and written with their metadata, plus a JSON
   training report.

``tickscore train --data FILE --out MODEL.onnx`` (:func:`train_file`) runs steps
2-6 on a tick file instead of a generated market (:func:`train_on_dataset` is
the shared core) and writes ``MODEL.onnx``, ``MODEL.int8.onnx`` and
``MODEL.train.json``.

The shipped files in ``models/default/`` were rebuilt with::

    OMP_NUM_THREADS=1 python -m models.train --out-dir models/default

(defaults: ``--events 1000000 --seed 7 --label-horizon-ms 500 --label-k 2
--hidden 16,8 --train-seed 0``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from features.featureset import DEFAULT_BY_SHAPE, DEFAULT_FEATURE_SET
from models.dataset import (
    DEFAULT_MAX_ROWS,
    SPLIT_FRACTIONS,
    Dataset,
    dataset_from_file,
    dataset_from_ticks,
    time_split,
)
from models.label import LabelSpec
from models.metadata import (
    QUANT_FP32,
    QUANT_INT8_QDQ,
    ModelMetadata,
    make_model_version,
    write_metadata,
)
from models.onnx_graph import MLPWeights, build_graph, sklearn_layers
from models.ort_backend import make_session_options
from models.quantize import ArrayCalibrationReader, quantize_int8
from replay.generator import default_data_path, generate_market
from replay.reader import read_ticks, resolve_shape

__all__ = [
    "build_dataset",
    "fit_classifier",
    "binary_metrics",
    "train_default",
    "train_on_dataset",
    "train_file",
    "SHAPE_LABELS",
    "main",
]

DEFAULT_EVENTS = 1_000_000
DEFAULT_DATA_SEED = 7
DEFAULT_TRAIN_SEED = 0
DEFAULT_HIDDEN = (16, 8)
DEFAULT_INPUT_CLIP = 4.0
REPORT_NAME = "train_report.json"


def _read_generated(n_events: int, seed: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Generate a market and return its validated ticks and symbols via the reader."""
    frame = generate_market(n_events, seed=seed)
    with tempfile.TemporaryDirectory(prefix="tickscore-train-") as tmp:
        path = Path(tmp) / "market.parquet"
        frame.write_parquet(path)
        data = read_ticks(path)
    return np.ascontiguousarray(data.ticks), tuple(data.symbols)


def build_dataset(
    n_events: int, seed: int, label: LabelSpec, feature_set: Any = DEFAULT_FEATURE_SET,
    max_rows: int | None = DEFAULT_MAX_ROWS,
) -> tuple[Dataset, dict[str, float]]:
    """Return the dataset of a generated market and the seconds each stage took.

    Parameters
    ----------
    n_events : int
        Events to generate.
    seed : int
        Generator seed.
    label : LabelSpec
        Label parameters.
    feature_set : FeatureSet
        Feature set whose kernels and parameters compute the features.
    max_rows : int or None
        Usable rows kept (:class:`models.dataset.RowSample`).
    """
    t0 = time.perf_counter()
    ticks, symbols = _read_generated(n_events, seed)
    read_s = time.perf_counter() - t0
    ds, timing = dataset_from_ticks(ticks, symbols, label, feature_set, max_rows=max_rows)
    return ds, {"generate_read_s": read_s, **timing}


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Return AUC, log-loss, Brier score, positive rate and mean score of ``p`` for ``y``."""
    # deferred: training-only dependency
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    p64 = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return {
        "n": int(y.shape[0]),
        "positive_rate": float(np.mean(y)),
        "auc": float(roc_auc_score(y, p64)),
        "log_loss": float(log_loss(y, p64, labels=[0, 1])),
        "brier": float(brier_score_loss(y, p64)),
        "mean_score": float(np.mean(p64)),
    }


def fit_classifier(
    Xtr: np.ndarray,
    ytr: np.ndarray,
    Xval: np.ndarray,
    yval: np.ndarray,
    hidden: tuple[int, ...],
    seed: int,
    max_epochs: int = 80,
    patience: int = 3,
    clip: float | None = None,
) -> tuple[MLPWeights, Any, dict[str, Any]]:
    """Fit the classifier on standardised inputs; return graph weights, model and history.

    An MLP is trained one epoch at a time (``partial_fit``, Adam, shuffled with
    ``random_state=seed``); the weights with the best validation log-loss are
    kept, training stops after ``patience`` epochs without improvement.  With
    ``hidden == ()`` an L2 logistic regression is fitted instead.
    """
    from sklearn.linear_model import LogisticRegression  # deferred: training-only dependency
    from sklearn.metrics import log_loss  # deferred: training-only dependency
    from sklearn.neural_network import MLPClassifier  # deferred: training-only dependency

    mean = Xtr.mean(axis=0, dtype=np.float64)
    std = Xtr.std(axis=0, dtype=np.float64)
    std = np.where(std > 1e-12, std, 1.0)
    # Standardise exactly as the graph does: float32 Sub(mean) then Mul(1/std).
    mean32 = mean.astype(np.float32)
    inv32 = (1.0 / std).astype(np.float32)
    Ztr = (Xtr - mean32) * inv32
    Zval = (Xval - mean32) * inv32
    if clip is not None:
        c = np.float32(clip)
        np.clip(Ztr, -c, c, out=Ztr)
        np.clip(Zval, -c, c, out=Zval)
    history: dict[str, Any] = {"val_log_loss": []}
    if not hidden:
        clf = LogisticRegression(C=1.0, max_iter=500)
        clf.fit(Ztr, ytr)
        history["val_log_loss"].append(float(log_loss(yval, clf.predict_proba(Zval)[:, 1])))
    else:
        clf = MLPClassifier(
            hidden_layer_sizes=hidden,
            activation="relu",
            solver="adam",
            alpha=1e-4,
            batch_size=1024,
            learning_rate_init=1e-3,
            random_state=seed,
            shuffle=True,
        )
        best = (np.inf, None, -1)
        for epoch in range(max_epochs):
            clf.partial_fit(Ztr, ytr, classes=np.array([0, 1]))
            ll = float(log_loss(yval, clf.predict_proba(Zval)[:, 1], labels=[0, 1]))
            history["val_log_loss"].append(ll)
            if ll < best[0] - 1e-6:
                coefs = ([w.copy() for w in clf.coefs_], [b.copy() for b in clf.intercepts_])
                best = (ll, coefs, epoch)
            elif epoch - best[2] >= patience:
                break
        clf.coefs_, clf.intercepts_ = best[1]
        history["best_epoch"] = best[2] + 1
        history["epochs"] = len(history["val_log_loss"])
    weights = MLPWeights(mean=mean32, inv_std=inv32, layers=sklearn_layers(clf), clip=clip)
    return weights, clf, history


def _ort_scores(model: onnx.ModelProto, X: np.ndarray) -> np.ndarray:
    import onnxruntime as ort  # deferred: onnxruntime only where a session is made here

    sess = ort.InferenceSession(
        model.SerializeToString(), make_session_options(), providers=["CPUExecutionProvider"]
    )
    return sess.run(None, {"x": np.ascontiguousarray(X, dtype=np.float32)})[0][:, 0]


def _save(model: onnx.ModelProto, meta: ModelMetadata, path: Path) -> None:
    write_metadata(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def train_on_dataset(
    ds: Dataset,
    out_fp32: str | Path,
    out_int8: str | Path,
    *,
    data_info: dict[str, Any],
    label: LabelSpec,
    hidden: tuple[int, ...] = DEFAULT_HIDDEN,
    train_seed: int = DEFAULT_TRAIN_SEED,
    input_clip: float | None = DEFAULT_INPUT_CLIP,
    activation_type: str = "uint8",
    calibrate_method: str = "minmax",
    compare_quantization: bool = False,
    feature_set: Any = DEFAULT_FEATURE_SET,
    timing: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Split, fit, export fp32 + int8 QDQ ONNX with full metadata; return the report.

    The split is by event time (60/20/20 %) with a gap of the label horizon
    between parts; the classifier sees the training part only, early stopping
    uses the validation part, the int8 model is calibrated on training rows and
    both models are evaluated on the test part.  ``data_info`` goes first in
    the ``tickscore.train_range`` metadata (where the data came from).
    """
    from threadpoolctl import threadpool_limits  # deferred: training-only dependency

    fs = feature_set
    timing = dict(timing or {})
    out_fp32, out_int8 = Path(out_fp32), Path(out_int8)
    gap_ns = int(label.horizon_ms * 1_000_000)
    split = time_split(ds.ts, np.ones(ds.ts.shape, dtype=bool), gap_ns, span=ds.span)
    Xtr, ytr = ds.X[split.train], ds.y[split.train].astype(np.int64)
    Xval, yval = ds.X[split.val], ds.y[split.val].astype(np.int64)
    Xte, yte = ds.X[split.test], ds.y[split.test].astype(np.int64)
    for name, yy in (("train", ytr), ("validation", yval), ("test", yte)):
        if yy.size == 0 or yy.min() == yy.max():
            raise ValueError(
                f"the {name} period has {yy.size} usable rows and needs both label classes; "
                "use more data (or a shorter label horizon / smaller k)"
            )

    t0 = time.perf_counter()
    with threadpool_limits(limits=1):
        weights, clf, history = fit_classifier(Xtr, ytr, Xval, yval, hidden, train_seed, clip=input_clip)
    timing["fit_s"] = time.perf_counter() - t0

    # fp32 graph, checked against sklearn on the exact same standardised inputs.
    fp32 = build_graph(weights)
    Zte = (Xte - weights.mean) * weights.inv_std
    if input_clip is not None:
        Zte = np.clip(Zte, -np.float32(input_clip), np.float32(input_clip))
    ref = clf.predict_proba(Zte)[:, 1]
    s32_test = _ort_scores(fp32, Xte)
    sk_diff = float(np.max(np.abs(s32_test.astype(np.float64) - ref)))
    if sk_diff > 1e-5:
        raise AssertionError(f"ONNX graph differs from sklearn predict_proba by {sk_diff:.3g}")

    label_dict = label.to_dict()
    train_range = {
        **data_info,
        "symbols": list(ds.symbols),
        "gap_ns": gap_ns,
        "fractions": list(SPLIT_FRACTIONS),
        **{f"{k}_ts_ns": v for k, v in split.ranges.items()},
        "rows": {"train": int(Xtr.shape[0]), "val": int(Xval.shape[0]), "test": int(Xte.shape[0])},
    }
    m32 = {
        "val": binary_metrics(yval, _ort_scores(fp32, Xval)),
        "test": binary_metrics(yte, s32_test),
        "max_abs_diff_vs_sklearn": sk_diff,
    }
    meta32 = ModelMetadata(
        feature_set_id=fs.id,
        feature_names=tuple(fs.names),
        label=label_dict,
        train_range=train_range,
        seed=train_seed,
        quantization=QUANT_FP32,
        model_version=make_model_version(fp32, QUANT_FP32),
        metrics=m32,
    )
    _save(fp32, meta32, out_fp32)

    # int8 QDQ, calibrated on training-period rows only.
    t0 = time.perf_counter()
    variants: dict[str, Any] = {}
    combos = [(activation_type, calibrate_method)]
    if compare_quantization:
        combos += [
            (a, c)
            for a in ("uint8", "int8")
            for c in ("minmax", "percentile")
            if (a, c) != (activation_type, calibrate_method)
        ]
    int8 = None
    s8_test = None
    with tempfile.TemporaryDirectory(prefix="tickscore-q-") as tmp:
        for a, c in combos:
            qpath = Path(tmp) / f"q_{a}_{c}.onnx"
            q = quantize_int8(fp32, qpath, Xtr, activation_type=a, calibrate_method=c)
            s = _ort_scores(q, Xte)
            d = np.abs(s.astype(np.float64) - s32_test)
            variants[f"{a}/{c}"] = {
                **binary_metrics(yte, s),
                "max_abs_diff_vs_fp32": float(d.max()),
                "mean_abs_diff_vs_fp32": float(d.mean()),
            }
            if int8 is None:
                int8, s8_test = q, s
    timing["quantize_s"] = time.perf_counter() - t0
    d8 = np.abs(s8_test.astype(np.float64) - s32_test)
    m8 = {
        "val": binary_metrics(yval, _ort_scores(int8, Xval)),
        "test": binary_metrics(yte, s8_test),
        "max_abs_diff_vs_fp32": float(d8.max()),
        "mean_abs_diff_vs_fp32": float(d8.mean()),
        "p999_abs_diff_vs_fp32": float(np.quantile(d8, 0.999)),
        "activation_type": activation_type,
        "weight_type": "int8-symmetric-per-tensor",
        "calibration": calibrate_method,
        "calibration_rows": ArrayCalibrationReader(Xtr).n_rows,
        "quantized_ops": ["MatMul"],
        "matmul_outputs": "float32",
    }
    meta8 = ModelMetadata(
        feature_set_id=fs.id,
        feature_names=tuple(fs.names),
        label=label_dict,
        train_range=train_range,
        seed=train_seed,
        quantization=QUANT_INT8_QDQ,
        model_version=make_model_version(int8, QUANT_INT8_QDQ),
        metrics=m8,
    )
    _save(int8, meta8, out_int8)

    pos = {
        "all_labelled": ds.rows["positive"] / max(ds.rows["labelled"], 1),
        "train": float(ytr.mean()),
        "val": float(yval.mean()),
        "test": float(yte.mean()),
    }
    return {
        "feature_set_id": fs.id,
        "label": label_dict,
        "positive_rate": pos,
        "rows": {k: ds.rows[k] for k in ("generated", "accepted", "labelled", "warmup_flagged", "usable")},
        "sample": {
            "max_rows": ds.rows["max_rows"],
            "kept": ds.rows["kept"],
            "sampled": ds.sampled,
            "max_rows_held_for_label": ds.rows["max_held_rows"],
        },
        "train_range": train_range,
        "model": {
            "kind": "mlp" if hidden else "logistic",
            "hidden": list(hidden),
            "input_clip_std": input_clip,
            "activation": "relu",
            "train_seed": train_seed,
            **history,
        },
        "fp32": {"file": out_fp32.name, "version": meta32.model_version, **m32},
        "int8": {"file": out_int8.name, "version": meta8.model_version, **m8},
        "quantization_variants_test": variants,
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "host": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }


def train_default(
    out_dir: str | Path,
    *,
    events: int = DEFAULT_EVENTS,
    seed: int = DEFAULT_DATA_SEED,
    label: LabelSpec | None = None,
    hidden: tuple[int, ...] = DEFAULT_HIDDEN,
    train_seed: int = DEFAULT_TRAIN_SEED,
    input_clip: float | None = DEFAULT_INPUT_CLIP,
    activation_type: str = "uint8",
    calibrate_method: str = "minmax",
    compare_quantization: bool = True,
    feature_set: Any = DEFAULT_FEATURE_SET,
) -> dict[str, Any]:
    """Build the default model files in ``out_dir`` and return the training report.

    Writes ``risk_fp32.onnx``, ``risk_int8.onnx`` (the service default) and
    ``train_report.json``.

    Parameters
    ----------
    out_dir : str or Path
        Output directory (created).
    events : int
        Events to generate for training.
    seed : int
        Generator seed of the training market (not 1: that is the demo dataset).
    label : LabelSpec, optional
        Label parameters (default :data:`models.label.DEFAULT_LABEL`).
    hidden : tuple of int
        Hidden layer widths; ``()`` gives a logistic regression.
    train_seed : int
        ``random_state`` of the classifier.
    input_clip : float or None
        Clip of the standardised input, in standard deviations (part of the
        model, see :mod:`models.onnx_graph`); None for no clip.
    activation_type, calibrate_method : str
        Quantization options, see :func:`models.quantize.quantize_int8`.
    compare_quantization : bool
        Also evaluate the other activation types / calibration methods and
        record them in the report (the shipped file uses the arguments above).
    feature_set : FeatureSet, optional
        Default :data:`features.featureset.DEFAULT_FEATURE_SET`.
    """
    t_start = time.perf_counter()
    fs = feature_set if feature_set is not None else DEFAULT_FEATURE_SET
    label = label if label is not None else LabelSpec()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    ds, timing = build_dataset(events, seed, label, fs)
    data_info = {"generator": "replay.generator.generate_market", "data_seed": seed, "n_events": events}
    report = train_on_dataset(
        ds,
        out_dir / "risk_fp32.onnx",
        out_dir / "risk_int8.onnx",
        data_info=data_info,
        label=label,
        hidden=hidden,
        train_seed=train_seed,
        input_clip=input_clip,
        activation_type=activation_type,
        calibrate_method=calibrate_method,
        compare_quantization=compare_quantization,
        feature_set=fs,
        timing=timing,
    )
    report["timing_s"]["total_s"] = round(time.perf_counter() - t_start, 3)
    report = {
        "command": "OMP_NUM_THREADS=1 python -m models.train --out-dir "
        f"{out_dir} --events {events} --seed {seed} --label-horizon-ms "
        f"{label.horizon_ms:g} --label-k {label.k:g} --hidden "
        f"{','.join(map(str, hidden)) or 0} --train-seed {train_seed} "
        f"--input-clip {input_clip or 0:g}",
        **report,
    }
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return report


# --------------------------------------------------------------------------- tickscore train
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def int8_path_for(out: str | Path) -> Path:
    """Return where ``tickscore train --out MODEL.onnx`` writes the int8 model (``MODEL.int8.onnx``)."""
    out = Path(out)
    return out.with_name(out.stem + ".int8" + (out.suffix or ".onnx"))


def report_path_for(out: str | Path) -> Path:
    """Return where ``tickscore train --out MODEL.onnx`` writes its report (``MODEL.train.json``)."""
    out = Path(out)
    return out.with_name(out.stem + ".train.json")


def parse_hidden(text: str) -> tuple[int, ...]:
    """Return hidden widths from ``"32,16"``; ``"0"`` or ``""`` = logistic regression."""
    try:
        widths = tuple(int(h) for h in str(text).split(",") if h.strip())
    except ValueError:
        raise ValueError(
            f"--hidden takes comma-separated widths like 32,16 (0 = logistic), got {text!r}"
        ) from None
    if any(w < 0 for w in widths):
        raise ValueError(f"--hidden widths must be >= 0, got {text!r}")
    return tuple(w for w in widths if w > 0)


#: Default label per event shape: horizon (ms) and k (the large-move threshold in sigma_H).
SHAPE_LABELS: dict[str, LabelSpec] = {
    "l1": LabelSpec(),
    "trades": LabelSpec(horizon_ms=5_000.0, k=2.0),
    "l3": LabelSpec(horizon_ms=500.0, k=2.0),
}


def train_file(
    data: str | Path | None,
    out: str | Path,
    *,
    label: LabelSpec | None = None,
    hidden: tuple[int, ...] = DEFAULT_HIDDEN,
    seed: int = DEFAULT_TRAIN_SEED,
    input_clip: float | None = DEFAULT_INPUT_CLIP,
    activation_type: str = "uint8",
    calibrate_method: str = "minmax",
    feature_set: Any = None,
    mapping: Any = None,
    shape: str | None = None,
    sort_by_exchange_time: bool = False,
    chunk_rows: int | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
) -> dict[str, Any]:
    """Train on a tick file of any shape; write ``out`` (fp32), its int8 QDQ twin and a JSON report.

    ``data`` None = the embedded dataset.  The file is read chunk by chunk as
    the replay reads a big file (``mapping``, ``shape``, ``sort_by_exchange_time``,
    ``chunk_rows``) into a dataset of at most ``max_rows`` usable rows
    (:func:`models.dataset.dataset_from_file`: memory bounded whatever the
    file's size); the feature set is ``feature_set`` or the shape's default,
    the label ``label`` or the shape's (:data:`SHAPE_LABELS`).  Returns the
    report (also written to :func:`report_path_for`); paths of the files are
    under ``"files"``.
    """
    t_start = time.perf_counter()
    path = Path(data) if data is not None else default_data_path()
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"--out must name an .onnx file, got {out}")
    shp = resolve_shape(path, mapping, shape)
    fs = feature_set if feature_set is not None else DEFAULT_BY_SHAPE[shp]
    label = label if label is not None else SHAPE_LABELS[fs.name]
    fd = dataset_from_file(path, label, fs, mapping=mapping, shape=shp, chunk_rows=chunk_rows, seed=seed,
                           sort_by_exchange_time=sort_by_exchange_time, max_rows=max_rows)  # fmt: skip
    ds, timing = fd.dataset, fd.timing
    data_info: dict[str, Any] = {"data_file": path.name, "data_sha256": _file_digest(path),
                                 "n_events": int(fd.rows_read), "shape": shp}  # fmt: skip
    if mapping is not None:
        data_info["mapping"] = mapping.keys
    out.parent.mkdir(parents=True, exist_ok=True)
    out8 = int8_path_for(out)
    report = train_on_dataset(
        ds, out, out8,
        data_info=data_info, label=label, hidden=hidden, train_seed=seed, input_clip=input_clip,
        activation_type=activation_type, calibrate_method=calibrate_method, feature_set=fs,
        timing=timing,
    )
    report["timing_s"]["total_s"] = round(time.perf_counter() - t_start, 3)
    rpath = report_path_for(out)
    report = {
        "command": f"tickscore train --data {path} --out {out} --shape {shp} --label-horizon-ms "
        f"{label.horizon_ms:g} --label-k {label.k:g} --hidden {','.join(map(str, hidden)) or 0} "
        f"--seed {seed}" + (f" --max-rows {max_rows or 0}" if max_rows != DEFAULT_MAX_ROWS else ""),
        "files": {"fp32": str(out), "int8": str(out8), "report": str(rpath)},
        **report,
    }
    rpath.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the training CLI (``python -m models.train``)."""
    ap = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "default")
    ap.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    ap.add_argument("--seed", type=int, default=DEFAULT_DATA_SEED, help="generator seed")
    ap.add_argument("--label-horizon-ms", type=float, default=LabelSpec().horizon_ms)
    ap.add_argument("--label-k", type=float, default=LabelSpec().k)
    ap.add_argument(
        "--hidden",
        default=",".join(map(str, DEFAULT_HIDDEN)),
        help="hidden widths, e.g. 16,8; 0 = logistic regression",
    )
    ap.add_argument("--train-seed", type=int, default=DEFAULT_TRAIN_SEED)
    ap.add_argument(
        "--input-clip",
        type=float,
        default=DEFAULT_INPUT_CLIP,
        help="clip of the standardised input in std units; 0 = none",
    )
    ap.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8")
    ap.add_argument("--calibrate-method", choices=("minmax", "percentile", "entropy"), default="minmax")
    args = ap.parse_args(argv)
    hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip() and int(h) > 0)
    label = LabelSpec(horizon_ms=args.label_horizon_ms, k=args.label_k)
    report = train_default(
        args.out_dir,
        events=args.events,
        seed=args.seed,
        label=label,
        hidden=hidden,
        train_seed=args.train_seed,
        input_clip=args.input_clip or None,
        activation_type=args.activation_type,
        calibrate_method=args.calibrate_method,
    )
    summary = {
        "positive_rate": report["positive_rate"],
        "fp32_test": report["fp32"]["test"],
        "int8_test": report["int8"]["test"],
        "int8_max_abs_diff_vs_fp32": report["int8"]["max_abs_diff_vs_fp32"],
        "timing_s": report["timing_s"],
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
