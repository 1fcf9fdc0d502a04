"""qdq: int8 graphs that onnxruntime fuses, that keep zeros zero, and that work where weights hide."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS, bundled, parse, record_tensor_values, run, with_initializers

from onnxsparse import activations, load, optimize
from onnxsparse.calibration import IterableInputs, resolve_inputs
from onnxsparse.errors import PipelineSpecError, RequirementError
from onnxsparse.passes import PassContext
from onnxsparse.passes.qdq import Qdq
from onnxsparse.passes.qdq.guard import GUARD_REASON
from onnxsparse.pipeline import PassManager, clone
from onnxsparse.spec import parse_pipeline


def _fused_ops(path: Path, tmp_path: Path) -> Counter[str]:
    """The op types onnxruntime actually runs after its graph optimizations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(tmp_path / "ort_optimized.onnx").graph.node)


def _quantize(name: str, tmp_path: Path, pipeline: str = "qdq", **options) -> tuple[Path, object]:
    out = tmp_path / f"{name}.int8.onnx"
    report = optimize(MODELS / f"{name}.onnx", out, pipeline, inputs=MODELS / f"{name}.inputs.npz",
                      calibration=MODELS / f"{name}.calibration.npz", **options)
    return out, report


def test_the_bundled_cnn_runs_on_int8_kernels_and_stays_accurate(tmp_path):
    out, report = _quantize("digits_cnn", tmp_path, "fold-batchnorm,qdq{mode=static}")
    ops = _fused_ops(out, tmp_path)
    assert ops["QLinearConv"] == 5 and ops["QLinearAdd"] == 1 and "Conv" not in ops
    assert report.final_validation.passed
    logits = report.final_validation.outputs[0]
    assert logits.top1 == 1.0 and logits.cosine > 0.99
    assert out.stat().st_size < 0.8 * (MODELS / "digits_cnn.onnx").stat().st_size


def test_matmuls_of_the_transformer_and_the_mlp_run_on_int8_kernels(tmp_path):
    for name in ("digits_transformer", "digits_sklearn_mlp"):
        out, report = _quantize(name, tmp_path, "qdq{mode=static}")
        ops = _fused_ops(out, tmp_path)
        assert ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] + ops["QGemm"] >= 3, (name, ops)
        assert report.final_validation.passed


def test_dynamic_mode_fuses_into_dynamic_quantize_matmul(tmp_path):
    out, report = _quantize("digits_sklearn_mlp", tmp_path, "qdq{mode=dynamic}")
    ops = _fused_ops(out, tmp_path)
    assert ops["DynamicQuantizeMatMul"] == 3 and "MatMul" not in ops
    assert report.steps[0].figures["nodes_quantized"] == 3
    probabilities = next(o for o in report.final_validation.outputs if o.name == "probabilities")
    assert probabilities.cosine > 0.999


def test_pruned_zeros_stay_exactly_zero_in_the_int8_weights(tmp_path):
    out, report = _quantize("digits_cnn", tmp_path, "fold-batchnorm,magnitude-prune{sparsity=0.5},qdq{mode=static}", policy="keep")
    assert report.steps[1].figures["tensors_pruned"] == 6 and report.steps[2].figures["nodes_quantized"] > 0
    model = onnx.load(out)
    int8 = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8 and all(abs(np.count_nonzero(w == 0) / w.size - 0.5) < 0.02 for w in int8)


def _constant_and_subgraph_model(rng) -> onnx.ModelProto:
    """A Conv whose weight is a Constant node, and a MatMul inside an If branch."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (bool cond, float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y, float[1, 3] z) {
        y = Conv <pads = [1, 1, 1, 1]> (x, w)
        p = GlobalAveragePool (y)
        f = Flatten (p)
        z = If (cond) <
            then_branch = g1 () => (float[1, 3] t) { t = MatMul (f, m) },
            else_branch = g2 () => (float[1, 3] e) { e = Identity (f) }
        >
    }""")
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32))))
    return with_initializers(model, m=rng.standard_normal((3, 3)).astype(np.float32))


