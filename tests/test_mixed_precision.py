"""``mixed-precision``: each weight in the smallest of float32, float16, 8-/4-bit codebooks and 4-bit
blocks that keeps the whole model within tolerance."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import bundled, run, with_initializers

from onnxsparse.errors import PipelineSpecError, RequirementError
from onnxsparse.graph import to_gs
from onnxsparse.passes import PassContext, PassResult
from onnxsparse.passes.mixed_precision import Downgrade, Encoding, MixedPrecision, _ladder
from onnxsparse.pipeline import PassManager
from onnxsparse.spec import parse_pipeline
from onnxsparse.validation import Tolerance, Tolerances
from onnxsparse.weights import find_weights

CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 64] x) => (float[N, 64] y) <float[64, 64] a, float[64, 64] b, float[64, 64] c> {
    h1 = MatMul (x, a)
    r1 = Relu (h1)
    h2 = MatMul (r1, b)
    r2 = Relu (h2)
    y = MatMul (r2, c)
}
"""


def _chain(rng: np.random.Generator) -> onnx.ModelProto:
    model = onnx.parser.parse_model(CHAIN)
    del model.graph.initializer[:]
    return with_initializers(model, **{name: (rng.standard_normal((64, 64)) / 8).astype(np.float32) for name in "abc"})


def _encoding(fmt: str, nbytes: int, drift: float) -> Encoding:
    return Encoding(fmt, None, nbytes, drift)


def test_a_weights_ladder_keeps_only_the_formats_worth_their_bytes() -> None:
    # float32 is 400 bytes; cluster8 saves more than fp16 at less drift, and int4 saves less than cluster4 at more
    ladder = _ladder("w", 400, [_encoding("fp16", 200, 0.001), _encoding("cluster8", 100, 0.0005), _encoding("int4", 62, 0.2),
                                _encoding("cluster4", 50, 0.1)])
    assert [d.encoding.format for d in ladder] == ["cluster8", "cluster4"]
    assert [d.saved for d in ladder] == [300, 50]
    assert ladder[0].cost < ladder[1].cost  # each step costs more drift per byte than the one before
    # fp16 above the line from float32 to cluster8 (more drift per byte saved than going straight there): off the ladder
    bent = _ladder("w", 400, [_encoding("fp16", 200, 0.05), _encoding("cluster8", 100, 0.06), _encoding("cluster4", 50, 0.5)])
    assert [d.encoding.format for d in bent] == ["cluster8", "cluster4"]
    # on the line's right side it stays: a cheap first step
    convex = _ladder("w", 400, [_encoding("fp16", 200, 0.001), _encoding("cluster8", 100, 0.06)])
    assert [d.encoding.format for d in convex] == ["fp16", "cluster8"]
    assert _ladder("w", 400, [_encoding("fp16", 400, 0.0)]) == []  # saves nothing


def _sites(model: onnx.ModelProto) -> dict[str, object]:
    sites, _ = find_weights(to_gs(model), ("MatMul",))
    return {site.name: site for site in sites}


def _changed(model: onnx.ModelProto, original: onnx.ModelProto) -> set[str]:
    before = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    return {t.name for t in model.graph.initializer if not np.array_equal(onnx.numpy_helper.to_array(t), before[t.name])}


def test_the_search_steps_over_a_downgrade_that_breaks_the_tolerance_and_takes_the_ones_after_it(rng: np.random.Generator) -> None:
    model = _chain(rng)
    downgrades = [Downgrade(name, _encoding("fp16", 64 * 64 * 2, 0.0), 64 * 64 * 2, cost, 0) for cost, name in enumerate("abc")]
    downgrades.append(Downgrade("b", _encoding("cluster8", 64 * 64, 0.0), 64 * 64, 3, 1))  # b's next step: gone with b's first
    judged: list[set[str]] = []

    def validate(trial: onnx.ModelProto) -> SimpleNamespace:  # "b" alone breaks it
        judged.append(_changed(trial, model))
        return SimpleNamespace(passed="b" not in judged[-1])

    result = PassResult(model)
    taken = MixedPrecision()._holding(model, _sites(model), downgrades, PassContext(validate=validate), result)
    assert [d.site for d in taken] == ["a", "c"]
    assert result.figures["stepped_over"] == ["b -> fp16"] and result.figures["downgrades_taken"] == "2 of 4"
    stopped = PassResult(model)
    none_over = MixedPrecision(step_over=0)._holding(model, _sites(model), downgrades, PassContext(validate=validate), stopped)
    assert [d.site for d in none_over] == ["a"]  # without stepping over, the search stops at the first that breaks
    assert stopped.figures["stepped_over"] == []


