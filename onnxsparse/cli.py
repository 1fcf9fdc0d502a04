"""``onnxsparse optimize | validate | inspect | passes``.

Exit status (see EXIT_STATUS): 0 done and validated as asked, 1 a model failed validation,
2 bad input (missing or invalid file, unknown pass or option, output path equal to the input, a
size over --max-input-bytes, NaN/Inf inputs or original outputs, a full disk, another run writing
the same output), 3 an internal error (a bug: a size we could have checked is a bug of ours too),
4 a requested pass was rolled back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputDataError, OnnxsparseError
from .limits import DEFAULT_MAX_INPUT_BYTES, DEFAULT_SYNTHETIC_SAMPLES, HELD_OUT_MAX_SAMPLES, format_bytes, parse_bytes
from .version import __version__

# What the commands use is imported inside them: onnx alone takes 0.6 s to import, and
# `onnxsparse --version` (or a typo in the arguments) should answer at once.
if TYPE_CHECKING:
    from .inspect_model import ModelSummary
    from .passes import Pass, Requirement
    from .report import RunReport
    from .validation import Tolerances, ValidationResult

log = logging.getLogger("onnxsparse")

EXIT_STATUS = """exit status:
  0  done: every pass committed (or changed nothing, with the reason in the report) and the output validated
  1  validation failed: `validate` found the candidate out of tolerance, or `optimize` ended with a model
     out of tolerance (written under --policy keep) or stopped on one (--policy raise)
  2  bad input: a missing or invalid file, an unknown pass or option, data that does not fit the model or
     holds NaN/Inf, a size over --max-input-bytes, a full disk, another run writing the same output;
     nothing was written
  3  internal error: a bug in onnxsparse (please report it with the output of -vv)
  4  a requested pass was rolled back (it crashed, broke its tolerance, or made the model worse): the
     output was written and validated without it; the report says why"""
EXIT_DONE, EXIT_VALIDATION_FAILED, EXIT_ROLLED_BACK = 0, 1, 4
TUNE_EXIT_STATUS = """exit status:
  0  a candidate within the budget, faster (or smaller) than the input, was written
  1  no candidate held the budget: only the reports were written
  2  bad input (as for optimize); nothing was written
  3  internal error: a bug in onnxsparse (please report it with the output of -vv)
  4  candidates held the budget but none beat the input: only the reports were written"""


# ---------------------------------------------------------------------------------------------
# plain-text tables and progress
# ---------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; columns listed in ``right`` are right-aligned (numbers)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(row) for row in cells[1:]])


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A progress callback drawing one tqdm bar per label on stderr (only on a terminal)."""
    from tqdm import tqdm

    if not enabled:
        yield None
        return
    bars: dict[str, tqdm] = {}

    def update(label: str, done: int, total: int) -> None:
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(total=total, desc=label, leave=False, unit="step", disable=None, file=sys.stderr)
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


