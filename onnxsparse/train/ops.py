"""ONNX ops as torch operations: the one registry the training engine asks (``RULES``).

A rule takes the node (op type, attributes, the default domain's opset) and its input tensors (None
for an omitted optional input) and returns the output tensors. Shapes, axes and counts that ONNX
passes as tensors are read as Python ints (the graph is interpreted, not traced). To teach the
engine an op, add a function with ``@rule("OpType")``; an op without one is an error that names it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class OnnxNode:
    """What a rule needs of a node: its op type, name, attributes (plain values) and opset."""

    op: str
    name: str
    opset: int
    attrs: dict[str, Any] = field(default_factory=dict)
    outputs: int = 1

    @classmethod
    def of(cls, node: onnx.NodeProto, opset: int) -> OnnxNode:
        return cls(node.op_type, node.name, opset, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}, len(node.output))

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value


Rule = Callable[[OnnxNode, list[Any]], list[Any]]
RULES: dict[str, Rule] = {}

# ONNX element types as torch dtypes (the ones a model's arithmetic and indexing use).
DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64, onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16, onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def rule(*ops: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a function as the rule of ``ops``; a rule returning one tensor gets it wrapped."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(node: OnnxNode, inputs: list[Any]) -> list[Any]:
            result = function(node, *inputs)
            return list(result) if isinstance(result, (list, tuple)) else [result]

        for op in ops:
            RULES[op] = wrapped
        return function

    return register


def rule_of(node: OnnxNode, domain: str = "") -> Rule:
    if domain not in ("", "ai.onnx") or node.op not in RULES:
        where = f"{domain}::" if domain not in ("", "ai.onnx") else ""
        raise UnsupportedModelError(f"node '{node.name or node.op}': the training engine has no rule for {where}{node.op} "
                                    f"(onnxsparse/train/ops.py lists the ops it runs)")
    return RULES[node.op]


def ints(tensor: Tensor | None) -> list[int]:
    """A 1-D integer tensor (shape, axes, pads...) as Python ints."""
    return [] if tensor is None else [int(v) for v in tensor.reshape(-1).tolist()]


# -- element-wise ------------------------------------------------------------------------------

_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "Equal": torch.eq, "Less": torch.lt,
    "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
}
_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf, "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
    "Not": torch.logical_not, "Sin": torch.sin, "Cos": torch.cos, "Softplus": F.softplus, "Round": torch.round, "Sign": torch.sign,
}


@rule(*_BINARY)
def _binary(node: OnnxNode, a: Tensor, b: Tensor) -> Tensor:
    return _BINARY[node.op](a, b)


@rule("Div")
def _div(node: OnnxNode, a: Tensor, b: Tensor) -> Tensor:
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates


@rule(*_UNARY)
def _unary(node: OnnxNode, x: Tensor) -> Tensor:
    return _UNARY[node.op](x)


@rule("Max", "Min", "Sum", "Mean")
def _variadic(node: OnnxNode, *xs: Tensor) -> Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = torch.maximum(out, x) if node.op == "Max" else torch.minimum(out, x) if node.op == "Min" else out + x
    return out / len(xs) if node.op == "Mean" else out


@rule("Where")
def _where(node: OnnxNode, condition: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(condition.bool(), a, b)


@rule("LeakyRelu")
def _leaky_relu(node: OnnxNode, x: Tensor) -> Tensor:
    return F.leaky_relu(x, node.attr("alpha", 0.01))


@rule("Elu")
def _elu(node: OnnxNode, x: Tensor) -> Tensor:
    return F.elu(x, node.attr("alpha", 1.0))


@rule("HardSigmoid")
def _hard_sigmoid(node: OnnxNode, x: Tensor) -> Tensor:
    return torch.clamp(node.attr("alpha", 0.2) * x + node.attr("beta", 0.5), 0.0, 1.0)


@rule("HardSwish")
def _hard_swish(node: OnnxNode, x: Tensor) -> Tensor:
    return x * torch.clamp(x / 6 + 0.5, 0.0, 1.0)  # ONNX: alpha 1/6, beta 0.5 (as torch's hardswish)


@rule("Gelu")
def _gelu(node: OnnxNode, x: Tensor) -> Tensor:
    return F.gelu(x, approximate=node.attr("approximate", "none"))


@rule("Clip")
def _clip(node: OnnxNode, x: Tensor, low: Tensor | None = None, high: Tensor | None = None) -> Tensor:
    if node.opset < 11:  # bounds as attributes (both optional)
        low, high = node.attr("min"), node.attr("max")
    return torch.clamp(x, low, high) if (low is not None or high is not None) else x


@rule("Softmax", "LogSoftmax")
def _softmax(node: OnnxNode, x: Tensor) -> Tensor:
    function = torch.softmax if node.op == "Softmax" else torch.log_softmax
    if node.opset >= 13:
        return function(x, node.attr("axis", -1))
    axis = node.attr("axis", 1) % x.dim()  # before 13: over the flattened trailing axes
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return function(flat, -1).reshape(x.shape)


@rule("Identity", "Dropout")
def _identity(node: OnnxNode, x: Tensor, *_: Any) -> Tensor:
    return x  # Dropout: inference semantics (the mask output is not produced)


@rule("Cast")
def _cast(node: OnnxNode, x: Tensor) -> Tensor:
    return x.to(DTYPES[node.attr("to")])


# -- layers ------------------------------------------------------------------------------------


def _explicit_pads(node: OnnxNode, x: Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """ONNX pads [begin..., end...] for the spatial axes, auto_pad resolved."""
    spatial = x.dim() - 2
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID"):
        return list(node.attr("pads", [0] * 2 * spatial)) if auto == "NOTSET" else [0] * 2 * spatial
    begins, ends = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)
        ends.append(large if auto == "SAME_UPPER" else small)
    return begins + ends


def _padded(x: Tensor, pads: Sequence[int], value: float = 0.0) -> Tensor:
    """x padded by ONNX pads [begin..., end...] on its trailing spatial axes."""
    spatial = len(pads) // 2
    if not any(pads):
        return x
    torch_pads: list[int] = []
    for axis in reversed(range(spatial)):  # torch: last axis first, (begin, end) pairs
        torch_pads += [pads[axis], pads[axis + spatial]]
    return F.pad(x, torch_pads, value=value)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@rule("Conv")
def _conv(node: OnnxNode, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    spatial = x.dim() - 2
    kernel = list(weight.shape[2:])
    strides = node.attr("strides", [1] * spatial)
    dilations = node.attr("dilations", [1] * spatial)
    pads = _explicit_pads(node, x, kernel, strides, dilations)
    return _CONV[spatial](_padded(x, pads), weight, bias, strides, 0, dilations, node.attr("group", 1))


@rule("ConvTranspose")
def _conv_transpose(node: OnnxNode, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    spatial = x.dim() - 2
    strides = node.attr("strides", [1] * spatial)
    dilations = node.attr("dilations", [1] * spatial)
    if node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or node.attr("output_shape") is not None:
        raise UnsupportedModelError(f"node '{node.name}': ConvTranspose with auto_pad SAME or output_shape has no rule yet")
    pads = node.attr("pads", [0] * 2 * spatial)
    output_padding = node.attr("output_padding", [0] * spatial)
    out = _CONV_TRANSPOSE[spatial](x, weight, bias, strides, 0, output_padding, node.attr("group", 1), dilations)
    index = [slice(None), slice(None)] + [slice(pads[i], out.shape[2 + i] - pads[i + spatial]) for i in range(spatial)]
    return out[tuple(index)]


@rule("Gemm")
def _gemm(node: OnnxNode, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    a = a.t() if node.attr("transA", 0) else a
    b = b.t() if node.attr("transB", 0) else b
    out = node.attr("alpha", 1.0) * (a @ b)
    return out + node.attr("beta", 1.0) * c if c is not None else out


@rule("MatMul")
def _matmul(node: OnnxNode, a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


@rule("BatchNormalization")
def _batch_norm(node: OnnxNode, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    # inference form: the running statistics are the model's constants (training mode is not run)
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=node.attr("epsilon", 1e-5))


@rule("LayerNormalization")
def _layer_norm(node: OnnxNode, x: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    axis = node.attr("axis", -1) % x.dim()
    return F.layer_norm(x, list(x.shape[axis:]), scale, bias, node.attr("epsilon", 1e-5))


@rule("InstanceNormalization")
def _instance_norm(node: OnnxNode, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=node.attr("epsilon", 1e-5))


# -- pooling and reductions ---------------------------------------------------------------------


@rule("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node: OnnxNode, x: Tensor) -> Tensor:
    axes = tuple(range(2, x.dim()))
    return x.mean(dim=axes, keepdim=True) if node.op == "GlobalAveragePool" else x.amax(dim=axes, keepdim=True)


@rule("AveragePool", "MaxPool")
def _pool(node: OnnxNode, x: Tensor) -> Tensor:
    spatial = x.dim() - 2
    kernel = node.attr("kernel_shape")
    strides = node.attr("strides", [1] * spatial)
    dilations = node.attr("dilations", [1] * spatial)
    pads = _explicit_pads(node, x, kernel, strides, dilations)
    ceil = bool(node.attr("ceil_mode", 0))
    symmetric = pads[:spatial] == pads[spatial:] and all(p <= k // 2 for p, k in zip(pads[:spatial], kernel))
    if node.op == "MaxPool":
        function = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
        if symmetric:
            return function(x, kernel, strides, pads[:spatial], dilations, ceil_mode=ceil)
        return function(_padded(x, pads, -math.inf), kernel, strides, 0, dilations, ceil_mode=ceil)
    if any(d != 1 for d in dilations):
        raise UnsupportedModelError(f"node '{node.name}': AveragePool with dilations has no rule yet")
    function = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    include = bool(node.attr("count_include_pad", 0))
    if symmetric:
        return function(x, kernel, strides, pads[:spatial], ceil_mode=ceil, count_include_pad=include)
    if not include:
        raise UnsupportedModelError(f"node '{node.name}': AveragePool with uneven pads not counted has no rule yet")
    return function(_padded(x, pads), kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)


def _reduce_axes(node: OnnxNode, x: Tensor, axes: Tensor | None, inputs_from: int) -> list[int] | None:
    """The reduced axes (None: all), from the attribute before ``inputs_from`` opset, else the input."""
    listed = node.attr("axes") if node.opset < inputs_from else (ints(axes) if axes is not None else None)
    if not listed:
        return None if not (listed == [] and node.attr("noop_with_empty_axes", 0)) else []
    return [a % x.dim() for a in listed]


def _l2(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return torch.sqrt(torch.sum(x * x, dim=dim, keepdim=keepdim))


def _l1(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return torch.sum(torch.abs(x), dim=dim, keepdim=keepdim)


def _sum_square(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return torch.sum(x * x, dim=dim, keepdim=keepdim)


# op -> (function of (x, dim, keepdim), the opset from which axes come as an input)
_REDUCE: dict[str, tuple[Callable[..., Tensor], int]] = {
    "ReduceMean": (torch.mean, 18), "ReduceSum": (torch.sum, 13), "ReduceMax": (torch.amax, 18), "ReduceMin": (torch.amin, 18),
    "ReduceProd": (torch.prod, 18), "ReduceL2": (_l2, 18), "ReduceL1": (_l1, 18), "ReduceSumSquare": (_sum_square, 18),
    "ReduceLogSumExp": (torch.logsumexp, 18),
}


@rule(*_REDUCE)
def _reduce(node: OnnxNode, x: Tensor, axes: Tensor | None = None) -> Tensor:
    function, inputs_from = _REDUCE[node.op]
    dims = _reduce_axes(node, x, axes, inputs_from)
    keep = bool(node.attr("keepdims", 1))
    if dims == []:
        return x
    dims = dims if dims is not None else list(range(x.dim()))
    if node.op == "ReduceProd":
        for dim in sorted(dims, reverse=True):
            x = torch.prod(x, dim=dim, keepdim=keep)
        return x
    return function(x, dim=dims, keepdim=keep)


# -- data movement -----------------------------------------------------------------------------


@rule("Reshape")
def _reshape(node: OnnxNode, x: Tensor, shape: Tensor) -> Tensor:
    target = ints(shape)
    if not node.attr("allowzero", 0):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


@rule("Flatten")
def _flatten(node: OnnxNode, x: Tensor) -> Tensor:
    axis = node.attr("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


@rule("Transpose")
def _transpose(node: OnnxNode, x: Tensor) -> Tensor:
    return x.permute(node.attr("perm", list(reversed(range(x.dim())))))


@rule("Concat")
def _concat(node: OnnxNode, *xs: Tensor) -> Tensor:
    return torch.cat([x for x in xs if x is not None], dim=node.attr("axis"))


@rule("Split")
def _split(node: OnnxNode, x: Tensor, split: Tensor | None = None) -> list[Tensor]:
    axis = node.attr("axis", 0)
    sizes = node.attr("split") if node.opset < 13 else (ints(split) if split is not None else None)
    if not sizes:
        count = node.attr("num_outputs") or node.outputs
        size = math.ceil(x.shape[axis] / count)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(count)]
    return list(torch.split(x, list(sizes), dim=axis))


@rule("Slice")
def _slice(node: OnnxNode, x: Tensor, starts: Tensor | None = None, ends: Tensor | None = None, axes: Tensor | None = None,
           steps: Tensor | None = None) -> Tensor:
    if node.opset < 10:
        begin, end, dims, step = node.attr("starts"), node.attr("ends"), node.attr("axes"), None
    else:
        begin, end, dims, step = ints(starts), ints(ends), ints(axes) if axes is not None else None, ints(steps) if steps is not None else None
    dims = dims or list(range(len(begin)))
    step = step or [1] * len(begin)
    index: list[Any] = [slice(None)] * x.dim()
    flips = []
    for b, e, axis, s in zip(begin, end, dims, step):
        axis %= x.dim()
        size = x.shape[axis]
        if s > 0:
            b = min(max(b + size if b < 0 else b, 0), size)
            e = min(max(e + size if e < 0 else e, 0), size)
            index[axis] = slice(b, max(e, b), s)
        else:  # torch has no negative steps: take the range forwards, then flip it
            b = min(max(b + size if b < 0 else b, -1), size - 1)
            e = min(max(e + size if e < 0 else e, -1), size - 1)
            picked = list(range(b, e, s))
            index[axis] = slice(0, 0) if not picked else slice(picked[-1], picked[0] + 1, -s)
            flips.append(axis)
    out = x[tuple(index)]
    return torch.flip(out, flips) if flips else out


@rule("Gather")
def _gather(node: OnnxNode, x: Tensor, indices: Tensor) -> Tensor:
    axis = node.attr("axis", 0) % x.dim()
    flat = indices.long().reshape(-1)
    flat = torch.where(flat < 0, flat + x.shape[axis], flat)
    picked = torch.index_select(x, axis, flat)
    return picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]))


def _axes(node: OnnxNode, axes: Tensor | None) -> list[int] | None:
    listed = node.attr("axes") if node.opset < 13 else (ints(axes) if axes is not None else None)
    return list(listed) if listed is not None else None


@rule("Squeeze")
def _squeeze(node: OnnxNode, x: Tensor, axes: Tensor | None = None) -> Tensor:
    listed = _axes(node, axes)
    if listed is None:
        return x.reshape([d for d in x.shape if d != 1])
    dims = {a % x.dim() for a in listed}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in dims])


@rule("Unsqueeze")
def _unsqueeze(node: OnnxNode, x: Tensor, axes: Tensor | None = None) -> Tensor:
    listed = _axes(node, axes) or []
    rank = x.dim() + len(listed)
    shape = list(x.shape)
    for axis in sorted(a % rank for a in listed):
        shape.insert(axis, 1)
    return x.reshape(shape)


@rule("Shape")
def _shape(node: OnnxNode, x: Tensor) -> Tensor:
    dims = list(x.shape)
    start, end = node.attr("start", 0), node.attr("end")
    return torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64)


@rule("Size")
def _size(node: OnnxNode, x: Tensor) -> Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64)


@rule("ConstantOfShape")
def _constant_of_shape(node: OnnxNode, shape: Tensor) -> Tensor:
    value = node.attrs.get("value")
    fill = torch.from_numpy(onnx.numpy_helper.to_array(value).copy()) if value is not None else torch.zeros(1)
    return fill.reshape(()).expand(ints(shape)).clone()


@rule("Expand")
def _expand(node: OnnxNode, x: Tensor, shape: Tensor) -> Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(shape))))


@rule("Tile")
def _tile(node: OnnxNode, x: Tensor, repeats: Tensor) -> Tensor:
    return x.repeat(ints(repeats))


@rule("Range")
def _range(node: OnnxNode, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@rule("Pad")
def _pad(node: OnnxNode, x: Tensor, pads: Tensor | None = None, value: Tensor | None = None, axes: Tensor | None = None) -> Tensor:
    listed = node.attr("pads") if node.opset < 11 else ints(pads)
    fill = float(node.attr("value", 0.0)) if node.opset < 11 else (float(value.item()) if value is not None and value.numel() else 0.0)
    rank = x.dim()
    dims = [a % rank for a in ints(axes)] if axes is not None else list(range(rank))
    full = [0] * 2 * rank
    for i, axis in enumerate(dims):
        full[axis], full[axis + rank] = listed[i], listed[i + len(dims)]
    mode = node.attr("mode", "constant")
    torch_pads: list[int] = []
    for axis in reversed(range(rank)):
        torch_pads += [full[axis], full[axis + rank]]
    while len(torch_pads) > 2 and torch_pads[-1] == torch_pads[-2] == 0:  # torch pads only the trailing axes it is given
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        return F.pad(x, torch_pads, value=fill)
    return F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate"}[mode])


@rule("Resize", "Upsample")
def _resize(node: OnnxNode, x: Tensor, roi: Tensor | None = None, scales: Tensor | None = None, sizes: Tensor | None = None) -> Tensor:
    if node.op == "Upsample":  # opset 9: (x, scales)
        scales, sizes = roi, None
    mode = node.attr("mode", "nearest")
    transform = node.attr("coordinate_transformation_mode", "half_pixel" if node.op == "Resize" and node.opset >= 11 else "asymmetric")
    if sizes is not None and sizes.numel():
        size = ints(sizes)[2:]
    else:
        factors = [float(v) for v in scales.reshape(-1).tolist()] if scales is not None else []
        size = [math.floor(d * f) for d, f in zip(x.shape[2:], factors[2:])]
    if mode == "nearest":
        nearest = node.attr("nearest_mode", "round_prefer_floor")
        if transform == "asymmetric" and nearest == "floor":
            return F.interpolate(x, size=size, mode="nearest")
        if transform in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_floor", "round_prefer_ceil"):
            return F.interpolate(x, size=size, mode="nearest-exact")
    elif mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        linear = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 2]
        return F.interpolate(x, size=size, mode=linear, align_corners=transform == "align_corners")
    raise UnsupportedModelError(f"node '{node.name}': Resize mode={mode} coordinate_transformation_mode={transform} has no rule yet")


@rule("Einsum")
def _einsum(node: OnnxNode, *xs: Tensor) -> Tensor:
    return torch.einsum(node.attr("equation"), *xs)


@rule("ArgMax", "ArgMin")
def _arg(node: OnnxNode, x: Tensor) -> Tensor:
    function = torch.argmax if node.op == "ArgMax" else torch.argmin
    return function(x, dim=node.attr("axis", 0), keepdim=bool(node.attr("keepdims", 1)))


# -- quantization (fake: what QDQ computes, with gradients straight through the rounding) --------

_TORCH_INTEGER_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767), torch.int32: (-(2**31), 2**31 - 1)}


def along(value: Tensor, rank: int, axis: int) -> Tensor:
    """A per-tensor (one element) or per-axis (1-d) scale or zero point shaped to broadcast onto a
    tensor of ``rank`` dimensions along ``axis``."""
    if value.numel() == 1:
        return value.reshape(())
    shape = [1] * rank
    shape[axis % rank] = -1
    return value.reshape(shape)


def _per_axis(node: OnnxNode, x: Tensor, value: Tensor) -> Tensor:
    """A scale or zero point shaped to broadcast onto ``x`` along the node's axis."""
    return along(value, x.dim(), node.attr("axis", 1))


