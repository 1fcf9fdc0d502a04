"""Shapes for the passes that need them: onnx's inference, completed in onnxruntime where it cannot."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import with_initializers

from onnxsparse.shapes import infer_shapes


def test_the_shape_probe_records_a_dim_that_follows_an_input_width_as_dynamic() -> None:
    """onnx cannot type a com.microsoft op: its output's shape is observed in onnxruntime, with every
    named input dim moved between two runs. Where the others cannot move (here an Add with a fixed
    width), the probe moves the batch alone."""
    text = """
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    agraph (float[N, W] x) => (float[N, W] y) {{ {body} }}"""
    free = onnx.parser.parse_model(text.format(body="g = com.microsoft.Gelu (x)\n y = Relu (g)"))
    [observed] = [v for v in infer_shapes(free, "test").graph.value_info if v.name == "g"]
    dims = observed.type.tensor_type.shape.dim
    assert len(dims) == 2 and not dims[1].HasField("dim_value")  # the width moves with the input's W: dynamic, not a static 32
    fixed = onnx.parser.parse_model(text.format(body="g = com.microsoft.Gelu (x)\n y = Add (g, c)").replace("float[N, W] y) {", "float[N, W] y) <float[32] c> {"))
    del fixed.graph.initializer[:]
    with_initializers(fixed, c=np.zeros(32, np.float32))
    shaped = infer_shapes(fixed, "test")  # W=64 fails the Add: the batch alone moves
    [g] = [v for v in shaped.graph.value_info if v.name == "g"]
    assert g.type.tensor_type.shape.dim[1].dim_value == 32 and not g.type.tensor_type.shape.dim[0].HasField("dim_value")