def _human_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return str(count)


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxsparse", description="Make ONNX models smaller and faster, and measure what it costs.",
                                     epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"onnxsparse {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    commands = parser.add_subparsers(dest="command", required=True)

    optimize = commands.add_parser("optimize", help="run a pipeline of passes over a model, validated against the original",
                                   epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    optimize.add_argument("model", help="input .onnx file (never modified)")
    optimize.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    source = optimize.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--pipeline", help='passes, e.g. "cleanup,fold-batchnorm" (see `onnxsparse passes`)')
    source.add_argument("--recipe", help="a TOML recipe file with [[pass]] entries, tolerances and policy")
    optimize.add_argument("--calibration", nargs="+", metavar="NPZ|DIR", help="calibration inputs for passes that need data")
    optimize.add_argument("--policy", choices=("rollback", "raise", "keep"), help="what to do when a pass breaks tolerance (default rollback)")
    optimize.add_argument("--report", metavar="FILE.json|FILE.html", help="write the full report as JSON, or as one HTML page when the "
                          "name ends in .html: every step, the error each layer added alone where the pass measured it, what each "
                          "layer became")
    optimize.add_argument("--markdown", metavar="FILE.md", help="write the report as Markdown")
    optimize.add_argument("--overwrite-input", action="store_true", help="allow the output to replace the input file")
    optimize.add_argument("--keep-worse", action="store_true",
                          help="keep a step that left the model larger on disk and not faster, or slower, than its input (default: roll it back)")
    _add_layout_option(optimize)
    _add_input_options(optimize)
    _add_tolerance_options(optimize, per_pass=True)
    _add_common_options(optimize)

    validate = commands.add_parser("validate", help="compare a candidate model with a reference in onnxruntime")
    validate.add_argument("reference", help="the original .onnx")
    validate.add_argument("candidate", help="the optimized .onnx")
    _add_input_options(validate)
    _add_tolerance_options(validate, per_pass=False)
    _add_common_options(validate)

    inspect = commands.add_parser("inspect", help="ops, tensors, bytes and sparsity of a model")
    inspect.add_argument("model")
    inspect.add_argument("--top", type=int, default=20, help="tensors listed, largest first (default 20; 0 for all)")
    _add_budget_option(inspect)
    _add_common_options(inspect)

    densify = commands.add_parser("densify", help="write a sparse-encoded model back as a plain one (for tools that cannot read sparse_initializer)")
    densify.add_argument("model")
    densify.add_argument("-o", "--output", required=True)
    _add_layout_option(densify)
    _add_budget_option(densify)

    explain = commands.add_parser("explain", help="what each step of a run did, from its --report JSON: the nodes left alone and why, "
                                                  "and qdq's per-node sensitivity (qdq{sensitivity=true})")
    explain.add_argument("report", metavar="REPORT.json")
    explain.add_argument("--top", type=int, default=30, help="rows of each table, worst first (default 30; 0 for all)")

    tune = commands.add_parser("tune", help="search the passes for the fastest or smallest model within an accuracy budget, measured here",
                               epilog=TUNE_EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    tune.add_argument("model", help="input .onnx file (never modified)")
    tune.add_argument("-o", "--output", required=True, help="where the chosen model goes (written atomically)")
    tune.add_argument("--objective", choices=("latency", "size"), default="latency",
                      help="what to minimise: onnxruntime latency on this machine, or file size (default latency)")
    tune.add_argument("--budget", default="", metavar='"min_top1=0.95 ..."',
                      help="the accuracy every candidate must hold, as --tolerance text (default: each pass's own tolerance)")
    tune.add_argument("--metric", metavar="MODULE:FUNCTION|FILE.py:FUNCTION", help="your task metric, judged beside the budget (see the README)")
    tune.add_argument("--calibration", nargs="+", metavar="NPZ|DIR", help="calibration inputs (int8 static, refit and GPTQ need them)")
    tune.add_argument("--jobs", type=int, default=1, help="candidates built side by side (timings are always taken one at a time; default 1)")
    tune.add_argument("--ray", metavar="ADDRESS", help="build and time the candidates on a Ray cluster (auto, ray://host:10001, or local for an "
                                                      "instance of this machine; pip install 'onnxsparse[ray]'); the cache folder must be on "
                                                      "storage every node mounts at the same path")
    tune.add_argument("--cache", metavar="DIR", help="where candidates and their figures are kept (default MODEL.onnx.tune beside the output); a second run, for either objective, reuses them")
    tune.add_argument("--finalists", type=int, default=3, help="candidates within the budget timed at length, on one thread and on every core (default 3)")
    tune.add_argument("--report", metavar="FILE.html", help="write the frontier, every candidate and the chosen one's steps as one HTML file")
    tune.add_argument("--figures", metavar="FILE.json", help="write every candidate's figures as JSON")
    _add_input_options(tune)
    _add_common_options(tune)

    passes = commands.add_parser("passes", help="every pass with its options and defaults")
    _add_common_options(passes)
    return parser


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "validation inputs (default: a seeded quarter of --calibration held out of every fit, at most "
        f"{HELD_OUT_MAX_SAMPLES} samples, when a pass fits on it; all of --calibration when none does; without calibration data, "
        "seeded synthetic data from the input types)")
    group.add_argument("--inputs", nargs="+", metavar="NPZ|DIR",
                       help=".npz files (keys = input names) or folders of them; must not share a sample with --calibration")
    group.add_argument("--samples", type=int, default=DEFAULT_SYNTHETIC_SAMPLES,
                       help=f"synthetic samples (default {DEFAULT_SYNTHETIC_SAMPLES}: enough for a top-1 agreement to move in steps of 1/16)")
    group.add_argument("--seed", type=int, default=0, help="seed of the synthetic samples and of the held-out split (default 0)")
    group.add_argument("--dims", default="", metavar="NAME=N,...", help="values of dynamic dims (default 1 for the batch axis, 32 elsewhere)")
    group.add_argument("--int-range", default=None, metavar="LOW,HIGH", help="range of synthetic integer inputs, e.g. token ids")
    _add_budget_option(parser)


def _add_layout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--external-data", action=argparse.BooleanOptionalAction, default=None,
        help="write tensors over 1 KB to OUTPUT.data beside the model (default: as the input was stored; "
             "always beyond protobuf's 2 GB limit)",
    )


