"""The validator: run the original and the candidate in onnxruntime and say how far outputs moved.

Per output: max abs error, max error relative to the output's scale (max |reference|), cosine
similarity, SQNR in dB; for score-like outputs (float, rank >= 2, last axis >= 2) top-1 agreement
and KL divergence of the softmax at a temperature; for integer outputs the fraction of exactly equal
elements. NaN/Inf where the reference is finite fails whatever the tolerance.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .calibration import SpreadSamples, batch_dim, collect_feeds, in_chunks, sample_axis, samples_in
from .errors import InputDataError, RuntimeLoadError
from .graph import with_initializer_values
from .runtime import Runtime, make_session, open_session, single_threaded, usable_cores
from .text import did_you_mean
from .weightstore import store_of

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
ProgressCallback = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------
# tolerances
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """Bounds on the metrics of one output; a bound left None is not checked."""

    max_abs: float | None = None
    max_rel: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None
    max_top1_drop: float | None = None
    max_kl: float | None = None
    min_agreement: float | None = None
    min_sequence_agreement: float | None = None
    max_sequence_drop: float | None = None

    def __post_init__(self) -> None:
        for bound in fields(self):
            value = getattr(self, bound.name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or math.isnan(value):
                raise InputDataError(f"tolerance {bound.name}={value!r} is not a number")
            # a bound no metric can meet fails every model (max_rel=-1), one outside a fraction's
            # range is a typo (min_cosine=99 for 0.99): both are refused rather than judged by
            low, high = _BOUND_RANGES.get(bound.name, (-math.inf, math.inf))
            if not low <= value <= high:
                raise InputDataError(f"tolerance {bound.name}={value:g} is outside [{low:g}, {high:g}]")

    def describe(self) -> str:
        bounds = [f"{name}={value:g}" for name, value in asdict(self).items() if value is not None]
        return " ".join(bounds) or "none"


TOLERANCE_FIELDS = tuple(f.name for f in fields(Tolerance))
# The range each metric takes; a bound outside it can never be met or is a typo. min_cosine=-1 is
# allowed: it is how a caller says "any direction" and still gets NaN/Inf and shape checks.
_BOUND_RANGES = {
    "max_abs": (0.0, math.inf), "max_rel": (0.0, math.inf), "max_kl": (0.0, math.inf),
    "min_cosine": (-1.0, 1.0), "min_top1": (0.0, 1.0), "min_agreement": (0.0, 1.0), "max_top1_drop": (0.0, 1.0),
    "min_sequence_agreement": (0.0, 1.0), "max_sequence_drop": (0.0, 1.0),
}


def loosest(a: Tolerance, b: Tolerance) -> Tolerance:
    """Every bound either sets, at the looser value where both set it: the budget of two lossy passes."""
    merged = {}
    for bound in TOLERANCE_FIELDS:
        values = [v for v in (getattr(a, bound), getattr(b, bound)) if v is not None]
        merged[bound] = (max(values) if bound.startswith("max_") else min(values)) if values else None
    return Tolerance(**merged)


# Exact passes (cleanup, folding): float rounding only, relative to each output's scale.
# 1e-3 rather than 1e-4: folding BatchNorm into PP-OCRv4's 38 convolutions moves its softmax output
# by 1.25e-4 of its scale (cosine 1.000000, same argmax everywhere): rounding, not a change.
EXACT = Tolerance(max_rel=1e-3, min_agreement=1.0)
# The default top-1 accuracy class-score outputs may lose under a lossy pass, as the original's
# probabilities count it (Pass.score_tolerance, OutputMetrics.top1_drop): one point. Counted that
# way, not as agreement: MobileNetV2 flips 1 of 32 near-tied views when any single one of its layers
# is int8, so "agreement >= 0.99" kept 63 of its 64 layers float.
SCORE_MAX_TOP1_DROP = 0.01
# The same for the labels read from each sample of a [batch, positions, classes] output (a text
# line; OutputMetrics.sequence_drop): one point. PP-OCRv4 int8 variants that read 0.69 of their lines
# unchanged passed a cosine bound of 0.97. Not as agreement either: a line the original itself reads
# on a near tie flips under any change, and "every line the same" kept PP-OCRv4 wholly float.
SCORE_MAX_SEQUENCE_DROP = 0.01


def with_score_bounds(tolerance: Tolerance) -> Tolerance:
    """A lossy pass's tolerance for the outputs a user reads labels from (label_outputs): its own
    bounds plus one point of the accuracy of what is read, a label or a sequence of them per sample."""
    return replace(tolerance, max_top1_drop=SCORE_MAX_TOP1_DROP, max_sequence_drop=SCORE_MAX_SEQUENCE_DROP)



@dataclass(frozen=True)
class Tolerances:
    """Which tolerance applies where: per output, then per pass, then global, then the pass's default."""

    default: Tolerance | None = None
    per_pass: Mapping[str, Tolerance] = field(default_factory=dict)
    per_output: Mapping[str, Tolerance] = field(default_factory=dict)

    def checked(self, outputs: list[str], passes: list[str] | None = None) -> Tolerances:
        """Self, or an error: a tolerance for an output or pass that does not exist is a typo."""

        for name in self.per_output:
            if name not in outputs:
                raise InputDataError(f"tolerance for unknown output '{name}'{did_you_mean(name, outputs)}; the model's outputs are {outputs}")
        for name in self.per_pass:
            if passes is None or name not in passes:
                raise InputDataError(f"tolerance for pass '{name}', which is not in the pipeline ({', '.join(passes or [])})")
        return self

    def for_output(self, output: str, pass_name: str | None, pass_default: Tolerance) -> Tolerance:
        """The most specific tolerance the user set for this output and pass, else the pass's default."""
        if output in self.per_output:
            return self.per_output[output]
        if pass_name is not None and pass_name in self.per_pass:
            return self.per_pass[pass_name]
        return self.default if self.default is not None else pass_default


