"""``weight-only``: block-wise 4/8-bit MatMul weights as onnxruntime's MatMulNBits or a blocked
DequantizeLinear, checked against onnxruntime's own kernels and quantizer."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import bundled, run, with_initializers

from onnxsparse import blockwise
from onnxsparse.blockwise import BlockScheme, clipped_to_least_error, gptq, pack_low_first, round_to_nearest
from onnxsparse.errors import PipelineSpecError
from onnxsparse.passes import PassContext
from onnxsparse.passes.weight_only import WeightOnly
from onnxsparse.pipeline import PassManager
from onnxsparse.spec import parse_pipeline

TWO_LAYERS = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[B, 7, 96] x) => (float[B, 7, 96] y) {
    h = MatMul (x, w1)
    r = Relu (h)
    y = MatMul (r, w2)
}
"""


def parse(text: str, *names: str) -> onnx.ModelProto:
    """A model from ONNX text (checked once its initializers are added), its nodes named in order."""
    model = onnx.parser.parse_model(text)
    for node, name in zip(model.graph.node, names):
        node.name = name
    return model


def _two_layers(rng: np.random.Generator) -> onnx.ModelProto:
    # K = 40 for "down": not a multiple of the block, so its last block is padded
    return with_initializers(parse(TWO_LAYERS, "up", "relu", "down"), w1=(0.1 * rng.standard_normal((96, 40))).astype(np.float32),
                             w2=(0.1 * rng.standard_normal((40, 96))).astype(np.float32))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "n", "block", "ties"), [(100, 24, 32, False), (256, 64, 16, False), (64, 8, 64, False), (128, 16, 32, True)])
