"""channel-prune: coupled channels go together, shapes stay consistent, dead channels go exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import BUNDLED, MODELS, bundled, run, with_initializers

from onnxsparse import load
from onnxsparse.calibration import resolve_inputs
from onnxsparse.errors import PipelineSpecError, RequirementError
from onnxsparse.graph import to_gs
from onnxsparse.inspect_model import count_macs
from onnxsparse.passes import PassContext
from onnxsparse.passes.channel_prune import ChannelPrune
from onnxsparse.pipeline import PassManager, clone
from onnxsparse.shapes import infer_shapes
from onnxsparse.spec import parse_pipeline


def _prune(model: onnx.ModelProto, context: PassContext | None = None, **options):
    result = ChannelPrune(**options).run(infer_shapes(clone(model)), context or PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    return result


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


# A graph with every coupling rule: a residual Add, a depthwise conv, a Concat with an untracked
# branch, a Split, BatchNorm, a per-channel Mul, GlobalAveragePool -> Flatten -> Gemm and
# Flatten of a spatial map straight into a second Gemm.
COUPLED = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[2, 3, 6, 6] x) => (float[2, 5] y, float[2, 4] z) {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    ar = Relu (a)
    c = Conv <pads = [1, 1, 1, 1]> (ar, w2, b2)
    s = Add (c, a)
    d = Conv <group = 8, pads = [1, 1, 1, 1]> (s, wd, bd)
    n = BatchNormalization (d, g, be, m, v)
    k = Mul (n, scale)
    u = Conv (x, wu)
    cat = Concat <axis = 1> (k, u)
    p, q = Split <axis = 1> (cat, sizes)
    h = Conv (p, w3, b3)
    hr = Relu (h)
    pool = GlobalAveragePool (hr)
    f = Flatten (pool)
    y = Gemm <transB = 1> (f, fw, fb)
    qf = Flatten (q)
    z = Gemm (qf, gw)
}
"""


def coupled_model(rng: np.random.Generator) -> onnx.ModelProto:
    f32 = np.float32
    return with_initializers(
        onnx.parser.parse_model(COUPLED),
        w1=rng.standard_normal((8, 3, 3, 3)).astype(f32), b1=rng.standard_normal(8).astype(f32),
        w2=rng.standard_normal((8, 8, 3, 3)).astype(f32), b2=rng.standard_normal(8).astype(f32),
        wd=rng.standard_normal((8, 1, 3, 3)).astype(f32), bd=rng.standard_normal(8).astype(f32),
        g=rng.uniform(0.5, 2, 8).astype(f32), be=rng.standard_normal(8).astype(f32),
        m=rng.standard_normal(8).astype(f32), v=rng.uniform(0.5, 2, 8).astype(f32),
        scale=rng.standard_normal((1, 8, 1, 1)).astype(f32),
        wu=rng.standard_normal((2, 3, 1, 1)).astype(f32), sizes=np.array([6, 4], np.int64),
        w3=rng.standard_normal((6, 6, 1, 1)).astype(f32), b3=rng.standard_normal(6).astype(f32),
        fw=rng.standard_normal((5, 6)).astype(f32), fb=rng.standard_normal(5).astype(f32),
        gw=rng.standard_normal((4 * 36, 4)).astype(f32),
    )


def test_coupled_channels_are_removed_together_and_the_graph_stays_consistent(rng):
    model = coupled_model(rng)
    result = _prune(model, ratio=0.25)
    pruned = result.model
    # the residual stream (w1, w2, depthwise, BN, Mul) loses the same 2 of its 8 channels everywhere
    assert _initializer(pruned, "w1").shape == (6, 3, 3, 3) and _initializer(pruned, "w2").shape == (6, 6, 3, 3)
    assert _initializer(pruned, "wd").shape == (6, 1, 3, 3) and _initializer(pruned, "scale").shape == (1, 6, 1, 1)
    depthwise = next(n for n in pruned.graph.node if n.op_type == "Conv" and n.input[1] == "wd")
    assert onnx.helper.get_attribute_value(next(a for a in depthwise.attribute if a.name == "group")) == 6
    groups = {c.target: c.details for c in result.changes}
    assert any(d["channels_before"] == 8 and d["channels_after"] == 6 for d in groups.values())
    # the concat feeds a split: the first section shrinks with the stream, the untracked branch stays
    split_sizes = _initializer(pruned, next(n.input[1] for n in pruned.graph.node if n.op_type == "Split")).tolist()
    assert sum(split_sizes) == 8 and split_sizes[1] >= 2  # 6 stream + 2 untracked channels
    assert _initializer(pruned, "w3").shape[1] == split_sizes[0]
    assert _initializer(pruned, "gw").shape[0] == split_sizes[1] * 36  # Flatten: one channel = 6x6 features
    out = run(pruned, {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)})
    assert out[0].shape == (2, 5) and out[1].shape == (2, 4)
    assert result.figures["macs_after"] < result.figures["macs_before"]


