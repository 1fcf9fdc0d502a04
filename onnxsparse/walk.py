"""Walking a ModelProto: its graphs (subgraphs and function bodies included) and every tensor that
can carry data. The lowest layer that knows what a model is; it reads no tensor's values."""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def subgraphs_of(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held by a node's attributes (If branches, Loop/Scan bodies)."""
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in it, outermost first."""
    yield graph
    for node in graph.node:
        for subgraph in subgraphs_of(node):
            yield from iter_graphs(subgraph)


def iter_model_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """Every graph of a model: the main graph, its subgraphs, and the bodies of local functions."""
    yield from iter_graphs(model.graph)
    for function in model.functions:
        for node in function.node:
            for subgraph in subgraphs_of(node):
                yield from iter_graphs(subgraph)


def iter_attribute_tensors(graph: onnx.GraphProto) -> Iterator[tuple[onnx.NodeProto, onnx.TensorProto]]:
    """Tensors held in node attributes of this graph only (Constant ``value``, ConstantOfShape...)."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield node, attribute.t
            elif attribute.type == onnx.AttributeProto.TENSORS:
                for tensor in attribute.tensors:
                    yield node, tensor


def iter_all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto that can carry data: initializers, attribute tensors, sparse parts."""
    for graph in iter_model_graphs(model):
        yield from graph.initializer
        for _, tensor in iter_attribute_tensors(graph):
            yield tensor
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t
