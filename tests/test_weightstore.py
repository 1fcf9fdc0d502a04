"""Models with external data stay external through a run: the weight store (weightstore.py) takes the
input's data in, memory-maps what passes read, keeps what they write, and onnxruntime and the checker
read models by path. A run over such a model gives the same model as over its one-file twin, and no
message in between ever holds its weights (protobuf cannot hold more than 2 GB)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, run
from onnx import external_data_helper

import onnxsparse
from onnxsparse import graph, io, weightstore
from onnxsparse.errors import ExternalDataError
from onnxsparse.files import WEIGHTS_PREFIX
from onnxsparse.weightstore import WeightStore

CNN_JOB = "fold-batchnorm,channel-prune{ratio=0.25 round_to=4 refit=true never_slower=false},qdq{mode=static}"


def external_copy(name: str, folder: Path) -> Path:
    """A bundled model saved with its tensors of 1 KiB or more in external data (onnx's default)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    onnx.save(onnx.load(MODELS / f"{name}.onnx"), path, save_as_external_data=True, location=f"{name}.onnx.data", size_threshold=1024)
    return path


def weights_of(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(path)  # reads the external data
    return {t.name: onnx.numpy_helper.to_array(t) for g in [model.graph] for t in g.initializer}


def optimize_both(tmp_path: Path, name: str, pipeline: str, **options: object) -> tuple[Path, Path]:
    """The same run over the one-file model and over its external-data twin."""
    inputs, calibration = MODELS / f"{name}.inputs.npz", MODELS / f"{name}.calibration.npz"
    (tmp_path / "one").mkdir()
    onefile = tmp_path / "one" / "out.onnx"
    onnxsparse.optimize(MODELS / f"{name}.onnx", onefile, pipeline, inputs=inputs, calibration=calibration, keep_worse=True, **options)
    (tmp_path / "ext").mkdir()
    external = tmp_path / "ext" / "out.onnx"
    onnxsparse.optimize(external_copy(name, tmp_path / "in"), external, pipeline, inputs=inputs, calibration=calibration, keep_worse=True, **options)
    return onefile, external


@pytest.mark.parametrize(("name", "pipeline"), [
    ("digits_cnn", CNN_JOB),
    ("digits_transformer", "magnitude-prune{sparsity=0.5},qdq{mode=dynamic}"),
])
def test_a_run_over_external_data_writes_the_same_model_as_over_one_file(tmp_path, name, pipeline):
    onefile, external = optimize_both(tmp_path, name, pipeline)
    assert weights_of(external).keys() == weights_of(onefile).keys()
    for tensor, values in weights_of(onefile).items():
        np.testing.assert_array_equal(weights_of(external)[tensor], values, err_msg=tensor)
    stored = onnx.load(external, load_external_data=False)
    assert any(external_data_helper.uses_external_data(t) for t in stored.graph.initializer)
    assert (external.parent / "out.onnx.data").is_file()
    feed = {"input": np.load(MODELS / f"{name}.inputs.npz")["input"][:8]}
    np.testing.assert_array_equal(run(external, feed)[0], run(onefile, feed)[0])
    # the store is gone: nothing but the outputs beside them
    assert sorted(p.name for p in external.parent.iterdir()) == ["out.onnx", "out.onnx.data"]


def mlp_with_external_data(folder: Path) -> Path:
    """x -> MatMul 256x256 -> Relu -> MatMul 256x256 -> Relu -> MatMul 256x10, weights (256 KiB each) in external data."""
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 256] x) => (float[N, 10] y) {
            a = MatMul(x, w1)
            b = Relu(a)
            c = MatMul(b, w2)
            d = Relu(c)
            y = MatMul(d, w3)
        }""")
    for name, shape in (("w1", (256, 256)), ("w2", (256, 256)), ("w3", (256, 10))):
        model.graph.initializer.append(onnx.numpy_helper.from_array((rng.standard_normal(shape) / 16).astype(np.float32), name))
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "mlp.onnx", save_as_external_data=True, location="mlp.onnx.data", size_threshold=1024)
    return folder / "mlp.onnx"


def test_no_message_holds_the_weights_during_a_run(tmp_path, monkeypatch):
    """Every model onnxruntime or the checker gets is a small file; its weights stay in the store."""
    source = mlp_with_external_data(tmp_path / "in")
    weights_bytes = (tmp_path / "in" / "mlp.onnx.data").stat().st_size
    sizes: list[int] = []
    opened = WeightStore.model_file

    def recording(self: WeightStore, model: onnx.ModelProto):  # type: ignore[no-untyped-def]
        sizes.append(model.ByteSize())
        return opened(self, model)

    monkeypatch.setattr(WeightStore, "model_file", recording)
    onnxsparse.optimize(source, tmp_path / "out.onnx", "magnitude-prune{sparsity=0.5},qdq{mode=dynamic}", dims={"N": 4}, keep_worse=True)
    assert len(sizes) >= 5  # the checks and sessions of the original, the pruned and the quantized model
    assert max(sizes) < weights_bytes / 20, (max(sizes), weights_bytes)
    written = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert all(external_data_helper.uses_external_data(t) for t in written.graph.initializer if t.name.endswith("_weight_quantized"))


def test_untouched_weights_go_back_out_by_reference(tmp_path):
    """A pass that reads every weight and changes none writes nothing into the store."""
    source = external_copy("digits_transformer", tmp_path / "in")
    with WeightStore(tmp_path) as store:
        model = io.load(source, weights=store)
        imported = graph.to_gs(model)
        mapped = [c for c in graph._constants(imported) if isinstance(c._values, graph.MappedValues)]
        assert len(mapped) == sum(external_data_helper.uses_external_data(t) for t in model.graph.initializer) > 0
        read = [c.values for c in mapped]
        assert all(isinstance(v, graph.StoredArray) and not v.flags.writeable for v in read)
        exported = graph.from_gs(imported, like=model)
        assert not list(store.folder.glob("*.written.data"))
        assert sorted(t.name for t in exported.graph.initializer if external_data_helper.uses_external_data(t)) == sorted(
            t.name for t in model.graph.initializer if external_data_helper.uses_external_data(t))
        # a new weight goes into the store, not into the message
        first = max(mapped, key=lambda c: c.values.nbytes)
        first.values = np.asarray(first.values) * 2
        changed = graph.from_gs(imported, like=model)
        tensor = next(t for t in changed.graph.initializer if t.name == first.name)
        assert external_data_helper.uses_external_data(tensor)
        np.testing.assert_array_equal(graph.tensor_array(tensor), first.values)
    assert not store.folder.exists()


def test_store_held_tensors_are_read_only_maps_and_need_their_store(tmp_path):
    source = external_copy("digits_transformer", tmp_path / "in")
    with WeightStore(tmp_path) as store:
        model = io.load(source, weights=store)
        big = max(model.graph.initializer, key=weightstore.data_bytes)
        values = graph.tensor_array(big)
        assert isinstance(values, np.memmap)  # mapped, not read into memory
        with pytest.raises(ValueError, match="read-only"):
            values[...] = 0
        np.testing.assert_array_equal(values, weights_of(source)[big.name])
        weightstore.release_pages(values)  # its pages leave this process; a read maps them back
        np.testing.assert_array_equal(values, weights_of(source)[big.name])
    with pytest.raises(ExternalDataError, match="no open weight store"):
        graph.tensor_array(big)


def test_inspect_and_validate_read_external_data_in_place(tmp_path, capsys):
    from onnxsparse.cli import main

    source = external_copy("digits_transformer", tmp_path / "in")
    assert main(["inspect", str(source)]) == 0
    external_text = capsys.readouterr().out
    assert main(["inspect", str(MODELS / "digits_transformer.onnx")]) == 0
    onefile_text = capsys.readouterr().out
    # the same tensors, sizes and sparsity (the first line names the file and its size on disk)
    assert external_text.splitlines()[1:] == onefile_text.splitlines()[1:]
    assert main(["validate", str(MODELS / "digits_transformer.onnx"), str(source)]) == 0
    assert "passed" in capsys.readouterr().out
    # their stores (in the temporary folder) are gone
    assert not list(Path(tempfile.gettempdir()).glob(f"{WEIGHTS_PREFIX}{os.getpid()}@*"))


def test_inspect_reads_the_input_data_in_place_without_copying_it(tmp_path, monkeypatch, capsys):
    from onnxsparse.cli import main

    source = external_copy("digits_transformer", tmp_path / "in")
    copies: list[object] = []
    monkeypatch.setattr(weightstore.shutil, "copyfile", lambda *args: copies.append(args))
    assert main(["inspect", str(source)]) == 0
    assert copies == [] and "parameters" in capsys.readouterr().out


def test_a_model_written_with_external_data_aligns_big_tensors_and_keeps_small_ones_inline(tmp_path):
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 512] x) => (float[1, 600] y) {
            h = MatMul(x, w)
            y = Add(h, b)
        }""")
    # b first: the big w then starts past it, where only the alignment can put it on a 64 KiB boundary
    model.graph.initializer.extend([onnx.numpy_helper.from_array(np.ones(600, np.float32), "b"),
                                    onnx.numpy_helper.from_array(rng.standard_normal((512, 600)).astype(np.float32), "w"),
                                    onnx.numpy_helper.from_array(np.ones(4, np.float32), "unused_small")])
    io.save(model, tmp_path / "m.onnx", external_data=True)
    stored = {t.name: t for t in onnx.load(tmp_path / "m.onnx", load_external_data=False).graph.initializer}
    offsets = {name: int({e.key: e.value for e in t.external_data}["offset"]) for name, t in stored.items() if external_data_helper.uses_external_data(t)}
    assert set(offsets) == {"w", "b"}  # 16 bytes stay inline, as onnx's own 1 KiB threshold keeps them
    assert offsets["b"] == 0 and offsets["w"] == 2**16  # a tensor of 1 MiB or more starts on a 64 KiB boundary
    x = rng.standard_normal((1, 512)).astype(np.float32)
    np.testing.assert_allclose(run(tmp_path / "m.onnx", {"x": x})[0], x @ onnx.numpy_helper.to_array(model.graph.initializer[1]) + 1, rtol=1e-4, atol=1e-4)


