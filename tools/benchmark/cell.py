"""One benchmark cell (a model x a configuration), run in its own process by ``tools/bench.py``.

    python -m benchmark.cell --model mnist --config "magnitude 50%" --cell-dir DIR [--cache DIR] ...

Produces the candidate with the configuration's tool (each tool in a child process of its own: the
onnxsparse CLI, or the peer runner in the peers venv), measures it against the fp32 model and writes
``DIR/result.json``. A tool that fails is a result too: its first error line becomes the cell. The
orchestrator owns the time limit and kills this process group when it runs out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent.parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from benchmark.configs import FP32, ONNXSPARSE, Config, find_config
from benchmark.measure import LatencySettings, as_dict, interleaved_latency, model_figures

RESULT_FILE = "result.json"
CANDIDATE_FILE = "candidate.onnx"
TOOL_LOG = "tool.log"


@dataclass
class Produced:
    """What a tool made: the candidate's path, or the first line of why it could not."""

    candidate: Path | None
    seconds: float
    command: str
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- error lines

_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failure|Exit|Interrupt)\b.*")


def first_error_line(log_text: str) -> str:
    """The line that says why a tool failed: onnxsparse's own ``onnxsparse: error: ...``, a peer's
    ``FAILED: ...``, else a traceback's final ``SomeError: message``, else the last line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    # onnxsparse's CLI: "onnxsparse: error: <bad input>" or "onnxsparse: internal error: <a bug>" (kept as such).
    for prefix, keep in (("onnxsparse: error:", ""), ("onnxsparse: internal error:", "internal error: "), ("FAILED:", "")):
        for line in lines:
            if line.startswith(prefix):
                return keep + line.removeprefix(prefix).strip()
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line
    return lines[-1] if lines else "no output"


def run_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float]:
    started = time.perf_counter()
    with log.open("a", encoding="utf-8") as stream:
        stream.write(f"$ {shlex.join(command)}\n")
        stream.flush()
        code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, check=False).returncode
    return code, time.perf_counter() - started


# --------------------------------------------------------------------------- tools


# onnxsparse's exit statuses that still write a candidate: done, final validation failed (--policy keep),
# a requested pass rolled back (the row then measures the model without it, and says so).
WRITTEN_STATUSES = (0, 1, 4)
VALIDATE_ON = ("eval", "calibration")


def produce_onnxsparse(config: Config, task_dir: Path, cell_dir: Path, validate_on: str = "eval") -> Produced:
    """``onnxsparse optimize`` through its CLI (what a user runs), calibrated on the calibration split,
    ``--policy keep`` so the row shows what the passes do even past their tolerance; the report JSON
    says what each pass did. ``validate_on``: the eval split (``--inputs``), or ``calibration``: no
    ``--inputs``, so the tool validates on the part of the calibration split it holds out of every fit."""
    candidate, report_path = cell_dir / CANDIDATE_FILE, cell_dir / "report.json"
    inputs = ["--inputs", str(task_dir / "eval.npz")] if validate_on == "eval" else []
    arguments = [
        "optimize", str(task_dir / "model.onnx"), "-o", str(candidate), "-p", task_pipeline(config.pipeline, task_dir),
        *inputs, "--calibration", str(task_dir / "calibration.npz"), "--policy", "keep", "--report", str(report_path),
    ]  # fmt: skip
    for stale in (candidate, report_path):
        stale.unlink(missing_ok=True)
    code, seconds = run_logged([sys.executable, "-m", "onnxsparse", *arguments], cell_dir / TOOL_LOG)
    command = shlex.join(["onnxsparse", *arguments])
    if code not in WRITTEN_STATUSES or not candidate.is_file():
        return Produced(None, seconds, command, first_error_line((cell_dir / TOOL_LOG).read_text(encoding="utf-8", errors="replace")))
    report = json.loads(report_path.read_text(encoding="utf-8"))
    return Produced(candidate, seconds, command, details=report_details(report))


# Written in a row's pipeline where it names a file of the task: distill{data="$TASK/train.npz"}.
TASK_FOLDER = "$TASK"


def task_pipeline(pipeline: str, task_dir: Path) -> str:
    """The row's pipeline text for one task: ``$TASK`` becomes the task's folder."""
    return pipeline.replace(TASK_FOLDER, str(task_dir))


def report_details(report: dict[str, Any]) -> dict[str, Any]:
    """The parts of an onnxsparse report a benchmark row needs: each step's verdict and figures."""
    steps = [
        {"pass": s["pass_name"], "spec": s["spec"], "status": s["status"], "reason": s.get("reason", ""), "figures": s.get("figures", {}),
         "seconds": s.get("seconds", {})}
        for s in report.get("steps", [])
    ]  # fmt: skip
    verdict = (report.get("final_validation") or {}).get("verdict") or {}
    return {
        "steps": steps,
        "validated_on": report.get("inputs"),
        "fitted_on": report.get("calibration"),
        "final_validation_passed": verdict.get("passed"),
        "final_validation_failures": verdict.get("failures", []),
        "optimize_seconds": report.get("seconds"),
        "warnings": report.get("warnings", []),
    }


