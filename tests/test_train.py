"""The training engine: ONNX graphs run as torch operations give onnxruntime's outputs, op by op and
on the bundled models, with their weights as named parameters that gradients reach and that are
written back into the same graph."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS, REPO, bundled_inputs, with_initializers

from onnxsparse import load
from onnxsparse.errors import UnsupportedModelError

torch = pytest.importorskip("torch", reason="the training engine's tests need torch: pip install '.[test]'")
from onnxsparse.train.graph_module import GraphModule  # noqa: E402 - after the skip

RNG = np.random.default_rng(0)


def _model(body: str, inputs: str, outputs: str, opset: int = 17, initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        agraph ({inputs}) => ({outputs}) {{
            {body}
        }}
    """)
    with_initializers(model, **(initializers or {}))
    onnx.checker.check_model(model, full_check=True)
    return model


def _ours_and_theirs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    with torch.no_grad():
        outputs = GraphModule(model)(**{name: torch.from_numpy(value) for name, value in feed.items()})
    return [value.numpy() for value in outputs.values()], theirs


def _floats(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# (id, body, inputs, outputs, feed, initializers, opset)
CASES = [
    ("conv 2-D, uneven pads, strides, dilations, groups", "y = Conv <pads = [1, 0, 2, 1], strides = [2, 1], dilations = [1, 2], group = 2> (x, w, b)",
     "float[2, 4, 9, 8] x", "float[2, 6, 5, 7] y", {"x": _floats(2, 4, 9, 8)}, {"w": _floats(6, 2, 3, 2), "b": _floats(6)}, 17),
    ("conv SAME_UPPER", "y = Conv <auto_pad = \"SAME_UPPER\", strides = [2, 2]> (x, w)", "float[1, 3, 7, 6] x", "float[1, 4, 4, 3] y",
     {"x": _floats(1, 3, 7, 6)}, {"w": _floats(4, 3, 3, 3)}, 17),
    ("conv 1-D", "y = Conv <pads = [2, 2]> (x, w, b)", "float[2, 3, 10] x", "float[2, 5, 10] y", {"x": _floats(2, 3, 10)},
     {"w": _floats(5, 3, 5), "b": _floats(5)}, 17),
    ("depthwise conv", "y = Conv <pads = [1, 1, 1, 1], group = 4> (x, w)", "float[1, 4, 6, 6] x", "float[1, 4, 6, 6] y",
     {"x": _floats(1, 4, 6, 6)}, {"w": _floats(4, 1, 3, 3)}, 17),
    ("conv transpose", "y = ConvTranspose <strides = [2, 2], pads = [1, 1, 1, 1], output_padding = [1, 1]> (x, w, b)",
     "float[1, 3, 4, 5] x", "float[1, 2, 8, 10] y", {"x": _floats(1, 3, 4, 5)}, {"w": _floats(3, 2, 3, 3), "b": _floats(2)}, 17),
    ("gemm transB alpha beta", "y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (a, w, c)", "float[3, 4] a", "float[3, 5] y",
     {"a": _floats(3, 4)}, {"w": _floats(5, 4), "c": _floats(5)}, 17),
    ("batched matmul", "y = MatMul (a, b)", "float[2, 3, 4] a, float[4, 6] b", "float[2, 3, 6] y", {"a": _floats(2, 3, 4), "b": _floats(4, 6)}, {}, 17),
    ("element-wise, broadcast", "s = Add (a, b)\n d = Sub (s, a)\n m = Mul (d, b)\n q = Div (m, c)\n p = Pow (q, two)\n y = Sqrt (p)",
     "float[2, 3, 4] a, float[4] b, float[3, 1] c", "float[2, 3, 4] y", {"a": _floats(2, 3, 4), "b": _floats(4), "c": _floats(3, 1) + 3},
     {"two": np.array(2.0, np.float32)}, 17),
    ("activations", ("r = Relu (x)\n s = Sigmoid (r)\n t = Tanh (x)\n e = Erf (t)\n h = HardSwish (x)\n g = HardSigmoid <alpha = 0.3> (h)\n"
     " l = LeakyRelu <alpha = 0.1> (x)\n c = Clip (l, lo, hi)\n a = Add (s, e)\n b = Add (a, g)\n y = Add (b, c)"),
     "float[2, 8] x", "float[2, 8] y", {"x": _floats(2, 8) * 3}, {"lo": np.array(-0.2, np.float32), "hi": np.array(0.7, np.float32)}, 17),
    ("clip before opset 11 (bounds as attributes)", "y = Clip <min = -0.5> (x)", "float[2, 4] x", "float[2, 4] y", {"x": _floats(2, 4)}, {}, 10),
    ("gelu", "y = Gelu <approximate = \"tanh\"> (x)", "float[3, 5] x", "float[3, 5] y", {"x": _floats(3, 5)}, {}, 20),
    ("softmax and log-softmax", "s = Softmax <axis = 1> (x)\n y = LogSoftmax (s)", "float[2, 3, 4] x", "float[2, 3, 4] y", {"x": _floats(2, 3, 4)}, {}, 13),
    ("softmax before opset 13 (flattened)", "y = Softmax <axis = 1> (x)", "float[2, 3, 4] x", "float[2, 3, 4] y", {"x": _floats(2, 3, 4)}, {}, 11),
    ("layer norm", "y = LayerNormalization <axis = -1, epsilon = 1e-5> (x, g, b)", "float[2, 3, 8] x", "float[2, 3, 8] y",
     {"x": _floats(2, 3, 8)}, {"g": _floats(8), "b": _floats(8)}, 17),
    ("batch norm", "y = BatchNormalization <epsilon = 1e-3> (x, g, b, m, v)", "float[2, 3, 4, 4] x", "float[2, 3, 4, 4] y",
     {"x": _floats(2, 3, 4, 4)}, {"g": _floats(3), "b": _floats(3), "m": _floats(3), "v": np.abs(_floats(3)) + 0.5}, 15),
    ("pools", ("g = GlobalAveragePool (x)\n a = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (x)\n"
     " m = MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x)\n c = MaxPool <kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1> (x)\n"
     " y = Add (a, m)"), "float[1, 2, 7, 7] x", "float[1, 2, 1, 1] g, float[1, 2, 4, 4] y, float[1, 2, 4, 4] c", {"x": _floats(1, 2, 7, 7)}, {}, 17),
    ("reshape, flatten, transpose, concat", "r = Reshape (x, shape)\n t = Transpose <perm = [0, 2, 1]> (r)\n f = Flatten <axis = 1> (t)\n y = Concat <axis = 1> (f, f)",
     "float[2, 3, 4] x", "float[2, 24] y", {"x": _floats(2, 3, 4)}, {"shape": np.array([0, 4, -1], np.int64)}, 17),
    ("split by sizes, slice with negative steps", "a, b = Split <axis = 1> (x, sizes)\n y = Slice (b, starts, ends, axes, steps)",
     "float[2, 7, 6] x", "float[2, 3, 3] y", {"x": _floats(2, 7, 6)},
     {"sizes": np.array([3, 4], np.int64), "starts": np.array([-1, 5], np.int64), "ends": np.array([0, -100], np.int64),
      "axes": np.array([1, 2], np.int64), "steps": np.array([-1, -2], np.int64)}, 17),
    ("split into equal parts (opset 18)", "a, b, c = Split <axis = 2, num_outputs = 3> (x)\n y = Concat <axis = 2> (c, a)", "float[2, 3, 8] x",
     "float[2, 3, 5] y", {"x": _floats(2, 3, 8)}, {}, 18),
    ("gather, squeeze, unsqueeze", "g = Gather <axis = 1> (x, idx)\n s = Squeeze (g, one)\n y = Unsqueeze (s, zero)", "float[2, 5, 3] x",
     "float[1, 2, 3] y", {"x": _floats(2, 5, 3)}, {"idx": np.array([-2], np.int64), "one": np.array([1], np.int64), "zero": np.array([0], np.int64)}, 17),
    ("embedding gather of token ids", "y = Gather (table, ids)", "int64[2, 4] ids", "float[2, 4, 6] y",
     {"ids": np.array([[0, 3, 9, 1], [2, 2, 5, 8]], np.int64)}, {"table": _floats(10, 6)}, 17),
    ("shape arithmetic", ("s = Shape (x)\n b = Gather (s, zero)\n u = Unsqueeze (b, axes)\n n = Concat <axis = 0> (u, minus)\n r = Reshape (x, n)\n"
     " c = Cast <to = 7> (b)\n y = ReduceMean <axes = [1], keepdims = 0> (r)"), "float[3, 4, 5] x", "float[3] y", {"x": _floats(3, 4, 5)},
     {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64), "minus": np.array([-1], np.int64)}, 17),
    ("reductions with axes as inputs (opset 18)", "m = ReduceMean <keepdims = 1> (x, ax)\n y = ReduceSum <keepdims = 0> (m, ax)", "float[2, 3, 4] x",
     "float[2, 4] y", {"x": _floats(2, 3, 4)}, {"ax": np.array([1], np.int64)}, 18),
    ("norms and log-sum-exp", ("n = ReduceL2 <keepdims = 1> (x, ax)\n d = Div (x, n)\n l = ReduceL1 <keepdims = 0> (d, ax)\n"
     " q = ReduceSumSquare <keepdims = 0> (d, ax)\n e = ReduceLogSumExp <keepdims = 0> (x, ax)\n a = Add (l, q)\n y = Add (a, e)"),
     "float[2, 3, 4] x", "float[2, 4] y", {"x": _floats(2, 3, 4)}, {"ax": np.array([1], np.int64)}, 18),
    ("lstm, bidirectional", "y, yh, yc = LSTM <hidden_size = 4, direction = \"bidirectional\"> (x, w, r, b, , h0, c0)", "float[5, 2, 3] x",
     "float[5, 2, 2, 4] y, float[2, 2, 4] yh, float[2, 2, 4] yc", {"x": _floats(5, 2, 3)},
     {"w": _floats(2, 16, 3) * 0.5, "r": _floats(2, 16, 4) * 0.5, "b": _floats(2, 32) * 0.1, "h0": _floats(2, 2, 4), "c0": _floats(2, 2, 4)}, 14),
    ("lstm, reverse", "y, yh = LSTM <hidden_size = 4, direction = \"reverse\"> (x, w, r, b)", "float[5, 2, 3] x",
     "float[5, 1, 2, 4] y, float[1, 2, 4] yh", {"x": _floats(5, 2, 3)},
     {"w": _floats(1, 16, 3) * 0.5, "r": _floats(1, 16, 4) * 0.5, "b": _floats(1, 32) * 0.1}, 14),
    ("quantize and dequantize, per tensor and per channel", ("q = QuantizeLinear (x, s, z)\n d = DequantizeLinear (q, s, z)\n"
     " k = DequantizeLinear <axis = 1> (wq, ws)\n y = MatMul (d, k)"), "float[3, 4] x", "float[3, 5] y", {"x": _floats(3, 4) * 2},
     {"s": np.array(0.02, np.float32), "z": np.array(128, np.uint8), "wq": RNG.integers(-127, 128, (4, 5)).astype(np.int8),
      "ws": np.array([0.01, 0.02, 0.03, 0.04, 0.05], np.float32)}, 17),
    ("dynamic quantization and an integer MatMul (qdq's dynamic mode)", ("q, qs, qz = DynamicQuantizeLinear (x)\n"
     " i = MatMulInteger (q, wq, qz, wz)\n f = Cast <to = 1> (i)\n s = Mul (qs, ws)\n y = Mul (f, s)"), "float[3, 4] x", "float[3, 5] y",
     {"x": _floats(3, 4) * 2 + 0.5}, {"wq": RNG.integers(-127, 128, (4, 5)).astype(np.int8), "wz": np.zeros(5, np.int8),
                                      "ws": np.array([0.01, 0.02, 0.03, 0.04, 0.05], np.float32)}, 17),
    ("pad constant and reflect", "p = Pad <mode = \"constant\"> (x, pads, v)\n y = Pad <mode = \"reflect\"> (p, pads)", "float[1, 2, 4, 4] x",
     "float[1, 2, 8, 8] y", {"x": _floats(1, 2, 4, 4)}, {"pads": np.array([0, 0, 1, 0, 0, 0, 1, 2], np.int64), "v": np.array(0.5, np.float32)}, 17),
    ("resize nearest x2 (an upsample)", "y = Resize <mode = \"nearest\", coordinate_transformation_mode = \"asymmetric\", nearest_mode = \"floor\"> (x, , scales)",
     "float[1, 2, 3, 4] x", "float[1, 2, 6, 8] y", {"x": _floats(1, 2, 3, 4)}, {"scales": np.array([1, 1, 2, 2], np.float32)}, 17),
    ("resize linear half_pixel", "y = Resize <mode = \"linear\"> (x, , , sizes)", "float[1, 2, 3, 4] x", "float[1, 2, 5, 7] y",
     {"x": _floats(1, 2, 3, 4)}, {"sizes": np.array([1, 2, 5, 7], np.int64)}, 17),
    ("constant of shape, expand, where, range, tile",
     ("z = ConstantOfShape <value = float[1] {2.0}> (shape)\n e = Expand (b, shape)\n c = Greater (x, e)\n w = Where (c, x, z)\n"
     " r = Range (start, limit, delta)\n t = Tile (w, reps)\n y = Identity (t)"), "float[2, 3] x", "float[2, 6] y, int64[3] r",
     {"x": _floats(2, 3)}, {"shape": np.array([2, 3], np.int64), "b": _floats(3), "start": np.array(1, np.int64), "limit": np.array(7, np.int64),
                             "delta": np.array(2, np.int64), "reps": np.array([1, 2], np.int64)}, 17),
]