def test_what_the_search_chose_is_taken_back_until_it_holds_on_samples_it_never_judged_by(rng: np.random.Generator) -> None:
    model = _chain(rng)
    downgrades = [Downgrade(name, _encoding("fp16", 64 * 64 * 2, 0.0), 64 * 64 * 2, cost, 0) for cost, name in enumerate("abc")]

    def confirm(trial: onnx.ModelProto) -> SimpleNamespace:  # the confirming samples take one downgrade at most
        return SimpleNamespace(passed=len(_changed(trial, model)) <= 1)

    result = PassResult(model)
    kept = MixedPrecision()._confirmed(model, _sites(model), downgrades, PassContext(confirm=confirm), result)
    assert [d.site for d in kept] == ["a"]  # the cheapest drift per byte stays
    assert result.figures["backed_off"] == 2 and any("taken back" in w for w in result.warnings)
    unconfirmable = PassResult(model)
    assert MixedPrecision()._confirmed(model, _sites(model), downgrades, PassContext(confirm=lambda _: None), unconfirmable) == downgrades
    assert any("not confirmed" in w for w in unconfirmable.warnings)


def test_on_the_bundled_transformer_weights_take_several_formats_and_the_file_shrinks_within_tolerance() -> None:
    model, inputs, calibration = bundled("digits_transformer")
    manager = PassManager(parse_pipeline("mixed-precision{min_elements=256}"), inputs=inputs, calibration=calibration)
    mixed, report = manager.run(model)
    step = report.steps[0]
    assert step.status == "committed", step.reason
    onnx.checker.check_model(mixed, full_check=True)
    formats = {c.action for c in step.changes}
    assert len(formats) >= 2 and formats <= {"fp16", "cluster8", "int4", "cluster4"}
    assert all("drift_alone" in c.details for c in step.changes)
    assert step.figures["weight_bytes_after"] < 0.5 * step.figures["weight_bytes_before"]
    assert report.output.file_bytes < report.input.file_bytes
    assert report.final_validation.passed
    feed = {"input": np.load("models/digits_transformer.inputs.npz")["input"]}
    before, after = run(model, feed)[0], run(mixed, feed)[0]
    cosine = float((before * after).sum() / (np.linalg.norm(before) * np.linalg.norm(after)))
    assert cosine >= 0.97  # the pass's default tolerance, checked here in onnxruntime itself


def test_a_tighter_tolerance_keeps_more_of_the_weights_bytes() -> None:
    model, inputs, calibration = bundled("digits_transformer")
    after = {}
    for bound in (0.9, 0.99999):
        manager = PassManager(parse_pipeline("mixed-precision{min_elements=256}"), inputs=inputs, calibration=calibration,
                              tolerances=Tolerances(default=Tolerance(min_cosine=bound)), policy="keep")
        _, report = manager.run(model)
        figures = report.steps[0].figures
        after[bound] = figures.get("weight_bytes_after", figures.get("weight_bytes_before"))
    assert after[0.99999] > after[0.9]


