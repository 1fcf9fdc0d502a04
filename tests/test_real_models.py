"""The real-model task library (tools/realmodels): metrics on hand-computed values, the task loader on
a tiny cache built here, and (marked ``real``) the four cached models from tools/fetch_models.py."""

from __future__ import annotations

import hashlib
import itertools
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


# --------------------------------------------------------------------------- detection metrics


def yolo_output(rows: list[tuple[float, float, float, float, int, float]], classes: int = 3) -> np.ndarray:
    """One image's YOLOv8 output [1, 4 + classes, anchors] from (cx, cy, w, h, class, probability) rows."""
    output = np.zeros((1, 4 + classes, len(rows)), dtype=np.float32)
    for anchor, (cx, cy, w, h, cls, probability) in enumerate(rows):
        output[0, :4, anchor] = cx, cy, w, h
        output[0, 4 + cls, anchor] = probability
    return output


def test_box_iou_and_xywh_to_xyxy() -> None:
    boxes = metrics.xywh_to_xyxy(np.array([[5.0, 5.0, 10.0, 10.0], [10.0, 5.0, 10.0, 10.0]]))
    assert boxes.tolist() == [[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]]
    assert metrics.box_iou(boxes, boxes) == pytest.approx(np.array([[1.0, 50 / 150], [50 / 150, 1.0]]))
    assert metrics.box_iou(boxes[:1], np.array([[20.0, 20.0, 30.0, 30.0]])).tolist() == [[0.0]]


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [5, 0, 15, 10]])
    scores = np.array([0.6, 0.9, 0.5, 0.7])
    # 1 (0.9) suppresses 0 (IoU 0.82); 3 overlaps 1 by 60/140 = 0.43 <= 0.5 and stays; 2 stands apart
    assert metrics.nms(boxes, scores, 0.5).tolist() == [1, 3, 2]


def test_yolo_detections_threshold_classwise_nms_and_order() -> None:
    output = yolo_output([
        (5, 5, 10, 10, 0, 0.9),   # kept
        (6, 5, 10, 10, 0, 0.8),   # same class, IoU 0.82 with the first: suppressed
        (6, 5, 10, 10, 1, 0.7),   # other class on the same spot: kept (NMS is per class)
        (50, 50, 10, 10, 2, 0.2),  # under the 0.25 score threshold
    ])
    (found,) = metrics.yolo_detections(output)
    assert found.classes.tolist() == [0, 1]
    assert found.scores.tolist() == pytest.approx([0.9, 0.7])
    assert found.boxes.tolist() == [[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]]


def test_detections_kept_needs_same_class_and_iou() -> None:
    reference = metrics.yolo_detections(yolo_output([(5, 5, 10, 10, 0, 0.9), (30, 30, 10, 10, 1, 0.8),
                                                     (60, 60, 10, 10, 2, 0.8), (90, 90, 10, 10, 0, 0.6)]))
    candidate = metrics.yolo_detections(yolo_output([(6, 5, 10, 10, 0, 0.5),  # IoU 0.82: kept
                                                     (30, 30, 10, 10, 2, 0.8),  # wrong class: lost
                                                     (66, 60, 10, 10, 2, 0.8),  # IoU 4/16 = 0.25: lost
                                                     (90, 90, 10, 10, 0, 0.3)]))  # kept
    assert metrics.detections_kept(reference, candidate) == 0.5
    assert metrics.detections_kept(reference, reference) == 1.0
    assert metrics.detections_kept(candidate[:0], candidate[:0]) == 1.0


