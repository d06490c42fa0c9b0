"""``tickscore evaluate``: models side by side on the held-out test period.

For a tick file and one or more model files this computes, per model, on the
test period of the data (the same time split as training: the last 20 % of the
event-time span after a gap of the label horizon, usable rows only):

* AUC, log-loss, Brier score, positive rate, mean score;
* calibration: 10 equal-width reliability bins (mean score, observed rate,
  count) and the expected calibration error (count-weighted |score - rate|);
* agreement of every int8 model with its fp32 twin (same training metadata;
  else with the first fp32 model given): max / mean / p99.9 |score difference|;
* fused backend vs onnxruntime on the same rows (supported graphs only);
* per-call latency of each backend, one row per call (ort ``run()``; fused
  ``run()`` = model only, and ``tick`` = features + model in one call),
  p50 / p99 / p99.9 in microseconds.

Labels follow each model's own label definition (from its metadata), so models
trained with different horizons are each scored against their own target.
When the file is the one a model was trained on (same SHA-256 prefix as in its
metadata), the test period is exactly the one held out in training.
``--out DIR`` writes ``evaluation.json`` and ``evaluation.png`` (ROC curves and
reliability diagrams).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.schema import N_REJECT_REASONS
from features.featureset import get_feature_set
from features.registry import kernels_for
from models.dataset import DEFAULT_MAX_ROWS, SPLIT_FRACTIONS, dataset_from_file, time_split
from models.fused import FusedBackend
from models.label import LabelSpec
from models.metadata import QUANT_FP32, ModelMetadata, read_metadata
from models.ort_backend import OrtBackend
from models.program import UnsupportedGraph
from models.train import _file_digest, binary_metrics
from replay.generator import default_data_path
from replay.reader import read_ticks, resolve_shape

__all__ = ["evaluate", "reliability", "format_table"]

N_BINS = 10


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> dict[str, Any]:
    """Return equal-width reliability bins of scores ``p`` for labels ``y`` and the ECE."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    idx = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    s_sum = np.bincount(idx, weights=p, minlength=n_bins)
    y_sum = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.where(count > 0, s_sum / np.maximum(count, 1), np.nan)
        rate = np.where(count > 0, y_sum / np.maximum(count, 1), np.nan)
    ece = float(np.nansum(count * np.abs(mean_score - rate)) / max(count.sum(), 1))
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.tolist(),
        "mean_score": [None if np.isnan(v) else float(v) for v in mean_score],
        "observed_rate": [None if np.isnan(v) else float(v) for v in rate],
        "ece": ece,
    }


def _latency(fn, n: int) -> dict[str, float]:
    clock = time.perf_counter_ns
    for _ in range(min(n, 2000)):
        fn()
    t = np.empty(n, dtype=np.int64)
    for j in range(n):
        t0 = clock()
        fn()
        t[j] = clock() - t0
    p50, p99, p999 = np.percentile(t, [50, 99, 99.9])
    return {"p50_us": p50 / 1e3, "p99_us": p99 / 1e3, "p999_us": p999 / 1e3, "calls": n}


def _tick_latency(backend, ticks: np.ndarray, fs: Any, n: int) -> dict[str, float]:
    """Per-call latency of the fused tick (features + model) over the first ``n`` ticks."""
    kern = kernels_for(fs)
    n = min(n, len(ticks))
    n_inst = int(ticks["instrument"].max()) + 1
    fstate, istate = kern.new_state(n_inst)
    counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
    tick, tctx = backend.make_tick(fstate, istate, fs.params_array(), counters, ticks)
    ctx = tctx.addr
    clock = time.perf_counter_ns
    t = np.empty(n, dtype=np.int64)
    for i in range(min(n, 2000)):  # compile / warm
        tick(i, ctx)
    fstate[...], istate[...] = kern.new_state(n_inst)  # replay from a fresh state
    for i in range(n):
        t0 = clock()
        tick(i, ctx)
        t[i] = clock() - t0
    p50, p99, p999 = np.percentile(t, [50, 99, 99.9])
    return {"p50_us": p50 / 1e3, "p99_us": p99 / 1e3, "p999_us": p999 / 1e3, "calls": n}


