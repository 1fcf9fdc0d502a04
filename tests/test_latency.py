"""Relative latency: when a timing may stop early, and when the manager takes a pass's own timing.
Behaviour on recorded or pinned figures, never a speed target."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from conftest import MODELS

from onnxsparse.io import load
from onnxsparse.latency import EARLY_PAIRS, _decided, timing_feed
from onnxsparse.passes import Change, Pass, PassContext, PassResult
from onnxsparse.pipeline import PassManager


def _pairs(rng: np.random.Generator, ratio: float, pairs: int, noise: float = 0.02) -> tuple[list[float], list[float]]:
    """Timings of ``pairs`` interleaved runs whose candidate takes ``ratio`` times the reference."""
    reference = 0.010 * (1 + noise * rng.standard_normal(pairs))
    load = 1 + np.abs(0.5 * rng.standard_normal(pairs))  # a burst of load slows both runs of a pair alike
    candidate = reference * ratio * (1 + noise * rng.standard_normal(pairs))
    return list(reference * load), list(candidate * load)


def test_a_timing_is_decided_only_when_the_ratio_is_clearly_on_one_side_of_every_threshold(rng):
    assert _decided(*_pairs(rng, 0.5, 12), thresholds=(1.10,))  # twice as fast: no doubt
    assert _decided(*_pairs(rng, 1.6, 12), thresholds=(1.10,))  # clearly slower: no doubt either
    assert not _decided(*_pairs(rng, 1.09, 12), thresholds=(1.10,))  # within the noise of the bound
    assert not _decided(*_pairs(rng, 0.5, 12), thresholds=(1.10, 0.505))  # clear of one bound, not of the other
    assert not _decided(*_pairs(rng, 0.5, EARLY_PAIRS - 1), thresholds=(1.10,))  # too few pairs to call anything
    # one preempted run does not decide, nor undecide, a clear case
    reference, candidate = _pairs(rng, 0.5, 12)
    candidate[3] *= 40
    assert _decided(reference, candidate, thresholds=(1.10,))


@dataclass(frozen=True)
class TimedNegation(Pass):
    """Test pass: negates the output twice (no numeric change) and reports its own timing."""

    name = "test-timed-negation"
    may_change_speed = True
    ratio: float = 0.5

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        output = model.graph.output[0]
        inner = output.name + "_negated"
        for node in model.graph.node:
            node.output[:] = [inner if name == output.name else name for name in node.output]
        model.graph.node.extend([onnx.helper.make_node("Neg", [inner], [inner + "_twice"]), onnx.helper.make_node("Neg", [inner + "_twice"], [output.name])])
        return PassResult(model, changes=[Change(output.name, "negated twice")], latency_vs_input=self.ratio)


def test_the_manager_judges_a_step_on_the_pass_own_timing_and_confirms_a_condemning_one(monkeypatch):
    model = load(MODELS / "digits_cnn.onnx")
    timed: list[dict] = []

    def timing(*args, **kwargs) -> float:
        timed.append(kwargs)
        return 0.9

    monkeypatch.setattr("onnxsparse.pipeline.relative_latency", timing)
    _, report = PassManager([TimedNegation(ratio=0.5)]).run(model)
    assert report.steps[0].status == "committed" and report.steps[0].figures["latency_vs_input"] == 0.5
    assert timed == []  # the pass timed it: no second timing
    _, report = PassManager([TimedNegation(ratio=1.3)]).run(model)
    # a ratio that would condemn the step is timed again, longer, by the manager itself
    assert len(timed) == 1 and timed[0]["min_seconds"] > 1
    assert report.steps[0].status == "committed" and report.steps[0].figures["latency_vs_input"] == 0.9


def test_the_timing_feed_of_a_time_major_model_is_one_whole_feed_not_one_step(rng):
    """axis 0 of a [steps, batch, features] input counts time steps: cutting it to one sample would
    feed one step to a model that needs twelve (onnxruntime refuses the run)."""
    from onnxsparse.calibration import IterableInputs

    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[12, N, 16] x) => (float[12, N, 16] y) { y = Relu (x) }""")
    calibration = IterableInputs([{"x": rng.standard_normal((12, 4, 16)).astype(np.float32)}])
    assert timing_feed(model, calibration)["x"].shape == (12, 4, 16)
    batched = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16] x) => (float[N, 16] y) { y = Relu (x) }""")
    assert timing_feed(batched, IterableInputs([{"x": rng.standard_normal((5, 16)).astype(np.float32)}]))["x"].shape == (1, 16)