def test_round_to_nearest_codes_are_onnxruntimes_quantizer_codes(bits: int, symmetric: bool, k: int, n: int, block: int, ties: bool,
                                                                 rng: np.random.Generator) -> None:
    pybind = pytest.importorskip("onnxruntime.capi._pybind_state")
    quantize = getattr(pybind, f"quantize_matmul_{bits}bits", None)
    if quantize is None:
        pytest.skip(f"this onnxruntime has no quantize_matmul_{bits}bits")
    weight = rng.standard_normal((k, n)).astype(np.float32)
    if ties:  # every weight halfway between two codes of a block whose extreme makes the step exactly 1 (4-bit) or 1/16 (8-bit)
        weight = (rng.integers(-7, 7, (k, n)) + 0.5).astype(np.float32)
        weight[::block] = -8.0
    blocks = -(-k // block)
    packed = np.zeros((n, blocks, block * bits // 8), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, -(-blocks * bits // 8)), np.uint8)
    quantize(packed, weight, scales, zero_points, block, n, k, symmetric)
    ours = round_to_nearest(weight, BlockScheme(bits, block, symmetric))
    assert np.array_equal(pack_low_first(ours.codes, bits), packed)
    assert np.array_equal(ours.scales, scales)
    if not symmetric:  # onnxruntime's padding nibble of an odd count is not read; compare the real ones
        theirs = np.stack([zero_points & 15, zero_points >> 4], -1).reshape(n, -1)[:, :blocks] if bits == 4 else zero_points
        assert np.array_equal(ours.zero_points, theirs)


@pytest.mark.parametrize("spec", ["weight-only", "weight-only{symmetric=false}", "weight-only{bits=8}", "weight-only{method=mse}"])
def test_matmuls_become_matmulnbits_whose_weights_are_the_codes(spec: str, rng: np.random.Generator) -> None:
    model = _two_layers(rng)
    [pass_] = parse_pipeline(spec)
    result = pass_.run(model, PassContext())
    quantized = result.model
    onnx.checker.check_model(quantized, full_check=True)
    assert [(n.op_type, n.domain, n.name) for n in quantized.graph.node] == [
        ("MatMulNBits", "com.microsoft", "up"), ("Relu", "", "relu"), ("MatMulNBits", "com.microsoft", "down")]
    # Fed the identity, each MatMulNBits outputs the weight it stands for: onnxruntime reads our
    # packing, scales and zero points as the codes say.
    for name, node in (("w1", quantized.graph.node[0]), ("w2", quantized.graph.node[2])):
        weight = _weight(model, name)
        single = onnx.helper.make_model(
            onnx.helper.make_graph([node], "one", [onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, [None, weight.shape[0]])],
                                   [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
                                   [t for t in quantized.graph.initializer if t.name in node.input]),
            opset_imports=list(quantized.opset_import), ir_version=quantized.ir_version)
        [dequantized] = run(single, {node.input[0]: np.eye(weight.shape[0], dtype=np.float32)})
        scheme = BlockScheme(pass_.bits, pass_.block, pass_.symmetric)
        codes = clipped_to_least_error(weight, scheme) if pass_.method == "mse" else round_to_nearest(weight, scheme)
        np.testing.assert_allclose(dequantized, codes.dequantized(), rtol=0, atol=1e-6)
        if pass_.method == "rtn":  # within a step (symmetric: the side away from the extreme clamps), half a step
            step = np.abs(codes.scales).max()
            assert np.abs(dequantized - weight).max() <= step * (1.0 if pass_.symmetric else 0.5) + 1e-6
    x = rng.standard_normal((3, 7, 96)).astype(np.float32)
    [output] = run(quantized, {"x": x})
    assert _cosine(run(model, {"x": x})[0], output) > (0.999 if pass_.bits == 8 else 0.98)
    figures = result.figures
    assert figures["tensors_quantized"] == 2 and figures["weight_bytes_before"] == (96 * 40 + 40 * 96) * 4
    # codes for K padded to whole blocks, a float32 scale per block, zero points packed like the codes
    blocks = {"w1": (40, 3), "w2": (96, 2)}
    expected = sum(n * b * (pass_.block * pass_.bits // 8 + 4) + (0 if pass_.symmetric else n * -(-b * pass_.bits // 8))
                   for n, b in blocks.values())
    assert figures["weight_bytes_after"] == expected


def test_qdq_format_is_standard_onnx_that_onnxruntime_fuses_into_matmulnbits(rng: np.random.Generator, tmp_path) -> None:
    model = _two_layers(rng)
    quantized = WeightOnly(format="qdq").run(model, PassContext()).model
    onnx.checker.check_model(quantized, full_check=True)
    assert quantized.opset_import[0].version == 21
    dequantizers = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantizers) == 2 and all({a.name: a.i for a in n.attribute} == {"axis": 0, "block_size": 32} for n in dequantizers)
    types = {t.name: t.data_type for t in quantized.graph.initializer}
    assert types["w1_q4"] == onnx.TensorProto.INT4 and types["w2_q4"] == onnx.TensorProto.INT4
    # the same weights as the MatMulNBits form: unfused, the two models agree to float rounding (fused,
    # onnxruntime runs the pair at accuracy level 4: its session option qdq_matmulnbits_accuracy_level)
    nbits = WeightOnly().run(model, PassContext()).model
    x = rng.standard_normal((3, 7, 96)).astype(np.float32)
    unfused = ort.SessionOptions()
    unfused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    [standard] = ort.InferenceSession(quantized.SerializeToString(), unfused, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(standard, run(nbits, {"x": x})[0], rtol=1e-5, atol=1e-5)
    # onnxruntime runs it as MatMulNBits (a single DequantizeLinear -> MatMul: its fusion skips some
    # MatMuls followed by more layers, a limit of onnxruntime's own selector)
    single = WeightOnly(format="qdq", exclude=("w2",)).run(
        with_initializers(parse(TWO_LAYERS.replace("r = Relu (h)\n    y = MatMul (r, w2)", "y = Relu (h)")
                                .replace("float[B, 7, 96] y", "float[B, 7, 40] y")), w1=_weight(model, "w1")), PassContext()).model
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(single.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node] == ["MatMulNBits", "Relu"]


def test_gptq_moves_the_layer_outputs_less_than_rounding(rng: np.random.Generator) -> None:
    k, n = 128, 48
    weight = rng.standard_normal((k, n)).astype(np.float32)
    mixing = rng.standard_normal((k, k)) * 0.3 + np.eye(k)  # correlated inputs, some much larger than others
    x = (rng.standard_normal((2000, k)) * np.linspace(0.2, 3.0, k)) @ mixing
    held_out = (rng.standard_normal((500, k)) * np.linspace(0.2, 3.0, k)) @ mixing
    scheme = BlockScheme(4, 32, True)
    errors = {}
    for name, codes in (("rtn", round_to_nearest(weight, scheme)), ("gptq", gptq(weight, x.T @ x, scheme))):
        errors[name] = np.linalg.norm(held_out @ (codes.dequantized() - weight)) / np.linalg.norm(held_out @ weight)
    assert errors["gptq"] < 0.8 * errors["rtn"]


def test_mse_never_has_more_weight_error_than_rounding_per_block(rng: np.random.Generator) -> None:
    weight = rng.standard_t(3, size=(160, 24)).astype(np.float32)  # heavy tails: clipping pays
    for symmetric in (True, False):
        scheme = BlockScheme(4, 32, symmetric)
        rtn, mse = round_to_nearest(weight, scheme).dequantized(), clipped_to_least_error(weight, scheme).dequantized()
        per_block = lambda d: (((d - weight) ** 2).reshape(5, 32, 24)).sum(axis=1)
        assert np.all(per_block(mse) <= per_block(rtn) + 1e-9)
        assert per_block(mse).sum() < 0.97 * per_block(rtn).sum()


def test_gptq_in_the_pipeline_needs_calibration_and_beats_rtn_on_held_out_digits() -> None:
    model, inputs, calibration = bundled("digits_transformer")
    drift = {}
    for method in ("rtn", "gptq"):
        manager = PassManager(parse_pipeline(f"weight-only{{method={method} block=16}}"), inputs=inputs, calibration=calibration, policy="keep",
                              keep_worse=True)
        quantized, report = manager.run(model)
        assert report.steps[0].figures["tensors_quantized"] == 7  # every MatMul weight (two MatMuls read activations only)
        assert sum(n.op_type == "MatMulNBits" for n in quantized.graph.node) == 7
        drift[method] = 1 - report.final_validation.outputs[0].cosine
    assert drift["gptq"] < drift["rtn"]
    with pytest.raises(Exception, match="needs calibration"):
        PassManager(parse_pipeline("weight-only{method=gptq}"), inputs=inputs).run(model)


def test_weights_read_otherwise_or_excluded_stay_float_with_the_reason(rng: np.random.Generator) -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (int64[N] ids, float[N, 32] x) => (float[N, 16] y, float[N, 32] e, float[N, 16] z) {
        y = MatMul (x, table_t)
        e = Gather (table, ids)
        t = MatMul (x, w)
        z = Relu (t)
    }
    """
    table = rng.standard_normal((16, 32)).astype(np.float32)
    model = with_initializers(parse(text.replace("table_t", "table2"), "tied", "gather", "kept"), table2=table.T.copy(), table=table,
                              w=rng.standard_normal((32, 16)).astype(np.float32))
    result = WeightOnly(exclude=("kept",)).run(model, PassContext())
    reasons = {skip.target: skip.reason for skip in result.skipped}
    assert reasons["w"] == "excluded" and [c.target for c in result.changes] == ["table2", "table"]
    tied = with_initializers(parse(text.replace("table_t", "shared").replace("Gather (table, ids)", "Gather (shared2, ids)"), "tied", "gather", "kept"),
                             shared=table.T.copy(), shared2=table.T.copy(), w=rng.standard_normal((32, 16)).astype(np.float32))
    tied.graph.node[1].input[0] = "shared"  # the same tensor read by MatMul and by Gather
    result = WeightOnly().run(tied, PassContext())
    reasons = [skip.reason for skip in result.skipped if skip.target == "shared"]
    assert [c.target for c in result.changes] == ["w"]  # the MatMul side and the table side each say why not
    assert "also read by Gather" in reasons[0] and "also read by MatMul" in reasons[1]


def test_gptq_rounds_a_weight_two_matmuls_share_and_says_why(rng: np.random.Generator) -> None:
    from onnxsparse.calibration import IterableInputs

    model = with_initializers(parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 64] x) => (float[N, 32] y) {
        a = MatMul (x, shared)
        b = MatMul (x, shared)
        y = Add (a, b)
    }"""), shared=rng.standard_normal((64, 32)).astype(np.float32))
    feeds = IterableInputs([{"x": rng.standard_normal((8, 64)).astype(np.float32)}])
    result = WeightOnly(method="gptq").run(model, PassContext(calibration=feeds))
    assert [n.op_type for n in result.model.graph.node] == ["MatMulNBits", "MatMulNBits", "Add"]
    assert {s.target: s.reason for s in result.skipped}["shared"] == "gptq: shared by several nodes; rounded to nearest instead"
    assert result.changes[0].details["method"] == "rtn"


@pytest.mark.parametrize(("width", "symmetric", "bits"), [(40, True, 4), (64, False, 4), (40, True, 8), (40, False, 8)])
def test_embedding_tables_become_gatherblockquantized_of_the_same_codes(width: int, symmetric: bool, bits: int, rng: np.random.Generator) -> None:
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (int64[N, 5] ids) => (float[N, 5, {width}] y) {{
        y = Gather <axis = 0> (table, ids)
    }}
    """
    table = rng.standard_normal((50, width)).astype(np.float32)
    model = with_initializers(parse(text, "embed"), table=table)
    result = WeightOnly(symmetric=symmetric, bits=bits).run(model, PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    [node] = result.model.graph.node
    assert (node.op_type, node.domain, node.name) == ("GatherBlockQuantized", "com.microsoft", "embed")
    ids = rng.integers(0, 50, (3, 5))
    [gathered] = run(result.model, {"ids": ids})
    # rows are the output units, each quantized in blocks along its width, as a MatMul weight's columns
    dequantized = round_to_nearest(table.T, BlockScheme(bits, 32, symmetric)).dequantized().T
    np.testing.assert_array_equal(gathered, dequantized[ids])
    assert result.changes[0].action == f"int{bits} embedding table"
    kept = WeightOnly(embeddings=False).run(model, PassContext())
    assert not kept.changes


@pytest.mark.parametrize(("text", "message"), [
    ("weight-only{bits=3}", "bits 3"), ("weight-only{block=24}", "block 24"), ("weight-only{block=8}", "at least 16"),
    ("weight-only{format=qdq accuracy_level=4}", "accuracy_level"), ("weight-only{accuracy_level=5}", "0 to 4"),
    ("weight-only{method=awq}", "not one of"), ("weight-only{blocks=32}", "did you mean"),
])
def test_bad_options_are_refused_when_the_pass_is_built(text: str, message: str) -> None:
    with pytest.raises(PipelineSpecError, match=message):
        parse_pipeline(text)


def test_packing_puts_the_first_code_in_the_low_bits() -> None:
    assert pack_low_first(np.array([[1, 2, 3, 15]], np.uint8), 4).tolist() == [[0x21, 0xF3]]
    assert pack_low_first(np.array([[1, 2, 3, 0]], np.uint8), 2).tolist() == [[0b00111001]]
    assert blockwise.SHRINK_GRID[0] == 1.0


def test_a_store_held_models_int4_codes_stay_external(rng: np.random.Generator, tmp_path) -> None:
    """A model read with external data: its 4-bit codes go to the output's data file, not the message."""
    from onnxsparse import optimize

    model = with_initializers(parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 512] x) => (float[N, 256] y) { y = MatMul (x, w) }"""), w=rng.standard_normal((512, 256)).astype(np.float32))
    weight = _weight(model, "w")  # saving with external data moves it out of ``model``
    onnx.save_model(model, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    optimize(tmp_path / "model.onnx", tmp_path / "out.onnx", "weight-only{format=qdq}", policy="keep")  # random [N, 256] scores flip labels
    written = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    codes = next(t for t in written.graph.initializer if t.data_type == onnx.TensorProto.INT4)
    assert codes.data_location == onnx.TensorProto.EXTERNAL and list(codes.dims) == [512, 256]
    assert (tmp_path / "out.onnx").stat().st_size < 4096  # the 64 KB of codes are not in the message
    x = rng.standard_normal((2, 512)).astype(np.float32)
    expected = x @ round_to_nearest(weight, BlockScheme(4, 32, True)).dequantized()
    assert _cosine(run(tmp_path / "out.onnx", {"x": x})[0], expected) > 0.999  # fused at accuracy level 4: int8 activations


def test_a_table_that_is_also_a_graph_output_stays_float(rng: np.random.Generator) -> None:
    model = with_initializers(parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (int64[N] ids) => (float[N, 64] y, float[50, 64] table) { y = Gather (table, ids) }"""),
        table=rng.standard_normal((50, 64)).astype(np.float32))
    result = WeightOnly().run(model, PassContext())
    assert not result.changes and "also a graph output" in {s.target: s.reason for s in result.skipped}["table"]
