"""magnitude-prune: exact sparsity per scope, N:M groups, where weights live, what is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, bundled, parse, run, with_initializers

from onnxsparse import load
from onnxsparse.calibration import IterableInputs, resolve_inputs
from onnxsparse.errors import PipelineSpecError, RequirementError
from onnxsparse.graph import tensor_array
from onnxsparse.passes import PassContext
from onnxsparse.passes.magnitude import MagnitudePrune, allocate_sparsity
from onnxsparse.pipeline import PassManager, clone
from onnxsparse.spec import parse_pipeline
from onnxsparse.walk import iter_model_graphs


def _prune(model: onnx.ModelProto, context: PassContext | None = None, **options):
    result = MagnitudePrune(**options).run(clone(model), context or PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    return result


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    found = {}
    for graph in iter_model_graphs(model):
        found.update({t.name: tensor_array(t) for t in graph.initializer})
        for node in graph.node:
            if node.op_type == "Constant":
                found[node.output[0]] = tensor_array(node.attribute[0].t)
    return found


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    return load(MODELS / "digits_cnn.onnx")


CONV_WEIGHTS = ("stem.0.weight", "block.conv1.weight", "block.conv2.weight", "depthwise.0.weight", "pointwise.0.weight")


def test_per_tensor_zeroes_exactly_the_target_in_every_weight_and_nothing_else(cnn):
    result = _prune(cnn, sparsity=0.5)
    before, after = _weights(cnn), _weights(result.model)
    for name in (*CONV_WEIGHTS, "fc.weight"):
        assert np.count_nonzero(after[name] == 0) == round(0.5 * after[name].size), name
        kept = after[name] != 0
        np.testing.assert_array_equal(after[name][kept], before[name][kept])  # survivors untouched
        # the zeroed ones are the smallest: every dropped |w| <= every kept |w|
        assert np.abs(before[name][~kept]).max() <= np.abs(before[name][kept]).min()
    for name in after:
        if name not in (*CONV_WEIGHTS, "fc.weight"):
            np.testing.assert_array_equal(after[name], before[name])  # biases, BN parameters
    assert {c.target for c in result.changes} == {*CONV_WEIGHTS, "fc.weight"}
    assert all(c.details["sparsity"] == pytest.approx(0.5, abs=0.01) for c in result.changes)
    assert any("does not make onnxruntime faster" in w for w in result.warnings)
    run(result.model, {"input": np.zeros((1, 1, 8, 8), np.float32)})


def test_per_row_gives_every_output_unit_the_target(cnn):
    after = _weights(_prune(cnn, sparsity=0.25, scope="per-row").model)
    rows = after["block.conv1.weight"].reshape(16, -1)
    assert all(np.count_nonzero(row == 0) == round(0.25 * rows.shape[1]) for row in rows)
    fc = after["fc.weight"]  # Gemm transB=1: [out, in], output units on axis 0
    assert all(np.count_nonzero(row == 0) == round(0.25 * fc.shape[1]) for row in fc)


def test_global_scope_hits_the_target_overall_with_uneven_tensors(cnn):
    result = _prune(cnn, sparsity=0.6, scope="global")
    after = _weights(result.model)
    names = (*CONV_WEIGHTS, "fc.weight")
    total = sum(after[n].size for n in names)
    assert sum(np.count_nonzero(after[n] == 0) for n in names) == round(0.6 * total)
    assert len({round(c.details["sparsity"], 2) for c in result.changes}) > 1


@pytest.mark.parametrize(("trans_b", "axis"), [(0, 0), (1, 1)])
def test_two_four_keeps_exactly_two_of_every_four_along_the_reduction_axis(rng, trans_b, axis):
    shape = (8, 12) if trans_b == 0 else (12, 8)
    model = with_initializers(onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[3, 8] x, float[3, 8, 8] x3) => (float[3, 12] y, float[3, 8, 4] z) {{
        y = Gemm <transB = {trans_b}> (x, w)
        z = MatMul (x3, m)
    }}"""),
        w=rng.standard_normal(shape).astype(np.float32), m=rng.standard_normal((8, 4)).astype(np.float32))
    after = _weights(_prune(model, pattern="2:4").model)
    for name, reduction_axis in (("w", axis), ("m", 0)):
        groups = np.moveaxis(after[name], reduction_axis, -1).reshape(-1, 4)
        assert (np.count_nonzero(groups, axis=1) == 2).all(), name