@pytest.mark.parametrize("body, inputs, outputs, feed, initializers, opset", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_each_op_gives_onnxruntimes_outputs(body, inputs, outputs, feed, initializers, opset):
    model = _model(body, inputs, outputs, opset, initializers)
    ours, theirs = _ours_and_theirs(model, feed)
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs):
        assert mine.shape == reference.shape and mine.dtype == reference.dtype
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x", [np.zeros((0, 4), np.float32), -np.abs(_floats(3, 4)), np.zeros((3, 4), np.float32)],
                         ids=["empty", "all negative", "all zero"])
def test_dynamic_quantization_picks_onnxruntimes_scale_and_zero_point_at_the_edges(x):
    model = _model("q, s, z = DynamicQuantizeLinear (x)", "float[N, 4] x", "uint8[N, 4] q, float s, uint8 z")
    ours, theirs = _ours_and_theirs(model, {"x": x})
    np.testing.assert_array_equal(ours[0], theirs[0].astype(np.float32))  # the integers, as a float tensor
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6)
    assert ours[2].dtype == theirs[2].dtype and ours[2] == theirs[2]


@pytest.mark.parametrize("name", ["digits_cnn", "digits_transformer"])
def test_the_bundled_models_give_onnxruntimes_outputs(name):
    model = load(MODELS / f"{name}.onnx")
    feed = {model.graph.input[0].name: bundled_inputs(name)["input"][:16]}
    ours, theirs = _ours_and_theirs(model, feed)
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine, reference, rtol=1e-4, atol=1e-4)


