"""Task metrics for the real models: pure numpy, one small function per measure.

Agreement metrics compare a candidate's outputs with the fp32 model's outputs on the same inputs
(1.0 = the candidate behaves exactly like the original); task metrics compare with ground truth
(labels, reference strings, boxes). Every function takes batched arrays, sample axis first; the detection
functions decode a YOLO output into one ``Detections`` per image first (``yolo_detections``) and compare those.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "Detections",
    "accuracy",
    "box_iou",
    "character_error_rate",
    "ctc_greedy_decode",
    "detection_scores",
    "detections_kept",
    "exact_match",
    "levenshtein",
    "mean_cosine",
    "nearest_neighbour_agreement",
    "nearest_neighbours",
    "nms",
    "top1_agreement",
    "topk_containment",
    "xywh_to_xyxy",
    "yolo_detections",
]


def _check_same_shape(reference: np.ndarray, candidate: np.ndarray) -> None:
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs candidate {candidate.shape}")


def top1_agreement(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    """Fraction of samples whose arg-max class is the same in both (last axis = classes)."""
    _check_same_shape(reference_logits, candidate_logits)
    return float(np.mean(np.argmax(reference_logits, axis=-1) == np.argmax(candidate_logits, axis=-1)))


def topk_containment(reference_logits: np.ndarray, candidate_logits: np.ndarray, k: int = 5) -> float:
    """Fraction of samples whose reference top-1 class is among the candidate's top-k classes.

    Softer than top-1 agreement: near-ties between the first classes (cat breeds, say) flip top-1
    under any perturbation without the model getting worse.
    """
    _check_same_shape(reference_logits, candidate_logits)
    reference_top1 = np.argmax(reference_logits, axis=-1)
    k = min(k, reference_logits.shape[-1])  # fewer classes than k: every class is in the top k
    # argpartition puts the k largest in the last k slots, in no order: enough for membership.
    candidate_topk = np.argpartition(candidate_logits, -k, axis=-1)[..., -k:]
    return float(np.mean(np.any(candidate_topk == reference_top1[..., None], axis=-1)))


def mean_cosine(reference: np.ndarray, candidate: np.ndarray, eps: float = 1e-12) -> float:
    """Cosine similarity per sample (each sample flattened), averaged over samples."""
    return float(np.mean(sample_cosines(reference, candidate, eps)))


def min_cosine(reference: np.ndarray, candidate: np.ndarray, eps: float = 1e-12) -> float:
    """The lowest cosine similarity of one sample (each sample flattened): the worst sentence or image."""
    return float(np.min(sample_cosines(reference, candidate, eps)))


def sample_cosines(reference: np.ndarray, candidate: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Cosine similarity per sample, each flattened. Two zero vectors count as identical (1.0); a zero
    vector against a non-zero one as 0.0."""
    _check_same_shape(reference, candidate)
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    dot = np.sum(ref * cand, axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    both_zero = (np.linalg.norm(ref, axis=1) < eps) & (np.linalg.norm(cand, axis=1) < eps)
    cosine = np.where(norms > eps, dot / np.maximum(norms, eps), 0.0)
    return np.where(both_zero, 1.0, cosine)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max class equals the integer label."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {logits.shape} do not match labels {labels.shape}")
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def ctc_greedy_decode(probs: np.ndarray, charset: Sequence[str], blank: int = 0) -> list[str]:
    """Best-path CTC decoding of [batch, time, classes] scores: arg-max per step, merge repeats,
    drop blanks. ``charset[i]`` is the string of class ``i`` (PaddleOCR: 0 = blank, last = space)."""
    if probs.ndim != 3:
        raise ValueError(f"expected [batch, time, classes] scores, got shape {probs.shape}")
    if probs.shape[-1] != len(charset):
        raise ValueError(f"{probs.shape[-1]} classes but a charset of {len(charset)}")
    best = np.argmax(probs, axis=-1)
    texts = []
    for path in best:
        keep = np.ones(len(path), dtype=bool)
        keep[1:] = path[1:] != path[:-1]
        keep &= path != blank
        texts.append("".join(charset[int(index)] for index in path[keep]))
    return texts


