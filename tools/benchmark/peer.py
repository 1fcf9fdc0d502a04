"""Run one peer configuration (onnxruntime's quantizer or onnxsim) and write the candidate model.

Runs in the peers venv (``<cache>/peers-venv``), never in the core environment: onnxsim is a large
binary package that onnxsparse must not depend on, and keeping the peers apart means a peer's
dependency pins can never change what onnxsparse runs against. The core environment only measures
the file this writes.

    python -m benchmark.peer --tool onnxsim --spec "simplify(); apply_structured_pruning(sparsity=0.3)" \\
        --task-dir <cache>/mnist --out candidate.onnx

The spec is a ``;``-separated list of calls with literal keyword arguments (parsed with ``ast``, never
evaluated). On success the last line printed is ``RESULT: {json}``; on failure ``FAILED: <Type: first
line>`` and exit status 1: the benchmark shows that line in the cell.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Call:
    function: str
    kwargs: dict[str, Any]

    def text(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{self.function}({arguments})"


def parse_calls(spec: str) -> list[Call]:
    """``"f(a=1); g()"`` -> [Call('f', {'a': 1}), Call('g', {})]. Only names, keywords and literals:
    a spec is configuration, and ``ast.literal_eval`` keeps it from ever being code."""
    calls = []
    for part in (piece.strip() for piece in spec.split(";")):
        if not part:
            continue
        node = ast.parse(part, mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise ValueError(f"{part!r}: expected name(keyword=literal, ...)")
        kwargs = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise ValueError(f"{part!r}: **kwargs is not allowed")
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        calls.append(Call(node.func.id, kwargs))
    if not calls:
        raise ValueError("empty peer spec")
    return calls


# --------------------------------------------------------------------------- onnxruntime


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over the task's calibration feeds. A list and an
    index, not an iterator: MatMulNBitsQuantizer's GPTQ deep-copies the reader before reading it."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self._feeds = list(feeds)
        self._next = 0

    def get_next(self) -> dict[str, Any] | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]


def _calibration_reader(calibration: list[dict[str, Any]]) -> Any:
    from onnxruntime import quantization as q

    # A subclass is what onnxruntime's quantizer checks for; the plain class above keeps imports lazy.
    class Reader(_FeedReader, q.CalibrationDataReader):
        pass

    return Reader(calibration)


def _ort_enums(kwargs: dict[str, Any]) -> dict[str, Any]:
    # The spec names enum members as strings ("QDQ", "QUInt8"): map them to onnxruntime's enums.
    from onnxruntime import quantization as q

    enums = {"quant_format": q.QuantFormat, "activation_type": q.QuantType, "weight_type": q.QuantType, "calibrate_method": q.CalibrationMethod}
    return {key: getattr(enums[key], value) if key in enums and isinstance(value, str) else value for key, value in kwargs.items()}


def run_ort(call: Call, source: Path, target: Path, calibration: list[dict[str, Any]]) -> None:
    from onnxruntime import quantization as q

    kwargs = _ort_enums(call.kwargs)
    if call.function == "quantize_static":
        q.quantize_static(str(source), str(target), _calibration_reader(calibration), **kwargs)
    elif call.function == "quantize_dynamic":
        q.quantize_dynamic(str(source), str(target), **kwargs)
    elif call.function == "matmul_nbits":
        matmul_nbits(source, target, calibration, **kwargs)
    else:
        raise ValueError(f"ort: unsupported call {call.function!r} (quantize_static, quantize_dynamic, matmul_nbits)")


# MatMulNBitsQuantizer's algorithms, as the spec names them. DEFAULT is onnxruntime's own C++ block-wise
# RTN (algo_config None); HQQ needs torch and is asymmetric whatever is_symmetric says; RTN, k_quant
# and GPTQ run the Intel Neural Compressor weight-only code that onnxruntime ships in
# onnxruntime.quantization.neural_compressor (no neural-compressor package needed); k_quant always
# writes zero points; GPTQ calibrates on the task's calibration feeds.
MATMUL_NBITS_ALGORITHMS = ("DEFAULT", "HQQ", "RTN", "k_quant", "GPTQ")


def matmul_nbits(source: Path, target: Path, calibration: list[dict[str, Any]], algorithm: str = "DEFAULT", block_size: int = 32,
                 is_symmetric: bool = True, accuracy_level: int | None = None, bits: int = 4, op_types: tuple[str, ...] = ("MatMul",)) -> None:
    """onnxruntime's MatMulNBitsQuantizer (MatMul weights -> com.microsoft MatMulNBits). Our defaults
    (block 32, symmetric) are passed explicitly: the quantizer's own are block 128, asymmetric. The
    file is written whole (no external data): every model here is far under protobuf's 2 GB. ``op_types``
    with "Gather" quantizes embedding tables too (GatherBlockQuantized; DEFAULT and HQQ only)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if algorithm == "DEFAULT":
        config = None
    elif algorithm == "HQQ":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=tuple(op_types))
    elif algorithm == "RTN":
        config = nbits.RTNWeightOnlyQuantConfig()
    elif algorithm == "k_quant":
        config = nbits.KQuantWeightOnlyQuantConfig()
    elif algorithm == "GPTQ":
        config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=_calibration_reader(calibration))
    else:
        raise ValueError(f"matmul_nbits: unknown algorithm {algorithm!r} ({', '.join(MATMUL_NBITS_ALGORITHMS)})")
    if algorithm in ("RTN", "k_quant", "GPTQ") and bits != 4:
        raise ValueError(f"matmul_nbits: {algorithm} here quantizes to 4 bits only (onnxruntime's weight config is 4-bit)")
    # The path, not a loaded proto: RTN/k_quant/GPTQ read the model from its path.
    quantizer = nbits.MatMulNBitsQuantizer(str(source), bits=bits, block_size=block_size, is_symmetric=is_symmetric,
                                           accuracy_level=accuracy_level, algo_config=config, op_types_to_quantize=tuple(op_types))  # fmt: skip
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)


