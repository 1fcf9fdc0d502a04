"""Where the weights are: the constant operands of Conv, ConvTranspose, Gemm, MatMul (and RNNs),
whether stored as initializers or in Constant nodes (paddle2onnx, some TF exports), in the main
graph or inside If/Loop bodies, with the axes that give them meaning (output units, reduction)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .graph import constant_value, stored_constant
from .layers import RNN_OPS, WEIGHT_OPS, layer_kind

__all__ = ["RNN_OPS", "WEIGHT_OPS", "Rejected", "WeightSite", "WeightUse", "find_tables", "find_weights", "matches", "replace_weight", "weight_axes"]


@dataclass
class WeightUse:
    """One node reading the weight, at one input index."""

    node: gs.Node
    index: int
    scope: gs.Graph


@dataclass
class WeightSite:
    """A constant weight tensor with the axes along which its values mean something."""

    name: str
    tensor: gs.Tensor
    value: np.ndarray  # read-only
    op: str
    out_axis: int  # the axis of output units (filters, output features)
    reduction_axis: int  # the axis summed over (input channels, input features): where N:M groups run
    uses: list[WeightUse] = field(default_factory=list)
    depthwise: bool = False
    in_subgraph: bool = False

    @property
    def node_names(self) -> list[str]:
        return [use.node.name for use in self.uses]


@dataclass(frozen=True)
class Rejected:
    """A constant operand of a weight op that is not treated as a weight, and why."""

    name: str
    reason: str


def weight_axes(node: gs.Node, index: int, rank: int) -> tuple[int, int] | None:
    """(output axis, reduction axis) of ``node``'s constant input ``index``, or None if not a weight
    (layers.py knows each op's layout)."""
    kind = layer_kind(node.op)
    return None if kind is None else kind.axes(node.attrs, index, rank)


def find_weights(graph: gs.Graph, ops: Iterable[str] = WEIGHT_OPS, overridable: AbstractSet[str] = frozenset()) -> tuple[list[WeightSite], list[Rejected]]:
    """Every constant weight read by ``ops`` in ``graph`` and its subgraphs, each tensor once.

    Initializers listed in ``overridable`` (also graph inputs) are rejected: the caller may feed
    other values. A tensor that some other node reads in a non-weight role (a tied embedding read by Gather, a
    weight also added to something) is rejected with the reason, never pruned behind that node's back.
    """
    wanted = set(ops)
    sites: dict[str, WeightSite] = {}
    rejected: dict[str, str] = {}
    scopes = [graph, *graph.subgraphs(recursive=True)]
    for scope in scopes:
        for node in scope.nodes:
            if node.op not in wanted:
                continue
            for index, tensor in enumerate(node.inputs):
                _consider(node, index, tensor, scope, scope is not graph, sites, rejected)
    for name in overridable & set(sites):
        rejected[name] = "an initializer that is also a graph input (overridable at run time)"
        del sites[name]
    readers = _readers_by_name(scopes)
    for site in list(sites.values()):
        weight_uses = {(id(use.node), use.index) for use in site.uses}
        other = ", ".join(sorted({op for key, op in readers.get(site.name, []) if key not in weight_uses}))
        if other:
            rejected[site.name] = f"also read by {other} (not as a weight)"
            del sites[site.name]
    return list(sites.values()), [Rejected(n, r) for n, r in rejected.items()]


def find_tables(graph: gs.Graph, overridable: AbstractSet[str] = frozenset()) -> tuple[list[WeightSite], list[Rejected]]:
    """Embedding tables: constant 2-D float tensors that only Gathers along axis 0 read (in ``graph`` or
    its subgraphs), as sites whose rows (axis 0) are the output units. A tensor that something else reads
    too (a tied MatMul weight) is rejected with the reason, as are ``overridable`` initializers."""
    scopes = [graph, *graph.subgraphs(recursive=True)]
    readers: dict[str, list[tuple[gs.Node, int, gs.Graph]]] = {}
    for scope in scopes:
        for node in scope.nodes:
            for index, tensor in enumerate(node.inputs):
                readers.setdefault(tensor.name, []).append((node, index, scope))
    outputs = {tensor.name for scope in scopes for tensor in scope.outputs}
    sites: dict[str, WeightSite] = {}
    rejected: dict[str, str] = {}
    for scope in scopes:
        for node in scope.nodes:
            if node.op != "Gather" or not node.inputs or node.inputs[0].name in sites or node.inputs[0].name in rejected:
                continue
            tensor = node.inputs[0]
            value = constant_value(tensor)
            if value is None or value.ndim != 2 or not np.issubdtype(value.dtype, np.floating):
                continue
            uses = readers[tensor.name]
            others = sorted({n.op for n, index, _ in uses if n.op != "Gather" or index != 0 or int(n.attrs.get("axis", 0)) != 0})
            if tensor.name in overridable:
                rejected[tensor.name] = "an initializer that is also a graph input (overridable at run time)"
            elif tensor.name in outputs:
                rejected[tensor.name] = "also a graph output (its float values stay in the file)"
            elif others:
                rejected[tensor.name] = f"also read by {', '.join(others)} (not as a table rows are gathered from)"
            else:
                sites[tensor.name] = WeightSite(tensor.name, tensor, value, "Gather", 0, 1, [WeightUse(n, index, s) for n, index, s in uses],
                                                in_subgraph=any(s is not graph for _, _, s in uses))
    return list(sites.values()), [Rejected(n, r) for n, r in rejected.items()]


def _consider(
    node: gs.Node, index: int, tensor: gs.Tensor, scope: gs.Graph, in_subgraph: bool,
    sites: dict[str, WeightSite], rejected: dict[str, str],
) -> None:
    kind = layer_kind(node.op)
    if kind is None or index == kind.bias_index:
        return  # biases are not weights to prune or quantize per channel
    value = constant_value(tensor)
    if value is None or not np.issubdtype(value.dtype, np.floating):
        return
    axes = weight_axes(node, index, value.ndim)
    if axes is None:
        rejected.setdefault(tensor.name, f"{value.ndim}-D operand {index} of {node.op} '{node.name}' has no weight layout")
        return
    site = sites.get(tensor.name)
    if site is None:
        site = sites[tensor.name] = WeightSite(tensor.name, tensor, value, node.op, *axes, in_subgraph=in_subgraph)
        site.depthwise = node.op == "Conv" and kind.groups(node.attrs) > 1 and value.shape[1] == 1
    elif (site.op, site.out_axis, site.reduction_axis) != (node.op, *axes):
        rejected[tensor.name] = f"read as a weight with different layouts ({site.op} and {node.op})"
    site.uses.append(WeightUse(node, index, scope))


def _readers_by_name(scopes: list[gs.Graph]) -> dict[str, list[tuple[tuple[int, int], str]]]:
    """For each tensor name, who reads it: ((node id, input index), op type); graph outputs too."""
    readers: dict[str, list[tuple[tuple[int, int], str]]] = {}
    for scope in scopes:
        for node in scope.nodes:
            for index, tensor in enumerate(node.inputs):
                readers.setdefault(tensor.name, []).append(((id(node), index), node.op))
        for output in scope.outputs:
            readers.setdefault(output.name, []).append(((0, -1), "a graph output"))
    return readers


def matches(patterns: Iterable[str], *names: str) -> bool:
    """fnmatch-style: does any pattern match any of the names (tensor, node, op type)?"""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names if name)


def replace_weight(site: WeightSite, value: np.ndarray) -> gs.Constant:
    """Point every use of the weight at a new constant holding ``value`` (never the old buffer).

    The new constant keeps the weight's name; the old initializer or Constant node becomes unused
    and is dropped by the graph cleanup that follows. Where a weight store holds the weight, the new
    value goes there at once (:func:`graph.stored_constant`).
    """
    replacement = stored_constant(site.name, value, site.tensor)
    for use in site.uses:
        use.node.inputs[use.index] = replacement
    return replacement
