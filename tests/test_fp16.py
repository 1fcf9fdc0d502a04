"""``fp16``: float16 weights and activations, the nodes that would overflow kept float32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, run, with_initializers

from onnxsparse import load
from onnxsparse.calibration import IterableInputs
from onnxsparse.errors import PipelineSpecError
from onnxsparse.passes import PassContext
from onnxsparse.passes.fp16 import Fp16
from onnxsparse.pipeline import PassManager
from onnxsparse.shapes import infer_shapes
from onnxsparse.spec import parse_pipeline

# A hand-written RMS norm: the squares of activations around 300 pass float16's 65504. onnxruntime's
# CPU runs such ops in float32 through inserted Casts (it has few float16 kernels), so it does not
# overflow there; a GPU's float16 kernels would. The tests check what a device with float16 kernels
# stores: no tensor typed float16 may hold a value past 65504.
RMS = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 64] x) => (float[N, 8] y) <float[64, 64] w, float[64, 8] v, int64[2] flat = {-1, 64}> {
    h = MatMul (x, w)
    q = Mul (h, h)
    s = Reshape (q, flat)
    m = ReduceMean <axes = [1], keepdims = 1> (s)
    r = Sqrt (m)
    n = Div (h, r)
    y = MatMul (n, v)
}
"""


def _rms(rng: np.random.Generator) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    model = onnx.parser.parse_model(RMS)
    del model.graph.initializer[:]
    with_initializers(model, w=(8 * rng.standard_normal((64, 64))).astype(np.float32), v=rng.standard_normal((64, 8)).astype(np.float32),
                      flat=np.array([-1, 64], np.int64))
    feeds = [{"x": (5 * rng.standard_normal((8, 64))).astype(np.float32)} for _ in range(4)]
    return model, feeds


def test_nodes_that_overflow_float16_on_the_calibration_data_stay_float32(rng: np.random.Generator) -> None:
    model, feeds = _rms(rng)
    calibration, validation = IterableInputs(feeds[:3]), IterableInputs(feeds[3:])
    converted, report = PassManager([Fp16()], inputs=validation, calibration=calibration).run(model)
    step = report.steps[0]
    assert step.status == "committed"
    reasons = {skip.target: skip.reason for skip in step.skipped}
    assert set(reasons) == {"Mul_1", "Reshape_2", "ReduceMean_3"} and all("past float16's 65504" in r for r in reasons.values())
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(converted).graph.value_info}
    assert types["q"] == types["s"] == types["m"] == onnx.TensorProto.FLOAT  # the squares and their mean stay float32
    assert types["h"] == types["n"] == onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in [*converted.graph.input, *converted.graph.output]] == [onnx.TensorProto.FLOAT] * 2
    assert {t.name: t.data_type for t in converted.graph.initializer} == {"w_fp16": onnx.TensorProto.FLOAT16, "v_fp16": onnx.TensorProto.FLOAT16,
                                                                         "flat": onnx.TensorProto.INT64}
    [expected], [got] = run(model, feeds[3]), run(converted, feeds[3])
    assert np.isfinite(got).all() and np.abs(got - expected).max() < 2e-2 * np.abs(expected).max()
    assert _float16_peak(model, converted, feeds) < 65504
    # Without calibration data nothing is checked: a float16 device would overflow on the squares
    naive, report = PassManager([Fp16()], inputs=validation).run(model)
    assert "no node was checked for float16 overflow" in " ".join(report.steps[0].warnings)
    assert _float16_peak(model, naive, feeds) > 65504


