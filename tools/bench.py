#!/usr/bin/env python3
"""Benchmark onnxsparse and its peers on the real models: one Markdown table per model.

    python tools/bench.py [--models NAME ...] [--configs NAME ...] [--force] [--timeout 900] [--out DIR]

Run it with the interpreter where onnxsparse is installed (e.g. ``.venv/bin/python tools/bench.py``).
For every model (tools/realmodels) x configuration (``tools/benchmark/configs.py``) one cell: the
candidate's status (ok, or the first error line), file size, parameters read by nodes (and non-zero)
apart from unused tensors left in the file, latency relative to fp32 (onnxruntime CPU, 1 thread,
interleaved with fp32 in one process), the task metric and the tool's own wall time.

* Models missing from the cache are fetched first (``tools/fetch_models.py``; ``--no-fetch`` skips).
* Peers (onnxruntime's quantizer, onnxsim) run in ``<cache>/peers-venv``, created on first use.
* Each cell runs in its own process group with a time limit (``--timeout``): a crash or a timeout is
  a filled cell, never a lost table.
* Results are cached per cell in ``<cache>/bench/<model>/<config>/result.json`` under a key made of
  everything that decides the result (model files, configuration, onnxsparse's source, peer pins,
  latency settings); a re-run redoes only the cells whose key changed (``--force`` redoes all).
* Tables go to ``<cache>/bench/results.md`` and ``results.json`` (``--out DIR`` elsewhere), and to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

from benchmark.cell import CANDIDATE_FILE, RESULT_FILE, write_json
from benchmark.configs import CONFIGS, FP32, HEADLINE_METRICS, ONNXSPARSE, PEER_TOOLS, Config, find_config
from benchmark.measure import LatencySettings
from benchmark.table import render_configs, render_report
from realmodels.paths import MODEL_FILES, MODEL_NAMES, cache_dir, is_present, model_dir

DEFAULT_TIMEOUT = 900.0
# The peers' environment, pinned: the rows compare against these exact versions. onnx and
# onnxruntime match the tools venv's pins, so peers and onnxsparse see the same runtime. onnx-ir is
# imported by onnxruntime's MatMulNBitsQuantizer but not declared by onnxruntime; torch (this CPU build)
# is what its HQQ algorithm runs on.
PEER_REQUIREMENTS: tuple[str, ...] = ("onnxsim==0.8.1", "onnx==1.23.2", "onnxruntime==1.31.1", "numpy==2.4.6", "onnx-ir==1.1.0", "torch==2.13.0")
PEERS_VENV = "peers-venv"
PEERS_STAMP = "onnxsparse-peer-requirements.txt"


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="configurations:\n" + "\n".join(f"  {c.name:32s} [{c.tool}] {c.pipeline}" for c in CONFIGS))  # fmt: skip
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, metavar="NAME", help=f"models to run (default all: {', '.join(MODEL_NAMES)})")
    parser.add_argument("--configs", nargs="+", metavar="NAME", help="configurations to run, by name or folder name (default all; fp32 is always kept)")
    parser.add_argument("--force", action="store_true", help="redo cells even when their cached result is current")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help=f"seconds per cell (default {DEFAULT_TIMEOUT:.0f})")
    parser.add_argument("--cache", help="model cache (default: $ONNXSPARSE_MODEL_CACHE or ~/.cache/onnxsparse/models)")
    parser.add_argument("--results", type=Path, help="per-cell results folder (default <cache>/bench)")
    parser.add_argument("--out", type=Path, help="folder for results.md and results.json (default: the results folder)")
    parser.add_argument("--no-fetch", action="store_true", help="do not fetch missing models; run only the cached ones")
    parser.add_argument("--runs", type=int, default=LatencySettings.runs, help=f"timed runs per model and cell, at least (default {LatencySettings.runs})")
    parser.add_argument("--min-seconds", type=float, default=LatencySettings.min_seconds, help="timed seconds per cell, at least")
    parser.add_argument("--warmup", type=int, default=LatencySettings.warmup, help="untimed runs of each model first")
    parser.add_argument("--validate-on", choices=("eval", "calibration"), default="eval",
                        help="what onnxsparse validates on: the eval split (--inputs; default), or calibration: no --inputs, so the "
                             "tool holds part of the calibration split out of every fit and validates on it (what a user with one "
                             "folder of samples gets); task metrics are on the eval split either way")
    parser.add_argument("--keep-candidates", action=argparse.BooleanOptionalAction, default=True,
                        help="keep each cell's candidate.onnx beside its result (default yes; --no-keep-candidates saves disk)")  # fmt: skip
    return parser.parse_args(argv)


def selected_configs(names: list[str] | None) -> list[Config]:
    if not names:
        return list(CONFIGS)
    try:
        chosen = {find_config(name).name for name in names} | {"fp32"}  # every ratio is relative to fp32: keep its row
    except KeyError as error:
        raise SystemExit(f"bench.py: {error.args[0]}") from None
    return [config for config in CONFIGS if config.name in chosen]


# --------------------------------------------------------------------------- environment


def ensure_models(models: list[str], cache: str | None, fetch: bool) -> list[str]:
    """The requested models that are in the cache, fetching the missing ones unless told not to."""
    missing = [name for name in models if not is_present(name, cache)]
    if missing and fetch:
        command = [sys.executable, str(TOOLS / "fetch_models.py"), "--only", *missing] + (["--cache", cache] if cache else [])
        print(f"fetching {', '.join(missing)}: {shlex.join(command)}", flush=True)
        subprocess.run(command, check=False)
    absent = [name for name in models if not is_present(name, cache)]
    if absent:
        print(f"not in the cache, skipped: {', '.join(absent)} (run `python3 tools/fetch_models.py`)", file=sys.stderr)
    return [name for name in models if name not in absent]


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_peers_venv(cache: Path, log: Path) -> Path | None:
    """``<cache>/peers-venv`` with the pinned peers, created or refilled when its stamp differs.
    None (and the reason in ``log``) if pip cannot: the peer cells then say so."""
    venv = cache / PEERS_VENV
    python, stamp = venv_python(venv), venv / PEERS_STAMP
    wanted = "\n".join(PEER_REQUIREMENTS) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text(encoding="utf-8") == wanted:
        return python
    print(f"peers venv: installing {' '.join(PEER_REQUIREMENTS)} into {venv}", flush=True)
    with log.open("a", encoding="utf-8") as stream:
        steps = [] if python.exists() else [[sys.executable, "-m", "venv", str(venv)]]
        steps.append([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off", *PEER_REQUIREMENTS])
        for command in steps:
            stream.write(f"\n$ {shlex.join(command)}\n")
            stream.flush()
            if subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, check=False).returncode != 0:
                print(f"peers venv: failed, see {log}", file=sys.stderr)
                return None
    stamp.write_text(wanted, encoding="utf-8")
    return python


# --------------------------------------------------------------------------- cache keys


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]


def files_digest(paths: list[Path]) -> str:
    hasher = hashlib.sha256()
    for path in sorted(paths):
        hasher.update(str(path.name).encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()[:20]


def onnxsparse_fingerprint() -> str:
    """onnxsparse's source as installed for this interpreter: any change to a pass (or a new pass,
    such as channel-prune or qdq landing) changes the key of every onnxsparse cell."""
    spec = importlib.util.find_spec("onnxsparse")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"onnxsparse is not importable from {sys.executable}; run this with the venv it is installed in")
    package = Path(next(iter(spec.submodule_search_locations)))
    return files_digest([path for path in package.rglob("*.py") if "__pycache__" not in path.parts])


def peers_fingerprint() -> str:
    return digest([PEER_REQUIREMENTS, files_digest([TOOLS / "benchmark" / "peer.py"])])


def model_fingerprint(model: str, cache: str | None) -> list[Any]:
    # Size and mtime: a fetch --force rewrites the files; hashing 100 MB per cell would not pay.
    folder = model_dir(model, cache)
    return [[name, (folder / name).stat().st_size, (folder / name).stat().st_mtime_ns] for name in MODEL_FILES]


def runtime_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("onnx", "onnxruntime", "numpy")}


def measure_fingerprint() -> str:
    # The code that produces and measures a cell: editing it redoes the cells (the table renderer is not part of it).
    return files_digest([TOOLS / "benchmark" / "cell.py", TOOLS / "benchmark" / "measure.py"])


def cell_key(model: str, config: Config, cache: str | None, settings: LatencySettings, validate_on: str = "eval") -> str:
    tool = {FP32: "", ONNXSPARSE: onnxsparse_fingerprint()}.get(config.tool) or (peers_fingerprint() if config.tool in PEER_TOOLS else "")
    return digest(
        {"measure": measure_fingerprint(), "latency": asdict(settings), "runtime": runtime_versions(), "model": model_fingerprint(model, cache),
         "config": asdict(config), "tool": tool, **({"validate_on": validate_on} if validate_on != "eval" else {})}
    )  # fmt: skip


def cached_result(path: Path, key: str, timeout: float) -> dict[str, Any] | None:
    """The stored result if it is current; a timeout is current only under the same or a lower limit."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if result.get("key") != key:
        return None
    if result.get("status") == "timeout" and timeout > float(result.get("timeout_seconds", 0)):
        return None
    return result


