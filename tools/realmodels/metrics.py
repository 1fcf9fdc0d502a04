"""Task metrics for the real models: pure numpy, one small function per measure.

Agreement metrics compare a candidate's outputs with the fp32 model's outputs on the same inputs
(1.0 = the candidate behaves exactly like the original); task metrics compare with ground truth
(labels, reference strings). Every function takes batched arrays, sample axis first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "accuracy",
    "character_error_rate",
    "ctc_greedy_decode",
    "exact_match",
    "levenshtein",
    "mean_cosine",
    "nearest_neighbour_agreement",
    "nearest_neighbours",
    "top1_agreement",
    "topk_containment",
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
    """Cosine similarity per sample (each sample flattened), averaged over samples.

    Two zero vectors count as identical (1.0); a zero vector against a non-zero one as 0.0.
    """
    _check_same_shape(reference, candidate)
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    dot = np.sum(ref * cand, axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    both_zero = (np.linalg.norm(ref, axis=1) < eps) & (np.linalg.norm(cand, axis=1) < eps)
    cosine = np.where(norms > eps, dot / np.maximum(norms, eps), 0.0)
    return float(np.mean(np.where(both_zero, 1.0, cosine)))


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