def test_a_weight_stored_as_float16_is_cast_back_once_at_load_not_at_every_run(rng: np.random.Generator, tmp_path) -> None:
    model = _chain(rng)
    calibration = [{"x": rng.standard_normal((48, 64)).astype(np.float32)}]
    from onnxsparse.calibration import IterableInputs

    result = MixedPrecision(formats=("fp16",), min_elements=1).run(
        model, PassContext(calibration=IterableInputs(calibration), validate=lambda _: SimpleNamespace(passed=True),
                           confirm=lambda _: SimpleNamespace(passed=True)))
    assert {c.action for c in result.changes} == {"fp16"} and len(result.changes) == 3
    halves = [t for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) == 3
    x = calibration[0]["x"][:4]
    expected = x
    for name in "abc":
        weight = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        expected = expected @ weight.astype(np.float16).astype(np.float32)
        expected = np.maximum(expected, 0) if name != "c" else expected
    np.testing.assert_allclose(run(result.model, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(result.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert [n.op_type for n in optimized.graph.node].count("Cast") == 0  # folded into float32 constants


def test_options_are_checked_when_the_pass_is_built_and_calibration_is_required() -> None:
    with pytest.raises(PipelineSpecError, match="one or more of"):
        MixedPrecision(formats=("int3",))
    with pytest.raises(PipelineSpecError, match="one or more of"):
        MixedPrecision(formats=())
    with pytest.raises(PipelineSpecError):
        parse_pipeline("mixed-precision{formats=fp16,fp16}")
    with pytest.raises(PipelineSpecError):
        parse_pipeline("mixed-precision{bits=4}")  # not an option of this pass
    model, inputs, _ = bundled("digits_transformer")
    with pytest.raises(RequirementError, match="calibration"):
        PassManager(parse_pipeline("mixed-precision"), inputs=inputs).run(model)


def _passing() -> PassContext:
    return PassContext(validate=lambda _: SimpleNamespace(passed=True), confirm=lambda _: SimpleNamespace(passed=True))


def _calibrated(context: PassContext, rng: np.random.Generator, inputs: dict[str, tuple[int, ...]]) -> PassContext:
    from dataclasses import replace

    from onnxsparse.calibration import IterableInputs

    feeds = [{name: rng.standard_normal(shape).astype(np.float32) for name, shape in inputs.items()}]
    return replace(context, calibration=IterableInputs(feeds))


def test_a_matmul_of_two_constants_takes_int4_for_its_weight_and_another_format_for_its_first_operand(rng: np.random.Generator) -> None:
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[N, 64] x) => (float[N, 64] y) <float[1, 64] c1, float[64, 64] c2> {
            p = MatMul (c1, c2)
            y = Add (x, p)
        }""")
    del model.graph.initializer[:]
    with_initializers(model, c1=rng.standard_normal((1, 64)).astype(np.float32), c2=rng.standard_normal((64, 64)).astype(np.float32))
    context = _calibrated(_passing(), rng, {"x": (32, 64)})
    result = MixedPrecision(formats=("int4", "fp16"), min_elements=16).run(model, context)
    assert {c.target: c.action for c in result.changes} == {"c1": "fp16", "c2": "int4"}  # int4 is written after the other
    onnx.checker.check_model(result.model, full_check=True)
    assert [n.op_type for n in result.model.graph.node].count("MatMulNBits") == 1
    x = np.zeros((2, 64), np.float32)
    exact = onnx.numpy_helper.to_array(model.graph.initializer[0]) @ onnx.numpy_helper.to_array(model.graph.initializer[1])
    got = run(result.model, {"x": x})[0]
    assert got.shape == (2, 64) and np.array_equal(got[0], got[1])
    assert float(got[0] @ exact[0]) / (np.linalg.norm(got[0]) * np.linalg.norm(exact[0])) > 0.98  # 4-bit blocks of the product


def test_formats_a_weight_cannot_take_are_not_offered_and_the_report_says_why(rng: np.random.Generator) -> None:
    model = _chain(rng)
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.full((64, 64), 7e4, np.float32), "a"))  # past float16
    result = MixedPrecision(formats=("fp16",), min_elements=16).run(model, _calibrated(_passing(), rng, {"x": (32, 64)}))
    assert {c.target for c in result.changes} == {"b", "c"}
    assert {s.target: s.reason for s in result.skipped}["a"] == "float32: float16 cannot hold its largest magnitude, 70000"
    cnn, _, calibration = bundled("digits_cnn")
    gemm = MixedPrecision(formats=("int4",), min_elements=16).run(cnn, PassContext(calibration=calibration, validate=_passing().validate,
                                                                                   confirm=_passing().confirm))
    assert not gemm.changes  # its only MatMul-like layer is a Gemm: MatMulNBits reads MatMul weights only
    assert "int4 blocks are MatMulNBits weights, not Gemm's" in {s.target: s.reason for s in gemm.skipped}["fc.weight"]


def test_without_the_opset_uint4_needs_the_4_bit_codebooks_are_left_out_before_any_probe(rng: np.random.Generator,
                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxsparse.errors import InputDataError
    from onnxsparse.passes import mixed_precision

    def refuse(model: onnx.ModelProto, wanted: int) -> onnx.ModelProto:
        raise InputDataError("onnx cannot convert this model to opset 21")

    monkeypatch.setattr(mixed_precision, "at_opset", refuse)
    result = MixedPrecision(formats=("cluster8", "cluster4"), min_elements=16).run(_chain(rng), _calibrated(_passing(), rng, {"x": (32, 64)}))
    assert {c.action for c in result.changes} == {"cluster8"} and all(o.domain != "" or o.version == 17 for o in result.model.opset_import)
    assert any("4-bit codebooks left out" in w for w in result.warnings)
    assert sum(c.details["bytes"] for c in result.changes) == result.figures["weight_bytes_after"]  # priced as written


def test_gptq_compensates_the_int4_blocks_and_codebooks_in_the_pipeline() -> None:
    model, inputs, calibration = bundled("digits_transformer")
    steps = {}
    for method in ("nearest", "gptq"):
        manager = PassManager(parse_pipeline(f"mixed-precision{{min_elements=256 method={method} formats=int4}}"), inputs=inputs,
                              calibration=calibration, policy="keep", keep_worse=True)
        _, report = manager.run(model)
        steps[method] = report.steps[0]
    assert all(step.status == "committed" for step in steps.values()), [s.reason for s in steps.values()]
    drift = {method: sum(c.details["drift_alone"] for c in step.changes) for method, step in steps.items()}
    assert drift["gptq"] < drift["nearest"]


def test_a_model_read_with_external_data_is_probed_by_path_and_its_formats_stay_external(rng: np.random.Generator, tmp_path) -> None:
    """A model read with external data (which the probes hand onnxruntime by path, the trial values
    beside it): its new weights go to the output's data file."""
    from onnxsparse import optimize

    model = _chain(rng)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    expected = run(model, {"x": x[:8]})[0]
    onnx.save_model(model, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    np.savez(tmp_path / "calibration.npz", x=x)
    report = optimize(tmp_path / "model.onnx", tmp_path / "out.onnx", "mixed-precision{min_elements=16 formats=fp16,cluster8}",
                      calibration=tmp_path / "calibration.npz", external_data=True)
    assert report.steps[0].status == "committed" and {c.action for c in report.steps[0].changes} <= {"fp16", "cluster8"}
    written = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    big = [t for t in written.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.UINT8) and t.dims[0] == 64]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    got = run(tmp_path / "out.onnx", {"x": x[:8]})[0]
    assert float((got * expected).sum() / (np.linalg.norm(got) * np.linalg.norm(expected))) > 0.97