def _add_budget_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-input-bytes", default=None, metavar="SIZE",
        help=f"the most one input file, synthetic feed, or the model's sparse tensors densified may unpack to, checked from "
             f"their headers before anything is allocated (e.g. 512M, 16G; default {format_bytes(DEFAULT_MAX_INPUT_BYTES)}: "
             "twice protobuf's 2 GiB model limit and far above any real input measured, yet it fits in a 16 GB machine)",
    )


def _max_input_bytes(args: argparse.Namespace) -> int:
    if args.max_input_bytes is None:
        return DEFAULT_MAX_INPUT_BYTES
    try:
        return parse_bytes(args.max_input_bytes)
    except ValueError as error:
        raise InputDataError(f"--max-input-bytes: {error}") from None


def _seed(args: argparse.Namespace) -> int:
    # numpy refuses a negative seed deep inside the run; say so before any work
    if args.seed < 0:
        raise InputDataError(f"--seed: {args.seed} is negative; give a seed of 0 or more")
    return args.seed


def _add_tolerance_options(parser: argparse.ArgumentParser, *, per_pass: bool) -> None:
    group = parser.add_argument_group("tolerances (bounds: max_abs max_rel min_cosine min_sqnr_db min_top1 max_top1_drop max_kl min_agreement min_sequence_agreement max_sequence_drop)")
    group.add_argument("--tolerance", metavar='"max_rel=1e-3 ..."', help="global tolerance")
    group.add_argument("--output-tolerance", action="append", default=[], metavar='NAME:"min_cosine=0.99 ..."', help="per output (repeatable)")
    if per_pass:
        group.add_argument("--pass-tolerance", action="append", default=[], metavar='PASS:"min_top1=0.9 ..."', help="per pass (repeatable)")
    group.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KL divergence (default 1)")
    group.add_argument("--metric", metavar="MODULE:FUNCTION|FILE.py:FUNCTION",
                       help="your task metric, judged beside the tolerances (by guards, every step and the final validation): "
                            "function(reference_outputs, candidate_outputs, inputs) -> (value, within_budget); see the README")


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _tolerances(args: argparse.Namespace) -> Tolerances | None:
    from .spec import parse_tolerance_text
    from .validation import Tolerances

    if not (args.tolerance or args.output_tolerance or getattr(args, "pass_tolerance", [])):
        return None

    def keyed(items: list[str], flag: str) -> dict[str, Any]:
        parsed = {}
        for item in items:
            key, separator, bounds = item.rpartition(":")
            if not separator:
                raise InputDataError(f"{flag}: '{item}' is not NAME:\"bounds\"")
            parsed[key] = parse_tolerance_text(bounds, f"{flag} {key}")
        return parsed

    return Tolerances(
        default=parse_tolerance_text(args.tolerance) if args.tolerance else None,
        per_output=keyed(args.output_tolerance, "--output-tolerance"),
        per_pass=keyed(getattr(args, "pass_tolerance", []), "--pass-tolerance"),
    )


