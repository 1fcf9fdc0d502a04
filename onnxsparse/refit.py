"""Recovery without training: refit a layer's weights by least squares so that, fed the pruned
model's activations, it reproduces the ORIGINAL model's output of that layer (a layer-wise
distillation in closed form). Layers are refit in graph order, each on the activations of the
model with every earlier refit applied, and the normal equations are accumulated feed by feed, so
memory does not grow with the calibration set."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .activations import tensor_values
from .calibration import InputSource
from .graph import from_gs, to_gs
from .layerwise import activation_name, add_output_shift, from_matrix, input_rows, to_matrix, unsupported_reason
from .passes.base import Change, PassResult, Skip
from .weights import WeightSite, find_weights, replace_weight

log = logging.getLogger(__name__)



def layers_from(model: onnx.ModelProto, first_names: list[str]) -> list[str]:
    """The Conv/Gemm/MatMul nodes of the main graph from the first of ``first_names`` on, in graph order."""
    wanted = set(first_names)
    names: list[str] = []
    for node in model.graph.node:
        if names or node.name in wanted:
            if node.op_type in ("Conv", "Gemm", "MatMul"):
                names.append(node.name)
    return names


# Which channels of an original tensor survive in the pruned model: tensor name -> (axis, kept mask).
KeptChannels = Mapping[str, tuple[int, np.ndarray]]


def refit_layers(original: onnx.ModelProto, pruned: onnx.ModelProto, node_names: list[str],
                 source: InputSource, samples: int, result: PassResult, strength: float = 0.1,
                 kept: KeptChannels | None = None) -> onnx.ModelProto:
    """Refit the named Conv/Gemm/MatMul nodes of ``pruned`` toward ``original``'s outputs (restricted
    to the channels that ``kept`` says survive, for layers whose own outputs were pruned)."""
    wanted = set(node_names)
    graph = to_gs(pruned)
    sites = {site.uses[0].node.name: site for site in find_weights(graph)[0] if len(site.uses) == 1}
    for node in [n for n in graph.nodes if n.name in wanted]:
        site = sites.get(node.name)
        reason = "no constant weight" if site is None else unsupported_reason(site)
        if not reason and node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
            reason = "grouped Conv"
        if reason:
            result.skipped.append(Skip(node.name, f"refit: {reason}"))
            continue
        current = from_gs(graph, like=pruned)
        _refit_one(original, current, graph, site, source, samples, result, strength, kept or {})  # type: ignore[arg-type]
    graph.cleanup().toposort()
    return from_gs(graph, like=pruned)


def _refit_one(original: onnx.ModelProto, current: onnx.ModelProto, graph: gs.Graph, site: WeightSite,
               source: InputSource, samples: int, result: PassResult, strength: float, kept: KeptChannels) -> None:
    node = site.uses[0].node
    output = node.outputs[0].name
    with_bias = node.op in ("Conv", "Gemm")
    matrix = to_matrix(site).astype(np.float64)
    bias = _bias_of(node, matrix.shape[0]) if with_bias else np.zeros(matrix.shape[0])
    # A layer whose output is added to a residual is fitted so that the SUM matches the original
    # block's output: its target is the original sum minus the pruned model's residual, which then
    # also absorbs the drift that the residual path carries.
    residual = _residual_of(node)
    target_name = residual[0] if residual else output
    inputs_read = [activation_name(site), *([residual[1]] if residual else [])]
    targets = tensor_values(original, source, [target_name], limit=samples, label="refit targets")
    inputs = tensor_values(current, source, inputs_read, limit=samples, label="refit inputs")
    gram = cross = None
    error_before = norm = 0.0
    for target_values, input_values in zip(targets, inputs):
        rows = input_rows(site, input_values[activation_name(site)])
        wanted = _surviving(target_values[target_name], kept.get(target_name))
        if residual:
            if input_values[residual[1]].shape != wanted.shape:
                result.skipped.append(Skip(node.name, "refit: the residual is broadcast"))
                return
            wanted = wanted - input_values[residual[1]]
        target = _output_rows(node, wanted)
        if target.shape[1] != matrix.shape[0]:
            result.skipped.append(Skip(node.name, "refit: output channels differ from the original's"))
            return
        design = np.hstack([rows, np.ones((rows.shape[0], 1))]) if with_bias else rows
        gram = design.T @ design if gram is None else gram + design.T @ design
        cross = design.T @ target if cross is None else cross + design.T @ target
        error_before += float(np.sum((rows @ matrix.T + bias - target) ** 2))
        norm += float(np.sum(target**2))
    if gram is None or cross is None:
        return
    # Ridge towards the layer's current weights, not towards zero: a small calibration set then
    # moves the weights only where the data says so, instead of being memorized.
    start = np.vstack([matrix.T, bias[None, :]]) if with_bias else matrix.T
    ridge = max(strength, 1e-6) * (float(np.mean(np.diag(gram))) or 1.0)
    solution = np.linalg.solve(gram + ridge * np.eye(len(gram)), cross + ridge * start)
    new_matrix = solution[: matrix.shape[1]].T
    new_bias = solution[-1] if with_bias else np.zeros(matrix.shape[0])
    # the fitted error follows from the normal equations: |Y|² - 2 θᵀXᵀY + θᵀXᵀXθ
    error_after = norm - 2 * float(np.sum(solution * cross)) + float(np.sum(solution * (gram @ solution)))
    if error_after >= error_before:
        result.skipped.append(Skip(node.name, "refit: no improvement on calibration data"))
        return
    replace_weight(site, from_matrix(site, new_matrix))
    if with_bias:
        add_output_shift(graph, node, (new_bias - bias).astype(site.value.dtype))
    result.changes.append(Change(node.name, "refit", {
        "relative_error_before": round(float(np.sqrt(error_before / max(norm, 1e-30))), 6),
        "relative_error_after": round(float(np.sqrt(max(error_after, 0.0) / max(norm, 1e-30))), 6),
    }))


def _surviving(value: np.ndarray, kept: tuple[int, np.ndarray] | None) -> np.ndarray:
    if kept is None:
        return value
    axis, mask = kept
    return np.compress(mask, value, axis=axis) if value.ndim > axis and value.shape[axis] == mask.size else value


def _residual_of(node: gs.Node) -> tuple[str, str] | None:
    """(the Add's output, the other addend) when the node's only reader is an Add of two activations."""
    readers = node.outputs[0].outputs
    if len(readers) != 1 or readers[0].op != "Add" or len(readers[0].inputs) != 2:
        return None
    add = readers[0]
    other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
    if isinstance(other, gs.Constant) or other is node.outputs[0] or not other.inputs:
        return None  # a bias-like constant, x + x, or a graph input
    return add.outputs[0].name, other.name


def _bias_of(node: gs.Node, outputs: int) -> np.ndarray:
    from .graph import constant_value

    if len(node.inputs) > 2:
        value = constant_value(node.inputs[2])
        if value is not None:
            scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
            return np.broadcast_to(value.astype(np.float64) * scale, (outputs,)).copy() if value.size in (1, outputs) else np.zeros(outputs)
    return np.zeros(outputs)


def _output_rows(node: gs.Node, value: np.ndarray) -> np.ndarray:
    """A layer's output as rows [samples, outputs], in the order of :func:`input_rows`."""
    y = np.asarray(value, dtype=np.float64)
    if node.op == "Conv":
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])