def test_two_four_on_convolutions_groups_input_channels_and_skips_indivisible_ones(cnn):
    result = _prune(cnn, pattern="2:4")
    after = _weights(result.model)
    groups = np.moveaxis(after["block.conv1.weight"], 1, -1).reshape(-1, 4)
    assert (np.count_nonzero(groups, axis=1) == 2).all()
    skipped = {s.target: s.reason for s in result.skipped}
    assert "not a multiple of 4" in skipped["stem.0.weight"] and "not a multiple of 4" in skipped["depthwise.0.weight"]


def test_selection_options_leave_the_right_tensors_dense(cnn):
    result = _prune(cnn, sparsity=0.5, skip_depthwise=True, skip_first=True, skip_last=True, exclude=("block.conv2.*",),
                    overrides={"pointwise*": 0.25}, min_size=10)
    skipped = {s.target: s.reason for s in result.skipped}
    assert "depthwise" in skipped["depthwise.0.weight"] and "first" in skipped["stem.0.weight"]
    assert "last" in skipped["fc.weight"] and "excluded" in skipped["block.conv2.weight"]
    after = _weights(result.model)
    assert np.count_nonzero(after["pointwise.0.weight"] == 0) == round(0.25 * 512)
    assert np.count_nonzero(after["depthwise.0.weight"] == 0) == 0
    only_gemm = _prune(cnn, sparsity=0.5, include=("Gemm",))
    assert [c.target for c in only_gemm.changes] == ["fc.weight"]


def test_weights_in_constant_nodes_and_if_subgraphs_are_pruned_and_shared_weights_once(rng):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (bool cond, float[2, 4] x) => (float[2, 4] y, float[2, 4] s) {
        w = Constant <value = float[4, 4] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}> ()
        a = MatMul (x, w)
        b = MatMul (a, w)
        s = Identity (b)
        y = If (cond) <
            then_branch = g1 () => (float[2, 4] t) {
                v = Constant <value = float[4, 4] {-1, 2, -3, 4, -5, 6, -7, 8, -9, 10, -11, 12, -13, 14, -15, 16}> ()
                t = MatMul (x, v) },
            else_branch = g2 () => (float[2, 4] e) { e = Identity (x) }
        >
    }""")
    result = _prune(model, sparsity=0.5)
    assert sorted(c.target for c in result.changes) == ["v", "w"]
    after = _weights(result.model)
    np.testing.assert_array_equal(after["w"].reshape(-1)[:8], 0)
    np.testing.assert_array_equal(np.abs(after["v"]).reshape(-1)[:8], 0)
    feed = {"cond": np.array(True), "x": np.ones((2, 4), np.float32)}
    w = np.arange(1, 17, dtype=np.float32).reshape(4, 4) * (np.arange(16).reshape(4, 4) >= 8)
    np.testing.assert_allclose(run(result.model, feed)[1], feed["x"] @ w @ w)


def test_a_weight_also_read_outside_a_weight_role_is_skipped_with_the_reader(rng):
    model = with_initializers(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (int64[3] ids) => (float[3, 8] y, float[3, 8] z) {
        e = Gather (table, ids)
        y = MatMul (e, table2)
        z = MatMul (e, table)
    }"""), table=rng.standard_normal((8, 8)).astype(np.float32), table2=rng.standard_normal((8, 8)).astype(np.float32))
    result = _prune(model, sparsity=0.5)
    skipped = {s.target: s.reason for s in result.skipped}
    assert "Gather" in skipped["table"] and [c.target for c in result.changes] == ["table2"]


