"""A model's ONNX graph as a torch module, its float weights as parameters named as in the graph.

The graph is interpreted node by node with the rules of :mod:`onnxsparse.train.ops` (not traced),
so shapes computed inside the graph stay exact whatever the batch. ``write_back`` returns a copy of
the model with the trained values in the same initializers and Constant nodes: node names,
structure, opsets and metadata unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import UnsupportedModelError
from ..graph import tensor_array
from .ops import OnnxNode, Rule, rule_of

# Which constants train by default: float weights, not scalars (an epsilon, an exponent) and not a
# BatchNormalization's running statistics (inputs 3 and 4: measured, not learnt).
Trainable = Callable[[str, np.ndarray], bool]


@dataclass(frozen=True)
class _Step:
    node: OnnxNode
    run: Rule
    inputs: list[str]
    outputs: list[str]


class GraphModule(torch.nn.Module):
    """``model``'s main graph as a torch module: ``forward(**inputs)`` returns {output name: tensor}.
    ``trainable(name, value)`` picks the constants that become parameters (default: every float
    initializer or Constant-node value of more than one element, BatchNormalization statistics
    aside); the rest are buffers."""

    def __init__(self, model: onnx.ModelProto, trainable: Trainable | None = None) -> None:
        super().__init__()
        self.model = model
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        constants = {t.name: tensor_array(t) for t in graph.initializer}
        constants.update({node.output[0]: _constant_value(node) for node in graph.node if node.op_type == "Constant"})
        statistics = {name for node in graph.node if node.op_type == "BatchNormalization" for name in node.input[3:5]}
        trainable = trainable or (lambda name, value: value.dtype.kind == "f" and value.size > 1 and name not in statistics)
        self.weights = torch.nn.ParameterDict()
        self._keys: dict[str, str] = {}  # ONNX name -> attribute key (ONNX names may hold dots)
        for index, (name, value) in enumerate(constants.items()):
            key = f"c{index}"
            self._keys[name] = key
            tensor = torch.from_numpy(np.array(value))  # a writable copy: the model's arrays stay as they are
            if trainable(name, value):
                self.weights[key] = torch.nn.Parameter(tensor)
            else:
                self.register_buffer(key, tensor)
        given = set(constants)
        self.input_names = [i.name for i in graph.input if i.name not in given]
        self.output_names = [o.name for o in graph.output]
        self._steps = []
        for node in graph.node:
            if node.op_type != "Constant":
                view = OnnxNode.of(node, opset)
                self._steps.append(_Step(view, rule_of(view, node.domain), list(node.input), list(node.output)))

    def constant(self, name: str) -> torch.Tensor:
        """The parameter or buffer holding the model's constant ``name``."""
        key = self._keys[name]
        return self.weights[key] if key in self.weights else getattr(self, key)

    def onnx_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(ONNX name, parameter) of every trainable constant."""
        for name, key in self._keys.items():
            if key in self.weights:
                yield name, self.weights[key]

    def forward(self, *args: torch.Tensor, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        values: dict[str, Any] = {name: self.constant(name) for name in self._keys}
        values.update(zip(self.input_names, args))
        values.update(inputs)
        for step in self._steps:
            results = step.run(step.node, [values[name] if name else None for name in step.inputs])
            values.update((name, value) for name, value in zip(step.outputs, results) if name)
        return {name: values[name] for name in self.output_names}

    def write_back(self) -> onnx.ModelProto:
        """A copy of the model with the parameters' current values in their initializers and Constant
        nodes (same names, dtypes and shapes); nothing else differs."""
        trained: Mapping[str, np.ndarray] = {name: p.detach().cpu().numpy() for name, p in self.onnx_parameters()}
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for index, tensor in enumerate(model.graph.initializer):
            if tensor.name in trained:
                model.graph.initializer[index].CopyFrom(_tensor_like(tensor, trained[tensor.name]))
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output[0] in trained:
                value = next(a for a in node.attribute if a.name == "value")
                value.t.CopyFrom(_tensor_like(value.t, trained[node.output[0]]))
        return model


def _tensor_like(original: onnx.TensorProto, values: np.ndarray) -> onnx.TensorProto:
    """``values`` as a tensor with ``original``'s name and element type, its data in the message."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(original.data_type)
    return numpy_helper.from_array(np.asarray(values, dtype=dtype).reshape(tuple(original.dims)), original.name)


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    """A Constant node's value (its ``value`` tensor or one of the scalar/list forms)."""
    attribute = node.attribute[0]
    value = onnx.helper.get_attribute_value(attribute)
    if attribute.name == "value":
        return np.array(tensor_array(value))
    dtype = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}.get(attribute.name)
    if dtype is None:
        raise UnsupportedModelError(f"Constant node '{node.name}': its {attribute.name} form has no rule in the training engine")
    return np.array(value, dtype=dtype)
