"""A cached real model with its calibration feeds, eval feeds and task metric (numpy + onnxruntime)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .paths import FETCH_COMMAND, MODEL_FILES, cache_dir, model_dir

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
# (fp32 outputs, candidate outputs, eval.npz arrays that are not model inputs) -> metrics
Evaluator = Callable[[np.ndarray, np.ndarray, Mapping[str, np.ndarray]], dict[str, float]]


def _classifier_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    return {
        "top1_agreement": metrics.top1_agreement(reference, candidate),
        "top5_containment": metrics.topk_containment(reference, candidate, k=5),
        "logit_cosine": metrics.mean_cosine(reference, candidate),
    }


def _evaluate_imagenet(reference: np.ndarray, candidate: np.ndarray, data: Mapping[str, np.ndarray]) -> dict[str, float]:
    # Agreement with the fp32 model's answer on every view; accuracy only on the views of labelled
    # ImageNet photos (label >= 0: the other photos have no ImageNet class).
    scores = _classifier_agreement(reference, candidate)
    labels = data.get("label")
    if labels is not None and (labels >= 0).any():
        known = labels >= 0
        scores["accuracy"] = metrics.accuracy(candidate[known], labels[known])
        scores["fp32_accuracy"] = metrics.accuracy(reference[known], labels[known])
    return scores


def _evaluate_labels(reference: np.ndarray, candidate: np.ndarray, data: Mapping[str, np.ndarray]) -> dict[str, float]:
    """A classifier with a ground-truth class per sample (key 'label'): the digit models, bytecnn."""
    labels = data["label"]
    return {
        "accuracy": metrics.accuracy(candidate, labels),
        "fp32_accuracy": metrics.accuracy(reference, labels),
        **_classifier_agreement(reference, candidate),
    }


def _evaluate_text_lines(reference: np.ndarray, candidate: np.ndarray, data: Mapping[str, np.ndarray]) -> dict[str, float]:
    charset = [str(c) for c in data["charset"]]
    truth = [str(t) for t in data["text"]]
    reference_text = metrics.ctc_greedy_decode(reference, charset)
    candidate_text = metrics.ctc_greedy_decode(candidate, charset)
    # Against ground truth, spaces at either end do not count: the crop's white margin is no text
    # (PaddleOCR's own RecMetric goes further and ignores every space). Against fp32 all characters count.
    reference_read = [text.strip() for text in reference_text]
    candidate_read = [text.strip() for text in candidate_text]
    return {
        "exact_match": metrics.exact_match(truth, candidate_read),
        "cer": metrics.character_error_rate(truth, candidate_read),
        "fp32_exact_match": metrics.exact_match(truth, reference_read),
        "fp32_cer": metrics.character_error_rate(truth, reference_read),
        "text_agreement": metrics.exact_match(reference_text, candidate_text),
        "cer_vs_fp32": _cer_vs(reference_text, candidate_text),
    }


def _cer_vs(reference_text: Sequence[str], candidate_text: Sequence[str]) -> float:
    # The fp32 model may read a line as "": CER against it is undefined there, count edits per char of the rest.
    if sum(len(t) for t in reference_text) == 0:
        return 0.0 if all(not t for t in candidate_text) else float("inf")
    return metrics.character_error_rate(reference_text, candidate_text)


def _paraphrase_top1(embeddings: np.ndarray, pair_id: np.ndarray) -> float:
    """Fraction of sentences that have a paraphrase in the set whose nearest neighbour is one."""
    neighbours = metrics.nearest_neighbours(embeddings)
    has_pair = np.array([np.sum(pair_id == p) > 1 for p in pair_id]) & (pair_id >= 0)
    hits = (pair_id[neighbours] == pair_id) & has_pair
    return float(np.sum(hits) / max(int(np.sum(has_pair)), 1))


def _evaluate_embeddings(reference: np.ndarray, candidate: np.ndarray, data: Mapping[str, np.ndarray]) -> dict[str, float]:
    pair_id = data["pair_id"]
    return {
        "embedding_cosine": metrics.mean_cosine(reference, candidate),
        "embedding_cosine_min": metrics.min_cosine(reference, candidate),
        "nn_agreement": metrics.nearest_neighbour_agreement(reference, candidate),
        "paraphrase_top1": _paraphrase_top1(candidate, pair_id),
        "fp32_paraphrase_top1": _paraphrase_top1(reference, pair_id),
    }


def _evaluate_detections(reference: np.ndarray, candidate: np.ndarray, data: Mapping[str, np.ndarray]) -> dict[str, float]:
    """A YOLOv8-style detector (output0 [batch, 4 + classes, anchors]) against ground-truth boxes
    (gt_boxes [n, max objects, 4] x1y1x2y2 pixels, gt_classes [n, max objects], -1 = padding) and
    against the fp32 model's own detections (``detections_kept``: the share of them the
    candidate still finds, same class at IoU >= 0.5)."""
    reference_found = metrics.yolo_detections(reference)
    candidate_found = metrics.yolo_detections(candidate)
    truth = (data["gt_boxes"], data["gt_classes"])
    scores = metrics.detection_scores(candidate_found, *truth)
    fp32 = metrics.detection_scores(reference_found, *truth)
    return {
        **scores,
        **{f"fp32_{key}": value for key, value in fp32.items()},
        "detections_kept": metrics.detections_kept(reference_found, candidate_found),
    }


EVALUATORS: dict[str, Evaluator] = {
    "imagenet-classification": _evaluate_imagenet,
    "digit-classification": _evaluate_labels,
    "text-classification": _evaluate_labels,
    "ctc-text-recognition": _evaluate_text_lines,
    "sentence-embedding": _evaluate_embeddings,
    "digit-detection": _evaluate_detections,
}


def _batches(arrays: Mapping[str, np.ndarray], names: Sequence[str], batch_size: int) -> list[Feed]:
    count = len(arrays[names[0]])
    return [{name: arrays[name][start : start + batch_size] for name in names} for start in range(0, count, batch_size)]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    # allow_pickle stays off: strings are stored as numpy unicode arrays, never as objects.
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


@dataclass(frozen=True)
class Task:
    """One cached model. ``calibration`` and ``eval_feeds`` are lists of feed dicts keyed by the
    model's input names (batches of ``info['batch_size']``); ``eval_data`` holds what the metric needs
    besides the inputs (labels, reference strings, the CTC charset, ...)."""

    name: str
    model_path: Path
    info: dict[str, Any]
    calibration: list[Feed]
    eval_feeds: list[Feed]
    eval_data: dict[str, np.ndarray] = field(repr=False)

    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self.info["inputs"]]

    @property
    def output_name(self) -> str:
        """The output the metric reads (every model here has exactly one)."""
        return str(self.info["outputs"][0]["name"])

    def run(self, model: str | os.PathLike[str] | None = None, feeds: Sequence[Feed] | None = None) -> np.ndarray:
        """Run ``model`` (default: the fp32 model) on ``feeds`` (default: the eval feeds) in
        onnxruntime and return the metric's output, batches concatenated along the sample axis."""
        import onnxruntime as ort

        session = ort.InferenceSession(str(model or self.model_path), providers=["CPUExecutionProvider"])
        feeds = self.eval_feeds if feeds is None else feeds
        return np.concatenate([session.run([self.output_name], feed)[0] for feed in feeds], axis=0)

    def evaluate(self, outputs_fp32: np.ndarray, outputs_candidate: np.ndarray) -> dict[str, float]:
        """Task metrics of candidate outputs against the fp32 outputs (both over all eval feeds)."""
        return EVALUATORS[self.info["task"]](outputs_fp32, outputs_candidate, self.eval_data)

    def evaluate_model(self, candidate: str | os.PathLike[str], reference: np.ndarray | None = None) -> dict[str, float]:
        """Run a candidate ``.onnx`` on the eval split and score it against the fp32 model
        (pass ``reference=task.run()`` to reuse fp32 outputs across candidates)."""
        fp32 = self.run() if reference is None else reference
        result = self.evaluate(fp32, self.run(candidate))
        log.info("%s: %s on %s", self.name, candidate, result)
        return result


def load_task(name: str, cache: str | os.PathLike[str] | None = None) -> Task:
    """Load a fetched model's task; FileNotFoundError (naming the fetch command) if it is not cached."""
    folder = model_dir(name, cache)
    missing = [file for file in MODEL_FILES if not (folder / file).is_file()]
    if missing:
        raise FileNotFoundError(
            f"real model {name!r} is not in the cache {cache_dir(cache)} (missing {', '.join(missing)}); run `{FETCH_COMMAND}`"
        )
    return load_task_from(folder)


def load_task_from(folder: str | os.PathLike[str]) -> Task:
    """A task from any folder laid out like a cache entry (the exporters score their output
    before fetch_models.py renames it into place)."""
    folder = Path(folder)
    info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
    names = [spec["name"] for spec in info["inputs"]]
    batch_size = int(info["batch_size"])
    calibration = _load_npz(folder / "calibration.npz")
    evaluation = _load_npz(folder / "eval.npz")
    return Task(
        name=str(info["name"]),
        model_path=folder / "model.onnx",
        info=info,
        calibration=_batches(calibration, names, batch_size),
        eval_feeds=_batches(evaluation, names, batch_size),
        eval_data={key: value for key, value in evaluation.items() if key not in names},
    )
