"""``simplify``: fold and fuse what the exporter left for the runtime to work out, with onnxruntime's
portable optimizer, so that later passes (and int8 placement) see the graph a runtime will run."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..graph import ModelEnvelope, op_histogram
from ..runtime import optimized_offline
from ..walk import iter_model_graphs
from .base import Change, Pass, PassContext, PassResult, Skip, register


@register
@dataclass(frozen=True)
class Simplify(Pass):
    """Fold constant subgraphs, remove redundant nodes and fuse Pad, BatchNormalization, Add and Mul
    into Conv/Gemm, with onnxruntime's basic graph optimizer (standard ops only; opsets, IR version,
    inputs and outputs kept).

    Exporters compute at run time what is known in advance: a torch export of an EfficientNet-style
    net builds every Pad's amounts from 222 Constant nodes, and those Pads then stay float between
    int8 layers. onnxruntime's basic level (the one its quantizer's pre-processing uses) folds them
    and moves each Pad into its convolution. Exact up to float rounding (fused weights).
    """

    name = "simplify"
    may_change_speed = True

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        optimized = optimized_offline(model, f"{self.name}: the model")
        result = PassResult(model)
        problem = _interface_change(model, optimized) or _new_domains(model, optimized)
        if problem:
            result.skipped.append(Skip("model", f"onnxruntime's optimizer {problem}; the model is kept as it was"))
            return result
        before, after = op_histogram(model), op_histogram(optimized)
        initializers_before, initializers_after = _initializer_count(model), _initializer_count(optimized)
        if before == after and initializers_before == initializers_after:
            result.skipped.append(Skip("model", "nothing to fold, remove or fuse at onnxruntime's basic level"))
            return result
        ModelEnvelope.of(model).apply(optimized)
        _keep_opsets_of(model, optimized)
        _keep_known_types(model, optimized)
        for op in sorted(set(before) | set(after)):
            if before[op] != after[op]:
                result.changes.append(Change(op, "removed" if after[op] < before[op] else "added", {"before": before[op], "after": after[op]}))
        if not result.changes:  # the same ops, fewer or more constants (shared or folded initializers)
            result.changes.append(Change("initializers", "folded", {"before": initializers_before, "after": initializers_after}))
        result.model = optimized
        result.figures.update(nodes_before=sum(before.values()), nodes_after=sum(after.values()),
                              initializers_before=initializers_before, initializers_after=initializers_after)
        return result


def _interface_change(model: onnx.ModelProto, optimized: onnx.ModelProto) -> str:
    """Why ``optimized`` would not be a drop-in replacement: its inputs or outputs differ."""
    overridable = {t.name for t in model.graph.initializer}
    for kind, old, new in (("inputs", model.graph.input, optimized.graph.input), ("outputs", model.graph.output, optimized.graph.output)):
        if [v.name for v in old if v.name not in overridable] != [v.name for v in new if v.name not in overridable]:
            return f"changed the graph's {kind}"
    return ""


def _domains(names: set[str]) -> set[str]:
    return {"" if name in ("", "ai.onnx") else name for name in names}


def _new_domains(model: onnx.ModelProto, optimized: onnx.ModelProto) -> str:
    """Ops from a domain the input does not import would make the result onnxruntime's own format."""
    used = _domains({node.domain for graph in iter_model_graphs(optimized) for node in graph.node})
    new = sorted(used - _domains({opset.domain for opset in model.opset_import}))
    return f"wrote ops of domain(s) {', '.join(new)}, which the input does not import" if new else ""


def _keep_opsets_of(model: onnx.ModelProto, optimized: onnx.ModelProto) -> None:
    """The input's opset imports: onnxruntime writes every domain it knows (com.microsoft, ...)."""
    del optimized.opset_import[:]
    optimized.opset_import.extend(model.opset_import)


def _keep_known_types(model: onnx.ModelProto, optimized: onnx.ModelProto) -> None:
    """Give back to ``optimized``'s main graph the tensor types onnx's inference knew in ``model``.

    onnxruntime drops a Cast to the type its input already has (it knows that type; onnx's inference
    may not, after an ai.onnx.ml op such as Scaler): the Cast's input then carries the type its
    output had. Without it, later passes see a tensor of unknown type (qdq left an MLP's MatMuls
    float)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a model onnx cannot infer: nothing known to keep
        return
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output] if v.type.tensor_type.elem_type}
    for node in model.graph.node:  # a dropped Cast: its input has the type its output had
        if node.op_type == "Cast" and node.output[0] in known and node.input[0] not in known:
            typed = onnx.ValueInfoProto()
            typed.CopyFrom(known[node.output[0]])
            typed.name = node.input[0]
            known[node.input[0]] = typed
    graph = optimized.graph
    present = {name for node in graph.node for name in node.output} | {v.name for v in graph.input}
    described = {v.name for v in [*graph.value_info, *graph.input, *graph.output]}
    graph.value_info.extend(known[name] for name in sorted(present - described) if name in known)


def _initializer_count(model: onnx.ModelProto) -> int:
    return sum(len(graph.initializer) for graph in iter_model_graphs(model))