def test_weights_are_parameters_named_as_in_the_graph_and_trained_values_are_written_back():
    model = load(MODELS / "digits_cnn.onnx")
    module = GraphModule(model)
    names = dict(module.onnx_parameters())
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1}
    statistics = {n for node in model.graph.node if node.op_type == "BatchNormalization" for n in node.input[3:5]}
    assert set(names) == floats - statistics and names
    untouched = module.write_back()
    assert untouched.SerializeToString() != b"" and [n.name for n in untouched.graph.node] == [n.name for n in model.graph.node]
    for before, after in zip(model.graph.initializer, untouched.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(before), onnx.numpy_helper.to_array(after))
    # one gradient step on a loss of the outputs reaches every parameter and moves the written model
    feed = torch.from_numpy(bundled_inputs("digits_cnn")["input"][:32])
    logits = next(iter(module(feed).values()))
    loss = logits.logsumexp(dim=1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.any(p.grad != 0) for p in names.values())
    with torch.no_grad():
        for parameter in names.values():
            parameter -= 0.05 * parameter.grad
        expected = next(iter(module(feed).values())).numpy()
    trained = module.write_back()
    onnx.checker.check_model(trained, full_check=True)
    assert [(n.name, n.op_type, list(n.input)) for n in trained.graph.node] == [(n.name, n.op_type, list(n.input)) for n in model.graph.node]
    assert trained.opset_import == model.opset_import and trained.ir_version == model.ir_version
    theirs = ort.InferenceSession(trained.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {model.graph.input[0].name: feed.numpy()})[0]
    np.testing.assert_allclose(expected, theirs, rtol=1e-4, atol=1e-4)
    assert not np.allclose(theirs, ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {model.graph.input[0].name: feed.numpy()})[0], atol=1e-3)