def test_dead_channels_through_every_coupling_rule_are_removed_exactly(rng):
    model = coupled_model(rng)
    # kill stream channel 3 (w1 and w2 filters zero, biases such that the sum stays 0 before the
    # depthwise conv, whose zero bias keeps it 0) and the hidden channel 2 of w3 (bias < 0 → Relu 0)
    weights = {t.name: onnx.numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    weights["w1"][3] = 0
    weights["b1"][3] = 0
    weights["w2"][3] = 0
    weights["b2"][3] = 0
    weights["wd"][3] = 0
    weights["bd"][3] = 0
    weights["be"][3] = 0
    weights["m"][3] = 0
    weights["w3"][2] = 0
    weights["b3"][2] = -1.0
    for tensor in model.graph.initializer:
        tensor.CopyFrom(onnx.numpy_helper.from_array(weights[tensor.name], tensor.name))
    result = _prune(model, mode="zero-only")
    removed = sum(c.details["channels_before"] - c.details["channels_after"] for c in result.changes)
    assert removed == 2
    feed = {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)}
    for before, after in zip(run(model, feed), run(result.model, feed)):
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert _initializer(result.model, "w3").shape == (5, 5, 1, 1)  # lost hidden channel 2 and stream channel 3


def _conv_chain(rng, consumer: str, bias: float) -> onnx.ModelProto:
    """Conv(3→4) → Relu → consumer; filter 1 is zero with bias ``bias``: a constant max(0, bias)."""
    tail = {
        "padded": "y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)",
        "pointwise": "y = Conv (r, w2p, b2)",
        "pooled": "p = GlobalAveragePool (r)\n f = Flatten (p)\n y = Gemm <transB = 1, alpha = 0.5> (f, fw, b2)",
    }[consumer]
    output = "float[1, 2]" if consumer == "pooled" else "float[1, 2, 5, 5]"
    model = with_initializers(onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[1, 3, 5, 5] x) => ({output} y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c)
        {tail}
    }}"""), w1=rng.standard_normal((4, 3, 3, 3)).astype(np.float32), b1=np.array([0.1, bias, 0.2, 0.3], np.float32),
        w2=rng.standard_normal((2, 4, 3, 3)).astype(np.float32), w2p=rng.standard_normal((2, 4, 1, 1)).astype(np.float32),
        fw=rng.standard_normal((2, 4)).astype(np.float32), b2=np.array([0.5, -0.5], np.float32))
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    value = onnx.numpy_helper.to_array(w1).copy()
    value[1] = 0
    w1.CopyFrom(onnx.numpy_helper.from_array(value, "w1"))
    return model


@pytest.mark.parametrize(("consumer", "bias", "removed"), [
    ("padded", -0.3, True),  # Relu maps the constant to 0: dead even before padding
    ("padded", 0.7, False),  # a constant 0.7 into a padded 3x3 conv: the border sees zeros, not dead
    ("pointwise", 0.7, True),  # folded into the 1x1 conv's bias
    ("pooled", 0.7, True),  # folded through pooling into the Gemm's bias (alpha applied)
])
def test_a_constant_channel_is_dead_only_where_its_consumers_can_absorb_it(rng, consumer, bias, removed):
    model = _conv_chain(rng, consumer, bias)
    result = _prune(model, mode="zero-only")
    assert (_initializer(result.model, "w1").shape[0] == 3) is removed
    if not removed:
        assert any("pads" in s.reason for s in result.skipped)
    feed = {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BUNDLED)
def test_magnitude_filter_pruning_then_zero_only_is_lossless_on_the_bundled_models(name):
    model = load(MODELS / f"{name}.onnx")
    inputs = resolve_inputs(str(MODELS / f"{name}.inputs.npz"), model)
    manager = PassManager(parse_pipeline("fold-batchnorm,magnitude-prune{pattern=filter sparsity=0.25},channel-prune{mode=zero-only}"),
                          inputs=inputs, policy="keep")
    _final, report = manager.run(model)
    prune_step, zero_step = report.steps[1], report.steps[2]
    assert zero_step.status == "committed" and zero_step.step_validation is not None and zero_step.step_validation.passed
    assert zero_step.figures["channels_removed"] > 0
    assert all(output.max_rel <= 1e-5 for output in zero_step.step_validation.outputs)
    assert report.output.parameters < report.input.parameters
    assert zero_step.validation.outputs[0].cosine == pytest.approx(prune_step.validation.outputs[0].cosine, abs=1e-6)


def test_pins_are_reported_with_the_op_that_pinned_them():
    model = load(MODELS / "digits_transformer.onnx")
    result = _prune(model, ratio=0.25, round_to=8)  # 8 of the 32-wide residual stream may go (the default keeps blocks of 16)
    reasons = " ".join(s.reason for s in result.skipped)
    assert "Reshape that splits or reorders the channel axis" in reasons  # attention heads
    assert "reaches graph output 'logits'" in reasons
    hidden = next(c for c in result.changes if "mlp.0" in c.target)
    assert (hidden.details["channels_before"], hidden.details["channels_after"]) == (64, 48)
    assert any("LayerNormalization" in " ".join(c.details.get("not_exact_at", [])) for c in result.changes)


def test_round_to_and_min_channels_bound_what_is_kept():
    model = load(MODELS / "digits_cnn.onnx")
    result = _prune(model, ratio=0.5, round_to=8, min_channels=8)
    for change in result.changes:
        assert change.details["channels_after"] % 8 == 0 and change.details["channels_after"] >= 8


def test_by_default_channel_counts_stay_on_the_runtime_blocks_of_16_and_8():
    model = load(MODELS / "digits_sklearn_mlp.onnx")
    after = {}
    for ratio in (0.3, 0.6):
        result = _prune(model, ratio=ratio)
        after[ratio] = {c.details["channels_before"]: c.details["channels_after"] for c in result.changes}
    # 30% of 64 is 19 (45 kept) and of 32 is 10 (22 kept): rounded up to multiples of 16, 64 keeps 48 and 32 keeps all.
    # 60%: 64 keeps 26 -> 32, 32 keeps 13 -> 16
    assert after == {0.3: {64: 48}, 0.6: {64: 32, 32: 16}}
    cnn = load(MODELS / "digits_cnn.onnx")  # groups of 16 (stem and residual stream, depthwise) and 32 (pointwise)
    assert {(c.details["channels_before"], c.details["channels_after"]) for c in _prune(cnn, ratio=0.5).changes} == {(16, 8), (32, 16)}
    untouched = _prune(cnn, ratio=0.3)  # 16 -> 11 and 32 -> 22 round back up: nothing goes, and the report says so
    assert not untouched.changes and "channel-prune removed no channel" in untouched.warnings


def test_a_pruned_model_that_runs_slower_than_its_input_is_not_kept(monkeypatch):
    model = infer_shapes(load(MODELS / "digits_sklearn_mlp.onnx"))
    monkeypatch.setattr("onnxsparse.passes.channel_prune.budget.relative_latency", lambda *args, **kwargs: 1.2)
    guarded = ChannelPrune(ratio=0.5).run(clone(model), PassContext())
    assert guarded.model.graph == model.graph and not guarded.changes
    assert guarded.figures["latency_ratio"] == 1.2 and "1.20x its input's time" in guarded.warnings[0]
    assert guarded.worse.startswith("the pruned model took 1.20x its input's time")
    forced = ChannelPrune(ratio=0.5, never_slower=False).run(clone(model), PassContext())
    assert forced.changes and "latency_ratio" not in forced.figures


def test_relative_latency_tells_a_model_from_one_doing_forty_times_the_work(rng):
    from onnxsparse.latency import relative_latency

    def matmul_chain(depth: int) -> onnx.ModelProto:
        steps = "\n".join(f"h{i + 1} = MatMul (h{i}, w)" for i in range(depth))
        text = f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[64, 256] h0) => (float[64, 256] h{depth}) <float[256, 256] w> {{ {steps} }}"""
        return with_initializers(onnx.parser.parse_model(text), w=(rng.standard_normal((256, 256)) / 16).astype(np.float32))

    light, heavy = matmul_chain(1), matmul_chain(40)
    feed = {"h0": rng.standard_normal((64, 256)).astype(np.float32)}
    # interleaved medians: a generous margin, the point is the direction and rough size, not a speed target
    assert relative_latency(light, heavy, feed) > 8
    assert relative_latency(heavy, light, feed) < 1 / 8


