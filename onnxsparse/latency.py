"""Single-thread onnxruntime latency, for passes that choose between graphs by speed.

Only relative figures are meaningful on a shared machine: both models are timed in one process,
their runs interleaved, so a burst of load hits both alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import onnx

from .calibration import FirstSamples, InputSource, SyntheticInputs
from .runtime import Runtime, open_session

WARMUP_RUNS = 3


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
) -> float:
    """Median seconds of one run of ``candidate`` over that of ``reference`` (one thread each;
    sessions from ``runtime`` when given, so a model timed before is not loaded again; a one-off
    candidate's is not kept there without ``keep_candidate``)."""
    runners = [_runner(reference, feed, runtime, True), _runner(candidate, feed, runtime, keep_candidate)]
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
    return float(np.median(times[1]) / np.median(times[0]))


def timing_feed(model: onnx.ModelProto, calibration: InputSource | None) -> dict[str, np.ndarray]:
    """What the passes time a model on: one calibration sample, or a synthetic one without calibration data."""
    source = FirstSamples(calibration, 1) if calibration is not None else SyntheticInputs(model, samples=1)
    return dict(next(iter(source.feeds())))


def _runner(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], runtime: Runtime | None, keep: bool):  # noqa: ANN202 - a closure
    session = open_session(model, "latency probe", timing=True, runtime=runtime, keep=keep)
    accepted = {i.name for i in session.get_inputs()}
    inputs = {k: v for k, v in feed.items() if k in accepted}
    return lambda: session.run(None, inputs)