def test_wanda_weighs_magnitudes_by_input_activation_norms():
    model = with_initializers(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[4, 2] x) => (float[4, 1] y) { y = MatMul (x, w) }"""), w=np.array([[0.1], [1.0]], np.float32))
    feeds = [{"x": np.array([[100.0, 0.01]] * 4, np.float32)}]
    by_magnitude = _weights(_prune(model, sparsity=0.5).model)["w"]
    by_wanda = _weights(_prune(model, PassContext(calibration=IterableInputs(feeds)), sparsity=0.5, criterion="wanda").model)["w"]
    np.testing.assert_array_equal(by_magnitude, np.array([[0.0], [1.0]], np.float32))
    np.testing.assert_array_equal(by_wanda, np.array([[0.1], [0.0]], np.float32))


def test_wanda_without_calibration_data_is_a_requirement_error(cnn):
    manager = PassManager(parse_pipeline("magnitude-prune{criterion=wanda}"), inputs=resolve_inputs(None, cnn))
    with pytest.raises(RequirementError, match="magnitude-prune needs calibration data"):
        manager.run(cnn)


@pytest.mark.parametrize(("text", "message"), [
    ("magnitude-prune{sparsity=1.0}", "outside [0, 1)"),
    ("magnitude-prune{sparsity=-0.1}", "outside [0, 1)"),
    ("magnitude-prune{pattern=4:2}", "N:M with 0 < N < M"),
    ("magnitude-prune{pattern=blocky}", "not 'unstructured', 'filter' or N:M"),
    ("magnitude-prune{scope=layer}", "not one of per-tensor, per-row, global"),
    ("magnitude-prune{overrides=fc:1.5}", "override fc:1.5 is outside"),
])
def test_bad_options_are_clear_errors(text, message):
    with pytest.raises(PipelineSpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_pipeline(text)


def test_patterns_that_match_nothing_are_reported(cnn):
    result = _prune(cnn, sparsity=0.3, exclude=("no_such_layer*",), overrides={"missing": 0.1})
    assert any("exclude pattern 'no_such_layer*' matched no weight" in w for w in result.warnings)
    assert any("overrides pattern 'missing' matched no weight" in w for w in result.warnings)
    nothing = _prune(cnn, include=("LSTM",))
    assert not nothing.changes and any("matched no weight tensor" in w for w in nothing.warnings)


def test_sensitivity_scope_keeps_the_total_and_spares_the_sensitive_tensors():
    model, _, calibration = bundled("digits_transformer")
    result = _prune(model, PassContext(calibration=calibration), sparsity=0.5, scope="sensitivity")
    scan = result.figures["sensitivity"]
    sizes = {c.target: c.details["size"] for c in result.changes}
    zeros = sum(c.details["sparsity"] * c.details["size"] for c in result.changes)
    assert zeros == pytest.approx(0.5 * sum(sizes.values()), rel=0.01)
    shares = {name: entry["sparsity"] for name, entry in scan.items()}
    assert max(shares.values()) > 0.5 > min(shares.values())
    # per unit of size, the tensor that drifted most alone is pruned least
    most = max(scan, key=lambda n: scan[n]["drift_at_target"] / sizes[n])
    least = min(scan, key=lambda n: scan[n]["drift_at_target"] / sizes[n])
    assert shares[most] <= shares[least]


def test_sparsegpt_sensitivity_probes_each_tensor_with_sparsegpt():
    """The scan prunes each tensor alone the way the pass will: SparseGPT's update repairs most of
    what magnitude pruning alone breaks, so its probes drift less and the allocation follows them."""
    model, _, calibration = bundled("digits_transformer")
    scans = {criterion: _prune(model, PassContext(calibration=calibration), sparsity=0.5, scope="sensitivity",
                               criterion=criterion).figures["sensitivity"]
             for criterion in ("magnitude", "sparsegpt")}
    assert scans["magnitude"].keys() == scans["sparsegpt"].keys()
    lower = [scans["sparsegpt"][n]["drift_at_probe"] < scans["magnitude"][n]["drift_at_probe"] for n in scans["magnitude"]]
    assert sum(lower) >= 0.75 * len(lower)


@pytest.mark.parametrize("bytes_per_pass", [1 << 30, 1])
def test_one_pass_hessians_are_each_layers_input_gram_matrix(monkeypatch, bytes_per_pass):
    """The scan reads every layer's input Hessian XᵀX side by side (in one pass, or one per layer
    when they do not fit the memory bound); each must be that layer's input, as rows, times itself."""
    from onnxsparse import layerwise
    from onnxsparse.activations import tensor_values
    from onnxsparse.graph import overridable_initializers, to_gs
    from onnxsparse.weights import WEIGHT_OPS, find_weights

    monkeypatch.setattr(layerwise, "HESSIAN_BYTES_PER_PASS", bytes_per_pass)
    model, _, calibration = bundled("digits_transformer")
    sites = find_weights(to_gs(model), WEIGHT_OPS, overridable_initializers(model))[0]
    together = layerwise.original_hessians(model, sites, calibration)
    assert set(together) == {site.name for site in sites} and len(sites) >= 8
    names = {site.name: site.uses[0].node.inputs[0].name for site in sites}
    activations: dict[str, list[np.ndarray]] = {}
    for run_values in tensor_values(model, calibration, list(set(names.values()))):
        for name, value in run_values.items():
            activations.setdefault(name, []).append(value)
    for site in sites:  # MatMul and Gemm layers only in this model: rows are the activation's last axis
        x = np.concatenate(activations[names[site.name]]).astype(np.float64)
        rows = x.reshape(-1, x.shape[-1])
        [hessian] = together[site.name]
        exact = rows.T @ rows  # the products are taken in float32, as SparseGPT's reference takes them
        np.testing.assert_allclose(hessian, exact, rtol=1e-5, atol=1e-6 * float(np.abs(exact).max()))


