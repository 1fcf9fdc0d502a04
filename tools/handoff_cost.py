#!/usr/bin/env python3
"""What handing a model from one pass to the next costs, as a ModelProto or as a graphsurgeon graph.

    python3 tools/handoff_cost.py MODEL.onnx [--repeat 3]

The manager keeps the committed model while a pass edits its own copy, so that a failed step rolls
back. With a ModelProto between passes that copy is a protobuf copy (external weights stay in the
weight store), and a pass that edits topology imports it into graphsurgeon; with a graphsurgeon
graph between passes, the copy is ``Graph.copy()`` and the import is saved. The medians printed
here decide which hand-off is cheaper (issue #16, item 1). Weights are not read: they stay in the
weight store (memory-mapped), as in a run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import onnx

from onnxsparse.graph import from_gs, to_gs
from onnxsparse.io import load
from onnxsparse.weightstore import WeightStore


def median_seconds(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with WeightStore() as weights:
        model = load(args.model, weights=weights)
        graph = to_gs(model)

        def proto_copy() -> onnx.ModelProto:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            return copy

        figures = {
            "ModelProto copy (the manager's clone today)": median_seconds(proto_copy, args.repeat),
            "graphsurgeon import (what a pass pays today)": median_seconds(lambda: to_gs(model), args.repeat),
            "graphsurgeon Graph.copy() (the clone a kept graph would need)": median_seconds(graph.copy, args.repeat),
            "graphsurgeon export (once per model version, both ways)": median_seconds(lambda: from_gs(graph, model), args.repeat),
        }
    print(f"{args.model}: {len(model.graph.node)} nodes, median of {args.repeat}")
    for what, seconds in figures.items():
        print(f"  {seconds:8.3f} s  {what}")


if __name__ == "__main__":
    main()
