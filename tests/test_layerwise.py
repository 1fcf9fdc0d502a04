"""Layer-wise views (im2col), SparseGPT and bias correction, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import bundled, record_tensor_values, run, with_initializers

from onnxsparse.calibration import IterableInputs
from onnxsparse.graph import to_gs
from onnxsparse.layerwise import (
    CentredColumns,
    ReadingLayer,
    fit_to_teacher,
    from_matrix,
    gram_blocks,
    greedy_removal_costs,
    grouped_rows,
    input_rows,
    sparsegpt,
    to_matrix,
)
from onnxsparse.passes import PassContext
from onnxsparse.passes.magnitude import MagnitudePrune
from onnxsparse.pipeline import PassManager
from onnxsparse.spec import parse_pipeline
from onnxsparse.weights import find_weights


@pytest.mark.parametrize(
    ("attrs", "group", "shape"),
    [
        ("pads = [1, 1, 1, 1]", 1, (6, 4, 3, 3)),
        ("strides = [2, 2], pads = [0, 1, 1, 0]", 1, (6, 4, 3, 3)),
        ("dilations = [2, 2], pads = [2, 2, 2, 2]", 1, (6, 4, 3, 3)),
        ("group = 2, pads = [1, 1, 1, 1]", 2, (6, 2, 3, 3)),
        ("group = 4, pads = [1, 1, 1, 1]", 4, (4, 1, 3, 3)),
        ("strides = [1, 2]", 1, (5, 4, 1, 2)),
    ],
)
def test_unfolded_rows_times_the_weight_matrix_is_the_convolution(rng, attrs, group, shape):
    model = with_initializers(onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[2, 4, 7, 7] x) => (float[2, {shape[0]}, ?, ?] y) {{ y = Conv <{attrs}> (x, w) }}"""),
        w=rng.standard_normal(shape).astype(np.float32))
    x = rng.standard_normal((2, 4, 7, 7)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    (site,), _ = find_weights(to_gs(model))
    rows = input_rows(site, x)
    matrix = to_matrix(site)
    width = matrix.shape[1]
    per_group = matrix.shape[0] // group
    outputs = np.concatenate(
        [rows[:, g * width : (g + 1) * width] @ matrix[g * per_group : (g + 1) * per_group].T for g in range(group)], axis=1
    )
    positions = expected.shape[2] * expected.shape[3]
    got = outputs.reshape(2, positions, shape[0]).transpose(0, 2, 1).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(from_matrix(site, matrix), site.value)
    # the same rows group by group, and their Grams (what SparseGPT's Hessians sum) in one batched product
    by_group = grouped_rows(site, x)
    assert by_group.shape == (group, rows.shape[0], width)
    for g in range(group):
        np.testing.assert_allclose(by_group[g], rows[:, g * width : (g + 1) * width], rtol=1e-6)
    teacher = grouped_rows(site, x + 0.5)
    expected_grams = np.stack([(teacher[g].astype(np.float64).T @ by_group[g].astype(np.float64)) for g in range(group)])
    np.testing.assert_allclose(gram_blocks(by_group, teacher), expected_grams, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gram_blocks(by_group), np.stack([r.astype(np.float64).T @ r.astype(np.float64) for r in by_group]), rtol=1e-5, atol=1e-4)
    # the same rows as centred columns (the refit's design), built twice from kept buffers, and the outputs likewise
    design, outputs_as_columns = CentredColumns(site), CentredColumns(site, output=True)
    for _ in range(2):
        np.testing.assert_allclose(design(x) + design.shift[:, :, None], by_group.transpose(0, 2, 1), rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(design.shift - by_group.mean(axis=1)) < 0.5)  # about the columns' means (padding zeros aside)
    expected_rows = expected.reshape(2, group, shape[0] // group, positions).transpose(1, 2, 0, 3).reshape(group, shape[0] // group, -1)
    np.testing.assert_allclose(outputs_as_columns(expected) + outputs_as_columns.shift[:, :, None], expected_rows, rtol=1e-6, atol=1e-6)


def _least_squares_problem(rng):
    x = rng.standard_normal((512, 32)) @ rng.standard_normal((32, 32))  # correlated inputs
    w = rng.standard_normal((16, 32))
    return x, w


def test_sparsegpt_hits_the_sparsity_and_beats_magnitude_on_the_layer_output(rng):
    x, w = _least_squares_problem(rng)
    pruned = sparsegpt(w, x.T @ x, 0.5, block=8)
    assert np.count_nonzero(pruned == 0) == w.size // 2
    by_magnitude = np.where(np.abs(w) >= np.median(np.abs(w)), w, 0)
    error = np.linalg.norm(x @ (pruned - w).T)
    assert error < 0.85 * np.linalg.norm(x @ (by_magnitude - w).T)  # measured 0.80 here


def test_sparsegpt_two_four_and_per_row_patterns_are_exact(rng):
    x, w = _least_squares_problem(rng)
    two_four = sparsegpt(w, x.T @ x, 0.5, nm=(2, 4), block=16)
    assert (np.count_nonzero(two_four.reshape(16, -1, 4), axis=2) == 2).all()
    per_row = sparsegpt(w, x.T @ x, 0.25, per_row=True, block=32)
    assert (np.count_nonzero(per_row == 0, axis=1) == 8).all()


def test_teacher_fit_maps_a_drifted_input_back_to_the_original_output_and_its_pull_keeps_the_weights(rng):
    teacher_x, w = _least_squares_problem(rng)
    # The input after earlier layers were pruned: mostly a linear distortion of the original, which a
    # refit can undo, plus a little noise, which it cannot.
    distortion = np.eye(32) + 0.2 * rng.standard_normal((32, 32))
    drifted = teacher_x @ distortion + 0.01 * rng.standard_normal(teacher_x.shape)
    target = teacher_x @ w.T
    hessian, cross = drifted.T @ drifted, teacher_x.T @ drifted
    fitted = fit_to_teacher(w, cross, hessian, strength=1e-6)
    error_before = np.linalg.norm(drifted @ w.T - target)
    error_after = np.linalg.norm(drifted @ fitted.T - target)
    lstsq = np.linalg.lstsq(drifted, target, rcond=None)[0].T
    assert error_after < 0.5 * error_before
    assert error_after == pytest.approx(np.linalg.norm(drifted @ lstsq.T - target), rel=0.02)  # the least-squares optimum
    pulled = fit_to_teacher(w, cross, hessian, strength=1e6)
    assert np.abs(pulled - w).max() < 1e-3 * np.abs(w).max()


def test_sparsegpt_criterion_beats_magnitude_on_the_bundled_transformer():
    model, inputs, calibration = bundled("digits_transformer")
    cosines = {}
    for criterion in ("magnitude", "sparsegpt"):
        manager = PassManager(parse_pipeline(f"magnitude-prune{{sparsity=0.5 criterion={criterion}}}"),
                              inputs=inputs, calibration=calibration, policy="keep")
        _, report = manager.run(model)
        change = report.steps[0].changes
        assert all(c.details["sparsity"] == pytest.approx(0.5, abs=0.01) for c in change)
        cosines[criterion] = report.final_validation.outputs[0].cosine
    assert cosines["sparsegpt"] > cosines["magnitude"] + 0.1


def test_sparsegpt_with_the_original_model_as_teacher_recovers_the_drift_of_earlier_layers():
    model, inputs, calibration = bundled("digits_cnn")
    cosines = {}
    for teacher in (0, 0.1):
        manager = PassManager(parse_pipeline(f"fold-batchnorm,magnitude-prune{{sparsity=0.7 criterion=sparsegpt teacher={teacher}}}"),
                              inputs=inputs, calibration=calibration, policy="keep")
        _, report = manager.run(model)
        assert report.steps[-1].figures["sparsity"] == pytest.approx(0.7, abs=0.01)
        cosines[teacher] = report.final_validation.outputs[0].cosine
    assert cosines[0.1] > cosines[0] + 0.2  # measured 0.449 -> 0.915 on the held-out digits


def test_bias_correction_restores_a_single_layers_mean_output(rng):
    model = with_initializers(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[8, 6] x) => (float[8, 4] y) { y = MatMul (x, w) }"""), w=rng.standard_normal((6, 4)).astype(np.float32))
    feeds = [{"x": (rng.random((8, 6)) + 1.0).astype(np.float32)} for _ in range(4)]
    context = PassContext(calibration=IterableInputs(feeds))
    plain = MagnitudePrune(sparsity=0.5).run(model, PassContext()).model
    corrected = MagnitudePrune(sparsity=0.5, bias_correction=True).run(model, context)
    onnx.checker.check_model(corrected.model, full_check=True)
    assert corrected.figures["biases_corrected"] == 1

    def mean_output(m: onnx.ModelProto) -> np.ndarray:
        return np.mean([run(m, feed)[0] for feed in feeds], axis=(0, 1))

    np.testing.assert_allclose(mean_output(corrected.model), mean_output(model), rtol=1e-5, atol=1e-5)
    assert np.abs(mean_output(plain) - mean_output(model)).max() > 1e-2


def _gram(x: np.ndarray) -> np.ndarray:
    augmented = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return augmented.T @ augmented / len(x)


def test_the_first_removal_costs_what_a_least_squares_refit_of_the_rest_leaves(rng):
    x = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + rng.standard_normal(6)  # correlated, not centred
    weight = rng.standard_normal((4, 6))
    bias = rng.standard_normal(4)
    target = x @ weight.T + bias
    positions = np.arange(6)[:, None]
    layer = ReadingLayer(np.concatenate([weight, bias[:, None]], axis=1), _gram(x), positions)
    cumulative = greedy_removal_costs([layer], 6, damp=0.0)
    first = int(np.argmin(cumulative))
    brute = []
    for channel in range(6):  # drop the channel, refit every other column and the bias by least squares
        kept = np.concatenate([np.delete(x, channel, axis=1), np.ones((len(x), 1))], axis=1)
        solution, *_ = np.linalg.lstsq(kept, target, rcond=None)
        brute.append(float(np.sum((kept @ solution - target) ** 2)) / len(x))
    assert first == int(np.argmin(brute))
    assert cumulative[first] == pytest.approx(min(brute), rel=1e-6)
    assert np.all(np.diff(np.sort(cumulative)) >= 0)


def test_a_duplicated_channel_goes_first_however_large_its_weights(rng):
    base = rng.standard_normal((400, 3))
    x = np.concatenate([base, 2.0 * base[:, :1]], axis=1)  # channel 3 is channel 0 doubled
    weight = np.array([[0.1, 1.0, 1.0, 5.0], [0.1, -1.0, 1.0, 5.0]])
    layer = ReadingLayer(np.concatenate([weight, np.zeros((2, 1))], axis=1), _gram(x), np.array([[0], [1], [2], [3]]))
    cumulative = greedy_removal_costs([layer], 4)
    # channel 0 or 3 (each can stand in for the other) goes first at almost no cost; by norm, 3 would go last
    assert int(np.argmin(cumulative)) in (0, 3) and cumulative.min() < 1e-2 * np.sort(cumulative)[1]


def test_units_holding_several_positions_are_costed_as_a_block(rng):
    x = rng.standard_normal((300, 4))
    weight = rng.standard_normal((3, 4))
    layer = ReadingLayer(np.concatenate([weight, np.zeros((3, 1))], axis=1), _gram(x), np.array([[0, 1], [2, 3]]))
    cumulative = greedy_removal_costs([layer], 2, damp=0.0)
    for unit, columns in enumerate(([0, 1], [2, 3])):
        kept = np.concatenate([np.delete(x, columns, axis=1), np.ones((len(x), 1))], axis=1)
        solution, *_ = np.linalg.lstsq(kept, x @ weight.T, rcond=None)
        alone = float(np.sum((kept @ solution - x @ weight.T) ** 2)) / len(x)
        if unit == int(np.argmin(cumulative)):
            assert cumulative[unit] == pytest.approx(alone, rel=1e-6)


def test_fixed_model_values_batch_coming_tensors_into_runs_and_hand_each_over_until_asked_again(monkeypatch):
    from onnxsparse import activations
    from onnxsparse.shapes import infer_shapes

    model, _, calibration = bundled("digits_cnn")
    model = infer_shapes(model)
    names = [node.output[0] for node in model.graph.node if node.op_type == "Conv"][:3]
    coming = [names[0], names[1], names[0], names[2]]  # the first is read by two layers
    expected = {name: [v[name] for v in activations.tensor_values(model, calibration, [name], limit=2)] for name in names}
    runs = record_tensor_values(monkeypatch)
    values = activations.FixedModelValues(model, calibration, 2, coming, label="test")
    for name in coming:
        got = values.values(name)
        assert len(got) == len(expected[name]) and all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, expected[name]))
    assert runs == [names] and not values.held  # one run for all three; nothing left once asked for the last time
    monkeypatch.setattr(activations, "FIXED_VALUES_BYTES", 0)
    runs.clear()
    values = activations.FixedModelValues(model, calibration, 2, coming, label="test")
    for name in coming:
        values.values(name)
    assert runs == [[names[0]], [names[1]], [names[2]]]  # the one asked twice is kept, not run again


def test_fixed_model_values_start_each_run_from_the_tensors_the_last_run_left_at_its_cut(monkeypatch):
    from onnxsparse import activations
    from onnxsparse.shapes import infer_shapes

    model, _, calibration = bundled("digits_cnn")
    model = infer_shapes(model)
    names = [node.output[0] for node in model.graph.node if node.op_type == "Conv"]  # 4096 bytes a sample, 8192 at the last
    expected = {name: [v[name] for v in activations.tensor_values(model, calibration, [name], limit=2)] for name in names}
    given: list[list[str]] = []
    real = activations.tensor_values

    def recording(*args, **kwargs):  # noqa: ANN202 - the real function's signature
        given.append(sorted(kwargs.get("given") or {}))
        return real(*args, **kwargs)

    monkeypatch.setattr(activations, "tensor_values", recording)
    monkeypatch.setattr(activations, "FIXED_VALUES_BYTES", 4 * 4096 * 2)  # two samples: batches of two names, a cut of two
    monkeypatch.setattr(activations, "FRONTIER_SHARE", 2)
    values = activations.FixedModelValues(model, calibration, 2, names, label="test")
    for name in names:
        got = values.values(name)
        assert all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, expected[name], strict=True))
    # the second run starts from the residual block's input and conv1's output, the third from the depthwise conv's output
    assert given == [[], sorted([names[1], "/stem/stem.2/Relu_output_0"]), [names[3]]]


def test_fixed_model_values_drop_what_a_skipped_layer_never_asked_for_and_end_a_batch_at_an_unknown_size(monkeypatch):
    from onnxsparse import activations
    from onnxsparse.shapes import infer_shapes

    model, _, calibration = bundled("digits_cnn")
    model = infer_shapes(model)
    names = [node.output[0] for node in model.graph.node if node.op_type == "Conv"][:3]
    values = activations.FixedModelValues(model, calibration, 2, names, label="test")
    values.values(names[0])
    assert set(values.held) == {names[1], names[2]}  # computed with the first
    values.values(names[2])  # the layer reading names[1] was skipped
    assert not values.held
    runs = record_tensor_values(monkeypatch)
    values = activations.FixedModelValues(model, calibration, 2, names, label="test")
    unknown = {name: size for name, size in values.facts.bytes_per_sample.items() if name != names[0]}  # a size shape inference did not give
    values.facts = activations.ValueFacts(values.facts.types, unknown)
    values.values(names[0])
    assert runs == [[names[0]]]


def test_fixed_model_values_size_a_tensor_by_its_element_type():
    from conftest import parse

    from onnxsparse import activations
    from onnxsparse.shapes import infer_shapes

    model = infer_shapes(parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[N, 3, 4] x) => (double[N, 3, 4] y) {
            h = Relu (x)
            y = Cast <to = 11> (h)
        }
    """))
    assert activations._bytes_per_sample(model) == {"h": 48, "y": 96}


