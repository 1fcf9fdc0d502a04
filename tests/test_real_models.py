"""The real-model task library (tools/realmodels): metrics on hand-computed values, the task loader on
a tiny cache built here, and (marked ``real``) the four cached models from tools/fetch_models.py."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

from realmodels import (
    FETCH_COMMAND,
    MODEL_NAMES,
    available_models,
    cache_dir,
    load_task,
    metrics,
)

# --------------------------------------------------------------------------- metrics


def test_top1_agreement_counts_matching_argmax() -> None:
    reference = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    candidate = np.array([[0.0, 5.0, 1.0], [0.0, 2.0, 1.0]])  # argmax 1 (= ref), 1 (ref: 0)
    assert metrics.top1_agreement(reference, candidate) == 0.5


def test_topk_containment_looks_for_reference_top1_in_candidate_topk() -> None:
    reference = np.array([[0.0, 0.0, 9.0, 0.0], [9.0, 0.0, 0.0, 0.0]])  # top-1: 2, 0
    candidate = np.array([[0.0, 3.0, 2.0, 1.0], [1.0, 3.0, 2.0, 0.0]])  # ranks: 1 > 2 > 3 > 0; 1 > 2 > 0 > 3
    assert metrics.topk_containment(reference, candidate, k=1) == 0.0
    assert metrics.topk_containment(reference, candidate, k=2) == 0.5  # class 2 in {1, 2}; class 0 not
    assert metrics.topk_containment(reference, candidate, k=3) == 1.0  # class 0 is third in row 2
    assert metrics.topk_containment(reference, candidate, k=5) == 1.0  # k above the class count: all classes


def test_mean_cosine_per_sample_then_mean() -> None:
    reference = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    candidate = np.array([[0.0, 1.0], [2.0, 2.0], [-3.0, -4.0]])  # cosines 0, 1, -1
    assert metrics.mean_cosine(reference, candidate) == pytest.approx(0.0)
    assert metrics.mean_cosine(reference[1:2], candidate[1:2]) == pytest.approx(1.0)


def test_mean_cosine_flattens_each_sample_and_handles_zero_vectors() -> None:
    reference = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    candidate = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    # identical (1), both zero (1), zero vs non-zero (0)
    assert metrics.mean_cosine(reference, candidate) == pytest.approx(2 / 3)


def test_accuracy_against_labels() -> None:
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert metrics.accuracy(logits, np.array([1, 0, 0, 0])) == 0.75


@pytest.mark.parametrize("function", [metrics.top1_agreement, metrics.topk_containment, metrics.mean_cosine])
def test_shape_mismatch_is_an_error(function) -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        function(np.zeros((2, 6)), np.zeros((3, 6)))


def one_hot_path(path: list[int], classes: int) -> np.ndarray:
    scores = np.full((len(path), classes), 0.01)
    scores[np.arange(len(path)), path] = 0.9
    return scores


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks() -> None:
    charset = ["", "a", "b", " "]
    # a a _ a b b _ _ " " a  -> a | a | b | " " | a  (the blank splits the two a's)
    paths = np.stack([one_hot_path([1, 1, 0, 1, 2, 2, 0, 0, 3, 1], 4), one_hot_path([0] * 10, 4)])
    assert metrics.ctc_greedy_decode(paths, charset) == ["aab a", ""]


def test_ctc_greedy_decode_checks_charset_size() -> None:
    with pytest.raises(ValueError, match="charset"):
        metrics.ctc_greedy_decode(np.zeros((1, 5, 4)), ["", "a", "b"])


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3), ("same", "same", 0), ("ab", "ba", 2)],
)
def test_levenshtein_known_values(a: str, b: str, distance: int) -> None:
    assert metrics.levenshtein(a, b) == distance
    assert metrics.levenshtein(b, a) == distance


def test_character_error_rate_is_total_edits_over_total_reference_length() -> None:
    # abcd -> abed: 1 substitution; ef -> e: 1 deletion; 2 edits over 6 reference characters
    assert metrics.character_error_rate(["abcd", "ef"], ["abed", "e"]) == pytest.approx(1 / 3)
    assert metrics.character_error_rate(["ab"], ["abxyz"]) == pytest.approx(1.5)  # insertions can exceed 1
    with pytest.raises(ValueError):
        metrics.character_error_rate([""], [""])


def test_exact_match_fraction() -> None:
    assert metrics.exact_match(["one", "two", "three"], ["one", "tw0", "three"]) == pytest.approx(2 / 3)


def test_nearest_neighbours_exclude_self_and_use_cosine() -> None:
    # cosine, not euclidean: [10, 1] is far from [1, 0] in distance but nearly parallel
    vectors = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [0.1, 1.0]])
    assert metrics.nearest_neighbours(vectors).tolist() == [1, 0, 3, 2]


def test_nearest_neighbour_agreement() -> None:
    reference = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0]])
    candidate = reference.copy()
    candidate[3] = [0.8, 0.2]  # now closest to row 1 (cosine 0.991) instead of row 2
    assert metrics.nearest_neighbours(reference).tolist() == [1, 0, 3, 2]
    assert metrics.nearest_neighbours(candidate).tolist() == [1, 0, 3, 1]
    assert metrics.nearest_neighbour_agreement(reference, candidate) == 0.75


# --------------------------------------------------------------------------- task loader on a tiny cache

TINY_CLASSIFIER = """
<ir_version: 8, opset_import: ["" : 17]>
tiny (float[batch, 3] input) => (float[batch, 3] logits) {
    logits = Identity (input)
}
"""


def write_tiny_mnist_cache(cache: Path) -> Path:
    """A cache entry named 'mnist' whose model is Identity over 3 'classes'."""
    folder = cache / "mnist"
    folder.mkdir(parents=True)
    onnx.save(onnx.parser.parse_model(TINY_CLASSIFIER), str(folder / "model.onnx"))
    inputs = np.array([[3.0, 1, 0], [0, 2, 1], [1, 0, 5], [4, 0, 1], [0, 0, 1]], dtype=np.float32)
    np.savez(folder / "eval.npz", input=inputs, label=np.array([0, 1, 2, 1, 2]))  # 4 of 5 right
    np.savez(folder / "calibration.npz", input=inputs[:3], label=np.array([0, 1, 2]))
    info = {
        "name": "mnist",
        "task": "digit-classification",
        "batch_size": 2,
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 3]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}],
    }
    (folder / "info.json").write_text(json.dumps(info))
    return folder


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXSPARSE_MODEL_CACHE", str(tmp_path / "from-env"))
    assert cache_dir() == (tmp_path / "from-env").resolve()
    assert cache_dir(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    monkeypatch.delenv("ONNXSPARSE_MODEL_CACHE")
    assert cache_dir() == (Path.home() / ".cache" / "onnxsparse" / "models").resolve()


def test_load_task_batches_feeds_and_scores_candidates(tmp_path: Path) -> None:
    folder = write_tiny_mnist_cache(tmp_path)
    assert available_models(tmp_path) == ["mnist"]
    task = load_task("mnist", tmp_path)
    assert [len(feed["input"]) for feed in task.eval_feeds] == [2, 2, 1]
    assert [len(feed["input"]) for feed in task.calibration] == [2, 1]
    assert set(task.eval_data) == {"label"}

    fp32 = task.run()
    assert fp32.shape == (5, 3)
    self_scores = task.evaluate(fp32, fp32)
    assert self_scores == pytest.approx(
        {"accuracy": 0.8, "fp32_accuracy": 0.8, "top1_agreement": 1.0, "top5_containment": 1.0, "logit_cosine": 1.0}
    )

    # A candidate that swaps classes 0 and 1: answers [1, 0, 2, 1, 2] instead of [0, 1, 2, 0, 2].
    swapped = onnx.parser.parse_model(TINY_CLASSIFIER.replace("Identity (input)", "Gather <axis = 1> (input, order)"))
    swapped.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, 0, 2], dtype=np.int64), "order"))
    candidate = folder / "swapped.onnx"
    onnx.save(swapped, str(candidate))
    scores = task.evaluate_model(candidate)
    assert scores["top1_agreement"] == pytest.approx(2 / 5)
    assert scores["accuracy"] == pytest.approx(3 / 5)  # labels [0, 1, 2, 1, 2]: rows 2, 3, 4 right
    assert scores["fp32_accuracy"] == 0.8


def test_load_task_names_the_fetch_command_when_absent(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fetch_models.py"):
        load_task("minilm", tmp_path)
    with pytest.raises(KeyError):
        load_task("resnet", tmp_path)


# --------------------------------------------------------------------------- the real cached models

# The key in eval.npz / calibration.npz that identifies a sample's origin, to check the split.
ORIGIN_KEY = {"mobilenetv2": "view", "ppocr_rec": "text", "minilm": "sentence", "mnist": None, "resnet18": None, "dwstack": None,
              "conv1d_seq": None, "bytecnn": "window"}
# What the fp32 model must reach on its own eval split (ground-truth metrics), with margin.
FP32_FLOORS = {
    "mobilenetv2": {"fp32_accuracy": 0.8},
    "ppocr_rec": {"fp32_exact_match": 0.8},
    "minilm": {"fp32_paraphrase_top1": 0.8},
    "mnist": {"fp32_accuracy": 0.95},
    "resnet18": {"fp32_accuracy": 0.95},
    "dwstack": {"fp32_accuracy": 0.95},
    "conv1d_seq": {"fp32_accuracy": 0.95},
    "bytecnn": {"fp32_accuracy": 0.88},
}
# Metrics of a candidate against fp32 that equal these when the candidate IS the fp32 model.
PERFECT = {
    "top1_agreement": 1.0, "top5_containment": 1.0, "logit_cosine": 1.0, "text_agreement": 1.0,
    "cer_vs_fp32": 0.0, "embedding_cosine": 1.0, "nn_agreement": 1.0,
}


def cached_task(name: str):
    if name not in available_models():
        pytest.skip(f"real model {name!r} is not in the cache {cache_dir()}: run `{FETCH_COMMAND}` (several minutes, once)")
    return load_task(name)


def origins(archive: dict[str, np.ndarray], key: str | None) -> set[str]:
    if key is None:  # no names: a sample is its pixels
        return {hashlib.sha1(row.tobytes()).hexdigest() for row in archive["input"]}
    return {str(value).split(":")[0] for value in archive[key]}


@pytest.mark.real
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_real_model_is_valid_onnx(name: str) -> None:
    task = cached_task(name)
    model = onnx.load(str(task.model_path))
    assert model.ir_version <= 10
    onnx.checker.check_model(str(task.model_path), full_check=True)
    session = ort.InferenceSession(str(task.model_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == task.input_names
    assert all(set(feed) == set(task.input_names) for feed in task.calibration + task.eval_feeds)


@pytest.mark.real
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_real_model_fp32_against_itself_is_perfect(name: str) -> None:
    task = cached_task(name)
    fp32 = task.run()
    scores = task.evaluate(fp32, fp32)
    for key, value in scores.items():
        if key in PERFECT:
            assert value == pytest.approx(PERFECT[key], abs=1e-6), key
    for key, floor in FP32_FLOORS[name].items():
        assert scores[key] >= floor, f"{name}: fp32 {key} = {scores[key]:.3f} < {floor}"
    # info.json recorded the same fp32 scores at export time
    for key, value in task.info["fp32_task_metrics"].items():
        assert scores[key] == pytest.approx(value, abs=1e-6)


@pytest.mark.real
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_real_model_calibration_and_eval_are_disjoint(name: str) -> None:
    task = cached_task(name)
    folder = task.model_path.parent
    with np.load(folder / "calibration.npz") as calibration, np.load(folder / "eval.npz") as evaluation:
        key = ORIGIN_KEY[name]
        assert not origins(dict(calibration), key) & origins(dict(evaluation), key)
    assert task.info["calibration"]["size"] == sum(len(next(iter(f.values()))) for f in task.calibration)
    assert task.info["eval"]["size"] == sum(len(next(iter(f.values()))) for f in task.eval_feeds)


@pytest.mark.real
@pytest.mark.parametrize("name", ["mobilenetv2", "resnet18"])
def test_removing_all_zero_channels_of_a_real_cnn_leaves_its_outputs_unchanged(name: str, tmp_path: Path) -> None:
    """magnitude-prune with whole-filter structure, then channel-prune{mode=zero-only}: the channels
    really go (fewer MACs) and the outputs equal the filter-pruned model's (<= 1e-5 relative)."""
    from onnxsparse import optimize
    from onnxsparse.inspect_model import count_macs

    task = cached_task(name)
    folder = task.model_path.parent
    data = {"inputs": folder / "eval.npz", "calibration": folder / "calibration.npz", "policy": "keep"}
    zeroed, removed = tmp_path / "zeroed.onnx", tmp_path / "removed.onnx"
    prune = "fold-batchnorm,magnitude-prune{pattern=filter sparsity=0.3 skip_depthwise=true}"
    optimize(task.model_path, zeroed, prune, **data)
    report = optimize(zeroed, removed, "channel-prune{mode=zero-only}", **data)
    assert report.steps[0].status == "committed"
    assert report.steps[0].figures["channels_removed"] > 0
    assert count_macs(onnx.load(str(removed))) < count_macs(onnx.load(str(zeroed)))
    before, after = task.run(zeroed), task.run(removed)
    scale = float(np.max(np.abs(before)))
    assert float(np.max(np.abs(after - before))) <= 1e-5 * scale
