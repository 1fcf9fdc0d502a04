"""The validator's metrics and verdicts on hand-computed values, and the input sources it runs on."""

from __future__ import annotations

import importlib
import itertools
import math
import re

import numpy as np
import onnx
import pytest
from conftest import MODELS, parse, run, with_initializers
from onnxruntime.quantization import CalibrationDataReader

from onnxsparse.calibration import SyntheticInputs, collect_feeds, resolve_inputs
from onnxsparse.errors import InputDataError
from onnxsparse.validation import EXACT, Reference, Tolerance, Tolerances, compare, judge

NONE = Tolerance()


def metrics_of(ref: np.ndarray, cand: np.ndarray, tolerance: Tolerance = NONE, **kwargs):
    result = compare([{"y": ref}], [{"y": cand}], lambda _: tolerance, **kwargs)
    return result.outputs[0], result.verdict


# ------------------------------------------------------------------------------ metrics


def test_identical_outputs_have_perfect_metrics():
    ref = np.array([[1.0, -2.0, 3.0], [0.5, 0.25, -4.0]], np.float32)
    metrics, verdict = metrics_of(ref, ref.copy(), Tolerance(max_abs=0.0, min_cosine=1.0, min_top1=1.0, max_kl=0.0))
    assert (metrics.max_abs, metrics.max_rel, metrics.cosine, metrics.sqnr_db) == (0.0, 0.0, 1.0, math.inf)
    assert (metrics.top1, metrics.kl) == (1.0, 0.0)
    assert verdict.passed and verdict.failures == []


def test_known_perturbation_gives_hand_computed_metrics():
    ref = np.array([1.0, -2.0, 3.0, 4.0], np.float32)
    cand = ref + np.array([0.0, 0.5, 0.0, -0.25], np.float32)  # = [1, -1.5, 3, 3.75]
    metrics, _ = metrics_of(ref, cand)
    assert metrics.max_abs == 0.5
    assert metrics.max_rel == 0.5 / 4.0
    # dot = 1 + 3 + 9 + 15 = 28; |ref|^2 = 30; |cand|^2 = 26.3125; |err|^2 = 0.3125
    assert metrics.cosine == pytest.approx(28 / math.sqrt(30 * 26.3125), rel=1e-12)
    assert metrics.sqnr_db == pytest.approx(10 * math.log10(30 / 0.3125), rel=1e-12)
    assert (metrics.top1, metrics.kl, metrics.agreement) == (None, None, None)  # 1-D: not a score output


def test_metrics_accumulate_over_feeds():
    refs = [{"y": np.array([-8.0, 0.0], np.float32)}, {"y": np.array([1.0, 2.0], np.float32)}]
    cands = [{"y": np.array([-8.0, 0.25], np.float32)}, {"y": np.array([1.5, 2.0], np.float32)}]
    [metrics] = compare(refs, cands, lambda _: NONE).outputs
    assert metrics.max_abs == 0.5 and metrics.max_rel == 0.5 / 8.0  # the max error over the max scale
    assert metrics.sqnr_db == pytest.approx(10 * math.log10(69 / (0.25 + 0.0625)), rel=1e-12)


def test_top1_agreement_counts_rows_whose_argmax_is_kept():
    ref = np.array([[3, 1, 0], [0, 2, 1], [1, 0, 4], [5, 6, 0]], np.float32)
    cand = ref.copy()
    cand[1] = [0, 2, 2.5]  # argmax 1 -> 2
    cand[2] = [1, 0, 3.9]  # moved, argmax kept
    metrics, _ = metrics_of(ref, cand)
    assert metrics.top1 == 0.75


def test_top1_drop_costs_a_flip_what_the_original_gave_each_class():
    """A flip between near-tied classes costs little, one away from a confident class almost a row;
    outputs that already are probabilities are not put through a softmax again."""
    logits = np.array([[0.0, 0.1, -5.0], [8.0, 0.0, 0.0]], np.float32)
    near_tie = np.array([[0.1, 0.0, -5.0], [8.0, 0.0, 0.0]], np.float32)
    confident = np.array([[0.0, 0.1, -5.0], [0.0, 8.0, 0.0]], np.float32)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert metrics_of(logits, near_tie)[0].top1_drop == pytest.approx((p[0, 1] - p[0, 0]) / 2, rel=1e-6)
    assert metrics_of(logits, confident)[0].top1_drop == pytest.approx((p[1, 0] - p[1, 1]) / 2, rel=1e-6)
    probabilities = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], np.float32)
    flipped = np.array([[0.7, 0.2, 0.1], [0.3, 0.45, 0.25]], np.float32)
    assert metrics_of(probabilities, flipped)[0].top1_drop == pytest.approx(0.05 / 2, rel=1e-5)
    _, verdict = metrics_of(logits, confident, Tolerance(max_top1_drop=0.01))
    assert not verdict.passed and "top1_drop" in verdict.failures[0]