def levenshtein(a: Sequence[object], b: Sequence[object]) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, item_a in enumerate(a, start=1):
        current = [i]
        for j, item_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (item_a != item_b)))
        previous = current
    return previous[-1]


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER: total edit distance over total reference length (long lines weigh more,
    as in the usual OCR benchmarks; a per-line mean would let short lines dominate)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    total = sum(len(reference) for reference in references)
    if total == 0:
        raise ValueError("references are all empty: CER is undefined")
    return sum(levenshtein(ref, hyp) for ref, hyp in zip(references, hypotheses)) / total


def exact_match(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Fraction of strings reproduced exactly."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no strings to compare")
    return sum(ref == hyp for ref, hyp in zip(references, hypotheses)) / len(references)


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """For each row, the index of the most cosine-similar OTHER row (itself excluded)."""
    if embeddings.ndim != 2 or len(embeddings) < 2:
        raise ValueError(f"need a [n >= 2, dim] matrix, got shape {embeddings.shape}")
    vectors = embeddings.astype(np.float64)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argmax(similarity, axis=1)


def nearest_neighbour_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of samples whose nearest neighbour within the set is the same under both embeddings:
    what a retrieval system built on the embeddings would notice."""
    _check_same_shape(reference, candidate)
    return float(np.mean(nearest_neighbours(reference) == nearest_neighbours(candidate)))


# --------------------------------------------------------------------------- detection (YOLOv8-style output)

# Deployment defaults of a YOLO detector: keep a box when its best class probability reaches 0.25,
# then class-wise non-maximum suppression at IoU 0.5. A detection matches a box at IoU >= 0.5.
SCORE_THRESHOLD = 0.25
NMS_IOU = 0.5
MATCH_IOU = 0.5


class Detections(NamedTuple):
    """One image's detections: ``boxes`` [k, 4] x1, y1, x2, y2 in pixels, ``scores`` [k], ``classes`` [k]
    (int64), sorted by score, best first."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """[..., 4] centre x, centre y, width, height -> x1, y1, x2, y2."""
    centre, half = boxes[..., :2], boxes[..., 2:4] / 2
    return np.concatenate([centre - half, centre + half], axis=-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, 4] x [m, 4] x1y1x2y2 boxes -> [n, m] intersection over union (0 where both are empty)."""
    a = a.astype(np.float64).reshape(-1, 4)
    b = b.astype(np.float64).reshape(-1, 4)
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    intersection = np.prod(np.clip(high - low, 0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU) -> np.ndarray:
    """Greedy non-maximum suppression of one class: indices kept, best score first. A box goes when
    its IoU with a kept, better box exceeds ``iou_threshold``."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while len(order):
        best, order = order[0], order[1:]
        keep.append(int(best))
        if len(order):
            order = order[box_iou(boxes[best : best + 1], boxes[order])[0] <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def yolo_detections(
    output: np.ndarray, score_threshold: float = SCORE_THRESHOLD, iou_threshold: float = NMS_IOU
) -> list[Detections]:
    """Decode a YOLOv8 export's ``output0`` [batch, 4 + classes, anchors] (boxes as centre x, centre y,
    width, height in pixels, then class probabilities) as ultralytics' predictor does with
    ``multi_label=False``: score = best class probability, class = its index, keep scores >=
    ``score_threshold``, class-wise NMS at ``iou_threshold``. One Detections per image."""
    if output.ndim != 3 or output.shape[1] < 5:
        raise ValueError(f"expected a YOLO output [batch, 4 + classes, anchors], got shape {output.shape}")
    results = []
    for image in output.astype(np.float64):
        probabilities = image[4:].T  # [anchors, classes]
        classes = np.argmax(probabilities, axis=1)
        scores = probabilities[np.arange(len(classes)), classes]
        chosen = scores >= score_threshold
        boxes, scores, classes = xywh_to_xyxy(image[:4].T[chosen]), scores[chosen], classes[chosen]
        keep = np.concatenate([np.flatnonzero(classes == c)[nms(boxes[classes == c], scores[classes == c], iou_threshold)]
                               for c in np.unique(classes)] or [np.zeros(0, dtype=np.int64)])
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        results.append(Detections(boxes[keep], scores[keep], classes[keep].astype(np.int64)))
    return results


def _greedy_matches(reference: Detections, candidate: Detections, iou_threshold: float = MATCH_IOU) -> int:
    """How many of ``reference``'s detections (best score first) find a still unmatched candidate
    detection of the same class at IoU >= ``iou_threshold`` (the best-overlapping one)."""
    if not len(reference.boxes) or not len(candidate.boxes):
        return 0
    iou = box_iou(reference.boxes, candidate.boxes)
    iou[reference.classes[:, None] != candidate.classes[None, :]] = -1.0
    free = np.ones(len(candidate.boxes), dtype=bool)
    matched = 0
    for row in np.argsort(-reference.scores, kind="stable"):
        overlaps = np.where(free, iou[row], -1.0)
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou_threshold:
            free[best] = False
            matched += 1
    return matched


def detections_kept(reference: Sequence[Detections], candidate: Sequence[Detections], iou_threshold: float = MATCH_IOU) -> float:
    """Share of the reference model's detections that the candidate also finds (same class, IoU >=
    ``iou_threshold``, one-to-one), over all images; 1.0 when the reference finds nothing."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference images but {len(candidate)} candidate images")
    total = sum(len(r.boxes) for r in reference)
    if total == 0:
        return 1.0
    return sum(_greedy_matches(r, c, iou_threshold) for r, c in zip(reference, candidate)) / total


