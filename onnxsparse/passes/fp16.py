"""``fp16``: float16 (or bfloat16) weights and activations, with the nodes that would overflow kept float32.

Which inputs and outputs of a node change type is read from the op's schema: an input whose type
variable admits float16 follows the node; one that admits only float (Resize's scales) stays. Each
tensor is converted once, where it is made (weights as new constants), and a Cast is inserted only
where a float32 node reads a float16 tensor or the other way round. Graph inputs and outputs stay
float32, so callers feed and read what they did.

Kept float32, with the reason in the report: nodes whose output reached, on the calibration data,
more than float16's largest value (65504) divided by ``headroom`` (a sum of squares, a large
logit), nodes with subgraphs (If/Loop bodies are left as they are), ops of other domains, and ops
whose output type is chosen by an attribute this pass does not rewrite (RandomNormal, EyeLike, ...).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..activations import collect_ranges
from ..calibration import read_once
from ..errors import RuntimeLoadError
from ..graph import from_gs, name_unnamed_nodes, opset_version, outer_scope_reads, to_gs, typed_constant, unique_name
from ..limits import CALIBRATION_SAMPLES
from ..runtime import open_session
from ..validation import Tolerance
from ..walk import subgraphs_of
from .base import Change, Pass, PassContext, PassResult, Requirement, Skip, register

log = logging.getLogger(__name__)

FLOAT16_MAX = 65504.0
MAX_KERNEL_RETRIES = 64  # op types kept float32 one at a time because onnxruntime has no kernel for them in the low type
# Ops whose output type an attribute sets (not rewritten here): kept float32.
_TYPED_BY_ATTRIBUTE = frozenset({"EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                                 "Bernoulli"})


@register
@dataclass(frozen=True)
class Fp16(Pass):
    """Float16 (or bfloat16) weights and activations: half the file, and the precision GPUs run
    fastest; nodes whose values would overflow float16 on the calibration data stay float32.

    On CPU onnxruntime runs most float16 ops through inserted Casts (slower than float32); the gain
    there is the file's size. Graph inputs and outputs stay float32 (Casts at the edges): callers
    feed and read what they did, and the pass manager validates it on the same inputs.
    """

    name = "fp16"
    requires = frozenset({Requirement.SHAPES})  # every tensor's type: which ones are float32
    default_tolerance = Tolerance(min_cosine=0.999)

    dtype: Literal["float16", "bfloat16"] = field(default="float16", metadata={"help": "float16, or bfloat16 (float32's range, fewer digits)"})
    headroom: float = field(default=4.0, metadata={
        "help": "keep float32 the nodes whose output reached float16's largest value / headroom on the calibration data"})
    keep: tuple[str, ...] = field(default=(), metadata={"help": "node names or op types kept float32"})
    calibration_samples: int = field(default=CALIBRATION_SAMPLES, metadata={"help": "calibration samples read for the ranges (the first ones)"})

    def __post_init__(self) -> None:
        if self.headroom < 1:
            raise ValueError(f"headroom {self.headroom} is below 1")
        if self.calibration_samples < 1:
            raise ValueError("calibration_samples must be at least 1")

    @property
    def low(self) -> int:
        return onnx.TensorProto.FLOAT16 if self.dtype == "float16" else onnx.TensorProto.BFLOAT16

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        result = PassResult(model)
        name_unnamed_nodes(model)  # keeps and kernel errors name nodes
        graph = to_gs(model)
        kept = self._kept_by_rule(graph, _captured(model))
        if self.dtype == "float16":
            kept.update(self._kept_by_range(model, graph, context, result))
        for _ in range(MAX_KERNEL_RETRIES):
            converted_model, converted, tensors = self._converted(model, kept)
            if converted_model is None:
                result.skipped.append(Skip("model", "every node stays float32, or no float32 tensor is left to convert"))
                result.skipped.extend(Skip(name, reason) for name, reason in kept.items())
                return result
            missing = _node_without_kernel(converted_model, context)
            if missing is None:
                break
            # a kernel exists per op and type, not per node: every node of that op stays float32 at once
            name, op = missing
            newly = {node.name: f"onnxruntime has no {self.dtype} kernel for {op} on this machine" for node in graph.nodes
                     if (node.op == op or node.name == name) and node.name not in kept}
            if not newly:  # an op onnxruntime made itself (a Softmax it expanded): nothing here to keep
                result.skipped.append(Skip("model", f"onnxruntime has no {self.dtype} kernel for {op}, an op it makes from others "
                                                    f"of this model: nothing converted"))
                return result
            kept.update(newly)
        else:
            raise RuntimeLoadError(f"fp16: still no {self.dtype} kernel after keeping {MAX_KERNEL_RETRIES} op types float32")
        result.model = converted_model
        result.changes.append(Change("model", f"{self.dtype} nodes", {"nodes": converted, "tensors": tensors}))
        result.skipped.extend(Skip(name, reason) for name, reason in kept.items())
        result.figures.update(nodes_converted=converted, nodes_kept_float32=len(kept), dtype=self.dtype)
        return result

    def _converted(self, model: onnx.ModelProto, kept: dict[str, str]) -> tuple[onnx.ModelProto | None, int, int]:
        """The model with every node not in ``kept`` in the low type: (model, nodes, tensors), or (None, 0, 0)."""
        graph = to_gs(model)
        converted = [node for node in graph.nodes if node.name not in kept]
        tensors = _Conversion(graph, self.low, opset_version(model)).apply(converted) if converted else 0
        if not tensors:
            return None, 0, 0
        graph.cleanup().toposort()
        return from_gs(graph, like=model), len(converted), tensors

    # -- what stays float32 ------------------------------------------------------------------

    def _kept_by_rule(self, graph: gs.Graph, captured: set[str]) -> dict[str, str]:
        """Nodes kept float32 whatever their values: on request, with subgraphs, of other domains, typed by
        an attribute, and the producers of tensors an If/Loop body reads from outside (the body stays float32)."""
        kept: dict[str, str] = {}
        for node in graph.nodes:
            read_inside = sorted(tensor.name for tensor in node.outputs if tensor.name in captured)
            if node.name in self.keep or node.op in self.keep:
                kept[node.name] = "kept on request"
            elif any(isinstance(value, gs.Graph) for value in node.attrs.values()):
                kept[node.name] = f"{node.op} with a subgraph: its body is left float32"
            elif node.domain not in (None, "", "ai.onnx"):
                kept[node.name] = f"an op of the {node.domain} domain"
            elif node.op in _TYPED_BY_ATTRIBUTE:
                kept[node.name] = f"{node.op}'s output type is an attribute"
            elif node.op == "Constant" and "value" not in node.attrs:
                kept[node.name] = "a Constant given as value_float(s) or a sparse value"
            elif read_inside:
                kept[node.name] = f"{', '.join(read_inside)} read inside an If/Loop body, which stays float32"
        return kept

    def _kept_by_range(self, model: onnx.ModelProto, graph: gs.Graph, context: PassContext, result: PassResult) -> dict[str, str]:
        """Nodes whose float output came within ``headroom`` of float16's largest value on the calibration data."""
        if context.calibration is None:
            result.warnings.append("fp16: no calibration data, so no node was checked for float16 overflow (--calibration)")
            return {}
        producers = {tensor.name: node for node in graph.nodes for tensor in node.outputs
                     if isinstance(tensor, gs.Variable) and tensor.dtype in (np.float32, None) and tensor.name}
        source = read_once(context.calibration, model, limit=self.calibration_samples)
        ranges = collect_ranges(model, source, list(producers), method="minmax", limit=self.calibration_samples)
        limit = FLOAT16_MAX / self.headroom
        kept = {}
        for name, (low, high) in ranges.items():
            peak = max(abs(low), abs(high))
            if peak > limit:
                node = producers[name]
                kept[node.name] = f"output {name} reached {peak:.4g} on the calibration data, past float16's {FLOAT16_MAX:g} / headroom {self.headroom:g}"
        return kept


