"""The tuner's search: build candidates, measure them for real, keep the best within the budget.

Rounds: the mildest rung of every family (see candidates.py) is built first; a family whose rung held
the budget climbs to its next rung, one that broke it stops; then the combinations of what held.
Builds are independent runs of the pass manager (``measure_speed=False``: nobody times while others
build), side by side in worker processes with ``jobs`` > 1. Then the timings, one at a time in this
process, interleaved with the original: a short one for every candidate (the estimate), and a long
one, on one thread and on every core, for the ``finalists`` best estimates within the budget.

Every record is cached in a folder beside the output, keyed by what it depends on (the input
model's bytes, the pipeline, the budget, the metric, the data; timings also by the machine), so a
second run reuses what the first measured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from ..calibration import InputSource, InputSpec, resolve_inputs
from ..errors import InputDataError, OnnxsparseError, OutputPathError
from ..files import OutputLock, Staging, describe_os_error
from ..io import load, load_with_info, stage_model
from ..latency import RETIME_RUNS, RETIME_SECONDS, relative_latency, timing_feed
from ..limits import DEFAULT_MAX_INPUT_BYTES, DEFAULT_SYNTHETIC_SAMPLES
from ..passes import pass_class
from ..pipeline import check_output_paths, optimize, paths_in, validate
from ..report import RunReport, worst_output
from ..runtime import usable_cores
from ..spec import parse_tolerance_text
from ..validation import Tolerance, Tolerances, ValidationResult
from ..walk import iter_all_tensors
from ..weightstore import WeightStore
from .cache import RecordCache, fingerprint, metric_file
from .candidates import Candidate, Objective, combinations, families
from .executors import InProcess, executor
from .html import render_html
from .peers import QUANTIZE_STATIC, peer_kinds, quantize_with_onnxruntime
from .records import DUPLICATE, OVER, UNCHANGED, WITHIN, ProgressCallback, Record, TuneResult

# Timing of every candidate (the estimate): enough interleaved pairs to rank, not to decide a close call.
ESTIMATE_RUNS, ESTIMATE_SECONDS = 8, 0.5

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class _Settings:
    """What every candidate of a run is built and judged with (picklable: workers get it)."""

    model: Path
    folder: Path
    inputs: Any
    calibration: Any
    budget: str
    metric: Any
    samples: int
    seed: int
    dims: dict[str, int] | None
    int_range: tuple[int, int] | None
    max_input_bytes: int

    def build(self, candidate: Candidate, key: str, fresh_process: bool) -> _Build:
        return _Build(self, str(self.folder / f"{key}.onnx"), str(self.folder / f"{key}.report.json"), candidate.pipeline, fresh_process)


@dataclass(frozen=True)
class _Build:
    """One candidate's build, as a worker gets it."""

    settings: _Settings
    output: str
    report: str
    pipeline: str
    fresh_process: bool = False  # built in a process of its own: its peak resident memory is the build's


