"""``fold-batchnorm``: fold an inference-mode BatchNormalization into the Conv or Gemm before it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import constant_value, from_gs, overridable_initializers, to_gs, unique_name
from .base import Change, Pass, PassContext, PassResult, Requirement, Skip, register

_BN_PARAMETERS = ("scale", "bias", "mean", "var")


@register
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold BatchNormalization into the preceding Conv/Gemm's weights and bias (exact up to rounding).

    BN(y) = s * (y - mean) + beta with s = gamma / sqrt(var + eps): scaling each output channel of
    the producer's weight by s and setting its bias to s * (b - mean) + beta gives the same output.
    Channel pruning wants this first, so that a channel's importance lives in one tensor.
    """

    name = "fold-batchnorm"
    preserves = frozenset({Requirement.SHAPES})  # a BatchNormalization's output has its input's shape

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = to_gs(model)
        result = PassResult(model)
        overridable = overridable_initializers(model)
        scopes = [graph, *graph.subgraphs(recursive=True)]  # BatchNorms inside If/Loop bodies too
        for scope in scopes:
            for bn in [node for node in scope.nodes if node.op == "BatchNormalization"]:
                reason = self._fold(graph, scope, bn, result, overridable)
                if reason:
                    result.skipped.append(Skip(bn.name or bn.outputs[0].name, reason))
        if not result.changes and not result.skipped:
            result.skipped.append(Skip("model", "no BatchNormalization node (subgraphs included)"))
        if result.changes:  # an untouched model is returned as it came, not re-exported
            for scope in scopes:
                scope.cleanup().toposort()
            result.model = from_gs(graph, like=model)
        result.figures["folded"] = len(result.changes)
        result.figures["skipped"] = len(result.skipped)
        return result

    def _fold(self, graph: gs.Graph, scope: gs.Graph, bn: gs.Node, result: PassResult, overridable: set[str]) -> str | None:
        """Fold one BatchNormalization of ``scope`` (the main graph or a subgraph of ``graph``);
        return why not when it cannot be folded."""
        if len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0) or not bn.attrs.get("spatial", 1):
            return "training-mode or non-spatial BatchNormalization"
        producer_output = bn.inputs[0]
        if len(producer_output.inputs) != 1:
            return "input is not produced by a node"
        producer = producer_output.inputs[0]
        if producer.op not in ("Conv", "Gemm"):
            return f"produced by {producer.op}, not Conv/Gemm"
        if len(producer_output.outputs) != 1 or producer_output in scope.outputs:
            return f"output of {producer.op} '{producer.name}' is also read elsewhere"
        fixed = [producer.inputs[1], *producer.inputs[2:3], *bn.inputs[1:5]]
        if any(tensor.name in overridable for tensor in fixed):
            return "a weight or parameter is also a graph input (overridable at run time)"
        parameters = [constant_value(tensor) for tensor in bn.inputs[1:5]]
        if any(value is None for value in parameters):
            return "BatchNormalization parameters are not constants"
        weight = constant_value(producer.inputs[1])
        if weight is None:
            return f"{producer.op} '{producer.name}' weight is not a constant"
        bias = constant_value(producer.inputs[2]) if len(producer.inputs) > 2 else None
        if len(producer.inputs) > 2 and bias is None:
            return f"{producer.op} '{producer.name}' bias is not a constant"
        gamma, beta, mean, var = (np.asarray(v, dtype=np.float64) for v in parameters)
        scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        shift = beta - scale * mean
        folded = self._folded_parameters(producer, weight, bias, scale, shift)
        if isinstance(folded, str):
            return folded
        new_weight, new_bias = folded
        label = bn.name or bn.outputs[0].name  # read before rewiring empties the node
        self._rewire(graph, producer, bn, new_weight.astype(weight.dtype), new_bias.astype(weight.dtype))
        result.changes.append(
            Change(label, "folded BatchNormalization", {"into": producer.name, "op": producer.op, "channels": int(scale.size)})
        )
        return None

    @staticmethod
    def _folded_parameters(
        producer: gs.Node, weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | str:
        w = weight.astype(np.float64)
        channels = scale.size
        if producer.op == "Conv":
            if w.shape[0] != channels:
                return f"Conv has {w.shape[0]} output channels, BatchNormalization {channels}"
            b = np.zeros(channels) if bias is None else bias.astype(np.float64)
            return w * scale.reshape(-1, *([1] * (w.ndim - 1))), scale * b + shift
        # Gemm: Y = alpha * A' @ B' + beta * C, features on axis 1 of Y.
        trans_b = producer.attrs.get("transB", 0)
        if w.ndim != 2 or w.shape[0 if trans_b else 1] != channels:
            return f"Gemm weight shape {list(w.shape)} does not match {channels} BatchNormalization channels"
        beta = float(producer.attrs.get("beta", 1.0))
        w = w * (scale.reshape(-1, 1) if trans_b else scale.reshape(1, -1))
        c = np.zeros(channels) if bias is None else beta * bias.astype(np.float64)
        # alpha stays on the node and applies to the scaled weight; beta goes into the new C (beta := 1).
        return w, scale * c + shift

    @staticmethod
    def _rewire(graph: gs.Graph, producer: gs.Node, bn: gs.Node, weight: np.ndarray, bias: np.ndarray) -> None:
        """New constants (never written into the old ones, which may be shared), then the producer
        writes the BN's output. A constant only this producer read keeps its name."""
        weight_tensor = gs.Constant(_folded_name(graph, producer, 1, "weight"), weight)
        bias_tensor = gs.Constant(_folded_name(graph, producer, 2, "bias"), bias)
        producer.inputs[1] = weight_tensor
        if len(producer.inputs) > 2:
            producer.inputs[2] = bias_tensor
        else:
            producer.inputs.append(bias_tensor)
        if producer.op == "Gemm":
            producer.attrs["beta"] = 1.0
        bn_output = bn.outputs[0]
        bn.outputs.clear()
        producer.outputs[0] = bn_output
        bn.inputs.clear()


def _folded_name(graph: gs.Graph, producer: gs.Node, index: int, role: str) -> str:
    """The old initializer's name when nothing else reads it (it is dropped), else a fresh one."""
    if index < len(producer.inputs):
        old = producer.inputs[index]
        if isinstance(old, gs.Constant) and len(old.outputs) == 1 and old not in graph.outputs:
            return old.name
        return unique_name(graph, f"{old.name}_bnfolded")
    return unique_name(graph, f"{producer.name or producer.outputs[0].name}.{role}")
