"""cleanup and fold-batchnorm on graphs built in code: outputs before/after in onnxruntime, the checker."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import conv_bn_model, parse, run, with_initializers

from onnxsparse.passes import PassContext
from onnxsparse.passes.cleanup import Cleanup
from onnxsparse.passes.fold_batchnorm import FoldBatchNorm
from onnxsparse.pipeline import clone


def _apply(pass_, model: onnx.ModelProto):
    result = pass_.run(clone(model), PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    return result


# ------------------------------------------------------------------------------ cleanup

DEAD_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[2, 3] x) => (float[2, 3] y) <float[2, 3] used, float[2, 3] unused, float[2, 3] only_dead> {
    a = Add (x, used)
    dead = Mul (x, only_dead)
    dead2 = Relu (dead)
    y = Relu (a)
}
"""


def test_cleanup_removes_dead_nodes_unused_initializers_and_value_info(rng):
    model = with_initializers(
        onnx.parser.parse_model(DEAD_TEXT.replace("<float[2, 3] used, float[2, 3] unused, float[2, 3] only_dead>", "")),
        used=rng.standard_normal((2, 3)).astype(np.float32),
        unused=rng.standard_normal((2, 3)).astype(np.float32),
        only_dead=rng.standard_normal((2, 3)).astype(np.float32),
    )
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("dead2", onnx.TensorProto.FLOAT, [2, 3]))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [2, 3]))
    feed = {"x": rng.standard_normal((2, 3)).astype(np.float32)}

    result = _apply(Cleanup(), model)

    assert [n.op_type for n in result.model.graph.node] == ["Add", "Relu"]
    assert [t.name for t in result.model.graph.initializer] == ["used"]
    assert [v.name for v in result.model.graph.value_info] == ["a"]
    assert result.figures["nodes_removed"] == 2 and result.figures["initializers_removed"] == 2
    np.testing.assert_array_equal(run(result.model, feed)[0], run(model, feed)[0])