def tune(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    objective: Objective = "latency",
    budget: str = "",
    metric: Any = None,
    inputs: InputSpec = None,
    calibration: InputSpec = None,
    samples: int = DEFAULT_SYNTHETIC_SAMPLES,
    seed: int = 0,
    dims: dict[str, int] | None = None,
    int_range: tuple[int, int] | None = None,
    jobs: int = 1,
    ray: str | None = None,
    cache: str | os.PathLike[str] | None = None,
    report_path: str | os.PathLike[str] | None = None,
    json_path: str | os.PathLike[str] | None = None,
    finalists: int = 3,
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    progress: ProgressCallback | None = None,
) -> TuneResult:
    """Search the passes for the fastest (``objective="latency"``) or smallest (``"size"``) model whose
    validation holds ``budget`` (tolerance text, e.g. ``"min_top1=0.95"``; empty: each pass's default
    tolerance) and ``metric`` (the user's task metric, as for :func:`onnxsparse.optimize`), write it to
    ``output_path`` and return every candidate's figures. ``jobs``: candidates built side by side in
    worker processes (the metric and the inputs must then be given as text or paths); ``ray``: on a
    Ray cluster's workers instead (its address, or ``local``; see executors.py). ``cache``: where candidates and their
    figures are kept (default: ``<input name>.tune`` beside the output); a second run reuses them.
    ``report_path``: a self-contained HTML report (the frontier, every candidate, the chosen one's
    steps); ``json_path``: the figures as JSON. The model and the reports are written together, after
    the search, or none of them; without a candidate within the budget only the reports are."""
    started = time.perf_counter()
    if objective not in ("latency", "size"):
        raise InputDataError(f"--objective: '{objective}' is not latency or size")
    first_bound(budget)  # a budget that is not tolerance text: exit 2 before any work
    model_file, output = Path(model_path).resolve(), Path(output_path).resolve()
    written = [p for p in (output, report_path, json_path) if p is not None]
    read = [*paths_in(inputs), *paths_in(calibration), *filter(None, [metric_file(metric)])]
    check_output_paths(written, read, model=model_file)
    if (jobs > 1 or ray) and not _picklable(metric, inputs, calibration):
        log.warning("tune: the metric or the inputs are Python objects, which worker processes cannot receive: building one at a time here")
        jobs, ray = 1, None
    with WeightStore(output.parent) as store:
        original, info = load_with_info(model_file, max_input_bytes=max_input_bytes, weights=store)
        data_files = info_paths(model_file, info.external_data_files)
        check_output_paths(written, data_files)
        settings = _Settings(model_file, _cache_folder(cache, output, model_file), _absolute(inputs), _absolute(calibration), budget, metric, samples,
                             seed, dims, int_range, max_input_bytes)
        source = _checked_data(original, settings)  # bad data is exit 2 now, not after candidates were built
        try:
            settings.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputPathError(f"{settings.folder}: the tuner's cache folder cannot be made ({describe_os_error(error)})") from error
        cached = RecordCache(settings.folder, fingerprint(model_file, data_files, settings.inputs, settings.calibration, metric,
                                                          (budget, samples, seed, dims, int_range)))
        with OutputLock(written):
            runner = executor(jobs, ray)
            try:
                result = _searched(original, info.file_bytes, bool(data_files), settings, source, cached, objective, runner, finalists, progress)
            finally:
                runner.close()
            result.quality_label = _quality_label(budget, metric)
            result.seconds = time.perf_counter() - started
            _publish(result, store, output, report_path, json_path, protect=(model_file, *data_files))
    return result


def _searched(original: onnx.ModelProto, input_bytes: int, external_data: bool, settings: _Settings, source: InputSource,
              cached: RecordCache, objective: Objective, runner: InProcess, finalists: int, progress: ProgressCallback | None) -> TuneResult:
    """Every candidate built and timed, onnxruntime's quantizer beside them, and the choice: of ours
    within the budget, the best that beats the input (for latency, by its long timing)."""
    records = _search(original, objective, settings, cached, runner, progress)
    records += _peers(original, settings, cached, source, external_data, input_bytes)
    _time_all(settings.model, records, timing_feed(original, source), objective, finalists, runner.call(machine), cached, runner, progress)
    within = [r for r in records if r.status == WITHIN and not r.peer]
    if objective == "latency":  # an estimate ranks; only a long timing decides (see _time_all)
        better = [r for r in within if r.latency is not None and r.latency < 1.0]
    else:
        better = [r for r in within if r.size_ratio is not None and r.size_ratio < 1.0]
    chosen = min(better, key=lambda r: (r.objective(objective), -(r.quality or 0.0))) if better else None
    budget = settings.budget or ("your metric" if settings.metric is not None else "each pass's default tolerance")
    result = TuneResult(objective=objective, budget=budget, quality_label="",
                        input=str(settings.model), input_bytes=input_bytes, records=records, chosen=chosen,
                        output=None, cache=str(settings.folder), executor=runner.describe(), held_budget=bool(within))
    result.layers = _layers(chosen) if chosen is not None else []
    result.sensitivity = _sensitivity(records)
    if not within:
        result.warnings.append("no candidate held the budget: nothing written but the reports")
    elif chosen is None:
        result.warnings.append(f"no candidate within the budget is {'faster' if objective == 'latency' else 'smaller'} than the input: "
                               "nothing written but the reports")
    return result


