"""Bit-mask encoding of mostly-zero tensors, in standard ONNX ops that onnxruntime folds at load.

ONNX's own ``sparse_initializer`` stores a position per non-zero value: a half-zero float32 tensor
keeps about nine tenths of its bytes (its indices cost nearly what its zeros did). Here a tensor is
instead one bit per element (set where the value is non-zero, packed eight to a byte, little-endian)
and its non-zero values in order, after one leading zero:

    mask (uint8 [ceil(N/8)]) -> Reshape [-1, 1] -> BitShift RIGHT by 0..7 -> Mod 2 -> Reshape [-1]
    -> Slice [0, N) -> Cast int -> CumSum -> Mul by itself  (0 at a zero, the value's rank elsewhere)
    -> Gather from values -> Reshape to the tensor's shape

A half-zero float32 tensor then takes 0.53x its bytes, int8 0.63x. Every input of the chain is an
initializer, so onnxruntime's constant folding (its basic level, on by default) turns the chain back
into the dense initializer when the session is made: inference runs exactly as before. The price is
paid at load: the folding holds about 24 bytes per encoded float32 element until it ends (:func:`fold_bytes`),
so a big model loads in several times the memory and time. The ops are
standard from opset 11 (BitShift, CumSum), so the onnx checker and other runtimes read the file too.
The values and the mask are ordinary initializers, so unlike ``sparse_initializer`` they can be
external data (a model over 2 GB).

The chain's own tensors are named ``onnxsparse_mask/<chain>/<step>``; :func:`densify_masked`
recognises the chain by those names and its exact ops, and puts the dense initializer back (every
onnxsparse command reads such a file as it was before encoding).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from .walk import iter_model_graphs
from .weightstore import SPILL_MIN_BYTES, WeightStore, read_external, store_of, stored_bytes

MASK_DECODE = "onnxsparse_mask/"  # the chain's own tensors: onnxsparse_mask/<chain>/<part>
MIN_OPSET = 11  # BitShift and CumSum
# what a type's chain needs beyond that: 4-bit Cast (21), bfloat16 Gather and Cast (13)
_TYPE_OPSET: dict[int, int] = {onnx.TensorProto.UINT4: 21, onnx.TensorProto.INT4: 21, onnx.TensorProto.BFLOAT16: 13}

# Gather, Reshape, Slice and Cast take every numeric type; these are the values worth encoding.
ENCODABLE = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16,
                       onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                       onnx.TensorProto.INT64, onnx.TensorProto.UINT4, onnx.TensorProto.INT4})
# 4-bit values have no Gather or Reshape kernel (and Gather no 4-bit type before opset 23): they are
# gathered as 8-bit and cast back (Cast takes them from opset 21, which a 4-bit tensor's model has).
_WIDENED: dict[int, int] = {onnx.TensorProto.UINT4: onnx.TensorProto.UINT8, onnx.TensorProto.INT4: onnx.TensorProto.INT8}

_BFLOAT16 = helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16)  # ml_dtypes' (numpy kind "V")
# constants every chain of a graph shares
_SHIFTS, _TWO, _COLUMN, _FLAT, _ZERO, _AXIS = (f"onnxsparse_mask_{name}" for name in ("shifts", "two", "column", "flat", "zero", "axis"))
_SHARED = (_SHIFTS, _TWO, _COLUMN, _FLAT, _ZERO, _AXIS)
# ranks up to this many elements are counted in int32 (half the memory onnxruntime folds the chain in)
_INT32_ELEMENTS = 2**31 - 1


def encodable(data_type: int, opset: int) -> bool:
    """Whether a tensor of ``data_type`` can be mask-encoded in a model at ``opset``."""
    return data_type in ENCODABLE and opset >= max(MIN_OPSET, _TYPE_OPSET.get(data_type, MIN_OPSET))


def stored_elements(flat: np.ndarray) -> np.ndarray:
    """Where a 1-D array's values must be stored: non-zero ones, and -0.0 (1 / -0.0 is -inf)."""
    present = flat != 0
    if flat.dtype.kind == "f" or flat.dtype == _BFLOAT16:
        present |= np.signbit(flat)
    return present


