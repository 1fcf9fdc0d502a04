"""sparse-encode: smaller files that load in onnxruntime with identical outputs, and read back dense."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, bundled_inputs, run

from onnxsparse import load, optimize
from onnxsparse.cli import main
from onnxsparse.errors import ModelLoadError, PipelineSpecError
from onnxsparse.io import check_model, load_with_info
from onnxsparse.pipeline import PassManager
from onnxsparse.spec import parse_pipeline

PRUNE_90 = "fold-batchnorm,magnitude-prune{sparsity=0.9}"


@pytest.fixture(scope="module")
def pruned_and_encoded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sparse")
    dense, sparse = folder / "dense.onnx", folder / "sparse.onnx"
    optimize(MODELS / "digits_cnn.onnx", dense, PRUNE_90, policy="keep")
    report = optimize(MODELS / "digits_cnn.onnx", sparse, PRUNE_90 + ",sparse-encode{format=coo}", policy="keep")
    return dense, sparse, report


def test_ninety_percent_pruned_and_encoded_is_under_0_31x_and_computes_the_same(pruned_and_encoded):
    dense, sparse, report = pruned_and_encoded
    assert sparse.stat().st_size <= 0.31 * dense.stat().st_size
    written = onnx.load(sparse)
    assert len(written.graph.sparse_initializer) == 6  # the six pruned weights; biases stay dense
    assert all(s.indices.data_type == onnx.TensorProto.INT64 for s in written.graph.sparse_initializer)
    onnx.checker.check_model(written)  # the structural checker validates sparse tensors (int64, sorted, unique)
    check_model(written, "sparse.onnx")  # ... and our full check of the densified twin
    feed = bundled_inputs("digits_cnn")
    np.testing.assert_allclose(run(sparse, feed)[0], run(dense, feed)[0], rtol=0, atol=1e-6)
    assert report.steps[-1].figures["bytes_saved"] > 0 and report.standard


def test_reading_it_back_gives_the_dense_pruned_weights(pruned_and_encoded):
    dense, sparse, _ = pruned_and_encoded
    reread, info = load_with_info(sparse)
    assert not reread.graph.sparse_initializer and len(info.densified) == 6
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(dense).graph.initializer}
    for tensor in reread.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), expected[tensor.name])


def test_only_tensors_that_get_smaller_are_encoded(tmp_path):
    report = optimize(MODELS / "digits_cnn.onnx", tmp_path / "o.onnx", "fold-batchnorm,magnitude-prune{sparsity=0.3},sparse-encode{format=coo}",
                      policy="keep")
    step = report.steps[-1]
    assert not step.changes  # at 70% density no encoding is smaller than dense float32
    assert not onnx.load(tmp_path / "o.onnx").graph.sparse_initializer


@pytest.mark.parametrize(("min_saving", "encoded"), [(0.0, 6), (0.25, 6), (0.3, 2), (0.4, 0)])
def test_a_tensor_is_encoded_only_when_it_saves_min_saving_of_its_bytes(tmp_path, min_saving, encoded):
    """Half-zero tensors of the digits CNN: encoded, each takes 0.68-0.75x its dense bytes."""
    pipeline = f"fold-batchnorm,magnitude-prune{{sparsity=0.5}},sparse-encode{{format=coo min_saving={min_saving}}}"
    report = optimize(MODELS / "digits_cnn.onnx", tmp_path / "o.onnx", pipeline, policy="keep", keep_worse=True)
    step = report.steps[-1]
    ratios = [c.details["encoded_bytes"] / c.details["dense_bytes"] for c in step.changes]
    assert all(ratio <= 1 - min_saving for ratio in ratios)
    kept = [skip for skip in step.skipped if f"min_saving={min_saving:g}" in skip.reason]
    assert len(ratios) == encoded and len(kept) == 6 - encoded  # every pruned weight is encoded or says why not
    assert len(onnx.load(tmp_path / "o.onnx").graph.sparse_initializer) == len(ratios)
    if ratios:
        assert step.status == "committed"  # packed indices counted as stored: the file is smaller, not worse


def test_int32_indices_are_smaller_or_equal_load_in_onnxruntime_and_are_flagged_non_standard(pruned_and_encoded, tmp_path):
    _, sparse, _ = pruned_and_encoded
    out = tmp_path / "int32.onnx"
    report = optimize(MODELS / "digits_cnn.onnx", out, PRUNE_90 + ",sparse-encode{format=coo index_dtype=int32}", policy="keep")
    assert not report.standard and any("checker" in w for w in report.warnings)
    assert out.stat().st_size <= sparse.stat().st_size
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(onnx.load(out))
    np.testing.assert_allclose(run(out, bundled_inputs("digits_cnn"))[0], run(sparse, bundled_inputs("digits_cnn"))[0], atol=1e-6)


def test_sparse_encode_must_be_last():
    with pytest.raises(PipelineSpecError, match="sparse-encode must be the last pass"):
        PassManager(parse_pipeline("sparse-encode,cleanup"))


def test_inspect_shows_the_bytes_on_disk_and_densify_writes_a_plain_file(pruned_and_encoded, tmp_path, capsys):
    dense, sparse, _ = pruned_and_encoded
    assert main(["inspect", str(sparse)]) == 0
    assert "sparse on disk" in capsys.readouterr().out
    plain = tmp_path / "plain.onnx"
    assert main(["densify", str(sparse), "-o", str(plain)]) == 0
    assert "6 sparse tensor(s) densified" in capsys.readouterr().out
    assert not onnx.load(plain).graph.sparse_initializer
    onnx.checker.check_model(str(plain), full_check=True)
    np.testing.assert_array_equal(run(plain, bundled_inputs("digits_cnn"))[0], run(dense, bundled_inputs("digits_cnn"))[0])


def test_a_sparse_file_whose_indices_are_corrupt_is_a_load_error(pruned_and_encoded, tmp_path):
    _, sparse, _ = pruned_and_encoded
    model = onnx.load(sparse)
    indices = model.graph.sparse_initializer[0].indices
    values = onnx.numpy_helper.to_array(indices)[::-1].copy()  # unsorted
    indices.CopyFrom(onnx.numpy_helper.from_array(values, indices.name))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="not sorted, unique"):
        load(broken)


# -- the bit-mask encoding (bitmask.py) -----------------------------------------------------------

PRUNE_50 = "fold-batchnorm,magnitude-prune{sparsity=0.5}"


@pytest.fixture(scope="module")
def half_pruned(tmp_path_factory):
    """The digits CNN pruned to half its weights: dense, and written with each encoding."""
    folder = tmp_path_factory.mktemp("mask")
    files = {"dense": folder / "dense.onnx"}
    optimize(MODELS / "digits_cnn.onnx", files["dense"], PRUNE_50, policy="keep")
    reports = {}
    for encoding in ("mask", "coo", "auto"):
        files[encoding] = folder / f"{encoding}.onnx"
        reports[encoding] = optimize(MODELS / "digits_cnn.onnx", files[encoding], f"{PRUNE_50},sparse-encode{{format={encoding}}}", policy="keep")
    return files, reports


def _optimized_by_onnxruntime(path, tmp_path):
    """The model as onnxruntime's basic level (constant folding) leaves it when it makes a session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def test_half_zero_weights_take_about_half_their_bytes_as_masks_and_onnxruntime_folds_them_back(half_pruned, tmp_path):
    files, reports = half_pruned
    step = reports["mask"].steps[-1]
    encoded = {c.target: c.details for c in step.changes}
    assert {details["format"] for details in encoded.values()} == {"mask"}
    # what onnxruntime holds while it folds the chains at load is stated (24 bytes per float32 element, by its estimate)
    assert step.figures["load_fold_bytes"] == 24 * sum(int(np.prod(t.dims)) for t in onnx.load(files["dense"]).graph.initializer
                                                       if t.name in encoded)
    assert any("onnxruntime holds about" in warning for warning in step.warnings)
    # a 16x16x3x3 convolution (9 KB): a bit per weight and half the values (0.53x), and the chain's
    # nodes, under a kilobyte (coo: 0.68x)
    conv = encoded["block.conv1.weight"]
    assert conv["encoded_bytes"] <= 0.55 * conv["dense_bytes"] + 1024
    written = onnx.load(files["mask"])
    onnx.checker.check_model(written, full_check=True)
    assert {"BitShift", "CumSum", "Gather"} <= {n.op_type for n in written.graph.node}
    feed = bundled_inputs("digits_cnn")
    np.testing.assert_array_equal(run(files["mask"], feed)[0], run(files["dense"], feed)[0])
    # onnxruntime folds every chain at load: its graph is the dense model's, with the same weights
    folded, plain = _optimized_by_onnxruntime(files["mask"], tmp_path), _optimized_by_onnxruntime(files["dense"], tmp_path)
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in plain.graph.node]
    plain_weights = {t.name: onnx.numpy_helper.to_array(t) for t in plain.graph.initializer}
    for name in encoded:
        folded_weight = next(t for t in folded.graph.initializer if t.name == name)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(folded_weight), plain_weights[name])


