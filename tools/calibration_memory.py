"""Peak memory of qdq calibration against the number of calibration feeds.

Runs ``onnxsparse`` calibration (method minmax and entropy) on a model with N single-sample feeds,
each in a fresh subprocess, and prints the peak resident set size (ru_maxrss) per N. Calibration
streams: memory should not grow with N.

    python tools/calibration_memory.py [--model PATH] [--feeds 8 128]

Default model: the cached MobileNetV2 from tools/fetch_models.py (random images of its input shape
are used as feeds: memory, not accuracy, is measured here).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys
import numpy as np
import onnx
from onnxsparse import load
from onnxsparse.activations import collect_ranges
from onnxsparse.calibration import IterableInputs, model_inputs
from onnxsparse.graph import to_gs
from onnxsparse.passes.base import PassResult
from onnxsparse.passes.qdq.plan import plan_static
from onnxsparse.shapes import shapes_where_known

path, feeds, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = shapes_where_known(load(path))
plan = plan_static(to_gs(model), (), set(), PassResult(model))
inputs = model_inputs(model)
rng = np.random.default_rng(0)

def make():
    for _ in range(feeds):
        yield {i.name: rng.standard_normal([d if isinstance(d, int) and d > 0 else 1 for d in i.shape]).astype(i.dtype) for i in inputs}

class Once:  # a generator source: feeds are made on the fly, never held
    def feeds(self):
        return make()
    def describe(self):
        return f"{feeds} synthetic feeds"

collect_ranges(model, Once(), plan.tensors, method=method)
print(json.dumps({"feeds": feeds, "method": method, "tensors": len(plan.tensors),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/onnxsparse/models/mobilenetv2/model.onnx")
    parser.add_argument("--feeds", type=int, nargs="+", default=[8, 128])
    parser.add_argument("--methods", nargs="+", default=["minmax", "entropy"])
    args = parser.parse_args()
    if not args.model.exists():
        print(f"{args.model}: no such model (run python tools/fetch_models.py, or pass --model)", file=sys.stderr)
        return 2
    for method in args.methods:
        rows = []
        for count in args.feeds:
            done = subprocess.run([sys.executable, "-c", CHILD, str(args.model), str(count), method], capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        base = rows[0]["peak_rss_mb"]
        for row in rows:
            print(f"{method:8s} {row['feeds']:4d} feeds: peak RSS {row['peak_rss_mb']:.0f} MB ({row['peak_rss_mb'] / base:.2f}x of {rows[0]['feeds']} feeds), {row['tensors']} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
