"""Filter-level magnitude pruning, then channel-prune{mode=zero-only}: the channel removal must not move
any output. Prints, per model, the channels removed, MACs and parameters, and the largest output change
|after - before| / max |before| on the model's evaluation inputs (the #4 criterion: <= 1e-5).

    python tools/zero_only_exactness.py [--models digits_cnn mobilenetv2 ...] [--sparsity 0.3]

Bundled models always run; real models run when fetched (python3 tools/fetch_models.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realmodels.paths import MODEL_NAMES, model_dir  # noqa: E402

import onnxsparse  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUNDLED = ("digits_cnn", "digits_transformer", "digits_sklearn_mlp")


def model_files(name: str) -> tuple[Path, Path, Path] | None:
    """(model, calibration, evaluation inputs) of a bundled or fetched model, or None when not fetched."""
    if name in BUNDLED:
        base = REPO / "models" / name
        return Path(f"{base}.onnx"), Path(f"{base}.calibration.npz"), Path(f"{base}.inputs.npz")
    folder = model_dir(name)
    files = folder / "model.onnx", folder / "calibration.npz", folder / "eval.npz"
    return files if all(f.exists() for f in files) else None


def outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


def measure(name: str, sparsity: float) -> str:
    files = model_files(name)
    if files is None:
        return f"{name}: not fetched"
    model, calibration, inputs = files
    with tempfile.TemporaryDirectory() as folder:
        filtered, removed = Path(folder) / "filtered.onnx", Path(folder) / "removed.onnx"
        onnxsparse.optimize(model, filtered, f"fold-batchnorm,magnitude-prune{{pattern=filter sparsity={sparsity}}}", calibration=calibration, policy="keep")
        # never_slower=false: odd channel counts may run slower, and exactness is what is measured here.
        report = onnxsparse.optimize(filtered, removed, "channel-prune{mode=zero-only never_slower=false}", calibration=calibration, policy="keep")
        with np.load(inputs) as archive:
            feeds = {key: archive[key] for key in archive.files}
        before, after = outputs(filtered, feeds), outputs(removed, feeds)
    change = max(float(np.max(np.abs(b - a))) / max(float(np.max(np.abs(b))), 1e-30) for b, a in zip(before, after, strict=True))
    figures = next(step.figures for step in report.steps if step.pass_name == "channel-prune")
    return (f"{name}: {figures.get('channels_removed', 0)} channels removed, MACs x{figures.get('macs_ratio', 1.0)}, "
            f"parameters {figures.get('parameters_before')} -> {figures.get('parameters_after')}, max |after - before| / max |before| = {change:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[*BUNDLED, *MODEL_NAMES])
    parser.add_argument("--sparsity", type=float, default=0.3, help="share of filters zeroed per layer before the removal")
    args = parser.parse_args()
    for name in args.models:
        print(measure(name, args.sparsity), flush=True)


if __name__ == "__main__":
    main()
