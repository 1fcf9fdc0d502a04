"""The few graph helpers every pass needs: walking (sub)graphs, reading weights read-only, and
moving between ``onnx.ModelProto`` and onnx-graphsurgeon without losing what graphsurgeon drops.

The ModelProto is the canonical form between passes (the checker and onnxruntime read it); a pass
that edits topology imports it into onnx-graphsurgeon with :func:`to_gs` and exports it back with
:func:`from_gs`.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, numpy_helper

from .errors import InputDataError
from .walk import iter_model_graphs, subgraphs_of
from .weightstore import SPILL_MIN_BYTES, WeightStore, data_bytes, read_external, store_of, store_of_tensor

# graphsurgeon prints its warnings to stdout, which would corrupt `--json` output; passes report
# what matters through their results instead.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A read-only numpy view of a tensor, so that a pass writing into shared weights fails loudly
    (memory-mapped when a weight store holds it: see weightstore.py)."""
    if external_data_helper.uses_external_data(tensor):
        return read_external(tensor)
    array = numpy_helper.to_array(tensor)
    array.flags.writeable = False
    return array


def op_histogram(model: onnx.ModelProto) -> Counter[str]:
    """How many nodes of each op type the model holds, subgraphs included (``domain:op`` outside ai.onnx)."""
    histogram: Counter[str] = Counter()
    for graph in iter_model_graphs(model):
        for node in graph.node:
            histogram[f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    return histogram


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    """The model's opset for a domain ('' is ai.onnx); 0 when the domain is not imported."""
    for opset in model.opset_import:
        if opset.domain in (domain, "ai.onnx" if domain == "" else domain):
            return opset.version
    return 0


MICROSOFT_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (MatMulNBits, DynamicQuantizeLSTM, ...)


def import_domain(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    """Declare ``domain`` among the model's opsets, in place, unless it is (graphsurgeon may have added it)."""
    if not any(opset.domain == domain for opset in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def at_opset(model: onnx.ModelProto, wanted: int) -> onnx.ModelProto:
    """``model`` at default-domain opset ``wanted`` or above: itself, or onnx's conversion of it; an
    InputDataError with the converter's reason when it cannot be converted."""
    version = opset_version(model)
    if version >= wanted:
        return model
    try:
        return onnx.version_converter.convert_version(model, wanted)
    except Exception as error:  # noqa: BLE001 - onnx's converter raises many kinds
        raise InputDataError(f"opset {version} could not be converted to {wanted} ({' '.join(str(error).split())[:160]})") from error


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Names a graph reads, including outer-scope names read inside its subgraphs."""
    names: set[str] = set()
    for node in graph.node:
        names.update(name for name in node.input if name)
        for subgraph in subgraphs_of(node):
            names.update(outer_scope_reads(subgraph))
    names.update(output.name for output in graph.output)
    return names


def outer_scope_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads but does not define itself: its captures from enclosing scopes."""
    defined = {value.name for value in graph.input}
    defined.update(tensor.name for tensor in graph.initializer)
    defined.update(sparse.values.name for sparse in graph.sparse_initializer)
    for node in graph.node:
        defined.update(name for name in node.output if name)
    return used_names(graph) - defined


# ---------------------------------------------------------------------------------------------
# onnx-graphsurgeon round trip
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEnvelope:
    """What graphsurgeon's export would lose or reset: restored by :func:`from_gs`.

    Opsets are not part of it: graphsurgeon exports ``graph.opset`` and ``graph.import_domains``,
    which a pass may raise on purpose (per-channel QDQ needs opset 13).
    """

    ir_version: int
    producer_name: str
    producer_version: str
    domain: str
    model_version: int
    doc_string: str
    metadata_props: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> ModelEnvelope:
        return cls(
            ir_version=model.ir_version,
            producer_name=model.producer_name,
            producer_version=model.producer_version,
            domain=model.domain,
            model_version=model.model_version,
            doc_string=model.doc_string,
            metadata_props=tuple((p.key, p.value) for p in model.metadata_props),
        )

    def apply(self, model: onnx.ModelProto) -> None:
        model.ir_version = self.ir_version
        model.producer_name = self.producer_name
        model.producer_version = self.producer_version
        model.domain = self.domain
        model.model_version = self.model_version
        model.doc_string = self.doc_string
        del model.metadata_props[:]
        for key, value in self.metadata_props:
            model.metadata_props.add(key=key, value=value)


def to_gs(model: onnx.ModelProto) -> gs.Graph:
    """Import into onnx-graphsurgeon. Constant values load as read-only arrays on first use; those
    a weight store holds are memory-mapped, and go back out by reference unless a pass replaced them."""
    graph = gs.import_onnx(model)
    if store_of(model) is not None:
        for constant in [*_constants(graph), *_attribute_constants(graph)]:
            lazy = constant._values
            if isinstance(lazy, gs.ir.tensor.LazyValues) and isinstance(lazy.tensor, onnx.TensorProto) and external_data_helper.uses_external_data(lazy.tensor):
                constant._values = MappedValues(lazy.tensor)
                constant.data_location = None  # new values a pass sets are written inline (or stored by from_gs)
    return graph


class MappedValues(gs.ir.tensor.LazyValues):  # type: ignore[misc]
    """graphsurgeon's lazy values of a store-held tensor: loaded as a read-only memory map (its own
    loader would look for the file in the working directory). The map carries the TensorProto it
    came from, so that :func:`from_gs` exports an untouched weight by reference instead of copying
    it (a view or a result computed from the map is a new array, without that attribute)."""

    def load(self) -> np.ndarray:
        array = read_external(self.tensor).view(StoredArray)
        array.stored_as = self.tensor
        return array


class StoredArray(np.ndarray):
    """A read-only array of a store-held tensor, marked with the TensorProto it was read from (views
    and results computed from it are StoredArrays without the mark)."""

    stored_as: onnx.TensorProto | None = None


def stored_constant(name: str, value: np.ndarray, like: gs.Tensor) -> gs.Constant:
    """A new constant holding ``value``: in the weight store that holds ``like`` when one does (the
    caller's array can then be freed, and the pass's peak memory stays one weight, not all of them)."""
    source = like._values if isinstance(like, gs.Constant) else None
    stored_as = source.tensor if isinstance(source, MappedValues) else _stored_as(source)
    if stored_as is not None and value.nbytes >= SPILL_MIN_BYTES:
        stored = store_of_tensor(stored_as).put(value, name)
        if stored is not None:
            return gs.Constant(name, MappedValues(stored))
    return gs.Constant(name, np.ascontiguousarray(value))


def typed_constant(name: str, values: np.ndarray, data_type: int, like: gs.Tensor | None = None) -> gs.Constant:
    """A constant of ONNX type ``data_type`` (int4/uint4 included, packed two to a byte) holding ``values``
    (integers in its range): written as onnx's numpy_helper writes it, since graphsurgeon would export a
    4-bit array one byte per value. Like :func:`stored_constant`, a big one goes to the weight store
    that holds ``like``, as its packed bytes, so that a big model's message never holds it."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    tensor = onnx.numpy_helper.from_array(np.asarray(values).astype(dtype), name)
    source = like._values if isinstance(like, gs.Constant) else None
    stored_as = source.tensor if isinstance(source, MappedValues) else _stored_as(source)
    if stored_as is not None and len(tensor.raw_data) >= SPILL_MIN_BYTES:
        stored = store_of_tensor(stored_as).put(np.frombuffer(tensor.raw_data, dtype=np.uint8), name)
        if stored is not None:
            stored.data_type = data_type  # the packed bytes, read as what they are
            del stored.dims[:]
            stored.dims.extend(tensor.dims)
            return gs.Constant(name, MappedValues(stored))
    return gs.Constant(name, gs.ir.tensor.LazyValues(tensor))


def constant_bytes(constant: gs.Constant) -> int:
    """The bytes a constant's values take as raw data (4-bit types packed)."""
    values = constant._values
    return data_bytes(values.tensor) if isinstance(values, gs.ir.tensor.LazyValues) else int(np.asarray(values).nbytes)


def _restore_reference(constant: gs.Constant) -> bool:
    """An untouched store-held array back to a lazy reference to its data; whether it was one. Each
    constant gets a header of its own: graphsurgeon's export names the TensorProto it is given, and
    two constants sharing one array (a pass's copy under another name) must not rename each other."""
    stored_as = _stored_as(constant._values)
    if stored_as is None:
        return False
    header = onnx.TensorProto()
    header.CopyFrom(stored_as)  # a few dozen bytes: the data is external
    constant._values = MappedValues(header)
    return True


def _stored_as(values: object) -> onnx.TensorProto | None:
    """The store-held TensorProto an untouched array was read from (see StoredArray), else None."""
    stored_as = getattr(values, "stored_as", None)
    return stored_as if isinstance(stored_as, onnx.TensorProto) else None


def _constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Every constant of ``graph`` and its subgraphs, once each."""
    seen: set[int] = set()
    for scope in [graph, *graph.subgraphs(recursive=True)]:
        for tensor in scope.tensors(check_duplicates=False).values():
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor


def _attribute_constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """The tensors held in node attributes (a Constant node's value) of ``graph`` and its subgraphs."""
    for scope in [graph, *graph.subgraphs(recursive=True)]:
        for node in scope.nodes:
            yield from (value for value in node.attrs.values() if isinstance(value, gs.Constant))


def _store_new_constants(graph: gs.Graph, store: WeightStore) -> None:
    """Before export, for a model whose weights a store holds: an untouched memory-mapped weight goes
    back to its lazy reference, and a big new array into the store, so export never copies weights
    into the message (which could pass 2 GB) and the pass's arrays can be freed. Attribute tensors
    (Constant nodes) go back by reference when untouched; new ones stay in the message."""
    for constant in _attribute_constants(graph):
        _restore_reference(constant)
    for constant in _constants(graph):
        values = constant._values
        if not isinstance(values, np.ndarray) or _restore_reference(constant):
            continue
        if values.nbytes >= SPILL_MIN_BYTES and constant.export_dtype == constant.dtype:
            stored = store.put(values, constant.name)
            if stored is not None:
                constant._values = MappedValues(stored)


def name_unnamed_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every main-graph node a unique name (op type and index), in place: passes that plan
    on one import and apply on another find nodes by name, and exporters often leave them empty."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name, suffix = f"{node.op_type}_{index}", 0
            while name in taken:
                suffix += 1
                name = f"{node.op_type}_{index}_{suffix}"
            node.name = name
            taken.add(name)
    return model


def with_initializer_values(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named main-graph initializers hold ``values`` (float32) instead: a
    trial of other weights without graph surgery (the sensitivity probes)."""
    trial = onnx.ModelProto()
    trial.CopyFrom(model)
    for tensor in trial.graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(values[tensor.name], dtype=np.float32), tensor.name))
    return trial


def overridable_initializers(model: onnx.ModelProto) -> set[str]:
    """Initializers that are also graph inputs: defaults a caller may override at run time, so a
    pass must not treat them as fixed weights (graphsurgeon silently drops them from the inputs)."""
    inputs = {value.name for value in model.graph.input}
    return {tensor.name for tensor in model.graph.initializer if tensor.name in inputs}


def from_gs(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export from onnx-graphsurgeon, keeping ``like``'s IR version, opsets and metadata (and its
    weight store: big constants go there, not into the message)."""
    store = store_of(like)
    if store is not None:
        _store_new_constants(graph, store)
    model = gs.export_onnx(graph, do_type_check=False)
    ModelEnvelope.of(like).apply(model)
    _restore_overridable_inputs(model, like)
    # An opset bump may need a newer IR version than the input had; never go below what it needs.
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    return model


def _restore_overridable_inputs(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """graphsurgeon drops initializers from the graph inputs; IR < 4 requires them there, and in
    any IR they are part of the model's interface. Put back those that still exist."""
    present = {value.name for value in model.graph.input}
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for value in like.graph.input:
        tensor = initializers.get(value.name)
        if tensor is not None and value.name not in present:
            model.graph.input.append(onnx.helper.make_tensor_value_info(value.name, tensor.data_type, list(tensor.dims)))


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a tensor known at export time: an initializer, or the output of a Constant node.

    Exporters such as paddle2onnx keep weights in Constant nodes, so a pass that only looks at
    initializers misses them.
    """
    value = None
    if isinstance(tensor, gs.Constant):
        value = tensor.values
    elif len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attribute = tensor.inputs[0].attrs.get("value")
        value = attribute.values if isinstance(attribute, gs.Constant) else attribute
    if not isinstance(value, np.ndarray):
        return None
    # A read-only view: graphsurgeon hands out its own buffer, which a pass must never write into.
    view = value.view()
    view.flags.writeable = False
    return view


# Names taken in each graph, built once per graph and kept up to date by unique_name: rebuilding
# the set on every call made passes quadratic in the number of nodes (4 s for 1000 Conv+BN pairs).
_TAKEN_NAMES: dict[int, set[str]] = {}


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor or node name not yet used in ``graph`` (nor in its subgraphs), derived from ``base``."""
    taken = _TAKEN_NAMES.get(id(graph))
    if taken is None:
        taken = set(graph.tensors(check_duplicates=False).keys()) | {node.name for node in graph.nodes}
        for subgraph in graph.subgraphs(recursive=True):
            taken.update(subgraph.tensors(check_duplicates=False).keys())
            taken.update(node.name for node in subgraph.nodes)
        _TAKEN_NAMES[id(graph)] = taken
        weakref.finalize(graph, _TAKEN_NAMES.pop, id(graph), None)
    name, index = base, 0
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    taken.add(name)
    return name


def downstream_names(nodes: Iterable[gs.Node]) -> set[str]:
    """The names of the tensors computed from the outputs of ``nodes`` (those an edit of them changes)."""
    names: set[str] = set()
    pending = [tensor for node in nodes for tensor in node.outputs]
    while pending:
        tensor = pending.pop()
        if tensor.name in names:
            continue
        names.add(tensor.name)
        pending.extend(output for reader in tensor.outputs for output in reader.outputs)
    return names