def test_global_scope_ranks_across_groups_and_keeps_pinned_channels():
    model = load(MODELS / "digits_sklearn_mlp.onnx")
    result = _prune(model, ratio=0.5, scope="global", round_to=1)
    removed = sum(c.details["channels_before"] - c.details["channels_after"] for c in result.changes)
    assert removed == round(0.5 * (64 + 32))  # the 10 class scores are pinned by Softmax and the output


def test_refit_recovers_accuracy_on_the_bundled_mlp():
    model, inputs, calibration = bundled("digits_sklearn_mlp")
    cosine = {}
    for refit in (False, True):
        manager = PassManager(parse_pipeline(f"channel-prune{{ratio=0.3 refit={str(refit).lower()}}}"), inputs=inputs,
                              calibration=calibration, policy="keep")
        _, report = manager.run(model)
        cosine[refit] = next(o.cosine for o in report.final_validation.outputs if o.name == "probabilities")
        if refit:
            refits = [c for c in report.steps[0].changes if c.action == "refit"]
            assert refits and all(c.details["relative_error_after"] < c.details["relative_error_before"] for c in refits)
    assert cosine[True] > 0.999 > cosine[False]


def test_refit_reaches_pruned_producers_residual_blocks_and_depthwise_convs_on_the_bundled_cnn():
    model, inputs, calibration = bundled("digits_cnn")
    cosine, refit_nodes = {}, {}
    for scope in ("none", "consumers", "downstream"):
        options = "refit=false" if scope == "none" else f"refit=true refit_scope={scope}"
        manager = PassManager(parse_pipeline(f"fold-batchnorm,channel-prune{{ratio=0.5 {options}}}"), inputs=inputs,
                              calibration=calibration, policy="keep")
        _, report = manager.run(model)
        step = report.steps[-1]
        assert step.status != "rolled-back"
        cosine[scope] = report.final_validation.outputs[0].cosine
        refits = [c for c in step.changes if c.action == "refit"]
        assert all(c.details["relative_error_after"] < c.details["relative_error_before"] for c in refits)
        refit_nodes[scope] = {c.target for c in refits}
    # conv1 and pointwise lose output channels themselves: fit to the original's surviving channels;
    # conv2 feeds the residual Add: fit so that the sum matches; the depthwise conv is fit per channel.
    assert {"/block/conv1/Conv", "/block/conv2/Conv", "/pointwise/pointwise.0/Conv", "/fc/Gemm"} <= refit_nodes["consumers"]
    assert "/depthwise/depthwise.0/Conv" in refit_nodes["downstream"]
    assert cosine["none"] < 0.3 and cosine["consumers"] > 0.8 and cosine["downstream"] > 0.8  # measured 0.23, 0.84, 0.84