def test_a_mask_encoded_file_reads_back_as_the_dense_weights_and_densifies(half_pruned, tmp_path, capsys):
    files, reports = half_pruned
    encoded = [c.target for c in reports["mask"].steps[-1].changes]
    reread, info = load_with_info(files["mask"])
    assert sorted(info.densified) == sorted(encoded)
    assert not any("onnxsparse_mask" in name for node in reread.graph.node for name in [*node.input, *node.output])
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(files["dense"]).graph.initializer}
    assert sorted(t.name for t in reread.graph.initializer) == sorted(expected)
    for tensor in reread.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), expected[tensor.name])
    summaries = []
    for name in ("mask", "dense"):
        assert main(["inspect", str(files[name])]) == 0
        summaries.append(capsys.readouterr().out.splitlines()[1])
    assert summaries[0] == summaries[1]  # "14 nodes, 5,834 parameters (2,970 non-zero, ...)": the weights, not their parts
    plain = tmp_path / "plain.onnx"
    assert main(["densify", str(files["mask"]), "-o", str(plain)]) == 0
    assert f"{len(encoded)} sparse tensor(s) densified" in capsys.readouterr().out
    assert [n.op_type for n in onnx.load(plain).graph.node] == [n.op_type for n in onnx.load(files["dense"]).graph.node]