def test_constant_node_weights_train_too():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[2, 3] x) => (float[2, 2] y) {
            w = Constant <value = float[3, 2] {1, 2, 3, 4, 5, 6}> ()
            y = MatMul (x, w)
        }
    """)
    module = GraphModule(model)
    assert [name for name, _ in module.onnx_parameters()] == ["w"]
    with torch.no_grad():
        module.constant("w").mul_(2)
    written = module.write_back()
    value = onnx.numpy_helper.to_array(written.graph.node[0].attribute[0].t)
    np.testing.assert_array_equal(value, 2 * np.arange(1, 7, dtype=np.float32).reshape(3, 2))


def test_an_op_without_a_rule_is_an_error_naming_it():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[2, 3] x) => (float[2, 3] y) {
            y = Hardmax <axis = 1> (x)
        }
    """)
    model.graph.node[0].name = "the_hardmax"
    with pytest.raises(UnsupportedModelError, match="node 'the_hardmax': the training engine has no rule for Hardmax"):
        GraphModule(model)


def test_the_core_never_imports_torch():
    code = "import sys, onnxsparse, onnxsparse.cli, onnxsparse.pipeline, onnxsparse.passes, onnxsparse.train; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.real
@pytest.mark.parametrize("name", ["mobilenetv2", "ppocr_rec", "minilm", "mnist", "resnet18", "dwstack", "conv1d_seq", "bytecnn", "detector"])
def test_the_real_models_run_in_the_training_engine_as_in_onnxruntime(name):
    """Every exported real model (tools/fetch_models.py) runs as torch operations with onnxruntime's
    outputs on four eval samples (skipped when the model cache is absent)."""
    sys.path.insert(0, str(REPO / "tools"))
    from realmodels import available_models, cache_dir

    if name not in available_models():
        pytest.skip(f"real model {name!r} is not in the cache {cache_dir()}")
    folder = cache_dir() / name
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    with np.load(folder / "eval.npz") as data:
        feed = {i.name: data[i.name][:4] for i in session.get_inputs()}
    ours, theirs = _ours_and_theirs(load(folder / "model.onnx"), feed)
    for mine, reference in zip(ours, theirs):
        scale = max(float(np.abs(reference).max()), 1.0)
        np.testing.assert_allclose(mine, reference, rtol=0, atol=1e-5 * scale + 3e-4)


def test_gradients_pass_straight_through_quantize_dequantize_inside_the_range():
    """Quantization-aware training: Q/DQ compute onnxruntime's values, and the gradient of DQ(Q(x))
    is 1 where x is inside the integer range and 0 where it saturates."""
    model = _model("q = QuantizeLinear (x, s, z)\n y = DequantizeLinear (q, s, z)", "float[6] x", "float[6] y",
                   initializers={"s": np.array(0.1, np.float32), "z": np.array(0, np.int8)})
    x = torch.tensor([-20.0, -0.26, 0.04, 0.15, 3.3, 20.0], requires_grad=True)
    y = GraphModule(model)(x=x)["y"]
    np.testing.assert_allclose(y.detach().numpy(), [-12.8, -0.3, 0.0, 0.2, 3.3, 12.7], rtol=1e-6)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0, 1, 1, 1, 1, 0])