def one_hot_frames(paths: list[list[int]], classes: int = 5) -> np.ndarray:
    """[samples, positions, classes] scores whose best class per position is ``paths``."""
    frames = np.zeros((len(paths), len(paths[0]), classes), np.float32)
    for sample, path in enumerate(paths):
        frames[sample, np.arange(len(path)), path] = 4.0
    return frames


def test_read_labels_merges_runs_and_drops_the_background():
    from onnxsparse.validation import read_labels

    assert read_labels(np.array([0, 3, 3, 0, 0, 3, 2, 2, 0]), background=0) == (3, 3, 2)
    assert read_labels(np.array([4, 4, 1]), background=0) == (4, 1)
    assert read_labels(np.array([], np.int16), background=0) == ()


def test_sequence_agreement_counts_samples_that_read_the_same_not_positions():
    """Background (the original's commonest class: 0 here) flipping at the edge of a run, or a run
    boundary moving, reads the same; a label gained or changed does not. Positions do not count:
    a changed line is one sample whatever its length."""
    ref = one_hot_frames([[0, 1, 1, 0, 2, 0], [0, 3, 0, 0, 3, 0], [0, 2, 2, 4, 4, 0], [0, 1, 0, 0, 0, 0]])
    cand = one_hot_frames([[0, 0, 1, 0, 2, 2], [0, 3, 0, 3, 3, 0], [0, 2, 4, 4, 4, 0], [0, 1, 0, 0, 0, 0]])
    metrics, verdict = metrics_of(ref, cand, Tolerance(min_sequence_agreement=0.99))
    assert (metrics.sequence_agreement, metrics.sequences) == (1.0, 4) and verdict.passed
    cand[1, 2] = one_hot_frames([[3]])[0, 0]  # 3 0 3 -> 3 3 3: one label lost from sample 1
    cand[3, 4] = one_hot_frames([[2]])[0, 0]  # a label gained by sample 3
    metrics, verdict = metrics_of(ref, cand, Tolerance(min_sequence_agreement=0.99))
    assert metrics.sequence_agreement == 0.5 and metrics.top1 == 18 / 24  # 6 of 24 positions flipped, 2 of 4 lines changed
    assert not verdict.passed and "sequence_agreement 0.5 < 0.99" in verdict.failures[0]
    assert metrics_of(ref[:, :, 0], cand[:, :, 0])[0].sequence_agreement is None  # [batch, classes]: labels, not sequences


def read_probability(logits: np.ndarray, read: tuple[int, ...]) -> float:
    """P(read) of one sample's [positions, classes] logits, by enumerating every path (class 0 the background)."""
    from onnxsparse.validation import read_labels

    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return sum(float(np.prod(p[np.arange(len(path)), path])) for path in itertools.product(range(p.shape[1]), repeat=len(p))
               if read_labels(np.array(path), 0) == read)


def test_sequence_drop_costs_a_changed_read_what_the_original_gave_each_read():
    """As top1_drop with reads for classes: a read that changes where the original itself was on a near
    tie costs little, one away from a confident read almost a whole sample; a path that changes but
    reads the same costs nothing. A read's probability sums every path that reads it."""
    logits = np.zeros((2, 3, 3), np.float32)  # 2 samples, 3 positions, classes 0 (background), 1, 2
    logits[:, :, 0] = 6.0
    logits[0, 1] = [0.0, 6.0, 5.9]  # sample 0 reads "1", on a near tie with "2"
    logits[1, 1] = [0.0, 6.0, 0.0]  # sample 1 reads "1", sure of it
    near_tie, confident = logits.copy(), logits.copy()
    near_tie[0, 1] = [0.0, 5.9, 6.0]
    confident[1, 1] = [0.0, 0.0, 6.0]
    metrics = metrics_of(logits, near_tie)[0]
    assert metrics.sequence_drop == pytest.approx((read_probability(logits[0], (1,)) - read_probability(logits[0], (2,))) / 2, rel=1e-5)
    assert metrics.sequence_drop < 0.03 and metrics.sequence_agreement == 0.5
    metrics, verdict = metrics_of(logits, confident, Tolerance(max_sequence_drop=0.01))
    assert metrics.sequence_drop == pytest.approx((read_probability(logits[1], (1,)) - read_probability(logits[1], (2,))) / 2, rel=1e-5)
    assert metrics.sequence_drop > 0.45 and not verdict.passed and "sequence_drop" in verdict.failures[0]
    edge = logits.copy()
    edge[1, 2] = [0.0, 6.0, 0.0]  # "1" one position longer: the same read
    assert metrics_of(logits, edge)[0].sequence_drop == 0.0