@pytest.mark.parametrize(("text", "message"), [
    ("channel-prune{ratio=1.0}", "outside [0, 1)"),
    ("channel-prune{min_channels=0}", "cannot lose every channel"),
    ("channel-prune{overrides=conv:1.0}", "would remove every channel"),
    ("channel-prune{budget=macs}", "scope=sensitivity only"),
    ("channel-prune{budget=latency}", "scope=sensitivity only"),
])
def test_bad_options_are_clear_errors(text, message):
    with pytest.raises(PipelineSpecError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse_pipeline(text)


def test_activation_importance_needs_calibration_and_shapes_must_be_inferable():
    model = load(MODELS / "digits_cnn.onnx")
    for criterion in ("activation", "output"):
        with pytest.raises(RequirementError, match="needs calibration data"):
            PassManager(parse_pipeline(f"channel-prune{{criterion={criterion}}}")).run(model)
    broken = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[1, 4] x) => (float[1, 4] y) { y = Reshape (x, s) }""")
    with_initializers(broken, s=np.array([3, 3], np.int64))  # 4 elements into 9: inference fails
    with pytest.raises(RequirementError, match="shape inference fails"):
        infer_shapes(broken)
    assert to_gs(model) is not None


def test_output_criterion_weighs_a_channel_by_what_its_consumers_make_of_it(rng, monkeypatch):
    import onnxsparse.passes.channel_prune.importance as channel_prune_module

    # hidden channel 0: a large filter whose consumer all but ignores it; channel 1: a small filter the consumer amplifies
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 4] x) => (float[N, 3] y) <float[4, 2] w1, float[2, 3] w2> {
        h = MatMul (x, w1)
        r = Relu (h)
        y = MatMul (r, w2)
    }""")
    w1 = np.array([[5, 0.5], [5, 0.5], [5, 0.5], [5, 0.5]], np.float32)
    w2 = np.array([[1e-3, 1e-3, 1e-3], [4, 4, 4]], np.float32)
    model = infer_shapes(with_initializers(model, w1=w1, w2=w2))
    x = np.abs(rng.standard_normal((64, 4))).astype(np.float32)
    context = PassContext(calibration=resolve_inputs([{"x": x}], model))
    reference = run(model, {"x": x})[0]
    errors = {}
    for criterion, greedy_width in (("l1", 4096), ("output", 4096), ("reconstruction", 4096), ("reconstruction", 1)):
        monkeypatch.setattr(channel_prune_module, "GREEDY_WIDTH", greedy_width)  # 1: every reader costed without compensation
        pruned = ChannelPrune(ratio=0.5, criterion=criterion, never_slower=False).run(clone(model), context).model
        assert _initializer(pruned, "w2").shape == (1, 3)
        errors[f"{criterion}/{greedy_width}"] = float(np.abs(run(pruned, {"x": x})[0] - reference).max() / np.abs(reference).max())
    assert errors["l1/4096"] > 0.99  # l1 drops the channel that carries the output
    assert max(errors["output/4096"], errors["reconstruction/4096"], errors["reconstruction/1"]) < 0.01


