"""onnxruntime's own quantizer as reference points on the tuner's frontier (never chosen): what a user
gets from ``quantize_dynamic`` and ``quantize_static`` (QDQ, uint8 activations, int8 per-channel
weights) with the same calibration data, validated and timed like every candidate."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..calibration import RUN_SAMPLES, InputSource, in_chunks, sample_axis

log = logging.getLogger(__name__)

QUANTIZE_DYNAMIC, QUANTIZE_STATIC = "onnxruntime quantize_dynamic", "onnxruntime quantize_static"


class _Reader:
    """onnxruntime's CalibrationDataReader over our calibration source: the model's inputs only (a
    .npz may hold labels for a task metric too), a file of many samples cut into runs of a few
    (onnxruntime runs each as one batch, every activation of it held: MobileNetV2's 384 images as one
    batch took 20.5 GB)."""

    def __init__(self, source: InputSource, model: onnx.ModelProto) -> None:
        names = {i.name for i in model.graph.input}
        batched = sample_axis(model)
        self._feeds: Iterator[dict[str, np.ndarray]] = (
            {k: v for k, v in chunk.items() if k in names} for feed in source.feeds() for chunk in in_chunks(dict(feed), batched, RUN_SAMPLES))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # onnxruntime's readers may be asked to start again; ours are read once
        pass


def quantize_with_onnxruntime(kind: str, model: Path, output: Path, calibration: InputSource | None, external_data: bool) -> str:
    """Write ``model`` quantized by onnxruntime's tool to ``output``; return why it could not ("" when
    it did). onnxruntime raises several private exception types, and fails on some real models
    (weights in Constant nodes, opset 12): every failure is a reason, not an error of ours."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    started = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process, logged on the root logger, is not for our user
    try:
        if kind == QUANTIZE_DYNAMIC:
            quantize_dynamic(str(model), str(output), weight_type=QuantType.QInt8, use_external_data_format=external_data)
        else:
            assert calibration is not None
            reader = _Reader(calibration, onnx.load(str(model), load_external_data=False))
            quantize_static(str(model), str(output), reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True, use_external_data_format=external_data)
        onnx.checker.check_model(str(output))
    except Exception as error:  # noqa: BLE001 - see above
        root.setLevel(level)
        text = " ".join(str(error).split())[:300] or type(error).__name__
        log.info("tune: %s failed: %s", kind, text)
        return f"{kind} failed: {text}"
    finally:
        root.setLevel(level)
    log.info("tune: %s wrote %s in %.1f s", kind, output, time.perf_counter() - started)
    return ""


def peer_kinds(model: onnx.ModelProto, *, calibration: bool) -> list[str]:
    """Which of onnxruntime's tools apply: dynamic to MatMul/Gemm models, static with calibration data."""
    ops: set[Any] = {node.op_type for node in model.graph.node}
    kinds = [QUANTIZE_DYNAMIC] if ops & {"MatMul", "Gemm"} else []
    if calibration and ops & {"Conv", "MatMul", "Gemm"}:
        kinds.append(QUANTIZE_STATIC)
    return kinds