def _qdq_conv() -> onnx.ModelProto:
    """A QDQ convolution as the qdq pass writes one: uint8 activations, int8 weights with a scale per
    output channel, an int32 bias on the product of the scales."""
    weights = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    weight_scale = (np.abs(weights).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    bias_scale = (weight_scale * 0.02).astype(np.float32)
    return _model("""
        q = QuantizeLinear (x, xs, xz)
        dx = DequantizeLinear (q, xs, xz)
        dw = DequantizeLinear <axis = 0> (wq, ws)
        db = DequantizeLinear <axis = 0> (bq, bs)
        y = Conv <pads = [1, 1, 1, 1]> (dx, dw, db)""", "float[2, 3, 6, 6] x", "float[2, 4, 6, 6] y", initializers={
        "xs": np.array(0.02, np.float32), "xz": np.array(128, np.uint8),
        "wq": np.round(weights / weight_scale[:, None, None, None]).astype(np.int8), "ws": weight_scale,
        "bq": RNG.integers(-300, 300, 4).astype(np.int32), "bs": bias_scale})


def test_quantization_aware_training_trains_integer_weights_on_their_grid_and_writes_back_what_it_ran():
    """With quantized=True the int8 weight and the int32 bias behind DequantizeLinear are parameters
    (their float values), the module gives onnxruntime's outputs, a gradient step moves them, and the
    written model holds integers of the same types, scales untouched, whose onnxruntime outputs are the
    trained module's."""
    model = _qdq_conv()
    feed = {"x": RNG.uniform(-2, 2, (2, 3, 6, 6)).astype(np.float32)}
    assert dict(GraphModule(model).onnx_parameters()) == {}  # without it, integers are buffers
    module = GraphModule(model, quantized=True)
    parameters = dict(module.onnx_parameters())
    assert set(parameters) == {"wq", "bq"}
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    x = torch.from_numpy(feed["x"])
    np.testing.assert_allclose(module(x=x)["y"].detach().numpy(), theirs, rtol=1e-5, atol=1e-5)
    untrained = {t.name: onnx.numpy_helper.to_array(t) for t in module.write_back().graph.initializer}
    for tensor in model.graph.initializer:  # untrained: the same integers
        np.testing.assert_array_equal(untrained[tensor.name], onnx.numpy_helper.to_array(tensor))
    loss = (module(x=x)["y"] - torch.from_numpy(theirs) * 0.5).square().mean()
    loss.backward()
    assert all(torch.any(p.grad != 0) for p in parameters.values())
    with torch.no_grad():
        parameters["wq"] -= 0.05 * parameters["wq"].grad / parameters["wq"].grad.abs().max()
        parameters["bq"] -= 0.5 * parameters["bq"].grad / parameters["bq"].grad.abs().max()
        expected = module(x=x)["y"].numpy()
    trained = module.write_back()
    onnx.checker.check_model(trained, full_check=True)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in trained.graph.initializer}
    assert after["wq"].dtype == np.int8 and after["bq"].dtype == np.int32
    assert not np.array_equal(after["wq"], before["wq"]) and not np.array_equal(after["bq"], before["bq"])
    for name in ("xs", "xz", "ws", "bs"):
        np.testing.assert_array_equal(after[name], before[name])
    got = ort.InferenceSession(trained.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_quantize_dequantize_pair_runs_as_one_fake_quantization_with_the_pairs_values_and_gradients():
    """A QuantizeLinear read only by DequantizeLinear (per channel here) runs fused: onnxruntime's
    values, gradient 1 inside the integer range and 0 where it saturates, as the two ops' own rules
    give it. A QuantizeLinear whose integers are also a graph output stays unfused."""
    from onnxsparse.train.graph_module import _fused_quantizations

    scale, zero = np.array([0.05, 0.2, 0.01], np.float32), np.array([10, -3, 0], np.int8)
    pair = _model("q = QuantizeLinear <axis = 1> (x, s, z)\n y = DequantizeLinear <axis = 1> (q, s, z)", "float[4, 3, 5] x", "float[4, 3, 5] y",
                  initializers={"s": scale, "z": zero})
    both = _model("q = QuantizeLinear <axis = 1> (x, s, z)\n y = DequantizeLinear <axis = 1> (q, s, z)", "float[4, 3, 5] x",
                  "int8[4, 3, 5] q, float[4, 3, 5] y", initializers={"s": scale, "z": zero})
    assert _fused_quantizations(pair.graph) == {"q"} and _fused_quantizations(both.graph) == set()
    x = RNG.uniform(-8, 8, (4, 3, 5)).astype(np.float32)
    for model in (pair, both):
        ours, theirs = _ours_and_theirs(model, {"x": x})
        for mine, reference in zip(ours, theirs):
            np.testing.assert_allclose(mine, reference, rtol=1e-6, atol=1e-6)
    gradients = []
    for model in (pair, both):
        tensor = torch.from_numpy(x).requires_grad_(True)
        GraphModule(model)(x=tensor)["y"].sum().backward()
        gradients.append(tensor.grad.numpy())
    np.testing.assert_array_equal(gradients[0], gradients[1])
    integers = np.round(x / scale[:, None]) + zero[:, None]
    np.testing.assert_array_equal(gradients[0], ((integers >= -128) & (integers <= 127)).astype(np.float32))
    assert 0 < gradients[0].mean() < 1  # both sides of the range are in the data


# -- the distill pass ---------------------------------------------------------------------------


def _distilled(spec: str, name: str = "digits_cnn", *, inputs: bool = True, calibration: bool = True, **options):
    """``spec`` run on a bundled model with its validation inputs and calibration data (either left
    out on request), worse steps kept; ``options`` go to the PassManager (policy keep unless given)."""
    from onnxsparse.calibration import resolve_inputs
    from onnxsparse.pipeline import PassManager
    from onnxsparse.spec import parse_pipeline

    model = load(MODELS / f"{name}.onnx")
    manager = PassManager(parse_pipeline(spec), inputs=resolve_inputs(str(MODELS / f"{name}.inputs.npz"), model) if inputs else None,
                          calibration=resolve_inputs(str(MODELS / f"{name}.calibration.npz"), model) if calibration else None,
                          keep_worse=True, **{"policy": "keep", **options})
    return manager.run(model)


def test_distill_after_channel_removal_lowers_the_held_out_loss_and_moves_the_model_toward_the_original():
    """One tiny distillation: the pruned digits CNN trained toward the original on its 64 calibration
    samples. The held-out loss falls, the validation cosine to the original rises, and the written
    model has the student's nodes (names, ops, inputs) with only weight values changed."""
    student, _ = _distilled("channel-prune{ratio=0.5 round_to=1 never_slower=false}")
    trained, report = _distilled("channel-prune{ratio=0.5 round_to=1 never_slower=false},distill{epochs=10 learning_rate=0.001}")
    prune, distill = report.steps
    assert distill.status in ("committed", "kept-failing") and distill.changes[0].action == "distilled"
    assert distill.figures["held_out_loss_after"] < distill.figures["held_out_loss_before"]
    assert distill.validation.outputs[0].cosine > prune.validation.outputs[0].cosine + 0.02
    assert [(n.name, n.op_type, list(n.input)) for n in trained.graph.node] == [(n.name, n.op_type, list(n.input)) for n in student.graph.node]
    changed = [t.name for t, s in zip(trained.graph.initializer, student.graph.initializer)
               if not np.array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(s))]
    assert changed and all(t.dims == s.dims for t, s in zip(trained.graph.initializer, student.graph.initializer))


