"""A ready-made onnxsparse ``--metric`` for YOLOv8-style detectors (the ``detector`` real model, or any
ultralytics YOLOv8 export with one output [batch, 4 + classes, anchors]):

    onnxsparse optimize model.onnx -o model_int8.onnx -p qdq --calibration calibration.npz \\
        --metric tools/realmodels/detection_metric.py:matched_detections

``matched_detections`` decodes the original's and the candidate's outputs the same way (best class
probability >= 0.25, class-wise NMS at IoU 0.5; ``metrics.yolo_detections``) and returns the share of
the original's detections that the candidate still finds (same class, IoU >= 0.5, one to one), and
whether that share is at least ``BUDGET``. The original's detections are the truth: no labels needed.
Only numpy: onnxsparse loads this file by path into its own process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

try:
    from . import metrics
except ImportError:  # loaded by path (onnxsparse --metric FILE.py:function): no parent package
    import importlib.util
    import sys
    from pathlib import Path

    _NAME = "onnxsparse_user_metric_realmodels_metrics"
    metrics = sys.modules.get(_NAME)  # type: ignore[assignment]
    if metrics is None:
        _spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).resolve().with_name("metrics.py"))
        assert _spec is not None and _spec.loader is not None
        metrics = importlib.util.module_from_spec(_spec)  # type: ignore[assignment]
        sys.modules[_NAME] = metrics  # NamedTuple looks its module up there
        _spec.loader.exec_module(metrics)  # type: ignore[union-attr]

BUDGET = 0.99  # within budget: the candidate keeps at least 99 % of the original's detections


def _output(outputs: Mapping[str, Any]) -> np.ndarray:
    """The detection output of one feed: ``output0`` (ultralytics' name), else the only output."""
    if "output0" in outputs:
        return np.asarray(outputs["output0"])
    if len(outputs) == 1:
        return np.asarray(next(iter(outputs.values())))
    raise KeyError(f"no output named 'output0' among {sorted(outputs)}")


def matched_detections(reference: Sequence[Mapping[str, Any]], candidate: Sequence[Mapping[str, Any]],
                       inputs: Sequence[Mapping[str, Any]]) -> tuple[float, bool]:
    """(share of the original's detections the candidate keeps, share >= BUDGET); the inputs are
    not needed (the original's detections are the reference)."""
    del inputs
    reference_found = [d for outputs in reference for d in metrics.yolo_detections(_output(outputs))]
    candidate_found = [d for outputs in candidate for d in metrics.yolo_detections(_output(outputs))]
    kept = metrics.detections_kept(reference_found, candidate_found)
    return kept, kept >= BUDGET