def _int_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, _, high = text.partition(",")
    try:
        bounds = int(low), int(high)
    except ValueError:
        raise InputDataError(f"--int-range: '{text}' is not LOW,HIGH") from None
    if bounds[0] >= bounds[1]:
        raise InputDataError(f"--int-range: LOW must be below HIGH, got '{text}'")
    return bounds


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def run_optimize(args: argparse.Namespace) -> int:
    from .calibration import parse_dims
    from .pipeline import optimize

    with progress_bars(not args.json) as progress:
        report = optimize(
            args.model,
            args.output,
            args.pipeline,
            recipe=args.recipe,
            inputs=args.inputs,
            calibration=args.calibration,
            tolerances=_tolerances(args),
            policy=args.policy,
            samples=args.samples,
            seed=_seed(args),
            dims=parse_dims(args.dims),
            int_range=_int_range(args.int_range),
            temperature=args.temperature,
            max_input_bytes=_max_input_bytes(args),
            report_path=args.report,
            markdown_path=args.markdown,
            overwrite_input=args.overwrite_input,
            keep_worse=args.keep_worse,
            external_data=args.external_data,
            progress=progress,
            metric=args.metric,
        )
    print(json.dumps(report.to_dict(), indent=2) if args.json else render_run(report))
    return optimize_status(report)


def run_tune(args: argparse.Namespace) -> int:
    from .calibration import parse_dims
    from .tuner import tune

    if args.jobs < 1 or args.finalists < 1:
        raise InputDataError(f"--jobs and --finalists take 1 or more (got {args.jobs} and {args.finalists})")
    with progress_bars(not args.json) as progress:
        result = tune(args.model, args.output, objective=args.objective, budget=args.budget, metric=args.metric, inputs=args.inputs,
                      calibration=args.calibration, samples=args.samples, seed=_seed(args), dims=parse_dims(args.dims),
                      int_range=_int_range(args.int_range), jobs=args.jobs, ray=args.ray, cache=args.cache, finalists=args.finalists,
                      max_input_bytes=_max_input_bytes(args), report_path=args.report, json_path=args.figures, progress=progress)
    print(json.dumps(result.to_dict(), indent=2) if args.json else render_tune(result))
    if result.chosen is not None:
        return EXIT_DONE
    return EXIT_ROLLED_BACK if result.held_budget else EXIT_VALIDATION_FAILED


def render_tune(result: Any) -> str:
    rows = []
    for record in sorted(result.records, key=lambda r: (r.status != "within", r.objective(result.objective) or float("inf"))):
        rows.append([("* " if record is result.chosen else "  ") + record.pipeline, record.status, _times(record.size_ratio),
                     _times(record.latency) if record.latency is not None else _times(record.latency_estimate, "~"), _times(record.latency_all_cores),
                     "-" if record.quality is None else f"{record.quality:.4g}"])
    lines = [format_table(["candidate", "status", "size", "latency 1 thread", "all cores", result.quality_label], rows, right=(2, 3, 4, 5)), ""]
    if result.chosen is not None:
        lines.append(f"{result.output}: {result.chosen.pipeline} ({result.objective} {_times(result.chosen.objective(result.objective))} of the input's)")
    reused = sum(r.reused for r in result.records)
    lines.append(f"budget: {result.budget}; {len(result.records)} candidates ({reused} from the cache) in {result.seconds:.0f} s; "
                 f"cache {result.cache}; ~ marks a short timing, the finalists' long ones decide")
    lines.extend(f"warning: {w}" for w in result.warnings)
    return "\n".join(lines)


def _times(value: float | None, mark: str = "") -> str:
    return "-" if value is None else f"{mark}{value:.3f}x"


def optimize_status(report: RunReport) -> int:
    """The exit status of a finished run (see EXIT_STATUS): a failed final validation outranks a rollback."""
    if report.final_validation is not None and not report.final_validation.passed:
        return EXIT_VALIDATION_FAILED
    return EXIT_ROLLED_BACK if report.rolled_back else EXIT_DONE


