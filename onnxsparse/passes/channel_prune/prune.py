"""The ``channel-prune`` pass: remove whole channels and everything that depends on them, so the model shrinks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...channels import Analysis, analyze, apply_plan
from ...errors import RequirementError
from ...graph import from_gs, overridable_initializers, to_gs
from ...inspect_model import count_macs
from ...latency import timing_feed
from ...layers import WEIGHT_OPS
from ...layerwise import add_output_shift
from ...limits import CALIBRATION_SAMPLES
from ...validation import EXACT, DriftProbe, Tolerance
from ...weights import matches
from ..base import Change, Pass, PassContext, PassResult, Requirement, Skip, register
from .budget import BudgetMeasure, TimeSaved, allocate, damage_shape, latency_ratio, macs_saved
from .edit import compensated_readers, pruned_copy, refit_consumers, reinfer, size_figures
from .exact import consumer_constants, fold_constant, why_not_exact
from .groups import Group, Plan, Unit, unit_label
from .importance import activation_importance, batchnorm_scale, fitting_samples, reconstruction_importance

# Times a sensitivity plan is measured whole and re-aimed at its budget (each costs one shape inference).
PLAN_ADJUSTMENTS = 4


@register
@dataclass(frozen=True)
class ChannelPrune(Pass):
    """Remove whole output channels (filters, hidden units) with everything coupled to them.

    Coupled channels (residual adds, concats, depthwise convs, norms, Flatten into Gemm) go
    together; an op without a rule pins its channels, and every pin is reported with that op.
    ``mode=zero-only`` removes only dead channels (all-zero filters) and is exact: a channel that
    is constant but not zero is folded into its consumers' biases where they are linear without
    padding, and kept otherwise.
    """

    name = "channel-prune"
    default_tolerance = Tolerance(min_cosine=0.99)
    may_change_speed = True

    ratio: float = field(default=0.3, metadata={"help": "fraction of each group's channels removed (global: of all removable channels)"})
    scope: Literal["uniform", "global", "sensitivity"] = field(default="uniform", metadata={
        "help": "a ratio per group; one ranking across groups; or per-group ratios from a sensitivity scan on calibration data"})
    budget: Literal["channels", "macs", "latency"] = field(default="channels", metadata={
        "help": "under scope=sensitivity, what ratio counts: removable channels, multiply-accumulates saved, or "
                "onnxruntime time saved (one thread, each group's probe timed against the input); channels then go "
                "where the drift per MAC or per second saved is lowest"})
    mode: Literal["ratio", "zero-only"] = field(default="ratio", metadata={"help": "zero-only: only dead channels, exactly"})
    criterion: Literal["l1", "l2", "activation", "output", "reconstruction"] = field(default="l1", metadata={
        "help": "filter norm; mean |activation|; the energy a channel sends through its consumers' weights, "
                "mean(a²) x |W[:, c]|²; or what losing it costs its consumers after the other channels compensate "
                "(greedy group OBS on each consumer's input Gram: a duplicated channel costs little; pairs with refit). "
                "All but the norms need calibration"})
    reduce: Literal["sum", "mean", "max"] = field(default="sum", metadata={"help": "how a unit's importance combines its coupled filters"})
    bn_scale: bool = field(default=False, metadata={"help": "scale filter norms by the |gamma| of a BatchNorm right after"})
    overrides: Mapping[str, float] = field(default_factory=dict, metadata={"help": "producer name pattern:ratio"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "producer name patterns whose channels stay"})
    round_to: int = field(default=0, metadata={
        "help": "keep channel counts a multiple of this; 0: 16 for groups of 32 channels or more, 8 for 16 or more, else 1 "
                "(onnxruntime's blocked convolutions take 16 channels at a time on AVX-512, 8 on AVX2: MobileNetV2 at 50% "
                "ran 0.43x fp32 with multiples of 8, 0.40x with 16, and 1.49x with odd counts)"})
    min_channels: int = field(default=1, metadata={"help": "channels kept at least in every group"})
    refit: bool = field(default=False, metadata={"help": "least-squares refit of each consumer on calibration data"})
    refit_strength: float | Literal["auto"] = field(default="auto", metadata={
        "help": "ridge towards the original weights, relative to the mean input energy; auto: per layer, the strength whose "
                "fits best predict calibration samples held out of them (4 folds)"})
    refit_scope: Literal["consumers", "downstream"] = field(default="consumers", metadata={
        "help": "refit the layers that read pruned channels, or every layer from the first of them on (corrects drift further down)"})
    calibration_samples: int = field(default=CALIBRATION_SAMPLES, metadata={"help": "calibration samples read (the first ones) for activation statistics and refits"})
    never_slower: bool = field(default=True, metadata={
        "help": "time the pruned model against its input in onnxruntime (one thread, interleaved runs) and keep the "
                "input when pruning did not make it faster (fewer MACs can still run slower: a 16-channel block cut to 11), "
                "before any refit is spent on it. The pass manager also rolls back a step that runs slower than its input, "
                "whatever this says, unless --keep-worse"})

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio {self.ratio} is outside [0, 1)")
        for pattern, value in self.overrides.items():
            if not 0 <= value < 1:
                raise ValueError(f"override {pattern}:{value} is outside [0, 1): it would remove every channel")
        if self.min_channels < 1:
            raise ValueError("min_channels must be at least 1: a layer cannot lose every channel")
        if self.round_to < 0 or self.calibration_samples < 1:
            raise ValueError("round_to must be >= 0 and calibration_samples >= 1")
        if self.budget != "channels" and self.scope != "sensitivity":
            raise ValueError(f"budget={self.budget} applies to scope=sensitivity only")
        if self.refit_strength != "auto" and not self.refit_strength >= 0:
            raise ValueError(f"refit_strength {self.refit_strength} must be >= 0")

    preserves = frozenset({Requirement.SHAPES})  # its result's shapes are inferred again (reinfer)

    def needs(self) -> frozenset[Requirement]:
        needs = {Requirement.SHAPES}
        if self.criterion in ("activation", "output", "reconstruction") or self.refit or self.scope == "sensitivity":
            needs.add(Requirement.CALIBRATION)
        return frozenset(needs)

    def tolerance(self) -> Tolerance:
        return EXACT if self.mode == "zero-only" else self.default_tolerance

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        result = PassResult(model)
        graph = to_gs(model)
        analysis = analyze(graph, overridable_initializers(model))
        self._pin_excluded(analysis)
        groups = self._groups(analysis)
        self._score(model, analysis, groups, context)
        shifts: dict[int, tuple[gs.Node, np.ndarray]] = {}
        if self.mode == "zero-only":
            chosen = self._dead_units(model, analysis, groups, shifts, result)
        elif self.scope == "sensitivity":
            chosen = self._select_by_sensitivity(model, groups, context, result)
        else:
            chosen = self._select(groups)
        removed = np.zeros(len(analysis.parent), dtype=bool)
        for unit in chosen:
            removed[unit.members] = True
        if not removed.any():
            self._report_groups(groups, removed, analysis, result)
            if not groups:
                result.skipped.append(Skip("channel-prune", _why_no_layer(graph)))
            result.warnings.append("channel-prune removed no channel")
            return result
        macs_before = count_macs(model)
        apply_plan(graph, analysis, removed)
        self._apply_shifts(graph, analysis, removed, shifts)
        graph.cleanup().toposort()
        pruned = reinfer(from_gs(graph, like=model))
        if self.never_slower and not self._faster(model, pruned, context, result):
            return result
        self._report_groups(groups, removed, analysis, result)
        if self.refit:
            assert context.calibration is not None
            pruned = refit_consumers(model, pruned, analysis, removed, context, self.calibration_samples, result, self.refit_strength,
                                     downstream=self.refit_scope == "downstream")
        result.model = pruned
        result.figures.update(size_figures(model, pruned, macs_before))
        result.figures["channels_removed"] = int(sum(len(u.members) for u in chosen))
        return result

    def _faster(self, model: onnx.ModelProto, pruned: onnx.ModelProto, context: PassContext, result: PassResult) -> bool:
        """Whether ``pruned`` runs faster than ``model``; if not, say so in ``result`` (which keeps the input)."""
        ratio = latency_ratio(model, pruned, timing_feed(model, context.timing_inputs()), context.runtime)
        result.figures["latency_ratio"] = round(ratio, 3)
        if ratio < 1.0:
            return True
        why = (f"the pruned model took {ratio:.2f}x its input's time in onnxruntime (one thread), so the input is kept: "
               "channel counts off the runtime's 8/16-channel blocks can cost more than the MACs they save; "
               "try a larger ratio, a coarser round_to, or never_slower=false")
        result.worse = why
        result.warnings.append(why)
        return False

    # -- groups and importance ----------------------------------------------------------------

    def _pin_excluded(self, analysis: Analysis) -> None:
        for producer in analysis.producers:
            name = producer.node.name or producer.node.outputs[0].name
            if self.exclude and matches(self.exclude, name, producer.node.inputs[1].name):
                analysis.pin(producer.roots, "excluded by pattern")

    @staticmethod
    def _groups(analysis: Analysis) -> list[Group]:
        """Units, bundled by the producers they couple (a residual stream is one group)."""
        units = analysis.units()
        owner = {id(p): i for i, p in enumerate(analysis.producers)}
        parent = list(range(len(analysis.producers)))

        def find(i: int) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        unit_producers = {}
        for representative, members in units.items():
            indices = sorted({owner[id(p)] for p in map(analysis.producer_of, members) if p is not None})
            unit_producers[representative] = indices
            for i in indices[1:]:
                parent[find(i)] = find(indices[0])
        groups = {find(i): Group([]) for i in range(len(analysis.producers))}
        for i, producer in enumerate(analysis.producers):
            groups[find(i)].producers.append(producer)
        for representative, members in units.items():
            indices = unit_producers[representative]
            if indices:  # a unit made only of an untracked input's channels has nothing to remove
                groups[find(indices[0])].units.append(Unit(members, find(indices[0]), pinned=analysis.unit_pin(members)))
        return [group for group in groups.values() if group.units]

    def _score(self, model: onnx.ModelProto, analysis: Analysis, groups: list[Group], context: PassContext) -> None:
        per_root = self._root_importance(model, analysis, context)
        reducers: dict[str, Callable[[list[float]], Any]] = {"sum": np.sum, "mean": np.mean, "max": np.max}
        reducer = reducers[self.reduce]
        for group in groups:
            for unit in group.units:
                scores = [per_root[m] for m in unit.members if not np.isnan(per_root[m])]
                unit.importance = float(reducer(scores)) if scores else 0.0
        if self.criterion == "reconstruction":
            # A sensitivity probe's compensation must not be fit on the samples that judge it: a reader
            # with more inputs than samples (a classifier, one row per image) would make up for anything.
            fitting = fitting_samples(context.calibration, model) if self.scope == "sensitivity" and context.calibration else None
            reconstruction_importance(model, analysis, groups, fitting or context.calibration, self.calibration_samples,
                                       compensate=fitting is not None)

    def _root_importance(self, model: onnx.ModelProto, analysis: Analysis, context: PassContext) -> np.ndarray:
        importance = np.full(len(analysis.parent), np.nan)
        if self.criterion == "reconstruction":
            order = 1  # the filter norm stands for groups that no layer reads (see reconstruction_importance)
        elif self.criterion in ("activation", "output"):
            return activation_importance(model, analysis, context, self.calibration_samples, importance, through_consumers=self.criterion == "output")
        else:
            order = 1 if self.criterion == "l1" else 2
        for producer in analysis.producers:
            moved = np.moveaxis(producer.weight.astype(np.float64), producer.out_axis, 0).reshape(producer.channels, -1)
            norms = np.linalg.norm(moved, ord=order, axis=1)
            if self.bn_scale:
                norms = norms * batchnorm_scale(producer)
            importance[producer.roots] = norms
        return importance

    # -- selection ----------------------------------------------------------------------------

    def _select(self, groups: list[Group]) -> list[Unit]:
        if self.scope == "global":
            return self._select_global(groups)
        chosen = []
        for group in groups:
            ratio = self._ratio_of(group)
            free = sorted((u for u in group.units if not u.pinned), key=lambda u: u.importance)
            chosen.extend(free[: self._removable(len(group.units), len(free), round(ratio * len(group.units)))])
        return chosen

    def _select_global(self, groups: list[Group]) -> list[Unit]:
        """One ranking across groups; importance normalized per group so that layers compare. The
        ratio is of the channels that can go (pinned ones are not counted)."""
        ranked: list[tuple[float, int, Unit]] = []
        for index, group in enumerate(groups):
            mean = np.mean([u.importance for u in group.units if not u.pinned] or [1.0]) or 1.0  # pinned units may be scored otherwise
            ranked.extend((float(u.importance / mean), index, u) for u in group.units if not u.pinned)
        wanted = round(self.ratio * len(ranked))
        taken: dict[int, list[Unit]] = {i: [] for i in range(len(groups))}
        for _, index, unit in sorted(ranked, key=lambda item: item[0])[:wanted]:
            taken[index].append(unit)
        chosen = []
        for index, units in taken.items():
            free = sum(not u.pinned for u in groups[index].units)
            chosen.extend(units[: self._removable(len(groups[index].units), free, len(units))])
        return chosen

    def _select_by_sensitivity(self, model: onnx.ModelProto, groups: list[Group], context: PassContext, result: PassResult) -> list[Unit]:
        """Per-group amounts from a scan: each group alone loses ``ratio`` of its channels and the
        output drift on calibration data is measured; damage is then modelled as growing with the
        square of the share removed (criterion=reconstruction: as the group's compensated removal
        costs grow, which rise steeply once its redundant channels are gone), and channels are taken
        where the marginal damage is lowest until ``ratio`` of all removable channels are gone (a
        group keeps at least 20%). With ``budget=macs`` or ``latency`` the ratio is of the model's
        multiply-accumulates or run time, and the marginal damage is taken per MAC or per share of
        time a channel of that group saves (measured on the probe: a group whose probe runs no faster
        is left whole). Savings of neighbouring groups do not add up (a conv between two thinned
        groups loses a share of a share), so the plan is measured whole (counted, or timed) and the
        allocation re-aimed until it meets the budget."""
        assert context.calibration is not None
        measure = self._saving_measure(model, context)
        free = {i: sorted((u for u in g.units if not u.pinned), key=lambda u: u.importance) for i, g in enumerate(groups)}
        probes = {i: self._removable(len(groups[i].units), len(units), round(self.ratio * len(groups[i].units))) for i, units in free.items()}
        damage, measured = self._scan(model, groups, free, probes, measure, context)
        saved_at_probe = measure.settle(measured) if measure is not None else {}
        saving = {i: value / probes[i] for i, value in saved_at_probe.items()}  # budget saved per channel removed
        caps = {i: self._removable(len(groups[i].units), len(units), int(0.8 * len(groups[i].units))) for i, units in free.items()}
        caps.update({i: 0 for i, value in saving.items() if value <= 0})  # a probe that saved nothing (or ran slower) closes its group
        wanted = self.ratio * measure.total if measure is not None else round(self.ratio * sum(len(units) for units in free.values()))
        plan = self._plan(model, groups, free, damage, probes, saving, caps, wanted, measure)
        goal, best = wanted, plan
        for _ in range(PLAN_ADJUSTMENTS):
            if plan.achieved is None or abs(plan.achieved - wanted) <= 0.02 * wanted or (plan.at_caps and plan.achieved < wanted):
                break
            goal *= wanted / max(plan.achieved, 1e-9 * wanted)
            plan = self._plan(model, groups, free, damage, probes, saving, caps, goal, measure)
            if plan.achieved is not None and best.achieved is not None and abs(plan.achieved - wanted) < abs(best.achieved - wanted):
                best = plan
        self._report_plan(best, wanted, measure, result)
        self._report_scan(groups, damage, best.taken, measured, saved_at_probe, measure, result)
        return best.chosen

    def _plan(self, model: onnx.ModelProto, groups: list[Group], free: dict[int, list[Unit]], damage: dict[int, float],
              probes: dict[int, int], saving: dict[int, float], caps: dict[int, int], goal: float, measure: BudgetMeasure | None) -> Plan:
        """The allocation for ``goal``, rounded per group, with what the whole of it saves when that is known."""
        shapes = {i: damage_shape(groups[i], len(free[i]), probes[i]) for i in damage}
        taken = allocate(damage, shapes, saving, caps, goal)
        taken = {i: self._removable(len(groups[i].units), len(free[i]), count) for i, count in taken.items()}
        chosen = [unit for i, count in taken.items() for unit in free[i][:count]]
        achieved = measure.predict(pruned_copy(model, [m for u in chosen for m in u.members])) if measure is not None and chosen else None
        return Plan(taken, chosen, achieved, at_caps=all(taken[i] >= caps[i] for i in damage))

    def _report_plan(self, plan: Plan, wanted: float, measure: BudgetMeasure | None, result: PassResult) -> None:
        if measure is None:
            return
        if isinstance(measure, TimeSaved) and measure.fit is None:
            result.warnings.append("channel-prune{budget=latency}: too few probes to fit a latency model (3 or more groups needed): "
                                   "each group's saving is its probe's single timing")
        if plan.achieved is None:
            return
        result.figures["budget_planned"] = round(float(plan.achieved / measure.total), 4)
        if abs(plan.achieved - wanted) > 0.05 * wanted:
            result.warnings.append(f"channel-prune planned {plan.achieved / measure.total:.1%} of the {self.budget} for a ratio of "
                                   f"{self.ratio:g}: every group keeps at least 20% of its channels, pinned ones all")

    def _scan(self, model: onnx.ModelProto, groups: list[Group], free: dict[int, list[Unit]], probes: dict[int, int],
              measure: BudgetMeasure | None, context: PassContext) -> tuple[dict[int, float], dict[int, float]]:
        """Each group alone pruned by its probe count: the output drift, and what that saved of the budget.
        With criterion=reconstruction the layers reading the group make up for the removal first (the
        OBS update on their input Gram), so the drift is what is left for the refit, not what a refit
        would undo: a group whose channels duplicate each other is not taken for a sensitive one."""
        assert context.calibration is not None
        probe = DriftProbe(model, context.calibration)
        damage: dict[int, float] = {}
        saved: dict[int, float] = {}
        for index, (i, units) in enumerate(free.items()):
            if probes[i] == 0:
                continue
            removed = units[: probes[i]]
            trial = pruned_copy(model, [m for u in removed for m in u.members], compensated_readers(groups[i], removed))
            damage[i] = probe.drift(trial)
            if measure is not None:
                saved[i] = measure(trial)
            if context.progress:
                context.progress("channel-prune sensitivity", index + 1, len(free))
        return damage, saved

    def _report_scan(self, groups: list[Group], damage: dict[int, float], taken: dict[int, int], measured: dict[int, float],
                     planned: dict[int, float], measure: BudgetMeasure | None, result: PassResult) -> None:
        scan = result.figures.setdefault("sensitivity", {})
        for i, drift in damage.items():
            entry = {"drift_at_ratio": round(drift, 5), "removed": taken.get(i, 0), "channels": len(groups[i].units)}
            if self.budget == "latency":
                entry.update(time_saved_at_ratio=round(planned[i], 4), time_measured_at_ratio=round(measured[i], 4))
            scan[groups[i].label] = entry  # type: ignore[index]
        if isinstance(measure, TimeSaved) and measure.fit is not None:
            per_mac, per_element, r2 = measure.fit
            result.figures["latency_model"] = {"share_per_gmac": round(float(per_mac) * 1e9, 4),
                                               "share_per_m_elements": round(float(per_element) * 1e6, 4), "r2": round(float(r2), 3)}

    def _saving_measure(self, model: onnx.ModelProto, context: PassContext) -> BudgetMeasure | None:
        """What a probe saves of the budget, or None when the budget is counted in channels."""
        if self.budget == "macs":
            total_macs = count_macs(model)
            if not total_macs:
                raise RequirementError("channel-prune{budget=macs} needs the model's MACs, and its shapes cannot be inferred")
            return BudgetMeasure(float(total_macs), lambda trial: macs_saved(total_macs, trial))
        if self.budget == "latency":
            return TimeSaved(model, timing_feed(model, context.timing_inputs()), context.runtime)
        return None

    def _removable(self, total: int, free: int, wanted: int) -> int:
        """How many of ``wanted`` may go: at most the free ones, keeping min_channels and round_to."""
        count = min(wanted, free, total - self.min_channels)
        step = self._block(total)
        while count > 0 and (total - count) % step:
            count -= 1  # keep more rather than fewer
        return max(count, 0)

    def _block(self, total: int) -> int:
        """The channel count a group of ``total`` keeps a multiple of (round_to; 0: onnxruntime's 16/8-channel blocks)."""
        return self.round_to or (16 if total >= 32 else 8 if total >= 16 else 1)

    def _ratio_of(self, group: Group) -> float:
        for pattern, value in self.overrides.items():
            if any(matches([pattern], p.node.name, p.node.inputs[1].name) for p in group.producers):
                return value
        return self.ratio

    # -- dead channels (zero-only) ------------------------------------------------------------

    def _dead_units(self, model: onnx.ModelProto, analysis: Analysis, groups: list[Group], shifts: dict[int, tuple[gs.Node, np.ndarray]], result: PassResult) -> list[Unit]:
        """Units whose every filter is zero: removed when their consumers see exactly 0, or a
        constant they can absorb (linear without padding); kept, with the reason, otherwise."""
        candidates = []
        for group in groups:
            for unit in group.units:
                producers = [analysis.producer_of(m) for m in unit.members]
                if unit.pinned or any(p is None for p in producers):
                    continue
                if all(not np.any(p.filter_values(m - p.base)) for p, m in zip(producers, unit.members)):  # type: ignore[union-attr]
                    candidates.append(unit)
        if not candidates:
            return []
        dead_roots = np.zeros(len(analysis.parent), dtype=bool)
        for unit in candidates:
            dead_roots[unit.members] = True
        constants = consumer_constants(model, analysis, dead_roots)
        chosen = []
        for unit in candidates:
            reason = why_not_exact(unit, analysis, constants)
            if reason:
                result.skipped.append(Skip(f"channel of {unit_label(unit, analysis)}", reason))
                continue
            chosen.append(unit)
            for use, values, _ in constants.values():
                fold_constant(use, values, unit, shifts)
        return chosen

    def _apply_shifts(self, graph: gs.Graph, analysis: Analysis, removed: np.ndarray, shifts: dict[int, tuple[gs.Node, np.ndarray]]) -> None:
        own = {id(p.node): p for p in analysis.producers}
        for node, shift in shifts.values():
            producer = own.get(id(node))
            if producer is not None:
                shift = shift[~removed[producer.roots]]  # the consumer lost output channels too
            add_output_shift(graph, node, shift)

    # -- report -------------------------------------------------------------------------------

    def _report_groups(self, groups: list[Group], removed: np.ndarray, analysis: Analysis, result: PassResult) -> None:
        for group in groups:
            total = len(group.units)
            gone = sum(bool(removed[u.members[0]]) for u in group.units)
            pins = sorted({u.pinned for u in group.units if u.pinned})
            details = {
                "producers": [p.node.name for p in group.producers], "channels_before": total, "channels_after": total - gone,
                "criterion": self.criterion if self.mode == "ratio" else "all-zero filters", "pinned_channels": sum(bool(u.pinned) for u in group.units),
            }
            approximate = sorted({analysis.approximate[m] for u in group.units if removed[u.members[0]] for m in u.members if m in analysis.approximate})
            if approximate:
                details["not_exact_at"] = approximate
            if gone:
                result.changes.append(Change(group.label, "removed channels", details))
            elif pins and all(u.pinned for u in group.units):
                result.skipped.append(Skip(group.label, "pinned: " + "; ".join(pins)))
            else:
                result.skipped.append(Skip(group.label, self._why_left_whole(group, pins)))

    def _why_left_whole(self, group: Group, pins: list[str]) -> str:
        """Why a group with free channels lost none: the rounding, the pins, or the plan."""
        total, free = len(group.units), sum(not u.pinned for u in group.units)
        pinned = f"; {total - free} pinned: {'; '.join(pins)}" if pins else ""
        if self.mode == "zero-only":
            return f"no removable all-zero filter among its {total} channels{pinned}"
        if self.scope == "sensitivity":
            return f"the sensitivity plan took none of its {free} free channels{pinned}"
        step = self._block(total)
        share = f"ratio {self._ratio_of(group):g} of its {total} channels" if self.scope == "uniform" else f"its share of the global ratio {self.ratio:g}"
        return (f"left whole: {share} ({free} free{pinned}), kept on multiples of "
                f"{step} (round_to) and at least {self.min_channels} (min_channels), leaves none to remove; try round_to=1 or a larger ratio")


def _why_no_layer(graph: gs.Graph) -> str:
    """Why the analysis found no channels to remove at all: where the model's weight layers are, if anywhere."""
    nested = sum(node.op in WEIGHT_OPS for subgraph in graph.subgraphs(recursive=True) for node in subgraph.nodes)
    if nested:
        return (f"no Conv/Gemm/MatMul with a constant weight in the main graph; {nested} such layer(s) sit inside If/Loop/Scan "
                "subgraphs, which channel removal does not reach")
    return "no Conv/Gemm/MatMul with a constant weight: no channels to remove"
