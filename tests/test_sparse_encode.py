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
    report = optimize(MODELS / "digits_cnn.onnx", sparse, PRUNE_90 + ",sparse-encode", policy="keep")
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
    report = optimize(MODELS / "digits_cnn.onnx", tmp_path / "o.onnx", "fold-batchnorm,magnitude-prune{sparsity=0.3},sparse-encode", policy="keep")
    step = report.steps[-1]
    assert not step.changes  # at 70% density no encoding is smaller than dense float32
    assert not onnx.load(tmp_path / "o.onnx").graph.sparse_initializer


@pytest.mark.parametrize(("min_saving", "encoded"), [(0.0, 6), (0.25, 6), (0.3, 2), (0.4, 0)])
def test_a_tensor_is_encoded_only_when_it_saves_min_saving_of_its_bytes(tmp_path, min_saving, encoded):
    """Half-zero tensors of the digits CNN: encoded, each takes 0.68-0.75x its dense bytes."""
    pipeline = f"fold-batchnorm,magnitude-prune{{sparsity=0.5}},sparse-encode{{min_saving={min_saving}}}"
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
    report = optimize(MODELS / "digits_cnn.onnx", out, PRUNE_90 + ",sparse-encode{index_dtype=int32}", policy="keep")
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