class _Conversion:
    """Rewrites the chosen nodes to the low type: each tensor made low once where it is produced,
    and Casts between the two worlds where a reader needs the other type."""

    def __init__(self, graph: gs.Graph, low: int, opset: int) -> None:
        self.graph, self.low, self.opset = graph, low, opset
        self.low_numpy = onnx.helper.tensor_dtype_to_np_dtype(low)
        self.suffix = "fp16" if low == onnx.TensorProto.FLOAT16 else "bf16"
        self.low_names: set[str] = set()  # tensors that hold low values once the conversion is done
        self.casts: dict[tuple[str, int], gs.Variable] = {}
        self.low_constants: dict[str, gs.Constant] = {}
        self.new_nodes: list[tuple[int, gs.Node]] = []
        self.positions: dict[int, int] = {}

    def apply(self, converted: list[gs.Node]) -> int:
        chosen = {id(node) for node in converted}
        self.positions = {id(node): index for index, node in enumerate(self.graph.nodes)}  # where Casts go, looked up once
        for node in list(self.graph.nodes):  # producers first: a node's inputs are known by the time it is read
            if id(node) not in chosen:
                continue
            schema = _schema(node, self.opset)
            if schema is None:
                continue
            switched = False
            for index, tensor in enumerate(node.outputs):
                if _is_float32(tensor) and _admits_low(schema, index, output=True, low=self.low):
                    tensor.dtype = self.low_numpy
                    self.low_names.add(tensor.name)
                    switched = True
            if switched:  # a float32 output the schema cannot make low keeps its attribute float32 too
                self._retype_attributes(node)
        for node in list(self.graph.nodes):
            schema = _schema(node, self.opset) if id(node) in chosen else None
            for index, tensor in enumerate(node.inputs):
                wants_low = schema is not None and _admits_low(schema, index, output=False, low=self.low) and self._is_floating(tensor)
                node.inputs[index] = self._as_low(tensor, node) if wants_low else self._as_float32(tensor, node)
        self._float32_outputs()
        # one rebuild of the node list, each Cast before the reader it was made for (not one insert per Cast)
        before: dict[int, list[gs.Node]] = {}
        for position, node in self.new_nodes:
            before.setdefault(position, []).append(node)
        nodes = [new for index, node in enumerate(self.graph.nodes) for new in [*before.get(index, []), node]]
        self.graph.nodes.clear()
        self.graph.nodes.extend(nodes)
        return len(self.low_names)

    def _is_floating(self, tensor: gs.Tensor) -> bool:
        if isinstance(tensor, gs.Constant):
            return tensor.dtype == np.float32
        return tensor.name in self.low_names or _is_float32(tensor)

    def _as_low(self, tensor: gs.Tensor, reader: gs.Node) -> gs.Tensor:
        if tensor.name in self.low_names:
            return tensor
        if isinstance(tensor, gs.Constant):
            low = self.low_constants.get(tensor.name)
            if low is None:
                values = np.asarray(tensor.values, dtype=np.float32)
                low = self.low_constants[tensor.name] = typed_constant(unique_name(self.graph, f"{tensor.name}_{self.suffix}"), values, self.low,
                                                                       tensor)
            return low
        return self._cast(tensor, self.low, reader)

    def _as_float32(self, tensor: gs.Tensor, reader: gs.Node) -> gs.Tensor:
        return self._cast(tensor, onnx.TensorProto.FLOAT, reader) if tensor.name in self.low_names else tensor

    def _cast(self, tensor: gs.Tensor, to: int, reader: gs.Node) -> gs.Variable:
        """One Cast per tensor and target type, placed before its first reader."""
        key = (tensor.name, to)
        cast = self.casts.get(key)
        if cast is None:
            dtype = np.float32 if to == onnx.TensorProto.FLOAT else self.low_numpy
            cast = self.casts[key] = gs.Variable(unique_name(self.graph, f"{tensor.name}_to_{onnx.TensorProto.DataType.Name(to).lower()}"),
                                                 dtype=dtype, shape=tensor.shape)
            node = gs.Node("Cast", name=unique_name(self.graph, f"{tensor.name}_Cast"), attrs={"to": to}, inputs=[tensor], outputs=[cast])
            self.new_nodes.append((self.positions[id(reader)], node))
        return cast

    def _retype_attributes(self, node: gs.Node) -> None:
        """Attributes that fix a float32 output: Cast's ``to`` and a Constant's or ConstantOfShape's value."""
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = self.low
        for key in ("value",):
            value = node.attrs.get(key)
            if isinstance(value, gs.Constant) and value.dtype == np.float32:
                node.attrs[key] = typed_constant(value.name, np.asarray(value.values), self.low)

    def _float32_outputs(self) -> None:
        """Graph outputs that came out low get a Cast back to float32 under their own name."""
        for position, output in enumerate(self.graph.outputs):
            if output.name not in self.low_names:
                continue
            producer = output.inputs[0] if output.inputs else None
            internal = gs.Variable(unique_name(self.graph, f"{output.name}_{self.suffix}"), dtype=self.low_numpy, shape=output.shape)
            if producer is not None:
                producer.outputs[producer.outputs.index(output)] = internal
            for reader in list(output.outputs):
                reader.inputs[reader.inputs.index(output)] = internal
            output.dtype = np.float32
            self.graph.nodes.append(gs.Node("Cast", name=unique_name(self.graph, f"{output.name}_Cast"), attrs={"to": onnx.TensorProto.FLOAT},
                                            inputs=[internal], outputs=[output]))
            self.low_names.discard(output.name)
            self.low_names.add(internal.name)
            self.graph.outputs[position] = output