def test_frames_on_a_tie_at_the_edges_of_a_run_do_not_make_a_confident_change_cheap():
    """A recogniser's frames at the edges of a character are often half background: the best path alone
    is then improbable, though the read is sure. Changing a sure character costs the read's whole
    probability, as the sum over its paths has it."""
    from onnxsparse.validation import read_log_probability

    logits = np.full((1, 6, 4), -4.0, np.float32)
    for position, best in enumerate([0, 0, 1, 0, 0, 2]):
        logits[0, position, best] = 4.0
    logits[0, 1, 1] = logits[0, 3, 1] = 4.0  # the frames either side of "1" are ties with the background
    candidate = logits.copy()
    candidate[0, 2] = [-4.0, -4.0, -4.0, 4.0]  # reads "3 2" where the original reads "1 2"
    metrics = metrics_of(logits, candidate)[0]
    p = np.exp(logits[0]) / np.exp(logits[0]).sum(axis=1, keepdims=True)
    assert p.max(axis=1).prod() < 0.3  # the best path alone
    assert metrics.sequence_drop == pytest.approx(read_probability(logits[0], (1, 2)) - read_probability(logits[0], (3, 2)), rel=1e-5)
    assert metrics.sequence_drop > 0.9
    assert math.exp(read_log_probability(np.log(p), (1, 2), 0)) == pytest.approx(read_probability(logits[0], (1, 2)), rel=1e-6)


def test_a_sequence_verdict_on_few_samples_says_how_precisely_it_is_known():
    paths = [[0, 1, 0, 2]] * 16
    metrics, verdict = metrics_of(one_hot_frames(paths), one_hot_frames(paths), Tolerance(min_sequence_agreement=0.99))
    assert verdict.passed and metrics.sequence_agreement == 1.0
    note = next(n for n in verdict.notes if "read the same labels" in n)
    assert "1.000 of 16 sample(s)" in note and "known only to 0.81-1.00" in note


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_divergence_at_a_temperature_matches_softmax_by_hand(temperature):
    ref = np.array([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0]], np.float32)
    cand = np.array([[1.0, 1.5, 0.0], [0.5, 1.0, 2.0]], np.float32)

    def softmax(x):
        e = np.exp(x.astype(np.float64) / temperature)
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(ref), softmax(cand)
    expected = float(np.mean(np.sum(p * np.log(p / q), axis=1)))
    metrics, _ = metrics_of(ref, cand, temperature=temperature)
    assert expected > 0.01
    assert metrics.kl == pytest.approx(expected, rel=1e-9)


def test_integer_outputs_get_agreement_and_float_outputs_do_not():
    ints, _ = metrics_of(np.array([1, 2, 3, 4], np.int64), np.array([1, 2, 0, 4], np.int64))
    floats, _ = metrics_of(np.array([1, 2, 3, 4], np.float32), np.array([1, 2, 0, 4], np.float32))
    assert ints.agreement == 0.75
    assert floats.agreement is None


def test_integer_disagreement_fails_exact():
    _, verdict = metrics_of(np.array([[1, 2, 3]], np.int64), np.array([[1, 2, 0]], np.int64), EXACT)
    assert not verdict.passed and any("agreement" in f for f in verdict.failures)


