"""``cleanup``: remove what no graph output depends on, so that no orphan tensor is left in the file."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..graph import used_names
from ..walk import iter_model_graphs, subgraphs_of
from ..weightstore import stored_bytes
from .base import Change, Pass, PassContext, PassResult, Requirement, Skip, register


@register
@dataclass(frozen=True)
class Cleanup(Pass):
    """Remove unused nodes, initializers, value_info and local functions (subgraphs included).

    Exact: nothing a graph output depends on is touched. Graph inputs stay (they are the model's
    interface) unless ``drop_unused_inputs`` is set; an initializer that doubles as a graph input
    (the IR < 4 style) goes with its input entry when nothing reads it.
    """

    name = "cleanup"
    preserves = frozenset({Requirement.SHAPES})  # it removes what nothing reads

    drop_unused_inputs: bool = False

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        result = PassResult(model)
        for graph in iter_model_graphs(model):
            self._clean_graph(graph, result, is_main=graph is model.graph)
        self._drop_unused_functions(model, result)
        if not result.changes:
            result.skipped.append(Skip("model", "nothing unused: every node, initializer, value_info and function is needed by an output"))
        removed_bytes = sum(int(c.details.get("bytes", 0)) for c in result.changes)
        result.figures.update(
            nodes_removed=sum(c.action == "removed node" for c in result.changes),
            initializers_removed=sum(c.action == "removed initializer" for c in result.changes),
            value_info_removed=sum(c.action == "removed value_info" for c in result.changes),
            bytes_removed=removed_bytes,
        )
        return result

    def _clean_graph(self, graph: onnx.GraphProto, result: PassResult, *, is_main: bool) -> None:
        self._drop_dead_nodes(graph, result)
        read = used_names(graph)
        initializer_names = {t.name for t in graph.initializer}
        for tensor in [t for t in graph.initializer if t.name not in read]:
            graph.initializer.remove(tensor)
            result.changes.append(Change(tensor.name, "removed initializer", {"bytes": stored_bytes(tensor)}))
        if is_main:
            removable = {name for name in initializer_names if name not in read}
            if self.drop_unused_inputs:
                removable |= {value.name for value in graph.input if value.name not in read}
            for value in [v for v in graph.input if v.name in removable]:
                graph.input.remove(value)
                result.changes.append(Change(value.name, "removed graph input"))
        produced = {name for node in graph.node for name in node.output}
        known = produced | {v.name for v in graph.input} | {t.name for t in graph.initializer}
        for value in [v for v in graph.value_info if v.name not in known]:
            graph.value_info.remove(value)
            result.changes.append(Change(value.name, "removed value_info"))

    @staticmethod
    def _drop_dead_nodes(graph: onnx.GraphProto, result: PassResult) -> None:
        """Walk back from the graph outputs; a node none of whose outputs is needed is dead."""
        needed = {output.name for output in graph.output}
        live: list[onnx.NodeProto] = []
        for node in reversed(graph.node):
            if any(name in needed for name in node.output if name):
                live.append(node)
                needed.update(name for name in node.input if name)
                for subgraph in subgraphs_of(node):
                    needed.update(used_names(subgraph))
            else:
                result.changes.append(Change(node.name or node.output[0], "removed node", {"op": node.op_type}))
        if len(live) != len(graph.node):
            live.reverse()
            del graph.node[:]
            graph.node.extend(live)

    @staticmethod
    def _drop_unused_functions(model: onnx.ModelProto, result: PassResult) -> None:
        called = {(node.domain, node.op_type) for graph in iter_model_graphs(model) for node in graph.node}
        for function in model.functions:
            called.update((node.domain, node.op_type) for node in function.node)
        for function in [f for f in model.functions if (f.domain, f.name) not in called]:
            model.functions.remove(function)
            result.changes.append(Change(function.name, "removed function"))
