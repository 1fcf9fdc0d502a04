"""The materializer: Q/DQ pairs, int8 weights and int32 biases put where the plan says, and onnxruntime's
int8 forms of dynamic MatMuls and LSTMs. It decides nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...graph import MICROSOFT_DOMAIN, constant_value, downstream_names, from_gs, stored_constant, to_gs, unique_name
from ...layers import CONV_TRANSPOSE, layer_kind
from ...layerwise import add_output_shift
from ...quantization import (
    ActivationParams,
    WeightQuant,
    WeightScheme,
    activation_params,
    bias_in_scale,
    quantize_bias,
    quantize_weight,
)
from ...weightstore import release_pages
from .plan import Plan, is_float, tensors_of
from .rules import COMPUTE, FUSED_ACTIVATIONS, WEIGHTS_QUANTIZED_BY_ONNXRUNTIME

# A built model's int8 weights are kept for the next build (the guard builds dozens: MobileNetV2's 41
# builds quantized 1,815 weights, 0.5 s) up to this many bytes; beyond it each build quantizes again,
# so a big model holds at most this much int8 beside what its built model holds.
WEIGHT_MEMO_BYTES = 64 << 20


class WeightMemo:
    """The int8 form of each weight by (name, axis, bound), for builds of one model that differ only in
    which nodes stay float: the weights themselves never change between them."""

    def __init__(self, budget: int = WEIGHT_MEMO_BYTES) -> None:
        self._quants: dict[tuple[str, int | None, int], WeightQuant] = {}
        self._room = budget

    def quantized(self, name: str, weight: np.ndarray, axis: int | None, bound: int) -> WeightQuant:
        key = (name, axis, bound)
        if key in self._quants:
            return self._quants[key]
        quant = quantize_weight(weight, axis, bound)
        if quant.values.nbytes <= self._room:
            for shared in (quant.values, quant.scale, quant.zero_point):
                shared.setflags(write=False)  # every later build reads these very arrays
            self._room -= quant.values.nbytes
            self._quants[key] = quant
        return quant


@dataclass(frozen=True)
class BiasSite:
    """Where a Conv's (zero-shifted) bias ended up in a built int8 model: an initializer holding it as
    int32 in units of ``scale`` (behind a DequantizeLinear), or as float (``scale`` None)."""

    initializer: str
    bias: np.ndarray  # float32, as add_output_shift left it with a zero shift
    scale: np.ndarray | None

    def patch(self, model: onnx.ModelProto, shift: np.ndarray) -> None:
        """Put ``bias + shift`` into ``model`` exactly as a build with that shift would: the sum taken
        in float64 and stored as float32 (add_output_shift), then quantized with the same scale."""
        shifted = (self.bias.astype(np.float64) + shift).astype(np.float32)
        stored = bias_in_scale(shifted, self.scale) if self.scale is not None else shifted
        tensor = next(t for t in model.graph.initializer if t.name == self.initializer)
        tensor.CopyFrom(onnx.numpy_helper.from_array(stored, self.initializer))


@dataclass(frozen=True)
class StaticBuilder:
    """Static int8 models of ``model`` as ``plan`` says, for any set of nodes kept float: the guard, the
    bias correction and the speed search each build many of one model, and every build's int8
    weights are kept for the next (:class:`WeightMemo`)."""

    model: onnx.ModelProto
    plan: Plan
    ranges: dict[str, tuple[float, float]]
    weights: WeightScheme
    activations: str  # "uint8" or "int8"
    symmetric: bool
    memo: WeightMemo = field(default_factory=WeightMemo)

    def build(self, kept_float: set[str], shifts: dict[str, np.ndarray] | None = None,
              biases: dict[str, BiasSite] | None = None, measured_with: frozenset[str] = frozenset()) -> onnx.ModelProto:
        """The model with every planned node quantized except those in ``kept_float``; a quantized
        node's bias first takes its correction from ``shifts``, measured with the nodes of
        ``measured_with`` float (a float node keeps its own bias). ``biases``, when given, is filled
        with where each shifted Conv's bias ended up, so that a later shift can be patched into the
        built model instead of building it again."""
        graph = to_gs(self.model)
        nodes = {n.name: n for n in graph.nodes}
        chosen = [nodes[n.name] for n in self.plan.nodes if n.name not in kept_float and n.name in nodes]
        shifts = applicable_shifts(graph, kept_float, shifts or {}, measured_with)
        for node in chosen:
            if shifts and node.name in shifts:
                add_output_shift(graph, node, shifts[node.name])
        shifted_biases = {n.name: constant_value(n.inputs[2]) for n in chosen if shifts and n.name in shifts and n.op == "Conv" and len(n.inputs) > 2}
        tensors = tensors_of(chosen, self.plan, graph)
        params = {name: activation_params(*self.ranges[name], self.activations, self.symmetric) for name in self.plan.tensors if name in tensors}
        for name, root in self.plan.shared.items():
            if name in tensors and root in params:
                params[name] = params[root]
        variables = graph.tensors()
        main_nodes = {id(node) for node in graph.nodes}
        for name, value in params.items():
            insert_qdq(graph, variables[name], value, main_nodes)
        chosen_ids = {id(node) for node in chosen}
        for node in list(graph.nodes):
            if id(node) not in chosen_ids:
                keep_float_in_onnxruntime(node)
        for node in chosen:
            if node.op in COMPUTE:
                quantize_node_weights(graph, node, params, self.weights, memo=self.memo)
        for scope in graph.subgraphs(recursive=True):
            for node in scope.nodes:
                if node.op in COMPUTE:
                    quantize_node_weights(graph, node, {}, self.weights, scope=scope)
        if biases is not None:
            biases.update({name: site for name, bias in shifted_biases.items() if bias is not None and (site := bias_site(nodes[name], bias))})
        graph.cleanup().toposort()
        return from_gs(graph, like=self.model)


def applicable_shifts(graph: gs.Graph, kept_float: set[str], shifts: dict[str, np.ndarray],
                      measured_with: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """The bias shifts a build with ``kept_float`` float applies: a shift corrects the error of every int8
    layer above it, and below a layer float now and not when the shift was measured (``measured_with``)
    that error is another, so the shift would add one of its own. (From layers only: an Add or a pool
    "kept float" between int8 neighbours still runs int8.)"""
    newly_float = kept_float - measured_with
    if not shifts or not newly_float:
        return shifts
    nodes = {n.name: n for n in graph.nodes}
    after_float = downstream_names(nodes[name] for name in newly_float if name in nodes and nodes[name].op in COMPUTE)
    return {name: shift for name, shift in shifts.items() if name in nodes and not any(t.name in after_float for t in nodes[name].inputs)}


def int8_entry(model: onnx.ModelProto, name: str) -> str | None:
    """The quantized activation that the node ``name`` reads through a DequantizeLinear, if it does."""
    node = next((n for n in model.graph.node if n.name == name), None)
    if node is None or not node.input:
        return None
    producer = next((n for n in model.graph.node if node.input[0] in n.output), None)
    return producer.input[0] if producer is not None and producer.op_type == "DequantizeLinear" else None


def patchable(layer: gs.Node) -> bool:
    """A Conv whose bias is a constant or absent: its shift lands in one initializer, whatever its value."""
    return layer.op == "Conv" and (len(layer.inputs) < 3 or constant_value(layer.inputs[2]) is not None)


def bias_site(node: gs.Node, bias: np.ndarray) -> BiasSite | None:
    """Where ``node``'s bias is after quantization: a float constant, or an int32 constant read by
    the DequantizeLinear in front of it; None where it is anything else."""
    tensor = node.inputs[2]
    if isinstance(tensor, gs.Constant):
        return BiasSite(tensor.name, bias, None)
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is None or producer.op != "DequantizeLinear" or not isinstance(producer.inputs[0], gs.Constant):
        return None
    scale = constant_value(producer.inputs[1])
    if producer.inputs[0].values.dtype != np.int32 or scale is None:
        return None
    return BiasSite(producer.inputs[0].name, bias, scale.astype(np.float32))


def insert_qdq(graph: gs.Graph, tensor: gs.Tensor, params: ActivationParams, main_nodes: set[int]) -> None:
    """tensor -> QuantizeLinear -> DequantizeLinear -> every main-graph reader of tensor
    (``main_nodes``: ids of the main graph's nodes; a subgraph reading the tensor keeps the float)."""
    readers = [node for node in tensor.outputs if id(node) in main_nodes]
    scale = gs.Constant(unique_name(graph, f"{tensor.name}_scale"), np.array(params.scale, dtype=np.float32))
    zero_point = gs.Constant(unique_name(graph, f"{tensor.name}_zero_point"), params.zero_point)
    quantized = gs.Variable(unique_name(graph, f"{tensor.name}_quantized"), dtype=params.dtype, shape=tensor.shape)
    restored = gs.Variable(unique_name(graph, f"{tensor.name}_dequantized"), dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", name=unique_name(graph, f"{tensor.name}_QuantizeLinear"), inputs=[tensor, scale, zero_point], outputs=[quantized]))
    graph.nodes.append(gs.Node("DequantizeLinear", name=unique_name(graph, f"{tensor.name}_DequantizeLinear"), inputs=[quantized, scale, zero_point], outputs=[restored]))
    for node in readers:
        for index, value in enumerate(node.inputs):
            if value is tensor:
                node.inputs[index] = restored


def keep_float_in_onnxruntime(node: gs.Node) -> None:
    """Make a float ``node`` that onnxruntime would quantize itself (see
    WEIGHTS_QUANTIZED_BY_ONNXRUNTIME) read its activation before the QuantizeLinear, not after the
    DequantizeLinear. Its producer's output then has two readers, so the producer runs float too:
    the float region grows by one node, which the guard and the speed timing measure."""
    if node.op not in WEIGHTS_QUANTIZED_BY_ONNXRUNTIME or not node.inputs or not _path_to_quantize(node):
        return
    dequantize = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if dequantize is None or dequantize.op != "DequantizeLinear" or not dequantize.inputs[0].inputs:
        return
    quantize = dequantize.inputs[0].inputs[0]
    if quantize.op == "QuantizeLinear":
        node.inputs[0] = quantize.inputs[0]


def _path_to_quantize(node: gs.Node) -> bool:
    """Whether ``node``'s output reaches a QuantizeLinear through single readers that are Relu/Clip."""
    current = node
    while len(current.outputs) == 1 and len(current.outputs[0].outputs) == 1:
        current = current.outputs[0].outputs[0]
        if current.op == "QuantizeLinear":
            return True
        if current.op not in FUSED_ACTIVATIONS:
            return False
    return False


def _weight_axis(node: gs.Node, rank: int) -> int | None:
    """The weight's axis of output units (per-channel scales run along it), from layers.py."""
    kind = layer_kind(node.op)
    return None if kind is None else kind.output_axis(node.attrs, 1, rank)


def quantize_node_weights(graph: gs.Graph, node: gs.Node, params: dict[str, ActivationParams], weights: WeightScheme,
                          scope: gs.Graph | None = None, memo: WeightMemo | None = None) -> None:
    """Weight (input 1) to int8 behind a DequantizeLinear; bias to int32 when the input is quantized.
    ``memo``: where an earlier build of the same model left its int8 weights (main graph only)."""
    scope = scope or graph
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.dtype != np.float32 or weight.ndim < 2:
        return
    axis = _weight_axis(node, weight.ndim) if weights.per_channel else None
    if node.op == "ConvTranspose" and CONV_TRANSPOSE.groups(node.attrs) != 1:
        axis = None  # per-channel scales follow output channels, which groups split across axis 1
    if memo is not None and scope is graph:
        quant = memo.quantized(node.inputs[1].name, weight, axis, weights.bound)
    else:
        quant = quantize_weight(weight, axis, weights.bound)
    release_pages(weight)
    node.inputs[1] = dequantized(graph, scope, node.inputs[1].name, quant.values, quant.scale, quant.zero_point, axis)
    if len(node.inputs) > 2 and node.op in ("Conv", "ConvTranspose", "Gemm"):
        _quantize_bias(graph, scope, node, params, quant.scale, axis)


def _quantize_bias(graph: gs.Graph, scope: gs.Graph, node: gs.Node, params: dict[str, ActivationParams], weight_scale: np.ndarray, axis: int | None) -> None:
    bias = constant_value(node.inputs[2])
    source = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    # the activation's scale: the DequantizeLinear just inserted in front of this node
    if bias is None or bias.ndim != 1 or source is None or source.op != "DequantizeLinear":
        return
    if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
        return
    input_scale = constant_value(source.inputs[1])
    if input_scale is None or input_scale.size != 1:
        return
    scales = weight_scale if axis is not None else np.full(bias.shape, weight_scale, dtype=np.float32)
    if scales.shape != bias.shape:
        return
    values, scale = quantize_bias(bias, np.float32(input_scale.reshape(())), scales)
    node.inputs[2] = dequantized(graph, scope, node.inputs[2].name, values, scale, np.zeros(scale.shape, np.int32), 0)


def dequantized(graph: gs.Graph, scope: gs.Graph, base: str, values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> gs.Variable:
    quantized = gs.Constant(unique_name(graph, f"{base}_quantized"), values)
    scale_tensor = gs.Constant(unique_name(graph, f"{base}_scale"), scale)
    zero_tensor = gs.Constant(unique_name(graph, f"{base}_zero_point"), zero_point)
    restored = gs.Variable(unique_name(graph, f"{base}_dequantized"), dtype=np.float32, shape=list(values.shape))
    attrs = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
    scope.nodes.append(gs.Node("DequantizeLinear", name=unique_name(graph, f"{base}_DequantizeLinear"), attrs=attrs,
                               inputs=[quantized, scale_tensor, zero_tensor], outputs=[restored]))
    return restored


def dynamic_lstm(graph: gs.Graph, scope: gs.Graph, node: gs.Node, weights: WeightScheme, overridable: set[str]) -> str:
    """Replace an LSTM by onnxruntime's DynamicQuantizeLSTM: W and R int8 (symmetric, one scale per gate
    unit and direction, or per direction), stored transposed as the kernel reads them ([directions,
    inputs, 4 x hidden]). Returns why not, or ''."""
    if int(node.attrs.get("layout", 0)) != 0:
        return "batch-first layout (layout=1): DynamicQuantizeLSTM has no such attribute"
    matrices = []
    for tensor in node.inputs[1:3]:
        value = constant_value(tensor)
        if value is None or value.dtype != np.float32 or value.ndim != 3 or tensor.name in overridable:
            return "W or R is not a constant float32 weight"
        matrices.append(value)
    new_inputs = [node.inputs[0]]
    quantized = []
    for value, role in zip(matrices, ("W", "R")):
        directions, rows, columns = value.shape
        if weights.per_channel:
            quant = quantize_weight(value.reshape(directions * rows, columns), 0, weights.bound)
            integers, scale = quant.values, quant.scale.reshape(directions, rows)
        else:
            parts = [quantize_weight(value[d], None, weights.bound) for d in range(directions)]
            integers, scale = np.stack([p.values for p in parts]), np.array([float(p.scale) for p in parts], np.float32)
        values = np.ascontiguousarray(integers.reshape(directions, rows, columns).transpose(0, 2, 1))
        base = f"{node.name or node.outputs[0].name}_{role}"
        new_inputs.append(stored_constant(unique_name(graph, f"{base}_quantized"), values, node.inputs[1]))
        quantized.append((gs.Constant(unique_name(graph, f"{base}_scale"), np.asarray(scale, np.float32)),
                          gs.Constant(unique_name(graph, f"{base}_zero_point"), np.zeros(np.shape(scale), np.int8))))
    optional = list(node.inputs[3:8]) + [gs.Variable.empty()] * (8 - max(3, len(node.inputs)))
    new_inputs += optional[:5]
    for scale, zero in quantized:
        new_inputs += [scale, zero]
    attrs = {k: v for k, v in node.attrs.items() if k != "layout"}
    replacement = gs.Node("DynamicQuantizeLSTM", name=unique_name(graph, f"{node.name or node.outputs[0].name}_int8"), attrs=attrs,
                          inputs=new_inputs, outputs=list(node.outputs), domain=MICROSOFT_DOMAIN)
    node.outputs.clear()
    node.inputs.clear()
    scope.nodes.append(replacement)
    return ""


def dynamic_matmul(graph: gs.Graph, node: gs.Node, weights: WeightScheme, overridable: set[str]) -> str:
    """Replace MatMul/Gemm(x, W) by DynamicQuantizeLinear + MatMulInteger + scale multiply, the
    pattern onnxruntime fuses into DynamicQuantizeMatMul. Returns why not, or ''."""
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32 or node.inputs[1].name in overridable:
        return "no constant 2-D float weight"
    if constant_value(node.inputs[0]) is not None or not is_float(node.inputs[0]):
        return "the left operand is not a float activation"
    bias = None
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return "Gemm with transA"
        weight = weight.T if node.attrs.get("transB", 0) else weight
        alpha = float(node.attrs.get("alpha", 1.0))
        if len(node.inputs) > 2:
            bias = constant_value(node.inputs[2])
            if bias is None:
                return "Gemm bias is not a constant"
            bias = (bias * float(node.attrs.get("beta", 1.0))).astype(np.float32)
    else:
        alpha = 1.0
    quant = quantize_weight(weight, 1 if weights.per_channel else None, weights.bound)
    release_pages(weight)  # read once: a store-held weight's pages need not stay in memory
    weight_input = node.inputs[1]  # where the int8 weight is stored: the float one's store, if any (not held in memory)
    base = node.name or node.outputs[0].name
    x = node.inputs[0]
    xq = gs.Variable(unique_name(graph, f"{base}_x_quantized"), dtype=np.uint8)
    xs = gs.Variable(unique_name(graph, f"{base}_x_scale"), dtype=np.float32)
    xz = gs.Variable(unique_name(graph, f"{base}_x_zero_point"), dtype=np.uint8)
    accumulated = gs.Variable(unique_name(graph, f"{base}_int32"), dtype=np.int32)
    as_float = gs.Variable(unique_name(graph, f"{base}_int32_float"), dtype=np.float32)
    scale = gs.Variable(unique_name(graph, f"{base}_scale"), dtype=np.float32)
    weight_scale = gs.Constant(unique_name(graph, f"{base}_weight_scale"), np.asarray(quant.scale * np.float32(alpha), dtype=np.float32))  # an array even per tensor
    output = node.outputs[0]
    scaled = output if bias is None else gs.Variable(unique_name(graph, f"{base}_unbiased"), dtype=np.float32)
    new_nodes = [
        gs.Node("DynamicQuantizeLinear", name=unique_name(graph, f"{base}_DynamicQuantizeLinear"), inputs=[x], outputs=[xq, xs, xz]),
        gs.Node("MatMulInteger", name=unique_name(graph, f"{base}_MatMulInteger"),
                inputs=[xq, stored_constant(unique_name(graph, f"{base}_weight_quantized"), quant.values, weight_input), xz,
                        gs.Constant(unique_name(graph, f"{base}_weight_zero_point"), quant.zero_point)], outputs=[accumulated]),
        gs.Node("Mul", name=unique_name(graph, f"{base}_scale_Mul"), inputs=[xs, weight_scale], outputs=[scale]),
        gs.Node("Cast", name=unique_name(graph, f"{base}_Cast"), attrs={"to": onnx.TensorProto.FLOAT}, inputs=[accumulated], outputs=[as_float]),
        gs.Node("Mul", name=unique_name(graph, f"{base}_output_Mul"), inputs=[as_float, scale], outputs=[scaled]),
    ]
    if bias is not None:
        new_nodes.append(gs.Node("Add", name=unique_name(graph, f"{base}_bias_Add"),
                                 inputs=[scaled, gs.Constant(unique_name(graph, f"{base}_bias"), bias)], outputs=[output]))
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend(new_nodes)
    return ""
