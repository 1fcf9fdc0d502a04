"""How much each channel matters: weight norms scaled by BatchNormalization, activations, output energy, or the
compensated reconstruction cost of removing it (criterion=reconstruction)."""

from __future__ import annotations

import numpy as np
import onnx

from ...activations import collect_channel_grams, collect_channel_stats
from ...calibration import InputSource
from ...channels import Analysis, ConsumerUse, Producer
from ...errors import RequirementError
from ...graph import constant_value
from ...layerwise import ReadingLayer, greedy_removal_costs
from ...validation import DriftProbe
from ..base import PassContext
from .groups import Group, Reader

# Reader inputs up to which criterion=reconstruction runs its greedy OBS order (each removal updates an n x n inverse).
GREEDY_WIDTH = 4096


def batchnorm_scale(producer: Producer) -> np.ndarray:
    """|gamma| / sqrt(var + eps) of a BatchNormalization reading only this producer's output."""
    readers = producer.node.outputs[0].outputs
    if len(readers) == 1 and readers[0].op == "BatchNormalization":
        bn = readers[0]
        gamma, var = constant_value(bn.inputs[1]), constant_value(bn.inputs[4])
        if gamma is not None and var is not None:
            return np.abs(gamma) / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return np.ones(producer.channels)


def activation_importance(model: onnx.ModelProto, analysis: Analysis, context: PassContext, samples: int, importance: np.ndarray,
                          *, through_consumers: bool) -> np.ndarray:
    """Mean |activation| of each root where consumers read it (averaged over its positions); or,
    ``through_consumers``, the output energy it feeds them: mean(a²) x |W[:, c]|² summed over consumers
    (what removing it costs the next layers before any refit, if channels were uncorrelated)."""
    if context.calibration is None:
        raise RequirementError(f"channel-prune{{criterion={'output' if through_consumers else 'activation'}}} needs calibration data")
    axes = {use.tensor.name: _axis_of(analysis, use) for use in analysis.consumers}
    stats = collect_channel_stats(model, context.calibration, axes, limit=samples, label="channel importance")
    total = np.zeros(len(analysis.parent))
    count = np.zeros(len(analysis.parent))
    for use in analysis.consumers:
        channel = stats[use.tensor.name]
        if through_consumers:
            weight = constant_value(use.node.inputs[use.weight_index])
            weight = np.moveaxis(np.asarray(weight, dtype=np.float64), use.axis, 0).reshape(len(use.roots), -1)
            np.add.at(total, use.roots, channel.mean_square * np.square(weight).sum(axis=1))
        else:
            np.add.at(total, use.roots, channel.mean_abs)
        np.add.at(count, use.roots, 1)
    seen = count > 0
    importance[seen] = total[seen] if through_consumers else total[seen] / count[seen]
    return importance


def fitting_samples(calibration: InputSource, model: onnx.ModelProto) -> InputSource | None:
    """The calibration samples but those a :class:`DriftProbe` of ``model`` judges by; None unless as
    many are left (the probes then go uncompensated)."""
    others = DriftProbe.not_judged(calibration, model)
    return others if others.total >= DriftProbe.SAMPLES else None


