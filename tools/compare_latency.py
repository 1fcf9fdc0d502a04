#!/usr/bin/env python3
"""Time two ONNX models head to head on one real model's eval batch: single-thread onnxruntime,
interleaved runs in one process (the benchmark's method), so machine load hits both alike.

    python tools/compare_latency.py --model resnet18 REFERENCE.onnx CANDIDATE.onnx [--runs 100]

Prints candidate / reference median latency. Use it when two benchmark cells were timed against fp32
at different moments and their ratios are too close to call (e.g. two int8 models).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark.measure import LatencySettings, interleaved_latency  # noqa: E402
from realmodels import MODEL_NAMES, load_task  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=MODEL_NAMES, help="whose first eval batch to feed")
    parser.add_argument("reference", type=Path)
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--runs", type=int, default=100, help="timed runs of each model, at least")
    args = parser.parse_args(argv)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # ORT's notes on unused initializers of peers' files are noise here
    task = load_task(args.model)
    latency = interleaved_latency(args.reference, args.candidate, task.eval_feeds[0], LatencySettings(runs=args.runs))
    print(f"{args.candidate} / {args.reference}: {latency.ratio:.3f} (medians {latency.candidate_ms:.2f} / {latency.fp32_ms:.2f} ms, "
          f"{latency.runs} runs each, reference p10-p90 spread {latency.fp32_spread:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
