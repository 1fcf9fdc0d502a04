"""What a removal saves (channels, MACs, or measured time) and how channels are spread over groups within a budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ...inspect_model import count_macs, count_work
from ...latency import RETIME_RUNS, RETIME_SECONDS, relative_latency
from ...runtime import Runtime
from .groups import Group


@dataclass
class BudgetMeasure:
    """A budget other than channels: its total for the input model, and what a pruned copy saves of it."""

    total: float
    saved_by: Callable[[onnx.ModelProto], float | None]  # None: not known (shapes not inferred)

    def __call__(self, trial: onnx.ModelProto) -> float:
        """What a probe saves; an unknown saving counts as none, which leaves the group whole."""
        return self.saved_by(trial) or 0.0

    def settle(self, saved: dict[int, float]) -> dict[int, float]:
        """The savings to plan with, given every probe's (keyed in the order they were measured)."""
        return saved

    def predict(self, plan: onnx.ModelProto) -> float | None:
        """What a whole plan saves (None: not known without timing it)."""
        return self.saved_by(plan)


def latency_ratio(model: onnx.ModelProto, pruned: onnx.ModelProto, feed: dict[str, np.ndarray], runtime: Runtime | None) -> float:
    """``pruned``'s one-thread onnxruntime time over ``model``'s (never_slower's check). Every timing of
    the pass goes through this module's ``relative_latency``: the one clock a test replaces."""
    return relative_latency(model, pruned, feed, runtime=runtime, decide_at=(1.0,))


class TimeSaved(BudgetMeasure):
    """The share of the input's onnxruntime time a pruned copy saves (one thread, interleaved runs).

    One timing on a shared machine is off by a few percent, as much as a small group saves, so the
    allocation uses a fit over all probes instead (a whole plan is timed): time saved = a x MACs
    saved + b x activation elements saved (a, b >= 0; the second is what depthwise convs and
    activations pay for). A probe that ran no faster than its input keeps its measured figure (a
    block cut off onnxruntime's channel blocks can run slower), which closes its group."""

    def __init__(self, model: onnx.ModelProto, feed: dict[str, np.ndarray], runtime: Runtime | None = None) -> None:
        super().__init__(1.0, self._time)
        self.model, self.feed, self.runtime = model, feed, runtime
        self.work = count_work(model)
        self.measured: list[tuple[float, float, float]] = []  # (time, MACs, elements) saved, per probe
        self.fit: tuple[float, float, float] | None = None  # per MAC, per element, R²

    def _time(self, trial: onnx.ModelProto) -> float:
        # a probe timed no faster than its input is timed again, longer (latency.RETIME_RUNS and RETIME_SECONDS)
        saved = 1.0 - relative_latency(self.model, trial, self.feed, runtime=self.runtime, keep_candidate=False)
        if saved <= 0:  # closes the group: make sure with a longer timing (a busy core made 3 of 25 MobileNetV2 probes "slower")
            saved = 1.0 - relative_latency(self.model, trial, self.feed, min_runs=RETIME_RUNS, min_seconds=RETIME_SECONDS, runtime=self.runtime,
                                           keep_candidate=False)
        work = count_work(trial)
        if self.work is not None and work is not None:
            self.measured.append((saved, self.work.macs - work.macs, self.work.activation_elements - work.activation_elements))
        return saved

    def settle(self, saved: dict[int, float]) -> dict[int, float]:
        if len(self.measured) != len(saved) or len(saved) < 3:
            return saved
        times, features = np.array([m[0] for m in self.measured]), np.array([m[1:] for m in self.measured], dtype=np.float64)
        scale = np.maximum(features.max(axis=0), 1.0)
        import scipy.optimize  # here, not at the top: 0.3 s and 40 MB that every command would pay for one fit

        coefficients, _ = scipy.optimize.nnls(features / scale, times)
        fitted = (features / scale) @ coefficients
        residual = float(np.sum((times - fitted) ** 2))
        spread = float(np.sum((times - times.mean()) ** 2)) or 1.0
        self.fit = (*(coefficients / scale), 1.0 - residual / spread)
        return {key: (value if value <= 0 else float(model)) for (key, value), model in zip(saved.items(), fitted)}

    def predict(self, plan: onnx.ModelProto) -> float | None:
        """A whole plan's saving, timed rather than read off the fit: it is a large share of the time,
        well above one timing's noise, while the fit of small probes on a busy machine can be poor
        (MobileNetV2, R² 0.12: a plan for 50% of the time ran in 0.29x)."""
        return 1.0 - relative_latency(self.model, plan, self.feed, runtime=self.runtime, keep_candidate=False)


def macs_saved(total_macs: int, trial: onnx.ModelProto) -> float | None:
    macs = count_macs(trial)
    return None if macs is None else float(total_macs - macs)


def damage_shape(group: Group, free: int, probe: int) -> np.ndarray:
    """How a group's damage grows with the units removed, k = 0..free, as a multiple of the damage its
    probe measured: the compensated removal costs where criterion=reconstruction gave them, else (k / probe)²."""
    costs = group.removal_costs
    if costs is not None and len(costs) == free + 1 and 0 < probe <= free and costs[probe] > 0:
        return costs / costs[probe]
    return np.square(np.arange(free + 1) / max(probe, 1))


def allocate(damage: dict[int, float], shapes: dict[int, np.ndarray], saving: dict[int, float], caps: dict[int, int], goal: float) -> dict[int, int]:
    """Channels per group, one at a time where the marginal damage per unit of budget is lowest,
    until ``goal`` is spent or every group is at its cap. Group i's damage at k units removed is
    damage_i x shapes_i[k] (see :func:`damage_shape`)."""
    taken = {i: 0 for i in caps}

    def marginal(i: int) -> float:  # what the next unit of group i adds to the damage, per unit of budget
        shape = shapes[i]
        step = shape[taken[i] + 1] - shape[taken[i]] if taken[i] + 1 < len(shape) else np.inf
        return damage[i] * step / saving.get(i, 1.0)

    spent = 0.0
    while spent < goal:
        open_groups = [i for i in damage if taken[i] < caps[i]]
        if not open_groups:
            break
        cheapest = min(open_groups, key=marginal)
        taken[cheapest] += 1
        spent += saving.get(cheapest, 1.0)
    return taken
