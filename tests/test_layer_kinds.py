"""layers.py: one registry of what each layer op means for its weight; every analysis asks it, and a
new op is taught there once."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run

from onnxsparse import layers
from onnxsparse.graph import to_gs
from onnxsparse.layers import LayerKind, layer_kind, register_layer
from onnxsparse.passes.magnitude import MagnitudePrune
from onnxsparse.pipeline import PassManager
from onnxsparse.weights import find_weights

LAYER_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4, 6, 6] x, float[1, 12] v, float[2, 1, 5] s) => (float[1, 8, 4, 4] c, float[1, 4, 8, 8] t, float[1, 3] ge, float[5, 1] gt,
                                                               float[1, 7] m, float[2, 1, 1, 6] h) {
    c = Conv <group = 2> (x, conv_w, conv_b)
    t = ConvTranspose (x, convt_w)
    ge = Gemm <transB = 1> (v, gemm_w, gemm_b)
    gt = Gemm <transA = 1> (gemm_a, v_col)
    m = MatMul (v, matmul_w)
    h = LSTM <hidden_size = 6, direction = "bidirectional"> (s, lstm_w, lstm_r)
    v_col = Transpose <perm = [1, 0]> (v)
}
"""


def layer_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(LAYER_MODEL)
    rng = np.random.default_rng(0)
    shapes = {"conv_w": (8, 2, 3, 3), "conv_b": (8,), "convt_w": (4, 4, 3, 3), "gemm_w": (3, 12), "gemm_b": (3,), "gemm_a": (12, 5),
              "matmul_w": (12, 7), "lstm_w": (2, 24, 5), "lstm_r": (2, 24, 6)}
    for name, shape in shapes.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    return model


def test_every_weight_gets_its_ops_axes_and_no_bias_is_a_weight():
    sites, _ = find_weights(to_gs(layer_model()), layers.layer_ops())
    axes = {site.name: (site.op, site.out_axis, site.reduction_axis) for site in sites}
    assert axes == {
        "conv_w": ("Conv", 0, 1), "convt_w": ("ConvTranspose", 1, 0),
        "gemm_w": ("Gemm", 0, 1),  # transB: [N, K]
        "gemm_a": ("Gemm", 1, 0),  # a constant A with transA: [K, M]
        "matmul_w": ("MatMul", 1, 0), "lstm_w": ("LSTM", 1, 2), "lstm_r": ("LSTM", 1, 2),
    }
    assert layer_kind("Conv").groups({"group": 2}) == 2 and layer_kind("Gemm").groups({"group": 2}) == 1
    assert layer_kind("Gemm").activation({"transA": 1}, 1) == (0, 0) and layer_kind("MatMul").activation({}, 1) == (0, -1)
    assert layer_kind("Relu") is None


FUSED_MATMUL = """
<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
g (float[4, 16] x) => (float[4, 8] y) {
    y = com.microsoft.FusedMatMul <transB = 1, alpha = 1.0> (x, w)
}
"""


def _fused_matmul_axes(attrs, index, rank):  # type: ignore[no-untyped-def]
    if index == 1 and rank == 2:
        return (0, 1) if attrs.get("transB", 0) else (1, 0)
    return None


def test_an_op_taught_in_the_registry_is_pruned_like_the_built_in_ones(monkeypatch):
    """onnxruntime's FusedMatMul (com.microsoft) with transB: one registration, and magnitude-prune
    finds its weight with the right axes and prunes it per row of outputs."""
    monkeypatch.setattr(layers, "_KINDS", dict(layers._KINDS))  # the registration ends with the test
    register_layer(LayerKind("FusedMatMul", _fused_matmul_axes, lambda attrs, index: (0, -1) if index == 1 else None))
    model = onnx.parser.parse_model(FUSED_MATMUL)
    weight = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(weight, "w"))
    (site,), _ = find_weights(to_gs(model), layers.layer_ops())
    assert (site.op, site.out_axis, site.reduction_axis) == ("FusedMatMul", 0, 1)
    pruned, report = PassManager([MagnitudePrune(sparsity=0.5, include=("FusedMatMul",), scope="per-row")], policy="keep").run(model)
    assert report.steps[0].status in ("committed", "kept-failing") and [c.target for c in report.steps[0].changes] == ["w"]
    values = onnx.numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "w"))
    assert (np.count_nonzero(values, axis=1) == 8).all()  # half of each output's 16 weights, per row of outputs
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_allclose(run(pruned, {"x": x})[0], x @ values.T, rtol=1e-5, atol=1e-5)


def test_without_the_registration_the_op_is_no_weight():
    model = onnx.parser.parse_model(FUSED_MATMUL)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((8, 16), np.float32), "w"))
    assert find_weights(to_gs(model), layers.layer_ops()) == ([], [])


@pytest.mark.parametrize("op", layers.WEIGHT_OPS + layers.RNN_OPS)
def test_the_default_ops_are_registered(op):
    assert layer_kind(op) is not None