def _cache_folder(cache: str | os.PathLike[str] | None, output: Path, model: Path) -> Path:
    """--cache, else ``<input name>.tune`` beside the output: a run for the other objective, or for
    another output in that folder, reuses what this one built (the keys say what differs)."""
    folder = Path(cache).resolve() if cache is not None else output.parent / f"{model.name}.tune"
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{folder}: --cache is a file, not a folder")
    return folder


def _checked_data(original: onnx.ModelProto, settings: _Settings) -> InputSource:
    """The validation inputs and calibration data resolved (missing files, wrong names: exit 2), and
    the source timings take their sample from (calibration, else validation inputs, else synthetic)."""
    def resolved(spec: InputSpec) -> InputSource:
        return resolve_inputs(spec, original, samples=settings.samples, seed=settings.seed, dims=settings.dims, int_range=settings.int_range,
                              max_input_bytes=settings.max_input_bytes)
    validation = resolved(settings.inputs)
    return resolved(settings.calibration) if settings.calibration is not None else validation


def _absolute(spec: InputSpec) -> Any:
    """Paths made absolute (a worker on another machine, or in another folder, reads the same files)."""
    if isinstance(spec, (str, os.PathLike)):
        return str(Path(spec).resolve())
    paths = paths_in(spec)
    return [str(path.resolve()) for path in paths] if paths else spec


def _search(original: onnx.ModelProto, objective: Objective, settings: _Settings, cached: RecordCache, runner: InProcess,
            progress: ProgressCallback | None) -> list[Record]:
    """Every candidate's record: the families climbed rung by rung, then the combinations."""
    ladders = {f.name: f for f in families(original, objective, calibration=settings.calibration is not None)}
    if not ladders:
        raise InputDataError(f"{settings.model}: no Conv, ConvTranspose, MatMul or Gemm with constant weights: nothing for the tuner to try")
    records: list[Record] = []
    held: dict[str, str] = {}
    round_ = [Candidate(f.rungs[0], f.name, 0) for f in ladders.values()]
    while round_:
        built = _build_all(round_, settings, cached, runner, progress, len(records))
        _mark_duplicates(records, built)
        records.extend(built)
        next_round = []
        for record in built:
            ladder = ladders[record.family]
            status = record.status_as_built or record.status  # a duplicate held (or broke) the budget as its twin did
            if status == WITHIN:
                held[record.family] = record.pipeline
            # a rung that changed nothing (too mild to remove a whole block of channels) says nothing
            # of the next one; one over the budget says the rest would be too
            if status in (WITHIN, UNCHANGED) and record.rung + 1 < len(ladder.rungs):
                next_round.append(Candidate(ladder.rungs[record.rung + 1], record.family, record.rung + 1))
        round_ = next_round
    combined = _build_all(combinations(held, objective), settings, cached, runner, progress, len(records))
    _mark_duplicates(records, combined)
    return records + combined


def _mark_duplicates(earlier: list[Record], built: list[Record]) -> None:
    """A candidate that wrote the same model as one before it is that one: not timed, not chosen
    (MNIST: channel ratios 0.5 and 0.7 round to the same blocks). It still climbs its ladder."""
    seen = {r.digest: r for r in earlier if r.digest and r.status != DUPLICATE}
    for record in built:
        first = seen.get(record.digest) if record.digest else None
        if first is not None and record.status in (WITHIN, OVER):
            record.duplicate_of, record.status_as_built = first.pipeline, record.status
            record.status, record.reason = DUPLICATE, f"the same model as {first.pipeline}"
        elif record.digest:
            seen.setdefault(record.digest, record)