# ------------------------------------------------------------------------------ failures whatever the tolerance


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("tolerance", [NONE, Tolerance(max_abs=1e30, max_rel=1e30, min_cosine=-1.0)])
def test_non_finite_candidate_fails_whatever_the_tolerance(bad, tolerance):
    ref = np.array([1.0, 2.0, 3.0], np.float32)
    metrics, verdict = metrics_of(ref, np.array([1.0, bad, 3.0], np.float32), tolerance)
    assert metrics.nonfinite == 1
    assert not verdict.passed
    assert verdict.failures == ["output 'y': 1 NaN/Inf value(s) where the original is finite"]


def test_non_finite_where_the_reference_is_non_finite_too_is_not_a_failure():
    ref = np.array([np.nan, 2.0, np.inf], np.float32)
    metrics, verdict = metrics_of(ref, ref.copy(), Tolerance(max_abs=0.0))
    assert metrics.nonfinite == 0 and verdict.passed


def test_shape_change_fails_whatever_the_tolerance():
    metrics, verdict = metrics_of(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert not metrics.compared and not verdict.passed
    assert verdict.failures == ["output 'y': shape changed from [2, 3] to [3, 2]"]


def test_output_missing_from_the_candidate_fails():
    result = compare([{"y": np.ones(2, np.float32), "z": np.ones(2, np.float32)}], [{"y": np.ones(2, np.float32)}], lambda _: NONE)
    assert not result.passed
    assert result.verdict.failures == ["output 'z': output missing from the candidate"]


# ------------------------------------------------------------------------------ verdicts


def test_verdict_names_the_output_and_bound_and_what_would_pass():
    ref = np.array([[1.0, -2.0, 3.0, 4.0]], np.float32)
    cand = ref + np.array([[0.0, 0.123456, 0.0, 0.0]], np.float32)
    tolerance = Tolerance(max_abs=0.01, min_cosine=0.999999, min_sqnr_db=80.0)
    metrics, verdict = metrics_of(ref, cand, tolerance)
    assert not verdict.passed and len(verdict.failures) == 3
    assert all(f.startswith("output 'y': ") for f in verdict.failures)
    assert [re.search(r"passes with (\w+)=", f).group(1) for f in verdict.failures] == ["max_abs", "min_cosine", "min_sqnr_db"]
    passing = verdict.smallest_passing["y"]
    assert passing["max_abs"] == metrics.max_abs and passing["min_sqnr_db"] == metrics.sqnr_db
    assert judge([metrics], lambda _: Tolerance(**passing)).passed
    # the rounded value printed in the message passes too
    printed = {m.group(1): float(m.group(2)) for f in verdict.failures for m in [re.search(r"passes with (\w+)=(\S+)\)", f)]}
    assert judge([metrics], lambda _: Tolerance(**printed)).passed


def test_tolerance_precedence_per_output_then_per_pass_then_default_then_pass_default():
    per_output, per_pass, default, pass_default = (Tolerance(max_abs=v) for v in (1.0, 2.0, 3.0, 4.0))
    full = Tolerances(default=default, per_pass={"prune": per_pass}, per_output={"y": per_output})
    assert full.for_output("y", "prune", pass_default) is per_output
    assert full.for_output("z", "prune", pass_default) is per_pass
    assert full.for_output("z", "quantize", pass_default) is default
    assert full.for_output("z", None, pass_default) is default
    assert Tolerances(per_pass={"prune": per_pass}).for_output("z", "fold", pass_default) is pass_default


# ------------------------------------------------------------------------------ input sources

DYNAMIC_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[batch, seq, feat] x, float[?, 3] z) => (float[batch, seq, feat] y, float[?, 3] w) {
    y = Relu (x)
    w = Neg (z)
}
"""
EMBED_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (int64[1, 64] ids) => (float[1, 64, 4] y) {
    y = Gather (table, ids)
}
"""
FIXED_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 3] x) => (float[N, 3] y) {
    y = Relu (x)
}
"""


def test_synthetic_inputs_shape_dynamic_dims():
    feeds = list(SyntheticInputs(parse(DYNAMIC_TEXT), samples=2, dims={"seq": 5}).feeds())
    assert len(feeds) == 1  # the samples stacked along the batch axis: one run, not one per sample
    assert feeds[0]["x"].shape == (2, 5, 32) and feeds[0]["x"].dtype == np.float32
    assert feeds[0]["z"].shape == (2, 3)
    # --dims batch=3: each of the 16 samples a batch of 3, stacked
    assert next(SyntheticInputs(parse(DYNAMIC_TEXT), dims={"batch": 3, "feat": 2}).feeds())["x"].shape == (48, 32, 2)


def test_synthetic_inputs_are_deterministic_per_seed():
    model = parse(DYNAMIC_TEXT)
    first, again, other = (next(SyntheticInputs(model, seed=s).feeds()) for s in (7, 7, 8))
    assert len(first["x"]) == 16
    np.testing.assert_array_equal(first["x"], again["x"])
    assert not np.array_equal(first["x"], other["x"])
    assert not np.array_equal(first["x"][0], first["x"][1])


def test_token_ids_for_gather_stay_inside_the_table(rng):
    model = with_initializers(onnx.parser.parse_model(EMBED_TEXT), table=rng.standard_normal((11, 4)).astype(np.float32))
    feeds = list(SyntheticInputs(model, samples=8).feeds())
    ids = np.concatenate([f["ids"] for f in feeds])
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() == 10  # [0, 11), and the range is used
    run(model, feeds[0])  # onnxruntime accepts them


def test_int_range_overrides_the_table_size(rng):
    model = with_initializers(onnx.parser.parse_model(EMBED_TEXT), table=rng.standard_normal((11, 4)).astype(np.float32))
    ids = np.concatenate([f["ids"] for f in SyntheticInputs(model, int_range=(3, 5)).feeds()])
    assert set(np.unique(ids)) == {3, 4}


def _x(value: float, rows: int = 2) -> np.ndarray:
    return np.full((rows, 3), value, np.float32)


def test_resolve_inputs_reads_an_npz_file_and_a_folder(tmp_path):
    model = parse(FIXED_TEXT)
    np.savez(tmp_path / "b.npz", x=_x(2.0), label=np.array([1, 2]))
    np.savez(tmp_path / "a.npz", x=_x(1.0, rows=4))
    [one] = collect_feeds(resolve_inputs(tmp_path / "b.npz", model), model)
    assert list(one) == ["x"]  # the label is ignored
    np.testing.assert_array_equal(one["x"], _x(2.0))
    both = collect_feeds(resolve_inputs(str(tmp_path), model), model)
    assert [f["x"][0, 0] for f in both] == [1.0, 2.0] and both[0]["x"].shape == (4, 3)


def test_resolve_inputs_takes_a_list_of_dicts():
    model = parse(FIXED_TEXT)
    feeds = collect_feeds(resolve_inputs([{"x": _x(1.0)}, {"x": _x(5.0), "label": 3}], model), model)
    assert [f["x"][0, 0] for f in feeds] == [1.0, 5.0]


class Reader(CalibrationDataReader):
    """A single-use reader, as onnxruntime's quantization tools expect."""

    def __init__(self, values: list[float]) -> None:
        self.pending = iter([{"x": _x(v)} for v in values])

    def get_next(self):
        return next(self.pending, None)


