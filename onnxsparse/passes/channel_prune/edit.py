"""The edits: a pruned copy of the model (with compensated readers), re-inferred shapes, size figures, and the
least-squares refit of the layers that read removed channels."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...channels import Analysis, analyze, apply_plan
from ...graph import constant_value, from_gs, overridable_initializers, to_gs, unique_name
from ...inspect_model import count_macs, summarize
from ...layerwise import add_output_shift, compensated_removal
from ...refit import layers_from, refit_layers
from ..base import PassContext, PassResult
from .groups import Group, Unit

log = logging.getLogger(__name__)


def pruned_copy(model: onnx.ModelProto, roots: list[int], compensations: Mapping[str, Compensation] | None = None) -> onnx.ModelProto:
    """The model with the given root channels removed (analysed afresh: edits hold graph nodes), the
    readers named in ``compensations`` (by first output) given their compensated weights first."""
    graph = to_gs(model)
    for node in list(graph.nodes):  # a MatMul's shift appends an Add
        if node.outputs and node.outputs[0].name in (compensations or {}):
            index, weight, shift = compensations[node.outputs[0].name]  # type: ignore[index]
            dtype = constant_value(node.inputs[index]).dtype  # type: ignore[union-attr]
            node.inputs[index] = gs.Constant(unique_name(graph, f"{node.inputs[index].name}_compensated"), weight.astype(dtype))
            add_output_shift(graph, node, shift)
    if compensations:
        graph.toposort()  # the analysis walks nodes in order
    analysis = analyze(graph, overridable_initializers(model))
    removed = np.zeros(len(analysis.parent), dtype=bool)
    removed[roots] = True
    apply_plan(graph, analysis, removed)
    graph.cleanup().toposort()
    return from_gs(graph, like=model)


# A reader's weight index, its compensated weight and the shift of its output.
Compensation = tuple[int, np.ndarray, np.ndarray]


def compensated_readers(group: Group, removed: list[Unit]) -> dict[str, Compensation]:
    """For each layer reading ``group``, keyed by its first output: its weight with ``removed`` taken
    out of its input and made up for by the other inputs (:func:`compensated_removal`), still holding the
    removed positions (zero), and what the constant input's column adds to its output."""
    slots = [group.slots[id(unit)] for unit in removed if id(unit) in group.slots]
    compensations = {}
    for reader in group.readers:
        positions = reader.layer.positions[slots]
        positions = positions[positions >= 0]
        if not positions.size:
            continue
        weight = compensated_removal(reader.layer, positions)  # [rows, inputs + 1]
        shape = reader.weight_shape
        moved = (shape[reader.axis], *(d for a, d in enumerate(shape) if a != reader.axis))
        restored = np.moveaxis(weight[:, :-1].T.reshape(moved), 0, reader.axis)
        outputs = shape[0] if len(shape) > 2 else weight.shape[0]  # a conv's rows are (output, tap) pairs
        if weight.shape[0] % outputs:
            continue
        shift = reader.alpha * weight[:, -1].reshape(outputs, -1).sum(axis=1)
        compensations[reader.output] = (reader.weight_index, restored, shift)
    return compensations


def reinfer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes inferred again after the plan (value_info of pruned tensors was dropped)."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the checker that follows reports real problems
        log.debug("shape inference after channel removal failed", exc_info=True)
        return model


def size_figures(before: onnx.ModelProto, after: onnx.ModelProto, macs_before: int | None) -> dict[str, int | float]:
    params_before = summarize(before, with_tensors=False).parameters
    params_after = summarize(after, with_tensors=False).parameters
    macs_after = count_macs(after)
    figures: dict[str, int | float] = {"parameters_before": params_before, "parameters_after": params_after}
    if macs_before is not None and macs_after is not None:
        figures.update(macs_before=macs_before, macs_after=macs_after, macs_ratio=round(macs_after / max(macs_before, 1), 4))
    return figures


def refit_consumers(original: onnx.ModelProto, pruned: onnx.ModelProto, analysis: Analysis, removed: np.ndarray,
                    context: PassContext, samples: int, result: PassResult, strength: float | Literal["auto"], downstream: bool = False) -> onnx.ModelProto:
    consumers = [use.node.name for use in analysis.consumers if removed[use.roots].any()]
    names = layers_from(pruned, consumers) if downstream else consumers
    kept = {name: (space.axis, ~removed[space.roots]) for name, space in analysis.spaces.items()}
    return refit_layers(original, pruned, names, context.calibration, samples, result, strength, kept)  # type: ignore[arg-type]