def _build_all(candidates: Sequence[Candidate], settings: _Settings, cached: RecordCache, runner: InProcess, progress: ProgressCallback | None,
               done_before: int) -> list[Record]:
    records: dict[int, Record] = {}
    todo: list[tuple[int, Candidate, str]] = []
    for index, candidate in enumerate(candidates):
        key = cached.key(candidate.pipeline)
        found = cached.reusable(key)
        if found is not None:
            records[index] = found
        else:
            todo.append((index, candidate, key))
    total = done_before + len(candidates)
    if progress:
        progress("tune: candidates built", done_before + len(records), total)

    def finished(index: int, candidate: Candidate, key: str, record: Record | BaseException) -> None:
        if isinstance(record, BaseException):  # its worker died (out of memory?) or Ray lost it: this candidate only
            record = Record(pipeline=candidate.pipeline, family="", reason=f"its build's process failed: {type(record).__name__}: {record}")
        record.family, record.rung = candidate.family, candidate.rung
        records[index] = record
        cached.put(key, record)
        log.info("tune: %s: %s%s (%.1f s)", candidate.pipeline, record.status, f" ({record.reason})" if record.reason else "", record.build_seconds)
        if progress:
            progress("tune: candidates built", done_before + len(records), total)

    builds = [settings.build(candidate, key, runner.fresh_processes) for _, candidate, key in todo]
    for position, record in runner.run(build_candidate, builds):
        finished(*todo[position], record)
    return [records[i] for i in range(len(candidates))]


def build_candidate(job: _Build) -> Record:
    """Build one candidate with the pass manager (validation under the budget, no timing) and say
    what it is. A candidate whose pass or metric raises is a failed record, not the end of the search
    (the user's files were checked before it began)."""
    started = time.perf_counter()
    record = Record(pipeline=job.pipeline, family="")
    tolerances = _tolerances(job.settings.budget, job.settings.metric is not None)
    try:
        report = optimize(job.settings.model, job.output, job.pipeline, inputs=job.settings.inputs, calibration=job.settings.calibration, tolerances=tolerances,
                          policy="keep", keep_worse=True, samples=job.settings.samples, seed=job.settings.seed, dims=job.settings.dims, int_range=job.settings.int_range,
                          max_input_bytes=job.settings.max_input_bytes, metric=job.settings.metric, measure_speed=False, report_path=job.report)
    except OnnxsparseError as error:
        # The user's files were checked before the search: what fails here is this candidate's (a pass
        # that refuses this model, a metric that raises on these outputs, a full disk).
        record.reason = str(error).splitlines()[0]
        record.build_seconds = time.perf_counter() - started
        return record
    _describe(record, report, job)
    record.build_seconds = time.perf_counter() - started
    if job.fresh_process:
        record.peak_memory = _peak_resident_bytes()
    return record


def _tolerances(budget: str, metric: bool) -> Tolerances | None:
    """The budget as every step's tolerance; with a metric and no budget, the metric alone judges (no
    pass's own default tolerance on top of it); with neither, each pass's default."""
    if budget:
        return Tolerances(default=parse_tolerance_text(budget, "--budget"))
    return Tolerances(default=Tolerance()) if metric else None


def _peak_resident_bytes() -> int | None:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if platform.system() == "Darwin" else int(peak) * 1024


def _describe(record: Record, report: RunReport, job: _Build) -> None:
    record.steps = [{"spec": s.spec, "status": s.status, "reason": s.reason, "changes": len(s.changes), "skipped": len(s.skipped)}
                    for s in report.steps]
    record.file, record.report = job.output, job.report
    record.digest = written_digest(Path(job.output)) if report.output is not None else ""
    record.bytes = report.output.file_bytes if report.output is not None else 0
    record.size_ratio = record.bytes / max(report.input.file_bytes, 1)
    validation = report.final_validation
    record.worst = worst_output(validation)
    record.quality = _quality(validation, job.settings.budget, job.settings.metric is not None)
    if not any(s.changes for s in report.steps):
        record.status, record.reason = UNCHANGED, "; ".join(s.reason for s in report.steps if s.reason) or "no pass changed the model"
    elif validation is not None and validation.passed:
        # what it gave up to hold the budget (qdq's guard keeping nodes float), in a word per step
        record.status, record.reason = WITHIN, "; ".join(f"{s.pass_name}: {len(s.changes)} changed, {len(s.skipped)} left alone"
                                                         for s in report.steps if s.skipped)
    else:
        record.status = OVER
        record.reason = "; ".join(validation.verdict.failures) if validation is not None else "not validated"


