"""simplify: onnxruntime's basic optimizer folds what an exporter computes at run time, on real graphs."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import parse, run, with_initializers

from onnxsparse import optimize
from onnxsparse.graph import op_histogram
from onnxsparse.passes.simplify import Simplify
from onnxsparse.pipeline import PassManager

# The way a torch export pads: the amounts built from Constant nodes, the Pad apart from its Conv,
# an Identity, and a BatchNormalization after the convolution.
EXPORTED = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] x) => (float[N, C, 8, 8] y) {
        zero = Constant <value = int64[1] {0}> ()
        one = Constant <value = int64[1] {1}> ()
        pads = Concat <axis = 0> (zero, zero, one, one, zero, zero, one, one)
        xi = Identity (x)
        p = Pad (xi, pads)
        c = Conv (p, w, b)
        n = BatchNormalization (c, s, bb, m, v)
        y = Relu (n)
    }
"""


def _exported(rng: np.random.Generator, channels: int = 4) -> onnx.ModelProto:
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
              (("w", (channels, 3, 3, 3)), ("b", (channels,)), ("s", (channels,)), ("bb", (channels,)), ("m", (channels,)), ("v", (channels,)))}
    arrays["v"] = np.abs(arrays["v"]) + 0.5
    model = with_initializers(onnx.parser.parse_model(EXPORTED.replace("C,", f"{channels},")), **arrays)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_simplify_folds_the_pad_amounts_into_the_convolution_and_the_batchnorm_into_its_weights(rng):
    model = _exported(rng)
    simplified, report = PassManager([Simplify()]).run(model)
    step = report.steps[0]
    assert step.status == "committed"
    assert op_histogram(simplified) == {"Conv": 1, "Relu": 1}
    conv = next(node for node in simplified.graph.node if node.op_type == "Conv")
    assert [list(a.ints) for a in conv.attribute if a.name == "pads"] == [[1, 1, 1, 1]]
    assert {c.target: c.action for c in step.changes} == {"BatchNormalization": "removed", "Concat": "removed", "Constant": "removed",
                                                         "Identity": "removed", "Pad": "removed"}
    # the input's IR version and opsets, not the nine domains onnxruntime writes
    assert simplified.ir_version == model.ir_version and list(simplified.opset_import) == list(model.opset_import)
    onnx.checker.check_model(simplified, full_check=True)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(simplified, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_simplify_changes_nothing_where_nothing_folds():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { y = Relu (x) }
    """)
    result = Simplify().run(model, context=None)  # type: ignore[arg-type]
    assert not result.changes and "nothing to fold" in result.skipped[0].reason


def test_simplify_keeps_a_model_with_external_data_external(tmp_path, rng):
    model = _exported(rng, channels=64)  # a weight of 6.9 kB: written external
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(model, str(source), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    target = tmp_path / "out" / "model.onnx"
    target.parent.mkdir()
    report = optimize(source, target, "simplify", samples=4, dims={"N": 2})
    assert report.steps[0].status == "committed"
    written = onnx.load(str(target), load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in written.graph.initializer)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(target, {"x": x})[0], run(source, {"x": x})[0], rtol=1e-5, atol=1e-5)
