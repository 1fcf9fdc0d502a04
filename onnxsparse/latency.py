"""Single-thread onnxruntime latency, for passes that choose between graphs by speed.

Only relative figures are meaningful on a shared machine: both models are timed in one process,
their runs interleaved, so a burst of load hits both alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .calibration import FirstSamples, InputSource, SyntheticInputs, sample_axis
from .runtime import Runtime, make_session, open_session

WARMUP_RUNS = 2
# With thresholds to decide against, timing stops early once the ratio is this many standard errors
# from each of them, after at least EARLY_PAIRS interleaved pairs and EARLY_SECONDS: a verdict that is
# not close costs a fraction of the full timing, a close one gets all of it.
DECISIVE_ERRORS = 4.0
EARLY_PAIRS, EARLY_SECONDS = 6, 0.2
# A ratio that decides something close to its bound is timed again this long (one timing on a shared
# machine is off by a few percent).
RETIME_RUNS, RETIME_SECONDS = 60, 3.0


def relative_latency(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    *,
    min_runs: int = 15,
    min_seconds: float = 1.0,
    max_runs: int = 200,
    runtime: Runtime | None = None,
    keep_candidate: bool = True,
    hand_over: bool = False,
    decide_at: Sequence[float] = (),
    threads: int = 1,
) -> float:
    """Median seconds of one run of ``candidate`` over that of ``reference`` (one thread each;
    sessions from ``runtime`` when given, so a model timed before is not loaded again; a one-off
    candidate's is not kept there without ``keep_candidate``; ``hand_over`` holds it, however big,
    for the caller's validation: see :meth:`Runtime.session`).

    ``decide_at``: the ratios the caller's verdict turns on (a step slower than 1.10x is worse);
    timing then stops before ``min_runs``/``min_seconds`` once the ratio is clearly on one side of
    every one of them (see :func:`_decided`). ``threads``: other than 1 (0: one per core, onnxruntime's
    default), both models run on that many threads, in sessions of their own."""
    if threads != 1:
        sessions = [make_session(model, "latency probe", timing=True, threads=threads) for model in (reference, candidate)]
    else:
        sessions = [open_session(reference, "latency probe", timing=True, runtime=runtime),
                    open_session(candidate, "latency probe", timing=True, runtime=runtime, keep=keep_candidate, hand_over=hand_over)]
    runners = [_runner(session, feed) for session in sessions]
    for run in runners:
        for _ in range(WARMUP_RUNS):
            run()
    times: list[list[float]] = [[], []]
    started = time.perf_counter()
    while len(times[0]) < max_runs and (len(times[0]) < min_runs or time.perf_counter() - started < min_seconds):
        # The order flips every round, so that neither model always runs on caches the other warmed.
        for index in ((0, 1) if len(times[0]) % 2 == 0 else (1, 0)):
            begin = time.perf_counter()
            runners[index]()
            times[index].append(time.perf_counter() - begin)
        if decide_at and time.perf_counter() - started >= EARLY_SECONDS and _decided(times[0], times[1], decide_at):
            break
    return float(np.median(times[1]) / np.median(times[0]))


def _decided(reference: list[float], candidate: list[float], thresholds: Sequence[float]) -> bool:
    """Whether the timings so far put the ratio clearly on one side of every threshold.

    Each interleaved pair gives one log-ratio (a burst of load slows both runs of a pair alike);
    their median estimates the log of the ratio, with a standard error of about 1.25 sigma/sqrt(n)
    (sigma from the median absolute deviation, robust to the odd preempted run). The ratio of the
    medians, which the caller gets, must fall on the same side too."""
    pairs = len(reference)
    if pairs < EARLY_PAIRS:
        return False
    tick = 1e-9  # a run never reads 0 s on perf_counter; guarded all the same
    logs = np.log(np.maximum(candidate, tick) / np.maximum(reference, tick))
    center = float(np.median(logs))
    spread = 1.4826 * float(np.median(np.abs(logs - center)))
    error = 1.2533 * spread / math.sqrt(pairs)
    estimate = math.log(max(float(np.median(candidate)), tick) / max(float(np.median(reference)), tick))
    for threshold in thresholds:
        gap = center - math.log(threshold)
        if abs(gap) <= DECISIVE_ERRORS * error or (estimate - math.log(threshold)) * gap <= 0:
            return False
    return True


def timing_feed(model: onnx.ModelProto, calibration: InputSource | None) -> dict[str, np.ndarray]:
    """What the passes time a model on: one calibration sample (one feed whole where axis 0 does not
    count samples: a time-major [steps, batch, features] input is not cut to one step), or a
    synthetic one without calibration data."""
    source = FirstSamples(calibration, 1, sample_axis(model)) if calibration is not None else SyntheticInputs(model, samples=1)
    return dict(next(iter(source.feeds())))


def _runner(session: ort.InferenceSession, feed: Mapping[str, np.ndarray]):  # noqa: ANN202 - a closure
    accepted = {i.name for i in session.get_inputs()}
    inputs = {k: v for k, v in feed.items() if k in accepted}
    return lambda: session.run(None, inputs)