def test_auto_takes_the_smaller_encoding_of_each_tensor_and_the_default_is_coo(half_pruned, tmp_path):
    files, reports = half_pruned
    default = optimize(MODELS / "digits_cnn.onnx", tmp_path / "default.onnx", f"{PRUNE_50},sparse-encode", policy="keep").steps[-1]
    assert {c.details["format"] for c in default.changes} == {"coo"}  # a mask costs memory at load: asked for, not given
    sizes = {encoding: files[encoding].stat().st_size for encoding in ("mask", "coo", "auto")}
    assert sizes["auto"] <= min(sizes["mask"], sizes["coo"]) < files["dense"].stat().st_size
    formats = {c.details["format"] for c in reports["auto"].steps[-1].changes}
    assert formats == {"mask", "coo"}  # the convolutions as masks, the small tensors (a mask chain costs ~1 KB of names) as coo


def test_a_mask_chain_that_is_not_ours_is_a_load_error_naming_the_tensor(half_pruned, tmp_path):
    files, _ = half_pruned
    model = onnx.load(files["mask"])
    mod = next(n for n in model.graph.node if n.op_type == "Mod")
    mod.op_type = "Div"
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match=r"broken.onnx: tensor '.*': its mask-decoding nodes are not the chain onnxsparse writes"):
        load(broken)


def test_below_opset_11_a_mask_cannot_be_written_and_auto_writes_coo(tmp_path):
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model("""
        <ir_version: 5, opset_import: ["" : 10]>
        g (float[N, 64] x) => (float[N, 64] y) { y = MatMul(x, w) }""")
    weight = rng.standard_normal((64, 64)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.9] = 0
    model.graph.initializer.append(onnx.numpy_helper.from_array(weight, "w"))
    source = tmp_path / "old.onnx"
    source.write_bytes(model.SerializeToString())
    masked = optimize(source, tmp_path / "mask.onnx", "sparse-encode{format=mask}", dims={"N": 2}, policy="keep")
    assert not masked.steps[-1].changes and any("opset 10 is below 11" in w for w in masked.steps[-1].warnings)
    auto = optimize(source, tmp_path / "auto.onnx", "sparse-encode{format=auto}", dims={"N": 2}, policy="keep")
    assert [c.details["format"] for c in auto.steps[-1].changes] == ["coo"]