def produce_peer(config: Config, task_dir: Path, cell_dir: Path, peers_python: Path | None) -> Produced:
    """The peer runner (``benchmark.peer``) in the peers venv, in a process of its own."""
    candidate = cell_dir / CANDIDATE_FILE
    candidate.unlink(missing_ok=True)
    arguments = ["-m", "benchmark.peer", "--tool", config.tool, "--spec", config.pipeline, "--task-dir", str(task_dir), "--out", str(candidate)]
    command = shlex.join(["python", *arguments])
    if peers_python is None or not peers_python.exists():
        return Produced(None, 0.0, command, "the peers venv is not available (see the bench log)")
    env = dict(os.environ, PYTHONPATH=str(TOOLS), PYTHONUNBUFFERED="1")
    code, seconds = run_logged([str(peers_python), *arguments], cell_dir / TOOL_LOG, env=env)
    log_text = (cell_dir / TOOL_LOG).read_text(encoding="utf-8", errors="replace")
    command = f"PYTHONPATH=tools {shlex.join([str(peers_python), *arguments])}"
    if code != 0 or not candidate.is_file():
        return Produced(None, seconds, command, first_error_line(log_text))
    details: dict[str, Any] = next((json.loads(line[len("RESULT: "):]) for line in reversed(log_text.splitlines()) if line.startswith("RESULT: ")), {})
    return Produced(candidate, seconds, command, details=details)


# --------------------------------------------------------------------------- the cell


def staged(stage: str, action: Callable[[], Any]) -> Any:
    """Run one measuring stage; a failure is re-raised with the stage's name in front, so the cell
    says e.g. 'onnxruntime cannot run the candidate: ...' instead of a bare exception."""
    try:
        return action()
    except Exception as error:
        text = str(error).strip()
        line = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
        raise StageError(f"{stage}: {line}") from error


class StageError(RuntimeError):
    pass


def status_of(produced: Produced) -> tuple[str, str]:
    """(status, note) of a candidate that was produced: 'ok', or which passes were rolled back or
    kept past their tolerance (--policy keep) - the reader must not take such a row as a clean pass."""
    steps = produced.details.get("steps", [])
    rolled_back = [s for s in steps if s["status"] in ("rolled-back", "worse")]
    if rolled_back:
        first = rolled_back[0]
        reason = (first["reason"] or "no reason given").splitlines()[0]
        return "rolled-back", f"{first['pass']} rolled back: {reason}"
    notes = [f"{s['pass']} changed nothing: {s['reason']}" for s in steps if s["status"] == "no-change"]
    kept = [s["pass"] for s in steps if s["status"] == "kept-failing"]
    if kept:
        notes.insert(0, f"over tolerance (kept): {', '.join(kept)}")
    return "ok", "; ".join(notes + produced.details.get("notes", []))


