"""What a cell measures about a candidate model, in the core environment (numpy, onnxruntime, onnxsparse).

Latency is measured the way a deployment on one core sees it: onnxruntime CPU, one intra-op and one
inter-op thread, sequential execution. The fp32 model and the candidate run interleaved in ONE
process on the same feed, so clock drift, thermal state and noisy neighbours hit both alike; the
figure is a ratio of medians (medians ignore the odd descheduled run).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LatencySettings:
    warmup: int = 5
    runs: int = 40  # timed runs of each model, at least
    min_seconds: float = 3.0  # ... and at least this long in total, so that millisecond models get many runs
    max_runs: int = 2000


@dataclass(frozen=True)
class Latency:
    fp32_ms: float
    candidate_ms: float
    ratio: float  # candidate / fp32, medians; < 1 is faster
    runs: int
    fp32_spread: float  # (p90 - p10) / median of the fp32 runs: how noisy the machine was


def latency_ratio(candidate_seconds: Sequence[float], reference_seconds: Sequence[float]) -> float:
    """Median candidate time over median reference time (< 1: the candidate is faster)."""
    if not candidate_seconds or not reference_seconds:
        raise ValueError("latency_ratio needs at least one timing of each model")
    reference = statistics.median(reference_seconds)
    if reference <= 0:
        raise ValueError("the reference median time is not positive")
    return statistics.median(candidate_seconds) / reference


def relative_spread(seconds: Sequence[float]) -> float:
    """(p90 - p10) / median: a scale-free noise figure for a list of timings."""
    ordered = sorted(seconds)
    if len(ordered) < 2:
        return 0.0
    p10 = ordered[int(0.1 * (len(ordered) - 1))]
    p90 = ordered[round(0.9 * (len(ordered) - 1))]
    return (p90 - p10) / statistics.median(ordered)


def single_thread_session(path: str | os.PathLike[str]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_latency(reference: Path, candidate: Path, feed: Mapping[str, Any], settings: LatencySettings) -> Latency:
    """Time both models alternately on one feed; the order flips every round so neither always
    runs second (the second run of a pair finds the caches warm with the first one's inputs)."""
    sessions = (single_thread_session(reference), single_thread_session(candidate))
    for _ in range(settings.warmup):
        for session in sessions:
            session.run(None, dict(feed))
    timings: tuple[list[float], list[float]] = ([], [])
    started = time.perf_counter()
    while len(timings[0]) < settings.max_runs and (
        len(timings[0]) < settings.runs or time.perf_counter() - started < settings.min_seconds
    ):
        order = (0, 1) if len(timings[0]) % 2 == 0 else (1, 0)
        for index in order:
            begin = time.perf_counter()
            sessions[index].run(None, dict(feed))
            timings[index].append(time.perf_counter() - begin)
    fp32, other = timings
    return Latency(
        fp32_ms=statistics.median(fp32) * 1e3,
        candidate_ms=statistics.median(other) * 1e3,
        ratio=latency_ratio(other, fp32),
        runs=len(fp32),
        fp32_spread=relative_spread(fp32),
    )


def model_figures(path: Path, reference_bytes: int) -> dict[str, Any]:
    """Size on disk and parameters, with onnxsparse's own inspector: parameters read by nodes (and
    how many are non-zero) apart from constant tensors that no node reads but the file still holds."""
    from onnxsparse.inspect_model import count_macs, summarize
    from onnxsparse.io import load_with_info

    # check=False: a peer's output that the onnx checker rejects is still measured if onnxruntime runs it.
    model, info = load_with_info(path, check=False)
    summary = summarize(model, info, with_tensors=False)
    file_bytes = path.stat().st_size
    return {
        "file_bytes": file_bytes,
        "size_ratio": file_bytes / reference_bytes,
        "parameters": summary.parameters,
        "nonzero_parameters": summary.nonzero_parameters,
        "parameter_bytes": summary.parameter_bytes,
        "unused_tensors": summary.unused_tensors,
        "unused_bytes": summary.unused_bytes,
        "nodes": summary.nodes,
        "sparse_encoded_tensors": len(summary.sparse_encoded),
        "op_histogram": summary.op_histogram,
        "macs": count_macs(model),  # per sample, Conv/Gemm/MatMul only; None when shapes are unknown
    }


def as_dict(latency: Latency) -> dict[str, Any]:
    return asdict(latency)
