"""``cluster``: weights from k-means codebooks, stored as uint4/uint8 indices that onnxruntime decodes
(and folds) at load."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import bundled, run, with_initializers

from onnxsparse.codebook import compensated, fit_codebooks, kmeans
from onnxsparse.errors import PipelineSpecError
from onnxsparse.passes import PassContext
from onnxsparse.passes.cluster import Cluster
from onnxsparse.pipeline import PassManager
from onnxsparse.spec import parse_pipeline

CONV_MATMUL = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 8, 6, 6] x) => (float[N, 12] y) <float[16, 8, 3, 3] w, float[16, 12] m> {
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    r = Relu (c)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    y = MatMul (f, m)
}
"""


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    model = onnx.parser.parse_model(CONV_MATMUL)
    del model.graph.initializer[:]
    return with_initializers(model, w=rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
                             m=rng.standard_normal((16, 12)).astype(np.float32))


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_kmeans_puts_levels_where_the_values_are_and_keeps_zeros_exact(rng: np.random.Generator) -> None:
    values = np.concatenate([rng.normal(0, 0.01, 5000), rng.normal(1.0, 0.01, 50), np.zeros(1000)])
    book = kmeans(values, 4)
    assert len(book.centroids) == 4 and 0.0 in book.centroids
    decoded = book.decoded()
    assert np.all(decoded[values == 0] == 0)  # pruned weights stay exactly zero
    assert np.abs(decoded[5000:5050] - 1.0).max() < 0.05  # the far cluster has its own level
    # Lloyd never ends worse than its quantile start, and beats a uniform grid of as many levels
    uniform = np.linspace(values.min(), values.max(), 4)
    uniform_error = np.min(np.abs(values[:, None] - uniform[None]), axis=1) ** 2
    assert np.sum((decoded - values) ** 2) < 0.5 * np.sum(uniform_error)
    few = kmeans(np.array([0.5, -1.0, 0.5, 2.0]), 16)  # fewer distinct values than levels: each is its own
    assert few.centroids.tolist() == [-1.0, 0.5, 2.0] and np.array_equal(few.decoded(), [0.5, -1.0, 0.5, 2.0])
    # importance pulls a centroid toward the values that matter
    weighted = kmeans(np.array([0.0, 1.0, 2.0, 3.0]), 1, np.array([1.0, 1.0, 1.0, 100.0]), keep_zero=False)
    assert weighted.centroids[0] > 2.8


def _lloyd(values: np.ndarray, levels: int, importance: np.ndarray | None, keep_zero: bool) -> np.ndarray:
    """Lloyd's algorithm the plain way (each value to its nearest centroid, weighted means), started
    where kmeans starts: the decoded values it ends at."""
    flat = values.astype(np.float64).ravel()
    weight = np.ones_like(flat) if importance is None else np.maximum(importance, 1e-12 * importance.max())
    order = np.argsort(flat, kind="stable")
    cumulative = np.cumsum(weight[order])
    centroids = flat[order][np.minimum(np.searchsorted(cumulative, (np.arange(levels) + 0.5) / levels * cumulative[-1]), len(flat) - 1)]
    zero = keep_zero and bool(np.any(flat == 0))

    def with_zero(c: np.ndarray) -> np.ndarray:
        c = c.copy()
        c[np.argmin(np.abs(c))] = 0.0
        return np.sort(c)

    centroids = with_zero(centroids) if zero else centroids
    for _ in range(30):
        assigned = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
        sums, counts = np.bincount(assigned, weight * flat, levels), np.bincount(assigned, weight, levels)
        centroids = np.sort(with_zero(np.where(counts > 0, sums / np.where(counts > 0, counts, 1), centroids)) if zero
                            else np.where(counts > 0, sums / np.where(counts > 0, counts, 1), centroids))
    return centroids[np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)].astype(np.float32)


