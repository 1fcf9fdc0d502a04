"""Ready-made onnxsparse ``--metric`` functions for the budgets of issue #20's real-model runs, where a
bound on whole outputs is not the task's own measure:

    onnxsparse tune minilm/model.onnx -o fast.onnx --metric tools/realmodels/task_metrics.py:worst_sentence_cosine ...
    onnxsparse tune ppocr_rec/model.onnx -o fast.onnx --metric tools/realmodels/task_metrics.py:text_unchanged ...

Only numpy: onnxsparse loads this file by path into its own process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SENTENCE_COSINE_BUDGET = 0.98  # every sentence's embedding at least this close to the original's


def _only(outputs: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(next(iter(outputs.values())))


def worst_sentence_cosine(reference: Sequence[Mapping[str, Any]], candidate: Sequence[Mapping[str, Any]],
                          inputs: Sequence[Mapping[str, Any]]) -> tuple[float, bool]:
    """(the smallest cosine between a sentence's embedding and the original's, >= the budget)."""
    del inputs
    ref = np.concatenate([_only(o).reshape(len(_only(o)), -1) for o in reference]).astype(np.float64)
    cand = np.concatenate([_only(o).reshape(len(_only(o)), -1) for o in candidate]).astype(np.float64)
    cosines = (ref * cand).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12)
    worst = float(cosines.min())
    return worst, worst >= SENTENCE_COSINE_BUDGET


def text_unchanged(reference: Sequence[Mapping[str, Any]], candidate: Sequence[Mapping[str, Any]],
                   inputs: Sequence[Mapping[str, Any]]) -> tuple[float, bool]:
    """(the share of text lines a CTC recogniser reads exactly as the original does, all of them):
    greedy CTC decoding (best class per step, repeats merged, class 0 the blank) of both models'
    [lines, steps, classes] outputs, compared as class sequences (no charset needed)."""
    del inputs
    same = total = 0
    for ref_out, cand_out in zip(reference, candidate):
        for ref_line, cand_line in zip(_only(ref_out), _only(cand_out)):
            same += _ctc(ref_line) == _ctc(cand_line)
            total += 1
    share = same / max(total, 1)
    return share, share == 1.0


def _ctc(probabilities: np.ndarray) -> tuple[int, ...]:
    best = probabilities.argmax(-1)
    merged = [int(c) for i, c in enumerate(best) if i == 0 or c != best[i - 1]]
    return tuple(c for c in merged if c != 0)