def test_weights_in_constant_nodes_and_subgraphs_are_quantized(rng):
    model = _constant_and_subgraph_model(rng)
    onnx.checker.check_model(model, full_check=True)
    feeds = [{"cond": np.array(True), "x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)} for _ in range(4)]
    result = Qdq(guard=False).run(clone(model), PassContext(calibration=IterableInputs(feeds)))
    onnx.checker.check_model(result.model, full_check=True)
    main_ops = Counter(n.op_type for n in result.model.graph.node)
    assert main_ops["QuantizeLinear"] >= 1 and "Constant" not in main_ops  # the Constant weight became int8
    if_node = next(n for n in result.model.graph.node if n.op_type == "If")
    branch = next(a.g for a in if_node.attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["DequantizeLinear", "MatMul"]
    assert any(t.data_type == onnx.TensorProto.INT8 for t in branch.initializer)
    for feed in feeds:
        for a, b in zip(run(result.model, feed), run(model, feed)):
            np.testing.assert_allclose(a, b, rtol=0.1, atol=0.1)


def test_an_opset_12_model_is_raised_to_13_for_per_channel_scales(tmp_path, rng):
    model = with_initializers(onnx.parser.parse_model("""
    <ir_version: 7, opset_import: ["" : 12]>
    agraph (float[N, 64] input) => (float[N, 10] y) {
        h = Gemm <transB = 1> (input, w1, b1)
        r = Relu (h)
        y = Gemm <transB = 1> (r, w2, b2)
    }"""), w1=rng.standard_normal((32, 64)).astype(np.float32), b1=rng.standard_normal(32).astype(np.float32),
        w2=rng.standard_normal((10, 32)).astype(np.float32), b2=rng.standard_normal(10).astype(np.float32))
    onnx.save(model, tmp_path / "opset12.onnx")
    data = {"calibration": MODELS / "digits_sklearn_mlp.calibration.npz", "inputs": MODELS / "digits_sklearn_mlp.inputs.npz"}
    # static: per-channel weight scales, which need opset 13
    report = optimize(tmp_path / "opset12.onnx", tmp_path / "q.onnx", "qdq{mode=static}", **data)
    written = onnx.load(tmp_path / "q.onnx")
    assert next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx")) == 13
    assert report.steps[0].figures["opset_raised_to"] == 13
    assert any(any(a.name == "axis" for a in n.attribute) for n in written.graph.node if n.op_type == "DequantizeLinear")
    # auto picks static or dynamic by a latency probe (a coin toss on a model this small): either
    # way the report says the opset was raised (the dynamic candidate once lost that figure)
    report = optimize(tmp_path / "opset12.onnx", tmp_path / "auto.onnx", "qdq", **data)
    assert report.steps[0].figures["opset_raised_to"] == 13


def test_an_already_quantized_model_is_left_alone_with_a_warning(tmp_path):
    out, _ = _quantize("digits_sklearn_mlp", tmp_path, "qdq{mode=static}")
    again = Qdq().run(onnx.load(out), PassContext(calibration=resolve_inputs(str(MODELS / "digits_sklearn_mlp.calibration.npz"), onnx.load(out))))
    assert not again.changes and any("already quantized" in w for w in again.warnings)


def test_the_calibration_cache_is_written_then_read(tmp_path):
    cache = tmp_path / "ranges.json"
    _, first = _quantize("digits_cnn", tmp_path, f"qdq{{mode=static cache={cache}}}")
    data = json.loads(cache.read_text())
    assert data["method"] == "minmax" and len(data["ranges"]) == first.steps[0].figures["tensors_calibrated"]
    _, second = _quantize("digits_cnn", tmp_path, f"qdq{{mode=static cache={cache}}}")
    assert second.steps[0].figures["calibration"] == f"read from {cache}"


def test_the_guard_keeps_harmful_nodes_in_float_until_a_strict_tolerance_holds(tmp_path, monkeypatch):
    model, inputs, calibration = bundled("digits_transformer")
    from onnxsparse.passes.qdq import materialize
    from onnxsparse.validation import Tolerance, Tolerances

    quantized_weights: Counter[bytes] = Counter()
    real_quantize_weight = materialize.quantize_weight
    def counting(weight, *args):
        quantized_weights[np.asarray(weight).tobytes()] += 1
        return real_quantize_weight(weight, *args)
    monkeypatch.setattr(materialize, "quantize_weight", counting)
    strict = Tolerances(per_pass={"qdq": Tolerance(min_cosine=0.99995)})
    _, report = PassManager(parse_pipeline("qdq{mode=static}"), inputs=inputs, calibration=calibration, tolerances=strict).run(model)
    step = report.steps[0]
    assert step.status == "committed" and 0 < step.figures["guard_kept_float"] < step.figures["nodes_quantized"] + step.figures["guard_kept_float"]
    assert any("accuracy guard" in s.reason for s in step.skipped)
    assert step.validation.outputs[0].cosine >= 0.99995
    # the guard built many trials, and each weight was made int8 once for all of them
    assert step.figures["guard_trials"] > 3 and quantized_weights and max(quantized_weights.values()) == 1


def test_static_mode_needs_calibration_and_bad_options_are_errors():
    model = load(MODELS / "digits_cnn.onnx")
    with pytest.raises(RequirementError, match="qdq needs calibration data"):
        PassManager(parse_pipeline("qdq")).run(model)
    for text, message in (("qdq{method=kl}", "not one of"), ("qdq{percentile=0}", "outside"), ("qdq{activations=int4}", "not one of")):
        with pytest.raises(PipelineSpecError, match=message):
            parse_pipeline(text)


def test_an_exclude_pattern_that_matches_nothing_is_reported(tmp_path):
    _, report = _quantize("digits_cnn", tmp_path, "qdq{mode=static exclude=NoSuchOp}")
    assert any("exclude pattern 'NoSuchOp' matched no node" in w for w in report.warnings)
    _, excluded = _quantize("digits_cnn", tmp_path, "qdq{mode=static exclude=Gemm}")
    assert any(s.reason == "excluded by pattern" for s in excluded.steps[0].skipped)


def test_auto_mode_keeps_the_result_within_tolerance_and_says_why(tmp_path):
    _, report = _quantize("digits_transformer", tmp_path)
    figures = report.steps[0].figures
    assert figures["mode"] in ("static", "dynamic") and report.final_validation.passed
    other = "dynamic" if figures["mode"] == "static" else "static"
    if figures["mode_choice"] == "both within tolerance; the faster":
        assert figures[f"{figures['mode']}_latency_ratio"] <= figures[f"{other}_latency_ratio"]


def test_embedding_tables_become_int8_on_request(rng):
    model = with_initializers(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (int64[2, 5] ids) => (float[2, 5, 16] y) { e = Gather (table, ids)  y = Relu (e) }"""),
        table=rng.standard_normal((100, 16)).astype(np.float32))
    feed = {"ids": rng.integers(0, 100, (2, 5)).astype(np.int64)}
    plain = Qdq(mode="dynamic").run(clone(model), PassContext())
    assert not any(n.op_type == "DequantizeLinear" for n in plain.model.graph.node)
    result = Qdq(mode="dynamic", embeddings=True).run(clone(model), PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    assert [n.op_type for n in result.model.graph.node][:2] == ["DequantizeLinear", "Gather"]
    assert any(t.data_type == onnx.TensorProto.INT8 and list(t.dims) == [100, 16] for t in result.model.graph.initializer)
    np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], atol=np.abs(run(model, feed)[0]).max() / 100)


def test_auto_mode_after_a_lossy_pass_judges_quantization_against_its_own_input(tmp_path):
    """channel-prune 50% breaks the tolerance against the original; qdq's auto choice must not then
    fall back to "the closer to the original" (the mode that quantized least: dynamic's one Gemm)."""
    _, report = _quantize("digits_cnn", tmp_path, "fold-batchnorm,channel-prune{ratio=0.5},qdq", policy="keep")
    qdq = report.steps[-1]
    assert report.steps[1].status == "kept-failing"
    assert qdq.figures["mode_choice"].startswith("neither within tolerance of the original; judged against this pass's input")
    if qdq.figures["mode"] == "static":
        assert qdq.figures["nodes_quantized"] >= 5  # every conv and the Gemm, not one node


@pytest.mark.parametrize(("name", "pipeline"), [("digits_transformer", "qdq{mode=dynamic}"), ("digits_cnn", "fold-batchnorm,qdq{mode=static}")])
def test_quantized_graphs_count_the_same_multiply_accumulates_as_float(tmp_path, name, pipeline):
    """MatMulInteger (dynamic) and QDQ-wrapped convs (static) do the float model's MACs in int8."""
    from onnxsparse.inspect_model import count_macs

    out, _ = _quantize(name, tmp_path, pipeline)
    written = onnx.load(out)
    assert any(n.op_type in ("MatMulInteger", "DequantizeLinear") for n in written.graph.node)
    assert count_macs(written) == count_macs(onnx.load(MODELS / f"{name}.onnx")) > 0


def _weight_integers(path: Path) -> np.ndarray:
    model = onnx.load(path)
    return np.concatenate([onnx.numpy_helper.to_array(t).ravel() for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8])


@pytest.mark.parametrize("pipeline, bound", [("qdq{mode=static reduce_range=on}", 63), ("qdq{mode=static reduce_range=off}", 127),
                                             ("qdq{mode=dynamic reduce_range=on}", 63), ("qdq{mode=dynamic reduce_range=off}", 127)])
def test_reduce_range_keeps_weights_within_seven_bits(tmp_path, pipeline, bound):
    out, report = _quantize("digits_transformer", tmp_path, pipeline)
    integers = _weight_integers(out)
    assert np.abs(integers).max() == bound  # each channel's largest weight lands on the bound
    assert report.final_validation.passed and report.steps[0].figures["weights"].startswith("int8")
    assert ("7-bit" in report.steps[0].figures["weights"]) == (bound == 63)


@pytest.mark.parametrize("saturates", [True, False])
def test_reduce_range_auto_follows_what_this_machines_kernels_do(tmp_path, monkeypatch, saturates):
    import onnxsparse.passes.qdq.quantize as qdq_module

    monkeypatch.setattr(qdq_module, "int8_kernels_saturate", lambda: saturates)
    out, report = _quantize("digits_cnn", tmp_path, "fold-batchnorm,qdq{mode=static}")
    assert np.abs(_weight_integers(out)).max() == (63 if saturates else 127)
    assert any("saturates" in w for w in report.steps[1].warnings) == saturates


@pytest.mark.parametrize("activations, margin", [("uint8", 0.005), ("int8", 1e-4)])
def test_the_saturation_probe_agrees_with_the_int8_kernels_on_a_real_model(tmp_path, activations, margin):
    """Where the probe says 8-bit weights saturate, they cost accuracy that 7-bit ones keep, with int8
    activations too (x86 shifts them into the same uint8 kernels); where it says they do not, 8-bit
    weights are at least as close as 7-bit ones (the eighth bit is worth having)."""
    from onnxsparse.quantization import int8_kernels_saturate

    cosines = {}
    for bits in ("on", "off"):
        pipeline = f"fold-batchnorm,qdq{{mode=static activations={activations} reduce_range={bits} guard=false}}"
        _, report = _quantize("digits_cnn", tmp_path, pipeline, policy="keep")
        cosines[bits] = report.final_validation.outputs[0].cosine
    if int8_kernels_saturate():
        assert cosines["on"] > cosines["off"] + margin
    else:
        assert cosines["off"] >= cosines["on"] - 1e-3


def test_weights_inside_subgraphs_count_as_quantized_in_the_report(rng):
    model = _constant_and_subgraph_model(rng)
    feeds = [{"cond": np.array(True), "x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)} for _ in range(4)]
    result = Qdq(guard=False).run(clone(model), PassContext(calibration=IterableInputs(feeds)))
    nested = [c for c in result.changes if c.action.startswith("int8 weight inside a subgraph")]
    assert len(nested) == 1 and result.figures["subgraph_weights_quantized"] == 1
    assert result.figures["nodes_quantized"] == sum(1 for c in result.changes if c.action == "quantized") + 1


def test_auto_choosing_dynamic_reports_the_dynamic_candidate_not_the_static_ones_figures(tmp_path, monkeypatch):
    """The static candidate's guard kept nodes in float; when auto picks dynamic, the report must
    not carry that count (MiniLM showed 56 nodes kept float while all 36 weight MatMuls were int8)."""
    monkeypatch.setattr("onnxsparse.passes.qdq.quantize.relative_latency", lambda reference, candidate, feed, **_: 0.5 if any(
        n.op_type == "MatMulInteger" for n in candidate.graph.node) else 0.9)
    _, report = _quantize("digits_transformer", tmp_path, "qdq{guard=true}", tolerances=None)
    figures, step = report.steps[0].figures, report.steps[0]
    assert figures["mode"] == "dynamic", figures
    assert "nodes_kept_float" not in figures and "guard_kept_float" not in figures
    quantized = [c for c in step.changes if not c.action.startswith("simplify: ")]  # the simplification made first comes before
    assert figures["nodes_quantized"] == len(quantized) == sum(c.action == "dynamic int8" for c in step.changes)


def test_without_calibration_the_pass_times_at_the_users_dims_as_it_validates(tmp_path, monkeypatch, rng):
    """qdq{mode=dynamic} with synthetic validation at --dims seq=5: the never-slower timing runs at
    that shape too (a synthetic default would time another model than the user's)."""
    timed: list[tuple[int, ...]] = []

    def recorded(reference, candidate, feed, **_):
        timed.append(feed["x"].shape)
        return 0.5

    monkeypatch.setattr("onnxsparse.passes.qdq.quantize.relative_latency", recorded)
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[batch, seq, 64] x, float[64, 64] w) => (float[batch, seq, 64] y) { y = MatMul (x, w) }""")
    del model.graph.input[1]  # w becomes an initializer
    with_initializers(model, w=rng.standard_normal((64, 64)).astype(np.float32))
    onnx.save(model, tmp_path / "m.onnx")
    report = optimize(tmp_path / "m.onnx", tmp_path / "q.onnx", "qdq{mode=dynamic}", dims={"seq": 5})
    assert report.steps[0].status == "committed"
    assert timed == [(1, 5, 64)]


# Convs with and without a bias, a depthwise and a grouped one, a bare 2-D MatMul (its shift is an Add node,
# which onnxruntime fuses with it) and a MatMul with a bias Add: every way bias correction can land.
BIAS_KINDS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 6, 6] x) => (float[N, 5] y) <int64[2] shape = {0, 288}> {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2)
    r2 = Relu (c2)
    c3 = Conv <pads = [1, 1, 1, 1], group = 8> (r2, wd, bd)
    r3 = Relu (c3)
    c4 = Conv <pads = [1, 1, 1, 1], group = 2> (r3, wg)
    f = Reshape (c4, shape)
    m1 = MatMul (f, wm1)
    r4 = Relu (m1)
    m2 = MatMul (r4, wm2)
    y = Add (m2, b3)
}
"""


def _bias_kinds_model(rng: np.random.Generator) -> onnx.ModelProto:
    model = onnx.parser.parse_model(BIAS_KINDS)
    shapes = {"w1": (8, 4, 3, 3), "w2": (8, 8, 3, 3), "wd": (8, 1, 3, 3), "wg": (8, 4, 3, 3), "wm1": (288, 12), "wm2": (12, 5)}
    for name, shape in shapes.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name))
    for name, size in (("b1", 8), ("bd", 8), ("b3", 5)):
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(size).astype(np.float32), name))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("correction", ["auto", "on"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_bias_correction_patched_into_one_built_model_equals_building_it_per_layer(monkeypatch, rng, correction, per_channel):
    """The bytes of the quantized model are the same whether each layer's shift is patched into one
    built int8 model or the model is built again per layer; and patching does build fewer times."""
    model = _bias_kinds_model(rng)
    feeds = [{"x": rng.standard_normal((8, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    from onnxsparse.passes.qdq.materialize import StaticBuilder

    builds = {}
    real_build = StaticBuilder.build
    results = {}
    for patch in (True, False):
        monkeypatch.setattr("onnxsparse.passes.qdq.bias_correction.PATCH_BIASES", patch)
        count = builds.setdefault(patch, [0])

        def counting(self, *args, count=count, **kwargs):
            count[0] += 1
            return real_build(self, *args, **kwargs)

        monkeypatch.setattr(StaticBuilder, "build", counting)
        result = Qdq(mode="static", guard=False, bias_correction=correction, per_channel=per_channel).run(
            clone(model), PassContext(calibration=IterableInputs(feeds)))
        results[patch] = (result.model.SerializeToString(), result.figures["bias_corrected_layers"])
    assert results[True][1] == (4 if correction == "auto" else 6) and results[True] == results[False]
    assert builds[True][0] < builds[False][0]


def test_an_activation_range_ignores_nan_and_inf_values_and_is_empty_without_finite_ones():
    from onnxsparse.activations import _finite_range

    assert _finite_range(np.array([1.0, -2.0, 3.0], np.float32)) == (-2.0, 3.0)
    assert _finite_range(np.array([np.nan, -np.inf, 0.5, 2.0, np.inf], np.float32)) == (0.5, 2.0)
    assert _finite_range(np.array([np.nan, np.inf], np.float32)) == (np.inf, -np.inf)
    assert _finite_range(np.zeros(0, np.float32)) == (np.inf, -np.inf)


def test_calibration_samples_counts_samples_not_feeds(tmp_path):
    """One feed of 64 images is 64 samples: ``calibration_samples=16`` reads the first 16 of them,
    exactly as if only those had been given."""
    with np.load(MODELS / "digits_cnn.calibration.npz") as archive:
        images = archive["input"]
    images = images.copy()
    images[16:] *= 50.0  # ranges read past the 16th sample would be 50x wider
    written = {}
    for name, pipeline, calibration in (("limited", "qdq{mode=static calibration_samples=16 bias_correction=off guard=false}", [{"input": images}]),
                                         ("first", "qdq{mode=static bias_correction=off guard=false}", [{"input": images[:16]}])):
        optimize(MODELS / "digits_cnn.onnx", tmp_path / f"{name}.onnx", pipeline, inputs=MODELS / "digits_cnn.inputs.npz",
                 calibration=calibration, policy="keep", keep_worse=True)
        written[name] = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / f"{name}.onnx").graph.initializer}
    assert written["limited"].keys() == written["first"].keys()
    for key, value in written["limited"].items():
        np.testing.assert_array_equal(value, written["first"][key], err_msg=key)


def test_ranges_are_reduced_inside_onnxruntime_and_read_whole_only_where_a_run_is_not_finite(monkeypatch):
    """Min and max come from ReduceMin/ReduceMax nodes added to the graph (no activation is copied
    out); a tensor that is NaN/Inf in some run is read again whole and its finite values kept."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[N, 4] x) => (float[N, 4] y, int64[N, 4] k) {
            a = Relu (x)
            b = Log (a)
            y = Neg (b)
            k = Cast <to = 7> (a)
        }
    """)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 4.0, (64, 4)).astype(np.float32)
    x[40, 1] = -1.0  # Relu -> 0 -> Log: -inf in b and +inf in y, in one run of 16
    read = record_tensor_values(monkeypatch)
    ranges = activations.collect_ranges(model, IterableInputs([{"x": x}]), ["a", "b", "y", "k"], method="minmax")
    finite_x = np.delete(x, 40, axis=0)
    a = np.maximum(x, 0)
    assert ranges["a"] == pytest.approx((min(0.0, float(a.min())), float(a.max())))
    logs = np.log(np.maximum(x[x > 0], 0))
    assert ranges["b"] == pytest.approx((min(0.0, float(logs.min())), max(0.0, float(logs.max()))), rel=1e-6)
    assert ranges["y"] == pytest.approx((min(0.0, -float(logs.max())), max(0.0, -float(logs.min()))), rel=1e-6)
    assert ranges["k"] == (0.0, float(np.floor(finite_x.max())))
    assert all(name.endswith(("__reducemin", "__reducemax")) for name in read[0])  # reduced in onnxruntime, not copied out
    assert sorted(read[1]) == ["b", "k", "y"]  # read whole: the two that were not finite in a run, and the integer one


def test_ranges_are_read_whole_when_onnxruntime_refuses_the_added_reductions(monkeypatch):
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[N, 4] x) => (float[N, 4] y) {
            a = Relu (x)
            y = Neg (a)
        }
    """)
    real = activations._with_reductions

    def refused(model, names, facts):  # as if onnxruntime had no ReduceMin/ReduceMax for this model
        augmented, outputs = real(model, names, facts)
        for node in augmented.graph.node:
            if node.op_type.startswith("Reduce"):
                node.op_type = "NoSuchReduction"
        return augmented, outputs

    monkeypatch.setattr(activations, "_with_reductions", refused)
    x = np.random.default_rng(0).uniform(-2.0, 3.0, (32, 4)).astype(np.float32)
    ranges = activations.collect_ranges(model, IterableInputs([{"x": x}]), ["a", "y"], method="minmax")
    assert ranges["a"] == pytest.approx((0.0, float(x.max())))
    assert ranges["y"] == pytest.approx((-float(x.max()), 0.0))


# Two convolutions with a Pad between them whose amounts an exporter builds from Constant nodes.
PADDED_BETWEEN = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 8, 8] x) => (float[N, 8, 8, 8] y) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu (c1)
        zero = Constant <value = int64[1] {0}> ()
        one = Constant <value = int64[1] {1}> ()
        pads = Concat <axis = 0> (zero, zero, one, one, zero, zero, one, one)
        p = Pad (r1, pads)
        c2 = Conv (p, w2, b2)
        y = Relu (c2)
    }
"""


@pytest.mark.parametrize("simplify", [True, False])
def test_qdq_simplifies_first_so_that_a_pad_between_convolutions_does_not_stay_float(tmp_path, rng, simplify):
    model = with_initializers(onnx.parser.parse_model(PADDED_BETWEEN), w1=rng.standard_normal((8, 4, 3, 3)).astype(np.float32) / 6,
                              b1=rng.standard_normal(8).astype(np.float32), w2=rng.standard_normal((8, 8, 3, 3)).astype(np.float32) / 8,
                              b2=rng.standard_normal(8).astype(np.float32))
    calibration = [{"x": rng.standard_normal((8, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
    inputs = [{"x": rng.standard_normal((8, 4, 8, 8)).astype(np.float32)}]
    # keep_worse: on an 8x8 toy, int8 need not beat float; what runs where is the point here
    manager = PassManager(parse_pipeline(f"qdq{{mode=static simplify={str(simplify).lower()}}}"), inputs=IterableInputs(inputs),
                          calibration=IterableInputs(calibration), keep_worse=True)
    int8, report = manager.run(model)
    assert report.steps[0].status in ("committed", "kept-worse")
    quantized = tmp_path / "quantized.onnx"
    onnx.save(int8, quantized)
    ops = _fused_ops(quantized, tmp_path)
    # both convolutions run int8 either way (the second's Relu, whose output is the graph's, runs float after it)
    assert ops["QLinearConv"] == 2 and ops["Relu"] == 1, ops
    if simplify:  # the Pad went into the second convolution: nothing float between the two
        assert "Pad" not in ops, ops
        assert [c.action for c in report.steps[0].changes][:3] == ["simplify: removed"] * 3
    else:  # the Pad stays, in float, between DequantizeLinear and QuantizeLinear
        assert ops["Pad"] == 1, ops


def test_qdq_keeps_no_simplification_when_it_quantizes_nothing():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) {
            xi = Identity (x)
            y = Relu (xi)
        }
    """)
    calibration = IterableInputs([{"x": np.ones((2, 4), np.float32)}])
    result = Qdq(mode="static").run(clone(model), PassContext(calibration=calibration))
    assert not result.changes and result.model.graph == model.graph
    assert any("simplification made first is not kept" in w for w in result.warnings)


# Per data-movement op: its attributes, constant inputs after the data (and its output count, where
# not one), and the DQ -> op -> Q model.
SAME_SCALE_PROBES = {
    "MaxPool": ({"kernel_shape": [2, 2], "strides": [2, 2]}, {}),
    "Reshape": ({}, {"shape": np.array([1, 8, 64], np.int64)}),
    "Transpose": ({"perm": [0, 2, 3, 1]}, {}),
    "Flatten": ({"axis": 1}, {}),
    "Squeeze": ({}, {"axes": np.array([0], np.int64)}),
    "Unsqueeze": ({}, {"axes": np.array([0], np.int64)}),
    "Resize": ({"mode": "nearest"}, {"roi": np.array([], np.float32), "scales": np.array([1, 1, 2, 2], np.float32)}),
    "Slice": ({}, {"starts": np.array([0], np.int64), "ends": np.array([4], np.int64), "axes": np.array([1], np.int64)}),
    "Identity": ({}, {}),
    "DepthToSpace": ({"blocksize": 2}, {}),
    "Split": ({"axis": 1}, {"split": np.array([4, 4], np.int64)}, 2),
    "Gather": ({"axis": 1}, {"indices": np.array([0, 2, 5], np.int64)}),
}


@pytest.mark.parametrize("op", sorted(SAME_SCALE_PROBES))
def test_every_op_qdq_quantizes_through_runs_on_int8_in_onnxruntime(tmp_path, op):
    """An op qdq boxes between DQ and Q with its input's scale must be one onnxruntime then runs on
    the int8 data (it drops the pair); one it runs in float only gains a Q/DQ pair."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxsparse.passes.qdq.rules import SAME_SCALE

    assert set(SAME_SCALE_PROBES) == set(SAME_SCALE)  # a new op in SAME_SCALE needs its probe here
    attrs, constants, *more = SAME_SCALE_PROBES[op]
    outputs = more[0] if more else 1
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node(op, ["xd", *constants], [f"y{i}" for i in range(outputs)], **attrs)]
    for i in range(outputs):
        nodes += [helper.make_node("QuantizeLinear", [f"y{i}", "s", "z"], [f"yq{i}"]),
                  helper.make_node("DequantizeLinear", [f"yq{i}", "s", "z"], [f"out{i}"])]
    initializers = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z"),
                    *(numpy_helper.from_array(value, name) for name, value in constants.items())]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, None) for i in range(outputs)], initializers)
    path = tmp_path / "probe.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    ops = _fused_ops(path, tmp_path)
    assert ops["DequantizeLinear"] == outputs and ops["QuantizeLinear"] == 1, ops  # the input's Q and the outputs' DQs only


def _reads_dequantized(model: onnx.ModelProto, op: str) -> bool:
    """Whether some ``op`` node of the QDQ model reads an activation through a DequantizeLinear."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return any(n.op_type == op and any(i in dequantized for i in n.input) for n in model.graph.node)


@pytest.mark.parametrize(("ratio", "kept_input", "said"), [
    (1.2, True, "1.20x its input's time in onnxruntime (one thread), so the input is kept: quantizing activations"),
    (0.995, True, "0.995x its input's time in onnxruntime (one thread), so the input is kept: a gain under 1% is within"),
    (0.98, False, ""),
])
def test_never_slower_keeps_the_input_when_no_candidate_runs_clearly_faster(monkeypatch, ratio, kept_input, said):
    """Slower, or faster by less than a timing's noise: the input is kept, saying which; 2% faster: int8."""
    monkeypatch.setattr("onnxsparse.passes.qdq.quantize.relative_latency", lambda *args, **kwargs: ratio)
    model, inputs, calibration = bundled("digits_cnn")
    _, report = PassManager(parse_pipeline("qdq"), inputs=inputs, calibration=calibration).run(model)
    step = report.steps[0]
    assert step.figures["static_latency_ratio"] == step.figures["dynamic_latency_ratio"] == ratio
    if not kept_input:
        assert step.status == "committed" and step.figures["latency_ratio"] == ratio, step.reason
        return
    assert step.status == "worse" and said in step.reason, step.reason
    # without the option the int8 model is handed back, with the timing the manager then judges on
    result = Qdq(mode="static", never_slower=False).run(clone(model), PassContext(calibration=calibration))
    assert _reads_dequantized(result.model, "Conv") and not result.worse


def test_a_kind_of_node_whose_int8_form_is_slower_stays_float(monkeypatch, tmp_path):
    """The int8 depthwise convolution is made to cost time: each kind is tried in float, and the model
    keeps its other convolutions int8 and the depthwise one float, saying why in the report."""
    def depthwise_int8(model: onnx.ModelProto) -> bool:
        dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return any(n.op_type == "Conv" and n.input[1] in dequantized and any(a.name == "group" and a.i > 1 for a in n.attribute)
                   for n in model.graph.node)

    timed = []
    monkeypatch.setattr("onnxsparse.passes.qdq.quantize.relative_latency",
                        lambda reference, candidate, feed, **_: timed.append(candidate) or (1.05 if depthwise_int8(candidate) else 0.7))
    out, report = _quantize("digits_cnn", tmp_path, "fold-batchnorm,qdq{mode=static}")
    step = report.steps[1]
    assert step.status == "committed" and step.figures["latency_ratio"] == 0.7
    slow = [s for s in step.skipped if "made the model slower" in s.reason]
    assert len(slow) == 1 and "int8 depthwise Conv made the model slower (1.05x -> 0.70x" in slow[0].reason
    ops = _fused_ops(out, tmp_path)
    assert ops["QLinearConv"] == 4 and ops["Conv"] + ops["FusedConv"] == 1, ops
    # the Add's tensors are quantized by its int8 neighbours whatever is said of it: not timed alone
    assert step.figures["kinds_in_float_latency"] == ("Conv: 1.050; Gemm: 1.050; GlobalAveragePool: 1.050; depthwise Conv: 0.700; "
                                                      "input Conv: 1.050")
    assert len(timed) == 1 + 5


def _first_conv_float(model: onnx.ModelProto) -> bool:
    """Whether the model's first Conv reads its float input: no QuantizeLinear of the input in front."""
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    return first.input[0] == model.graph.input[0].name


@pytest.mark.parametrize(("float_first_is", "kept_float"), [(0.95, True), (0.995, False)])
def test_the_layer_reading_the_model_input_stays_float_when_that_is_timed_faster(monkeypatch, tmp_path, float_first_is, kept_float):
    """A clearly faster int8 model (0.6x its input) is still timed with its first layer in float, against
    itself: int8 there costs a QuantizeLinear of the input, and a first layer's few channels can run
    faster in float. It stays float only when that is at least 1% faster, and says why."""
    def timing(reference, candidate, feed, **_):
        if any(n.op_type == "QuantizeLinear" for n in reference.graph.node):  # the int8 model, against the trial
            return 1 / float_first_is if _first_conv_float(reference) else 1.0
        return 0.6

    monkeypatch.setattr("onnxsparse.passes.qdq.quantize.relative_latency", timing)
    out, report = _quantize("digits_cnn", tmp_path, "fold-batchnorm,qdq{mode=static}")
    step = report.steps[1]
    assert step.status == "committed" and report.final_validation.passed
    assert step.figures["input_layers_in_float_latency"] == round(0.6 * float_first_is, 3)
    ops = _fused_ops(out, tmp_path)
    first = [s for s in step.skipped if "reads the model's input" in s.reason]
    if kept_float:
        assert step.figures["latency_ratio"] == 0.57 and _first_conv_float(onnx.load(out))
        assert len(first) == 1 and "reads the model's input, and the model ran faster with this Conv in float (0.600x -> 0.570x" in first[0].reason
        assert ops["QLinearConv"] == 4 and ops["Conv"] + ops["FusedConv"] == 1, ops
    else:
        assert step.figures["latency_ratio"] == 0.6 and not first and not _first_conv_float(onnx.load(out))
        assert ops["QLinearConv"] == 5 and "Conv" not in ops and "FusedConv" not in ops, ops


def test_a_model_with_nodes_kept_float_has_its_biases_corrected_again_for_them(monkeypatch, tmp_path):
    """Bias shifts measured with every node int8 are dropped below a layer kept float (they would correct
    an error that is no longer there): with the first layer float, that is every shift. The model
    chosen with it float has its biases measured again with it float: fewer layers corrected, closer
    to the original than without them (and here than every node int8)."""
    from onnxsparse.passes.qdq import quantize

    monkeypatch.setattr(quantize, "relative_latency", lambda reference, candidate, feed, **_: (
        (1 / 0.95 if _first_conv_float(reference) else 1.0) if any(n.op_type == "QuantizeLinear" for n in reference.graph.node) else 0.6))
    x = np.concatenate([np.load(MODELS / f"digits_cnn.{part}.npz")["input"] for part in ("inputs", "calibration")])
    fp32 = ort.InferenceSession(str(MODELS / "digits_cnn.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    measured = quantize.bias_shifts
    errors, corrected = {}, {}
    for again in (True, False):
        if not again:  # what the variant was before: shifts measured with every node int8, so all dropped
            monkeypatch.setattr(quantize, "bias_shifts", lambda *args, kept_float=frozenset(), **kwargs: (
                {} if kept_float else measured(*args, **kwargs)))
        out, report = _quantize("digits_cnn", tmp_path, "fold-batchnorm,qdq{mode=static guard=false}")
        assert _first_conv_float(onnx.load(out))
        y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        errors[again], corrected[again] = float(np.abs(y - fp32).mean()), report.steps[1].figures["bias_corrected_layers"]
    assert corrected == {True: 4, False: 0}
    assert errors[True] < 0.8 * errors[False], errors


@pytest.mark.parametrize(("judged", "confirmed", "current_holds", "expected"), [
    ((True, 0.99), True, True, (True, True)),  # holds on both sets of samples
    ((True, 0.99), False, True, (False, False)),  # the judge's samples only: a search's choice must hold on the others too
    ((False, 0.50), True, False, (True, False)),  # neither holds (after a lossy step): closer to the original than current
    ((False, 0.30), True, False, (False, False)),  # neither holds, and further from the original
])
def test_a_variant_replaces_the_guards_model_when_it_holds_on_both_sample_sets_or_neither_does_and_it_is_closer(
        judged, confirmed, current_holds, expected):
    from types import SimpleNamespace

    from onnxsparse.passes.qdq.quantize import _replaces

    variant, current = onnx.ModelProto(), onnx.ModelProto()
    variant.doc_string, current.doc_string = "variant", "current"

    def verdict(passed: bool, cosine: float) -> SimpleNamespace:
        return SimpleNamespace(passed=passed, outputs=[SimpleNamespace(cosine=cosine)])

    context = PassContext(
        validate=lambda model: verdict(*judged) if model.doc_string == "variant" else verdict(current_holds, 0.4),
        confirm=lambda model: verdict(confirmed if model.doc_string == "variant" else True, 0.0))
    assert _replaces(variant, current, context)[:2] == expected


@pytest.mark.parametrize("excluded", ["/block/conv1/Conv", "/pointwise/pointwise.0/Conv"])
def test_a_layer_kept_float_between_int8_neighbours_runs_float_in_onnxruntime(tmp_path, excluded):
    """onnxruntime quantizes a float Conv/Gemm weight itself (per tensor) when the layer reads a
    DequantizeLinear and writes to a QuantizeLinear: a layer kept float must not read one."""
    out, _ = _quantize("digits_cnn", tmp_path, f"fold-batchnorm,qdq{{mode=static exclude={excluded}}}")
    ops = _fused_ops(out, tmp_path)
    quantized_layers = ops["QLinearConv"] + ops["QGemm"] + ops["QLinearMatMul"]
    float_layers = ops["Conv"] + ops["FusedConv"] + ops["Gemm"] + ops["FusedGemm"]
    assert quantized_layers <= 5 and float_layers >= 1, ops


def test_speed_kinds_tell_one_dimensional_and_depthwise_convolutions_apart():
    from onnxsparse.graph import to_gs
    from onnxsparse.passes.qdq.rules import speed_kind, timing_kind

    model = with_initializers(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 8, 1, 32] x, float[32, 4] h) => (float[1, 8, 1, 32] y, float[1, 8, 4, 4] z, float[1, 8, 1, 4] m) {
        a = Conv <pads = [0, 1, 0, 1]> (x, w13)
        y = Conv <pads = [0, 1, 0, 1], group = 8> (a, wd)
        p = Reshape (x, shape)
        z = Conv <pads = [1, 1, 1, 1]> (p, w33)
        m = MatMul (y, h)
    }"""), w13=np.ones((8, 8, 1, 3), np.float32), wd=np.ones((8, 1, 1, 3), np.float32), w33=np.ones((8, 8, 3, 3), np.float32),
        shape=np.array([1, 8, 4, 8], np.int64))
    graph = to_gs(onnx.shape_inference.infer_shapes(model))
    kinds = {n.outputs[0].name: speed_kind(n) for n in graph.nodes if n.op == "Conv"}
    assert kinds == {"a": "1-D Conv", "y": "1-D depthwise Conv", "z": "Conv"}
    # the speed search times the layers reading a model input (through data movement only, as any operand) apart
    kinds = {n.outputs[0].name: timing_kind(n) for n in graph.nodes if n.op in ("Conv", "MatMul")}
    assert kinds == {"a": "input 1-D Conv", "y": "1-D depthwise Conv", "z": "input Conv", "m": "input MatMul of activations"}


def test_class_scores_are_held_to_top1_agreement_by_default_and_other_outputs_are_not():
    """qdq's own bound on a class-score output is the top-1 accuracy its flips cost as well as cosine; an
    embedding keeps cosine only; a tolerance the user sets replaces both."""
    from onnxsparse.pipeline import _Chain
    from onnxsparse.validation import Tolerance, Tolerances

    chain = _Chain(load(MODELS / "digits_cnn.onnx"), [], None)  # type: ignore[arg-type]
    of = chain.tolerance_of(Qdq(), frozenset({"logits"}), Tolerances())
    assert of("logits") == Tolerance(min_cosine=0.97, max_top1_drop=0.01) and of("embedding") == Tolerance(min_cosine=0.97)
    of = chain.tolerance_of(Qdq(), frozenset({"logits"}), Tolerances(), frozenset({"frames"}))
    assert of("frames") == Tolerance(min_cosine=0.97, max_sequence_drop=0.01)  # a text line's frames: what the line reads
    user = chain.tolerance_of(Qdq(), frozenset({"logits"}), Tolerances(default=Tolerance(min_cosine=0.9)))
    assert user("logits") == user("embedding") == Tolerance(min_cosine=0.9)
    model, inputs, calibration = bundled("digits_cnn")
    _, report = PassManager(parse_pipeline("qdq{mode=static}"), inputs=inputs, calibration=calibration).run(model)
    assert report.steps[0].validation.verdict.tolerances == {"logits": "min_cosine=0.97 max_top1_drop=0.01"}


def test_a_split_and_a_gather_of_activations_run_on_int8_between_int8_convolutions(tmp_path, rng):
    model = with_initializers(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 8, 8] x) => (float[N, 8, 8, 8] y, float[N, 8, 8, 8] z, float[N, 8, 8, 8] u) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        p, q = Split <axis = 1> (r, halves)
        cy = Conv <pads = [1, 1, 1, 1]> (p, w2, b2)
        cz = Conv <pads = [1, 1, 1, 1]> (q, w3, b3)
        c = Gather <axis = 1> (r, picked)
        cu = Conv <pads = [1, 1, 1, 1]> (c, w4, b4)
        y = Relu (cy)
        z = Relu (cz)
        u = Relu (cu)
    }"""), w1=rng.standard_normal((16, 4, 3, 3)).astype(np.float32), b1=rng.standard_normal(16).astype(np.float32),
        halves=np.array([8, 8], np.int64), picked=np.array([0, 3, 5, 6, 9, 10, 12, 15], np.int64),
        **{f"w{i}": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) for i in (2, 3, 4)},
        **{f"b{i}": rng.standard_normal(8).astype(np.float32) for i in (2, 3, 4)})
    calibration = IterableInputs([{"x": rng.standard_normal((8, 4, 8, 8)).astype(np.float32)} for _ in range(4)])
    result = Qdq(mode="static", guard=False, never_slower=False).run(clone(model), PassContext(calibration=calibration))
    path = tmp_path / "int8.onnx"
    onnx.save(result.model, path)
    ops = _fused_ops(path, tmp_path)
    # the input's Q and the DQs before the three output Relus: none around the Split or the Gather
    assert ops["QLinearConv"] == 4 and ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 3, ops
    feed = {"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)}
    for got, want in zip(run(result.model, feed), run(model, feed)):
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


def test_sensitivity_lists_each_node_alone_worst_first_and_explain_prints_it_from_the_report(tmp_path, capsys):
    from onnxsparse.cli import main
    from onnxsparse.validation import Tolerance, Tolerances

    out = tmp_path / "int8.onnx"
    report = optimize(MODELS / "digits_transformer.onnx", out, "qdq{mode=static sensitivity=true}", inputs=MODELS / "digits_transformer.inputs.npz",
                      calibration=MODELS / "digits_transformer.calibration.npz", report_path=tmp_path / "r.json",
                      tolerances=Tolerances(per_pass={"qdq": Tolerance(min_cosine=0.99995)}))
    step = report.steps[0]
    rows = step.figures["sensitivity"]
    assert len(rows) == step.figures["nodes_quantized"] + step.figures["nodes_kept_float"]
    cosines = [row["cosine_alone"] for row in rows]
    assert cosines == sorted(cosines) and all(0 < c <= 1 for c in cosines)
    kept = {row["node"] for row in rows if row["status"] == "kept in float by the accuracy guard"}
    assert kept and kept == {s.target for s in step.skipped if s.reason == "kept in float by the accuracy guard"}
    # whether each node alone holds the step's tolerance on the judge's samples (here cosine 0.99995 alone)
    assert [row["holds_alone"] for row in rows] == [row["cosine_alone"] >= 0.99995 for row in rows]
    assert all(row["same_read_alone"] is None for row in rows)  # class scores per sample: no sequence read
    assert main(["explain", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "each node quantized alone, worst first:" in text and rows[0]["node"] in text
    assert "left alone, kept in float by the accuracy guard: " in text
    assert main(["explain", str(tmp_path / "int8.onnx")]) == 2  # a model, not a report: one line, exit 2
    assert "not an onnxsparse report" in capsys.readouterr().err


def _recurrent_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x [T, N, 16] -> LSTM (weights in Constant nodes, as some exporters write them) -> GRU -> y."""
    from onnx import TensorProto, helper, numpy_helper

    hidden = 32
    def constant(name: str, shape: tuple[int, ...]) -> onnx.NodeProto:
        value = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))

    nodes = [constant("W", (1, 4 * hidden, 16)), constant("R", (1, 4 * hidden, hidden)), constant("B", (1, 8 * hidden)),
             helper.make_node("LSTM", ["x", "W", "R", "B"], ["h", "", ""], hidden_size=hidden, name="lstm"),
             helper.make_node("Squeeze", ["h", "axis1"], ["s"]),
             constant("Wg", (1, 3 * hidden, hidden)), constant("Rg", (1, 3 * hidden, hidden)),
             helper.make_node("GRU", ["s", "Wg", "Rg"], ["y", ""], hidden_size=hidden, name="gru")]
    graph = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12, "N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [12, 1, "N", hidden])],
                              [numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_lstm_weights_become_int8_for_onnxruntimes_kernel_and_a_gru_stays_float_with_a_reason(rng, mode):
    model = _recurrent_model(rng)
    calibration = IterableInputs([{"x": rng.standard_normal((12, 4, 16)).astype(np.float32)} for _ in range(2)])
    result = Qdq(mode=mode, never_slower=False, guard=False).run(clone(model), PassContext(calibration=calibration))
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["DynamicQuantizeLSTM"] == 1 and "LSTM" not in ops and ops["GRU"] == 1
    assert any(c.target == "lstm" and c.action == "dynamic int8" for c in result.changes)
    assert [s.reason for s in result.skipped if s.target == "gru"] == ["onnxruntime has no int8 GRU kernel"]
    assert not result.standard  # a contrib op: the manager checks it by loading it in onnxruntime
    lstm = next(n for n in result.model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert weights[lstm.input[1]].dtype == np.int8 and weights[lstm.input[1]].shape == (1, 16, 128)  # [directions, inputs, 4 x hidden]
    assert weights[lstm.input[8]].shape == (1, 128)  # one scale per gate unit
    feed = {"x": rng.standard_normal((12, 3, 16)).astype(np.float32)}
    got, want = run(result.model, feed)[0], run(model, feed)[0]
    assert np.dot(got.ravel(), want.ravel()) / np.linalg.norm(got) / np.linalg.norm(want) > 0.999


def test_lstms_run_through_the_default_pass_on_a_time_major_model_and_stay_float_where_int8_is_slower(rng, monkeypatch):
    """The guard's judge and the timing take whole [steps, batch, features] feeds (axis 0 is time); an
    LSTM whose int8 form runs slower stays float, said per node."""
    model = _recurrent_model(rng)
    calibration = IterableInputs([{"x": rng.standard_normal((12, 4, 16)).astype(np.float32)} for _ in range(8)])
    inputs = IterableInputs([{"x": rng.standard_normal((12, 4, 16)).astype(np.float32)}])
    final, report = PassManager(parse_pipeline("qdq"), inputs=inputs, calibration=calibration).run(model)
    assert report.steps[0].status == "committed" and "DynamicQuantizeLSTM" in {n.op_type for n in final.graph.node}
    monkeypatch.setattr("onnxsparse.passes.qdq.quantize.relative_latency", lambda reference, candidate, feed, **_: 1.3 if any(
        n.op_type == "DynamicQuantizeLSTM" for n in candidate.graph.node) else 1.0)
    final, report = PassManager(parse_pipeline("qdq"), inputs=inputs, calibration=calibration).run(model)
    step = report.steps[0]
    assert step.status == "no-change" and "LSTM" in {n.op_type for n in final.graph.node}
    assert [s.reason for s in step.skipped if s.target == "lstm"] == ["kept float: its int8 form made the model slower (1.00x -> 1.30x its input's time)"]


def test_a_slow_kind_kept_float_on_top_of_the_guard_reports_both(monkeypatch):
    from onnxsparse.validation import Tolerance, Tolerances

    def weights_int8(model: onnx.ModelProto) -> bool:
        dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in {t.name for t in model.graph.initializer}
                       for o in n.output}
        return any(n.op_type == "MatMul" and n.input[1] in dequantized for n in model.graph.node)

    monkeypatch.setattr("onnxsparse.passes.qdq.quantize.relative_latency", lambda reference, candidate, feed, **_: 1.05 if weights_int8(candidate) else 0.7)
    model, inputs, calibration = bundled("digits_transformer")
    strict = Tolerances(per_pass={"qdq": Tolerance(min_cosine=0.99995)})
    _, report = PassManager(parse_pipeline("qdq{mode=static}"), inputs=inputs, calibration=calibration, tolerances=strict).run(model)
    step = report.steps[0]
    reasons = Counter("guard" if "accuracy guard" in s.reason else "slow" if "made the model slower" in s.reason else s.reason for s in step.skipped)
    assert step.figures["guard_kept_float"] > 0 and reasons["guard"] == step.figures["guard_kept_float"] and reasons["slow"] > 0
    assert step.figures["nodes_kept_float"] == reasons["guard"] + reasons["slow"]
    assert len([c for c in step.changes if c.action == "quantized"]) == step.figures["nodes_quantized"]


def test_the_guard_finds_the_one_harmful_node_in_a_kind_too_big_to_search_node_by_node():
    """60 nodes of one kind (a detector's convolutions) are more than the node-by-node search takes
    (GUARD_MAX_NODE_SEARCH): runs of graph neighbours are searched first, then the nodes of the run
    kept, so one harmful node ends float, not the whole kind."""
    from types import SimpleNamespace

    import onnx_graphsurgeon as gs

    from onnxsparse.passes.qdq.guard import GUARD_MAX_NODE_SEARCH, guarded
    from onnxsparse.results import PassResult

    names = [f"add{index}" for index in range(60)]
    assert len(names) > GUARD_MAX_NODE_SEARCH
    nodes = [gs.Node("Add", name=name) for name in names]
    trials: list[frozenset[str]] = []

    def validate(model: frozenset[str]) -> SimpleNamespace:  # the "model" is the set of nodes kept float
        trials.append(model)
        fine = "add37" in model
        return SimpleNamespace(passed=fine, outputs=[SimpleNamespace(cosine=1.0 if fine else 0.9)])

    result = PassResult(None)  # type: ignore[arg-type]
    model, kept, holds = guarded(frozenset, nodes, frozenset(), PassContext(validate=validate), result)  # type: ignore[arg-type]
    assert kept == {"add37"} and model == frozenset({"add37"}) and holds
    assert result.figures["guard_kept_float"] == 1
    assert len(trials) < len(names)  # fewer trials than one per node
    assert len(trials) == len(set(trials))  # each set of float nodes judged once, though ranked and then tried as a prefix


@pytest.mark.parametrize("others", [True, False], ids=["other samples confirm", "no other samples"])
def test_the_guard_keeps_float_what_the_confirming_samples_need_when_the_judges_samples_pass_everything(others):
    """The judge's few samples pass every trial (all nodes quantized included), as on MobileNetV2's
    32 views; calibration samples the judge never saw fail unless one node stays float. The guard then
    keeps that node float. Without
    other samples (confirm says None), the judge's verdict stands."""
    from types import SimpleNamespace

    import onnx_graphsurgeon as gs

    from onnxsparse.passes.qdq.guard import guarded
    from onnxsparse.results import PassResult

    nodes = [gs.Node("Add", name=f"add{index}") for index in range(8)]
    confirmed: list[frozenset[str]] = []

    def validate(model: frozenset[str]) -> SimpleNamespace:  # the "model" is the set of nodes kept float
        return SimpleNamespace(passed=True, outputs=[SimpleNamespace(cosine=0.999 if "add5" in model else 0.99)])

    def confirm(model: frozenset[str]) -> SimpleNamespace | None:
        confirmed.append(model)
        return SimpleNamespace(passed="add5" in model) if others else None

    result = PassResult(None)  # type: ignore[arg-type]
    model, kept, holds = guarded(frozenset, nodes, frozenset(), PassContext(validate=validate, confirm=confirm), result)  # type: ignore[arg-type]
    assert kept == ({"add5"} if others else set()) and model == frozenset(kept) and holds
    assert confirmed and confirmed[0] == frozenset()  # the judge passed every node quantized; the confirming samples did not


def test_auto_counts_a_candidate_within_tolerance_only_if_the_confirming_samples_agree():
    """The judge's samples pass both candidates; the confirming ones fail the faster dynamic one. Auto
    then takes the static one, as the guard would have judged it, not the faster."""
    from types import SimpleNamespace

    from onnxsparse.passes.qdq.quantize import _pick
    from onnxsparse.results import PassResult

    results = {"static": PassResult("static"), "dynamic": PassResult("dynamic")}  # type: ignore[arg-type]
    context = PassContext(validate=lambda model: SimpleNamespace(passed=True), confirm=lambda model: SimpleNamespace(passed=model == "static"),
                          calibration=object())  # type: ignore[arg-type]
    assert _pick(results, {"static": 0.8, "dynamic": 0.6}, "input", context, 0.99) == ("static", "the only one within tolerance")  # type: ignore[arg-type]


@pytest.mark.parametrize("after_lossy", [True, False], ids=["after a lossy pass", "on a model nothing changed"])
def test_auto_judges_quantization_against_its_input_when_neither_candidate_holds_after_a_lossy_pass(monkeypatch, after_lossy):
    """After a lossy pass, a refit model passes the judge's calibration samples (it fit them) at the edge
    of the tolerance; any quantization tips it over, so neither candidate holds. Auto then weighs what
    quantization itself adds (drift from the pass's input) and takes the faster within that bound, not
    "the closer to the original", which is merely the one that quantized less. On a model no lossy pass
    touched, the user's tolerance is quantization's own: the closer candidate stays the choice."""
    from types import SimpleNamespace

    from onnxsparse.passes.qdq.quantize import _pick
    from onnxsparse.results import PassResult

    results = {"static": PassResult("static"), "dynamic": PassResult("dynamic")}  # type: ignore[arg-type]

    def validate(model: str) -> SimpleNamespace:
        return SimpleNamespace(passed=model == "input", outputs=[SimpleNamespace(cosine=0.999 if model == "dynamic" else 0.99)])

    context = PassContext(validate=validate, confirm=lambda model: SimpleNamespace(passed=True), calibration=object(),  # type: ignore[arg-type]
                          after_lossy=after_lossy)
    monkeypatch.setattr("onnxsparse.passes.qdq.quantize._within_own_bound", lambda model, candidates, context, bound: list(candidates))
    chosen = _pick(results, {"static": 0.56, "dynamic": 0.99}, "input", context, 0.97)  # type: ignore[arg-type]
    if after_lossy:
        assert chosen == ("static", "neither within tolerance of the original; judged against this pass's input: both within tolerance; the faster")
    else:
        assert chosen == ("dynamic", "neither within tolerance; the closer to the original")


def test_auto_judges_no_model_twice_the_guards_static_choice_included(tmp_path, monkeypatch):
    """mode=auto chooses between the guard's static model and the dynamic one: the static model's
    verdicts (judge and confirmation) are the guard's, not asked of the calibration samples again."""
    from collections import Counter

    from onnxsparse import pipeline
    from onnxsparse.runtime import content_key

    asked: Counter[tuple[str, bool]] = Counter()
    judge = pipeline._CalibrationJudge.validate

    def counted(self, model, tolerance_of, label, *, confirming=False):  # type: ignore[no-untyped-def]
        asked[(content_key(model), confirming)] += 1
        return judge(self, model, tolerance_of, label, confirming=confirming)

    monkeypatch.setattr(pipeline._CalibrationJudge, "validate", counted)
    _, report = _quantize("digits_transformer", tmp_path, "qdq{mode=auto}")
    assert report.steps[0].figures["mode_choice"]  # both candidates were there to choose from
    assert asked and max(asked.values()) == 1


def test_auto_on_a_model_without_matmuls_never_picks_an_empty_dynamic_candidate(monkeypatch, rng):
    """With no MatMul/Gemm, dynamic quantization changes nothing: it is the input, not a candidate
    that can be "chosen as the faster". A static candidate that runs slower keeps the input, saying
    that static int8 was slower (not that dynamic had nothing to do)."""
    model = with_initializers(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[N, 3, 12, 12] x) => (float[N, 8, 1, 1] y) {
            a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
            r = Relu (a)
            c = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
            y = GlobalAveragePool (c)
        }
    """), w1=rng.standard_normal((8, 3, 3, 3)).astype(np.float32), b1=np.zeros(8, np.float32),
        w2=rng.standard_normal((8, 8, 3, 3)).astype(np.float32), b2=np.zeros(8, np.float32))
    feeds = [{"x": rng.standard_normal((4, 3, 12, 12)).astype(np.float32)} for _ in range(4)]

    def int8_is_slower(reference, candidate, feed, **_):
        return 1.4 if any(n.op_type == "QuantizeLinear" for n in candidate.graph.node) else 1.0

    monkeypatch.setattr("onnxsparse.passes.qdq.quantize.relative_latency", int8_is_slower)
    _, report = PassManager(parse_pipeline("qdq"), inputs=IterableInputs(feeds[:2]), calibration=IterableInputs(feeds[2:])).run(model)
    step = report.steps[0]
    assert step.status == "worse" and "1.40x its input's time" in step.reason, step.reason
    assert "dynamic_latency_ratio" not in step.figures and "mode_choice" not in step.figures
    assert not any("nothing to quantize" in s.reason for s in step.skipped)


@pytest.mark.parametrize("shape, axis", [((64, 3, 3, 3), 0), ((300, 70), 1), ((300, 70), None), ((2048, 600), 1), ((5,), 0)])
def test_int8_weights_are_the_nearest_integers_the_stored_scale_expresses(shape, axis):
    """quantize_weight: per channel (or tensor) scale = max |w| / 127 as float32, and each integer is
    the one whose value under that stored scale is nearest w, over blocks of rows (up to the float32
    rounding of w / scale: a quotient within an ulp of a half may round either way)."""
    from onnxsparse.quantization import quantize_weight

    weight = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    quant = quantize_weight(weight, axis)
    peaks = np.abs(weight).max() if axis is None else np.moveaxis(np.abs(weight), axis, 0).reshape(shape[axis], -1).max(axis=1)
    np.testing.assert_array_equal(quant.scale, (peaks.astype(np.float64) / 127).astype(np.float32))
    scale = quant.scale if axis is None else quant.scale.reshape([-1 if i == axis else 1 for i in range(len(shape))])
    values = quant.values.astype(np.float64)
    error = np.abs(values * scale - weight)
    for step in (-1, 1):
        neighbour = np.clip(values + step, -127, 127)
        assert np.all(error <= np.abs(neighbour * scale - weight) + 1e-5 * scale)
    assert np.abs(quant.values).max() == 127 and not np.any(quant.zero_point)


def test_the_guard_keeps_float_the_matmul_whose_dynamic_int8_breaks_the_model_and_quantizes_the_rest(tmp_path, rng):
    """Dynamic int8 quantizes each activation with one scale per tensor at run time: an input with one
    huge feature that the first layer ignores leaves that layer's other features at zero. The guard
    keeps that MatMul float and the next one int8, instead of the whole model staying float."""
    model = with_initializers(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16] x) => (float[N, 8] y) {
        h = MatMul (x, w1)
        m = MatMul (h, w2)
        y = Relu (m)
    }"""), w1=np.vstack([np.zeros((1, 16)), rng.normal(size=(15, 16))]).astype(np.float32), w2=rng.normal(size=(16, 8)).astype(np.float32))
    model.graph.node[0].name, model.graph.node[1].name = "first", "second"
    onnx.save(model, tmp_path / "m.onnx")
    for name in ("x", "calibration"):  # the guard judges on calibration samples, the verdict is on the inputs
        x = rng.normal(size=(64, 16)).astype(np.float32)
        x[:, 0] *= 2000.0  # one feature the first layer multiplies by zero sets the tensor's int8 scale
        np.savez(tmp_path / f"{name}.npz", x=x)
    report = optimize(tmp_path / "m.onnx", tmp_path / "q.onnx", "qdq{mode=dynamic never_slower=false}", inputs=tmp_path / "x.npz",
                      calibration=tmp_path / "calibration.npz")
    step = report.steps[0]
    assert [c.target for c in step.changes] == ["second"] and step.figures["guard_kept_float"] == 1
    assert any(s.target == "first" and s.reason == GUARD_REASON for s in step.skipped)
    assert report.final_validation.passed
    ops = _fused_ops(tmp_path / "q.onnx", tmp_path)
    assert ops["MatMul"] == 1 and ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] == 1
    unguarded = optimize(tmp_path / "m.onnx", tmp_path / "u.onnx", "qdq{mode=dynamic never_slower=false guard=false}", inputs=tmp_path / "x.npz",
                         calibration=tmp_path / "calibration.npz", policy="keep")
    assert not unguarded.steps[0].validation.passed  # what the guard prevents


def test_a_static_candidate_the_guard_kept_wholly_float_does_not_stand_in_for_a_dynamic_one_that_holds(tmp_path, monkeypatch):
    """When the guard keeps every node of the static candidate float, that candidate is the simplified
    input, which can time faster than the dynamic candidate: auto must pick the dynamic one, not
    return the input (PP-OCRv4 did, at 0.957x against 0.984x)."""
    from onnxsparse.passes.qdq import quantize

    real = quantize.guarded

    def static_wholly_float(build, nodes, quantized, context, result):  # type: ignore[no-untyped-def]
        if not any(n.op_type == "QuantizeLinear" for n in quantized.graph.node):
            return real(build, nodes, quantized, context, result)  # the dynamic candidate's guard
        names = {node.name for node in nodes}
        return build(names), names, True

    monkeypatch.setattr(quantize, "guarded", static_wholly_float)
    # the float (simplified) model times faster than the dynamic one, as PP-OCRv4's did
    monkeypatch.setattr(quantize, "relative_latency", lambda reference, candidate, feed, **_: (
        0.9 if any(n.op_type == "DynamicQuantizeLinear" for n in candidate.graph.node) else 0.5))
    out, report = _quantize("digits_transformer", tmp_path, "qdq{never_slower=false}")
    step = report.steps[0]
    assert step.status == "committed" and step.figures["mode"] == "dynamic", step.figures
    assert step.figures["mode_choice"] == "static: the accuracy guard kept every node float"
    assert _fused_ops(out, tmp_path)["DynamicQuantizeMatMul"] + _fused_ops(out, tmp_path)["MatMulIntegerToFloat"] >= 1


def test_the_dynamic_guard_fits_on_calibration_data_held_out_of_the_verdict(tmp_path):
    """Given calibration data alone, qdq{mode=dynamic} (guarded) chooses by it: the manager holds part
    of it out to validate on and says the pass fitted on the rest; unguarded it fits on nothing."""
    guarded_run = optimize(MODELS / "digits_transformer.onnx", tmp_path / "g.onnx", "qdq{mode=dynamic}", calibration=MODELS / "digits_transformer.calibration.npz")
    assert guarded_run.steps[0].fitted_on and guarded_run.calibration and "held out" in guarded_run.inputs, guarded_run.inputs
    plain = optimize(MODELS / "digits_transformer.onnx", tmp_path / "p.onnx", "qdq{mode=dynamic guard=false}",
                     calibration=MODELS / "digits_transformer.calibration.npz")
    assert not plain.steps[0].fitted_on and not plain.calibration