def masked_bytes(elements: int, nonzero: int, bits: int) -> int:
    """The bytes a tensor takes mask-encoded: its mask, and its non-zero values after one zero, of ``bits`` each."""
    return -(-elements // 8) + -(-(nonzero + 1) * bits // 8)


def fold_bytes(elements: int, data_type: int) -> int:
    """What onnxruntime holds while it folds one chain at load, besides the weight itself: its constant
    folding keeps every intermediate until the pass ends (the bits 4 bytes an element as uint8 steps,
    the ranks 12 in int32, the gathered values twice). Measured: a 168 MB model whose 42 M weights
    are all masks took 1.17 GB to load against 0.24 GB dense, 22 bytes an element (this estimate: 24)."""
    counter = 4 if elements <= _INT32_ELEMENTS else 8
    itemsize = 1 if data_type in _WIDENED else int(helper.tensor_dtype_to_np_dtype(data_type).itemsize)
    return elements * (4 + 3 * counter + 2 * itemsize)


@dataclass(frozen=True)
class MaskEncoding:
    """One tensor's encoding: the initializers that replace it and the nodes that rebuild it."""

    initializers: list[onnx.TensorProto]
    nodes: list[onnx.NodeProto]

    @property
    def nbytes(self) -> int:
        """What the encoding adds to the file: its tensors' data and the chain's nodes."""
        return sum(t.ByteSize() for t in self.initializers) + sum(n.ByteSize() for n in self.nodes)


def encode(name: str, dense: np.ndarray, chain: int, data_type: int) -> MaskEncoding:
    """``dense`` (any shape, of ONNX type ``data_type``) as a mask and its non-zero values, rebuilt
    under ``name`` by the chain numbered ``chain`` (unique in its graph: it names the chain's
    tensors, shorter than ``name``)."""
    flat = dense.reshape(-1)
    present = stored_elements(flat)
    elements = flat.size
    values = np.concatenate([np.zeros(1, dtype=flat.dtype), flat[present]])
    mask = np.packbits(present, bitorder="little")
    prefix = f"{MASK_DECODE}{chain}/"
    initializers = [numpy_helper.from_array(mask, f"{prefix}mask"), numpy_helper.from_array(values, f"{prefix}values"),  # 4-bit: packed
                    numpy_helper.from_array(np.array(dense.shape, dtype=np.int64), f"{prefix}shape")]
    if elements % 8:
        initializers.append(numpy_helper.from_array(np.array([elements], dtype=np.int64), f"{prefix}count"))
    return MaskEncoding(initializers, _chain_nodes(name, prefix, elements, data_type))


def _chain_nodes(name: str, prefix: str, elements: int, data_type: int) -> list[onnx.NodeProto]:
    """The chain that rebuilds ``name`` (``elements`` values of ``data_type``) from the initializers
    ``<prefix>mask``, ``values``, ``shape`` and, when ``elements`` is not a multiple of 8, ``count``."""
    counter = onnx.TensorProto.INT32 if elements <= _INT32_ELEMENTS else onnx.TensorProto.INT64

    def step(index: int) -> str:
        return f"{prefix}{index}"

    nodes = [helper.make_node("Reshape", [f"{prefix}mask", _COLUMN], [step(0)]),
             helper.make_node("BitShift", [step(0), _SHIFTS], [step(1)], direction="RIGHT"),
             helper.make_node("Mod", [step(1), _TWO], [step(2)]),
             helper.make_node("Reshape", [step(2), _FLAT], [step(3)])]
    bits = step(3)
    if elements % 8:
        nodes.append(helper.make_node("Slice", [bits, _ZERO, f"{prefix}count"], [step(4)]))
        bits = step(4)
    nodes += [helper.make_node("Cast", [bits], [step(5)], to=counter),
              helper.make_node("CumSum", [step(5), _AXIS], [step(6)]),
              helper.make_node("Mul", [step(6), step(5)], [step(7)])]  # 0 at a zero: values[0] is 0
    values_read = f"{prefix}values"
    if data_type in _WIDENED:
        nodes.append(helper.make_node("Cast", [values_read], [step(10)], to=_WIDENED[data_type]))
        values_read = step(10)
    nodes.append(helper.make_node("Gather", [values_read, step(7)], [step(8)], axis=0))
    if data_type in _WIDENED:
        nodes += [helper.make_node("Reshape", [step(8), f"{prefix}shape"], [step(9)]), helper.make_node("Cast", [step(9)], [name], to=data_type)]
    else:
        nodes.append(helper.make_node("Reshape", [step(8), f"{prefix}shape"], [name]))
    return nodes


def shared_constants() -> list[onnx.TensorProto]:
    """The constants every chain of a graph reads, added once."""
    return [numpy_helper.from_array(np.arange(8, dtype=np.uint8), _SHIFTS), numpy_helper.from_array(np.array(2, dtype=np.uint8), _TWO),
            numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), _COLUMN), numpy_helper.from_array(np.array([-1], dtype=np.int64), _FLAT),
            numpy_helper.from_array(np.array([0], dtype=np.int64), _ZERO), numpy_helper.from_array(np.array(0, dtype=np.int64), _AXIS)]