def render_run(report: RunReport) -> str:
    from .report import worst_output

    rows = [
        [step.spec, step.status, len(step.changes), len(step.skipped), worst_output(step.validation), f"{sum(step.seconds.values()):.2f}"]
        for step in report.steps
    ]
    lines = [format_table(["pass", "status", "changes", "skipped", "worst output vs original", "s"], rows, right=(2, 3, 5)), ""]
    for step in report.steps:
        if step.reason:
            lines.append(f"{step.pass_name} {step.status}: {step.reason}")
    before, after = report.input, report.output
    if after is not None:
        lines.append(
            f"{report.output_path}: {_human_bytes(after.file_bytes)} ({after.file_bytes / max(before.file_bytes, 1):.2f}x of "
            f"{_human_bytes(before.file_bytes)}), nodes {before.nodes} -> {after.nodes}, parameters {before.parameters:,} -> {after.parameters:,}"
            f" (non-zero {before.nonzero_parameters:,} -> {after.nonzero_parameters:,})"
        )
    if report.final_validation is not None:
        verdict = "passed" if report.final_validation.passed else "FAILED: " + "; ".join(report.final_validation.verdict.failures)
        lines.append(f"final validation on {report.inputs}: {verdict}; {worst_output(report.final_validation)}{_metric_text(report.final_validation)}")
    if report.calibration:
        lines.append(f"passes fitted on: {report.calibration}")
    lines.extend(f"warning: {w}" for w in report.warnings)
    return "\n".join(lines)


def run_validate(args: argparse.Namespace) -> int:
    from .calibration import parse_dims
    from .pipeline import validate_files

    result = validate_files(
        args.reference,
        args.candidate,
        inputs=args.inputs,
        tolerances=_tolerances(args),
        samples=args.samples,
        seed=_seed(args),
        dims=parse_dims(args.dims),
        int_range=_int_range(args.int_range),
        temperature=args.temperature,
        max_input_bytes=_max_input_bytes(args),
        metric=args.metric,
    )
    if args.json:
        print(json.dumps(_validation_dict(result), indent=2))
    else:
        print(render_validation(result))
        if args.inputs is None:
            print(f"note: validated on {args.samples} seeded synthetic sample(s) from the input types; real data may tell another "
                  "story (a quantized or pruned model is judged on the data it will see): give --inputs")
    return 0 if result.passed else 1


def _validation_dict(result: ValidationResult) -> dict[str, Any]:
    import dataclasses

    from .report import json_ready

    return json_ready(dataclasses.asdict(result) | {"passed": result.passed})


def render_validation(result: ValidationResult) -> str:
    rows = [
        [o.name, o.dtype, "x".join(map(str, o.shape)), _number(o.max_abs, ".3g"), _number(o.max_rel, ".3g"), _number(o.cosine, ".6f"),
         _number(o.sqnr_db, ".1f"), _number(o.top1, ".3f"), _number(o.kl, ".3g"), _number(o.agreement, ".3f"),
         _number(o.sequence_agreement, ".3f"), _number(o.sequence_drop, ".3g"), o.note]
        for o in result.outputs
    ]
    headers = ["output", "dtype", "shape", "max abs", "max rel", "cosine", "SQNR dB", "top-1", "KL", "equal", "same read", "read drop", "note"]
    table = format_table(headers, rows, right=range(3, 12))
    verdict = "passed" if result.passed else "FAILED\n" + "\n".join(f"  {f}" for f in result.verdict.failures)
    notes = "".join(f"\nnote: {note}" for note in result.verdict.notes)
    return (f"{table}\n\n{result.feeds} feed(s), tolerance {next(iter(result.verdict.tolerances.values()), 'none')}{_metric_text(result)}: "
            f"{verdict}{notes}")


def _metric_text(result: ValidationResult) -> str:
    metric = result.metric
    return "" if metric is None else f"; metric {metric.name} {metric.value:.4g} ({'within' if metric.within_budget else 'outside'} budget)"


