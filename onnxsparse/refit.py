"""Recovery without training: refit a layer's weights by least squares so that, fed the pruned
model's activations, it reproduces the ORIGINAL model's output of that layer (a layer-wise
distillation in closed form). Layers are refit in graph order, each on the activations of the
model with every earlier refit applied, and the normal equations are accumulated feed by feed, so
memory does not grow with the calibration set. They are kept per fold of the samples, so that the
ridge towards the original weights can be chosen by how well a fit predicts samples it did not see:
a layer with more weights than independent calibration rows (a classifier fed one pooled vector per
image) matches its calibration set whatever it learnt, and only held-out error tells."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .activations import ChangingModelValues, FixedModelValues
from .calibration import InputSource, read_once
from .graph import constant_value, from_gs, to_gs
from .layerwise import (
    CentredColumns,
    activation_name,
    add_output_shift,
    from_matrix,
    groups_of,
    ridge_towards,
    sample_slices,
    to_matrix,
    unsupported_reason,
)
from .results import Change, PassResult, Skip
from .weights import WeightSite, find_weights, replace_weight

log = logging.getLogger(__name__)



def layers_from(model: onnx.ModelProto, first_names: list[str]) -> list[str]:
    """The Conv/Gemm/MatMul nodes of the main graph from the first of ``first_names`` on, in graph order."""
    wanted = set(first_names)
    names: list[str] = []
    started = False
    for node in model.graph.node:
        started = started or node.name in wanted  # the first may be a ConvTranspose, which is not refit
        if started and node.op_type in ("Conv", "Gemm", "MatMul"):
            names.append(node.name)
    return names


# Folds of the calibration data for choosing the refit's ridge: runs of samples go to folds by blocks
# of FOLD_BLOCK samples, so views of one photo (listed side by side) are held out together.
FOLDS = 4
FOLD_BLOCK = 16
# Ridge strengths tried when refit_strength=auto, relative to the mean input energy (see NormalEquations.solve).
STRENGTHS = (1e-4, 1e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
# The strength used when the data is too small to hold a fold out, or a layer too wide to solve
# len(STRENGTHS) x FOLDS times (inputs per group, bias included).
FALLBACK_STRENGTH = 0.1
CROSS_VALIDATED_WIDTH = 4096

Strength = float | Literal["auto"]


# Which channels of an original tensor survive in the pruned model: tensor name -> (axis, kept mask).
KeptChannels = Mapping[str, tuple[int, np.ndarray]]


def refit_layers(original: onnx.ModelProto, pruned: onnx.ModelProto, node_names: list[str],
                 source: InputSource, samples: int, result: PassResult, strength: Strength = "auto",
                 kept: KeptChannels | None = None) -> onnx.ModelProto:
    """Refit the named Conv/Gemm/MatMul nodes of ``pruned`` toward ``original``'s outputs (restricted
    to the channels that ``kept`` says survive, for layers whose own outputs were pruned)."""
    wanted = set(node_names)
    source = read_once(source, original, limit=samples)  # every layer runs the model on it
    graph = to_gs(pruned)
    sites = {site.uses[0].node.name: site for site in find_weights(graph)[0] if len(site.uses) == 1}
    nodes = [n for n in graph.nodes if n.name in wanted]
    targets = FixedModelValues(original, source, samples, [_target_of(node) for node in nodes], label="refit targets")
    inputs = ChangingModelValues(source, samples, label="refit inputs")
    walk = StrengthWalk()
    for node in nodes:
        site = sites.get(node.name)
        reason = "no constant weight" if site is None else unsupported_reason(site)
        if reason:
            result.skipped.append(Skip(node.name, f"refit: {reason}"))
            continue
        current = from_gs(graph, like=pruned)
        if _refit_one(targets, inputs, current, graph, site, result, strength, kept or {}, walk):  # type: ignore[arg-type]
            inputs.edited(graph, [node])
    graph.cleanup().toposort()
    return from_gs(graph, like=pruned)


@dataclass
class Fit:
    """A refit's solution, and its errors |XΘ - Y|² on calibration data: of the current weights, of the
    solution in sample, and of the solution chosen out of sample (each fold predicted by a fit on the
    others; None when the strength was given, not chosen)."""

    solution: np.ndarray
    strength: float
    error_before: float
    error_after: float
    error_held_out: float | None


@dataclass
class NormalEquations:
    """Per fold f and group g of a layer: XᵀX [f, g, c, c] and XᵀY [f, g, c, o] of the design
    X = [inputs, 1] and the target Y, and |Y|². What any weights Θ miss by, |XΘ - Y|², follows from
    them (:func:`_error`): no block is ever multiplied by the weights.

    Blocks come as columns centred on a shift (see :meth:`add`); the shift's rank-one terms are
    summed as column sums and added once, by :meth:`settle`: per block they were three c x c
    outer products, a third of a wide layer's accumulation time (ResNet-18's 4,609-column layers)."""

    gram: np.ndarray
    cross: np.ndarray
    norm: np.ndarray
    column_sums: np.ndarray  # [f, g, c]: the centred columns' sums, not yet in gram and cross
    target_sums: np.ndarray  # [f, g, o]
    rows: np.ndarray  # [f]
    shifts: tuple[np.ndarray, np.ndarray] | None = None  # the input and target shifts those sums were taken against

    @classmethod
    def zeros(cls, groups: int, columns: int, outputs: int, folds: int) -> NormalEquations:
        return cls(np.zeros((folds, groups, columns, columns)), np.zeros((folds, groups, columns, outputs)), np.zeros(folds),
                   np.zeros((folds, groups, columns)), np.zeros((folds, groups, outputs)), np.zeros(folds))

    def add(self, columns: np.ndarray, targets: np.ndarray, shift: np.ndarray, target_shift: np.ndarray, fold: int) -> None:
        """A block of the design as centred columns [g, c, n] and targets [g, o, n] (the inputs X and
        the target Y less a shift per column, s [g, c] and t [g, o]: :class:`~onnxsparse.layerwise.CentredColumns`),
        without the bias column: when the equations have one more column, it is the bias's column of
        ones, added from sums. The products are taken in float32 on centred blocks (twice BLAS's
        float64 speed; one block's sum is good to ~1e-6: a column whose mean dwarfs its spread, an
        un-normalised input or a transformer's massive activation, would lose its spread in an
        uncentred float32 XᵀX) and summed in float64 with the shifts added back exactly: with
        X = Xc + 1sᵀ and Y = Yc + 1tᵀ, XᵀX = XcᵀXc + usᵀ + suᵀ + n ssᵀ and XᵀY = XcᵀYc + utᵀ + svᵀ +
        n stᵀ, u and v the column sums of Xc and Yc, whose sums over blocks :meth:`settle` adds."""
        width = columns.shape[1]
        shift, target_shift = shift.astype(np.float64), target_shift.astype(np.float64)
        if self.shifts is not None and not (np.array_equal(shift, self.shifts[0]) and np.array_equal(target_shift, self.shifts[1])):
            self.settle()  # sums taken against other shifts are added back with theirs
        self.shifts = shift, target_shift
        # Batched matmuls per group (BLAS); einsum without a path ran 14x slower on 1000 x 1000.
        self.gram[fold, :, :width, :width] += columns @ columns.transpose(0, 2, 1)
        self.cross[fold, :, :width] += columns @ targets.transpose(0, 2, 1)
        self.column_sums[fold, :, :width] += _row_sums(columns)
        self.target_sums[fold] += _row_sums(targets)
        self.rows[fold] += columns.shape[2]
        flat = targets.reshape(-1)
        self.norm[fold] += float(np.einsum("i,i->", flat, flat, dtype=np.float64))

    def settle(self) -> None:
        """Add the shifts' terms of the blocks added so far (see :meth:`add`) to gram, cross and norm."""
        if self.shifts is None:
            return
        s, t = self.shifts
        width = s.shape[1]
        for fold in np.flatnonzero(self.rows):
            u, v, n = self.column_sums[fold, :, :width], self.target_sums[fold], float(self.rows[fold])
            self.gram[fold, :, :width, :width] += _outer(u, s) + _outer(s, u) + n * _outer(s, s)
            self.cross[fold, :, :width] += _outer(u, t) + _outer(s, v) + n * _outer(s, t)
            if self.gram.shape[-1] > width:  # [X, 1]ᵀ[X, 1] and [X, 1]ᵀY: column sums and the row count
                column_sums = u + n * s
                self.gram[fold, :, :width, width] += column_sums
                self.gram[fold, :, width, :width] += column_sums
                self.gram[fold, :, width, width] += n
                self.cross[fold, :, width] += v + n * t
            self.norm[fold] += 2 * float(np.sum(t * v)) + n * float(np.sum(t * t))  # |Y|² = |Yc|² + 2 tᵀv + n |t|²
        self.column_sums[:], self.target_sums[:], self.rows[:] = 0.0, 0.0, 0.0
        self.shifts = None

    def solve(self, current: np.ndarray, strength: Strength, walk: StrengthWalk | None = None) -> Fit:
        """Θ minimising |XΘ - Y|² + λ|Θ - current|² per group (:func:`ridge_towards`), λ = strength x the
        group's mean input energy. ``auto``: the strength of :data:`STRENGTHS` whose fits predict held-out
        folds best (found by ``walk``, or from :data:`FALLBACK_STRENGTH`); the out-of-sample error is then
        the one to judge the refit by, since a layer with more weights than independent calibration rows
        fits its calibration set whatever it learnt."""
        self.settle()
        gram, cross = self.gram.sum(axis=0), self.cross.sum(axis=0)
        energy = np.maximum(np.einsum("gii->g", gram) / gram.shape[-1], 1e-30)  # mean diag(XᵀX) per group
        held_out = None
        if strength == "auto":
            folds = [f for f in range(len(self.norm)) if self.norm[f] > 0]
            if len(folds) < 2:
                strength = FALLBACK_STRENGTH
            else:
                strength, held_out = (walk or StrengthWalk()).least(lambda s: float(sum(self._fold_error(f, gram, cross, current, s * energy)
                                                                                         for f in folds)))
        solution = ridge_towards(gram, cross, current, max(float(strength), 1e-6) * energy)
        norm = float(self.norm.sum())
        return Fit(solution, float(strength), _error(current, gram, cross, norm), _error(solution, gram, cross, norm), held_out)

    def _fold_error(self, fold: int, gram: np.ndarray, cross: np.ndarray, current: np.ndarray, ridge: np.ndarray) -> float:
        """|X_f Θ - Y_f|² of fold ``fold`` for the fit on every other fold."""
        solution = ridge_towards(gram - self.gram[fold], cross - self.cross[fold], current, ridge)
        return _error(solution, self.gram[fold], self.cross[fold], float(self.norm[fold]))


