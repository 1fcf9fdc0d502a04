"""A model's ONNX graph as a torch module, its float weights as parameters named as in the graph.

The graph is interpreted node by node with the rules of :mod:`onnxsparse.train.ops` (not traced),
so shapes computed inside the graph stay exact whatever the batch. ``write_back`` returns a copy of
the model with the trained values in the same initializers and Constant nodes: node names,
structure, opsets and metadata unchanged.

With ``quantized=True`` (quantization-aware training), an integer weight read only by
DequantizeLinear nodes trains too: as the float values it stands for, rounded to its grid on the way
in with gradients straight through the rounding, its scale and zero point fixed. It is written back
as the integers the forward pass used, so the written model computes what the trained module did.
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
from .ops import OnnxNode, Rule, along, fake_quantize, pass_through, rule_of, straight_through_integers

# Which constants train by default: float weights, not scalars (an epsilon, an exponent), not a
# BatchNormalization's running statistics (inputs 3 and 4) and not quantization scales or zero points.
Trainable = Callable[[str, np.ndarray], bool]


@dataclass(frozen=True)
class _Grid:
    """An integer weight's quantization grid: scale and zero point shaped to broadcast onto it, and
    the range of its integer type."""

    scale: torch.Tensor
    zero: torch.Tensor
    low: int
    high: int

    def integers(self, values: torch.Tensor) -> torch.Tensor:
        """The integers (as floats) that float ``values`` round to on this grid (see
        :func:`~onnxsparse.train.ops.straight_through_integers`)."""
        return straight_through_integers(values, self.scale, self.zero, self.low, self.high)

    def values(self, integers: np.ndarray) -> torch.Tensor:
        """What DequantizeLinear makes of ``integers``: (q - zero point) x scale, in float32."""
        return (torch.from_numpy(integers.astype(np.float32)) - self.zero) * self.scale


@dataclass(frozen=True)
class _Step:
    node: OnnxNode
    run: Rule
    inputs: list[str]
    outputs: list[str]


class GraphModule(torch.nn.Module):
    """``model``'s main graph as a torch module: ``forward(**inputs)`` returns {output name: tensor}.
    ``trainable(name, value)`` picks the constants that become parameters (default: every float
    initializer or Constant-node value of more than one element, BatchNormalization statistics and
    quantization scales and zero points aside); the rest are buffers. ``quantized``: integer weights
    behind DequantizeLinear train on their grid (see the module's docstring)."""

    def __init__(self, model: onnx.ModelProto, trainable: Trainable | None = None, *, quantized: bool = False) -> None:
        super().__init__()
        self.model = model
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        constants = {t.name: tensor_array(t) for t in graph.initializer}
        constants.update({node.output[0]: _constant_value(node) for node in graph.node if node.op_type == "Constant"})
        # Measured or decided, not learnt: a BatchNormalization's running statistics, quantization scales and zero points.
        fixed = {name for node in graph.node if node.op_type == "BatchNormalization" for name in node.input[3:5]}
        fixed |= _quantization_parameters(graph)
        trainable = trainable or (lambda name, value: value.dtype.kind == "f" and value.size > 1 and name not in fixed)
        self._grids = _integer_grids(graph, constants) if quantized else {}
        self.weights = torch.nn.ParameterDict()
        self._keys: dict[str, str] = {}  # ONNX name -> attribute key (ONNX names may hold dots)
        for index, (name, value) in enumerate(constants.items()):
            key = f"c{index}"
            self._keys[name] = key
            if name in self._grids:  # trained as the float values the integers stand for
                self.weights[key] = torch.nn.Parameter(self._grids[name].values(value))
                continue
            tensor = torch.from_numpy(_torch_ready(value))
            if trainable(name, value):
                self.weights[key] = torch.nn.Parameter(tensor)
            else:
                self.register_buffer(key, tensor)
        given = set(constants)
        self.input_names = [i.name for i in graph.input if i.name not in given]
        self.output_names = [o.name for o in graph.output]
        fused = _fused_quantizations(graph)
        self._steps = []
        for node in graph.node:
            if node.op_type != "Constant":
                view = OnnxNode.of(node, opset)
                run = fake_quantize if node.op_type == "QuantizeLinear" and node.output[0] in fused else (
                    pass_through if node.op_type == "DequantizeLinear" and node.input[0] in fused else rule_of(view, node.domain))
                self._steps.append(_Step(view, run, list(node.input), list(node.output)))

    def constant(self, name: str) -> torch.Tensor:
        """The parameter or buffer holding the model's constant ``name``."""
        key = self._keys[name]
        return self.weights[key] if key in self.weights else getattr(self, key)

    def _value(self, name: str) -> torch.Tensor:
        """What the graph reads as ``name``: an integer weight trained on its grid as its integers."""
        grid = self._grids.get(name)
        return self.constant(name) if grid is None else grid.integers(self.constant(name))

    def onnx_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(ONNX name, parameter) of every trainable constant."""
        for name, key in self._keys.items():
            if key in self.weights:
                yield name, self.weights[key]

    def forward(self, *args: torch.Tensor, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        values: dict[str, Any] = {name: self._value(name) for name in self._keys}
        values.update(zip(self.input_names, args))
        values.update(inputs)
        for step in self._steps:
            results = step.run(step.node, [values[name] if name else None for name in step.inputs])
            values.update((name, value) for name, value in zip(step.outputs, results) if name)
        return {name: values[name] for name in self.output_names}

    def write_back(self) -> onnx.ModelProto:
        """A copy of the model with the parameters' current values in their initializers and Constant
        nodes (same names, dtypes and shapes); nothing else differs."""
        with torch.no_grad():
            trained: Mapping[str, np.ndarray] = {name: self._value(name).cpu().numpy() for name, _ in self.onnx_parameters()}
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
    """``values`` as a tensor with ``original``'s name and element type, its data in the message (an
    integer type's values are whole numbers already: the integers of a grid)."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(original.data_type)
    return numpy_helper.from_array(np.asarray(values, dtype=dtype).reshape(tuple(original.dims)), original.name)


_GRID_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32)