def test_distill_keeps_pruned_zeros_zero():
    student, _ = _distilled("magnitude-prune{sparsity=0.5}")
    trained, report = _distilled("magnitude-prune{sparsity=0.5},distill{epochs=3 learning_rate=0.001}")
    assert report.steps[1].changes and report.steps[1].changes[0].details["kept_zero"] > 0
    for before, after in zip(student.graph.initializer, trained.graph.initializer):
        zeros = onnx.numpy_helper.to_array(before) == 0
        if zeros.any() and zeros.mean() > 0.2:  # the pruned weights
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(after)[zeros], 0)


def test_distill_after_cluster_trains_the_codebooks_and_scales_and_leaves_the_uint4_indices_as_they_are():
    """A codebook model trains as its float parts (centroids, per-channel scales, biases); its 4-bit
    indices, which torch has no type for, stay fixed, so the file keeps its size."""
    student, clustered = _distilled("cluster{bits=3 min_elements=100}")
    trained, report = _distilled("cluster{bits=3 min_elements=100},distill{epochs=3}")
    distill = report.steps[1]
    assert distill.figures["held_out_loss_after"] < distill.figures["held_out_loss_before"]
    assert distill.validation.outputs[0].cosine > clustered.steps[0].validation.outputs[0].cosine + 0.01
    before = {t.name: t for t in student.graph.initializer}
    indices = [t for t in trained.graph.initializer if t.data_type == onnx.TensorProto.UINT4]
    assert indices and all(t.raw_data == before[t.name].raw_data for t in indices)
    books = [t.name for t in trained.graph.initializer if t.name.endswith("_codebook")
             and not np.array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(before[t.name]))]
    assert books  # the centroids moved


def test_distill_after_qdq_trains_the_integer_weights_on_their_grid():
    """Quantization-aware distillation of a pruned, quantized CNN: the held-out loss falls and the
    validation cosine rises; the written model has the quantized student's nodes, integer weights of
    the same types (some of them changed) and the same scales and zero points."""
    chain = "channel-prune{ratio=0.5 round_to=1 never_slower=false},qdq{mode=static never_slower=false}"
    student, _ = _distilled(chain)
    trained, report = _distilled(chain + ",distill{epochs=10 learning_rate=0.001}")
    quantized, distill = report.steps[1:]
    assert distill.changes and distill.figures["held_out_loss_after"] < distill.figures["held_out_loss_before"]
    assert distill.validation.outputs[0].cosine > quantized.validation.outputs[0].cosine + 0.02
    assert [(n.name, n.op_type, list(n.input)) for n in trained.graph.node] == [(n.name, n.op_type, list(n.input)) for n in student.graph.node]
    before = {t.name: onnx.numpy_helper.to_array(t) for t in student.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in trained.graph.initializer}
    assert {n: a.dtype for n, a in after.items()} == {n: a.dtype for n, a in before.items()}
    integers = [n for n, a in before.items() if a.dtype == np.int8 and a.size > 1]
    assert integers and any(not np.array_equal(after[n], before[n]) for n in integers)
    quantization_parameters = {name for node in student.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                               for name in node.input[1:]}
    for name in quantization_parameters & set(before):
        np.testing.assert_array_equal(after[name], before[name])
    _, no_qat = _distilled(chain + ",distill{epochs=10 learning_rate=0.001 qat=false}")
    assert not no_qat.steps[2].changes and "qat=true" in no_qat.steps[2].skipped[0].reason