def _truth(gt_boxes: np.ndarray, gt_classes: np.ndarray, image: int) -> tuple[np.ndarray, np.ndarray]:
    real = gt_classes[image] >= 0  # -1 pads the images with fewer objects
    return gt_boxes[image][real].astype(np.float64), gt_classes[image][real].astype(np.int64)


def detection_scores(
    detections: Sequence[Detections], gt_boxes: np.ndarray, gt_classes: np.ndarray, iou_threshold: float = MATCH_IOU
) -> dict[str, float]:
    """Detections against ground truth (``gt_boxes`` [images, max objects, 4] x1y1x2y2 pixels,
    ``gt_classes`` [images, max objects], -1 = padding): ``map50`` = mean over the classes present of
    the area under the (monotone envelope of the) precision-recall curve, VOC 2010+ style, with a
    detection a true positive when the best-overlapping box of its class and image has IoU >=
    ``iou_threshold`` and was not matched by a better detection; ``precision`` and ``recall`` of the
    detection set as given (after the score threshold and NMS)."""
    if len(detections) != len(gt_boxes):
        raise ValueError(f"{len(detections)} images of detections but {len(gt_boxes)} of ground truth")
    records: list[tuple[int, float, bool]] = []  # (class, score, true positive)
    truth_per_class: dict[int, int] = {}
    for image, found in enumerate(detections):
        boxes, classes = _truth(gt_boxes, gt_classes, image)
        for c in classes.tolist():
            truth_per_class[c] = truth_per_class.get(c, 0) + 1
        taken = np.zeros(len(boxes), dtype=bool)
        iou = box_iou(found.boxes, boxes)
        for row in np.argsort(-found.scores, kind="stable"):
            same = classes == found.classes[row]
            overlaps = np.where(same, iou[row], -1.0)
            best = int(np.argmax(overlaps)) if len(boxes) else -1
            hit = best >= 0 and overlaps[best] >= iou_threshold and not taken[best]
            if hit:
                taken[best] = True
            records.append((int(found.classes[row]), float(found.scores[row]), bool(hit)))
    precisions = []
    for c, count in sorted(truth_per_class.items()):
        rows = sorted((r for r in records if r[0] == c), key=lambda r: -r[1])
        hits = np.array([r[2] for r in rows], dtype=np.float64)
        true_positives = np.cumsum(hits)
        recall = np.concatenate([[0.0], true_positives / count, [1.0]])
        precision = np.concatenate([[1.0], true_positives / np.maximum(np.arange(1, len(hits) + 1), 1), [0.0]])
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope: best precision at this recall or more
        precisions.append(float(np.sum((recall[1:] - recall[:-1]) * precision[1:])))
    found_total = len(records)
    true_total = sum(r[2] for r in records)
    truth_total = sum(truth_per_class.values())
    return {
        "map50": float(np.mean(precisions)) if precisions else 0.0,
        "precision": true_total / found_total if found_total else 1.0,
        "recall": true_total / truth_total if truth_total else 1.0,
    }