def straight_through_integers(x: Tensor, scale: Tensor, zero: Tensor, low: int, high: int) -> Tensor:
    """The integers (as floats) that QuantizeLinear makes of ``x``: round half to even, saturated, with
    gradients straight through the rounding inside the range."""
    scaled = x / scale
    rounded = scaled + (torch.round(scaled) - scaled).detach()  # rounded before the zero point is added, as ONNX says
    return torch.clamp(rounded + zero, low, high)


@rule("QuantizeLinear")
def _quantize(node: OnnxNode, x: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
    """The integers QuantizeLinear writes, kept as a float tensor so that gradients pass straight
    through the rounding (inside the range) to what it quantizes."""
    low, high = _TORCH_INTEGER_RANGES[zero_point.dtype] if zero_point is not None else (0, 255)
    zero = _per_axis(node, x, zero_point.to(x.dtype)) if zero_point is not None else torch.zeros((), dtype=x.dtype)
    return straight_through_integers(x, _per_axis(node, x, scale), zero, low, high)


class _FakeQuantize(torch.autograd.Function):
    """QuantizeLinear then DequantizeLinear as one op: the values the pair computes, the gradient
    straight through where the integers were not saturated. It keeps one boolean per element for the
    backward pass, where the pair's own rules kept several float tensors (MobileNetV2's QDQ model
    trained at 8.3 GB against 3.4 GB float)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero: Tensor, low: int, high: int) -> Tensor:  # type: ignore[override]
        q = torch.round(x / scale) + zero  # rounded before the zero point is added, as ONNX says
        ctx.save_for_backward((q >= low) & (q <= high))
        return (torch.clamp(q, low, high) - zero) * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(node: OnnxNode, inputs: list[Any]) -> list[Any]:
    """The rule of a QuantizeLinear whose every reader is a DequantizeLinear of the same scale and
    zero point (the graph module then reads its output as the pair's): their dequantized values."""
    x, scale, zero_point = inputs[0], inputs[1], inputs[2]
    low, high = _TORCH_INTEGER_RANGES[zero_point.dtype]
    zero = _per_axis(node, x, zero_point.to(x.dtype))
    return [_FakeQuantize.apply(x, _per_axis(node, x, scale.to(x.dtype)), zero, low, high)]


def pass_through(node: OnnxNode, inputs: list[Any]) -> list[Any]:
    """The rule of a DequantizeLinear fused into the QuantizeLinear before it: its input, as is."""
    return [inputs[0]]


@rule("DequantizeLinear")
def _dequantize(node: OnnxNode, q: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
    values = q.float() if not q.dtype.is_floating_point else q  # an integer initializer, or a fake-quantized float
    zero = _per_axis(node, values, zero_point.float()) if zero_point is not None else 0.0
    return (values - zero) * _per_axis(node, values, scale)


@rule("DynamicQuantizeLinear")
def _dynamic_quantize(node: OnnxNode, x: Tensor) -> list[Tensor]:
    """uint8 integers of ``x`` on the range of this very tensor (0 always inside it), as a float tensor
    whose gradient passes straight through the rounding; the scale and zero point it chose, as
    constants of this step (qdq's dynamic mode writes it before each MatMulInteger)."""
    with torch.no_grad():
        empty = x.numel() == 0  # onnxruntime gives an empty tensor scale 1 and zero point 0
        low = torch.zeros((), dtype=x.dtype) if empty else torch.clamp(x.min(), max=0.0)
        high = torch.zeros((), dtype=x.dtype) if empty else torch.clamp(x.max(), min=0.0)
        scale = (high - low) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero tensor: every integer is the zero point
        zero = torch.clamp(torch.round(-low / scale), 0, 255)
    return [straight_through_integers(x, scale, zero, 0, 255), scale.to(x.dtype), zero.to(torch.uint8)]


@rule("MatMulInteger")
def _matmul_integer(node: OnnxNode, a: Tensor, b: Tensor, a_zero: Tensor | None = None, b_zero: Tensor | None = None) -> Tensor:
    """The int32 products of two integer matrices less their zero points, as float32 (exact while the
    sums stay below 2^24): the activation side carries its straight-through gradient."""
    left = a.float() - (a_zero.float() if a_zero is not None else 0.0)
    right = b.float() - (b_zero.float() if b_zero is not None else 0.0)
    return torch.matmul(left, right)


# -- recurrent ---------------------------------------------------------------------------------

_GATE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Relu": torch.relu}


@rule("LSTM")
def _lstm(node: OnnxNode, x: Tensor, w: Tensor, r: Tensor, b: Tensor | None = None, sequence_lens: Tensor | None = None,
          initial_h: Tensor | None = None, initial_c: Tensor | None = None, peepholes: Tensor | None = None) -> list[Tensor]:
    """ONNX LSTM (gates i, o, f, c; forward, reverse or bidirectional), one step at a time."""
    if sequence_lens is not None or peepholes is not None or node.attr("clip") is not None or node.attr("input_forget", 0):
        raise UnsupportedModelError(f"node '{node.name}': LSTM with sequence_lens, peepholes, clip or input_forget has no rule yet")
    batch_first = bool(node.attr("layout", 0))
    x = x.transpose(0, 1) if batch_first else x  # [steps, batch, features]
    directions, hidden = w.shape[0], r.shape[-1]
    names = node.attr("activations") or ["Sigmoid", "Tanh", "Tanh"] * directions
    names = [n.decode() if isinstance(n, bytes) else n for n in names]
    h0 = initial_h.transpose(0, 1) if initial_h is not None and batch_first else initial_h
    c0 = initial_c.transpose(0, 1) if initial_c is not None and batch_first else initial_c
    reverse = node.attr("direction", "forward") == "reverse"
    outputs, last_h, last_c = [], [], []
    for d in range(directions):
        gate, cell, out = (_GATE_ACTIVATIONS[n] for n in names[3 * d: 3 * d + 3])
        bias = (b[d, : 4 * hidden] + b[d, 4 * hidden:]) if b is not None else 0.0
        h = h0[d] if h0 is not None else x.new_zeros(x.shape[1], hidden)
        c = c0[d] if c0 is not None else x.new_zeros(x.shape[1], hidden)
        steps = range(x.shape[0] - 1, -1, -1) if (reverse or d == 1) else range(x.shape[0])
        ys: list[Tensor] = [x] * x.shape[0]
        for t in steps:
            i, o, f, g = torch.split(x[t] @ w[d].t() + h @ r[d].t() + bias, hidden, dim=-1)
            c = gate(f) * c + gate(i) * cell(g)
            h = gate(o) * out(c)
            ys[t] = h
        outputs.append(torch.stack(ys))  # [steps, batch, hidden]
        last_h.append(h)
        last_c.append(c)
    y = torch.stack(outputs, dim=1)  # [steps, directions, batch, hidden]
    y_h, y_c = torch.stack(last_h), torch.stack(last_c)
    if batch_first:
        return [y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)]
    return [y, y_h, y_c]