def test_detection_scores_map50_precision_recall() -> None:
    gt_boxes = np.zeros((2, 2, 4), dtype=np.float32)
    gt_boxes[0, 0] = [0, 0, 10, 10]
    gt_boxes[0, 1] = [20, 20, 30, 30]
    gt_boxes[1, 0] = [0, 0, 10, 10]
    gt_classes = np.array([[0, 1], [0, -1]])
    found = metrics.yolo_detections(np.concatenate([
        yolo_output([(5, 5, 10, 10, 0, 0.9), (25, 25, 10, 10, 1, 0.4), (60, 60, 10, 10, 1, 0.8)]),  # TP, TP, FP (better score)
        yolo_output([(5, 5, 10, 10, 0, 0.3), (6, 6, 10, 10, 2, 0.3), (60, 60, 10, 10, 2, 0.3)]),  # TP, FP, FP (class 2 has no truth)
    ]))
    scores = metrics.detection_scores(found, gt_boxes, gt_classes)
    # class 0: TP, TP -> AP 1; class 1: FP then TP -> precision 1/2 at recall 1 -> AP 0.5; class 2: no truth, not averaged
    assert scores == pytest.approx({"map50": 0.75, "precision": 3 / 6, "recall": 1.0})


def test_detection_metric_file_loads_in_onnxsparse_and_scores_kept_detections() -> None:
    from onnxsparse.validation import TaskMetric

    metric = TaskMetric.load(f"{TOOLS / 'realmodels' / 'detection_metric.py'}:matched_detections")
    reference = [{"output0": yolo_output([(5, 5, 10, 10, 0, 0.9), (30, 30, 10, 10, 1, 0.8)])},
                 {"output0": yolo_output([(60, 60, 10, 10, 2, 0.8), (90, 90, 10, 10, 0, 0.6)])}]
    candidate = [{"output0": yolo_output([(5, 5, 10, 10, 0, 0.9), (30, 30, 10, 10, 1, 0.8)])},
                 {"output0": yolo_output([(60, 60, 10, 10, 2, 0.8), (90, 90, 10, 10, 0, 0.1)])}]  # the last drops under 0.25
    inputs = [{"images": np.zeros((1, 1, 8, 8), dtype=np.float32)}] * 2
    assert (metric.measure(reference, reference, inputs).value, metric.measure(reference, reference, inputs).within_budget) == (1.0, True)
    result = metric.measure(reference, candidate, inputs)
    assert (result.value, result.within_budget) == (0.75, False)


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
ORIGIN_KEY = {"mobilenetv2": "view", "ppocr_rec": "text", "minilm": "sentence", "mpnet": "sentence", "mnist": None, "resnet18": None, "dwstack": None,
              "conv1d_seq": None, "bytecnn": "window", "detector": None}
# What the fp32 model must reach on its own eval split (ground-truth metrics), with margin.
FP32_FLOORS = {
    "mobilenetv2": {"fp32_accuracy": 0.8},
    "ppocr_rec": {"fp32_exact_match": 0.8},
    "minilm": {"fp32_paraphrase_top1": 0.8},
    "mpnet": {"fp32_paraphrase_top1": 0.8},
    "mnist": {"fp32_accuracy": 0.95},
    "resnet18": {"fp32_accuracy": 0.95},
    "dwstack": {"fp32_accuracy": 0.95},
    "conv1d_seq": {"fp32_accuracy": 0.95},
    "bytecnn": {"fp32_accuracy": 0.88},
    "detector": {"fp32_map50": 0.85},
}
# Metrics of a candidate against fp32 that equal these when the candidate IS the fp32 model.
PERFECT = {
    "top1_agreement": 1.0, "top5_containment": 1.0, "logit_cosine": 1.0, "text_agreement": 1.0,
    "cer_vs_fp32": 0.0, "embedding_cosine": 1.0, "embedding_cosine_min": 1.0, "nn_agreement": 1.0, "detections_kept": 1.0,
}


def cached_task(name: str):
    if name not in available_models():
        pytest.skip(f"real model {name!r} is not in the cache {cache_dir()}: run `{FETCH_COMMAND}` (several minutes, once)")
    return load_task(name)


def origins(archive: dict[str, np.ndarray], key: str | None, input_name: str = "input") -> set[str]:
    if key is None:  # no names: a sample is its pixels
        return {hashlib.sha1(row.tobytes()).hexdigest() for row in archive[input_name]}
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
        assert not origins(dict(calibration), key, task.input_names[0]) & origins(dict(evaluation), key, task.input_names[0])
    assert task.info["calibration"]["size"] == sum(len(next(iter(f.values()))) for f in task.calibration)
    assert task.info["eval"]["size"] == sum(len(next(iter(f.values()))) for f in task.eval_feeds)