def test_resolve_inputs_takes_a_calibration_data_reader():
    model = parse(FIXED_TEXT)
    source = resolve_inputs(Reader([1.0, 2.0, 3.0]), model)
    assert [f["x"][0, 0] for f in collect_feeds(source, model)] == [1.0, 2.0, 3.0]
    assert len(collect_feeds(source, model)) == 3  # kept: a second pass sees the same feeds
    assert len(collect_feeds(source, model, limit=2)) == 2


def test_spread_samples_take_evenly_spaced_rows_across_batched_feeds_and_first_samples_the_head():
    from onnxsparse.calibration import FirstSamples, SpreadSamples

    feeds = [{"x": np.arange(start, end, dtype=np.float32)[:, None]} for start, end in ((0, 10), (10, 13), (13, 40))]
    from onnxsparse.calibration import IterableInputs

    source = IterableInputs(feeds)
    assert [f["x"].ravel().tolist() for f in SpreadSamples(source, 5).feeds()] == [[0], [10], [20, 29, 39]]
    assert [f["x"].ravel().tolist() for f in FirstSamples(source, 12).feeds()] == [list(range(10)), [10, 11]]
    assert sum(len(f["x"]) for f in SpreadSamples(source, 100).feeds()) == 40  # fewer samples than asked: all of them
    rest = np.concatenate([f["x"].ravel() for f in SpreadSamples(source, 5, others=True).feeds()])
    assert sorted(rest.tolist()) == sorted(set(range(40)) - {0, 10, 20, 29, 39})