def test_sparse_encode_spends_a_bounded_share_of_the_message_in_an_external_data_model(tmp_path, monkeypatch):
    """Sparse tensors cannot be external data: in a model whose weights are, sparse-encode stops
    before the .onnx message holds more than its budget of them, and says why for the rest."""
    monkeypatch.setattr("onnxsparse.passes.sparse_encode.SPARSE_MESSAGE_BYTES", 60_000)
    source = mlp_with_external_data(tmp_path / "in")
    report = onnxsparse.optimize(source, tmp_path / "out.onnx", "magnitude-prune{sparsity=0.9},sparse-encode{format=coo}", dims={"N": 4}, keep_worse=True,
                                 policy="keep")
    step = report.steps[-1]
    # 256x256 at 10% density: ~46 KB encoded, so w2 would pass 60 KB; w3 (256x10, ~2 KB) still fits
    assert [c.target for c in step.changes] == ["w1", "w3"]
    assert any(s.target == "w2" and "cannot be external data" in s.reason for s in step.skipped)
    written = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert [s.values.name for s in written.graph.sparse_initializer] == ["w1", "w3"]
    assert external_data_helper.uses_external_data(next(t for t in written.graph.initializer if t.name == "w2"))


def test_mask_encoded_weights_of_an_external_data_model_are_external_data_too(tmp_path):
    """Unlike sparse_initializer, a mask encoding is ordinary initializers: a model whose weights are
    external data keeps its encoded weights there (a model over 2 GB can be encoded), and the file
    computes what the dense pruned one does."""
    source = mlp_with_external_data(tmp_path / "in")
    pruned, encoded = tmp_path / "pruned" / "m.onnx", tmp_path / "encoded" / "m.onnx"
    for target, pipeline in ((pruned, "magnitude-prune{sparsity=0.5}"), (encoded, "magnitude-prune{sparsity=0.5},sparse-encode{format=auto}")):
        target.parent.mkdir()
        onnxsparse.optimize(source, target, pipeline, dims={"N": 4}, policy="keep")
    written = onnx.load(encoded, load_external_data=False)
    external = {t.name for t in written.graph.initializer if external_data_helper.uses_external_data(t)}
    assert {"onnxsparse_mask/0/values", "onnxsparse_mask/1/values"} <= external  # w1 and w2, 256x256
    assert encoded.stat().st_size < 20_000 and not written.graph.sparse_initializer
    data = {folder: sum(f.stat().st_size for f in folder.iterdir()) for folder in (pruned.parent, encoded.parent)}
    assert data[encoded.parent] < 0.6 * data[pruned.parent]
    feed = {"x": np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)}
    np.testing.assert_array_equal(run(encoded, feed)[0], run(pruned, feed)[0])
    with WeightStore(tmp_path) as store:  # read back, the decoded weights go to the store, not into the message
        decoded = {t.name: t for t in io.load(encoded, weights=store).graph.initializer}
        expected = {t.name: onnx.numpy_helper.to_array(t) for t in io.load(pruned).graph.initializer}
        assert sorted(decoded) == sorted(expected) and external_data_helper.uses_external_data(decoded["w2"])
        for name, tensor in decoded.items():
            np.testing.assert_array_equal(graph.tensor_array(tensor), expected[name])