def run_inspect(args: argparse.Namespace) -> int:
    from .inspect_model import summarize
    from .io import load_with_info
    from .weightstore import WeightStore

    with WeightStore() as weights:  # external data is read memory-mapped, never into the message
        model, info = load_with_info(args.model, max_input_bytes=_max_input_bytes(args), weights=weights)
        summary = summarize(model, info)
    if args.json:
        import dataclasses

        from .report import json_ready

        print(json.dumps(json_ready(dataclasses.asdict(summary)), indent=2))
    else:
        print(render_summary(summary, args.top))
    return 0


def render_summary(summary: ModelSummary, top: int) -> str:
    opsets = ", ".join(f"{d} {v}" for d, v in summary.opsets.items())
    lines = [
        f"{summary.source}: {_human_bytes(summary.file_bytes)}, IR {summary.ir_version}, opsets {opsets}",
        f"{summary.nodes} nodes, {summary.parameters:,} parameters ({summary.nonzero_parameters:,} non-zero, {_human_bytes(summary.parameter_bytes)}) in constant tensors read by nodes"
        + (f"; {summary.unused_tensors} unused tensor(s), {_human_bytes(summary.unused_bytes)}" if summary.unused_tensors else ""),
        "",
        format_table(["op", "count"], list(summary.op_histogram.items()), right=(1,)),
        "",
        format_table(["bytes read by", "bytes"], [[k, _human_bytes(v)] for k, v in summary.bytes_by_op.items()], right=(1,)),
        "",
        format_table(["bytes held in", "bytes"], [[k, _human_bytes(v)] for k, v in summary.bytes_by_location.items()], right=(1,)),
        "",
    ]
    tensors = sorted(summary.tensors, key=lambda t: t.bytes, reverse=True)
    shown = tensors[:top] if top else tensors
    rows = [
        [t.name, t.dtype, "x".join(map(str, t.shape)) or "scalar", _human_bytes(t.bytes), f"{t.sparsity:.1%}", t.location,
         "/".join(t.consumers) or "(unused)", _human_bytes(t.sparse_encoded_bytes) if t.sparse_encoded_bytes is not None else ""]
        for t in shown
    ]
    lines.append(format_table(["tensor", "dtype", "shape", "bytes", "zeros", "held in", "read by", "sparse on disk"], rows, right=(3, 4)))
    if len(tensors) > len(shown):
        lines.append(f"... {len(tensors) - len(shown)} smaller tensor(s) not shown (--top 0 lists all)")
    return "\n".join(lines)


def _default_needs(cls: type[Pass]) -> frozenset[Requirement]:
    """What a pass needs with its default options; a plugin pass with a required option says its class-level needs."""
    try:
        return cls().needs()
    except OnnxsparseError:
        return cls.requires


def run_passes(args: argparse.Namespace) -> int:
    catalogue: list[dict[str, Any]] = []
    from .passes import registered_passes
    from .passes.options import default_of, format_value, option_fields, option_types, type_text

    for name, cls in registered_passes().items():
        types_by_name = option_types(cls)
        options = [
            {"name": f.name, "type": type_text(types_by_name[f.name]), "default": format_value(default_of(f)), "help": f.metadata.get("help", "")}
            for f in option_fields(cls)
        ]
        catalogue.append({"name": name, "summary": cls.summary(), "requires": sorted(r.value for r in _default_needs(cls)), "options": options})
    if args.json:
        print(json.dumps(catalogue, indent=2))
        return 0
    for entry in catalogue:
        # shapes the manager infers itself; calibration data is what the user must give
        needs = " (needs --calibration with its default options)" if "calibration" in entry["requires"] else ""
        print(f"{entry['name']}: {entry['summary']}{needs}")
        for option in entry["options"]:
            print(f"    {option['name']} = {option['default']}  [{option['type']}]  {option['help']}".rstrip())
    return 0