def reconstruction_importance(model: onnx.ModelProto, analysis: Analysis, groups: list[Group], source: InputSource | None, samples: int,
                               *, compensate: bool = False) -> None:
    """Each free unit's cumulative cost along its group's greedy OBS removal order (see
    :func:`greedy_removal_costs`), over the layers that read the group (the analysis records only
    channel-mixing readers: a depthwise conv passes its channels on to the pointwise conv that reads
    them, which is costed). Pinned units stay in every Gram as compensators. A reader wider than
    ``GREEDY_WIDTH`` inputs is costed without compensation (its input variance x |W|²), which the
    greedy updates would make cubic; a group no layer reads keeps its filter norm. ``compensate``
    keeps each group's readers, for sensitivity probes to make up for their removal with."""
    if source is None:
        raise RequirementError("channel-prune{criterion=reconstruction} needs calibration data: pass --calibration")
    axes = {use.tensor.name: _axis_of(analysis, use) for use in analysis.consumers}
    grams = collect_channel_grams(model, source, axes, limit=samples, label="channel Grams")
    for group in groups:
        free = [unit for unit in group.units if not unit.pinned]
        unit_of = {root: index for index, unit in enumerate(free) for root in unit.members}
        layers = [(use, layer) for use in analysis.consumers
                  if (layer := _reading_layer(use, unit_of, grams.get(use.tensor.name), len(free))) is not None]
        if not free or not layers:
            continue
        if max(len(layer.gram) for _, layer in layers) > GREEDY_WIDTH:
            costs = np.sum([_uncompensated_costs(layer) for _, layer in layers], axis=0)
            group.removal_costs = np.concatenate([[0.0], np.cumsum(np.sort(costs))])
        else:
            costs = greedy_removal_costs([layer for _, layer in layers], len(free))  # cumulative along the greedy order
            group.removal_costs = np.concatenate([[0.0], np.sort(costs)])
            if compensate:  # keep what a sensitivity probe needs to make up for its removal
                group.readers = [reader for use, layer in layers if (reader := _reader(use, layer)) is not None]
                group.slots = {id(unit): index for index, unit in enumerate(free)}
        for unit, cost in zip(free, costs):
            unit.importance = float(cost)


def _reader(use: ConsumerUse, layer: ReadingLayer) -> Reader | None:
    """How to compensate in ``use``'s weights; None for layers whose output axis the shift would miss
    (ConvTranspose, a batched MatMul weight)."""
    node = use.node
    alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
    weight = constant_value(node.inputs[use.weight_index])
    if node.op not in ("Conv", "Gemm", "MatMul") or weight is None or (node.op != "Conv" and weight.ndim != 2):
        return None
    return Reader(node.outputs[0].name, use.weight_index, use.axis, tuple(weight.shape), alpha, layer)  # type: ignore[union-attr]


def _uncompensated_costs(layer: ReadingLayer) -> np.ndarray:
    """Per unit, what its positions carry through the layer when nothing stands in: var(a_p) x |W[:, p]|²."""
    variance = np.maximum(np.diag(layer.gram)[:-1] - np.square(layer.gram[-1, :-1]), 0.0)
    per_position = variance * np.square(layer.weight[:, :-1]).sum(axis=0)
    held = layer.positions >= 0
    return np.where(held, per_position[np.where(held, layer.positions, 0)], 0.0).sum(axis=1)


def _reading_layer(use: ConsumerUse, unit_of: dict[int, int], gram: np.ndarray | None, units: int) -> ReadingLayer | None:
    """The layer ``use`` as a :class:`ReadingLayer` over the free units it reads; None if it reads none."""
    index = np.array([unit_of.get(int(root), -1) for root in use.roots])
    weight = constant_value(use.node.inputs[use.weight_index])
    if (index < 0).all() or weight is None or gram is None or len(gram) != len(index) + 1:
        return None
    matrix = np.moveaxis(np.asarray(weight, dtype=np.float64), use.axis, 0).reshape(len(index), -1).T  # [rows, inputs]
    slots = max(int(np.bincount(index[index >= 0]).max()), 1)
    positions = np.full((units, slots), -1, dtype=np.int64)
    filled = np.zeros(units, dtype=np.int64)
    for position, unit in enumerate(index.tolist()):
        if unit >= 0:
            positions[unit, filled[unit]] = position
            filled[unit] += 1
    # the constant column: a reader's bias absorbs a removed channel's mean, so it is never removed
    return ReadingLayer(np.concatenate([matrix, np.zeros((len(matrix), 1))], axis=1), gram, positions)


def _axis_of(analysis: Analysis, use: ConsumerUse) -> int:
    return analysis.spaces[use.tensor.name].axis