def test_the_input_is_given_out_as_its_own_file_and_a_rewritten_model_copies_only_what_it_reads(tmp_path):
    """onnxruntime gets the input model, unchanged, as the user's own file (no copy of its data); a
    model whose big weights were rewritten (as a quantizer does) gets only the bytes it still reads
    from the input's data, at their offsets in a sparse file; one that reads most of it, all of it."""
    source = mlp_with_external_data(tmp_path / "in")
    data = source.parent / "mlp.onnx.data"
    feed = {"x": np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)}
    expected = run(source, feed)
    with WeightStore(tmp_path) as store:
        model = io.load(source, weights=store)
        with store.model_file(model) as path:
            assert path == source
            np.testing.assert_array_equal(run(path, feed)[0], expected[0])
        assert sorted(store.folder.iterdir()) == []
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(model)
        for index, tensor in enumerate(rewritten.graph.initializer):
            if tensor.name in ("w1", "w2"):  # x0.5 then x2 through a Relu: the same outputs
                values = weightstore.read_external(tensor)
                rewritten.graph.initializer[index].CopyFrom(store.put(values * (0.5 if tensor.name == "w1" else 2.0), tensor.name))
        with store.model_file(rewritten) as path:
            assert path.parent == store.folder
            np.testing.assert_allclose(run(path, feed)[0], expected[0], rtol=1e-6)
        copied = next(f for f in store.folder.iterdir() if f.name.endswith(".input0.data"))
        assert copied.stat().st_size == data.stat().st_size
        assert copied.stat().st_blocks * 512 < data.stat().st_size // 4  # w3's 10 KiB, not w1's and w2's 512 KiB
        shaped = onnx.ModelProto()
        shaped.CopyFrom(model)
        shaped.graph.value_info.add(name="a")  # not the input's message any more, and it reads all of the data
        with store.model_file(shaped) as path:
            assert path.parent == store.folder
            np.testing.assert_array_equal(run(path, feed)[0], expected[0])
        assert copied.stat().st_blocks * 512 >= data.stat().st_size