def _float16_peak(original: onnx.ModelProto, converted: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    """The largest magnitude any tensor typed float16 in ``converted`` takes, as the float32 original
    computes it (the same names): what a device with float16 kernels would have to store."""
    typed = onnx.shape_inference.infer_shapes(converted).graph.value_info
    low = {v.name for v in typed if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    names = [v.name for v in onnx.shape_inference.infer_shapes(original).graph.value_info if v.name in low]
    probe = onnx.ModelProto()
    probe.CopyFrom(original)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    return max(float(np.abs(value).max()) for feed in feeds for value in run(probe, feed)[1:])


def test_inputs_the_schema_keeps_float_stay_float32_and_casts_retype() -> None:
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[1, 2, 4, 4] x, int64[2] k) => (float[1, 2, 8, 8] y, float[2] z) <float[4] scales = {1.0, 1.0, 2.0, 2.0}> {
        up = Resize <mode = "nearest"> (x, , scales)
        one = Constant <value = float[1] {0.5}> ()
        y = Mul (up, one)
        c = Cast <to = 1> (k)
        z = Add (c, one)
    }""")
    onnx.checker.check_model(model, full_check=True)
    converted = Fp16().run(infer_shapes(model, "test"), PassContext()).model
    onnx.checker.check_model(converted, full_check=True)
    initializers = {t.name: t.data_type for t in converted.graph.initializer}
    assert initializers["scales"] == onnx.TensorProto.FLOAT  # Resize's scales are float whatever the data is
    cast = next(n for n in converted.graph.node if n.op_type == "Cast" and n.input[0] == "k")
    assert onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.FLOAT16
    constant = next(n for n in converted.graph.node if n.op_type == "Constant")
    assert constant.attribute[0].t.data_type == onnx.TensorProto.FLOAT16
    x, k = np.arange(32, dtype=np.float32).reshape(1, 2, 4, 4), np.array([3, 4], np.int64)
    for got, expected in zip(run(converted, {"x": x, "k": k}), run(model, {"x": x, "k": k})):
        np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_a_bundled_cnn_in_float16_is_half_the_file_and_within_tolerance() -> None:
    model = load(MODELS / "digits_cnn.onnx")
    from onnxsparse.calibration import resolve_inputs

    inputs = resolve_inputs(str(MODELS / "digits_cnn.inputs.npz"), model)
    calibration = resolve_inputs(str(MODELS / "digits_cnn.calibration.npz"), model)
    _, report = PassManager(parse_pipeline("fp16"), inputs=inputs, calibration=calibration).run(model)
    step = report.steps[0]
    assert step.status == "committed" and report.final_validation.outputs[0].cosine > 0.9999
    assert step.figures["bytes_after"] < 0.51 * step.figures["bytes_before"]
    assert step.figures["nodes_kept_float32"] == 0


def test_bfloat16_keeps_float32_what_this_onnxruntime_cannot_run(rng: np.random.Generator) -> None:
    model, _ = _rms(rng)
    result = Fp16(dtype="bfloat16").run(infer_shapes(model, "test"), PassContext())
    reasons = [skip.reason for skip in result.skipped]
    if result.changes:  # an onnxruntime with bfloat16 kernels: the model it wrote loads
        run(result.model, {"x": np.ones((2, 64), np.float32)})
    assert result.changes or any("no bfloat16 kernel" in reason for reason in reasons)


@pytest.mark.parametrize(("text", "message"), [("fp16{dtype=float8}", "not one of"), ("fp16{headroom=0.5}", "below 1"),
                                              ("fp16{keep_io=false}", "valid options")])
def test_bad_options_are_refused_when_the_pass_is_built(text: str, message: str) -> None:
    with pytest.raises(PipelineSpecError, match=message):
        parse_pipeline(text)


def test_what_an_if_body_reads_from_outside_stays_float32() -> None:
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (bool c, float[2, 4] x) => (float[2, 4] y) {
        h = Relu (x)
        y = If (c) <
            then_branch = g1 () => (float[2, 4] t) { t = Neg (h) },
            else_branch = g2 () => (float[2, 4] e) { e = Abs (h) }
        >
    }""")
    onnx.checker.check_model(model, full_check=True)
    result = Fp16().run(infer_shapes(model, "test"), PassContext())
    reasons = {skip.target: skip.reason for skip in result.skipped}
    assert "read inside an If/Loop body" in reasons["Relu_0"] and "subgraph" in reasons["If_1"]
    x = np.array([[-1.0, 2.0, -3.0, 4.0]] * 2, np.float32)
    model_out = result.model if result.changes else model
    onnx.checker.check_model(model_out, full_check=True)
    np.testing.assert_array_equal(run(model_out, {"c": np.array(True), "x": x})[0], -np.maximum(x, 0))


@pytest.mark.parametrize("body", ["s = Shape (x)\n c = ConstantOfShape <value = float[1] {2.5}> (s)\n y = Mul (x, c)", "y = Softmax (x)"])
def test_bfloat16_never_writes_a_model_onnxruntime_cannot_load(body: str) -> None:
    """ConstantOfShape admits no bfloat16 at opset 17 (its value must stay float); onnxruntime expands a
    Softmax into ops it has no bfloat16 kernel for, named after none of the model's nodes."""
    model = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[2, 4] x) => (float[2, 4] y) {{ {body} }}""")
    result = Fp16(dtype="bfloat16").run(infer_shapes(model, "test"), PassContext())
    if result.changes:
        onnx.checker.check_model(result.model, full_check=True)
        run(result.model, {"x": np.ones((2, 4), np.float32)})
    else:
        assert result.skipped and result.skipped[0].target == "model"


def test_float16_weights_of_a_store_held_model_stay_external(rng: np.random.Generator, tmp_path) -> None:
    from onnxsparse import optimize

    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 512] x) => (float[N, 512] y) { y = MatMul (x, w) }""")
    with_initializers(model, w=rng.standard_normal((512, 512)).astype(np.float32))
    onnx.save_model(model, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    optimize(tmp_path / "model.onnx", tmp_path / "half.onnx", "fp16")
    written = onnx.load(tmp_path / "half.onnx", load_external_data=False)
    [weight] = written.graph.initializer
    assert weight.data_type == onnx.TensorProto.FLOAT16 and weight.data_location == onnx.TensorProto.EXTERNAL
    assert (tmp_path / "half.onnx").stat().st_size < 4096

