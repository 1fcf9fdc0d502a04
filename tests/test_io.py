"""onnxsparse.io: loading (bad files, external data, sparse initializers) and atomic, protected saving."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, run, with_initializers
from onnx import external_data_helper, helper, numpy_helper

from onnxsparse import io
from onnxsparse.errors import ExternalDataError, ModelLoadError, OnnxsparseError, OutputPathError
from onnxsparse.graph import tensor_array

CNN = MODELS / "digits_cnn.onnx"

MATMUL_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[2, 16] x) => (float[2, 32] y) {
    y = MatMul (x, w)
}
"""


def matmul_model(rng: np.random.Generator, ir_version: int = 8) -> onnx.ModelProto:
    """x @ w with a 16x32 float weight (2 KiB: above save's 1 KiB external-data threshold)."""
    model = onnx.parser.parse_model(MATMUL_TEXT.replace("ir_version: 8", f"ir_version: {ir_version}"))
    return with_initializers(model, w=rng.standard_normal((16, 32)).astype(np.float32))


def feed(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((2, 16)).astype(np.float32)}


def save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    """onnx.save_model moves the data out of the model it is given: give it a copy."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, location=location, size_threshold=0)


def weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


# ------------------------------------------------------------------------------ plain loading


def test_load_from_path_and_from_bytes_give_the_same_model():
    from_path, from_bytes = io.load(CNN), io.load(CNN.read_bytes())
    assert from_path.SerializeToString() == from_bytes.SerializeToString()
    assert from_path.ir_version == 8
    assert [(o.domain, o.version) for o in from_path.opset_import] == [("", 17)]
    assert len(from_path.graph.node) == 19


def test_load_with_info_reports_the_source_and_its_size():
    _, info = io.load_with_info(CNN)
    assert info.source == str(CNN) and info.file_bytes == CNN.stat().st_size
    assert info.densified == {} and info.external_data_files == []


def test_save_keeps_ir_version_8(tmp_path, rng):
    model = matmul_model(rng)
    io.save(model, tmp_path / "m.onnx")
    reread = io.load(tmp_path / "m.onnx")
    assert reread.ir_version == 8
    assert reread.SerializeToString() == model.SerializeToString()


# ------------------------------------------------------------------------------ bad input


def _load_error(source) -> str:
    with pytest.raises(ModelLoadError) as caught:
        io.load(source)
    assert isinstance(caught.value, OnnxsparseError)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_missing_file_is_a_load_error(tmp_path):
    message = _load_error(tmp_path / "nope.onnx")
    assert "nope.onnx" in message and "no such file" in message


def test_directory_is_a_load_error(tmp_path):
    message = _load_error(tmp_path)
    assert str(tmp_path) in message and "directory" in message


def test_empty_file_is_a_load_error(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    message = _load_error(tmp_path / "empty.onnx")
    assert "empty.onnx" in message and "empty" in message.split(":", 1)[1]


@pytest.mark.parametrize("text", ["hello, this is not a model\n", "# README\n\nSome words.\n", "{}", "\x08\x07"])
def test_text_file_is_a_load_error(tmp_path, text):
    (tmp_path / "notes.onnx").write_text(text)
    message = _load_error(tmp_path / "notes.onnx")
    assert "notes.onnx" in message and "not an ONNX model" in message


def test_truncated_model_is_a_load_error(tmp_path):
    data = CNN.read_bytes()
    (tmp_path / "half.onnx").write_bytes(data[: len(data) // 2])
    message = _load_error(tmp_path / "half.onnx")
    assert "half.onnx" in message and "truncated" in message


def test_model_failing_the_checker_is_a_load_error_naming_the_tensor(tmp_path):
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]> g (float[2] x) => (float[2] y) { y = Add (x, nowhere) }')
    (tmp_path / "bad.onnx").write_bytes(model.SerializeToString())
    message = _load_error(tmp_path / "bad.onnx")
    assert "bad.onnx" in message and "fails the onnx checker" in message
    # the whole checker sentence, not just its first line: the undefined input and the node reading it
    assert "'nowhere'" in message and "Add" in message


# ------------------------------------------------------------------------------ external data


def _externalize(model: onnx.ModelProto, name: str, location: str, offset: int = 0, length: int | None = None) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    size = len(tensor.raw_data) if length is None else length
    external_data_helper.set_external_data(tensor, location, offset=offset, length=size)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL


def test_external_data_inside_the_folder_loads(tmp_path, rng):
    model = matmul_model(rng)
    save_external(model, tmp_path / "m.onnx", "weights.bin")
    loaded, info = io.load_with_info(tmp_path / "m.onnx")
    np.testing.assert_array_equal(weight(loaded, "w"), weight(model, "w"))
    assert info.external_data_files == ["weights.bin"]
    assert not any(external_data_helper.uses_external_data(t) for t in loaded.graph.initializer)


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(tmp_path, rng, where):
    model = matmul_model(rng)
    raw = next(t for t in model.graph.initializer if t.name == "w").raw_data
    (tmp_path / "outside.bin").write_bytes(raw)
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "outside.bin", tmp_path / "sub" / "link.bin")  # inside by name, outside in fact
    location = {"parent": "../outside.bin", "absolute": str(tmp_path / "outside.bin"), "symlink": "link.bin"}[where]
    _externalize(model, "w", location)
    (tmp_path / "sub" / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ExternalDataError, match="outside") as caught:
        io.load(tmp_path / "sub" / "m.onnx")
    assert "'w'" in str(caught.value)


def test_missing_external_file_is_an_external_data_error(tmp_path, rng):
    model = matmul_model(rng)
    _externalize(model, "w", "gone.bin")
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ExternalDataError, match="gone.bin.*missing"):
        io.load(tmp_path / "m.onnx")


@pytest.mark.parametrize(("offset", "length"), [(0, 16 * 32 * 4), (100, 16 * 32 * 4 - 50), (10**6, 4)])
def test_external_range_beyond_the_file_is_an_external_data_error(tmp_path, rng, offset, length):
    model = matmul_model(rng)
    (tmp_path / "short.bin").write_bytes(b"\0" * (16 * 32 * 4 - 8))
    _externalize(model, "w", "short.bin", offset=offset, length=length)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ExternalDataError, match=f"'w' reads bytes {offset}..{offset + length} of 'short.bin'"):
        io.load(tmp_path / "m.onnx")


def test_external_data_from_bytes_needs_base_dir(tmp_path, rng):
    model = matmul_model(rng)
    save_external(model, tmp_path / "m.onnx", "m.data")
    data = (tmp_path / "m.onnx").read_bytes()
    with pytest.raises(ExternalDataError, match="base_dir"):
        io.load(data)
    np.testing.assert_array_equal(weight(io.load(data, base_dir=tmp_path), "w"), weight(model, "w"))


# ------------------------------------------------------------------------------ sparse initializers

DENSE_W = np.array([[0, 1.5, 0], [0, 0, -2]], dtype=np.float32)
ADD_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[2, 3] x) => (float[2, 3] y) {
    y = Add (x, w)
}
"""