def test_reconstruction_criterion_removes_what_the_refit_can_make_up_for():
    # measured: digits_transformer at 50% with a downstream refit (refit_strength=auto), cosine 0.959 (output) -> 0.969
    # (reconstruction); with the fixed strength 0.1 it was 0.935 -> 0.958
    model, inputs, calibration = bundled("digits_transformer")
    cosines = {}
    for criterion in ("output", "reconstruction"):
        spec = f"channel-prune{{ratio=0.5 criterion={criterion} round_to=1 refit=true refit_scope=downstream never_slower=false}}"
        _, report = PassManager(parse_pipeline(spec), inputs=inputs, calibration=calibration, policy="keep").run(model)
        cosines[criterion] = report.steps[0].validation.outputs[0].cosine
        assert report.steps[0].figures["macs_ratio"] < 0.5
    assert cosines["reconstruction"] > cosines["output"] + 0.005


def test_sensitivity_scope_spends_the_budget_where_the_calibration_drift_is_smallest():
    model, _, calibration = bundled("digits_transformer")
    result = _prune(model, PassContext(calibration=calibration), ratio=0.25, scope="sensitivity", round_to=1)
    scan = result.figures["sensitivity"]
    assert len(scan) == 2 and all(entry["drift_at_ratio"] > 0 for entry in scan.values())
    removed = sum(entry["removed"] for entry in scan.values())
    assert removed == round(0.25 * (64 + 32))
    # the group that drifted least at the probe gives up at least its share
    calm, loud = sorted(scan.values(), key=lambda e: e["drift_at_ratio"])
    assert calm["removed"] / calm["channels"] >= loud["removed"] / loud["channels"]


def test_a_mac_budget_removes_that_share_of_the_multiply_accumulates():
    model, _, calibration = bundled("digits_transformer")
    figures = {}
    for budget in ("channels", "macs"):
        result = _prune(model, PassContext(calibration=calibration), ratio=0.3, scope="sensitivity", budget=budget, round_to=1)
        figures[budget] = result.figures
    # per-channel savings read off each group's probe do not add up (0.718 planned that way); the plan
    # is measured whole and re-aimed, and lands at 0.702
    assert 0.68 <= figures["macs"]["macs_ratio"] <= 0.71 and abs(figures["macs"]["budget_planned"] - 0.3) < 0.02
    assert figures["macs"]["macs_ratio"] < figures["channels"]["macs_ratio"]  # measured 0.778 for 30% of the channels


def test_a_latency_budget_leaves_whole_the_groups_whose_probe_ran_no_faster(monkeypatch):
    """The time saved is read off each group's probe in onnxruntime; here a stand-in timer says that
    thinning the 64-unit MLP hidden layer saves nothing, so the whole budget goes to the 32-wide stream."""
    model, _, calibration = bundled("digits_transformer")

    def fake_latency(reference, candidate, feed, **kwargs):
        hidden = _initializer(candidate, "mlp.0.bias").shape[0]
        return 1.0 if hidden < 64 else count_macs(candidate) / count_macs(reference)

    monkeypatch.setattr("onnxsparse.passes.channel_prune.budget.relative_latency", fake_latency)
    result = _prune(model, PassContext(calibration=calibration), ratio=0.2, scope="sensitivity", budget="latency", round_to=1)
    scan = {entry["channels"]: entry for entry in result.figures["sensitivity"].values()}
    assert scan[64]["removed"] == 0 and scan[64]["time_saved_at_ratio"] <= 0
    assert scan[32]["removed"] > 0 and scan[32]["time_saved_at_ratio"] > 0
    assert _initializer(result.model, "mlp.0.bias").shape == (64,)
    # the stand-in timer is MACs for the stream: 20% of the time is about 20% of its MACs
    assert 0.7 <= result.figures["macs_ratio"] <= 0.9


def test_a_latency_budget_fits_its_probes_and_plans_the_share_of_time_asked_for(monkeypatch):
    """A stand-in timer with a fixed overhead: time = 0.2 + 0.8 x MACs share. 30% of the time is then
    37.5% of the MACs, which the fitted model must find (a MACs budget of 30% would stop short)."""
    model, _, calibration = bundled("digits_cnn")
    monkeypatch.setattr("onnxsparse.passes.channel_prune.budget.relative_latency",
                        lambda reference, candidate, feed, **kwargs: 0.2 + 0.8 * count_macs(candidate) / count_macs(reference))
    result = _prune(model, PassContext(calibration=calibration), ratio=0.3, scope="sensitivity", budget="latency", round_to=1)
    assert len(result.figures["sensitivity"]) >= 3 and result.figures["latency_model"]["r2"] > 0.99
    assert abs(result.figures["budget_planned"] - 0.3) <= 0.02
    assert 0.59 <= result.figures["macs_ratio"] <= 0.66  # 0.625 would be exact; channels come whole
    assert not result.warnings