def test_intermediate_tensors_are_read_in_bounded_runs_of_a_large_feed_and_only_along_a_batch_axis():
    from onnxsparse import activations
    from onnxsparse.calibration import IterableInputs

    x = np.arange(40 * 3, dtype=np.float32).reshape(40, 3) - 60
    runs = list(activations.tensor_values(parse(FIXED_TEXT), IterableInputs([{"x": x}]), ["y"]))
    assert [len(run["y"]) for run in runs] == [16, 16, 8]
    np.testing.assert_array_equal(np.concatenate([run["y"] for run in runs]), np.maximum(x, 0))
    fixed = parse(FIXED_TEXT.replace("float[N, 3] x", "float[40, 3] x").replace("float[N, 3] y", "float[40, 3] y"))
    assert [len(run["y"]) for run in activations.tensor_values(fixed, IterableInputs([{"x": x}]), ["y"])] == [40]
    # a dynamic axis 0 not named as a batch may be time (a time-major LSTM): never cut
    timed = parse(FIXED_TEXT.replace("[N, 3]", "[seq, 3]"))
    assert [len(run["y"]) for run in activations.tensor_values(timed, IterableInputs([{"x": x}]), ["y"])] == [40]


@pytest.mark.parametrize("output", ["y = Relu (x)", "y = ReduceSum <keepdims = 0> (x)"])
def test_validation_runs_a_large_feed_in_bounded_batches_unless_an_output_spans_the_batch(output):
    from onnxsparse.runtime import make_session
    from onnxsparse.validation import run_feeds

    x = np.arange(40 * 3, dtype=np.float32).reshape(40, 3) - 60
    model = parse(FIXED_TEXT.replace("y = Relu (x)", output).replace("float[N, 3] y", "float y" if "Reduce" in output else "float[N, 3] y"))
    session = make_session(model, "test")
    batches: list[int] = []

    class Spy:  # the session, recording the batch of every run
        def __getattr__(self, name):
            return getattr(session, name)

        def run(self, names, feed, options=None):
            batches.append(len(feed["x"]))
            return session.run(names, feed, options)

    [values] = run_feeds(Spy(), [{"x": x}], "test")  # type: ignore[arg-type]
    expected = np.maximum(x, 0) if "Relu" in output else x.sum()
    np.testing.assert_allclose(values["y"], expected, rtol=1e-6)
    # outputs that carry the batch first are read in runs of 16; a reduction over it is run whole
    assert batches == ([16, 16, 8] if "Relu" in output else [40])


def test_resolve_inputs_without_a_spec_is_synthetic():
    source = resolve_inputs(None, parse(FIXED_TEXT), samples=3, seed=5)
    assert isinstance(source, SyntheticInputs) and (source.samples, source.seed) == (3, 5)


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({"label": np.zeros(2)}, "input 'x' is missing"),
        ({"x": _x(1.0).astype(np.float64)}, "input 'x' has dtype float64, the model expects float32"),
        ({"x": np.zeros((2, 4), np.float32)}, r"input 'x' has shape \(2, 4\), the model expects \('N', 3\)"),
        ({"x": np.zeros((2, 3, 1), np.float32)}, "input 'x' has shape"),
    ],
)
def test_collect_feeds_names_the_input_that_does_not_match(feed, message):
    model = parse(FIXED_TEXT)
    with pytest.raises(InputDataError, match=message):
        collect_feeds(resolve_inputs([feed], model), model)


def test_empty_folder_and_missing_path_are_input_errors(tmp_path):
    model = parse(FIXED_TEXT)
    with pytest.raises(InputDataError, match="no .npz"):
        resolve_inputs(tmp_path, model)
    with pytest.raises(InputDataError, match="no such input"):
        resolve_inputs(tmp_path / "gone.npz", model)
    with pytest.raises(InputDataError, match="yielded no feeds"):
        collect_feeds(resolve_inputs([], model), model)


# ------------------------------------------------------------------------------ reference runs


def test_reference_validates_the_same_model_with_exact():
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    feeds = collect_feeds(resolve_inputs(MODELS / "digits_cnn.inputs.npz", model), model)
    assert feeds[0]["input"].shape == (32, 1, 8, 8)
    result = Reference.of(model, feeds, "digits_cnn").validate(model, lambda _: EXACT, "same")
    assert result.passed and result.feeds == 1
    [logits] = result.outputs
    assert (logits.name, logits.shape, logits.max_abs, logits.top1) == ("logits", [32, 10], 0.0, 1.0)