def test_a_model_whose_data_comes_from_base_dir_is_not_given_out_as_its_file(tmp_path):
    """With base_dir the data is read from another folder than the file's: onnxruntime must get that
    data (the store's copy), not the file's neighbour."""
    source = mlp_with_external_data(tmp_path / "in")
    other = tmp_path / "other"
    other.mkdir()
    data = np.fromfile(source.parent / "mlp.onnx.data", np.uint8)
    (data * 0).tofile(other / "mlp.onnx.data")  # every weight 0.0 there
    feed = {"x": np.ones((2, 256), np.float32)}
    with WeightStore(tmp_path) as store:
        model = io.load(source, base_dir=other, weights=store)
        with store.model_file(model) as path:
            assert path != source
            np.testing.assert_array_equal(run(path, feed)[0], np.zeros((2, 10), np.float32))


def test_a_replaced_weight_goes_into_the_store_at_once(tmp_path):
    """A pass that rewrites every weight holds one new weight at a time, not all of them."""
    from onnxsparse.weights import find_weights, replace_weight

    source = mlp_with_external_data(tmp_path / "in")
    with WeightStore(tmp_path) as store:
        model = io.load(source, weights=store)
        imported = graph.to_gs(model)
        site = next(s for s in find_weights(imported)[0] if s.name == "w1")
        replacement = replace_weight(site, np.asarray(site.value) * 0)
        assert isinstance(replacement._values, graph.MappedValues)  # in the store, not in memory
        assert (store.folder / f"{store.token}.written.data").stat().st_size >= 256 * 256 * 4
        np.testing.assert_array_equal(replacement.values, np.zeros((256, 256), np.float32))
        assert all(use.node.inputs[use.index] is replacement for use in site.uses)