def _report_steps(record: Record) -> list[dict[str, Any]]:
    try:
        steps: list[dict[str, Any]] = json.loads(Path(record.report).read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return []
    return steps


LAYER_ROWS = 400  # of what the chosen pipeline did, the report lists this many rows


def _layers(record: Record) -> list[dict[str, str]]:
    """What each step of ``record``'s run did and left alone, node by node (from its JSON report)."""
    rows = []
    for step in _report_steps(record):
        rows += [{"step": step["spec"], "target": c["target"], "what": c["action"]} for c in step.get("changes", [])]
        rows += [{"step": step["spec"], "target": s["target"], "what": f"left alone: {s['reason']}"} for s in step.get("skipped", [])]
    return rows[:LAYER_ROWS]


def _sensitivity(records: Sequence[Record]) -> list[dict[str, Any]]:
    """The per-node sensitivity scan of the int8 candidate that ran one (each node quantized alone)."""
    for record in records:
        for step in _report_steps(record) if record.report else []:
            rows = step.get("figures", {}).get("sensitivity")
            if rows:
                return list(rows)
    return []


def _quality(validation: ValidationResult | None, budget: str, has_metric: bool) -> float | None:
    """The figure the frontier plots against the objective: the user's metric when there is one, else
    the worst output's value of the budget's first bound (top-1 agreement, cosine, ...), else the worst
    cosine. Bounds with a maximum (max_top1_drop, max_kl) are plotted negated: higher is better."""
    if validation is None:
        return None
    if has_metric and validation.metric is not None:
        return validation.metric.value
    bound = first_bound(budget) or "min_cosine"
    values = [v for o in validation.outputs if o.compared for v in [o.value_of(bound)] if v is not None]
    if not values:
        return None
    return -max(values) if bound.startswith("max_") else min(values)


def first_bound(budget: str) -> str | None:
    """The bound the budget names first (``"min_top1=0.95 max_abs=1"`` -> ``min_top1``), checked."""
    if not budget:
        return None
    parse_tolerance_text(budget, "--budget")
    return budget.replace(",", " ").split()[0].partition("=")[0].strip()


def _quality_label(budget: str, metric: Any) -> str:
    if metric is not None:
        return "task metric"
    bound = first_bound(budget)
    if bound is None:
        return "worst output cosine"
    name = bound.removeprefix("min_").removeprefix("max_")
    return f"-{name} (worst output)" if bound.startswith("max_") else f"{name} (worst output)"


def _peers(original: onnx.ModelProto, settings: _Settings, cached: RecordCache, calibration: InputSource, external_data: bool,
           input_bytes: int) -> list[Record]:
    """onnxruntime's quantize_dynamic and quantize_static on the same model and data, validated like
    the candidates (on the validation inputs; without them, on the calibration data they were
    calibrated on, which flatters them a little: the row says so)."""
    records = []
    for kind in peer_kinds(original, calibration=settings.calibration is not None):
        key = cached.key(kind)  # no pipeline text reads like a sentence
        found = cached.reusable(key)
        if found is not None:
            records.append(found)
            continue
        started = time.perf_counter()
        output = settings.folder / f"{key}.onnx"
        record = Record(pipeline=kind, family=kind, peer=True)
        record.reason = quantize_with_onnxruntime(kind, settings.model, output, calibration if kind == QUANTIZE_STATIC else None, external_data)
        if not record.reason:
            _judge_peer(record, output, settings, input_bytes)
        record.build_seconds = time.perf_counter() - started
        cached.put(key, record)
        records.append(record)
    return records


def _judge_peer(record: Record, output: Path, settings: _Settings, input_bytes: int) -> None:
    chosen = _tolerances(settings.budget, settings.metric is not None)
    validation = validate(settings.model, output, inputs=settings.inputs if settings.inputs is not None else settings.calibration,
                          tolerances=chosen or Tolerances(default=pass_class("qdq").default_tolerance), samples=settings.samples, seed=settings.seed, dims=settings.dims, int_range=settings.int_range,
                          max_input_bytes=settings.max_input_bytes, metric=settings.metric)
    record.file = str(output)
    record.bytes = written_bytes(output)
    record.size_ratio = record.bytes / max(input_bytes, 1)
    record.worst = worst_output(validation)
    record.quality = _quality(validation, settings.budget, settings.metric is not None)
    record.status = WITHIN if validation.passed else OVER
    failures = "; ".join(validation.verdict.failures)
    record.reason = "; ".join(part for part in (failures, "validated on its own calibration data" if settings.inputs is None else "") if part)


def written_bytes(model: Path) -> int:
    """A model file's bytes with the external data files it names."""
    return sum(path.stat().st_size for path in _written_files(model))


def written_digest(model: Path) -> str:
    """A digest of a model file and the external data files it names: two pipelines that wrote the
    same model (channel ratios that round to the same blocks) are one candidate."""
    digest = hashlib.blake2b(digest_size=16)
    for path in _written_files(model):
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(2**24), b""):
                digest.update(block)
    return digest.hexdigest()