# --------------------------------------------------------------------------- cells


def run_cell_process(command: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run a cell in a new process group; on timeout kill that group (the cell and the tool it
    started, nothing else). Returns (exit code or None on timeout, seconds)."""
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as stream:
        stream.write(f"$ {shlex.join(command)}\n")
        stream.flush()
        # cwd = the cell's folder, not the repository: `python -m onnxsparse` must run the installed
        # package (the one fingerprinted in the cache key), not a source tree it happens to stand in.
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent)
        try:
            code: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        except KeyboardInterrupt:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        if code is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return code, time.perf_counter() - started


def failed_cell(model: str, config: Config, code: int | None, log: Path, timeout: float) -> dict[str, Any]:
    from benchmark.cell import first_error_line

    if code is None:
        error = f"timeout after {timeout:.0f} s"
    elif code < 0:
        error = f"cell killed by signal {signal.Signals(-code).name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    else:
        error = "cell crashed: " + first_error_line(log.read_text(encoding="utf-8", errors="replace"))
    status = "timeout" if code is None else "error"
    return {"model": model, "config": config.name, "tool": config.tool, "pipeline": config.pipeline, "status": status, "error": error}


def run_cell(model: str, config: Config, args: argparse.Namespace, results: Path, peers_python: Path | None, settings: LatencySettings) -> tuple[dict[str, Any], bool]:
    """One cell, from its cache or from a fresh process. Returns (result, whether it was cached)."""
    cell_dir = results / model / config.slug
    cell_dir.mkdir(parents=True, exist_ok=True)
    path = cell_dir / RESULT_FILE
    key = cell_key(model, config, args.cache, settings, args.validate_on)
    if not args.force and (cached := cached_result(path, key, args.timeout)) is not None:
        return cached, True
    path.unlink(missing_ok=True)  # a crashed cell must not leave its predecessor's result behind
    command = [sys.executable, str(TOOLS / "benchmark" / "cell.py"), "--model", model, "--config", config.name, "--cell-dir", str(cell_dir),
               "--warmup", str(settings.warmup), "--runs", str(settings.runs), "--min-seconds", str(settings.min_seconds),
               "--validate-on", args.validate_on]  # fmt: skip
    if args.cache:
        command += ["--cache", args.cache]
    if peers_python is not None:
        command += ["--peers-python", str(peers_python)]
    log = cell_dir / "cell.log"
    code, seconds = run_cell_process(command, log, args.timeout)
    result = json.loads(path.read_text(encoding="utf-8")) if code == 0 and path.is_file() else failed_cell(model, config, code, log, args.timeout)
    result.update(key=key, timeout_seconds=args.timeout, wall_seconds=seconds, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if not args.keep_candidates:
        (cell_dir / CANDIDATE_FILE).unlink(missing_ok=True)
    write_json(path, result)
    return result, False


# --------------------------------------------------------------------------- main


def refuse_repo_folder(folder: Path, flag: str) -> None:
    if folder == REPO or REPO in folder.parents:
        raise SystemExit(f"refusing to write benchmark results inside the repository ({folder}); pass {flag} elsewhere")


LEGEND = (
    "Ratios are candidate / fp32 (size: bytes on disk; latency: median time per eval batch, onnxruntime CPU, "
    "intra-op 1, inter-op 1, sequential, interleaved with fp32 in one process; < 1 is smaller / faster). "
    "'params used' counts the elements of constant tensors read by nodes, 'non-zero' those that are not 0; "
    "'unused tensors' are constants left in the file that no node reads. 'MACs' are the multiply-accumulates of "
    "Conv/Gemm/MatMul per sample, from inferred shapes ('-' on quantized graphs, where they are not counted yet). Task metrics are on the eval split, "
    "against the fp32 model (agreement, cosine) or ground truth (accuracy, exact_match, cer; cer: lower is better). "
    "'tool s' is the wall time of the tool's process (onnxsparse: the CLI with its validation; peers: the peer runner). "
    "onnxsparse rows run with --policy keep: '(over tolerance (kept): ...)' marks passes that broke their default "
    "tolerance and were kept anyway; '<pass> rolled back: ...' marks a pass that onnxsparse rolled back (it crashed, "
    "produced an invalid model, or made the model worse: larger and not faster, or slower): that row measures the model without it; "
    "'<pass> changed nothing: ...' gives the pass's reason. 'no op or weight changed': the tool returned "
    "a model with the same ops and weights as fp32."
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    cache = cache_dir(args.cache)
    results = (args.results or cache / "bench").resolve()
    out = (args.out or results).resolve()
    if args.results:
        refuse_repo_folder(results, "--results")
    onnxsparse_fingerprint()  # fail now, not in every cell, when onnxsparse is not importable here
    configs = selected_configs(args.configs)
    models = ensure_models(list(args.models or MODEL_NAMES), args.cache, fetch=not args.no_fetch)
    if not models:
        return 1
    results.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    peers_python = ensure_peers_venv(cache, results / "peers-venv.log") if any(c.tool in PEER_TOOLS for c in configs) else None
    settings = LatencySettings(warmup=args.warmup, runs=args.runs, min_seconds=args.min_seconds)
    by_model: dict[str, list[dict[str, Any]]] = {}
    total, index, fresh = len(models) * len(configs), 0, 0
    for model in models:
        for config in configs:
            index += 1
            result, cached = run_cell(model, config, args, results, peers_python, settings)
            fresh += not cached
            by_model.setdefault(model, []).append(result)
            detail = result.get("error") or result.get("note") or ""
            took = "cached" if cached else f"{result.get('wall_seconds', 0):.1f} s"
            print(f"[{index}/{total}] {model} / {config.name}: {result['status']} ({took}) {detail}".rstrip(), flush=True)
    wall = time.perf_counter() - started
    markdown = render_markdown(by_model, configs, wall, fresh, total)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    write_json(out / "results.json", {"wall_seconds": wall, "cells_run": fresh, "cells": total, "python": sys.executable,
                                      "runtime": runtime_versions(), "peers": list(PEER_REQUIREMENTS), "results": by_model})  # fmt: skip
    print("\n" + markdown)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


def render_markdown(by_model: dict[str, list[dict[str, Any]]], configs: list[Config], wall: float, fresh: int, total: int) -> str:
    header = (
        f"# onnxsparse benchmark\n\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, onnxruntime "
        f"{runtime_versions()['onnxruntime']}; {fresh} of {total} cells run this time, {wall:.0f} s wall.\n\n{LEGEND}\n"
    )
    metrics = {model: HEADLINE_METRICS.get(model, ()) for model in by_model}
    return f"{header}\n{render_report(by_model, metrics)}\n## Configurations\n\n{render_configs(configs)}\n"


if __name__ == "__main__":
    sys.exit(main())