def same_content(candidate: dict[str, Any], reference: dict[str, Any]) -> bool:
    """Same ops and the same parameter counts, zeros and bytes: the tool changed nothing that matters."""
    keys = ("op_histogram", "parameters", "nonzero_parameters", "parameter_bytes", "unused_tensors")
    return all(candidate.get(key) == reference.get(key) for key in keys)


def run_cell(model: str, config: Config, cell_dir: Path, cache: str | None, peers_python: Path | None, settings: LatencySettings,
             validate_on: str = "eval") -> dict[str, Any]:
    from realmodels import load_task

    started = time.perf_counter()
    task = load_task(model, cache)
    task_dir = task.model_path.parent
    result: dict[str, Any] = {"model": model, "config": config.name, "tool": config.tool, "pipeline": config.pipeline, "status": "ok", "error": ""}
    if config.tool == FP32:
        produced = Produced(task.model_path, 0.0, "")
    elif config.tool == ONNXSPARSE:
        produced = produce_onnxsparse(config, task_dir, cell_dir, validate_on)
    else:
        produced = produce_peer(config, task_dir, cell_dir, peers_python)
    result.update(command=produced.command, tool_seconds=produced.seconds, details=produced.details)
    if produced.candidate is None:
        result.update(status="error", error=produced.error, cell_seconds=time.perf_counter() - started)
        return result
    candidate = produced.candidate
    result["status"], result["note"] = status_of(produced)
    try:
        fp32_bytes = task.model_path.stat().st_size
        result["figures"] = staged("inspect", lambda: model_figures(candidate, fp32_bytes))
        if config.tool != FP32 and same_content(result["figures"], model_figures(task.model_path, fp32_bytes)):
            # A tool that returns its input untouched says "ok" too: the row must say it did nothing.
            result["note"] = "; ".join(filter(None, [result["note"], "no op or weight changed"]))
        reference = staged("fp32 outputs", task.run)
        outputs = staged("onnxruntime cannot run the candidate", lambda: task.run(candidate))
        result["metrics"] = staged("task metric", lambda: task.evaluate(reference, outputs))
        latency = staged("latency", lambda: interleaved_latency(task.model_path, candidate, task.eval_feeds[0], settings))
        result["latency"] = as_dict(latency)
    except StageError as error:
        result.update(status="error", error=str(error))
    result["cell_seconds"] = time.perf_counter() - started
    return result


def write_json(path: Path, data: dict[str, Any]) -> None:
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(staging, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def _finite(data: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings (a CER against an empty fp32 reading can be inf)."""
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_finite(value) for value in data]
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--cell-dir", required=True, type=Path)
    parser.add_argument("--cache", help="model cache (default: realmodels' default)")
    parser.add_argument("--peers-python", type=Path, help="python of the peers venv")
    parser.add_argument("--warmup", type=int, default=LatencySettings.warmup)
    parser.add_argument("--runs", type=int, default=LatencySettings.runs)
    parser.add_argument("--min-seconds", type=float, default=LatencySettings.min_seconds)
    parser.add_argument("--validate-on", choices=VALIDATE_ON, default="eval")
    args = parser.parse_args(argv)
    args.cell_dir.mkdir(parents=True, exist_ok=True)
    (args.cell_dir / TOOL_LOG).unlink(missing_ok=True)
    settings = LatencySettings(warmup=args.warmup, runs=args.runs, min_seconds=args.min_seconds)
    try:
        result = run_cell(args.model, find_config(args.config), args.cell_dir, args.cache, args.peers_python, settings, args.validate_on)
    except Exception:  # noqa: BLE001  (the orchestrator turns a missing result.json into an error cell)
        traceback.print_exc()
        return 1
    write_json(args.cell_dir / RESULT_FILE, _finite(result))
    print(f"{args.model} / {args.config}: {result['status']} {result.get('error') or result.get('note') or ''}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