def _identity_model(tmp_path, weight: np.ndarray | onnx.TensorProto, opset: int = 17, name: str = "m.onnx"):
    """y = Cast(w) to float: a model whose one output is its weight."""
    tensor = weight if isinstance(weight, onnx.TensorProto) else onnx.numpy_helper.from_array(weight, "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Cast", ["w"], ["y"], to=onnx.TensorProto.FLOAT)], "g", [],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(tensor.dims))], [tensor])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def _uint4(values: np.ndarray) -> onnx.TensorProto:
    return onnx.helper.make_tensor("w", onnx.TensorProto.UINT4, list(values.shape), values.reshape(-1).tolist())


def test_four_bit_tensors_are_masks_and_only_where_the_opset_casts_them(tmp_path):
    """onnxruntime cannot densify a sparse_initializer of packed 4-bit values, so a 4-bit tensor is a
    mask or stays dense, however sparse; its chain's Casts need opset 21."""
    rng = np.random.default_rng(0)
    values = rng.integers(1, 16, (64, 512)).astype(np.uint8)
    values[rng.random(values.shape) < 0.985] = 0
    report = optimize(_identity_model(tmp_path, _uint4(values), 21), tmp_path / "out.onnx", "sparse-encode{format=auto}", policy="keep")
    assert report.steps[-1].status == "committed" and [c.details["format"] for c in report.steps[-1].changes] == ["mask"]
    np.testing.assert_array_equal(run(tmp_path / "out.onnx", {})[0], values.astype(np.float32))
    from onnxsparse.bitmask import encodable

    assert encodable(onnx.TensorProto.FLOAT, 11) and not encodable(onnx.TensorProto.FLOAT, 10)
    assert encodable(onnx.TensorProto.UINT4, 21) and not encodable(onnx.TensorProto.INT4, 20)  # a model with int4 blocks at 17
    assert not encodable(onnx.TensorProto.BFLOAT16, 12)  # Gather takes bfloat16 from 13


def test_auto_takes_a_mask_where_the_smaller_coo_would_not_fit_the_message(tmp_path, monkeypatch):
    monkeypatch.setattr("onnxsparse.passes.sparse_encode.EXTERNAL_DATA_THRESHOLD_BYTES", 1000)
    weight = np.zeros((256, 256), np.float32)
    weight[::40, ::40] = 1.0  # 0.06% non-zero: coo is the smaller, but over the (patched) message budget
    report = optimize(_identity_model(tmp_path, weight), tmp_path / "out.onnx", "sparse-encode{format=auto}", policy="keep")
    assert [c.details["format"] for c in report.steps[-1].changes] == ["mask"]


def test_negative_zeros_are_kept(tmp_path):
    weight = np.zeros(64, np.float32)
    weight[1], weight[5] = -0.0, 2.0
    for encoding in ("mask", "coo"):
        out = tmp_path / f"{encoding}.onnx"
        optimize(_identity_model(tmp_path, weight), out, f"sparse-encode{{format={encoding} min_saving=0}}", policy="keep")
        assert np.signbit(run(out, {})[0][1]) and np.signbit(onnx.numpy_helper.to_array(load(out).graph.initializer[0])[1])


def test_at_70_percent_density_masks_save_what_coo_cannot(tmp_path):
    """The digits CNN pruned to 30%: as masks its 9 KB convolutions save ~0.2 (over the default 0.1 a
    mask must save); as coo nothing gets smaller (coo must save 0.25 by default)."""
    pipeline = "fold-batchnorm,magnitude-prune{sparsity=0.3},sparse-encode"
    masked = optimize(MODELS / "digits_cnn.onnx", tmp_path / "mask.onnx", pipeline + "{format=mask}", policy="keep").steps[-1]
    coo = optimize(MODELS / "digits_cnn.onnx", tmp_path / "coo.onnx", pipeline + "{format=coo}", policy="keep").steps[-1]
    assert masked.changes and all(c.details["encoded_bytes"] <= 0.9 * c.details["dense_bytes"] for c in masked.changes)
    assert not coo.changes


