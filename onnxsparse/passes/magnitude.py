"""``magnitude-prune``: zero the least important weights, unstructured or N:M, by magnitude or Wanda."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..activations import ChangingModelValues, FixedModelValues, collect_channel_stats
from ..calibration import read_once
from ..graph import from_gs, overridable_initializers, to_gs
from ..layers import WEIGHT_OPS, layer_kind, layer_ops
from ..layerwise import (
    activation_name,
    add_blocks,
    correct_biases,
    current_hessians,
    fit_to_teacher,
    from_matrix,
    gram_blocks,
    grouped_rows,
    original_hessians,
    sample_slices,
    sparsegpt,
    to_matrix,
    unsupported_reason,
)
from ..limits import CALIBRATION_SAMPLES
from ..shapes import shapes_where_known
from ..validation import DriftProbe, Tolerance
from ..weights import WeightSite, find_weights, matches, replace_weight
from ..weightstore import release_pages
from .base import Change, Pass, PassContext, PassResult, Requirement, Skip, register

log = logging.getLogger(__name__)

SPEED_WARNING = (
    "unstructured and N:M sparsity does not make onnxruntime faster on CPU: it runs zeros like any other "
    "weight. Channel removal (channel-prune) and int8 (qdq) make it faster; sparse-encode makes the file smaller."
)


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` → (2, 4); ``"unstructured"`` or ``"filter"`` → None; anything else is a ValueError."""
    if pattern in ("unstructured", "filter"):
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"pattern '{pattern}' is not 'unstructured', 'filter' or N:M with 0 < N < M (e.g. 2:4)")
    return int(match.group(1)), int(match.group(2))