def declared(model: onnx.ModelProto) -> Iterator[tuple[str, list[int], int]]:
    """(name, shape, element type) of every mask-encoded tensor, as its shape initializer declares it,
    read before anything is decoded (so a caller can bound what decoding would allocate)."""
    for graph in iter_model_graphs(model):
        tensors = {t.name: t for t in graph.initializer}
        _, made = _chains(graph)
        for name, tensor in tensors.items():
            prefix = name.removesuffix("shape")
            if name.startswith(MASK_DECODE) and name.endswith("/shape") and (values := tensors.get(f"{prefix}values")):
                yield made.get(prefix, prefix), [int(d) for d in _array(tensor).reshape(-1)], values.data_type


@dataclass(frozen=True)
class Decoded:
    """One mask-encoded tensor of a graph, decoded."""

    name: str
    dense: np.ndarray
    encoded_bytes: int  # its mask and values as stored
    own: list[str]  # the initializers only its chain reads
    nodes: list[onnx.NodeProto]


def decoded_in(graph: onnx.GraphProto) -> list[Decoded]:
    """Every mask-encoded tensor of ``graph`` (not its subgraphs); a chain that is not exactly
    :func:`encode`'s is a ValueError."""
    chains, names = _chains(graph)
    initializers = {t.name: t for t in graph.initializer}
    chains = {prefix: nodes for prefix, nodes in chains.items() if f"{prefix}mask" in initializers}  # a plain model's own names
    if not chains:
        return []
    found = []
    for prefix, nodes in chains.items():
        name = names.get(prefix, prefix)
        dense, own = _decoded(name, prefix, nodes, initializers)
        found.append(Decoded(name, dense, sum(stored_bytes(initializers[part]) for part in own), own, nodes))
    return found


def _chains(graph: onnx.GraphProto) -> tuple[dict[str, list[onnx.NodeProto]], dict[str, str]]:
    """The nodes of each chain of ``graph`` by its prefix (``onnxsparse_mask/<chain>/``), and the tensor each makes."""
    chains: dict[str, list[onnx.NodeProto]] = {}
    names: dict[str, str] = {}
    for node in graph.node:
        made = node.output[0] if node.output else ""
        if made.startswith(MASK_DECODE):
            chains.setdefault(made.rpartition("/")[0] + "/", []).append(node)
            continue
        read = next((name for name in node.input if name.startswith(MASK_DECODE) and name.rpartition("/")[2].isdigit()), None)
        if read is not None:  # the chain's last node: it makes the tensor itself
            prefix = read.rpartition("/")[0] + "/"
            chains.setdefault(prefix, []).append(node)
            names[prefix] = made
    return chains, names


def chain_ops(model: onnx.ModelProto) -> Counter[str]:
    """The op types of every mask chain's nodes, counted: nodes that only rebuild a weight."""
    counted: Counter[str] = Counter()
    for graph in iter_model_graphs(model):
        chains, _ = _chains(graph)
        initializers = {t.name for t in graph.initializer}
        counted.update(node.op_type for prefix, nodes in chains.items() if f"{prefix}mask" in initializers for node in nodes)
    return counted


def hidden_by(decoded: list[Decoded]) -> set[str]:
    """The initializers that are parts of the encodings (theirs and the shared constants), not tensors of the model."""
    return {part for tensor in decoded for part in tensor.own} | (set(_SHARED) if decoded else set())