def test_reference_fails_a_model_with_a_perturbed_weight():
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    feeds = collect_feeds(resolve_inputs(MODELS / "digits_cnn.inputs.npz", model), model)
    reference = Reference.of(model, feeds, "digits_cnn")
    perturbed = onnx.ModelProto()
    perturbed.CopyFrom(model)
    gemm = next(n for n in perturbed.graph.node if n.op_type == "Gemm")
    tensor = next(t for t in perturbed.graph.initializer if t.name == gemm.input[1])
    values = onnx.numpy_helper.to_array(tensor) * np.float32(1.05)
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, name=tensor.name))
    result = reference.validate(perturbed, lambda _: EXACT, "perturbed")
    assert not result.passed
    assert result.verdict.failures[0].startswith("output 'logits': rel ")
    assert result.outputs[0].max_rel > 1e-3


def test_session_from_a_file_leaves_the_callers_model_untouched(monkeypatch):
    # Models near protobuf's 2 GB limit go to onnxruntime as a file with external data; force that path.
    monkeypatch.setattr(importlib.import_module("onnxsparse.runtime"), "_SESSION_FROM_FILE_BYTES", 0)
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    before = model.SerializeToString()
    feeds = collect_feeds(resolve_inputs(MODELS / "digits_cnn.inputs.npz", model), model)
    result = Reference.of(model, feeds, "digits_cnn").validate(model, lambda _: EXACT, "same")
    assert result.passed
    assert model.SerializeToString() == before


def test_an_npz_source_reads_each_file_once_and_hands_out_read_only_arrays(tmp_path, monkeypatch):
    from onnxsparse import calibration

    for index in range(3):
        np.savez(tmp_path / f"{index}.npz", x=np.full((2, 3), index, dtype=np.float32))
    source = resolve_inputs(str(tmp_path), parse("<ir_version: 8, opset_import: [\"\" : 17]> g (float[N, 3] x) => (float[N, 3] y) { y = Relu (x) }"))
    reads = []
    real_load = np.load
    monkeypatch.setattr(calibration.np, "load", lambda path, **kw: reads.append(path) or real_load(path, **kw))
    first = [feed["x"] for feed in source.feeds()]
    again = [feed["x"] for feed in source.feeds()]
    assert len(reads) == 3 and all(a is b for a, b in zip(first, again))
    with pytest.raises(ValueError, match="read-only"):
        first[0][0, 0] = 7  # a pass that writes into its calibration data would change it for every later pass
    monkeypatch.setattr(calibration, "KEPT_FEED_BYTES", 0)  # past the budget, files are read each time
    fresh = resolve_inputs(str(tmp_path), parse("<ir_version: 8, opset_import: [\"\" : 17]> g (float[N, 3] x) => (float[N, 3] y) { y = Relu (x) }"))
    list(fresh.feeds()), list(fresh.feeds())
    assert len(reads) == 3 + 6


def test_class_scores_of_a_label_or_a_sequence_per_sample_get_a_passs_bound_on_what_is_read_and_maps_do_not():
    """[batch, classes] logits carry one label per sample, a recogniser's [batch, frames, classes] a
    sequence of them (axis 0 following the samples); a time-major [frames, batch, classes] output and
    a [batch, H, W, classes] map of scores are left to cosine."""
    from onnxsparse.validation import Reference

    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x, float[N, 5, 8] f, float[N, 4, 4, 8] m) => (float[N, 8] logits, float[N, 5, 8] frames, float[5, N, 8] step_scores,
                                                                 float[N, 4, 4, 8] map) {
        logits = Softmax (x)
        frames = Softmax <axis = -1> (f)
        step_scores = Transpose <perm = [1, 0, 2]> (frames)
        map = Softmax <axis = -1> (m)
    }""")
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(3, 8)).astype(np.float32), "f": rng.normal(size=(3, 5, 8)).astype(np.float32),
              "m": rng.normal(size=(3, 4, 4, 8)).astype(np.float32)}]
    reference = Reference.of(model, feeds, "test")
    assert reference.scores == {"logits", "frames", "step_scores", "map"}  # step_scores: named like scores
    assert reference.labels == {"logits"} and reference.sequences == {"frames"}