@pytest.mark.parametrize("tamper", ["shift left", "exclusive cumsum", "float shape", "int64 mask"])
def test_a_chain_that_would_fold_to_other_weights_is_a_load_error_not_a_crash(half_pruned, tmp_path, tamper):
    """A decoder that read other weights than onnxruntime folds would report what the file does not
    run: every node, attribute and constant of a chain must be what onnxsparse writes."""
    files, _ = half_pruned
    model = onnx.load(files["mask"])
    nodes = {n.op_type: n for n in model.graph.node}
    tensors = {t.name: t for t in model.graph.initializer}
    if tamper == "shift left":
        nodes["BitShift"].attribute[0].s = b"LEFT"
    elif tamper == "exclusive cumsum":
        nodes["CumSum"].attribute.append(onnx.helper.make_attribute("exclusive", 1))
    else:
        part = "onnxsparse_mask/0/shape" if tamper == "float shape" else "onnxsparse_mask/0/mask"
        tensors[part].CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensors[part]).astype(np.float32 if "shape" in part
                                                                                                                 else np.int64), part))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="broken.onnx: tensor '"):
        load(broken)


def test_a_chain_in_another_node_order_and_a_plain_node_named_like_one_still_load(half_pruned, tmp_path):
    import onnx_graphsurgeon as gs

    files, _ = half_pruned
    model = onnx.load(files["mask"])
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(model)
    nodes = list(shuffled.graph.node)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(nodes[::-1])  # not topological: only the order load reads them in
    resorted = gs.export_onnx(gs.import_onnx(shuffled).toposort())
    path = tmp_path / "resorted.onnx"
    path.write_bytes(resorted.SerializeToString())
    assert sorted(load_with_info(path)[1].densified) == sorted(load_with_info(files["mask"])[1].densified)
    plain = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y) { m = Relu(x) y = Neg(m) }""")
    plain.graph.node[0].output[0] = plain.graph.node[1].input[0] = "onnxsparse_mask/0/1"
    named = tmp_path / "named.onnx"
    named.write_bytes(plain.SerializeToString())
    assert [n.op_type for n in load(named).graph.node] == ["Relu", "Neg"]


def test_masked_int8_weights_fold_before_onnxruntime_fuses_the_int8_kernels(tmp_path):
    """Constant folding (basic level) runs before the QDQ fusions (extended level): an int8 model
    whose int8 weights are masks runs the same fused kernels, with the same outputs."""
    import collections

    import onnxruntime as ort

    from onnxsparse.validation import Tolerance, Tolerances

    loose = Tolerances(per_pass={"magnitude-prune": Tolerance(min_cosine=0.0), "qdq": Tolerance(min_cosine=0.0)})
    pipeline = "fold-batchnorm,magnitude-prune{sparsity=0.5},qdq{mode=static never_slower=false}"
    calibration = str(MODELS / "digits_cnn.calibration.npz")
    plain, masked = tmp_path / "int8.onnx", tmp_path / "masked.onnx"
    optimize(MODELS / "digits_cnn.onnx", plain, pipeline, calibration=calibration, tolerances=loose, policy="keep", keep_worse=True)
    report = optimize(MODELS / "digits_cnn.onnx", masked, pipeline + ",sparse-encode{format=mask min_saving=0}", calibration=calibration,
                      tolerances=loose, policy="keep", keep_worse=True)
    encoded = {t.name: t.data_type for t in onnx.load(plain).graph.initializer if t.name in {c.target for c in report.steps[-1].changes}}
    # the two 16x16x3x3 convolutions' int8 weights (the others are too small to pay for a chain)
    assert len(encoded) == 2 and set(encoded.values()) == {onnx.TensorProto.INT8}

    def fused(path):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
        outputs = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, bundled_inputs("digits_cnn"))
        return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node), outputs[0]

    (plain_ops, plain_out), (masked_ops, masked_out) = fused(plain), fused(masked)
    assert plain_ops["QLinearConv"] == 5 and masked_ops == plain_ops
    np.testing.assert_array_equal(masked_out, plain_out)