def run_densify(args: argparse.Namespace) -> int:
    from .io import checked_output_path, load_with_info, save
    from .weightstore import WeightStore

    with WeightStore(checked_output_path(args.output).parent) as weights:
        model, info = load_with_info(args.model, max_input_bytes=_max_input_bytes(args), weights=weights)
        folder = os.path.dirname(os.path.abspath(args.model))
        protect = (args.model, *(os.path.join(folder, name) for name in info.external_data_files))
        external = args.external_data if args.external_data is not None else (bool(info.external_data_files) or None)
        written = save(model, args.output, protect=protect, external_data=external)
    data = written.with_name(f"{written.name}.data")
    size = written.stat().st_size + (data.stat().st_size if external and data.is_file() else 0)
    print(f"{written}: {len(info.densified)} sparse tensor(s) densified, {_human_bytes(info.file_bytes)} -> {_human_bytes(size)}")
    return 0


def run_explain(args: argparse.Namespace) -> int:
    try:
        report = json.loads(Path(args.report).read_text(encoding="utf-8"))
        steps = report["steps"]
    except FileNotFoundError:
        raise InputDataError(f"{args.report}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise InputDataError(f"{args.report}: not an onnxsparse report ({type(error).__name__}: {error})") from None
    print("\n\n".join(explain_step(step, args.top) for step in steps))
    return 0


def explain_step(step: dict[str, Any], top: int) -> str:
    """One step of a report: its status, what it left alone grouped by reason, its sensitivity table."""
    lines = [f"{step.get('spec') or step.get('pass_name')}: {step.get('status')}" + (f" ({step['reason']})" if step.get("reason") else "")]
    by_reason: dict[str, list[str]] = {}
    for skip in step.get("skipped", []):
        by_reason.setdefault(skip["reason"], []).append(skip["target"])
    for reason, targets in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        shown = targets if top <= 0 else targets[:top]
        lines.append(f"  left alone, {reason}: {', '.join(shown)}" + (f" and {len(targets) - len(shown)} more" if len(shown) < len(targets) else ""))
    rows = step.get("figures", {}).get("sensitivity") or []
    if rows:
        shown_rows = rows if top <= 0 else rows[:top]
        table = [[r["node"], r["kind"], _number(r.get("cosine_alone"), ".6f"), _number(r.get("top1_alone"), ".3f"),
                  _number(r.get("same_read_alone"), ".3f"), _number(r.get("metric_alone"), ".4g"),
                  _yes_no(r.get("holds_alone")), r["status"]] for r in shown_rows]
        lines.append("  each node quantized alone, worst first:")
        headers = ["node", "kind", "cosine", "top-1", "same read", "metric", "holds alone", "in the result"]
        lines.extend("  " + line for line in format_table(headers, table, right=(2, 3, 4, 5)).splitlines())
        if len(shown_rows) < len(rows):
            lines.append(f"  ... and {len(rows) - len(shown_rows)} more (--top 0 shows all)")
    return "\n".join(lines)


def _yes_no(value: object) -> str:
    """A flag for a table cell; "-" where there is none (a report written before the flag existed)."""
    return "-" if value is None else "yes" if value else "no"


def _number(value: object, spec: str) -> str:
    """A figure for a table cell; "-" where there is none."""
    return "-" if not isinstance(value, (int, float)) else format(value, spec)


_COMMANDS = {"optimize": run_optimize, "validate": run_validate, "inspect": run_inspect, "densify": run_densify, "passes": run_passes,
             "explain": run_explain, "tune": run_tune}


def _quiet_libraries(verbose: int) -> None:
    """Library noise (numpy's RuntimeWarnings, onnxruntime's colour-coded log lines) goes to the log,
    shown from -v on; what the user must know, onnxsparse says in its own words."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3 if verbose < 2 else 2)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.INFO if verbose else logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)], format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(args.verbose)
    try:
        return _COMMANDS[args.command](args)
    except OnnxsparseError as error:
        print(f"onnxsparse: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("onnxsparse: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `onnxsparse inspect m.onnx | head`: the reader left; nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as error:  # noqa: BLE001 - a bug of ours: one line, the traceback under -vv
        log.debug("internal error", exc_info=True)
        print(f"onnxsparse: internal error: {type(error).__name__}: {' '.join(str(error).split())} "
              "(a bug: please report it with the output of -vv)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