@pytest.mark.parametrize("indices", [np.array([1, 5]), np.array([[0, 1], [1, 2]])], ids=["linear", "coordinates"])
def test_sparse_initializer_is_densified(rng, indices):
    model = onnx.parser.parse_model(ADD_TEXT)
    values = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), name="w")
    index_tensor = numpy_helper.from_array(indices.astype(np.int64), name="w_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, index_tensor, [2, 3]))
    x = {"x": rng.standard_normal((2, 3)).astype(np.float32)}

    loaded, info = io.load_with_info(model.SerializeToString())

    assert len(loaded.graph.sparse_initializer) == 0
    np.testing.assert_array_equal(weight(loaded, "w"), DENSE_W)
    assert list(info.densified) == ["w"] and info.densified["w"] > 0
    onnx.checker.check_model(loaded, full_check=True)
    np.testing.assert_array_equal(run(loaded, x)[0], run(model, x)[0])
    np.testing.assert_array_equal(run(loaded, x)[0], x["x"] + DENSE_W)


def test_constant_with_sparse_value_is_densified(rng):
    model = onnx.parser.parse_model(ADD_TEXT)
    values = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), name="w_values")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([1, 5], np.int64), name="i"), [2, 3])
    model.graph.node.insert(0, helper.make_node("Constant", [], ["w"], sparse_value=sparse))
    x = {"x": rng.standard_normal((2, 3)).astype(np.float32)}

    loaded, info = io.load_with_info(model.SerializeToString())

    [attribute] = loaded.graph.node[0].attribute
    assert (attribute.name, attribute.type) == ("value", onnx.AttributeProto.TENSOR)
    np.testing.assert_array_equal(numpy_helper.to_array(attribute.t), DENSE_W)
    assert list(info.densified) == ["w"]
    np.testing.assert_array_equal(run(loaded, x)[0], run(model, x)[0])