@register
@dataclass(frozen=True)
class MagnitudePrune(Pass):
    """Zero the smallest weights of Conv/ConvTranspose/Gemm/MatMul (unstructured or N:M), wherever they live.

    Weights in initializers, Constant nodes and If/Loop subgraphs alike; each tensor once, even when
    shared. The ``wanda`` criterion scales |W| by the L2 norm of each input channel's activation
    over calibration data. Zeros cost the same time as any weight in onnxruntime: follow with
    ``sparse-encode`` for a smaller file.
    """

    name = "magnitude-prune"
    preserves = frozenset({Requirement.SHAPES})  # it changes weight values only
    default_tolerance = Tolerance(min_cosine=0.99)

    sparsity: float = field(default=0.5, metadata={"help": "fraction of weights zeroed, in [0, 1) (N:M patterns imply M-N / M)"})
    scope: Literal["per-tensor", "per-row", "global", "sensitivity"] = field(
        default="per-tensor", metadata={"help": "where the threshold applies: each tensor, each output unit, one across tensors, "
                                                "or per-tensor amounts from a sensitivity scan on calibration data"}
    )
    pattern: str = field(default="unstructured", metadata={
        "help": "unstructured; filter (whole output units, which channel-prune{mode=zero-only} then removes); or N:M along the reduction axis (e.g. 2:4)"})
    criterion: Literal["magnitude", "wanda", "sparsegpt"] = field(
        default="magnitude", metadata={"help": "wanda and sparsegpt need calibration data"}
    )
    include: tuple[str, ...] = field(default=WEIGHT_OPS, metadata={"help": "op types or name patterns to prune (add LSTM, GRU for RNNs)"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "op types or tensor/node name patterns to leave alone"})
    overrides: Mapping[str, float] = field(default_factory=dict, metadata={"help": "pattern:sparsity for matching tensors"})
    skip_depthwise: bool = field(default=False, metadata={"help": "leave depthwise convolutions dense"})
    skip_first: bool = field(default=False, metadata={"help": "leave the first weight layer dense"})
    skip_last: bool = field(default=False, metadata={"help": "leave the last weight layer dense"})
    min_size: int = field(default=0, metadata={"help": "leave tensors with fewer elements dense"})
    calibration_samples: int = field(default=CALIBRATION_SAMPLES, metadata={"help": "calibration samples read (the first ones) for wanda/sparsegpt/bias_correction statistics"})
    bias_correction: bool = field(default=False, metadata={"help": "re-centre each pruned layer's mean output on calibration data"})
    block: int = field(default=128, metadata={"help": "sparsegpt: columns per block"})
    damp: float = field(default=0.01, metadata={"help": "sparsegpt: damping, a fraction of the mean Hessian diagonal"})
    # MobileNetV2 30%, sensitivity scope, 96 held-out views: top-1 agreement 0.865 without, 0.885 with 0.1.
    teacher: float = field(default=0.1, metadata={
        "help": "sparsegpt: before pruning a layer, refit it to the ORIGINAL model's layer output from the pruned model's input, "
                "regularized towards its weights by this fraction of the mean Hessian diagonal (0 = off; doubles the model runs)"})

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity {self.sparsity} is outside [0, 1)")
        parse_nm(self.pattern)
        for pattern, value in self.overrides.items():
            if not 0 <= value < 1:
                raise ValueError(f"override {pattern}:{value} is outside [0, 1)")
        if self.min_size < 0 or self.calibration_samples < 1 or self.block < 1 or self.damp < 0 or self.teacher < 0:
            raise ValueError("min_size, damp and teacher must be >= 0, calibration_samples and block >= 1")
        if self.criterion == "sparsegpt" and self.scope == "global":
            raise ValueError("criterion sparsegpt works layer by layer: use scope per-tensor or per-row")

    def needs(self) -> frozenset[Requirement]:
        data_driven = self.criterion != "magnitude" or self.bias_correction or self.scope == "sensitivity"
        return frozenset({Requirement.CALIBRATION}) if data_driven else frozenset()

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        if Requirement.CALIBRATION not in self.needs():
            return self._prune(model, context)
        # With shapes, the activation caches know each tensor's size and serve several layers per run;
        # without them (a torch export has no value_info) each layer's inputs were a run of their own
        # over the calibration set. The shapes serve the analysis only: pruning changes no shape, and
        # the file keeps the value_info it came with (an observed dim is not written as fixed).
        kept = list(model.graph.value_info)
        result = self._prune(shapes_where_known(model), context)
        del result.model.graph.value_info[:]
        result.model.graph.value_info.extend(kept)
        return result

    def _prune(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        graph = to_gs(model)
        result = PassResult(model)
        sites, rejected = find_weights(graph, layer_ops(), overridable_initializers(model))
        result.skipped.extend(Skip(r.name, r.reason) for r in rejected)
        chosen = self._choose(sites, result)
        self._warn_unmatched(sites, result)
        if not chosen:
            result.warnings.append("magnitude-prune matched no weight tensor: nothing pruned")
            return result
        if self.scope == "sensitivity" and not parse_nm(self.pattern):
            chosen = self._sensitivity_targets(model, chosen, context, result)
        if self.criterion == "sparsegpt":
            pruned = self._reconstruct(model, graph, chosen, context, result)
        else:
            pruned = []
            # one weight at a time (all at once only for a global threshold): where a store holds the
            # weights, each pruned one goes there at once and the pages read are let go
            for site, keep in self._masks(chosen, self._scorer(model, chosen, context, result)):
                pruned.append(replace_weight(site, np.where(keep, site.value, np.zeros((), dtype=site.value.dtype))).values)
                release_pages(site.value)
        if self.bias_correction:
            assert context.calibration is not None
            corrected = correct_biases(model, graph, [s for s, _ in chosen], context.calibration, self.calibration_samples)
            result.figures["biases_corrected"] = corrected
        graph.cleanup().toposort()
        result.model = from_gs(graph, like=model)
        self._summarize(chosen, pruned, result)
        result.warnings.append(SPEED_WARNING)
        return result

    # -- selection ------------------------------------------------------------------------------

    def _sensitivity_targets(self, model: onnx.ModelProto, chosen: list[tuple[WeightSite, float]], context: PassContext,
                             result: PassResult) -> list[tuple[WeightSite, float]]:
        """Per-tensor sparsities with the same total, from a scan on calibration data: each tensor
        alone is pruned (by SparseGPT on the original model's layer input when that is the criterion,
        else by magnitude) to the target and to a higher probe, and the output drift
        measured at both. Each tensor's damage is modelled as drift x (sparsity / target)^p with
        its own exponent p from the two probes, and the sparsities that minimise the total damage
        are found by bisection: large, robust tensors give more, small sensitive ones (the first
        conv, the classifier) less, and a tensor whose damage climbs steeply is not pushed far."""
        assert context.calibration is not None
        probe = DriftProbe(model, context.calibration)
        drifts: dict[str, list[float]] = {}
        # SparseGPT repairs some layers far better than others (a 1x1 conv fed rich inputs, not a
        # classifier fed one pooled vector per image): probe each tensor the way it will be pruned.
        # The Hessians leave out the probe's samples: a reconstruction judged on rows it was fit to
        # looks free (a classifier fit on 160 pooled vectors of 1280 features memorises them).
        every_hessian = (original_hessians(model, [site for site, _ in chosen if not unsupported_reason(site)], probe.held_out,
                                           self.calibration_samples)
                         if self.criterion == "sparsegpt" else {})
        unfit = [site.name for site, _ in chosen if self.criterion == "sparsegpt" and not unsupported_reason(site) and site.name not in every_hessian]
        if unfit:
            result.warnings.append(f"magnitude-prune sensitivity: no calibration samples beyond the {probe.SAMPLES} the drift is read on, "
                                   f"so {len(unfit)} probes were pruned by magnitude, not SparseGPT: give more calibration samples")
        for index, (site, target) in enumerate(chosen):
            hessians = every_hessian.get(site.name)
            at_target = self._drift_pruned(probe, model, site, target, hessians)
            higher = _probe_above(target)
            drifts[site.name] = [at_target, self._drift_pruned(probe, model, site, higher, hessians) if higher > target else at_target]
            if context.progress:
                context.progress("magnitude-prune sensitivity", index + 1, len(chosen))
        sizes = np.array([site.value.size for site, _ in chosen], dtype=np.float64)
        targets = np.array([target for _, target in chosen])
        curves = [_damage_curve(target, *drifts[site.name]) for site, target in chosen]
        drift_at_target = np.array([max(drift, 1e-9) for drift, _ in curves])
        exponents = np.array([exponent for _, exponent in curves])
        shares = allocate_sparsity(sizes, targets, drift_at_target, exponents)
        result.figures["sensitivity"] = {
            site.name: {"drift_at_target": round(drifts[site.name][0], 6), "drift_at_probe": round(drifts[site.name][1], 6),
                        "exponent": round(float(p), 2), "sparsity": round(float(share), 4)}
            for (site, _), p, share in zip(chosen, exponents, shares)}
        return [(site, float(share)) for (site, _), share in zip(chosen, shares)]

    def _drift_pruned(self, probe: DriftProbe, model: onnx.ModelProto, site: WeightSite, sparsity: float, hessians: np.ndarray | None) -> float:
        """How far the outputs move with only this tensor pruned to ``sparsity``. A main-graph initializer's
        trial values go to onnxruntime beside the model; other weights need a copy of the model."""
        values = self._pruned_values(site, sparsity, hessians)
        if not site.in_subgraph and any(tensor.name == site.name for tensor in model.graph.initializer):
            return probe.drift_with({site.name: values})
        return probe.drift(self._pruned_alone(model, site, values))

    def _pruned_values(self, site: WeightSite, sparsity: float, hessians: np.ndarray | None) -> np.ndarray:
        """This tensor pruned to ``sparsity``: by SparseGPT given its input's Hessians, else by magnitude."""
        if hessians is not None:
            return self._solve(site, hessians, None, sparsity, None)
        keep = unstructured_mask(np.abs(site.value), sparsity)
        return np.where(keep, site.value, 0).astype(site.value.dtype)

    @staticmethod
    def _pruned_alone(model: onnx.ModelProto, site: WeightSite, values: np.ndarray) -> onnx.ModelProto:
        """A copy of the model with only this tensor's values replaced (a Constant node's, or one in a subgraph)."""
        trial_graph = to_gs(model)
        trial_site = next(s for s in find_weights(trial_graph, layer_ops())[0] if s.name == site.name)
        replace_weight(trial_site, values)
        return from_gs(trial_graph, like=model)

    def _choose(self, sites: list[WeightSite], result: PassResult) -> list[tuple[WeightSite, float]]:
        main = [s for s in sites if not s.in_subgraph]
        first, last = (main[0].name, main[-1].name) if main else ("", "")
        chosen = []
        for site in sites:
            reason = self._skip_reason(site, first, last)
            if reason:
                result.skipped.append(Skip(site.name, reason))
            else:
                chosen.append((site, self._target(site)))
        return chosen

    def _skip_reason(self, site: WeightSite, first: str, last: str) -> str:
        names = (site.name, *site.node_names, site.op)
        if not matches(self.include, *names):
            return f"{site.op} not in include"
        if matches(self.exclude, *names):
            return "excluded by pattern"
        if self.skip_depthwise and site.depthwise:
            return "depthwise convolution (skip_depthwise)"
        if self.skip_first and site.name == first:
            return "first weight layer (skip_first)"
        if self.skip_last and site.name == last:
            return "last weight layer (skip_last)"
        if site.value.size < self.min_size:
            return f"{site.value.size} elements < min_size {self.min_size}"
        nm = parse_nm(self.pattern)
        if nm and site.value.shape[site.reduction_axis] % nm[1]:
            return f"reduction axis of {site.value.shape[site.reduction_axis]} is not a multiple of {nm[1]} ({self.pattern})"
        return ""

    def _target(self, site: WeightSite) -> float:
        nm = parse_nm(self.pattern)
        if nm:
            return (nm[1] - nm[0]) / nm[1]
        names = (site.name, *site.node_names, site.op)
        for pattern, value in self.overrides.items():
            if matches([pattern], *names):
                return value
        return self.sparsity

    def _warn_unmatched(self, sites: list[WeightSite], result: PassResult) -> None:
        every_name = [(s.name, *s.node_names, s.op) for s in sites]
        for option, patterns in (("include", self.include), ("exclude", self.exclude), ("overrides", tuple(self.overrides))):
            for pattern in patterns:
                if option == "include" and pattern in layer_ops():
                    continue  # an op type the model lacks is no typo
                if not any(matches([pattern], *names) for names in every_name):
                    result.warnings.append(f"magnitude-prune: {option} pattern '{pattern}' matched no weight tensor")

    # -- scores and masks -----------------------------------------------------------------------

    def _scorer(self, model: onnx.ModelProto, chosen: list[tuple[WeightSite, float]], context: PassContext,
                result: PassResult) -> Callable[[WeightSite], np.ndarray]:
        """How important each weight of a site is: its magnitude, times its input's norm for wanda
        (statistics gathered once, here); scored one site at a time, when asked."""
        if self.criterion == "magnitude":
            return lambda site: np.abs(site.value.astype(np.float32))
        assert context.calibration is not None  # the manager checked needs()
        activations = {site.name: _activation_of(site) for site, _ in chosen}
        requests = {name: axis for entry in activations.values() if entry for name, axis in [entry]}
        stats = collect_channel_stats(model, context.calibration, requests, limit=self.calibration_samples, label="wanda statistics")
        for site, _ in chosen:
            if activations[site.name] is None:
                result.skipped.append(Skip(site.name, "no activation statistics (inside a subgraph or shared): scored by magnitude"))

        def score(site: WeightSite) -> np.ndarray:
            magnitude = np.abs(site.value.astype(np.float32))
            entry = activations[site.name]
            return magnitude if entry is None else magnitude * _norm_for_weight(site, stats[entry[0]].l2_norm)

        return score

    def _masks(self, chosen: list[tuple[WeightSite, float]], score: Callable[[WeightSite], np.ndarray]) -> Iterator[tuple[WeightSite, np.ndarray]]:
        """Each site with the mask of the weights it keeps, one site at a time (a global threshold
        scores every site first)."""
        nm = parse_nm(self.pattern)
        if self.scope == "global" and not nm and self.pattern != "filter":
            scores = [score(site) for site, _ in chosen]
            overridden = [matches(self.overrides, site.name, *site.node_names, site.op) for site, _ in chosen]
            shared = iter(global_masks([s for s, o in zip(scores, overridden) if not o], self.sparsity))
            for (site, target), site_score, own in zip(chosen, scores, overridden):
                yield site, unstructured_mask(site_score, target) if own else next(shared)
            return
        for site, target in chosen:
            site_score = score(site)
            if nm:
                yield site, nm_mask(site_score, site.reduction_axis, *nm)
            elif self.pattern == "filter":
                yield site, filter_mask(site_score, site.out_axis, target)
            elif self.scope == "per-row":
                yield site, per_row_mask(site_score, site.out_axis, target)
            else:
                yield site, unstructured_mask(site_score, target)

    # -- SparseGPT: layer by layer, each fed the already-pruned model's activations -------------

    def _reconstruct(
        self, model: onnx.ModelProto, graph: gs.Graph, chosen: list[tuple[WeightSite, float]], context: PassContext, result: PassResult
    ) -> list[np.ndarray]:
        assert context.calibration is not None
        nm = parse_nm(self.pattern)
        source = read_once(context.calibration, model, limit=self.calibration_samples)  # every layer runs the model on it, the teacher too
        teacher = (FixedModelValues(model, source, self.calibration_samples, [activation_name(site) for site, _ in chosen if not unsupported_reason(site)],
                                    label="sparsegpt teacher") if self.teacher > 0 else None)
        inputs = ChangingModelValues(source, self.calibration_samples, label="sparsegpt inputs")
        pruned = []
        for site, target in chosen:
            reason = unsupported_reason(site)
            if reason:
                result.skipped.append(Skip(site.name, f"sparsegpt: {reason}; pruned by magnitude instead"))
                keep = nm_mask(np.abs(site.value), site.reduction_axis, *nm) if nm else unstructured_mask(np.abs(site.value), target)
                value = np.where(keep, site.value, np.zeros((), dtype=site.value.dtype))
            else:
                current = from_gs(graph, like=model)  # the model with every earlier layer already pruned
                value = self._reconstruct_layer(current, site, target, nm, inputs, teacher)
            replace_weight(site, value)
            inputs.edited(graph, [use.node for use in site.uses])
            pruned.append(value)
        return pruned

    def _reconstruct_layer(self, current: onnx.ModelProto, site: WeightSite, target: float, nm: tuple[int, int] | None,
                           inputs: ChangingModelValues, teacher: FixedModelValues | None) -> np.ndarray:
        hessians, crosses = self._layer_statistics(current, site, inputs, teacher)
        return self._solve(site, hessians, crosses, target, nm)

    def _solve(self, site: WeightSite, hessians: np.ndarray, crosses: np.ndarray | None, target: float,
               nm: tuple[int, int] | None) -> np.ndarray:
        """SparseGPT on the layer's weight, group by group, after the teacher fit when ``crosses`` are given."""
        matrix = to_matrix(site)
        rows_per_group = matrix.shape[0] // len(hessians)
        groups = [matrix[g * rows_per_group : (g + 1) * rows_per_group] for g in range(len(hessians))]
        if crosses is not None:
            groups = [fit_to_teacher(w, c, h, self.teacher) for w, c, h in zip(groups, crosses, hessians)]
        solved = [sparsegpt(w, h, target, nm=nm, per_row=self.scope == "per-row", block=self.block, damp=self.damp)
                  for w, h in zip(groups, hessians)]
        return from_matrix(site, np.concatenate(solved, axis=0))

    def _layer_statistics(self, current: onnx.ModelProto, site: WeightSite, inputs: ChangingModelValues, teacher_values: FixedModelValues | None
                          ) -> tuple[np.ndarray, np.ndarray | None]:
        """XᵀX per group of the layer's input in the partly pruned model and, with a teacher,
        X_tᵀX with X_t the same input in the original model (the same feeds, in the same order)."""
        if teacher_values is None:
            return current_hessians(current, site, inputs), None
        name = activation_name(site)
        theirs = iter(teacher_values.values(name))
        hessians: np.ndarray | None = None
        crosses: np.ndarray | None = None
        for values in inputs.values(current, [name]):
            teacher = next(theirs)
            for part in sample_slices(site, values[name], teacher):
                rows = grouped_rows(site, part[0])
                hessians = add_blocks(hessians, gram_blocks(rows))
                crosses = add_blocks(crosses, gram_blocks(rows, grouped_rows(site, part[1])))
        assert hessians is not None, "no calibration feed"
        return hessians, crosses

    # -- reporting -----------------------------------------------------------------

    def _summarize(self, chosen: list[tuple[WeightSite, float]], pruned: list[np.ndarray], result: PassResult) -> None:
        zeros_total = size_total = 0
        for (site, target), value in zip(chosen, pruned):
            zeros = int(value.size - np.count_nonzero(value))
            release_pages(value)
            zeros_total += zeros
            size_total += value.size
            result.changes.append(Change(site.name, "pruned", {
                "op": site.op, "nodes": site.node_names, "size": int(value.size), "target": round(target, 6),
                "sparsity": round(zeros / value.size, 6), "pattern": self.pattern, "criterion": self.criterion,
                "scope": self.scope if not parse_nm(self.pattern) else "N:M groups",
            }))
        result.figures.update(tensors_pruned=len(chosen), weights_considered=size_total, zeros=zeros_total,
                              sparsity=round(zeros_total / max(size_total, 1), 6))


MAX_SHARE = 0.95  # no tensor is pruned further than this by the sensitivity scope


def _probe_above(target: float) -> float:
    """The second sparsity a tensor is probed at: halfway from the target to MAX_SHARE."""
    return target + (MAX_SHARE - target) / 2


def _damage_curve(target: float, at_target: float, at_probe: float) -> tuple[float, float]:
    """(drift at the target, p) of drift(s) = drift(target) x (s / target)^p through both probes, p
    within [1.5, 8]: a flat or noisy pair must not make a tensor look free to prune, nor one steep
    pair rule it out. A tensor that does not move the outputs at its target (already that sparse,
    or float noise) but does at the probe is modelled quadratically through the probe instead."""
    probe = _probe_above(target)
    if target <= 0 or probe <= target or at_probe <= 0:
        return at_target, 2.0
    if at_target <= 1e-6 * at_probe:
        return at_probe * (target / probe) ** 2, 2.0
    if at_probe <= at_target:
        return at_target, 1.5
    return at_target, float(np.clip(np.log(at_probe / at_target) / np.log(probe / target), 1.5, 8.0))


def allocate_sparsity(sizes: np.ndarray, targets: np.ndarray, drifts: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """Sparsities s minimising sum(drift x (s / target)^p) with sum(size x s) = sum(size x target).

    The optimum has drift p (s/t)^(p-1) / t = λ x size for every tensor, i.e. s = t (λ t size / (drift p))^(1/(p-1));
    λ is found by bisection on its logarithm (the allocated total grows with λ)."""
    wanted = float(np.sum(sizes * targets))

    def shares(log_lambda: float) -> np.ndarray:
        base = np.exp(log_lambda) * targets * sizes / (drifts * exponents)
        return np.minimum(MAX_SHARE, targets * base ** (1.0 / (exponents - 1.0)))

    low, high = -200.0, 200.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if float(np.sum(sizes * shares(middle))) < wanted else (low, middle)
    return shares(high)


# ---------------------------------------------------------------------------------------------
# masks (True = keep): exact counts, ties broken by position
# ---------------------------------------------------------------------------------------------


def unstructured_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    flat = scores.reshape(-1)
    drop = round(sparsity * flat.size)
    keep = np.ones(flat.size, dtype=bool)
    if drop:
        keep[np.argpartition(flat, drop - 1)[:drop]] = False
    return keep.reshape(scores.shape)


def per_row_mask(scores: np.ndarray, out_axis: int, sparsity: float) -> np.ndarray:
    """Each output unit (filter, output feature) to the target: Wanda's comparison group."""
    moved = np.moveaxis(scores, out_axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    drop = round(sparsity * rows.shape[1])
    keep = np.ones(rows.shape, dtype=bool)
    if drop:
        np.put_along_axis(keep, np.argpartition(rows, drop - 1, axis=1)[:, :drop], False, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), 0, out_axis)


def filter_mask(scores: np.ndarray, out_axis: int, sparsity: float) -> np.ndarray:
    """Whole output units (filters, output features) with the smallest L2 norm of scores."""
    moved = np.moveaxis(scores, out_axis, 0)
    norms = np.sqrt(np.sum(np.square(moved.reshape(moved.shape[0], -1), dtype=np.float64), axis=1))
    keep_rows = unstructured_mask(norms, sparsity)
    return np.moveaxis(np.broadcast_to(keep_rows.reshape((-1,) + (1,) * (moved.ndim - 1)), moved.shape), 0, out_axis)


def nm_mask(scores: np.ndarray, reduction_axis: int, n: int, m: int) -> np.ndarray:
    """Keep the N largest of every M consecutive weights along the reduction axis."""
    moved = np.moveaxis(scores, reduction_axis, -1)
    groups = moved.reshape(-1, m)
    keep = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(keep, np.argpartition(groups, m - n - 1, axis=1)[:, : m - n], False, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, reduction_axis)


def global_masks(scores: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """One threshold across every tensor: the smallest scores overall are dropped."""
    if not scores:
        return []
    joined = unstructured_mask(np.concatenate([s.reshape(-1) for s in scores]), sparsity)
    bounds = np.cumsum([0] + [s.size for s in scores])
    return [joined[a:b].reshape(s.shape) for a, b, s in zip(bounds[:-1], bounds[1:], scores)]


# ---------------------------------------------------------------------------------------------
# Wanda: |W| times the input channel's activation norm
# ---------------------------------------------------------------------------------------------


def _activation_of(site: WeightSite) -> tuple[str, int] | None:
    """(activation tensor name, its feature axis) feeding the weight's only use in the main graph."""
    if site.in_subgraph or len(site.uses) != 1:
        return None
    node, index = site.uses[0].node, site.uses[0].index
    kind = layer_kind(node.op)
    read = None if kind is None else kind.activation(node.attrs, index)
    return None if read is None else (node.inputs[read[0]].name, read[1])


def _norm_for_weight(site: WeightSite, norm: np.ndarray) -> np.ndarray:
    """The activation norm laid out to broadcast against the weight along its reduction axis."""
    value = site.value
    node = site.uses[0].node
    kind = layer_kind(node.op)
    groups = 1 if kind is None else kind.groups(node.attrs)
    if groups > 1 and node.op == "Conv":
        per_group = norm.reshape(groups, -1)  # [groups, C_in / groups]
        out_per_group = value.shape[0] // groups
        table = per_group[np.arange(value.shape[0]) // out_per_group]  # [C_out, C_in / groups]
        return table.reshape(table.shape + (1,) * (value.ndim - 2))
    shape = [1] * value.ndim
    shape[site.reduction_axis] = value.shape[site.reduction_axis]
    if norm.size != value.shape[site.reduction_axis]:
        return np.ones(shape)  # grouped ConvTranspose: fall back to magnitude for this tensor
    return norm.reshape(shape)