@pytest.mark.parametrize("case", range(12))
def test_kmeans_over_runs_of_the_sorted_values_ends_where_plain_lloyd_does(case: int) -> None:
    rng = np.random.default_rng(case)
    values = rng.standard_normal(rng.integers(200, 5000)).astype(np.float32)
    if case % 3 == 1:
        values[rng.random(len(values)) < 0.5] = 0.0  # pruned
    if case % 3 == 2:
        values = np.repeat(values[: len(values) // 7], 7)  # duplicated values
    importance = 10.0 ** rng.uniform(-8, 4, len(values)) if case % 2 else None
    levels = (4, 16, 64)[case % 3]
    book = kmeans(values, levels, importance, keep_zero=case % 4 != 3)
    np.testing.assert_allclose(book.decoded(), _lloyd(values, levels, importance, case % 4 != 3), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scope", ["tensor", "channel", "scaled"])
@pytest.mark.parametrize("index_type", ["auto", "uint8"])
def test_the_clustered_model_computes_with_the_decoded_weights_and_onnxruntime_folds_the_decoding(
        scope: str, index_type: str, rng: np.random.Generator, tmp_path) -> None:
    model = _model(rng)
    result = Cluster(scope=scope, index_type=index_type, min_elements=1).run(model, PassContext())
    clustered = result.model
    onnx.checker.check_model(clustered, full_check=True)
    assert clustered.opset_import[0].version == (21 if index_type == "auto" else 17)
    index_types = {t.data_type for t in clustered.graph.initializer if t.name.endswith("_indices")}
    assert index_types == {onnx.TensorProto.UINT4 if index_type == "auto" else onnx.TensorProto.UINT8}
    # the same model with each weight replaced by what its codebook decodes to
    weights = _weights(model)
    decoded = {name: fit_codebooks(value, 16, scope, 0 if name == "w" else 1).decoded() for name, value in weights.items()}
    assert all(len(np.unique(d)) <= (16 if scope == "tensor" else 16 * d.shape[0 if n == "w" else 1]) for n, d in decoded.items())
    expected = onnx.parser.parse_model(CONV_MATMUL)
    del expected.graph.initializer[:]
    with_initializers(expected, **decoded)
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(clustered, {"x": x})[0], run(expected, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert result.figures["tensors_clustered"] == 2
    # 4-bit indices and a book (per channel: 16 floats each, dear on a tensor this small)
    bound = 0.6 if index_type == "uint8" or scope == "channel" else 0.35
    assert result.figures["weight_bytes_after"] < result.figures["weight_bytes_before"] * bound
    # onnxruntime folds Cast, Add, Gather and Mul of constants at load: only the layers run
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(clustered.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "MatMul"]


def test_compensated_rounding_moves_the_layer_outputs_less_than_nearest_centroids(rng: np.random.Generator) -> None:
    k, n = 96, 32
    matrix = rng.standard_normal((n, k))
    mixing = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = (rng.standard_normal((3000, k)) * np.linspace(0.2, 3.0, k)) @ mixing
    held_out = (rng.standard_normal((500, k)) * np.linspace(0.2, 3.0, k)) @ mixing
    books = fit_codebooks(matrix.astype(np.float32), 8, "scaled", 0)
    rows = books.row_centroids(n)
    nearest = books.decoded().astype(np.float64)
    solved = compensated(matrix, x.T @ x, rows)
    assert all(np.isin(solved[i], rows[i]).all() for i in range(n))  # every value one of its row's centroids
    error = {name: np.linalg.norm(held_out @ (m - matrix).T) for name, m in (("nearest", nearest), ("compensated", solved))}
    assert error["compensated"] < 0.8 * error["nearest"]


def test_gptq_in_the_pipeline_beats_nearest_centroids_on_held_out_digits() -> None:
    model, inputs, calibration = bundled("digits_cnn")
    drift = {}
    for method in ("kmeans", "gptq"):
        manager = PassManager(parse_pipeline(f"cluster{{method={method} bits=3 min_elements=100}}"), inputs=inputs, calibration=calibration,
                              policy="keep", keep_worse=True)
        clustered, report = manager.run(model)
        changes = {c.target: c.details for c in report.steps[0].changes}
        assert set(changes) == {"stem.0.weight", "block.conv1.weight", "block.conv2.weight", "depthwise.0.weight", "pointwise.0.weight",
                                "fc.weight"}
        assert sum(n.op_type == "Gather" for n in clustered.graph.node) == 6
        assert all(details["compensated"] == (method == "gptq") for details in changes.values())
        drift[method] = 1 - report.final_validation.outputs[0].cosine
    assert drift["gptq"] < drift["kmeans"]


def test_small_excluded_or_half_precision_weights_stay_float_with_the_reason(rng: np.random.Generator) -> None:
    model = _model(rng)
    result = Cluster(exclude=("m",), min_elements=100).run(model, PassContext())
    reasons = {skip.target: skip.reason for skip in result.skipped}
    assert reasons == {"m": "excluded"} and [c.target for c in result.changes] == ["w"]
    result = Cluster().run(model, PassContext())  # both under the default 4096 elements
    assert not result.changes and "fewer than min_elements=4096" in {s.target: s.reason for s in result.skipped}["w"]


@pytest.mark.parametrize(("text", "message"), [
    ("cluster{bits=9}", "1 to 8"), ("cluster{bits=5 index_type=uint4}", "at most 4 bits"), ("cluster{scope=row}", "not one of"),
    ("cluster{method=gptq iterations=0}", "at least 1"), ("cluster{centroids=16}", "valid options"),
])
def test_bad_options_are_refused_when_the_pass_is_built(text: str, message: str) -> None:
    with pytest.raises(PipelineSpecError, match=message):
        parse_pipeline(text)


def test_embedding_tables_are_clustered_like_weights(rng: np.random.Generator) -> None:
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (int64[N, 5] ids) => (float[N, 5, 64] y) <float[100, 64] table> { y = Gather <axis = 0> (table, ids) }""")
    del model.graph.initializer[:]
    table = rng.standard_normal((100, 64)).astype(np.float32)
    with_initializers(model, table=table)
    result = Cluster().run(model, PassContext())
    assert [c.target for c in result.changes] == ["table"]
    ids = rng.integers(0, 100, (2, 5))
    decoded = fit_codebooks(table, 16, "scaled", 0).decoded()  # rows are the units a table's scale follows
    np.testing.assert_array_equal(run(result.model, {"ids": ids})[0], decoded[ids])
    assert not Cluster(embeddings=False).run(model, PassContext()).changes


def test_allocation_spends_the_8_bit_budget_on_the_tensor_that_moves_the_outputs() -> None:
    """Two weights of one size; the second's output is scaled down 1000x, so its rounding hardly
    shows: an average of 6 bits puts the first at 8 and the second at 4."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 64] x) => (float[N, 64] y) <float[64, 64] loud, float[64, 64] quiet, float[1] small> {
        a = MatMul (x, loud)
        b = MatMul (x, quiet)
        c = Mul (b, small)
        y = Add (a, c)
    }""")
    del model.graph.initializer[:]
    rng = np.random.default_rng(1)
    with_initializers(model, loud=rng.standard_normal((64, 64)).astype(np.float32), quiet=rng.standard_normal((64, 64)).astype(np.float32),
                      small=np.array([1e-3], np.float32))
    feeds = [{"x": rng.standard_normal((16, 64)).astype(np.float32)} for _ in range(4)]
    from onnxsparse.calibration import IterableInputs

    result = Cluster(allocate="sensitivity", bits=6, min_elements=100).run(model, PassContext(calibration=IterableInputs(feeds)))
    assert result.figures["bits_allocated"] == {"loud": 8, "quiet": 4}
    assert {c.target: c.action for c in result.changes} == {"loud": "8-bit codebook", "quiet": "4-bit codebook"}
    types = {t.name: t.data_type for t in result.model.graph.initializer if t.name.endswith("_indices")}
    assert types == {"loud_indices": onnx.TensorProto.UINT8, "quiet_indices": onnx.TensorProto.UINT4}
    onnx.checker.check_model(result.model, full_check=True)
    with pytest.raises(PipelineSpecError, match="from 4 to 8"):
        parse_pipeline("cluster{allocate=sensitivity bits=3}")


def test_gptq_on_too_few_samples_to_hold_any_out_fits_on_all_and_says_so(rng: np.random.Generator) -> None:
    from onnxsparse.calibration import IterableInputs

    model = _model(rng)
    few = IterableInputs([{"x": rng.standard_normal((3, 8, 6, 6)).astype(np.float32)}])
    result = Cluster(method="gptq", min_elements=1).run(model, PassContext(calibration=few))
    assert all(change.details["compensated"] for change in result.changes)
    assert any("not checked against held-out ones" in warning for warning in result.warnings)
    many = IterableInputs([{"x": rng.standard_normal((40, 8, 6, 6)).astype(np.float32)}])
    checked = Cluster(method="gptq", min_elements=1).run(model, PassContext(calibration=many))
    assert {"drift_compensated", "drift_nearest"} <= set(checked.figures)  # judged on the samples the fit left out


@pytest.mark.parametrize("scope", ["tensor", "channel", "scaled"])
def test_a_pruned_weights_books_put_the_zero_first_and_decode_to_the_same_values(scope: str, rng: np.random.Generator) -> None:
    """zero_first rotates each book so its exact-zero centroid is index 0: a pruned weight's index is
    then 0, which a bit mask stores in one bit (sparse-encode). The weights decoded are unchanged."""
    from onnxsparse.codebook import zero_first

    weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.5] = 0
    books = fit_codebooks(weight, 16, scope, 0)
    first = zero_first(books)
    np.testing.assert_array_equal(first.decoded(), books.decoded())
    assert np.all(first.indices[weight == 0] == 0)
    assert np.all(first.centroids[:, 0] == 0)


def test_pruned_4_bit_indices_are_mask_encoded_smaller_and_compute_the_same(rng: np.random.Generator, tmp_path) -> None:
    """cluster after 50% pruning, then sparse-encode: the uint4 indices are stored as a bit mask and
    their non-zero indices (widened to 8 bits for the Gather, cast back to uint4, all folded by
    onnxruntime at load); the file is smaller and its outputs those of the cluster alone."""
    from onnxsparse import load

    model = onnx.parser.parse_model(CONV_MATMUL.replace("float[16, 8, 3, 3] w", "float[512, 8, 3, 3] w")
                                    .replace("float[16, 12] m", "float[512, 12] m"))
    del model.graph.initializer[:]
    weights = {"w": rng.standard_normal((512, 8, 3, 3)).astype(np.float32), "m": rng.standard_normal((512, 12)).astype(np.float32)}
    for value in weights.values():
        value[rng.random(value.shape) < 0.5] = 0
    source = tmp_path / "pruned.onnx"
    source.write_bytes(with_initializers(model, **weights).SerializeToString())
    from onnxsparse import optimize

    x = {"x": rng.standard_normal((2, 8, 6, 6)).astype(np.float32)}
    plain, encoded = tmp_path / "clustered.onnx", tmp_path / "encoded.onnx"
    optimize(source, plain, "cluster{min_elements=1}", dims={"N": 2}, policy="keep", keep_worse=True)
    report = optimize(source, encoded, "cluster{min_elements=1},sparse-encode{format=auto}", dims={"N": 2}, policy="keep", keep_worse=True)
    masked = [c for c in report.steps[-1].changes if c.details["format"] == "mask"]
    assert [c.target for c in masked] == [t.name for t in onnx.load(plain).graph.initializer if t.name == "w_indices"]
    written = onnx.load(encoded)
    values = next(t for t in written.graph.initializer if t.name.endswith("/values"))
    assert values.data_type == onnx.TensorProto.UINT4
    assert encoded.stat().st_size < 0.85 * plain.stat().st_size
    np.testing.assert_array_equal(run(encoded, x)[0], run(plain, x)[0])
    reread = {t.name: onnx.numpy_helper.to_array(t) for t in load(encoded).graph.initializer}
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in load(plain).graph.initializer}
    assert reread.keys() == expected.keys() and reread["w_indices"].dtype == expected["w_indices"].dtype
    np.testing.assert_array_equal(reread["w_indices"].astype(np.uint8), expected["w_indices"].astype(np.uint8))