@pytest.mark.parametrize(
    ("indices", "values", "problem"),
    [([-1, 5], [1.5, -2.0], "not sorted, unique and within its 6 elements"),
     ([1, 6], [1.5, -2.0], "not sorted, unique and within its 6 elements"),
     ([4, 1], [1.5, -2.0], "not sorted, unique and within its 6 elements"),
     ([[0, 1], [2, 0]], [1.5, -2.0], "coordinates outside its shape [2, 3]"),
     ([0, 1, 2], [5.0], "1 values but indices of shape [3]")],
    ids=["negative", "beyond", "unsorted", "coordinate-beyond", "nnz-mismatch"],
)
def test_malformed_sparse_initializer_is_a_load_error_not_wrong_weights(indices, values, problem):
    model = onnx.parser.parse_model(ADD_TEXT)
    value_tensor = numpy_helper.from_array(np.array(values, np.float32), name="w")
    index_tensor = numpy_helper.from_array(np.array(indices, np.int64), name="w_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(value_tensor, index_tensor, [2, 3]))
    message = _load_error(model.SerializeToString())
    assert "sparse tensor 'w'" in message and problem in message


def test_int32_sparse_indices_load_as_onnxruntime_reads_them():
    model = onnx.parser.parse_model(ADD_TEXT)
    value_tensor = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), name="w")
    index_tensor = numpy_helper.from_array(np.array([1, 5], np.int32), name="w_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(value_tensor, index_tensor, [2, 3]))
    loaded = io.load(model.SerializeToString(), check=False)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), [[0, 1.5, 0], [0, 0, -2.0]])


def test_weights_are_read_only():
    model = io.load(CNN)
    array = tensor_array(model.graph.initializer[0])
    with pytest.raises(ValueError):
        array.reshape(-1)[0] = 1.0


# ------------------------------------------------------------------------------ saving