@dataclass
class StrengthWalk:
    """Where the next layer's search for its ridge strength starts: where the last one's ended.
    Neighbouring layers want alike strengths (MiniLM's 31 refit layers: 22 at 100), so the walk from
    there takes 3.2-5.0 fits a layer on the real models measured, against 5.0-6.5 from the fallback."""

    start: float = FALLBACK_STRENGTH

    def least(self, held_out_error: Callable[[float], float]) -> tuple[float, float]:
        strength, error = least_on_the_grid(held_out_error, self.start)
        self.start = strength
        return strength, error


def least_on_the_grid(held_out_error: Callable[[float], float], start: float = FALLBACK_STRENGTH) -> tuple[float, float]:
    """The strength of :data:`STRENGTHS` whose fits predict held-out folds best, and that error: the
    grid walked downhill from ``start``, one neighbour at a time, to where both neighbours predict
    worse (a NaN error counts as the worst; ties at the least go to the weaker strength, as a scan in
    order took them). Held-out error against log strength was one valley (no second local minimum on the grid) on
    every one of 140 refit layers of eight models (the bundled three, MNIST, MobileNetV2, MiniLM,
    ResNet-18, PP-OCR), so the walk stops where a scan of the whole grid would, after a few of its 10
    fits; each fit is one solve per fold, on ResNet-18's widest layers 0.25 s."""
    errors: dict[int, float] = {}

    def error(index: int) -> float:
        if index not in errors:
            errors[index] = held_out_error(STRENGTHS[index])
        return math.inf if math.isnan(errors[index]) else errors[index]  # a NaN compares false both ways: the walk could cycle

    here = STRENGTHS.index(start)
    for _ in STRENGTHS:  # each step lowers (error, index): at most one step per strength
        around = [i for i in (here - 1, here, here + 1) if 0 <= i < len(STRENGTHS)]
        best = min(around, key=lambda i: (error(i), i))
        if best == here:
            break
        here = best
    return STRENGTHS[here], errors[here]