def test_tensor_values_feed_given_values_instead_of_computing_them_and_changing_model_values_forget_edited_ones(monkeypatch):
    from conftest import parse

    from onnxsparse import activations

    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[N, 4] x) => (float[N, 2] y) {
            a = Relu (x)
            b = Neg (a)
            s1, s2 = Split <axis = 1> (b)
            y = Add (s1, s2)
        }
    """)
    x = np.arange(-8, 8, dtype=np.float32).reshape(4, 4)
    source = IterableInputs([{"x": x}])
    # from a given 'a' only Neg runs: a wrong 'a' fed in shows in 'b'
    trimmed = activations.computing_only(model, ["b"], given=["a"])
    assert [n.op_type for n in trimmed.graph.node] == ["Neg"] and "a" in {i.name for i in trimmed.graph.input}
    fake_a = np.ones((4, 4), dtype=np.float32)
    (values,) = activations.tensor_values(model, source, ["b"], given={"a": [fake_a]})
    np.testing.assert_array_equal(values["b"], -fake_a)
    # 's1' given but its Split must run for 's2' anyway: computed, not fed
    (values,) = activations.tensor_values(model, source, ["y"], given={"s1": [np.zeros((4, 2), dtype=np.float32)]})
    np.testing.assert_array_equal(values["y"], run(model, {"x": x})[0])

    changing = activations.ChangingModelValues(source, None, label="test")
    changing.facts = activations.ValueFacts({}, {})  # sizes shape inference does not give
    changing.values(model, ["a"])
    assert not changing.kept  # streamed, not held
    changing = activations.ChangingModelValues(source, None, label="test")
    changing.values(model, ["a", "b"])  # sizes inferred once, on the version first asked about
    graph = to_gs(model)
    changing.edited(graph, [n for n in graph.nodes if n.op == "Neg"])  # b and all after it change, a does not
    assert set(changing.kept) == {"a"}
    monkeypatch.setattr(activations, "FIXED_VALUES_BYTES", 90)  # s1 (32 bytes) fits, but not beside a (64): the older goes
    changing.values(model, ["s1"])
    assert set(changing.kept) == {"s1"}


@pytest.mark.parametrize("shift_moves", [False, True], ids=["one shift", "the last block on another shift"])
def test_the_refit_normal_equations_are_the_float64_products_of_the_blocks_they_were_given(rng, shift_moves):
    """Blocks added one by one as columns centred on a shift (the first block's means), the shift
    added back, give XᵀX and XᵀY of the design [X, 1] and |Y|² per fold as one float64 product would;
    also when a block comes centred on other shifts than the blocks before it."""
    from onnxsparse.refit import NormalEquations

    groups, columns, outputs, folds = 3, 5, 2, 2
    blocks = [(rng.standard_normal((groups, n, columns)) * 4 + 30, rng.standard_normal((groups, n, outputs)) - 7) for n in (40, 17, 23)]
    equations = NormalEquations.zeros(groups, columns + 1, outputs, folds)  # one more column: the bias's ones
    for index, (rows, target) in enumerate(blocks):
        centred_on = blocks[index if shift_moves and index == len(blocks) - 1 else 0]
        shift, target_shift = centred_on[0].mean(axis=1).astype(np.float32), centred_on[1].mean(axis=1).astype(np.float32)
        given_rows, given_target = rows.astype(np.float32), target.astype(np.float32)
        equations.add((given_rows - shift[:, None]).transpose(0, 2, 1), (given_target - target_shift[:, None]).transpose(0, 2, 1),
                      shift, target_shift, index % folds)
    equations.settle()
    for fold in range(folds):
        rows = np.concatenate([r for i, (r, _) in enumerate(blocks) if i % folds == fold], axis=1).astype(np.float32).astype(np.float64)
        target = np.concatenate([t for i, (_, t) in enumerate(blocks) if i % folds == fold], axis=1).astype(np.float32).astype(np.float64)
        design = np.concatenate([rows, np.ones(rows.shape[:2] + (1,))], axis=2)
        np.testing.assert_allclose(equations.gram[fold], design.transpose(0, 2, 1) @ design, rtol=2e-6)
        np.testing.assert_allclose(equations.cross[fold], design.transpose(0, 2, 1) @ target, rtol=2e-6, atol=1e-3)
        np.testing.assert_allclose(equations.norm[fold], np.sum(target**2), rtol=1e-9)


@pytest.mark.parametrize("valley_at", range(10))
def test_the_ridge_walk_ends_where_the_whole_grid_is_least_and_fits_fewer_strengths(valley_at):
    """Held-out error with one valley anywhere on the grid, the edges included: the walk from the
    fallback strength returns the grid's least (ties to the weaker strength) without fitting all ten."""
    from onnxsparse.refit import FALLBACK_STRENGTH, STRENGTHS, least_on_the_grid

    def error(strength: float) -> float:
        fitted.append(strength)
        return (STRENGTHS.index(strength) - valley_at) ** 2 + 1.0

    fitted: list[float] = []
    strength, held_out = least_on_the_grid(error)
    assert (strength, held_out) == (STRENGTHS[valley_at], 1.0)
    assert len(fitted) == len(set(fitted))  # no strength fitted twice
    start = STRENGTHS.index(FALLBACK_STRENGTH)
    assert len(fitted) == 3 + abs(valley_at - start) - (valley_at in (0, len(STRENGTHS) - 1))  # one more per step, none past an edge
    assert least_on_the_grid(lambda s: 5.0) == (STRENGTHS[0], 5.0)  # all tied: the weakest, as a scan of the whole grid took



def test_a_nan_held_out_error_is_the_worst_and_never_stalls_the_walk():
    """A NaN compares false both ways: taken as it is, the walk stepped onto it and back for ever."""
    from onnxsparse.refit import STRENGTHS, least_on_the_grid

    curve = [5.0, float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert least_on_the_grid(lambda s: curve[STRENGTHS.index(s)]) == (STRENGTHS[2], 1.0)


def test_the_ridge_is_added_to_a_copy_of_any_layout_of_the_gram(rng):
    """A Fortran-ordered or transposed gram: the in-place diagonal must land in the system solved."""
    from onnxsparse.layerwise import ridge_towards

    rows = rng.standard_normal((40, 6))
    gram, right, start = rows.T @ rows, rng.standard_normal((6, 2)), rng.standard_normal((6, 2))
    expected = np.linalg.solve(gram + 3.0 * np.eye(6), right + 3.0 * start)
    for layout in (gram, np.asfortranarray(gram), gram.T, np.asfortranarray(gram).astype(np.float32)):
        np.testing.assert_allclose(ridge_towards(layout, right, start, 3.0), expected, rtol=1e-5)


def test_each_layers_ridge_walk_starts_where_the_last_one_ended():
    from onnxsparse.refit import FALLBACK_STRENGTH, STRENGTHS, StrengthWalk

    walk, fitted = StrengthWalk(), []

    def valley_at(index: int):
        return lambda strength: fitted.append(strength) or abs(STRENGTHS.index(strength) - index) + 1.0

    assert walk.start == FALLBACK_STRENGTH and walk.least(valley_at(9)) == (STRENGTHS[9], 1.0)
    fitted.clear()
    assert walk.least(valley_at(9)) == (STRENGTHS[9], 1.0) and fitted == [STRENGTHS[8], STRENGTHS[9]]  # no walk up the grid again