def test_distill_after_dynamic_qdq_trains_the_float_parts_around_the_integer_matmuls():
    """qdq's dynamic mode (the one it picks on transformers) writes DynamicQuantizeLinear ->
    MatMulInteger -> scale multiply; distill runs it with the activations' rounding straight through,
    trains the float parts (biases, norms, embeddings) and leaves the int8 weights and their scales
    as they are."""
    chain = "channel-prune{ratio=0.5 round_to=1 never_slower=false},qdq{mode=dynamic never_slower=false}"
    student, quantized = _distilled(chain, "digits_transformer")
    trained, report = _distilled(chain + ",distill{epochs=10 learning_rate=0.001}", "digits_transformer")
    distill = report.steps[2]
    assert any(n.op_type == "MatMulInteger" for n in student.graph.node)
    assert distill.changes and distill.figures["held_out_loss_after"] < distill.figures["held_out_loss_before"]
    assert distill.validation.outputs[0].cosine > quantized.steps[1].validation.outputs[0].cosine
    assert [(n.name, n.op_type, list(n.input)) for n in trained.graph.node] == [(n.name, n.op_type, list(n.input)) for n in student.graph.node]
    before = {t.name: onnx.numpy_helper.to_array(t) for t in student.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in trained.graph.initializer}
    integers = {n.input[1] for n in student.graph.node if n.op_type == "MatMulInteger"}
    scales = [n for n in before if n.endswith("_weight_scale")]
    assert integers and scales and all(np.array_equal(after[n], before[n]) for n in integers | set(scales))
    assert any(not np.array_equal(after[n], before[n]) for n in before)


def test_distill_trains_on_the_samples_of_its_data_option_without_calibration(tmp_path):
    """distill{data=...} reads its training samples from the file it names: the run needs no
    --calibration, and a file that does not exist is an error when the pipeline is built."""
    from onnxsparse.errors import PipelineSpecError
    from onnxsparse.spec import parse_pipeline

    data = tmp_path / "training samples.npz"
    with np.load(MODELS / "digits_cnn.calibration.npz") as archive:
        np.savez(data, **{name: np.flip(archive[name], axis=-1) for name in archive.files})  # other samples than any the run has
    spec = f'magnitude-prune{{sparsity=0.6}},distill{{epochs=5 learning_rate=0.001 data="{data}"}}'
    passes = parse_pipeline(spec)
    assert passes[1].data == str(data) and not passes[1].needs()
    _, report = _distilled(spec, calibration=False)
    distill = report.steps[1]
    assert distill.changes and distill.figures["samples_trained"] + distill.figures["samples_held_out"] == 64
    assert distill.figures["held_out_loss_after"] < distill.figures["held_out_loss_before"]
    with pytest.raises(PipelineSpecError, match="does not exist"):
        parse_pipeline(f'distill{{data="{tmp_path / "missing.npz"}"}}')


def test_augmented_batches_are_flips_crops_jitters_and_mixes_of_the_samples():
    from onnxsparse.train.augment import _bilinear, applicable, augmented

    images = RNG.standard_normal((6, 3, 8, 10)).astype(np.float32)
    tokens = np.arange(12).reshape(6, 2)
    assert applicable(("flip", "crop", "jitter", "mixup"), {"x": images}) == ("flip", "crop", "jitter", "mixup")
    assert applicable(("flip", "mixup"), {"ids": tokens}) == ()  # token ids: no image, nothing to mix
    assert applicable(("flip", "mixup"), {"x": images, "ids": tokens}) == ("flip",)
    flipped = augmented({"x": images}, ("flip",), np.random.default_rng(1))["x"]
    mirrored = [bool(np.array_equal(f, i[..., ::-1])) for f, i in zip(flipped, images)]
    assert all(m or np.array_equal(f, i) for m, f, i in zip(mirrored, flipped, images)) and 0 < sum(mirrored) < 6
    np.testing.assert_allclose(_bilinear(images[0], 8, 10), images[0], rtol=1e-6)  # same size: the image itself
    cropped = augmented({"x": np.full((4, 3, 8, 10), 2.5, np.float32)}, ("crop",), np.random.default_rng(2))["x"]
    np.testing.assert_allclose(cropped, 2.5, rtol=1e-6)  # a flat image stays flat, at its size
    pair = np.stack([np.zeros((3, 8, 10)), np.ones((3, 8, 10))]).astype(np.float32)
    mixed = augmented({"x": pair}, ("mixup",), np.random.default_rng(3))["x"]
    assert mixed.dtype == np.float32 and np.all((mixed >= 0) & (mixed <= 1)) and np.ptp(mixed[0]) < 1e-6
    assert augmented({"x": images}, ("jitter",), np.random.default_rng(4))["x"].shape == images.shape