@pytest.mark.real
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_real_models_training_split_shares_no_sample_with_its_eval_split(name: str) -> None:
    """train.npz (distill's data=, where an export or tools/realmodels/export_mobilenetv2_train.py wrote
    one) never holds what the task is scored on."""
    task = cached_task(name)
    folder = task.model_path.parent
    if not (folder / "train.npz").exists():
        pytest.skip(f"{name}: no training split in the cache")
    with np.load(folder / "train.npz") as train, np.load(folder / "eval.npz") as evaluation:
        key = ORIGIN_KEY[name]
        trained_on = origins(dict(train), key, task.input_names[0])
        assert trained_on and not trained_on & origins(dict(evaluation), key, task.input_names[0])


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


@pytest.mark.real
def test_detector_metric_file_agrees_with_the_task_evaluator() -> None:
    """detection_metric.py (what onnxsparse --metric loads) and the benchmark's evaluator decode the same
    way: on a candidate whose scores are damped (some detections fall under 0.25) both give one figure."""
    from onnxsparse.validation import TaskMetric

    task = cached_task("detector")
    fp32 = task.run()
    damped = fp32.copy()
    damped[:, 4:] *= 0.6
    kept = task.evaluate(fp32, damped)["detections_kept"]
    assert 0.0 < kept < 1.0
    metric = TaskMetric.load(f"{TOOLS / 'realmodels' / 'detection_metric.py'}:matched_detections")
    bounds = list(itertools.pairwise(np.cumsum([0] + [len(feed["images"]) for feed in task.eval_feeds])))
    reference = [{"output0": fp32[a:b]} for a, b in bounds]
    candidate = [{"output0": damped[a:b]} for a, b in bounds]
    result = metric.measure(reference, candidate, task.eval_feeds)
    assert result.value == pytest.approx(kept, abs=1e-12)
    assert not result.within_budget
    assert metric.measure(reference, reference, task.eval_feeds).value == 1.0


def test_fortune_files_give_plain_prose_sentences_once_and_never_a_held_one(tmp_path):
    """The sentence embedders' training text: a fortune file's cookies cut into sentences, keeping plain
    prose of a few words; verse, an attribution and what follows it, code, shouting (a line, or a
    sentence of many capitals), a sentence cut at its start, a repeat (in other case) and a calibration
    or eval sentence are left out."""
    from realmodels.fortune_sentences import sentences_in

    (tmp_path / "b_file").write_text(
        "A stitch in time saves nine, as my grandmother used to say.\n"
        "%\n"
        "Never put off until tomorrow what you can do today.\n"
        "\t\t-- Benjamin Franklin\n"
        "Nothing written after the attribution belongs to the cookie.\n"
        "%\n"
        "    Roses are red and violets are blue, she said to him\n"
        "And so the verse ran on into a line of prose. The next sentence here is a whole one.\n"
        "THIS IS A VERY LOUD SENTENCE THAT NOBODY WANTS HERE.\n"
        "The NASA team met the ESA team today in town.\n"
        "%\n"
        "if (x == 1) { return the value of the thing; }\n"
        "%\n"
        "The held sentence is in the calibration data already.\n"
        "%\n"
        "A stitch in Time saves nine, as my grandmother used to say.\n"
        "Short one.\n")
    (tmp_path / "a_file").write_text(
        "The early bird gets the worm, but the second mouse gets the cheese.\n"
        "%\n"
        "half a sentence broken over\n"
        "two lines without a start. The next one is whole and reads well.\n")
    found = sentences_in([tmp_path / "b_file", tmp_path / "a_file"], (6, 24), {"The held sentence is in the calibration data already."})
    assert found == [
        "The early bird gets the worm, but the second mouse gets the cheese.",  # a_file comes first: file-name order
        "The next one is whole and reads well.",
        "A stitch in time saves nine, as my grandmother used to say.",
        "Never put off until tomorrow what you can do today.",
        "The next sentence here is a whole one.",  # the one before it may start mid-verse
    ]
