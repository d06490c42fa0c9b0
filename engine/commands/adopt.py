"""``tickscore adopt``: bring an external ONNX model into tickscore."""

from __future__ import annotations

import json
from typing import Any

from models.adopt import adopt
from models.label import LabelSpec


def register(sub) -> None:
    """Register the command's parser(s) on the ``tickscore`` subparsers."""
    a = sub.add_parser(
        "adopt",
        help="make an external ONNX classifier (sklearn, LightGBM, XGBoost, PyTorch) a tickscore model",
        description="Check the input width against a feature set, wrap the positive-class probability "
        "as the single output 'score', stamp the metadata (feature set, label, provenance), verify it "
        "on feature vectors of a data file, optionally quantize it to int8.",
    )
    a.add_argument("model", metavar="EXTERNAL.onnx", help="the exported model (one float input [N, F])")
    a.add_argument("--feature-set", required=True, metavar="SHAPE|ID",
                   help="the features the model was fitted on: l1, trades, l3 (the default sets) or a "
                        "feature-set id")
    a.add_argument("--out", required=True, metavar="MODEL.onnx", help="the tickscore model to write")
    a.add_argument("--positive-class", type=int, default=1, metavar="C",
                   help="column of the probability output that is the positive class (default 1)")
    a.add_argument("--label-horizon-ms", type=float, default=None, metavar="H",
                   help="the label the model predicts: a large move within H ms ...")
    a.add_argument("--label-k", type=float, default=None, metavar="K",
                   help="... of more than K sigma_H (both, or neither: then the label is unknown and "
                        "evaluate needs them as flags)")
    a.add_argument("--data", default=None, help="file whose feature vectors verify (and calibrate) the "
                   "model (default: the project's data of the shape)")
    a.add_argument("--int8", action="store_true", help="also write MODEL.int8.onnx (static int8 QDQ)")
    a.set_defaults(handler=cmd_adopt)


def cmd_adopt(args: Any) -> int:
    """Run ``tickscore adopt``."""
    if (args.label_horizon_ms is None) != (args.label_k is None):
        raise ValueError("give both --label-horizon-ms and --label-k, or neither")
    label = None
    if args.label_horizon_ms is not None:
        label = LabelSpec(horizon_ms=args.label_horizon_ms, k=args.label_k).to_dict()
    rep = adopt(args.model, args.out, args.feature_set, positive_class=args.positive_class, label=label,
                data=args.data, int8=args.int8)  # fmt: skip
    print(json.dumps(rep, indent=2))
    return 0