def _row_sums(blocks: np.ndarray) -> np.ndarray:
    """[g, c, n] -> [g, c] float64 sums over the samples (einsum: 2.3x numpy's casting sum)."""
    return np.einsum("gcn->gc", blocks, dtype=np.float64)


def _outer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per group, the outer product of two vectors: [g, i] x [g, j] -> [g, i, j]."""
    return a[:, :, None] * b[:, None, :]


def _error(solution: np.ndarray, gram: np.ndarray, cross: np.ndarray, norm: float) -> float:
    """|XΘ - Y|² from the normal equations: |Y|² - 2 tr(ΘᵀXᵀY) + tr(ΘᵀXᵀXΘ)."""
    return norm - 2 * float(np.sum(solution * cross)) + float(np.sum(solution * (gram @ solution)))


def _refit_one(originals: FixedModelValues, current_values: ChangingModelValues, current: onnx.ModelProto, graph: gs.Graph, site: WeightSite,
               result: PassResult, strength: Strength, kept: KeptChannels, walk: StrengthWalk, through_residual: bool = True) -> bool:
    """Refit one layer in ``graph``; whether its weights changed."""
    node = site.uses[0].node
    groups = groups_of(site)
    with_bias = node.op in ("Conv", "Gemm")
    matrix = to_matrix(site).astype(np.float64)  # [outputs, columns of one group]; group g owns a block of rows
    outputs, columns = matrix.shape
    if outputs % groups:
        result.skipped.append(Skip(node.name, "refit: outputs not divisible by groups"))
        return False
    bias = _bias_of(node, outputs) if with_bias else np.zeros(outputs)
    theta = _grouped_parameters(matrix, bias, groups, with_bias)  # [g, c (+1), o]
    # A layer whose output is added to a residual is fitted so that the SUM matches the original
    # block's output: its target is the original sum minus the pruned model's residual, which then
    # also absorbs the drift that the residual path carries.
    residual = _residual_of(node) if through_residual else None
    target_name = residual[0] if residual else node.outputs[0].name
    inputs_read = [activation_name(site), *([residual[1]] if residual else [])]
    targets = originals.values(target_name)
    inputs = current_values.values(current, inputs_read)
    folds = FOLDS if strength == "auto" and theta.shape[1] <= CROSS_VALIDATED_WIDTH else 1
    equations = NormalEquations.zeros(groups, theta.shape[1], theta.shape[2], folds)
    design, wanted_columns = CentredColumns(site), CentredColumns(site, output=True)
    samples_seen = 0
    for target_value, input_values in zip(targets, inputs, strict=True):
        wanted = _surviving(target_value, kept.get(target_name))
        if residual:
            if input_values[residual[1]].shape != wanted.shape:  # a broadcast addend: fit the layer's own output
                return _refit_one(originals, current_values, current, graph, site, result, strength, kept, walk, through_residual=False)
            wanted = wanted - input_values[residual[1]]
        for block in _sample_blocks(input_values[activation_name(site)], wanted):
            fold = (samples_seen // FOLD_BLOCK) % folds  # single-sample feeds: 16 in a row share a fold
            samples_seen += len(block[1]) if block[1].ndim else 1
            for activation, target_part in sample_slices(site, *block):
                target = wanted_columns(target_part)
                if target.shape[0] * target.shape[1] != outputs:
                    result.skipped.append(Skip(node.name, "refit: output channels differ from the original's"))
                    return False
                inputs_block = design(activation)  # the bias column: theta's extra row
                equations.add(inputs_block, target, design.shift, wanted_columns.shift, fold)
    equations.settle()
    norm = float(equations.norm.sum())
    if not norm:
        return False
    fit = equations.solve(theta, strength, walk)
    judged = fit.error_after if fit.error_held_out is None else fit.error_held_out
    if judged >= fit.error_before:
        where = "on calibration data" if fit.error_held_out is None else "on held-out calibration samples"
        result.skipped.append(Skip(node.name, f"refit: no improvement {where}"))
        return False
    new_matrix = np.concatenate([fit.solution[g, :columns].T for g in range(groups)], axis=0)
    replace_weight(site, from_matrix(site, new_matrix))
    if with_bias:
        new_bias = fit.solution[:, -1, :].reshape(-1)
        add_output_shift(graph, node, (new_bias - bias).astype(site.value.dtype))
    details = _refit_details(fit, norm)
    if strength == "auto" and fit.error_held_out is None:
        details["strength_note"] = f"not cross-validated: fewer than 2 folds of {FOLD_BLOCK} samples, or over {CROSS_VALIDATED_WIDTH} inputs"
    result.changes.append(Change(node.name, "refit", details))
    return True


def _sample_blocks(activation: np.ndarray, target: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The pair in blocks of FOLD_BLOCK samples along axis 0 (each block goes to one fold), or whole
    where the two do not share that axis."""
    if activation.ndim == 0 or target.ndim == 0 or len(activation) != len(target):
        yield activation, target
        return
    for start in range(0, len(activation), FOLD_BLOCK):
        yield activation[start : start + FOLD_BLOCK], target[start : start + FOLD_BLOCK]