def _captured(model: onnx.ModelProto) -> set[str]:
    """The main-graph tensors that some If/Loop/Scan body reads from outside itself."""
    return {name for node in model.graph.node for body in subgraphs_of(node) for name in outer_scope_reads(body)}


def _node_without_kernel(model: onnx.ModelProto, context: PassContext) -> tuple[str, str] | None:
    """(node, op) onnxruntime names when it has no kernel for a node's types here, else None (it loads,
    or fails for another reason, which the pass manager's own load reports)."""
    try:
        open_session(model, "fp16 candidate", runtime=context.runtime, keep=False)
    except RuntimeLoadError as error:
        match = re.search(r"Could not find an implementation for (\w+)\(\d+\) node with name '([^']*)'", str(error))
        if match:
            return match.group(2), match.group(1)
    return None


def _is_float32(tensor: gs.Tensor) -> bool:
    return tensor.dtype == np.float32 and bool(tensor.name)


def _schema(node: gs.Node, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(node.op, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None


def _admits_low(schema: onnx.defs.OpSchema, index: int, *, output: bool, low: int) -> bool:
    """Whether the schema lets input (or output) ``index`` be of the low type."""
    formals = schema.outputs if output else schema.inputs
    if not formals:
        return False
    formal = formals[min(index, len(formals) - 1)]
    wanted = "tensor(float16)" if low == onnx.TensorProto.FLOAT16 else "tensor(bfloat16)"
    constraint = next((c for c in schema.type_constraints if c.type_param_str == formal.type_str), None)
    allowed = constraint.allowed_type_strs if constraint is not None else [formal.type_str]
    return wanted in allowed
