"""The accuracy guard: the fewest nodes kept float that bring a static int8 model within tolerance,
searched by kind, then by runs of neighbours, then node by node; each trial built and judged once."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx
import onnx_graphsurgeon as gs

from ...validation import ValidationResult
from ..base import PassContext, PassResult
from .rules import speed_kind

GUARD_REASON = "kept in float by the accuracy guard"
# The guard searches node by node within the kinds it kept float up to this many nodes (one trial
# each, about 1 s on MiniLM, 2 s on PP-OCRv4): beyond it, whole kinds stay float. 96 took MiniLM's
# static candidate (which auto then did not choose) from 15 s to 104 s. With kinds split finer
# (depthwise, 1-D), MobileNetV2's largest kind is 35 convolutions.
GUARD_MAX_NODE_SEARCH = 48
# Beyond it, the kept kinds' nodes are first searched in this many runs of graph neighbours (a
# detector's 60 convolutions are one kind; its class head alone may be what a metric needs float).
GUARD_RUNS = 8


def guarded(build: Callable[[set[str]], onnx.ModelProto], nodes: Sequence[gs.Node], quantized: onnx.ModelProto, context: PassContext,
            result: PassResult) -> tuple[onnx.ModelProto, set[str], bool]:
    """Keep the most harmful of ``nodes`` (the quantized ones, in graph order) in float until the
    tolerance holds: the model, the nodes kept float, and whether it holds (False when even every
    node in float does not).

    First by kind (:func:`speed_kind`: op type, depthwise and 1-D convolutions and MatMuls of two
    activations apart): each kind is kept float on its own, kinds are then kept float in order of
    how much that helps until the tolerance holds. Within kinds of more than GUARD_MAX_NODE_SEARCH
    nodes, by runs of nodes next to each other in graph order (GUARD_RUNS of them) the same way.
    Then, within what is kept (up to GUARD_MAX_NODE_SEARCH nodes), node by node the same way,
    doubling the count until it holds and bisecting back to the fewest that do. "Holds" is
    :meth:`GuardTrials.holds`: on the judge's samples and on the confirming ones."""
    assert context.validate is not None
    trials = GuardTrials(build, context, quantized)
    if trials.holds(frozenset()):
        return quantized, set(), True
    kinds: dict[str, list[str]] = {}
    for node in nodes:
        kinds.setdefault(speed_kind(node), []).append(node.name)
    kept = trials.fewest(list(kinds), lambda chosen: {n for kind in chosen for n in kinds[kind]}, "kinds")
    if kept is None:
        result.warnings.append("qdq guard: even all nodes in float do not meet the tolerance (on the judge's calibration samples, "
                               "or on the others that confirm its trials); every node kept quantized")
        return quantized, set(), False
    candidates = [node.name for node in nodes if node.name in kept]  # in graph order
    if len(candidates) > GUARD_MAX_NODE_SEARCH:
        size = -(-len(candidates) // GUARD_RUNS)
        runs = {f"nodes {start + 1}-{min(start + size, len(candidates))}": candidates[start:start + size]
                for start in range(0, len(candidates), size)}
        refined = trials.fewest(list(runs), lambda chosen: {n for run in chosen for n in runs[run]}, "runs of nodes")
        if refined is not None:
            kept = refined
            candidates = [name for name in candidates if name in kept]
    if 1 < len(candidates) <= GUARD_MAX_NODE_SEARCH:
        refined = trials.fewest(candidates, set, "nodes")
        if refined is not None:
            kept = refined
    result.figures["guard_kept_float"] = len(kept)
    result.figures["guard_kinds"] = ", ".join(sorted({speed_kind(n) for n in nodes if n.name in kept}))
    result.figures["guard_trials"] = trials.built
    return trials.model(kept), set(kept), True  # what fewest returns holds


class GuardTrials:
    """The guard's trials, by the set of nodes kept float: each set's model is built, and judged (and
    confirmed), once. The search meets a set again where a prefix of one length is also what it ranked
    alone, or bisects onto a count it tried; both cost a build and a judgement before."""

    def __init__(self, build: Callable[[set[str]], onnx.ModelProto], context: PassContext, quantized: onnx.ModelProto) -> None:
        self.build, self.context = build, context
        self.built = 0
        self._last: tuple[frozenset[str], onnx.ModelProto] = (frozenset(), quantized)  # only the last: a model each would be a copy each
        self._judged: dict[frozenset[str], ValidationResult] = {}
        self._holds: dict[frozenset[str], bool] = {}

    def model(self, kept: frozenset[str]) -> onnx.ModelProto:
        if self._last[0] != kept:
            self.built += 1
            self._last = (kept, self.build(set(kept)))
        return self._last[1]

    def judged(self, kept: frozenset[str]) -> ValidationResult:
        """The judge's verdict on the model with ``kept`` float."""
        assert self.context.validate is not None
        if kept not in self._judged:
            self._judged[kept] = self.context.validate(self.model(kept))
        return self._judged[kept]

    def holds(self, kept: frozenset[str]) -> bool:
        """Whether the model with ``kept`` float holds the tolerance on the judge's samples and on the
        confirming ones (asked only when the judge's hold). The guard tries many models against the
        judge's few samples, so what it settles on fits them a little: on MobileNetV2 every node
        quantized passed the judge's 32 views and lost 2.8% top-1 agreement on 96 held-out ones, and
        the step was rolled back whole."""
        if kept not in self._holds:
            self._holds[kept] = self.judged(kept).passed and confirmed(self.model(kept), self.context)
        return self._holds[kept]

    def fewest(self, items: list[str], expand: Callable[[list[str]], set[str]], label: str) -> frozenset[str] | None:
        """The float nodes ``expand(prefix)`` of the shortest prefix of ``items`` (ordered by how much
        keeping each alone in float helps) that hold the tolerance."""
        harm = {}
        for index, item in enumerate(items):
            harm[item] = closeness(self.judged(frozenset(expand([item]))))
            if self.context.progress:
                self.context.progress(f"qdq guard: {label}", index + 1, len(items))
        order = sorted(items, key=lambda item: harm[item], reverse=True)
        def kept(count: int) -> frozenset[str]:
            return frozenset(expand(order[:count]))
        count, failed, best = 1, 0, None
        while best is None:
            count = min(count, len(order))
            if self.holds(kept(count)):
                best = count
            elif count == len(order):
                return None
            else:
                failed, count = count, count * 2
        low, high = failed, best  # the fewest that pass lie in (low, high]
        while high - low > 1:
            middle = (low + high) // 2
            if self.holds(kept(middle)):
                high = middle
            else:
                low = middle
        return kept(high)


def confirmed(model: onnx.ModelProto, context: PassContext) -> bool:
    """Whether the calibration samples the judge never sees agree (True where the set has none)."""
    verdict = context.confirm(model) if context.confirm is not None else None
    return verdict is None or verdict.passed


def closeness(validation: ValidationResult) -> float:
    """How close a trial is to the original: the worst output's cosine (higher is closer)."""
    cosines = [o.cosine for o in validation.outputs if o.cosine is not None]
    return min(cosines) if cosines else 0.0