def _unloadable_models(rng) -> dict[str, onnx.ModelProto]:
    # An op of a custom domain passes the checker and no onnxruntime has a kernel for it (a model in an
    # IR version newer than onnxruntime reads did the same until onnxruntime 1.32 read IR 14).
    unknown_op = with_initializers(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "org.onnxsparse.test" : 1]>
        g (float[2, 16] x) => (float[2, 32] y) <float[16, 32] w> { h = MatMul (x, w)  y = org.onnxsparse.test.Nope (h) }"""),
        w=rng.standard_normal((16, 32)).astype(np.float32))
    broken = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]> g (float[2] x) => (float[2] y) { y = Add (x, nowhere) }')
    return {"onnxruntime": unknown_op, "checker": broken}


@pytest.mark.parametrize("why", ["onnxruntime", "checker"])
@pytest.mark.parametrize("existing", [False, True])
def test_save_that_fails_verification_leaves_the_folder_as_it_was(tmp_path, rng, why, existing):
    target = tmp_path / "out.onnx"
    if existing:
        target.write_bytes(b"previous contents")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OutputPathError, match="out.onnx.*does not verify") as caught:
        io.save(_unloadable_models(rng)[why], target, external_data=why == "onnxruntime")
    assert "\n" not in str(caught.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_save_leaves_no_temporary_files(tmp_path, rng):
    io.save(matmul_model(rng), tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink"])
def test_save_refuses_to_overwrite_the_protected_input(tmp_path, rng, spelling):
    source = tmp_path / "in.onnx"
    source.write_bytes(matmul_model(rng).SerializeToString())
    original = source.read_bytes()
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        os.symlink(source, tmp_path / "link.onnx")
    target = {"same": source, "dotdot": tmp_path / "sub" / ".." / "in.onnx", "symlink": tmp_path / "link.onnx"}[spelling]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(OutputPathError, match="input model"):
        io.save(matmul_model(np.random.default_rng(1)), target, protect=(source,))
    assert source.read_bytes() == original
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_save_to_a_symlink_into_another_folder_writes_at_the_named_path(tmp_path, rng):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "real.onnx").write_bytes(b"old")
    os.symlink(tmp_path / "b" / "real.onnx", tmp_path / "a" / "out.onnx")
    model = matmul_model(rng)
    written = io.save(model, tmp_path / "a" / "out.onnx")
    assert io.load(written).SerializeToString() == model.SerializeToString()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["real.onnx"]  # nothing stray beside the link's target


def test_save_to_another_path_with_protect_writes_it(tmp_path, rng):
    source = tmp_path / "in.onnx"
    source.write_bytes(b"input")
    io.save(matmul_model(rng), tmp_path / "out.onnx", protect=(source,))
    assert source.read_bytes() == b"input" and io.load(tmp_path / "out.onnx").ir_version == 8


def test_save_with_external_data_writes_name_data_and_loads_back_equal(tmp_path, rng):
    model = matmul_model(rng)
    x = feed(rng)
    io.save(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size == 16 * 32 * 4
    stored = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert external_data_helper.uses_external_data(stored.graph.initializer[0])
    loaded, info = io.load_with_info(tmp_path / "m.onnx")
    assert info.external_data_files == ["m.onnx.data"]
    np.testing.assert_array_equal(weight(loaded, "w"), weight(model, "w"))
    np.testing.assert_array_equal(run(tmp_path / "m.onnx", x)[0], run(model, x)[0])


def test_save_with_external_data_does_not_modify_the_callers_model(tmp_path, rng):
    model = matmul_model(rng)
    before = model.SerializeToString()
    io.save(model, tmp_path / "m.onnx", external_data=True)
    assert model.SerializeToString() == before
    assert not external_data_helper.uses_external_data(model.graph.initializer[0])


def test_save_into_a_directory_or_missing_folder_is_an_output_path_error(tmp_path, rng):
    with pytest.raises(OutputPathError, match="directory"):
        io.save(matmul_model(rng), tmp_path)
    with pytest.raises(OutputPathError, match="does not exist"):
        io.save(matmul_model(rng), tmp_path / "missing" / "m.onnx")


def test_saved_model_runs_like_the_original(tmp_path, rng):
    model, x = matmul_model(rng), feed(rng)
    io.save(model, tmp_path / "m.onnx")
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x)[0], x["x"] @ weight(model, "w"), rtol=1e-5, atol=1e-5)


def test_the_first_samples_of_a_feed_with_a_scalar_beside_its_inputs_are_cut_without_it():
    """A version number stored beside the inputs has no row per sample: cutting the first samples
    passes it on whole instead of failing on a 0-d array."""
    from onnxsparse.calibration import FirstSamples, IterableInputs

    feed = {"x": np.arange(20, dtype=np.float32).reshape(10, 2), "labels": np.arange(10), "version": np.array(3)}
    first = list(FirstSamples(IterableInputs([feed]), 4).feeds())
    assert first[0]["x"].shape == (4, 2) and first[0]["labels"].tolist() == [0, 1, 2, 3] and first[0]["version"] == 3
