"""What is in a model and where its bytes are: the data behind ``onnxsparse inspect`` and the
before/after figures of every report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from .bitmask import chain_ops, decoded_in, hidden_by
from .errors import OnnxsparseError
from .graph import op_histogram, outer_scope_reads, tensor_array
from .io import LoadInfo, sparse_to_dense
from .shapes import infer_shapes  # shapes observed in onnxruntime where onnx cannot infer them
from .walk import iter_all_tensors, iter_attribute_tensors, iter_model_graphs, subgraphs_of
from .weightstore import data_bytes


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int]
    bytes: int
    sparsity: float  # fraction of exact zeros
    elements: int
    location: str  # initializer | Constant node | subgraph initializer | subgraph Constant node
    consumers: list[str]  # op types reading it
    sparse_encoded_bytes: int | None = None  # size on disk when the file holds it as sparse_initializer


@dataclass
class ModelSummary:
    source: str
    file_bytes: int
    ir_version: int
    opsets: dict[str, int]
    nodes: int
    parameters: int  # elements of every constant tensor read by a node (initializers and Constant nodes)
    nonzero_parameters: int
    parameter_bytes: int
    unused_tensors: int  # constant tensors no node reads (left in the file, counted apart)
    unused_bytes: int
    op_histogram: dict[str, int]
    tensors: list[TensorInfo] = field(default_factory=list)
    bytes_by_op: dict[str, int] = field(default_factory=dict)
    bytes_by_location: dict[str, int] = field(default_factory=dict)
    sparse_encoded: dict[str, int] = field(default_factory=dict)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """Op types reading each name; a name read inside a node's subgraph counts that node (If, Loop)."""
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
        for subgraph in subgraphs_of(node):
            for name in outer_scope_reads(subgraph):
                readers.setdefault(name, []).append(node.op_type)
    return readers


def tensor_infos(model: onnx.ModelProto) -> list[TensorInfo]:
    """Every constant tensor of the model, subgraphs included, with where it lives and who reads it."""
    infos = []
    for graph in iter_model_graphs(model):
        prefix = "subgraph " if graph is not model.graph else ""
        readers = _consumers(graph)
        masked = decoded_in(graph)
        parts = hidden_by(masked)  # an encoding's mask and values are not tensors of the model: what they decode to is
        for tensor in graph.initializer:
            if tensor.name not in parts:
                infos.append(_info(tensor, tensor.name, f"{prefix}initializer", readers.get(tensor.name, [])))
        for decoded in masked:
            info = _array_info(decoded.dense, decoded.name, f"{prefix}mask-encoded", readers.get(decoded.name, []))
            info.sparse_encoded_bytes = decoded.encoded_bytes
            infos.append(info)
        for sparse in graph.sparse_initializer:
            info = _info(sparse_to_dense(sparse), sparse.values.name, f"{prefix}sparse_initializer", readers.get(sparse.values.name, []))
            info.sparse_encoded_bytes = sparse.ByteSize()
            infos.append(info)
        for node, tensor in iter_attribute_tensors(graph):
            if node.op_type == "Constant" and node.output:
                infos.append(_info(tensor, node.output[0], f"{prefix}Constant node", readers.get(node.output[0], [])))
    return infos


def _info(tensor: onnx.TensorProto, name: str, location: str, consumers: list[str]) -> TensorInfo:
    return _array_info(tensor_array(tensor), name, location, consumers)  # memory-mapped when a weight store holds it


def _array_info(array: np.ndarray, name: str, location: str, consumers: list[str]) -> TensorInfo:
    zeros = zero_count(array) if array.dtype != object else 0
    return TensorInfo(
        name=name,
        dtype=str(array.dtype),
        shape=list(array.shape),
        bytes=int(array.nbytes),
        sparsity=zeros / array.size if array.size else 0.0,
        elements=int(array.size),
        location=location,
        consumers=sorted(set(consumers)),
    )


# Elements per comparison in :func:`zero_count`: bounds its temporary to 16 MB.
ZERO_COUNT_CHUNK = 2**24


def zero_count(array: np.ndarray) -> int:
    """How many elements are zero (-0.0 included). A float array is compared with 0 chunk by chunk:
    numpy counts a float array's non-zeros 2.5x slower than the booleans of ``array == 0`` (the
    input and output summaries of a 504 MB model took 0.4 s of a 5 s run)."""
    if array.dtype.kind != "f":
        return int(array.size - np.count_nonzero(array))
    flat = array.reshape(-1)
    return sum(int(np.count_nonzero(flat[start : start + ZERO_COUNT_CHUNK] == 0)) for start in range(0, flat.size, ZERO_COUNT_CHUNK))


