"""The plan: which nodes are quantized and which activation tensors get their own range, decided on the
unmodified graph (every node left alone says why in the pass's result)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ...graph import constant_value
from ...weights import matches
from ..base import PassResult, Skip
from .rules import COMPUTE, CONCAT, ELEMENTWISE, FUSED_ACTIVATIONS, POOLS, SAME_SCALE


@dataclass
class Plan:
    """What to quantize: nodes, activation tensors with their own ranges, tensors sharing a range."""

    nodes: list[gs.Node] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose range it reuses


def plan_static(graph: gs.Graph, exclude: Iterable[str], overridable: set[str], result: PassResult) -> Plan:
    plan = Plan()
    own: set[str] = set()
    for node in graph.nodes:
        inputs = _activation_inputs(node, overridable)
        if inputs is None:
            continue
        if matches(exclude, node.name, node.op):
            result.skipped.append(Skip(node.name or node.outputs[0].name, "excluded by pattern"))
            continue
        plan.nodes.append(node)
        own.update(t.name for t in inputs)
        own.add(_quantized_output(graph, node.outputs[0]).name)
    # data-movement ops after a quantized tensor keep its range (every output of a Split), so that
    # they run on int8 too; Gather's data is its input 0, the indices are not quantized
    for node in graph.nodes:
        if node.op in SAME_SCALE and node.inputs and is_float(node.inputs[0]):
            source = node.inputs[0].name
            root = plan.shared.get(source, source)
            if root in own:
                plan.shared.update({output.name: root for output in node.outputs if is_float(output)})
    plan.tensors = sorted(own)
    return plan


def _activation_inputs(node: gs.Node, overridable: set[str]) -> list[gs.Tensor] | None:
    """The float activations a quantizable node reads, or None if it is not quantized."""
    if node.op in COMPUTE:
        if node.op in ("Conv", "ConvTranspose", "Gemm"):
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if weight is None or constant_value(weight) is None or weight.name in overridable:
                return None
            if node.op == "Gemm" and node.attrs.get("transA", 0):
                return None
        indices = COMPUTE[node.op]
    elif node.op in ELEMENTWISE:
        indices = ELEMENTWISE[node.op]
        if any(constant_value(node.inputs[i]) is not None for i in indices):
            return None  # an Add of a bias stays float: quantizing the constant costs precision
    elif node.op in POOLS:
        indices = POOLS[node.op]
    elif node.op == CONCAT:
        indices = tuple(range(len(node.inputs)))
        if any(constant_value(t) is not None for t in node.inputs):
            return None
    else:
        return None
    tensors = [node.inputs[i] for i in indices if i < len(node.inputs) and constant_value(node.inputs[i]) is None]
    if not tensors or not all(is_float(t) for t in [*tensors, *node.outputs[:1]]):
        return None
    return tensors


def is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32


def _quantized_output(graph: gs.Graph, output: gs.Tensor) -> gs.Tensor:
    """Where the output's QDQ goes: after a Relu/Clip that is its only reader (onnxruntime then
    runs Conv+Relu as one int8 kernel)."""
    readers = output.outputs
    if len(readers) == 1 and readers[0].op in FUSED_ACTIVATIONS and output not in graph.outputs and readers[0].outputs[0] not in graph.outputs:
        return readers[0].outputs[0]
    return output  # a graph output keeps its float tensor (the interface): the pair goes before the activation


def tensors_of(nodes: list[gs.Node], plan: Plan, graph: gs.Graph) -> set[str]:
    """The planned tensors that the chosen nodes read or write (a float node's own tensors go)."""
    names: set[str] = set()
    own = set(plan.tensors)
    for node in nodes:
        names.update(t.name for t in node.inputs if t.name in own)
        names.add(_quantized_output(graph, node.outputs[0]).name)
    names &= own
    names.update(t for t, root in plan.shared.items() if root in names)
    return names


def nested_weight_layers(graph: gs.Graph) -> list[gs.Node]:
    """The layers inside If/Loop bodies whose float weight the static build stores as int8 (their activations
    cannot be observed, so they are not calibrated)."""
    layers = []
    for scope in graph.subgraphs(recursive=True):
        for node in scope.nodes:
            weight = constant_value(node.inputs[1]) if node.op in COMPUTE and len(node.inputs) > 1 else None
            if weight is not None and weight.dtype == np.float32 and weight.ndim >= 2:
                layers.append(node)
    return layers