# ---------------------------------------------------------------------------------------------
# the user's task metric
# ---------------------------------------------------------------------------------------------

Outputs = Sequence[Mapping[str, Any]]
# (the original's outputs, the candidate's, the inputs), feed by feed -> (value, within the budget)
MetricFunction = Callable[[Outputs, Outputs, Sequence[Feed]], tuple[float, bool]]


@dataclass(frozen=True)
class MetricResult:
    """What the user's task metric said of a candidate."""

    name: str
    value: float
    within_budget: bool


def _import_file(path: Path) -> Any:
    """A metric's .py file as a module, imported as Python would import it from its folder: registered
    in sys.modules (dataclasses look their module up there) and able to import its neighbours."""
    name = f"onnxsparse_user_metric_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputDataError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(folder)
    return module


@dataclass(frozen=True)
class TaskMetric:
    """The user's measure of the task (accuracy against labels, matched boxes, retrieval recall...),
    judged beside the tolerances wherever a candidate is judged: the guard of a pass, each step, the
    final model. ``function(reference, candidate, feeds)`` gets the original's and the candidate's
    outputs and the inputs, feed by feed, and returns the metric's value and whether it is within
    the user's budget."""

    function: MetricFunction
    name: str = ""

    @classmethod
    def load(cls, spec: str) -> TaskMetric:
        """``module:function`` (importable) or ``path/to/file.py:function``."""
        where, _, attribute = spec.rpartition(":")
        if not where or not attribute:
            raise InputDataError(f"--metric '{spec}': expected module:function or file.py:function")
        try:
            if where.endswith(".py"):
                module = _import_file(Path(where))
            else:
                module = importlib.import_module(where)
        except InputDataError:
            raise
        except Exception as error:  # noqa: BLE001 - the user's module may raise anything on import
            raise InputDataError(f"--metric '{spec}': cannot import {where}: {type(error).__name__}: {_first_line(error)}") from error
        function = getattr(module, attribute, None)
        if not callable(function):
            raise InputDataError(f"--metric '{spec}': {where} has no function '{attribute}'")
        return cls(function, spec)

    def measure(self, reference: Outputs, candidate: Outputs, feeds: Sequence[Feed]) -> MetricResult:
        """The metric on these outputs; its exceptions and wrong return types are the user's input errors."""
        label = self.name or getattr(self.function, "__name__", "metric")
        try:
            value, within = self.function(reference, candidate, feeds)
        except Exception as error:  # noqa: BLE001 - the user's code; its failure is bad input, not ours
            raise InputDataError(f"metric {label} raised {type(error).__name__}: {_first_line(error)}") from error
        if not isinstance(value, (int, float, np.number)) or not isinstance(within, (bool, np.bool_)):
            raise InputDataError(f"metric {label} returned {value!r}, {within!r}: expected (a number, whether it is within the budget)")
        return MetricResult(label, float(value), bool(within))


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


@dataclass
class OutputMetrics:
    """How far one output moved, over every feed."""

    name: str
    dtype: str
    shape: list[int]
    max_abs: float | None = 0.0
    max_rel: float | None = 0.0
    cosine: float | None = 1.0
    sqnr_db: float | None = math.inf
    top1: float | None = None
    # The top-1 accuracy the candidate loses if the original's probabilities are right: the mean over
    # rows of p(original's class) - p(candidate's class), both by the original. A flip between two
    # near-tied classes costs little, one away from a confident class nearly a whole row.
    top1_drop: float | None = None
    top1_drop_error: float | None = None  # standard error of that mean over ``rows``
    top1_interval: tuple[float, float] | None = None  # 95% Wilson interval of top1 over ``rows``
    rows: int = 0  # score rows top1 and kl were computed over (samples x positions)
    kl: float | None = None
    agreement: float | None = None  # integer/bool/string outputs: fraction of equal elements
    # [batch, positions, classes] scores: the share of samples whose labels read the same (read_labels)
    sequence_agreement: float | None = None
    # the accuracy of what is read lost if the original's probabilities are right, as top1_drop with a
    # sample's read in the place of its best class: the mean over samples of P(original's read) -
    # P(candidate's read) by the original's probabilities (read_log_probability), where the reads differ
    sequence_drop: float | None = None
    sequence_drop_error: float | None = None  # standard error of that mean over ``sequences``
    sequences: int = 0  # samples the sequence metrics were computed over
    nonfinite: int = 0
    compared: bool = True
    broken: bool = False
    note: str = ""

    def value_of(self, bound: str) -> float | None:
        """The metric a tolerance bound constrains (``max_abs`` -> max_abs, ``min_top1`` -> top1)."""
        metric = bound.removeprefix("max_").removeprefix("min_") if bound not in ("max_abs", "max_rel") else bound
        return getattr(self, metric)


