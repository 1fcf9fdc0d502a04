"""Helpers shared by the ``export_*.py`` scripts (run in the tools venv, never in the core env).

Every exporter ends the same way: check the model, describe it, write the task data, score the fp32
model on its own eval split with the same code the benchmark uses (``realmodels.tasks``), and write
``info.json``. Keeping that here keeps the exporters about their model only.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
import traceback
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

# onnxruntime 1.31 loads IR <= 13 and our policy caps what we write at 10 (onnx 1.16 era), so the
# files also load in older runtimes; none of the models needs anything newer.
MAX_IR_VERSION = 10


def parse_out_dir(description: str) -> Path:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, type=Path, help="folder to write model.onnx, *.npz, info.json into")
    out: Path = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_main(main: Callable[[Path], None], description: str) -> None:
    """Run an exporter; on failure print the traceback and a last line ``FAILED: <reason>`` that
    fetch_models.py shows as the one-line reason."""
    out = parse_out_dir(description)
    try:
        main(out)
    except Exception as error:  # noqa: BLE001  (the reason is reported, the process fails)
        traceback.print_exc()
        print(f"FAILED: {type(error).__name__}: {error}".splitlines()[0], flush=True)
        sys.exit(1)


def export_classifier(
    model: Any, sample_shape: tuple[int, ...], path: Path, opset: int, *, keep_batchnorm: bool = False, dtype: Any = None
) -> None:
    """torch.onnx.export of a classifier: ``input`` [batch, ...] -> ``logits`` [batch, classes],
    TorchScript exporter (what most deployed torch exports still are). ``keep_batchnorm`` leaves
    BatchNormalization as nodes (PRESERVE, no constant folding) instead of folding it into the convs;
    ``dtype`` is the input's torch dtype (default float32; torch.int32 for token or byte ids)."""
    import torch

    torch.onnx.export(
        model,
        (torch.zeros(1, *sample_shape, dtype=dtype or torch.float32),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset,
        training=torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL,
        do_constant_folding=not keep_batchnorm,
        dynamo=False,
    )


def package_version(distribution: str) -> str:
    return importlib.metadata.version(distribution)


def package_file(distribution: str, suffix: str) -> Path:
    """The one file of an installed distribution whose path ends with ``suffix`` (wheel RECORD)."""
    files = importlib.metadata.files(distribution) or []
    matches = [f for f in files if str(f).replace("\\", "/").endswith(suffix)]
    if len(matches) != 1:
        raise FileNotFoundError(f"{distribution} {package_version(distribution)} has {len(matches)} files ending in {suffix!r}")
    path = Path(str(matches[0].locate())).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed by {distribution} but missing on disk")
    return path


def package_files(distribution: str, prefix: str, ending: str) -> list[str]:
    """The files of an installed distribution whose path starts with ``prefix`` and ends with ``ending``,
    sorted, as wheel-RECORD paths with forward slashes (what ``package_file`` takes)."""
    paths = (str(f).replace("\\", "/") for f in importlib.metadata.files(distribution) or [])
    return sorted(path for path in paths if path.startswith(prefix) and path.endswith(ending))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model(path: Path) -> onnx.ModelProto:
    """The contract every cached model meets: weights inside, IR <= 10, full checker, loads in ort."""
    model = onnx.load(str(path), load_external_data=False)
    if model.ir_version > MAX_IR_VERSION:
        raise ValueError(f"{path.name} has IR version {model.ir_version} > {MAX_IR_VERSION}")
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ValueError(f"{path.name} keeps {len(external)} tensors in external data")
    onnx.checker.check_model(str(path), full_check=True)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return model


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _dtype(value: onnx.ValueInfoProto) -> str:
    return str(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


def describe_model(path: Path) -> dict[str, Any]:
    """What info.json says about the graph: opsets, IO, op histogram, where the weights are."""
    model = onnx.load(str(path))
    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializer_names]
    histogram = collections.Counter(node.op_type for node in model.graph.node)
    constant_tensors = [
        attr.t for node in model.graph.node if node.op_type == "Constant" for attr in node.attribute if attr.name == "value"
    ]
    return {
        "ir_version": model.ir_version,
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "opset_imports": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": v.name, "dtype": _dtype(v), "shape": _dims(v)} for v in inputs],
        "outputs": [{"name": v.name, "dtype": _dtype(v), "shape": _dims(v)} for v in model.graph.output],
        "nodes": len(model.graph.node),
        "op_histogram": dict(histogram.most_common()),
        "weights": {
            "initializers": len(model.graph.initializer),
            "initializer_elements": int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer)),
            "constant_nodes": len(constant_tensors),
            # Constant nodes also hold shapes and axes; only the sizeable ones are weights.
            "constant_nodes_over_16_elements": sum(1 for t in constant_tensors if np.prod(t.dims, dtype=np.int64) > 16),
            "constant_node_elements": int(sum(np.prod(t.dims, dtype=np.int64) for t in constant_tensors)),
        },
        "metadata_keys": sorted(p.key for p in model.metadata_props),
        "file_bytes": path.stat().st_size,
        "sha256": sha256(path),
    }


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    for key, array in arrays.items():
        if array.dtype == object:
            raise TypeError(f"{path.name}[{key}] is an object array; store strings as numpy unicode arrays")
    np.savez(path, **arrays)


def environment() -> dict[str, str]:
    names = ["numpy", "onnx", "onnxruntime", "torch", "transformers", "scikit-image", "scikit-learn", "matplotlib", "pillow"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = package_version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def finish(
    out: Path, info: dict[str, Any], task_metric_keys: list[str], source_outputs: np.ndarray | None = None
) -> dict[str, Any]:
    """Check model.onnx, describe it, score the fp32 model on its own eval split with the benchmark's
    code (``realmodels.tasks``), and write info.json. ``source_outputs``: the source framework's
    outputs on the eval split, to record how far onnxruntime is from them."""
    from realmodels.tasks import load_task_from

    check_model(out / "model.onnx")
    info = {**info, **describe_model(out / "model.onnx"), "environment": environment()}
    write_info(out, info)  # load_task_from reads the input names and batch size from it
    task = load_task_from(out)
    fp32 = task.run()
    if source_outputs is not None:
        info["source_vs_onnxruntime_max_abs"] = float(np.max(np.abs(fp32.astype(np.float64) - source_outputs)))
    scores = task.evaluate(fp32, fp32)
    info["fp32_eval"] = scores
    info["fp32_task_metrics"] = {key: scores[key] for key in task_metric_keys}
    write_info(out, info)
    print(json.dumps({key: info.get(key) for key in ("fp32_eval", "source_vs_onnxruntime_max_abs")}, indent=1))
    return info


def write_info(out: Path, info: Mapping[str, Any]) -> None:
    (out / "info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def unpacked(packages: list[str], folder: Path) -> dict[str, tuple[Path, str]]:
    """Each Debian package downloaded with apt-get (not installed) and unpacked under ``folder``:
    name -> (root, version)."""
    subprocess.run(["apt-get", "download", *packages], cwd=folder, check=True, capture_output=True, timeout=600)
    roots = {}
    for package in packages:
        deb = next(folder.glob(f"{package}_*.deb"), None)
        if deb is None:
            raise FileNotFoundError(f"apt-get download {package} wrote no .deb into {folder}")
        root = folder / package
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        roots[package] = (root, urllib.parse.unquote(deb.name.split("_")[1]))  # the epoch's ':' is %3a in the file name
    return roots
