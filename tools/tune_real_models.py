"""Run ``onnxsparse tune`` on the cached real models with the budgets the closing notes quote, one run
per model, fresh caches, and print each run's wall time, peak memory and candidate table.

    python3 tools/tune_real_models.py --objective size --models minilm mobilenetv2 resnet18 --out /tmp/tune
    python3 tools/tune_real_models.py --objective latency --models ppocr_rec --jobs 2

The models come from ``tools/fetch_models.py`` (``~/.cache/onnxsparse/models``); each is tuned on its
calibration split and validated on its eval split. Budgets: top-1 agreement >= 0.95 for the
classifiers, every eval sentence's embedding within cosine 0.98 for the sentence encoders, the exact
text for PP-OCR (``tools/realmodels/task_metrics.py``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from realmodels.paths import MODEL_NAMES, is_present, model_dir

ROOT = Path(__file__).resolve().parent.parent
METRICS = ROOT / "tools" / "realmodels" / "task_metrics.py"
# model -> the budget's command-line arguments
BUDGETS: dict[str, list[str]] = {
    "minilm": ["--metric", f"{METRICS}:worst_sentence_cosine", "--budget", "min_cosine=0.98"],
    "mpnet": ["--metric", f"{METRICS}:worst_sentence_cosine", "--budget", "min_cosine=0.98"],
    "ppocr_rec": ["--metric", f"{METRICS}:text_unchanged"],
}
CLASSIFIER_BUDGET = ["--budget", "min_top1=0.95"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objective", choices=("latency", "size"), default="size")
    parser.add_argument("--models", nargs="+", default=["minilm", "mobilenetv2", "resnet18"], choices=MODEL_NAMES)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/onnxsparse-tune-runs"))
    args = parser.parse_args(argv)
    missing = [name for name in args.models if not is_present(name)]
    if missing:
        print(f"not in the model cache: {', '.join(missing)} (python3 tools/fetch_models.py --only NAME)", file=sys.stderr)
        return 2
    for name in args.models:
        print(_tuned(name, args.objective, args.jobs, args.out / name), flush=True)
    return 0


def _tuned(name: str, objective: str, jobs: int, folder: Path) -> str:
    """One tune run from a fresh cache: its summary lines."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = model_dir(name)
    command = [sys.executable, "-m", "onnxsparse", "tune", str(data / "model.onnx"), "-o", str(folder / f"{objective}.onnx"),
               "--objective", objective, "--jobs", str(jobs), "--calibration", str(data / "calibration.npz"),
               "--inputs", str(data / "eval.npz"), "--report", str(folder / f"{objective}.html"),
               "--figures", str(folder / f"{objective}.json"), *BUDGETS.get(name, CLASSIFIER_BUDGET)]
    timed = ["/usr/bin/time", "-v", *command] if Path("/usr/bin/time").exists() else command
    started = time.perf_counter()
    done = subprocess.run(timed, capture_output=True, text=True, check=False, cwd=ROOT)
    wall = time.perf_counter() - started
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    memory = f"{int(peak.group(1)) / 2**20:.2f} GB peak" if peak else "peak memory not measured"
    table = done.stdout[done.stdout.find("candidate"):] if "candidate" in done.stdout else done.stdout[-3000:] + done.stderr[-2000:]
    return f"## {name}: exit {done.returncode}, {wall:.0f} s, {memory}\n\n{table}\n"


if __name__ == "__main__":
    sys.exit(main())