class _OutputAccumulator:
    """Streams one output's statistics over feeds, so memory grows with the feed count only by a
    number per sample of a sequence output."""

    def __init__(self, name: str, temperature: float, scores: bool | None = None, sequences: bool | None = None) -> None:
        self.name = name
        self.temperature = temperature
        self.scores = scores  # True/False: the output is / is not class scores; None: judged by its shape alone
        self.sequences = sequences  # the same for reading a sequence per sample (rank 3: [batch, positions, classes])
        self.dtype = ""
        self.shape: list[int] = []
        self.max_abs = 0.0
        self.scale = 0.0
        self.dot = self.ref_sq = self.cand_sq = self.err_sq = 0.0
        self.equal = self.count = self.nonfinite = 0
        self.top1_equal = self.rows = 0
        self.drop_sum = self.drop_sq_sum = 0.0
        self.kl_sum = 0.0
        # per sample of a sequence output: whether it reads otherwise, and what that costs (sequence_drop)
        self.background: int | None = None  # the class not read: the commonest in the original's first feed
        self.read_changed: list[bool] = []
        self.read_drops: list[float] = []
        self.unit = 0.0
        self.note = ""
        self.broken = False
        self.scored = False

    def mark_broken(self, why: str) -> None:
        """The candidate's output cannot be compared at all: a failure whatever the tolerance."""
        self.broken = True
        self.note = why

    def add(self, reference: object, candidate: object) -> None:
        """One feed's value of this output: a tensor, a sequence of tensors, or a map."""
        if isinstance(reference, list) or isinstance(candidate, list):
            if not (isinstance(reference, list) and isinstance(candidate, list)) or len(reference) != len(candidate):
                self.mark_broken("sequence length or type changed")
                return
            for ref_item, cand_item in zip(reference, candidate):
                self.add(ref_item, cand_item)
            return
        if isinstance(reference, dict) or isinstance(candidate, dict):
            if reference != candidate:
                self.mark_broken("map output changed")
            return
        if not isinstance(reference, np.ndarray) or not isinstance(candidate, np.ndarray):
            self.mark_broken(f"cannot compare outputs of type {type(reference).__name__}")
            return
        self.dtype, self.shape = str(reference.dtype), list(reference.shape)
        if reference.shape != candidate.shape:
            self.mark_broken(f"shape changed from {list(reference.shape)} to {list(candidate.shape)}")
            return
        self.equal += int(np.sum(reference == candidate))
        self.count += reference.size
        if np.issubdtype(reference.dtype, np.number) or reference.dtype == np.bool_:
            self._add_numbers(reference.astype(np.float64), candidate.astype(np.float64))

    def _add_numbers(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref_bad, cand_bad = ~np.isfinite(ref), ~np.isfinite(cand)
        same_nonfinite = ref_bad & cand_bad & ((ref == cand) | (np.isnan(ref) & np.isnan(cand)))
        self.nonfinite += int(np.sum((ref_bad | cand_bad) & ~same_nonfinite))
        finite = ~ref_bad & ~cand_bad
        ref_f, cand_f = np.where(finite, ref, 0.0), np.where(finite, cand, 0.0)
        error = cand_f - ref_f
        if not error.size:
            return
        self.max_abs = max(self.max_abs, float(np.max(np.abs(error))))
        self.scale = max(self.scale, float(np.max(np.abs(ref_f))))
        # Sums are taken in units of the first feed's scale: cosine and SQNR do not depend on it,
        # and values near 1e200 would otherwise overflow when squared.
        if self.unit == 0.0:
            self.unit = self.scale or 1.0
        ref_u, cand_u, error_u = ref_f / self.unit, cand_f / self.unit, error / self.unit
        self.dot += float(np.sum(ref_u * cand_u))
        self.ref_sq += float(np.sum(ref_u * ref_u))
        self.cand_sq += float(np.sum(cand_u * cand_u))
        self.err_sq += float(np.sum(error_u * error_u))
        if self.scores is not False and ref.ndim >= 2 and ref.shape[-1] >= 2 and self.dtype.startswith("float"):
            self._add_scores(ref_f, cand_f)

    def _add_scores(self, ref: np.ndarray, cand: np.ndarray) -> None:
        self.scored = True
        ref2, cand2 = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
        ref_top, cand_top = ref2.argmax(axis=1), cand2.argmax(axis=1)
        self.top1_equal += int(np.sum(ref_top == cand_top))
        self.rows += ref2.shape[0]
        log_p = _log_softmax(ref2 / self.temperature)
        log_q = _log_softmax(cand2 / self.temperature)
        p = np.exp(log_p)
        self.kl_sum += float(np.sum(p * (log_p - log_q)))
        given = _are_probabilities(ref2)
        probabilities = ref2 if given else p  # the softmax taken once, for both
        rows = np.arange(ref2.shape[0])
        drops = probabilities[rows, ref_top] - probabilities[rows, cand_top]
        self.drop_sum += float(np.sum(drops))
        self.drop_sq_sum += float(np.sum(drops * drops))
        if ref.ndim == 3 and self.sequences is not False:
            self._add_reads(ref, ref_top.reshape(ref.shape[:2]), cand_top.reshape(ref.shape[:2]), given)

    def _add_reads(self, ref: np.ndarray, ref_paths: np.ndarray, cand_paths: np.ndarray, given: bool) -> None:
        """What each sample reads, and for one that reads otherwise what that costs: P(original's read) -
        P(candidate's read), each summed over every path that reads it (CTC's forward pass, the
        background as the blank), by the original's probabilities at temperature 1."""
        if self.background is None:
            self.background = int(np.bincount(ref_paths.ravel()).argmax())
        for sample, (ref_path, cand_path) in enumerate(zip(ref_paths, cand_paths)):
            ref_read, cand_read = read_labels(ref_path, self.background), read_labels(cand_path, self.background)
            self.read_changed.append(ref_read != cand_read)
            if ref_read == cand_read:
                self.read_drops.append(0.0)
                continue
            with np.errstate(divide="ignore"):  # a class of probability 0 reads with probability 0
                log_probabilities = np.log(ref[sample]) if given else _log_softmax(ref[sample])
            drop = math.exp(read_log_probability(log_probabilities, ref_read, self.background)) - math.exp(
                read_log_probability(log_probabilities, cand_read, self.background))
            self.read_drops.append(max(drop, 0.0))  # greedy reading is not always the likeliest: no credit for that

    def result(self) -> OutputMetrics:
        metrics = OutputMetrics(name=self.name, dtype=self.dtype, shape=self.shape, note=self.note, broken=self.broken)
        if self.broken or self.count == 0:
            metrics.compared = False
            metrics.note = metrics.note or "empty output: nothing compared"
            metrics.max_abs = metrics.max_rel = metrics.cosine = metrics.sqnr_db = None
            return metrics
        metrics.max_abs = self.max_abs
        metrics.max_rel = self.max_abs / self.scale if self.scale > 0 else (0.0 if self.max_abs == 0 else math.inf)
        if self.dtype.startswith("float"):
            denominator = math.sqrt(self.ref_sq * self.cand_sq)
            metrics.cosine = self.dot / denominator if denominator > 0 else (1.0 if self.ref_sq == self.cand_sq else 0.0)
            metrics.sqnr_db = 10 * math.log10(self.ref_sq / self.err_sq) if self.err_sq > 0 and self.ref_sq > 0 else (math.inf if self.err_sq == 0 else -math.inf)
        else:  # labels, ids, masks: exact agreement is the measure; cosine means nothing there
            metrics.cosine = metrics.sqnr_db = None
            metrics.agreement = self.equal / self.count
        metrics.nonfinite = self.nonfinite
        if self.scored and self.rows:
            metrics.top1 = self.top1_equal / self.rows
            metrics.top1_interval = wilson_interval(self.top1_equal, self.rows)
            metrics.rows = self.rows
            metrics.kl = self.kl_sum / self.rows
            metrics.top1_drop = self.drop_sum / self.rows
            metrics.top1_drop_error = math.sqrt(max(self.drop_sq_sum / self.rows - metrics.top1_drop**2, 0.0) / self.rows)
        if self.read_changed:
            drops = np.array(self.read_drops)
            metrics.sequences = len(drops)
            metrics.sequence_agreement = 1.0 - float(np.mean(self.read_changed))
            metrics.sequence_drop = float(drops.mean())
            metrics.sequence_drop_error = float(drops.std() / math.sqrt(len(drops)))
        return metrics


def read_labels(path: np.ndarray, background: int) -> tuple[int, ...]:
    """What is read from one sample's best class per position: runs merged, the background class
    dropped (greedy CTC decoding when the background is the blank). A flip at the edge of a run, which
    a recogniser makes at ambiguous frames, reads the same; a label gained, lost or changed does not."""
    changes = np.flatnonzero(np.diff(path)) + 1
    runs = path[np.concatenate(([0], changes))] if path.size else path
    return tuple(int(label) for label in runs if label != background)


def read_log_probability(log_probabilities: np.ndarray, read: tuple[int, ...], blank: int) -> float:
    """log P(read) of a [positions, classes] array of log-probabilities: the sum over every path of one
    class per position that reads it (runs merged, ``blank`` dropped), by CTC's forward pass. Summed
    over paths, not the one best: a frame at the edge of a run that could go either way reads the same
    both ways, and a path's probability alone would fall with every such frame."""
    extended = np.full(2 * len(read) + 1, blank)
    extended[1::2] = read
    # a label may follow the one two back (skipping a blank) unless it repeats it: "aa" reads as "a"
    skip = np.zeros(len(extended), bool)
    skip[2:] = (extended[2:] != blank) & (extended[2:] != extended[:-2])
    alpha = np.full(len(extended), -np.inf)
    alpha[:2] = log_probabilities[0, extended[:2]]
    for frame in log_probabilities[1:]:
        previous = alpha
        alpha = np.logaddexp(previous, np.concatenate(([-np.inf], previous[:-1])))
        alpha[skip] = np.logaddexp(alpha[skip], previous[:-2][skip[2:]])
        alpha = alpha + frame[extended]
    return float(np.logaddexp(alpha[-1], alpha[-2]) if len(alpha) > 1 else alpha[-1])


# How far the true top-1 agreement may lie from the measured one before a verdict on it is flagged
# as resting on too few samples (half the width of its 95% interval).
TOP1_PRECISION = 0.05
_Z95 = 1.959964


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion: unlike p +- 1.96 sqrt(p(1-p)/n) it stays
    inside [0, 1] and is not zero-width when every row agrees (8 of 8 agree: 0.68 to 1)."""
    if trials <= 0:
        return (0.0, 1.0)
    p, z2 = successes / trials, _Z95 * _Z95
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = _Z95 * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rows_for_precision(p: float, half_width: float = TOP1_PRECISION) -> int:
    """About how many rows pin a proportion near ``p`` to +-``half_width`` (95%)."""
    p = min(max(p, 0.05), 0.95)  # near 0 or 1 the normal estimate undercounts: plan for 0.95
    return math.ceil(_Z95 * _Z95 * p * (1 - p) / (half_width * half_width))


def _are_probabilities(rows: np.ndarray) -> bool:
    """Whether score rows are already probabilities (a Softmax output): non-negative, each summing to 1."""
    return bool(np.all(rows >= 0) and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# verdict
# ---------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """Whether every output held its tolerance; if not, which failed, by how much, and what would pass."""

    passed: bool
    failures: list[str] = field(default_factory=list)
    tolerances: dict[str, str] = field(default_factory=dict)
    # per output, per bound: the loosest value the output reached = the tightest bound that passes
    smallest_passing: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what limits the verdict (too few samples for a top-1 bound)


def judge(metrics: Sequence[OutputMetrics], tolerance_of: Callable[[str], Tolerance]) -> Verdict:
    verdict = Verdict(passed=True)
    for output in metrics:
        tolerance = tolerance_of(output.name)
        verdict.tolerances[output.name] = tolerance.describe()
        if output.nonfinite:
            verdict.failures.append(f"output '{output.name}': {output.nonfinite} NaN/Inf value(s) where the original is finite")
        if output.broken:
            verdict.failures.append(f"output '{output.name}': {output.note}")
        if not output.compared:
            continue
        reached: dict[str, float] = {}
        for bound in TOLERANCE_FIELDS:
            value = output.value_of(bound)
            if value is None:
                if getattr(tolerance, bound) is not None and bound in _SCORE_BOUNDS + _SEQUENCE_BOUNDS:
                    verdict.notes.append(f"output '{output.name}': {bound} is not measured on it ({_why_unmeasured(bound)}), "
                                         "so it was not checked")
                continue
            reached[bound] = value
            limit = getattr(tolerance, bound)
            if limit is None:
                continue
            # written so that a NaN metric fails instead of slipping through a comparison
            too_far = not (value <= limit) if bound.startswith("max_") else not (value >= limit)
            if too_far:
                verdict.failures.append(
                    f"output '{output.name}': {bound.removeprefix('max_').removeprefix('min_')} {value:.4g} "
                    f"{'>' if bound.startswith('max_') else '<'} {limit:g} (passes with {bound}={_loosened(value, bound):.4g})"
                )
        verdict.smallest_passing[output.name] = reached
        if tolerance.min_top1 is not None:
            verdict.notes.extend(_top1_precision_note(output))
        if tolerance.max_top1_drop is not None:
            verdict.notes.extend(_drop_precision_note(output.name, "top1_drop", output.top1_drop, output.top1_drop_error, output.rows,
                                                      tolerance.max_top1_drop))
        if tolerance.max_sequence_drop is not None:
            verdict.notes.extend(_drop_precision_note(output.name, "sequence_drop", output.sequence_drop, output.sequence_drop_error,
                                                      output.sequences, tolerance.max_sequence_drop))
        if tolerance.min_sequence_agreement is not None:
            verdict.notes.extend(_sequence_precision_note(output))
    verdict.passed = not verdict.failures
    return verdict


def _top1_precision_note(output: OutputMetrics) -> list[str]:
    """A note when a top-1 bound is judged on too few rows to mean it."""
    if output.top1 is None or output.top1_interval is None:
        return []
    low, high = output.top1_interval
    if (high - low) / 2 <= TOP1_PRECISION:
        return []
    # Rows of a [batch, classes] output are samples; those of a [batch, positions, classes] one are not
    # independent (the positions of one sample go together), so the true interval is wider.
    rows = f"{output.rows} sample(s)" if len(output.shape) == 2 else f"{output.rows} rows (samples x positions: the true interval is wider)"
    return [(f"output '{output.name}': top-1 agreement {output.top1:.3f} on {rows} is known only to {low:.2f}-{high:.2f} "
            f"(95%); about {rows_for_precision(output.top1)} samples pin it to +-{TOP1_PRECISION:g}")]


def _sequence_precision_note(output: OutputMetrics) -> list[str]:
    """A note when the share of sequences read unchanged rests on too few samples to mean its bound."""
    if output.sequence_agreement is None:
        return []
    low, high = wilson_interval(round(output.sequence_agreement * output.sequences), output.sequences)
    if (high - low) / 2 <= TOP1_PRECISION:
        return []
    return [(f"output '{output.name}': {output.sequence_agreement:.3f} of {output.sequences} sample(s) read the same labels; "
             f"the true share is known only to {low:.2f}-{high:.2f} (95%); about {rows_for_precision(output.sequence_agreement)} "
             f"samples pin it to +-{TOP1_PRECISION:g}")]


def _why_unmeasured(bound: str) -> str:
    if bound in _SEQUENCE_BOUNDS:
        return "a sequence is read only from float scores of shape [batch, positions, classes]"
    return "top-1 is measured only on float scores whose last axis holds at least 2 classes"


def _drop_precision_note(name: str, metric: str, value: float | None, error: float | None, samples: int, bound: float) -> list[str]:
    """A note when a mean drop (top1_drop, sequence_drop) is known less precisely than half its bound:
    on a few samples (or views of a few photos, which flip together) one hard sample decides the verdict."""
    if value is None or error is None or not samples:
        return []
    half = _Z95 * error
    if half <= bound / 2:
        if samples * bound >= 1 or bound <= 0:
            return []
        # no spread to measure (nothing changed, or one sample), yet a single sample decides the verdict
        return [(f"output '{name}': {metric} {value:.4f} on {samples} sample(s): one sample changing with confidence costs up to "
                 f"{1 / samples:.3g}, over the bound {bound:g} alone; {math.ceil(1 / bound)} or more samples can tell a bound this fine")]
    needed = math.ceil(samples * (half / (bound / 2)) ** 2)
    return [(f"output '{name}': {metric} {value:.4f} on {samples} sample(s) is known only to +-{half:.4f} "
             f"(95%, samples taken as independent); about {needed} samples judge it to +-{bound / 2:g}")]


def _loosened(value: float, bound: str) -> float:
    """The printed bound that passes: rounded outward so that 4 significant digits still pass."""
    if not math.isfinite(value) or value == 0:
        return value
    digits = 3 - math.floor(math.log10(abs(value)))
    factor = 10.0**digits
    return (math.ceil if bound.startswith("max_") else math.floor)(value * factor) / factor


@dataclass
class ValidationResult:
    outputs: list[OutputMetrics]
    verdict: Verdict
    feeds: int
    seconds: float
    metric: MetricResult | None = None  # the user's task metric, when one was given

    @property
    def passed(self) -> bool:
        return self.verdict.passed


# ---------------------------------------------------------------------------------------------
# running models
# ---------------------------------------------------------------------------------------------


_SHRINKING = ort.RunOptions()
_SHRINKING.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def run_feeds(
    session: ort.InferenceSession,
    feeds: Sequence[Feed],
    label: str,
    progress: ProgressCallback | None = None,
) -> list[dict[str, np.ndarray]]:
    """The session's outputs on each feed. A one-thread session (one kept for timing) runs its feeds
    side by side, one per usable core: the same throughput as onnxruntime's own threads, and the
    model is loaded once for its timing and its validation."""
    names = [output.name for output in session.get_outputs()]
    accepted = {value.name for value in session.get_inputs()}
    batch = batch_dim(value.shape for value in session.get_inputs())
    # Cut a feed only where every output carries the inputs' batch axis first, so parts stack back.
    batched = batch is not None and all(len(value.shape) and value.shape[0] == batch for value in session.get_outputs())

    parts = list(_split_for_cores(feeds, batched)) if single_threaded(session) else [(index, feed) for index, feed in enumerate(feeds)]
    workers = min(usable_cores(), len(parts)) if single_threaded(session) else 1
    # A timing session outlives its validation: side by side, each run would leave it an arena the
    # size of a feed's activations (MobileNetV2, feeds of 16: 333 MiB held after 6 feeds, 48 MiB with
    # the arena shrunk after each run, for 20% more time on these runs).
    options = _SHRINKING if workers > 1 else None

    def run_one(index: int, feed: Feed) -> dict[str, np.ndarray]:
        try:
            # a candidate may have dropped an unused input the original still declares
            values = _run_in_chunks(session, names, {name: value for name, value in feed.items() if name in accepted}, batched, options)
        except Exception as error:  # noqa: BLE001
            message = _first_line(error)
            kind = InputDataError if "input" in message.lower() or "dimension" in message.lower() else RuntimeLoadError
            raise kind(f"{label}: onnxruntime failed on feed {index}: {message}") from error
        return dict(zip(names, values))

    if workers == 1:
        return _collected(map(run_one, range(len(feeds)), feeds), len(feeds), label, progress)
    with ThreadPoolExecutor(workers) as pool:
        outputs = pool.map(run_one, [index for index, _ in parts], [part for _, part in parts])
        return _collected(_restacked(parts, outputs, names), len(feeds), label, progress)


def _split_for_cores(feeds: Sequence[Feed], batched: bool) -> Iterator[tuple[int, Feed]]:
    """(feed index, part): a one-thread session's feeds, a batched feed cut in one part per usable core
    when there are fewer feeds than cores (one stacked feed of synthetic samples would run on one core)."""
    cores = usable_cores()
    for index, feed in enumerate(feeds):
        samples = samples_in(feed)
        pieces = min(cores, samples) if batched and len(feeds) < cores else 1
        if pieces <= 1:
            yield index, feed
            continue
        bounds = np.linspace(0, samples, pieces + 1).astype(int)
        for start, end in itertools.pairwise(bounds):
            yield index, {name: value[start:end] if np.ndim(value) else value for name, value in feed.items()}


def _restacked(parts: list[tuple[int, Feed]], outputs: Iterable[dict[str, np.ndarray]], names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """The outputs of the parts of each feed, in feed order, stacked back along axis 0."""
    pending: list[dict[str, np.ndarray]] = []
    current = None
    for (index, _), output in zip(parts, outputs):
        if current is not None and index != current:
            yield _stacked(pending, names)
            pending = []
        current = index
        pending.append(output)
    if pending:
        yield _stacked(pending, names)


def _stacked(pieces: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    return pieces[0] if len(pieces) == 1 else {name: np.concatenate([piece[name] for piece in pieces]) for name in names}


def _collected(outputs: Iterable[dict[str, np.ndarray]], total: int, label: str, progress: ProgressCallback | None) -> list[dict[str, np.ndarray]]:
    results = []
    for output in outputs:  # in feed order
        results.append(output)
        if progress is not None:
            progress(label, len(results), total)
    return results


def _run_in_chunks(session: ort.InferenceSession, names: list[str], feed: Feed, batched: bool,
                   options: ort.RunOptions | None = None) -> list[Any]:
    """The outputs on ``feed``, run in bounded batches and stacked back along axis 0 when ``batched``;
    run whole when a part is not an array or the parts do not stack (data-dependent shapes)."""
    chunks = list(in_chunks(feed, batched))
    if len(chunks) == 1:
        return session.run(names, feed, options)
    parts = [session.run(names, chunk, options) for chunk in chunks]
    if not all(isinstance(value, np.ndarray) and value.ndim for values in parts for value in values):
        return session.run(names, feed, options)
    try:
        return [np.concatenate([values[i] for values in parts]) for i in range(len(names))]
    except ValueError:
        return session.run(names, feed, options)


def compare(
    reference: Sequence[Mapping[str, np.ndarray]],
    candidate: Sequence[Mapping[str, np.ndarray]],
    tolerance_of: Callable[[str], Tolerance],
    *,
    temperature: float = 1.0,
    seconds: float = 0.0,
    scores: Collection[str] | None = None,
    sequences: Collection[str] | None = None,
    metric: TaskMetric | None = None,
    feeds: Sequence[Feed] = (),
) -> ValidationResult:
    """Metrics and verdict for candidate outputs against reference outputs, feed by feed. Top-1 and KL
    are computed for the outputs named in ``scores`` (see :func:`class_score_outputs`) and for any
    output whose tolerance bounds them; ``scores=None`` judges by shape alone (float, last axis >= 2)."""
    if not temperature > 0:
        raise InputDataError(f"temperature {temperature} must be above 0")
    accumulators: dict[str, _OutputAccumulator] = {}
    for ref_outputs, cand_outputs in zip(reference, candidate, strict=True):
        for name, ref_value in ref_outputs.items():
            accumulator = accumulators.get(name) or accumulators.setdefault(name, _OutputAccumulator(
                name, temperature, _is_scored(name, scores, tolerance_of), _reads_sequences(name, sequences, tolerance_of)))
            if name not in cand_outputs:
                accumulator.mark_broken("output missing from the candidate")
            elif not accumulator.broken:
                accumulator.add(ref_value, cand_outputs[name])
    metrics = [accumulator.result() for accumulator in accumulators.values()]
    result = ValidationResult(metrics, judge(metrics, tolerance_of), feeds=len(reference), seconds=seconds)
    if metric is not None:
        result.metric = metric.measure(reference, candidate, feeds)
        if not result.metric.within_budget:
            result.verdict.failures.append(f"task metric {result.metric.name}: {result.metric.value:.4g} is outside its budget")
            result.verdict.passed = False
    return result


def _is_scored(name: str, scores: Collection[str] | None, tolerance_of: Callable[[str], Tolerance]) -> bool | None:
    tolerance = tolerance_of(name)
    if any(getattr(tolerance, bound) is not None for bound in _SCORE_BOUNDS + _SEQUENCE_BOUNDS):
        return True  # the user asked for a verdict on them
    return None if scores is None else name in scores


def _reads_sequences(name: str, sequences: Collection[str] | None, tolerance_of: Callable[[str], Tolerance]) -> bool | None:
    if any(getattr(tolerance_of(name), bound) is not None for bound in _SEQUENCE_BOUNDS):
        return True
    return None if sequences is None else name in sequences


_SCORE_BOUNDS = ("min_top1", "max_kl", "max_top1_drop")
_SEQUENCE_BOUNDS = ("min_sequence_agreement", "max_sequence_drop")


# Ops whose float output is class scores (probabilities), and ops that compute logits (a last layer).
_SCORE_OPS = frozenset({"Softmax", "LogSoftmax"})
_LOGIT_OPS = frozenset({"Gemm", "MatMul"})
# Ops that pass scores through unchanged in layout (a Transpose would move the class axis).
_SCORE_PASS_THROUGH = frozenset({"Identity", "Reshape", "Squeeze", "Flatten", "Cast"})
_SCORE_NAME = re.compile(r"(?i)(logit|score|prob|class)")


def class_score_outputs(model: onnx.ModelProto) -> frozenset[str]:
    """The float outputs that look like class scores, whose top-1 agreement and KL mean something:
    made by Softmax/LogSoftmax, or rank-2 logits of a Gemm/MatMul (+ bias), or named like scores
    (logits, scores, probabilities, classes). An embedding (an L2-normalised Div), a detector's raw
    boxes (a Concat) or a feature map gets cosine and SQNR only."""
    producers = {name: node for node in model.graph.node for name in node.output}
    chosen = set()
    for output in model.graph.output:
        tensor = output.type.tensor_type
        if not output.type.HasField("tensor_type") or tensor.elem_type not in _FLOAT_TYPES:
            continue
        dims = list(tensor.shape.dim)
        if len(dims) < 2 or (dims[-1].HasField("dim_value") and dims[-1].dim_value < 2):
            continue
        node = producers.get(output.name)
        while node is not None and node.op_type in _SCORE_PASS_THROUGH and node.input:
            node = producers.get(node.input[0])
        op = node.op_type if node is not None else ""
        if op == "Add" and node is not None:  # logits plus a bias
            op = next((producers[i].op_type for i in node.input if i in producers and producers[i].op_type in _LOGIT_OPS), op)
        if _SCORE_NAME.search(output.name) or op in _SCORE_OPS or (op in _LOGIT_OPS and len(dims) == 2):
            chosen.add(output.name)
    return frozenset(chosen)


def label_outputs(model: onnx.ModelProto, scores: frozenset[str]) -> frozenset[str]:
    """The class-score outputs that give one label per sample ([batch, classes]): a pass's default
    bound on label flips (max_top1_drop) applies to these."""
    ranks = {o.name: len(o.type.tensor_type.shape.dim) for o in model.graph.output if o.type.HasField("tensor_type")}
    return frozenset(name for name in scores if ranks.get(name) == 2)


def sequence_outputs(scores: frozenset[str], feeds: Sequence[Feed], outputs: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    """The class-score outputs that give a sequence of labels per sample ([batch, positions, classes], a
    text recogniser's frames), axis 0 following the samples of every feed (not a time-major [positions,
    batch, classes] one): a pass's default bound on what is read (max_sequence_drop) applies to these.
    A flip at one position is not: a recogniser moves a label's frame at the edge of a run without
    changing what is read. A map of scores (rank 4) is left to cosine."""
    def batch_major(name: str) -> bool:
        values = [output.get(name) for output in outputs]
        return all(isinstance(v, np.ndarray) and v.ndim == 3 and v.shape[0] == samples_in(feed) for v, feed in zip(values, feeds))
    return frozenset(name for name in scores if outputs and batch_major(name))


_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})


@dataclass
class Reference:
    """The original model's outputs on the validation feeds, computed once per run, and which of
    them are class scores (:func:`class_score_outputs`)."""

    feeds: list[Feed]
    outputs: list[dict[str, np.ndarray]]
    scores: frozenset[str] | None = None
    metric: TaskMetric | None = None  # judged beside the tolerances on every candidate
    labels: frozenset[str] = frozenset()  # the score outputs with one label per sample (label_outputs)
    sequences: frozenset[str] = frozenset()  # those with a sequence of labels per sample (sequence_outputs)

    @classmethod
    def of(cls, model: onnx.ModelProto, feeds: list[Feed], label: str, progress: ProgressCallback | None = None, *,
           runtime: Runtime | None = None, metric: TaskMetric | None = None, timed_later: bool = False, pin: bool = False) -> Reference:
        """The outputs, or an InputDataError when any is NaN/Inf: every candidate would then be
        compared on the finite rest only, and a model gone all-NaN would validate as perfect.
        ``timed_later``, ``pin``: the caller times the model later (see :meth:`Runtime.session`)."""
        session = open_session(model, label, runtime=runtime, timed_later=timed_later, pin=pin)
        outputs = run_feeds(session, feeds, label, progress)
        for name in outputs[0] if outputs else ():
            bad, total = _nonfinite_count(output[name] for output in outputs)
            if bad:
                samples = sum(samples_in(feed) for feed in feeds) if sample_axis(model) else len(feeds)
                raise InputDataError(
                    f"{label}: output '{name}' is NaN/Inf in {bad:,} of {total:,} values on the {samples} validation sample(s); "
                    "the original must give finite outputs to be compared with (fix the model, or give inputs it is defined on)"
                )
        scores = class_score_outputs(model)
        return cls(feeds, outputs, scores, metric, label_outputs(model, scores), sequence_outputs(scores, feeds, outputs))

    def validate(
        self,
        candidate: onnx.ModelProto,
        tolerance_of: Callable[[str], Tolerance],
        label: str,
        *,
        temperature: float = 1.0,
        progress: ProgressCallback | None = None,
        runtime: Runtime | None = None,
    ) -> ValidationResult:
        start = time.perf_counter()
        session = open_session(candidate, label, runtime=runtime)
        outputs = run_feeds(session, self.feeds, label, progress)
        return compare(self.outputs, outputs, tolerance_of, temperature=temperature, seconds=time.perf_counter() - start, scores=self.scores,
                       sequences=self.sequences, metric=self.metric, feeds=self.feeds)

    def compared(self, outputs: list[dict[str, np.ndarray]], tolerance_of: Callable[[str], Tolerance], *, temperature: float = 1.0) -> ValidationResult:
        """A verdict on outputs a candidate already gave on these feeds: a model is never run twice on them."""
        return compare(self.outputs, outputs, tolerance_of, temperature=temperature, scores=self.scores, sequences=self.sequences,
                       metric=self.metric, feeds=self.feeds)


def _nonfinite_count(values: Iterable[object]) -> tuple[int, int]:
    """NaN/Inf values and all values among float outputs (sequences of tensors included)."""
    bad = total = 0
    for value in values:
        if isinstance(value, list):
            more_bad, more_total = _nonfinite_count(value)
            bad, total = bad + more_bad, total + more_total
        elif isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.inexact):
            bad += int(value.size - np.count_nonzero(np.isfinite(value)))
            total += value.size
    return bad, total


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def outputs_on(model: onnx.ModelProto, source: object, serialized: bytes | None = None) -> list[dict[str, np.ndarray]]:
    """The model's outputs on every feed of an input source (for scans on calibration data);
    ``serialized``: the message onnxruntime gets, when the caller has it."""
    session = make_session(model, "probe", serialized=serialized)
    return run_feeds(session, collect_feeds(source, model), "probe")  # type: ignore[arg-type]


def output_drift(reference: Sequence[Mapping[str, np.ndarray]], candidate: Sequence[Mapping[str, np.ndarray]]) -> float:
    """1 - the worst float output's cosine to the reference (0: unchanged)."""
    cosines = [o.cosine for o in compare(reference, candidate, lambda _: Tolerance()).outputs if o.cosine is not None]
    return 1.0 - min(cosines) if cosines else 0.0