def _refit_details(fit: Fit, norm: float) -> dict[str, float | str]:
    """Relative errors sqrt(|XΘ - Y|² / |Y|²) before and after, held out when the strength was chosen."""

    def relative(error: float) -> float:
        return round(float(np.sqrt(max(error, 0.0) / max(norm, 1e-30))), 6)

    details: dict[str, float | str] = {"relative_error_before": relative(fit.error_before), "relative_error_after": relative(fit.error_after),
                                       "strength": fit.strength}
    if fit.error_held_out is not None:
        details["relative_error_held_out"] = relative(fit.error_held_out)
    return details


def _grouped_parameters(matrix: np.ndarray, bias: np.ndarray, groups: int, with_bias: bool) -> np.ndarray:
    """[outputs, columns] weights (+ bias) as per-group [g, columns (+1), outputs / g]."""
    per_group = matrix.shape[0] // groups
    blocks = []
    for g in range(groups):
        weights = matrix[g * per_group : (g + 1) * per_group].T
        blocks.append(np.vstack([weights, bias[None, g * per_group : (g + 1) * per_group]]) if with_bias else weights)
    return np.stack(blocks)


def _surviving(value: np.ndarray, kept: tuple[int, np.ndarray] | None) -> np.ndarray:
    if kept is None:
        return value
    axis, mask = kept
    return np.compress(mask, value, axis=axis) if value.ndim > axis and value.shape[axis] == mask.size else value


def _target_of(node: gs.Node) -> str:
    """What a layer is refit to reproduce: the residual sum it feeds, else its own output."""
    residual = _residual_of(node)
    return residual[0] if residual else node.outputs[0].name


def _residual_of(node: gs.Node) -> tuple[str, str] | None:
    """(the Add's output, the other addend) when the node's only reader is an Add of two activations."""
    readers = node.outputs[0].outputs
    if len(readers) != 1 or readers[0].op != "Add" or len(readers[0].inputs) != 2:
        return None
    add = readers[0]
    other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
    if isinstance(other, gs.Constant) or other is node.outputs[0] or not other.inputs or other.inputs[0].op == "Constant":
        return None  # a bias-like constant (initializer or Constant node), x + x, or a graph input
    return add.outputs[0].name, other.name


def _bias_of(node: gs.Node, outputs: int) -> np.ndarray:
    if len(node.inputs) > 2:
        value = constant_value(node.inputs[2])
        if value is not None:
            scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
            flat = value.astype(np.float64).reshape(-1) * scale  # a Gemm's C may be [1, N]
            return np.broadcast_to(flat, (outputs,)).copy() if flat.size in (1, outputs) else np.zeros(outputs)
    return np.zeros(outputs)