@dataclass
class _Model:
    path: Path
    meta: ModelMetadata
    scores: np.ndarray | None = None


def _twin_key(m: ModelMetadata) -> str:
    return json.dumps([m.feature_set_id, m.label, m.train_range, m.seed], sort_keys=True)


def evaluate(
    data: str | Path | None,
    models: list[str | Path],
    *,
    latency_calls: int = 20_000,
    parity: bool = True,
    mapping: Any = None,
    shape: str | None = None,
    sort_by_exchange_time: bool = False,
    label: LabelSpec | None = None,
    chunk_rows: int | None = None,
    max_rows: int | None = None,
) -> dict[str, Any]:
    """Return the evaluation of ``models`` on the test period of ``data`` (see module doc).

    The file is read chunk by chunk (:func:`models.dataset.dataset_from_file`);
    ``max_rows`` bounds the usable rows kept (a uniform sample beyond it;
    None = :data:`models.dataset.DEFAULT_MAX_ROWS`, 0 = all).

    ``data`` None = the embedded dataset, read as the replay reads it
    (``mapping``, ``shape``: default the first model's, ``sort_by_exchange_time``).
    Every model must use a registered feature set; ``label`` is the target of
    models whose metadata has none (an adopted model), which are refused without it.
    """
    if not models:
        raise ValueError("give at least one model file")
    path = Path(data) if data is not None else default_data_path()
    ms = [_Model(Path(p), read_metadata(p)) for p in models]
    if shape is None and (mapping is None or mapping.shape is None):
        shape = ms[0].meta.feature_set_id.split(".", 1)[0]
    shape = resolve_shape(path, mapping, shape)
    read = {"mapping": mapping, "shape": shape, "sort_by_exchange_time": sort_by_exchange_time}
    max_rows = DEFAULT_MAX_ROWS if max_rows is None else (max_rows or None)
    first: np.ndarray | None = None  # the first ticks, replayed for the fused tick's latency
    digest = _file_digest(path)
    label_override = label
    rows_read = 0

    datasets: dict[tuple[str, str], Any] = {}
    results: list[dict[str, Any]] = []
    test_rows: dict[tuple[str, str], np.ndarray] = {}
    for m in ms:
        fs = _feature_set(m.meta)
        label = _label_of(m.meta, m.path, label_override)
        key = (fs.id, json.dumps(label.to_dict(), sort_keys=True))
        if key not in datasets:
            fd = dataset_from_file(path, label, fs, chunk_rows=chunk_rows, max_rows=max_rows, **read)
            ds, rows_read = fd.dataset, fd.rows_read
            split = time_split(ds.ts, np.ones(ds.ts.shape, dtype=bool), int(label.horizon_ms * 1_000_000),
                               SPLIT_FRACTIONS, span=ds.span)  # fmt: skip
            datasets[key] = (ds, split)
            test_rows[key] = np.flatnonzero(split.test)
        ds, split = datasets[key]
        X = ds.X[split.test]
        y = ds.y[split.test].astype(np.int64)
        ob = OrtBackend(m.path, fs)
        m.scores = ob.score_batch(X).astype(np.float64)
        row: dict[str, Any] = {
            "model": str(m.path),
            "version": m.meta.model_version,
            "quantization": m.meta.quantization,
            "feature_set_id": fs.id,
            "label": label.to_dict(),
            "trained_on_this_data": m.meta.train_range.get("data_sha256") == digest,
            "test_period_ts_ns": split.ranges["test"],
            "test_rows": int(X.shape[0]),
            "sampled": f"{ds.rows['kept']:,} of {ds.rows['usable']:,} usable rows" if ds.sampled else None,
        }
        if y.size and y.min() != y.max():
            row.update(binary_metrics(y, m.scores))
        else:
            row.update({"n": int(y.size), "auc": None, "log_loss": None, "brier": None})
        row["calibration"] = reliability(y, m.scores)
        row["roc"] = _roc_points(y, m.scores)
        row["_key"] = key
        lat: dict[str, Any] = {"ort_run": _latency(ob.run, latency_calls)}
        try:
            fb = FusedBackend(m.path, fs)
        except UnsupportedGraph as exc:
            row["fused"] = {"supported": False, "reason": str(exc)}
        else:
            row["fused"] = {"supported": True, "lowering": fb.program.lowering}
            if parity:
                d = np.abs(fb.program.score_rows(X) - m.scores)
                row["fused"]["max_abs_diff_vs_ort"] = float(d.max()) if d.size else 0.0
                row["fused"]["out_step"] = fb.program.out_step
            lat["fused_run"] = _latency(fb.run, latency_calls)
            if first is None:
                first = read_ticks(path, max_rows=max(latency_calls, 1), **read).ticks
            lat["fused_tick"] = _tick_latency(fb, first, fs, latency_calls)
        row["latency"] = lat
        results.append(row)

    # int8 vs fp32 agreement (on the rows both were evaluated on).
    fp32 = [(i, m) for i, m in enumerate(ms) if m.meta.quantization == QUANT_FP32]
    for i, m in enumerate(ms):
        if m.meta.quantization == QUANT_FP32 or not fp32:
            continue
        twin = next((j for j, f in fp32 if _twin_key(f.meta) == _twin_key(m.meta)), fp32[0][0])
        if results[twin]["_key"] != results[i]["_key"]:
            continue
        d = np.abs(m.scores - ms[twin].scores)
        results[i]["agreement_vs_fp32"] = {
            "fp32_model": str(ms[twin].path),
            "twin": _twin_key(ms[twin].meta) == _twin_key(m.meta),
            "max_abs_diff": float(d.max()) if d.size else 0.0,
            "mean_abs_diff": float(d.mean()) if d.size else 0.0,
            "p999_abs_diff": float(np.quantile(d, 0.999)) if d.size else 0.0,
            "auc_minus_fp32": (
                results[i]["auc"] - results[twin]["auc"]
                if results[i].get("auc") is not None and results[twin].get("auc") is not None
                else None
            ),
        }
    for r in results:
        r.pop("_key")
    return {
        "data": {"path": str(path), "rows": int(rows_read), "sha256": digest},
        "split": {"fractions": list(SPLIT_FRACTIONS), "gap": "label horizon"},
        "models": results,
    }


