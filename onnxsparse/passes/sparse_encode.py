"""``sparse-encode``: store mostly-zero initializers as bit masks (bitmask.py) or ONNX ``sparse_initializer``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from ..bitmask import MIN_OPSET, MaskEncoding, encodable, encode, fold_bytes, masked_bytes, shared_constants, stored_elements
from ..graph import opset_version, tensor_array
from ..io import EXTERNAL_DATA_THRESHOLD_BYTES
from ..limits import SPARSE_MESSAGE_BYTES, format_bytes
from ..weightstore import PACKED_BITS, store_of, stored_bytes
from .base import Change, Pass, PassContext, PassResult, Skip, register

# A mask costs a folding at load (standard ops), so it is worth less than coo, a sparse_initializer
# many tools reject: a half-zero 4-bit tensor (cluster's indices after pruning) saves 0.27 of its bytes
# as a mask, with the chain's nodes a little less; a half-zero float32 tensor saves ~0.1 as coo.
MASK_MIN_SAVING, COO_MIN_SAVING = 0.1, 0.25
_INDEX_DTYPES = {"int64": (np.int64, onnx.TensorProto.INT64), "int32": (np.int32, onnx.TensorProto.INT32)}


@register
@dataclass(frozen=True)
class SparseEncode(Pass):
    """Store mostly-zero initializers in fewer bytes, wherever that makes them clearly smaller.

    Two encodings (``format``): ``mask``, one bit per element and the non-zero values, rebuilt by a
    chain of standard ops that onnxruntime folds when it loads the model (bitmask.py; needs opset 11:
    a half-zero float32 tensor takes 0.53x its bytes, int8 0.63x); and ``coo``, ONNX's own
    sparse_initializer (values + linear indices), which onnxruntime densifies at load, smaller only
    below about 4% density, and which stays in the .onnx message (never external data). ``auto``
    takes the smaller per tensor. The mask's price is paid at load: onnxruntime's folding holds about
    24 bytes per encoded float32 element until it ends (a 168 MB model of masks loaded in 1.17 GB and 1.5 s,
    dense in 0.24 GB and 0.3 s), which the report states; so it is asked for, not the default. Runs last: the saving is on disk and in transfer; inference is
    unchanged. A tensor is encoded when that saves at least ``min_saving`` of its bytes (by default
    a tenth as a mask, a quarter as coo, which many tools reject). ``coo``
    indices are written whichever way is smaller, as packed varints (3 bytes for a tensor under 2M
    elements) or raw; ``index_dtype=int32`` is loaded by onnxruntime but rejected by the onnx
    checker, so it is reported as non-standard. ``onnxsparse densify`` turns the file back into a
    plain one; every onnxsparse command reads it as it is.
    """

    name = "sparse-encode"
    must_be_last: ClassVar[bool] = True

    format: Literal["coo", "mask", "auto"] = field(default="coo", metadata={
        "help": "coo: sparse_initializer; mask: a bit per element and the non-zero values (standard ops that onnxruntime folds at load, "
                "holding ~24 bytes per encoded float32 element while it does); auto: the smaller per tensor"})
    index_dtype: Literal["int64", "int32"] = field(default="int64", metadata={"help": "int32 is smaller but fails the onnx checker (coo)"})
    min_size: int = field(default=16, metadata={"help": "leave tensors with fewer elements dense"})
    min_saving: float | None = field(default=None, metadata={
        "help": f"encode a tensor only when that saves at least this share of its bytes (default {MASK_MIN_SAVING:g} for a mask, "
                f"{COO_MIN_SAVING:g} for coo)"})

    def __post_init__(self) -> None:
        if self.min_saving is not None and not 0 <= self.min_saving < 1:
            raise ValueError(f"min_saving {self.min_saving} is outside [0, 1)")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        result = PassResult(model, standard=self.index_dtype == "int64")
        graph = model.graph
        graph_inputs = {value.name for value in graph.input}
        opset = opset_version(model)
        if self.format == "mask" and opset < MIN_OPSET:
            result.warnings.append(f"sparse-encode{{format=mask}}: opset {opset} is below {MIN_OPSET} (BitShift, CumSum): nothing encoded")
        keep_dense: list[onnx.TensorProto] = []
        masked: list[MaskEncoding] = []
        # Sparse tensors stay in the message (the onnx checker cannot read them from external data):
        # encoding stops before the message passes protobuf's 2 GB limit, or, in a model whose weights
        # are external, spends more than SPARSE_MESSAGE_BYTES on them. Mask encodings are ordinary
        # initializers, external like any other.
        message = model.ByteSize()
        external = store_of(model) is not None
        budget = message + SPARSE_MESSAGE_BYTES if external else EXTERNAL_DATA_THRESHOLD_BYTES
        full = (f"kept dense: sparse tensors cannot be external data, and those encoded already take the {format_bytes(SPARSE_MESSAGE_BYTES)} "
                "the .onnx file may hold of them beside its external data" if external else "kept dense: encoded, the model would pass protobuf's 2 GB limit")
        for tensor in graph.initializer:
            encoded, reason = self._encode(tensor, graph_inputs, budget - message, full, opset, len(masked))
            if encoded is None:
                keep_dense.append(tensor)
                if reason:
                    result.skipped.append(Skip(tensor.name, reason))
                continue
            dense_elements = int(np.prod(tensor.dims, dtype=np.int64))
            if isinstance(encoded, MaskEncoding):
                masked.append(encoded)
                nonzero = int(encoded.initializers[1].dims[0]) - 1
                details = {"format": "mask", "dense_bytes": stored_bytes(tensor), "encoded_bytes": encoded.nbytes,
                           "fold_bytes": fold_bytes(dense_elements, tensor.data_type)}
            else:
                message += encoded.ByteSize() - tensor.ByteSize()
                graph.sparse_initializer.append(encoded)
                nonzero = int(encoded.values.dims[0])
                details = {"format": "coo", "dense_bytes": stored_bytes(tensor), "encoded_bytes": encoded.ByteSize(), "index_dtype": self.index_dtype}
            details["density"] = round(nonzero / dense_elements, 6)
            result.changes.append(Change(tensor.name, "sparse-encoded", details))
        if not result.changes and not result.skipped:
            result.skipped.append(Skip("model", f"no initializer of {self.min_size} or more elements is sparse enough to save "
                                                f"{self._least_saving('coo' if self.format == 'coo' else 'mask'):g} of its bytes encoded"))
        if result.changes:
            del graph.initializer[:]
            graph.initializer.extend(keep_dense)
        if masked:
            read = {name for encoding in masked for node in encoding.nodes for name in node.input}
            shared = [t for t in shared_constants() if t.name in read]  # an unread initializer makes onnxruntime warn
            graph.initializer.extend([*shared, *(t for encoding in masked for t in encoding.initializers)])
            nodes = [*(n for encoding in masked for n in encoding.nodes), *graph.node]  # before every reader
            del graph.node[:]
            graph.node.extend(nodes)
            folding = sum(c.details.get("fold_bytes", 0) for c in result.changes)
            result.figures["load_fold_bytes"] = folding
            result.warnings.append(f"sparse-encode: onnxruntime holds about {format_bytes(folding)} more while it loads this file, "
                                   f"to decode its {len(masked)} mask-encoded tensor(s) (format=coo does not)")
        saved = sum(c.details["dense_bytes"] - c.details["encoded_bytes"] for c in result.changes)
        result.figures.update(tensors_encoded=len(result.changes), bytes_saved=saved, format=self.format,
                              masked=len(masked), index_dtype=self.index_dtype)
        if not result.standard:
            result.warnings.append("sparse-encode{index_dtype=int32}: onnxruntime loads this file, the onnx checker and most tools reject it")
        return result

    def _encode(self, tensor: onnx.TensorProto, graph_inputs: set[str], room: int, full: str,
                opset: int, chain: int) -> tuple[onnx.SparseTensorProto | MaskEncoding | None, str]:
        """The smaller encoding of ``tensor`` that saves its share of bytes (:meth:`_least_saving`;
        a sparse one also within ``room`` bytes of the message, else None with ``full`` as the
        reason); or None and why not."""
        if tensor.name in graph_inputs:
            return None, "also a graph input (overridable): kept dense"
        if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            return None, ""
        size = int(np.prod(tensor.dims, dtype=np.int64))
        if size < max(self.min_size, 1):
            return None, ""
        dense = tensor_array(tensor).reshape(-1)
        positions = np.flatnonzero(stored_elements(dense))  # -0.0 is stored: 1 / -0.0 is -inf
        dense_bytes = stored_bytes(tensor)
        # sized before either is built (a packed-varint list of millions of indices takes seconds to build)
        packed = tensor.data_type in PACKED_BITS
        bits = PACKED_BITS[tensor.data_type] if packed else 8 * dense.dtype.itemsize
        mask_bytes = masked_bytes(size, positions.size, bits) if self.format != "coo" and encodable(tensor.data_type, opset) else None
        # onnxruntime cannot densify a sparse tensor of packed (4-bit) values; coo must also fit the message
        coo_bytes, raw = self._coo_bytes(positions, dense.dtype.itemsize) if self.format != "mask" and not packed else (None, False)
        coo_full = coo_bytes is not None and coo_bytes >= room
        if coo_full and mask_bytes is not None:
            coo_bytes = None
        if mask_bytes is None and coo_bytes is None:
            return None, ""
        if positions.size > (0.9 if mask_bytes is not None else 0.6) * size:
            return None, ""  # above this, no encoding is smaller: dense tensors get no report line
        if mask_bytes is not None and (coo_bytes is None or mask_bytes <= coo_bytes):
            if mask_bytes >= dense_bytes * (1 - self._least_saving("mask")):
                return None, self._not_worth(positions.size / size, mask_bytes / dense_bytes, "mask")
            masked = encode(tensor.name, dense.reshape(tuple(tensor.dims)), chain, tensor.data_type)
            # the chain's nodes cost bytes too (a kilobyte or two: its tensors' names), which a small tensor notices
            if masked.nbytes < dense_bytes * (1 - self._least_saving("mask")) and (coo_bytes is None or masked.nbytes <= coo_bytes):
                return masked, ""
            if coo_bytes is None:
                return None, self._not_worth(positions.size / size, masked.nbytes / dense_bytes, "mask")
        assert coo_bytes is not None
        most = dense_bytes * (1 - self._least_saving("coo"))
        if coo_bytes >= most:
            return None, self._not_worth(positions.size / size, coo_bytes / dense_bytes, "coo")
        if coo_full:
            return None, full
        encoded = self._encoded(tensor, dense[positions], positions, raw=raw)
        if encoded.ByteSize() >= most:
            return None, self._not_worth(positions.size / size, encoded.ByteSize() / dense_bytes, "coo")
        return encoded, ""

    def _least_saving(self, encoding: str) -> float:
        """The share of its bytes an encoding must save: ``min_saving``, by default less for a mask
        (standard ops, folded at load) than for coo (a sparse_initializer many tools reject)."""
        if self.min_saving is not None:
            return self.min_saving
        return MASK_MIN_SAVING if encoding == "mask" else COO_MIN_SAVING

    def _not_worth(self, density: float, ratio: float, encoding: str) -> str:
        least = self._least_saving(encoding)
        return (f"density {density:.2f}: encoded ({encoding}), it would take {ratio:.2f}x its dense bytes (encoded when at most "
                f"{1 - least:.2f}x: min_saving={least:g}; min_saving=0 encodes whatever gets smaller)")

    def _coo_bytes(self, positions: np.ndarray, itemsize: int) -> tuple[int, bool]:
        """What the sparse_initializer would take (its values and the smaller form of its indices), and
        whether that form is raw indices rather than packed varints."""
        raw_bytes = positions.size * np.dtype(_INDEX_DTYPES[self.index_dtype][0]).itemsize
        varint_bytes = _varint_bytes(positions)
        return itemsize * positions.size + min(raw_bytes, varint_bytes), raw_bytes < varint_bytes

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