def test_a_dynamic_int8_weight_goes_into_the_store_at_once(tmp_path):
    """qdq{mode=dynamic} holds one int8 weight at a time in memory, not all of them until export."""
    from onnxsparse.passes.qdq.materialize import dynamic_matmul
    from onnxsparse.quantization import WeightScheme

    source = mlp_with_external_data(tmp_path / "in")
    with WeightStore(tmp_path) as store:
        model = io.load(source, weights=store)
        imported = graph.to_gs(model)
        node = next(n for n in imported.nodes if n.op == "MatMul" and n.inputs[1].name == "w1")
        float_weight = np.array(node.inputs[1].values)
        assert dynamic_matmul(imported, node, WeightScheme(), set()) == ""
        integer = next(n for n in imported.nodes if n.op == "MatMulInteger")
        stored = integer.inputs[1]
        assert isinstance(stored._values, graph.MappedValues)  # in the store, not in memory
        scale = next(t for t in imported.tensors().values() if t.name.endswith("_weight_scale")).values
        np.testing.assert_allclose(stored.values * scale, float_weight, atol=float(scale.max()) / 2 + 1e-7)


CONSTANT_NODE_WEIGHT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 256] x) => (float[N, 256] y) {
    w = Constant <value = float[2] {0.0, 0.0}> ()
    y = MatMul (x, w)
}
"""


def test_a_constant_node_weight_in_external_data_is_quantized_and_pruned(tmp_path):
    """paddle2onnx keeps weights in Constant nodes; their values can be external data too."""
    model = onnx.parser.parse_model(CONSTANT_NODE_WEIGHT)
    weight = (np.random.default_rng(0).standard_normal((256, 256)) / 16).astype(np.float32)
    model.graph.node[0].attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(weight, "w"))
    (tmp_path / "in").mkdir()
    onnx.save(model, tmp_path / "in" / "c.onnx", save_as_external_data=True, location="c.onnx.data", size_threshold=1024, convert_attribute=True)
    assert external_data_helper.uses_external_data(onnx.load(tmp_path / "in" / "c.onnx", load_external_data=False).graph.node[0].attribute[0].t)
    report = onnxsparse.optimize(tmp_path / "in" / "c.onnx", tmp_path / "q.onnx", "qdq{mode=dynamic}", dims={"N": 4})
    assert report.steps[0].status == "committed" and report.steps[0].figures["nodes_quantized"] == 1
    report = onnxsparse.optimize(tmp_path / "in" / "c.onnx", tmp_path / "p.onnx", "magnitude-prune{sparsity=0.5}", dims={"N": 4}, policy="keep")
    assert report.steps[0].status in ("committed", "kept-failing") and [c.target for c in report.steps[0].changes] == ["w"]


def test_qdq_raises_the_opset_of_an_external_data_model_for_per_channel_scales(tmp_path):
    rng = np.random.default_rng(0)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "W", "b"], ["h"]), onnx.helper.make_node("Relu", ["h"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 256])], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 256])],
        initializer=[onnx.numpy_helper.from_array((rng.standard_normal((256, 256)) / 16).astype(np.float32), "W"),
                     onnx.numpy_helper.from_array(np.zeros(256, np.float32), "b")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)], ir_version=6)
    (tmp_path / "in").mkdir()
    onnx.save(model, tmp_path / "in" / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    report = onnxsparse.optimize(tmp_path / "in" / "m.onnx", tmp_path / "out.onnx", "qdq{mode=dynamic}", dims={"N": 4})
    assert report.steps[0].status == "committed" and not any("could not be raised" in w for w in report.steps[0].warnings)
    assert report.steps[0].figures["weights"].startswith("per-channel") or "per-channel" in str(report.steps[0].figures["weights"])


def test_a_model_past_2_gb_is_not_written_as_one_file(tmp_path, monkeypatch):
    from onnxsparse.errors import OutputPathError

    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD_BYTES", 100_000)  # the mlp's 0.5 MB then counts as past the limit
    source = mlp_with_external_data(tmp_path / "in")
    with WeightStore(tmp_path) as store:
        model = io.load(source, weights=store)
        with pytest.raises(OutputPathError, match="protobuf's 2 GB limit for one file; write it with external data"):
            io.save(model, tmp_path / "one.onnx", external_data=False)
        io.save(model, tmp_path / "ext.onnx")  # by size: with external data
    assert not (tmp_path / "one.onnx").exists() and (tmp_path / "ext.onnx.data").is_file()


def test_a_killed_runs_weight_store_is_removed_by_the_next_run_and_anothers_left(tmp_path):
    from onnxsparse.files import _host_tag

    dead = tmp_path / f"{WEIGHTS_PREFIX}999999999@{_host_tag()}-abc"  # no such process
    other_host = tmp_path / f"{WEIGHTS_PREFIX}1@another_machine-abc"
    for folder in (dead, other_host):
        folder.mkdir()
        (folder / "w.data").write_bytes(b"x" * 10)
    with WeightStore(tmp_path):
        pass
    assert not dead.exists() and other_host.exists()


def test_densify_into_a_missing_folder_is_bad_input(tmp_path, capsys):
    from onnxsparse.cli import main

    source = external_copy("digits_transformer", tmp_path / "in")
    assert main(["densify", str(source), "-o", str(tmp_path / "missing" / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_data_file_reached_through_a_symlink_in_the_models_folder_loads(tmp_path):
    """The onnx checker refuses such a file by path; the store's copy is checked instead."""
    source = mlp_with_external_data(tmp_path / "in")
    (tmp_path / "in" / "mlp.onnx.data").rename(tmp_path / "in" / "real.data")
    (tmp_path / "in" / "mlp.onnx.data").symlink_to("real.data")
    report = onnxsparse.optimize(source, tmp_path / "out.onnx", "cleanup", dims={"N": 4})
    assert report.final_validation.passed and (tmp_path / "out.onnx.data").is_file()