def test_sensitivity_allocation_keeps_the_total_and_spares_sensitive_and_steep_tensors():
    sizes = np.array([1000.0, 1000.0, 1000.0, 50.0])
    targets = np.full(4, 0.5)
    drifts = np.array([0.01, 0.04, 0.01, 0.01])
    exponents = np.array([2.0, 2.0, 6.0, 2.0])
    shares = allocate_sparsity(sizes, targets, drifts, exponents)
    assert float(np.sum(sizes * shares)) == pytest.approx(float(np.sum(sizes * targets)), rel=1e-6)
    assert shares[1] < shares[0]  # four times the drift at the target: pruned less
    assert shares[2] < shares[0]  # same drift at the target but damage climbs steeply: pruned less
    assert shares[3] < shares[0]  # small tensor: little to gain from it
    assert shares.max() <= 0.95


def test_a_tensor_that_does_not_move_the_outputs_at_its_target_is_not_taken_as_free():
    """Already that sparse (or float noise) at the target, but drifting at the probe: modelled through
    the probe, not as zero damage (which sent such a tensor to 0.95)."""
    from onnxsparse.passes.magnitude import _damage_curve

    drift, exponent = _damage_curve(0.5, 0.0, 0.3)
    assert drift > 0.1 and exponent == 2.0  # 0.3 x (0.5 / 0.725)^2 = 0.143
    others = [_damage_curve(0.5, 0.01, 0.03)] * 2
    shares = allocate_sparsity(np.full(3, 1e4), np.full(3, 0.5), np.array([drift] + [d for d, _ in others]),
                               np.array([exponent] + [p for _, p in others]))
    assert shares[0] < shares[1]


def test_data_driven_pruning_analyses_with_shapes_but_writes_the_input_value_info():
    """Wanda infers shapes so its activation caches work, but the written model keeps the value_info it
    came with (digits_cnn has none): an observed dim is not to be written as fixed."""
    model, inputs, calibration = bundled("digits_cnn")
    assert not model.graph.value_info
    final, report = PassManager(parse_pipeline("magnitude-prune{criterion=wanda sparsity=0.5}"), inputs=inputs, calibration=calibration,
                                policy="keep").run(model)
    assert report.steps[0].status in ("committed", "kept-failing") and report.steps[0].changes
    assert not final.graph.value_info


def test_data_driven_pruning_goes_on_where_the_shape_probe_cannot_run(rng):
    """int32 ids through a 2-row table and a com.microsoft Gelu: onnx cannot type the Gelu, and the
    shape probe's synthetic ids fall outside the table. Shapes are a help here, not a need."""
    h, T, nh = onnx.helper, onnx.TensorProto, onnx.numpy_helper
    nodes = [h.make_node("Cast", ["ids"], ["ids64"], name="cast", to=T.INT64), h.make_node("Gather", ["emb", "ids64"], ["e"], name="gather"),
             h.make_node("Gelu", ["e"], ["g"], name="gelu", domain="com.microsoft"), h.make_node("MatMul", ["g", "w"], ["y"], name="mm")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("ids", T.INT32, ["batch", 4])], [h.make_tensor_value_info("y", T.FLOAT, ["batch", 4, 16])],
                         [nh.from_array(rng.standard_normal((2, 16)).astype(np.float32), "emb"), nh.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13), h.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    feeds = [{"ids": np.array([[(i >> b) & 1 for b in range(4)]], np.int32)} for i in range(16)]
    _, report = PassManager(parse_pipeline("magnitude-prune{criterion=wanda sparsity=0.5}"), inputs=IterableInputs(feeds[:6]),
                            calibration=IterableInputs(feeds[6:]), policy="keep", keep_worse=True).run(model)
    assert report.steps[0].status in ("committed", "kept-failing"), report.steps[0].reason
    assert [c.target for c in report.steps[0].changes] == ["w"]