class DriftProbe:
    """How far trial variants of a model move its outputs, on a few samples spread over a calibration
    source (the sensitivity scans and qdq's mode choice): the reference outputs are computed once."""

    SAMPLES = 16

    def __init__(self, model: onnx.ModelProto, calibration: object) -> None:
        self.source = SpreadSamples(calibration, self.SAMPLES, batched=sample_axis(model))  # type: ignore[arg-type]
        self.held_out = self.not_judged(calibration, model)  # the rest, to fit trials on
        self.model = model
        self.reference = outputs_on(model, self.source)
        self._parts: tuple[bytes, dict[str, bytes]] | None = None  # drift_with's pieces of the message, made on first use

    @classmethod
    def not_judged(cls, calibration: object, model: onnx.ModelProto) -> SpreadSamples:
        """The calibration samples other than those a probe of ``model`` judges by (the same for every probe)."""
        return SpreadSamples(calibration, cls.SAMPLES, others=True, batched=sample_axis(model))  # type: ignore[arg-type]

    def drift(self, trial: onnx.ModelProto) -> float:
        return output_drift(self.reference, outputs_on(trial, self.source))

    def drift_with(self, values: Mapping[str, np.ndarray]) -> float:
        """The drift of the probe's model with these main-graph initializers' values (float32) instead.

        A copy of MiniLM serialized per trial cost 0.2 s of every probe. Here the model is serialized
        once, without its initializers, and each initializer once as a message of its own; a trial's
        message is those pieces joined, the changed ones serialized anew. Protobuf merges repeated
        embedded messages when it parses (the graph's initializers then add up), so onnxruntime reads
        the very model a copy would give, initializers in another order, and optimizes it as usual.
        (Its own overriding initializers are not used: its optimizer folds and fuses initializers
        before they take effect, so a Conv fused with its BatchNormalization silently kept its old
        weight.) A model held by a weight store goes by path: a copy of it per trial."""
        if store_of(self.model) is not None:
            return self.drift(with_initializer_values(self.model, values))
        if self._parts is None:
            self._parts = _message_parts(self.model)
        head, pieces = self._parts
        unknown = sorted(set(values) - set(pieces))
        if unknown:  # a piece for it would be a second definition of a name, not a changed value
            raise ValueError(f"drift_with: {', '.join(unknown)} is no main-graph initializer of the probe's model")
        message = b"".join([head, *(piece for name, piece in pieces.items() if name not in values),
                            *(_initializer_piece(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)) for name, value in values.items())])
        return output_drift(self.reference, outputs_on(self.model, self.source, serialized=message))


def _message_parts(model: onnx.ModelProto) -> tuple[bytes, dict[str, bytes]]:
    """The model's message without its main graph's initializers, and each of them as a message that
    merges it back in (see :meth:`DriftProbe.drift_with`)."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.initializer[:]
    return bare.SerializeToString(), {tensor.name: _initializer_piece(tensor) for tensor in model.graph.initializer}


def _initializer_piece(tensor: onnx.TensorProto) -> bytes:
    piece = onnx.ModelProto()
    piece.graph.initializer.append(tensor)
    return piece.SerializeToString()