def test_distill_with_augmentation_trains_on_varied_batches_and_says_what_did_not_apply():
    _, report = _distilled("channel-prune{ratio=0.5 round_to=1 never_slower=false},distill{epochs=5 learning_rate=0.001 augment=flip,mixup}")
    distill = report.steps[1]
    assert distill.figures["augmented"] == ["flip", "mixup"] and distill.changes
    assert distill.figures["held_out_loss_after"] < distill.figures["held_out_loss_before"]
    from onnxsparse.errors import PipelineSpecError
    from onnxsparse.spec import parse_pipeline

    # the digits transformer reads rows of pixels as tokens [N, 8, 8]: nothing to flip, samples to mix
    _, report = _distilled("magnitude-prune{sparsity=0.7},distill{epochs=2 augment=flip,mixup}", "digits_transformer", inputs=False)
    assert report.steps[1].figures["augmented"] == ["mixup"]
    assert [s.reason for s in report.steps[1].skipped if s.target == "augment"] == [
        "flip: no input of the model takes it (images: float [N, C, H, W]; mixup: float inputs only)"]
    with pytest.raises(PipelineSpecError, match="unknown rotate"):
        parse_pipeline("distill{augment=rotate}")


def test_distill_without_torch_says_how_to_get_it(monkeypatch):
    from onnxsparse.errors import RequirementError
    from onnxsparse.train import require_torch

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch then fails
    with pytest.raises(RequirementError, match=r"pip install 'onnxsparse\[train\]'"):
        require_torch()


def test_a_lossy_step_before_distill_is_judged_after_it_kept_when_the_two_hold_and_rolled_back_with_it_when_not():
    """channel-prune breaks the tolerance alone; under the default policy it is no longer rolled back
    before distill runs: the two are judged together. A bound the distilled model meets keeps both
    (the prune 'recovered'); a bound it does not meet rolls both back to the original."""
    from onnxsparse.validation import Tolerance, Tolerances

    spec = "channel-prune{ratio=0.5 round_to=1 never_slower=false},distill{epochs=10 learning_rate=0.001}"
    _, kept = _distilled(spec)  # policy keep: what each step reaches
    pruned_cosine, distilled_cosine = (step.validation.outputs[0].cosine for step in kept.steps)
    assert distilled_cosine > pruned_cosine + 0.02
    model = load(MODELS / "digits_cnn.onnx")

    def run(bound: float):
        return _distilled(spec, policy="rollback", tolerances=Tolerances(default=Tolerance(min_cosine=bound)))

    out, report = run((pruned_cosine + distilled_cosine) / 2)
    assert [s.status for s in report.steps] == ["recovered", "committed"], [(s.status, s.reason) for s in report.steps]
    assert "out of tolerance alone" in report.steps[0].reason and "within it after distill" in report.steps[0].reason
    assert report.final_validation.passed
    assert sum(np.prod(t.dims) for t in out.graph.initializer) < sum(np.prod(t.dims) for t in model.graph.initializer)  # pruned
    out, report = run(0.99)
    assert [s.status for s in report.steps] == ["rolled-back", "rolled-back"], [(s.status, s.reason) for s in report.steps]
    assert "distill did not bring it back within tolerance" in report.steps[0].reason
    assert [(t.name, t.dims) for t in out.graph.initializer] == [(t.name, t.dims) for t in model.graph.initializer]


def test_two_recovery_steps_in_a_row_are_settled_together():
    """prune, distill, distill with a bound only the second distill meets: the first distill does not
    settle the prune (it is pending too); the second keeps all three, and the model written is the
    pruned and twice-distilled one."""
    from onnxsparse.validation import Tolerance, Tolerances

    spec = "channel-prune{ratio=0.5 round_to=1 never_slower=false},distill{epochs=4 learning_rate=0.001},distill{epochs=4 learning_rate=0.001}"
    _, kept = _distilled(spec)  # policy keep: what each step reaches
    cosines = [step.validation.outputs[0].cosine for step in kept.steps]
    assert cosines[0] < cosines[1] < cosines[2], cosines
    model = load(MODELS / "digits_cnn.onnx")
    out, report = _distilled(spec, policy="rollback", tolerances=Tolerances(default=Tolerance(min_cosine=(cosines[1] + cosines[2]) / 2)))
    assert [s.status for s in report.steps] == ["recovered", "recovered", "committed"], [(s.status, s.reason) for s in report.steps]
    assert sum(np.prod(t.dims) for t in out.graph.initializer) < sum(np.prod(t.dims) for t in model.graph.initializer)  # pruned
    assert report.final_validation.passed


def test_distill_holds_out_whole_runs_of_neighbouring_samples():
    """Neighbouring samples are often views of one photo (MobileNetV2's calibration: 8 per photo):
    the held-out share is whole runs of 16, so no photo is both trained on and held out."""
    from onnxsparse.passes.distill import _split

    train, test = _split(384, 77, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(384))
    assert len(test) == 80 and {int(i) // 16 for i in test}.isdisjoint({int(i) // 16 for i in train})
    few_train, few_test = _split(10, 2, seed=0)  # one run only: single samples
    assert len(few_test) == 2 and len(few_train) == 8
