"""``sparse-encode``: store sparse-enough initializers as ONNX ``sparse_initializer``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import tensor_array
from ..io import EXTERNAL_DATA_THRESHOLD_BYTES
from ..limits import SPARSE_MESSAGE_BYTES, format_bytes
from ..weightstore import store_of, stored_bytes
from .base import Change, Pass, PassContext, PassResult, Skip, register

_INDEX_DTYPES = {"int64": (np.int64, onnx.TensorProto.INT64), "int32": (np.int32, onnx.TensorProto.INT32)}


@register
@dataclass(frozen=True)
class SparseEncode(Pass):
    """Store initializers as sparse_initializer (values + linear indices) wherever that makes them clearly smaller.

    Runs last: the saving is on disk and in transfer; onnxruntime densifies at load, so inference is
    unchanged. A tensor is encoded when that saves at least ``min_saving`` of its bytes: many tools
    reject sparse initializers, and a half-zero tensor saves about a tenth (its indices cost nearly
    what its zeros did), which is not worth that. Indices are written whichever way is smaller, as packed varints (3 bytes for a tensor
    under 2M elements) or raw; ``index_dtype=int32`` is loaded by onnxruntime but rejected by the onnx
    checker, so it is reported as non-standard. ``onnxsparse densify`` turns the file back into a
    plain one; every onnxsparse command reads it as it is.
    """

    name = "sparse-encode"
    must_be_last: ClassVar[bool] = True

    index_dtype: Literal["int64", "int32"] = field(default="int64", metadata={"help": "int32 is smaller but fails the onnx checker"})
    min_size: int = field(default=16, metadata={"help": "leave tensors with fewer elements dense"})
    min_saving: float = field(default=0.25, metadata={"help": "encode a tensor only when that saves at least this share of its bytes"})

    def __post_init__(self) -> None:
        if not 0 <= self.min_saving < 1:
            raise ValueError(f"min_saving {self.min_saving} is outside [0, 1)")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        result = PassResult(model, standard=self.index_dtype == "int64")
        graph = model.graph
        graph_inputs = {value.name for value in graph.input}
        keep_dense = []
        # Sparse tensors stay in the message (the onnx checker cannot read them from external data):
        # encoding stops before the message passes protobuf's 2 GB limit, or, in a model whose weights
        # are external, spends more than SPARSE_MESSAGE_BYTES on them.
        message = model.ByteSize()
        external = store_of(model) is not None
        budget = message + SPARSE_MESSAGE_BYTES if external else EXTERNAL_DATA_THRESHOLD_BYTES
        full = (f"kept dense: sparse tensors cannot be external data, and those encoded already take the {format_bytes(SPARSE_MESSAGE_BYTES)} "
                "the .onnx file may hold of them beside its external data" if external else "kept dense: encoded, the model would pass protobuf's 2 GB limit")
        for tensor in graph.initializer:
            encoded, reason = self._encode(tensor, graph_inputs, budget - message, full)
            if encoded is None:
                keep_dense.append(tensor)
                if reason:
                    result.skipped.append(Skip(tensor.name, reason))
                continue
            message += encoded.ByteSize() - tensor.ByteSize()
            graph.sparse_initializer.append(encoded)
            result.changes.append(Change(tensor.name, "sparse-encoded", {
                "dense_bytes": stored_bytes(tensor), "encoded_bytes": encoded.ByteSize(),
                "density": round(int(encoded.values.dims[0]) / int(np.prod(tensor.dims, dtype=np.int64)), 6),
                "index_dtype": self.index_dtype,
            }))
        if not result.changes and not result.skipped:
            result.skipped.append(Skip("model", f"no initializer of {self.min_size} or more elements is sparse enough to save "
                                                f"{self.min_saving:g} of its bytes encoded (at most ~1/3 non-zero with int64 indices)"))
        if result.changes:
            del graph.initializer[:]
            graph.initializer.extend(keep_dense)
        saved = sum(c.details["dense_bytes"] - c.details["encoded_bytes"] for c in result.changes)
        result.figures.update(tensors_encoded=len(result.changes), bytes_saved=saved, index_dtype=self.index_dtype)
        if not result.standard:
            result.warnings.append("sparse-encode{index_dtype=int32}: onnxruntime loads this file, the onnx checker and most tools reject it")
        return result

    def _encode(self, tensor: onnx.TensorProto, graph_inputs: set[str], room: int, full: str) -> tuple[onnx.SparseTensorProto | None, str]:
        """The sparse form of ``tensor`` when it is smaller than the dense one and takes less than
        ``room`` bytes of the message (else None, with ``full`` as the reason); or None and why not."""
        if tensor.name in graph_inputs:
            return None, "also a graph input (overridable): kept dense"
        if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            return None, ""
        size = int(np.prod(tensor.dims, dtype=np.int64))
        if size < self.min_size:
            return None, ""
        dense = tensor_array(tensor).reshape(-1)
        positions = np.flatnonzero(dense)
        if positions.size > 0.6 * size:
            return None, ""  # above this, no index encoding is smaller; dense tensors get no report line
        numpy_dtype, _ = _INDEX_DTYPES[self.index_dtype]
        raw_bytes, varint_bytes = positions.size * np.dtype(numpy_dtype).itemsize, _varint_bytes(positions)
        # sized before it is built: a packed-varint list of millions of indices takes seconds to build
        estimate = dense.dtype.itemsize * positions.size + min(raw_bytes, varint_bytes)
        dense_bytes = stored_bytes(tensor)
        most = dense_bytes * (1 - self.min_saving)
        not_worth = (f"density {positions.size / size:.2f}: encoded, it would take {estimate / dense_bytes:.2f}x its dense bytes "
                     f"(encoded when at most {1 - self.min_saving:.2f}x: min_saving={self.min_saving:g}; min_saving=0 encodes whatever gets smaller)")
        if estimate >= most:
            return None, not_worth
        if estimate >= room:
            return None, full
        encoded = self._encoded(tensor, dense[positions], positions, raw=raw_bytes < varint_bytes)
        if encoded.ByteSize() >= most:
            return None, not_worth
        return encoded, ""

    def _encoded(self, tensor: onnx.TensorProto, values: np.ndarray, positions: np.ndarray, *, raw: bool) -> onnx.SparseTensorProto:
        """The encoding with raw indices or packed-varint ones (the smaller, chosen by the caller)."""
        numpy_dtype, onnx_dtype = _INDEX_DTYPES[self.index_dtype]
        value_tensor = numpy_helper.from_array(values, name=tensor.name)
        typed = positions.astype(numpy_dtype)
        indices = onnx.helper.make_tensor("", onnx_dtype, [positions.size], typed.tobytes() if raw else typed.tolist(), raw=raw)
        return onnx.helper.make_sparse_tensor(value_tensor, indices, list(tensor.dims))


_VARINT_STEPS = 2 ** (7 * np.arange(1, 10, dtype=np.uint64))  # a varint takes one more byte at each


def _varint_bytes(positions: np.ndarray) -> int:
    """The bytes of ``positions`` (non-negative) as protobuf varints."""
    return int(positions.size + np.searchsorted(_VARINT_STEPS, positions.astype(np.uint64), side="right").sum())