# --------------------------------------------------------------------------- onnxsim


def run_onnxsim(call: Call, source: Path, target: Path, calibration: list[dict[str, Any]]) -> list[str]:
    import onnx
    import onnxsim

    function = getattr(onnxsim, call.function, None)
    if function is None:
        raise AttributeError(f"onnxsim {onnxsim.__version__} has no function {call.function!r}")
    kwargs = dict(call.kwargs)
    if "calibration_data" in inspect.signature(function).parameters:
        # Without it onnxsim calibrates on random inputs: give it the task's real calibration split.
        kwargs.setdefault("calibration_data", calibration)
    result = function(onnx.load(str(source)), **kwargs)
    notes = []
    if isinstance(result, tuple):  # simplify returns (model, check_ok)
        result, ok = result[0], result[1]
        if ok is False:
            notes.append(f"{call.function}: onnxsim's own check failed")
    if not isinstance(result, onnx.ModelProto):
        raise TypeError(f"{call.function} returned {type(result).__name__}, not a ModelProto")
    onnx.save(result, str(target))
    return notes


# --------------------------------------------------------------------------- main


def versions(tool: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["onnx", "onnxruntime"] + (["onnxsim"] if tool == "onnxsim" else ["onnx-ir", "torch"])
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:  # onnx-ir and torch are needed by MatMulNBitsQuantizer only
            pass
    return found


def apply(tool: str, spec: str, task_dir: Path, out: Path) -> dict[str, Any]:
    from realmodels.tasks import load_task_from

    task = load_task_from(task_dir)
    calls = parse_calls(spec)
    notes: list[str] = []
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        source = task.model_path
        for index, call in enumerate(calls):
            # Each step reads a file and writes one: ort's quantizer works on paths, not protos.
            target = out if index == len(calls) - 1 else Path(scratch) / f"step{index}.onnx"
            started = time.perf_counter()
            if tool == "ort":
                run_ort(call, source, target, task.calibration)
            elif tool == "onnxsim":
                notes.extend(run_onnxsim(call, source, target, task.calibration))
            else:
                raise ValueError(f"unknown peer tool {tool!r}")
            seconds[call.text()] = time.perf_counter() - started
            source = target
    return {"versions": versions(tool), "seconds": seconds, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", required=True, choices=("ort", "onnxsim"))
    parser.add_argument("--spec", required=True)
    parser.add_argument("--task-dir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        result = apply(args.tool, args.spec, args.task_dir, args.out)
    except Exception as error:  # noqa: BLE001  (the reason is the cell's content)
        traceback.print_exc()
        print(f"FAILED: {first_line(error)}", flush=True)
        return 1
    print("RESULT: " + json.dumps(result), flush=True)
    return 0


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