def densify_masked(model: onnx.ModelProto) -> dict[str, int]:
    """Replace every mask-encoded tensor by its dense initializer, in place. Returns the names with
    their encoded size in bytes; a chain that is not exactly :func:`encode`'s is a ValueError."""
    densified: dict[str, int] = {}
    store = store_of(model)
    for graph in iter_model_graphs(model):
        decoded = decoded_in(graph)
        if not decoded:
            continue
        chain_nodes = {id(node) for tensor in decoded for node in tensor.nodes}
        kept_nodes = [node for node in graph.node if id(node) not in chain_nodes]
        del graph.node[:]
        graph.node.extend(kept_nodes)
        read = {name for node in graph.node for name in node.input}
        own = {part for tensor in decoded for part in tensor.own}
        kept = [t for t in graph.initializer if t.name not in own and (t.name not in _SHARED or t.name in read)]
        del graph.initializer[:]
        graph.initializer.extend([*kept, *(_held(tensor.dense, tensor.name, store) for tensor in decoded)])
        densified.update({tensor.name: tensor.encoded_bytes for tensor in decoded})
    return densified


def _decoded(name: str, prefix: str, nodes: list[onnx.NodeProto], initializers: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, list[str]]:
    """The dense tensor a chain rebuilds, and its own initializers' names. The chain must be exactly
    what :func:`encode` writes for it (ops, wiring, attributes and constants, in any node order): a
    decoder that read other weights than onnxruntime folds would report what the file does not run."""
    own = [f"{prefix}{part}" for part in ("mask", "values", "shape")]
    missing = [part for part in own if part not in initializers]
    if missing:
        raise ValueError(f"tensor '{name}': its mask-decoding initializer '{missing[0]}' is missing")
    mask, values, shape = (_array(initializers[part]) for part in own)
    if mask.dtype != np.uint8 or mask.ndim != 1 or shape.dtype != np.int64 or shape.ndim != 1 or values.ndim != 1 or not values.size:
        raise ValueError(f"tensor '{name}': its mask-decoding initializers are not a 1-D uint8 mask, 1-D values and a 1-D int64 shape")
    elements = int(np.prod(shape, dtype=np.int64))
    if (shape < 0).any() or mask.size != -(-elements // 8):
        raise ValueError(f"tensor '{name}': its mask of {mask.size} bytes does not fit its shape {shape.tolist()}")
    present = np.unpackbits(mask, bitorder="little", count=elements).astype(bool)
    if int(present.sum()) != values.size - 1:
        raise ValueError(f"tensor '{name}': its mask and its {values.size - 1} values do not agree on the non-zero count")
    dense = np.zeros(elements, dtype=values.dtype)
    dense[present] = values[1:]
    dense = dense.reshape(shape)
    count = f"{prefix}count"
    expected = _chain_nodes(name, prefix, elements, initializers[own[1]].data_type)  # the nodes only: the data was checked above
    if (sorted(n.SerializeToString() for n in nodes) != sorted(n.SerializeToString() for n in expected)
            or (elements % 8 and (count not in initializers or _array(initializers[count]).tolist() != [elements]))):
        raise ValueError(f"tensor '{name}': its mask-decoding nodes are not the chain onnxsparse writes ({', '.join(n.op_type for n in nodes)})")
    for constant in shared_constants():
        if constant.name in {i for n in nodes for i in n.input} and (
                constant.name not in initializers or not np.array_equal(_array(initializers[constant.name]), numpy_helper.to_array(constant))):
            raise ValueError(f"tensor '{name}': its mask-decoding constant '{constant.name}' is not the one onnxsparse writes")
    return dense, own + ([count] if count in initializers else [])


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    return read_external(tensor) if external_data_helper.uses_external_data(tensor) else numpy_helper.to_array(tensor)


def _held(dense: np.ndarray, name: str, store: WeightStore | None) -> onnx.TensorProto:
    """A decoded tensor, in the model's weight store when it has one (a model past 2 GB stays one
    that protobuf can write), else in the message."""
    held = store.put(dense, name) if store is not None and dense.nbytes >= SPILL_MIN_BYTES else None
    return held if held is not None else numpy_helper.from_array(dense, name)