def test_probe_timings_are_smoothed_by_a_fit_on_the_work_each_probe_saved_and_a_slower_probe_stays_closed():
    from onnxsparse.passes.channel_prune.budget import TimeSaved

    model = infer_shapes(load(MODELS / "digits_transformer.onnx"))
    measure = TimeSaved(model, {})
    # (time, MACs, activation elements) saved per probe: time is 1e-3 per MAC, the third probe timed 0.05 high
    measure.measured = [(0.10, 100, 10), (0.30, 300, 30), (0.25, 200, 20), (0.40, 400, 40), (-0.02, 50, 5)]
    settled = measure.settle({7: 0.10, 3: 0.30, 5: 0.25, 1: 0.40, 2: -0.02})
    assert list(settled) == [7, 3, 5, 1, 2]
    assert settled[2] == -0.02  # it ran slower than its input: closed whatever the fit says
    assert 0.19 < settled[5] < 0.23 and settled[7] < settled[5] < settled[3] < settled[1]
    assert measure.fit is not None and measure.fit[2] > 0.9  # R² of the fit


def test_refit_of_a_layer_whose_add_partner_is_a_constant_node_fits_its_own_output(rng):
    """A Constant node's output is no residual: the layer is fit alone (it was skipped as 'broadcast')."""
    from onnxsparse.calibration import IterableInputs
    from onnxsparse.passes.base import PassResult
    from onnxsparse.refit import refit_layers

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 4, 6, 6] x) => (float[N, 6, 6, 6] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        shift = Constant <value = float[6, 1, 1] {1, 2, 3, 4, 5, 6}> ()
        y = Add (c, shift)
    }"""
    w, b = rng.standard_normal((6, 4, 3, 3)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    original = with_initializers(onnx.parser.parse_model(text), w=w, b=b)
    drifted = with_initializers(onnx.parser.parse_model(text), w=(w + 0.3 * rng.standard_normal(w.shape)).astype(np.float32), b=b)
    for model in (original, drifted):
        model.graph.node[0].name = "conv"
    source = IterableInputs([{"x": rng.standard_normal((8, 4, 6, 6)).astype(np.float32)}])
    result = PassResult(drifted)
    refit = refit_layers(original, drifted, ["conv"], source, 8, result, strength=1e-6)
    assert not result.skipped
    change = next(c for c in result.changes if c.action == "refit")
    assert change.details["relative_error_after"] < 0.01 < change.details["relative_error_before"]
    feed = {"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(refit, feed)[0], run(original, feed)[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("axis_name", "feeds"), [("N", 4), ("rows", 1)])  # 'rows' is no batch name: one run of 64 samples
def test_auto_refit_strength_holds_out_calibration_samples_so_a_wide_layer_does_not_memorise_them(rng, axis_name, feeds):
    """A 48-input layer refit on 64 samples (4 folds: each fit sees 48 rows) can match its calibration
    set with a vanishing ridge and predict new inputs badly; ``auto`` picks the ridge whose fits
    predict the held-out folds, and does better on inputs it never saw."""
    from onnxsparse.calibration import IterableInputs
    from onnxsparse.passes.base import PassResult
    from onnxsparse.refit import refit_layers

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[{axis}, {width}] x) => (float[{axis}, 10] y) {{
        h = Gemm (x, w1, b1)
        r = Relu (h)
        y = Gemm (r, w2, b2)
    }}"""
    w1, b1 = rng.standard_normal((64, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    w2, b2 = rng.standard_normal((64, 10)).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    original = with_initializers(onnx.parser.parse_model(text.format(axis=axis_name, width=64)), w1=w1, b1=b1, w2=w2, b2=b2)
    # the first layer lost 16 of its 64 units: the second reads 48 and must stand in for the rest
    pruned = with_initializers(onnx.parser.parse_model(text.format(axis=axis_name, width=64)), w1=w1[:, :48], b1=b1[:48], w2=w2[:48], b2=b2)
    for model in (original, pruned):
        model.graph.node[2].name = "fc2"
    source = IterableInputs([{"x": rng.standard_normal((64 // feeds, 64)).astype(np.float32)} for _ in range(feeds)])
    fresh = {"x": rng.standard_normal((512, 64)).astype(np.float32)}
    target = run(original, fresh)[0]
    errors, details = {}, {}
    for strength in (1e-4, "auto"):
        result = PassResult(pruned)
        refit = refit_layers(original, pruned, ["fc2"], source, 64, result, strength=strength)
        details[strength] = next(c.details for c in result.changes if c.action == "refit")
        errors[strength] = float(np.linalg.norm(run(refit, fresh)[0] - target) / np.linalg.norm(target))
    assert details[1e-4]["relative_error_after"] < 0.5 * errors[1e-4]  # memorised: far better in sample than out
    assert details["auto"]["strength"] > 1e-4 and "relative_error_held_out" in details["auto"]
    assert errors["auto"] < 0.8 * errors[1e-4]
    # the held-out figure is an honest estimate of the error on new inputs, the in-sample one is not
    assert abs(details["auto"]["relative_error_held_out"] - errors["auto"]) < abs(details["auto"]["relative_error_after"] - errors["auto"])


def test_a_group_whose_compensated_costs_soar_past_the_probe_gives_up_fewer_channels():
    """Two groups drift alike at their probe (4 of 8 units) and save alike per unit; one's removal costs
    stay flat to the end (its channels duplicate each other), the other's soar once 4 are gone. The
    quadratic model would split the goal evenly; the cost curves send it to the redundant group."""
    from onnxsparse.passes.channel_prune.budget import allocate, damage_shape
    from onnxsparse.passes.channel_prune.groups import Group

    redundant, exhausted = Group([]), Group([])
    redundant.removal_costs = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8], dtype=float)
    exhausted.removal_costs = np.array([0, 1, 2, 3, 4, 40, 400, 4000, 40000], dtype=float)
    shapes = {0: damage_shape(redundant, 8, 4), 1: damage_shape(exhausted, 8, 4)}
    assert shapes[0][4] == shapes[1][4] == 1.0  # each measured drift stands at the probe
    taken = allocate({0: 0.1, 1: 0.1}, shapes, {}, {0: 7, 1: 7}, goal=11)
    assert taken == {0: 7, 1: 4}
    quadratic = {i: damage_shape(Group([]), 8, 4) for i in (0, 1)}
    np.testing.assert_allclose(quadratic[0], (np.arange(9) / 4) ** 2)
    assert sorted(allocate({0: 0.1, 1: 0.1}, quadratic, {}, {0: 7, 1: 7}, goal=11).values()) == [5, 6]


def test_a_reconstruction_probe_lets_the_readers_make_up_for_a_duplicated_channel(rng):
    """Channel 3 of the first conv repeats channel 2 and has the smallest filter: l1 and reconstruction
    both probe its removal, but only reconstruction lets the next conv make up for it (its weights for
    channel 2 take over channel 3's share), so only its probe sees next to no drift."""
    from onnxsparse.calibration import IterableInputs

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 3, 5, 5] x) => (float[N, 4, 5, 5] y) {
        h = Conv (x, w1, b1)
        r = Relu (h)
        y = Conv (r, w2, b2)
    }"""
    w1 = rng.standard_normal((8, 3, 1, 1)).astype(np.float32) + 2.0
    w1[7] = w1[6] = 0.5 * w1[6] / np.abs(w1[6]).sum()  # the two smallest filters, and equal
    b1 = np.abs(rng.standard_normal(8)).astype(np.float32)
    b1[7] = b1[6]
    w2, b2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    w2[:, 7] = 3.0 * np.abs(w2[:, 7])  # channel 7 matters downstream: dropping it uncompensated shows
    model = with_initializers(onnx.parser.parse_model(text), w1=w1, b1=b1, w2=w2, b2=b2)
    calibration = IterableInputs([{"x": rng.standard_normal((16, 3, 5, 5)).astype(np.float32)} for _ in range(4)])
    drift = {}
    for criterion in ("l1", "reconstruction"):
        result = _prune(model, PassContext(calibration=calibration), ratio=0.125, scope="sensitivity", criterion=criterion,
                        round_to=1, never_slower=False)
        (entry,) = result.figures["sensitivity"].values()
        assert entry["removed"] == 1
        drift[criterion] = entry["drift_at_ratio"]
    assert drift["reconstruction"] < 0.01 * drift["l1"]


def test_refit_targets_come_from_few_runs_of_the_original_and_inputs_from_kept_values_and_change_nothing(monkeypatch):
    import onnxsparse.activations as activations_module

    model, inputs, calibration = bundled("digits_cnn")
    spec = "channel-prune{ratio=0.25 round_to=1 refit=true refit_scope=downstream never_slower=false}"
    original_runs, outputs, cut_runs = {}, {}, {}
    real_tensor_values = activations_module.tensor_values
    for budget in (0, activations_module.FIXED_VALUES_BYTES):
        monkeypatch.setattr(activations_module, "FIXED_VALUES_BYTES", budget)
        labels: list[str] = []
        fed_kept_values: list[bool] = []

        def counting(*args, label="", labels=labels, fed_kept_values=fed_kept_values, **kwargs):  # this budget's lists
            labels.append(label)
            if label == "refit inputs":
                fed_kept_values.append(bool(kwargs.get("given")))
            return real_tensor_values(*args, label=label, **kwargs)

        monkeypatch.setattr(activations_module, "tensor_values", counting)
        pruned, report = PassManager(parse_pipeline(spec), inputs=inputs, calibration=calibration, policy="keep").run(model)
        original_runs[budget] = labels.count("refit targets")
        cut_runs[budget] = sum(fed_kept_values)
        feed = next(iter(resolve_inputs(inputs, model).feeds()))
        outputs[budget] = run(pruned, {i.name: feed[i.name] for i in model.graph.input})[0]
        assert sum(c.action == "refit" for c in report.steps[0].changes) >= 3
        assert labels.count("refit inputs") == sum(c.action == "refit" for c in report.steps[0].changes) + sum(
            "refit: no improvement" in s.reason for s in report.steps[0].skipped)
    assert original_runs[activations_module.FIXED_VALUES_BYTES] < original_runs[0]
    # a layer's input is computed from the kept values of earlier layers' inputs, not from the model's inputs
    assert cut_runs[0] == 0 and cut_runs[activations_module.FIXED_VALUES_BYTES] >= 2
    # equal but for float rounding: exposing more tensors changes which ops onnxruntime fuses, and the
    # refit's float32 block products (~1e-6 each) pass such differences on through its solves
    np.testing.assert_allclose(outputs[0], outputs[activations_module.FIXED_VALUES_BYTES], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("timings", "saved"), [((1.05, 0.90), 0.10), ((1.05, 1.04), -0.04), ((0.80,), 0.20)])
def test_a_probe_timed_no_faster_is_timed_again_longer_before_it_closes_its_group(monkeypatch, timings, saved):
    from onnxsparse.latency import RETIME_RUNS
    from onnxsparse.passes.channel_prune.budget import TimeSaved

    model = infer_shapes(load(MODELS / "digits_transformer.onnx"))
    calls = []

    def timer(reference, candidate, feed, **kwargs):
        calls.append(kwargs.get("min_runs"))
        return timings[len(calls) - 1]

    monkeypatch.setattr("onnxsparse.passes.channel_prune.budget.relative_latency", timer)
    assert TimeSaved(model, {})(model) == pytest.approx(saved)
    assert calls == [None, RETIME_RUNS][: len(timings)]


def test_a_sensitivity_probe_is_compensated_on_other_samples_than_those_that_judge_it(rng, monkeypatch):
    """A classifier-like reader with more inputs (96 + bias) than samples to fit on (32): compensated on
    the very samples that judge the probe, it reproduces them and the probe looks harmless; fit on the
    others, the probe shows what the removal costs on data it has not seen."""
    from onnxsparse.calibration import IterableInputs
    from onnxsparse.passes.channel_prune import prune as channel_prune

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 24] x) => (float[N, 3] y) {
        h = Gemm (x, w1, b1)
        r = Relu (h)
        y = Gemm (r, w2, b2)
    }"""
    model = with_initializers(onnx.parser.parse_model(text), w1=rng.standard_normal((24, 96)).astype(np.float32),
                              b1=rng.standard_normal(96).astype(np.float32), w2=rng.standard_normal((96, 3)).astype(np.float32),
                              b2=np.zeros(3, np.float32))
    calibration = IterableInputs([{"x": rng.standard_normal((16, 24)).astype(np.float32)} for _ in range(3)])
    drift = {}
    for fitting in ("others", "the judged too"):
        if fitting == "the judged too":
            monkeypatch.setattr(channel_prune, "fitting_samples", lambda calibration, model: calibration)
        result = _prune(model, PassContext(calibration=calibration), ratio=0.5, scope="sensitivity", criterion="reconstruction",
                        round_to=1, never_slower=False)
        (entry,) = result.figures["sensitivity"].values()
        drift[fitting] = entry["drift_at_ratio"]
    assert drift["others"] > 10 * drift["the judged too"]


def test_a_refit_checks_the_calibration_feeds_once_not_once_per_layer(monkeypatch):
    """The refit reads its calibration samples once (read_once) and runs the model on them once per
    layer: the feeds are checked (names, dtypes, shapes, NaN/Inf) when read, not at every layer."""
    import onnxsparse.activations as activations_module
    import onnxsparse.calibration as calibration_module

    model, inputs, calibration = bundled("digits_cnn")
    checked: list[str] = []
    real_check = calibration_module.check_feed

    def counting(feed, model_inputs, origin, **kwargs):
        checked.append(origin)
        return real_check(feed, model_inputs, origin, **kwargs)

    monkeypatch.setattr(calibration_module, "check_feed", counting)
    monkeypatch.setattr(activations_module, "check_feed", counting)
    spec = "channel-prune{ratio=0.25 round_to=1 refit=true refit_scope=downstream never_slower=false}"
    _, report = PassManager(parse_pipeline(spec), inputs=inputs, calibration=calibration, policy="keep").run(model)
    refits = sum(c.action == "refit" for c in report.steps[0].changes)
    assert refits >= 3
    # the calibration file when it is read, the refit's copy when it is read once: not once per layer
    assert len(checked) < refits, checked