def _written_files(model: Path) -> list[Path]:
    proto = onnx.load(str(model), load_external_data=False)
    names = sorted({entry.value for tensor in iter_all_tensors(proto) for entry in tensor.external_data if entry.key == "location"})
    return [model, *info_paths(model, names)]


def time_candidate(original: str, candidate: str, feed: dict[str, Any], runs: int, seconds: float, threads: int) -> float:
    """``candidate``'s onnxruntime time over ``original``'s (both files), interleaved: what a timing
    job runs, here or on a Ray worker."""
    with WeightStore() as store:
        return relative_latency(load(original, weights=store), load(candidate, weights=store), feed, min_runs=runs, min_seconds=seconds,
                                threads=threads)


def _time_all(original: Path, records: list[Record], feed: dict[str, Any], objective: Objective, finalists: int, machine: str,
              cached: RecordCache, runner: InProcess, progress: ProgressCallback | None) -> None:
    """Latency of every built candidate over the input's, one at a time: a short timing each, then a
    long one on one thread and on every core for the best ``finalists`` within the budget."""
    timed = [r for r in records if r.status in (WITHIN, OVER) and r.file]
    for record in timed:
        if record.machine != machine:  # a latency measured elsewhere says nothing here
            record.latency_estimate = record.latency = record.latency_all_cores = None
            record.machine = machine
    for index, record in enumerate(timed):
        if record.latency_estimate is None:
            record.latency_estimate = runner.call(time_candidate, str(original), record.file, feed, ESTIMATE_RUNS, ESTIMATE_SECONDS, 1)
            cached.put_record(record)
        if progress:
            progress("tune: candidates timed", index + 1, len(timed))
    within = sorted((r for r in timed if r.status == WITHIN and not r.peer), key=lambda r: r.objective(objective) or float("inf"))
    for index, record in enumerate(within[:finalists]):
        if record.latency is None or record.latency_all_cores is None:
            record.latency = runner.call(time_candidate, str(original), record.file, feed, RETIME_RUNS, RETIME_SECONDS, 1)
            record.latency_all_cores = runner.call(time_candidate, str(original), record.file, feed, RETIME_RUNS, RETIME_SECONDS, 0)
            cached.put_record(record)
        if progress:
            progress("tune: finalists timed", index + 1, min(finalists, len(within)))


def _publish(result: TuneResult, store: WeightStore, output: Path, report_path: str | os.PathLike[str] | None,
             json_path: str | os.PathLike[str] | None, protect: tuple[Path, ...]) -> None:
    """The chosen candidate to ``output`` (its external data beside it if it has any) and the reports,
    staged together and renamed into place only when all of them are written."""
    with Staging() as staging:
        if result.chosen is not None:
            stage_model(load(result.chosen.file, weights=store), output, staging, protect=protect)
            result.output = str(output)
        if report_path is not None:
            staging.write_text(report_path, render_html(result))
        if json_path is not None:
            staging.write_text(json_path, json.dumps(result.to_dict(), indent=2))
        staging.commit()


def info_paths(model: Path, external_data_files: Sequence[str]) -> list[Path]:
    """The input's external data files: never overwritten by what the tuner writes."""
    folder = model.resolve().parent
    return [folder / name for name in external_data_files]


def _picklable(*values: Any) -> bool:
    """Whether a worker process can receive these as given: text, paths, numbers and lists of them."""
    def plain(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, os.PathLike, int, float))
    return all(plain(v) for v in values)


def machine() -> str:
    """The machine a latency belongs to: CPU model, cores this process may use, onnxruntime version."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {usable_cores()} cores, onnxruntime {ort.__version__}"
