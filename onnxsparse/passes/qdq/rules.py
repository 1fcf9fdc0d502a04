"""What onnxruntime runs on int8, op by op: the tables that the plan and the materializer read (teach
qdq a new op here), and the kinds of nodes whose int8 form tends to be fast, or slow, alike."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ...graph import constant_value

# op -> the input indices that carry activations to quantize
COMPUTE = {"Conv": (0,), "ConvTranspose": (0,), "Gemm": (0,), "MatMul": (0, 1)}
ELEMENTWISE = {"Add": (0, 1), "Mul": (0, 1)}
POOLS = {"GlobalAveragePool": (0,), "AveragePool": (0,)}
CONCAT = "Concat"
# Ops onnxruntime runs on int8 when input and output share one scale (data movement): it drops the
# DQ before and the Q after them (tests/test_qdq.py checks each on its optimized graph). Not
# GlobalMaxPool, SpaceToDepth or Pad: onnxruntime 1.32 runs them in float between DQ and Q, so
# quantizing through them only adds a Q/DQ pair.
SAME_SCALE = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Slice", "Identity",
                        "DepthToSpace", "Split", "Gather"})
# a QDQ right after these is what onnxruntime folds into the producer's int8 kernel
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
# Recurrent ops: onnxruntime has an int8 kernel for LSTM only (DynamicQuantizeLSTM, a contrib op).
RECURRENT = frozenset({"LSTM", "GRU", "RNN"})
QUANTIZED_OPS = frozenset({"DynamicQuantizeLSTM", "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                           "ConvInteger", "DynamicQuantizeLinear"})

# onnxruntime (WeightBiasQuantization, 1.21 on) quantizes the float weight of these ops itself, to
# per-tensor int8, when the activation comes from a DequantizeLinear and the output goes (through
# Relu/Clip only) to a QuantizeLinear: such a node "kept float" between int8 neighbours would run int8.
WEIGHTS_QUANTIZED_BY_ONNXRUNTIME = frozenset({"Conv", "ConvTranspose", "Gemm"})


# Ops that move a tensor's values without changing them: a layer behind only these still reads the
# model's input.
_MOVES_ONLY = frozenset({"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
INPUT_KIND = "input "


def timing_kind(node: gs.Node) -> str:
    """The kind the speed search times in float as one: :func:`speed_kind`, with the layers that read
    the model's input apart (``INPUT_KIND`` before their kind)."""
    kind = speed_kind(node)
    return INPUT_KIND + kind if is_input_layer(node) else kind


def is_input_layer(node: gs.Node) -> bool:
    """A compute layer (Conv, Gemm, MatMul, ...) that quantizes the model's input: see :func:`reads_model_input`."""
    return node.op in COMPUTE and reads_model_input(node)


def reads_model_input(node: gs.Node) -> bool:
    """Whether an activation the node quantizes is a model input, directly or through data movement
    only. In int8 such a layer costs a QuantizeLinear of the input itself, and a first layer has few
    input channels (3 for RGB), where onnxruntime's float kernel can be the faster one."""
    return any(_from_model_input(node.inputs[i]) for i in COMPUTE.get(node.op, (0,)) if i < len(node.inputs))


def _from_model_input(tensor: gs.Tensor) -> bool:
    while len(tensor.inputs) == 1 and tensor.inputs[0].op in _MOVES_ONLY and tensor.inputs[0].inputs:
        tensor = tensor.inputs[0].inputs[0]
    return isinstance(tensor, gs.Variable) and not tensor.inputs


def speed_kind(node: gs.Node) -> str:
    """The kind of node whose int8 form tends to be fast or slow alike: a 1-D convolution (an
    exporter's conv1d over an unsqueezed axis, often between Transposes), a depthwise one, a MatMul
    of two activations, or the op type."""
    if node.op not in ("Conv", "ConvTranspose"):
        return _kind(node)
    weight = constant_value(node.inputs[1])
    kernel = list(weight.shape[2:]) if weight is not None else []
    spatial = list(node.inputs[0].shape[2:]) if node.inputs[0].shape is not None else kernel
    one_d = len(kernel) == 1 or sum(not (isinstance(d, int) and d == 1) for d in spatial) == 1
    depthwise = weight is not None and weight.shape[1] == 1 and int(node.attrs.get("group", 1)) > 1 and node.op == "Conv"
    return f"{'1-D ' if one_d else ''}{'depthwise ' if depthwise else ''}{node.op}"


def _kind(node: gs.Node) -> str:
    if node.op == "MatMul" and all(constant_value(t) is None for t in node.inputs[:2]):
        return "MatMul of activations"
    return node.op