def _feature_set(meta: ModelMetadata) -> Any:
    """Return the registered feature set of a model."""
    try:
        return get_feature_set(meta.feature_set_id)
    except KeyError as exc:
        raise ValueError(f"model needs an unknown feature set: {exc}") from None


def _label_of(meta: ModelMetadata, path: Path, override: LabelSpec | None = None) -> LabelSpec:
    """Return the model's label; a model without a full label definition needs ``override``."""
    fields = LabelSpec.__dataclass_fields__
    lab = meta.label or {}
    if "horizon_ms" not in lab or "k" not in lab or lab.get("known") is False:
        if override is None:
            raise ValueError(
                f"{path}: the model's metadata has no label definition (horizon_ms, k), so its "
                "target is unknown; give the label it predicts: --label-horizon-ms H --label-k K"
            )
        return override
    return LabelSpec(**{k: float(v) for k, v in lab.items() if k in fields})


def _roc_points(y: np.ndarray, p: np.ndarray, max_points: int = 200) -> dict[str, list[float]]:
    if y.size == 0 or y.min() == y.max():
        return {"fpr": [], "tpr": []}
    from sklearn.metrics import roc_curve  # deferred: training-only dependency

    fpr, tpr, _ = roc_curve(y, p)
    if fpr.size > max_points:
        k = np.linspace(0, fpr.size - 1, max_points).astype(np.int64)
        fpr, tpr = fpr[k], tpr[k]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def format_table(res: dict[str, Any]) -> str:
    """Return the side-by-side table (one column per model)."""
    ms = res["models"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    names = [Path(m["model"]).name for m in ms]
    w = max(14, *(len(n) for n in names))
    rows: list[tuple[str, list[str]]] = [
        ("quantization", [m["quantization"] for m in ms]),
        ("test rows", [f"{m['test_rows']:,}" for m in ms]),
        ("positive rate", [f(m.get("positive_rate"), ".4f") for m in ms]),
        ("AUC", [f(m.get("auc"), ".4f") for m in ms]),
        ("log-loss", [f(m.get("log_loss"), ".4f") for m in ms]),
        ("Brier", [f(m.get("brier"), ".5f") for m in ms]),
        ("calibration ECE", [f(m["calibration"]["ece"], ".4f") for m in ms]),
    ]
    agree = [m.get("agreement_vs_fp32") for m in ms]
    def mark(a):
        return "" if not a or a["twin"] else "*"

    rows += [
        ("vs fp32 max|d|", [f(a and a["max_abs_diff"], ".4f") + mark(a) for a in agree]),
        ("vs fp32 mean|d|", [f(a and a["mean_abs_diff"], ".5f") for a in agree]),
        ("AUC - fp32", [f(a and a["auc_minus_fp32"], "+.4f") for a in agree]),
        ("fused vs ort", [f(m["fused"].get("max_abs_diff_vs_ort"), ".2g") if m["fused"]["supported"]
                          else "unsupported" for m in ms]),
    ]
    for key, label in (("ort_run", "ort"), ("fused_run", "fused model"), ("fused_tick", "fused tick")):
        rows.append((f"{label} p50 us", [f(m["latency"].get(key, {}).get("p50_us"), ".2f") for m in ms]))
        rows.append((f"{label} p99 us", [f(m["latency"].get(key, {}).get("p99_us"), ".2f") for m in ms]))
    lines = [f"{'':<18}" + "".join(f"{n:>{w + 2}}" for n in names)]
    lines += [f"{k:<18}" + "".join(f"{v:>{w + 2}}" for v in vals) for k, vals in rows]
    if any(a and not a["twin"] for a in agree):
        lines.append("  * compared with the first fp32 model given, not a twin trained on the same run")
    lines.append("")
    lines.append("reliability (bin: mean score / observed rate / count)")
    for m, n in zip(ms, names, strict=True):
        c = m["calibration"]
        cells = zip(c["mean_score"], c["observed_rate"], c["count"], strict=True)
        bins = [f"{s:.2f}/{r:.2f}/{k}" for s, r, k in cells if k]
        lines.append(f"  {n}: " + "  ".join(bins))
    return "\n".join(lines)


def plot(res: dict[str, Any], path: str | Path) -> Path:
    """Write ROC curves and reliability diagrams of every model to ``path`` (PNG)."""
    import matplotlib  # deferred: matplotlib only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib only when a plot is drawn

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
    for m in res["models"]:
        name = f"{Path(m['model']).name} (AUC {m['auc']:.3f})" if m.get("auc") else Path(m["model"]).name
        ax1.plot(m["roc"]["fpr"], m["roc"]["tpr"], label=name)
        c = m["calibration"]
        xs = [s for s, k in zip(c["mean_score"], c["count"], strict=True) if k]
        ys = [r for r, k in zip(c["observed_rate"], c["count"], strict=True) if k]
        ax2.plot(xs, ys, marker="o", label=f"{Path(m['model']).name} (ECE {c['ece']:.3f})")
    ax1.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test period")
    ax2.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax2.set(xlabel="mean predicted score", ylabel="observed positive rate", title="reliability",
            xlim=(0, 1), ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.legend(fontsize=7, loc="lower right" if ax is ax1 else "upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
