"""Tensor shapes for passes that need them: onnx's shape inference first, then, for the tensors it
leaves unknown (ops from ai.onnx.ml or custom domains, data-dependent shapes), shapes observed in
onnxruntime on two synthetic feeds that differ in every named input dim (batch 1 and 2, the others
32 and 64), so that a dim that follows one of them (a sequence, an image's width) is recorded as
dynamic rather than as the value seen once."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from .activations import with_extra_outputs
from .calibration import SyntheticInputs, model_inputs
from .errors import OnnxsparseError, RequirementError
from .runtime import make_session

log = logging.getLogger(__name__)


def infer_shapes(model: onnx.ModelProto, label: str = "model") -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph value_info holds a shape for every tensor it can."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as error:  # noqa: BLE001 - onnx raises several types
        message = " ".join(str(error).split())
        raise RequirementError(f"{label}: shape inference fails: {message}") from error
    missing = _names_without_shape(inferred)
    if missing:
        log.info("%d tensor shapes unknown to onnx shape inference; observing them in onnxruntime", len(missing))
        _observe_shapes(inferred, missing, label)
    return inferred


def _names_without_shape(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    known = {v.name for v in [*graph.value_info, *graph.input, *graph.output] if _has_shape(v)}
    known.update(t.name for t in graph.initializer)
    names: list[str] = []
    for node in graph.node:
        names.extend(name for name in node.output if name and name not in known)
    return names


def _has_shape(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape")


def _observe_shapes(model: onnx.ModelProto, names: list[str], label: str) -> None:
    session = make_session(with_extra_outputs(model, names), f"{label} (shape probe)")

    def outputs_at(dims: dict[str, int]) -> list[np.ndarray]:
        feeds = SyntheticInputs(model, samples=1, seed=0, dims=dims)
        return [np.asarray(o) for o in session.run(names, next(iter(feeds.feeds())))]

    try:
        observed = [outputs_at(_probe_dims(model, 1))]
        try:
            observed.append(outputs_at(_probe_dims(model, 2)))
        except Exception:  # noqa: BLE001 - a model whose other dims cannot move (a fixed-length position table): the batch alone
            observed.append(outputs_at(_probe_dims(model, 2, batch_only=True)))
    except Exception as error:  # noqa: BLE001 - synthetic values a model does not accept (token ids past its table)
        raise RequirementError(f"{label}: shapes onnx cannot infer could not be observed on synthetic inputs: "
                               f"{' '.join(str(error).split())[:200]}") from error
    by_name = {v.name: v for v in model.graph.value_info}
    for name, first, second in zip(names, observed[0], observed[1]):
        if not isinstance(first, np.ndarray) or first.dtype == object or first.ndim != second.ndim:
            continue
        dims = [a if a == b else None for a, b in zip(first.shape, second.shape)]
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(first.dtype)
        value = onnx.helper.make_tensor_value_info(name, elem_type, [d if d is not None else f"dyn_{name}_{i}" for i, d in enumerate(dims)])
        if name in by_name:
            by_name[name].CopyFrom(value)
        else:
            model.graph.value_info.append(value)


def _probe_dims(model: onnx.ModelProto, scale: int, *, batch_only: bool = False) -> dict[str, int]:
    """Named input dims at ``scale`` times SyntheticInputs' defaults (1 for a leading dim, 32 for the
    others; PP-OCR's line width recorded its 4 time steps as static before the others moved too);
    unnamed ones keep the defaults. ``batch_only``: only the leading dims move."""
    dims: dict[str, int] = {}
    for model_input in model_inputs(model):
        for axis, dim in enumerate(model_input.shape or ()):
            if isinstance(dim, str) and (axis == 0 or not batch_only):
                dims.setdefault(dim, scale * (1 if axis == 0 else 32))
    return dims


def shapes_where_known(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the shapes and element types that can be had, for passes that do better with
    them but can do without: onnx's inference completed in onnxruntime (:func:`infer_shapes`); plain
    non-strict inference if that fails; the model as it is if onnx cannot type it at all."""
    try:
        return infer_shapes(model)
    except OnnxsparseError:
        log.info("shape inference failed; going on with the shapes onnx can infer without it")
        try:
            return onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - a model onnx cannot type at all: work with what is known
            return model
