"""Zero-only exactness: a channel whose activation is a constant is removed with its constant folded into the
layers that read it, so the model's outputs do not change."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...activations import tensor_values
from ...calibration import SyntheticInputs
from ...channels import Analysis, ConsumerUse
from ...graph import constant_value
from .groups import Unit


def consumer_constants(model: onnx.ModelProto, analysis: Analysis, dead: np.ndarray) -> dict[int, tuple[ConsumerUse, np.ndarray, np.ndarray]]:
    """For each consumer reading dead roots: per position, the constant value seen (NaN where the
    value varies), from two synthetic feeds (a dead channel is constant for any input)."""
    uses = [use for use in analysis.consumers if dead[use.roots].any()]
    names = {use.tensor.name for use in uses}
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    for values in tensor_values(model, SyntheticInputs(model, samples=2, seed=1), names, label="dead-channel probe"):
        for name in names:
            axis = analysis.spaces[name].axis
            moved = np.moveaxis(np.asarray(values[name], dtype=np.float64), axis, 0).reshape(values[name].shape[axis], -1)
            low[name] = np.minimum(low.get(name, moved.min(axis=1)), moved.min(axis=1))
            high[name] = np.maximum(high.get(name, moved.max(axis=1)), moved.max(axis=1))
    constants = {}
    for use in uses:
        value = np.where(low[use.tensor.name] == high[use.tensor.name], low[use.tensor.name], np.nan)
        constants[id(use)] = (use, value, dead[use.roots])
    return constants


def why_not_exact(unit: Unit, analysis: Analysis, constants: dict[int, tuple[ConsumerUse, np.ndarray, np.ndarray]]) -> str:
    if any(m in analysis.approximate for m in unit.members):
        return analysis.approximate[next(m for m in unit.members if m in analysis.approximate)] + ": removal is not exact"
    members = set(unit.members)
    for use, values, _ in constants.values():
        positions = [i for i, root in enumerate(use.roots.tolist()) if root in members]
        seen = values[positions]
        if np.isnan(seen).any():
            return f"not constant where {use.node.op} '{use.node.name}' reads it (padding or a non-linear path)"
        if np.any(seen != 0) and not _linear_without_padding(use.node):
            return f"constant {float(seen[seen != 0][0]):g} feeds {use.node.op} '{use.node.name}', which pads: the border sees zeros"
    return ""


def _linear_without_padding(node: gs.Node) -> bool:
    if node.op != "Conv":
        return node.op in ("Gemm", "MatMul")
    return not any(node.attrs.get("pads", [])) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")


def fold_constant(use: ConsumerUse, values: np.ndarray, unit: Unit, shifts: dict[int, tuple[gs.Node, np.ndarray]]) -> None:
    """Add what the unit's constant contributed through this consumer to its output shift."""
    members = set(unit.members)
    positions = [i for i, root in enumerate(use.roots.tolist()) if root in members and values[i] != 0]
    if not positions:
        return
    weight = constant_value(use.node.inputs[use.weight_index]).astype(np.float64)  # type: ignore[union-attr]
    moved = np.moveaxis(weight, use.axis, 0)[positions]  # [positions, outputs..., kernel...]
    contribution = np.tensordot(values[positions], moved, axes=1)
    node = use.node
    if node.op in ("Conv",):
        contribution = contribution.reshape(contribution.shape[0], -1).sum(axis=1)
    elif node.op == "Gemm":
        contribution = contribution * float(node.attrs.get("alpha", 1.0))
    previous = shifts.get(id(node), (node, np.zeros_like(contribution)))[1]
    shifts[id(node)] = (node, previous + contribution)