def summarize(model: onnx.ModelProto, info: LoadInfo | None = None, *, with_tensors: bool = True) -> ModelSummary:
    tensors = tensor_infos(model)
    sparse = dict(info.densified) if info else {}
    for tensor in tensors:
        if tensor.name in sparse:
            tensor.sparse_encoded_bytes = sparse[tensor.name]
    used = [t for t in tensors if t.consumers]
    bytes_by_op: Counter[str] = Counter()
    for tensor in used:
        bytes_by_op["/".join(tensor.consumers)] += tensor.bytes
    bytes_by_location: Counter[str] = Counter()
    for tensor in tensors:
        bytes_by_location[tensor.location] += tensor.bytes
    histogram = op_histogram(model) - chain_ops(model)  # a mask chain rebuilds a weight: not a node of the model's
    return ModelSummary(
        source=info.source if info else "",
        file_bytes=info.file_bytes if info else model.ByteSize(),
        ir_version=model.ir_version,
        opsets={o.domain or "ai.onnx": o.version for o in model.opset_import},
        nodes=sum(histogram.values()),
        parameters=sum(t.elements for t in used),
        nonzero_parameters=sum(round(t.elements * (1 - t.sparsity)) for t in used),
        parameter_bytes=sum(t.bytes for t in used),
        unused_tensors=len(tensors) - len(used),
        unused_bytes=sum(t.bytes for t in tensors if not t.consumers),
        op_histogram=dict(histogram.most_common()),
        tensors=tensors if with_tensors else [],
        bytes_by_op=dict(bytes_by_op.most_common()),
        bytes_by_location=dict(bytes_by_location.most_common()),
        sparse_encoded=sparse,
    )


@dataclass(frozen=True)
class Footprint:
    """What a model's constant tensors take, read from their declared dims and types (no data is
    decoded), sparse tensors as stored (their indices packed): what the pass manager compares before
    and after a step."""

    bytes: int
    elements: int


def footprint(model: onnx.ModelProto) -> Footprint:
    """:class:`Footprint` of every constant tensor, subgraphs and sparse parts included."""
    total_bytes = total_elements = 0
    for tensor in iter_all_tensors(model):
        total_bytes += data_bytes(tensor)  # int4/uint4 packed two to a byte
        total_elements += int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    for graph in iter_model_graphs(model):  # a sparse tensor's indices as stored: packed varints, mostly
        for sparse in graph.sparse_initializer:
            declared = sum(int(np.prod(part.dims, dtype=np.int64)) * _itemsize(part) for part in (sparse.values, sparse.indices))
            total_bytes += sparse.ByteSize() - declared
    return Footprint(total_bytes, total_elements)


def _itemsize(tensor: onnx.TensorProto) -> int:
    try:
        return int(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    except (KeyError, TypeError, ValueError):  # strings, undefined: counted as bytes stored
        return 1


def count_macs(model: onnx.ModelProto) -> int | None:
    """Multiply-accumulates of the Conv, ConvTranspose, Gemm and MatMul nodes of the main graph for
    one sample (dynamic dims counted as 1), from inferred shapes; None when shapes are unknown."""
    work = count_work(model)
    return work.macs if work else None


@dataclass(frozen=True)
class Work:
    """What one sample costs to run: multiply-accumulates, and elements written by the main graph's
    nodes (what memory-bound ops such as depthwise convs and activations pay for)."""

    macs: int
    activation_elements: int


def count_work(model: onnx.ModelProto) -> Work | None:
    """:class:`Work` from inferred shapes (dynamic dims counted as 1); None when shapes are unknown."""
    shapes = _inferred_shapes(model)
    if shapes is None:
        return None
    macs = elements = 0
    constant = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" or all(name in constant for name in node.input if name):
            constant.update(node.output)  # weights and shape arithmetic: no work per sample
            continue
        elements += sum(int(np.prod(shapes[name])) for name in node.output if name in shapes)
        if node.op_type not in MAC_OPS:
            continue
        positions, arithmetic = MAC_OPS[node.op_type]
        operands = [shapes.get(node.input[i]) if i < len(node.input) else None for i in positions]
        output = shapes.get(node.output[0])
        if output is None or any(o is None for o in operands):
            return None
        macs += _node_macs(node, arithmetic, operands[0], operands[1], output)  # type: ignore[arg-type]
    return Work(macs, elements)


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int]] | None:
    try:
        inferred = infer_shapes(model)
    except OnnxsparseError:  # no figure rather than a wrong one
        return None
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim]
              for v in values if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    shapes.update({t.name: list(t.dims) for t in inferred.graph.initializer})
    for node in inferred.graph.node:
        if node.op_type == "Constant" and node.output:
            shapes[node.output[0]] = list(node.attribute[0].t.dims) if node.attribute[0].HasField("t") else []
    return shapes


# op type -> (input positions of its two operands, the float op whose multiply-accumulates it does):
# the integer kernels onnxruntime runs (and dynamic quantization writes) count like their float twins.
MAC_OPS: dict[str, tuple[tuple[int, int], str]] = {
    "Conv": ((0, 1), "Conv"), "ConvTranspose": ((0, 1), "ConvTranspose"), "Gemm": ((0, 1), "Gemm"), "MatMul": ((0, 1), "MatMul"),
    "ConvInteger": ((0, 1), "Conv"), "MatMulInteger": ((0, 1), "MatMul"), "QLinearConv": ((0, 3), "Conv"), "QLinearMatMul": ((0, 3), "MatMul"),
}


def _node_macs(node: onnx.NodeProto, arithmetic: str, a: list[int], b: list[int], out: list[int]) -> int:
    if arithmetic == "Conv":  # every output element sums C_in/group x kernel products
        return int(np.prod(out)) * int(np.prod(b[1:]))
    if arithmetic == "ConvTranspose":  # every input element scatters C_out/group x kernel products
        return int(np.prod(a)) * int(np.prod(b[1:]))
    if arithmetic == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return int(np.prod(out)) * (a[0] if trans_a else a[-1])
    return int(np.prod(out)) * (a[-1] if a else 1)