def _integer_grids(graph: onnx.GraphProto, constants: Mapping[str, np.ndarray]) -> dict[str, _Grid]:
    """The integer constants that only DequantizeLinear nodes read, as their input 0, all with the
    same constant scale and zero point (block-wise ones aside): the weights a QDQ model trains."""
    readers = _readers(graph)
    grids = {}
    for name, value in constants.items():
        nodes = readers.get(name, [])
        if value.dtype.type not in _GRID_TYPES or not nodes or any(n.op_type != "DequantizeLinear" or n.input[0] != name for n in nodes):
            continue
        node = nodes[0]
        if any(list(n.input[1:]) != list(node.input[1:]) or n.attribute != node.attribute for n in nodes):
            continue  # read with different scales or axes
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        scale_name, zero_name = node.input[1], (node.input[2] if len(node.input) > 2 else "")
        if attributes.get("block_size") or scale_name not in constants or (zero_name and zero_name not in constants):
            continue
        info = np.iinfo(value.dtype)
        zero = constants[zero_name] if zero_name else np.zeros((), value.dtype)
        axis = int(attributes.get("axis", 1)) % max(value.ndim, 1)
        grids[name] = _Grid(along(torch.from_numpy(constants[scale_name].astype(np.float32)), value.ndim, axis),
                            along(torch.from_numpy(zero.astype(np.float32)), value.ndim, axis), int(info.min), int(info.max))
    return grids


def _quantization_parameters(graph: onnx.GraphProto) -> set[str]:
    """The scales and zero points of QuantizeLinear/DequantizeLinear, and the weight scales that multiply a
    DynamicQuantizeLinear's scale (qdq's dynamic mode): a step of Adam sized for weights would move such
    a scale (0.002) by half of itself."""
    names = {name for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear") for name in node.input[1:3]}
    dynamic_scales = {node.output[1] for node in graph.node if node.op_type == "DynamicQuantizeLinear" and len(node.output) > 1}
    names |= {name for node in graph.node if node.op_type == "Mul" and dynamic_scales & set(node.input)
              for name in node.input if name not in dynamic_scales}
    return names


def _fused_quantizations(graph: onnx.GraphProto) -> set[str]:
    """The outputs of QuantizeLinear nodes (with a zero point, not block-wise) read only by
    DequantizeLinear nodes of the same scale, zero point and axis, and not graph outputs: each such
    pair runs as one fake-quantization (:func:`~onnxsparse.train.ops.fake_quantize`)."""
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}

    def axis(node: onnx.NodeProto) -> int:
        return next((a.i for a in node.attribute if a.name == "axis"), 1)

    fused = set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or not node.input[2] or node.output[0] in outputs:
            continue
        if any(a.name in ("block_size", "output_dtype") for a in node.attribute):
            continue
        after = readers.get(node.output[0], [])
        if after and all(r.op_type == "DequantizeLinear" and r.input[0] == node.output[0] and list(r.input[1:3]) == list(node.input[1:3])
                         and axis(r) == axis(node) and not any(a.name == "block_size" for a in r.attribute) for r in after):
            fused.add(node.output[0])
    return fused


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes of ``graph`` that read each tensor name."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


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


def _torch_ready(value: np.ndarray) -> np.ndarray:
    """A writable copy torch takes (the model's arrays stay as they are): 4-bit integers (a codebook's
    uint4 indices), which torch has no type for, as 8-bit ones of the same values; nothing reads them
    but a Cast."""
    if value.dtype.name in ("int4", "uint4"):
        return np.asarray(value).astype(np.int8 if value.dtype.name == "int4" else np.uint8)
    return np.array(value)