IF_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (bool cond, float[3] x) => (float[3] y) {
    w = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
    unused_const = Constant <value = float[3] {9.0, 9.0, 9.0}> ()
    y = If (cond) <
        then_branch = then_graph () => (float[3] t) { dead_inside = Neg (x)  t = Mul (x, w) },
        else_branch = else_graph () => (float[3] e) { e = Add (x, w) }
    >
}
"""


def test_cleanup_keeps_outer_names_read_inside_subgraphs_and_cleans_the_subgraphs():
    model = parse(IF_TEXT)
    result = _apply(Cleanup(), model)
    graph = result.model.graph
    assert [n.output[0] for n in graph.node] == ["w", "y"]  # the captured Constant stays, the unused goes
    then_branch = graph.node[1].attribute[0].g
    assert [n.op_type for n in then_branch.node] == ["Mul"]
    x = np.array([1, -2, 3], np.float32)
    for cond in (True, False):
        feed = {"cond": np.array(cond), "x": x}
        np.testing.assert_array_equal(run(result.model, feed)[0], run(model, feed)[0])


def test_cleanup_drops_initializers_listed_as_graph_inputs_when_unused(rng):
    model = onnx.parser.parse_model(DEAD_TEXT.replace("<float[2, 3] used, float[2, 3] unused, float[2, 3] only_dead>", ""))
    with_initializers(model, used=np.ones((2, 3), np.float32), unused=np.ones((2, 3), np.float32), only_dead=np.ones((2, 3), np.float32))
    for name in ("used", "unused"):  # IR < 4 style: initializers doubling as graph inputs
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [2, 3]))
    result = _apply(Cleanup(), model)
    assert [i.name for i in result.model.graph.input] == ["x", "used"]


# ------------------------------------------------------------------------------ fold-batchnorm


def test_fold_batchnorm_folds_conv_and_gemm_exactly(rng):
    model = conv_bn_model(rng)
    feed = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}

    result = _apply(FoldBatchNorm(), model)

    ops = [n.op_type for n in result.model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 1 and ops.count("Gemm") == 1
    gemm = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    assert onnx.helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "beta")) == 1.0
    expected, folded = run(model, feed)[0], run(result.model, feed)[0]
    assert np.max(np.abs(folded - expected)) <= 1e-5 * np.max(np.abs(expected))
    assert len(result.changes) == 2 and not result.skipped


def test_fold_batchnorm_never_writes_into_a_weight_shared_with_another_node(rng):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y, float[1, 2, 4, 4] z) {
        c = Conv (x, w)
        y = BatchNormalization (c, g, b, m, v)
        z = Conv (x, w)
    }
    """
    model = with_initializers(
        onnx.parser.parse_model(text),
        w=rng.standard_normal((2, 2, 1, 1)).astype(np.float32), g=np.array([2.0, 3.0], np.float32),
        b=np.array([0.5, -1.0], np.float32), m=np.array([0.1, 0.2], np.float32), v=np.array([1.0, 4.0], np.float32),
    )
    feed = {"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)}
    result = _apply(FoldBatchNorm(), model)
    after, before = run(result.model, feed), run(model, feed)
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    names = [t.name for t in result.model.graph.initializer]
    assert "w" in names and len(set(names)) == len(names)


def test_fold_batchnorm_skips_with_a_reason_when_the_conv_output_is_read_elsewhere(rng):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y, float[1, 2, 4, 4] c) {
        c = Conv (x, w)
        y = BatchNormalization (c, g, b, m, v)
    }
    """
    model = with_initializers(
        onnx.parser.parse_model(text),
        w=np.ones((2, 2, 1, 1), np.float32), g=np.ones(2, np.float32), b=np.zeros(2, np.float32),
        m=np.zeros(2, np.float32), v=np.ones(2, np.float32),
    )
    result = FoldBatchNorm().run(clone(model), PassContext())
    assert result.model is not None and not result.changes
    assert len(result.skipped) == 1 and "read elsewhere" in result.skipped[0].reason


def test_fold_batchnorm_reads_weights_from_constant_nodes(rng):
    model = conv_bn_model(rng)
    # Move the conv weight into a Constant node, as paddle2onnx exports do.
    weight = next(t for t in model.graph.initializer if t.name == "w")
    model.graph.initializer.remove(weight)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["w"], value=weight))
    feed = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    result = _apply(FoldBatchNorm(), model)
    assert [n.op_type for n in result.model.graph.node].count("BatchNormalization") == 0
    expected = run(model, feed)[0]
    assert np.max(np.abs(run(result.model, feed)[0] - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_fold_batchnorm_keeps_a_float16_weight_float16(rng):
    # (onnxruntime's CPU provider has no double Conv, so float16 is the other dtype to prove.)
    dtype = np.float16
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float16[1, 2, 4, 4] x) => (float16[1, 2, 4, 4] y) {
        c = Conv (x, w)
        y = BatchNormalization (c, g, b, m, v)
    }
    """
    model = with_initializers(
        onnx.parser.parse_model(text),
        w=rng.standard_normal((2, 2, 1, 1)).astype(dtype), g=np.array([2, 3], dtype), b=np.array([0.5, -1], dtype),
        m=np.array([0.1, 0.2], dtype), v=np.array([1, 4], dtype),
    )
    result = _apply(FoldBatchNorm(), model)
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}
    feed = {"x": rng.standard_normal((1, 2, 4, 4)).astype(dtype)}
    np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], rtol=5e-3, atol=5e-3)


def test_fold_batchnorm_folds_inside_if_subgraphs(rng):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (bool cond, float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y) {
        y = If (cond) <
            then_branch = then_graph () => (float[1, 2, 4, 4] t) { c = Conv (x, w)  t = BatchNormalization (c, g, b, m, v) },
            else_branch = else_graph () => (float[1, 2, 4, 4] e) { e = Identity (x) }
        >
    }
    """
    model = with_initializers(
        onnx.parser.parse_model(text),
        w=rng.standard_normal((2, 2, 1, 1)).astype(np.float32), g=np.array([2.0, 3.0], np.float32),
        b=np.array([0.5, -1.0], np.float32), m=np.array([0.1, 0.2], np.float32), v=np.array([1.0, 4.0], np.float32),
    )
    result = _apply(FoldBatchNorm(), model)
    then_branch = result.model.graph.node[0].attribute[0].g
    assert [n.op_type for n in then_branch.node] == ["Conv"]
    feed = {"cond": np.array(True), "x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-6)
