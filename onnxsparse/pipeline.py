"""The pass manager: for each pass, provide what it needs, clone, run, check, validate, then commit
or roll back according to the policy. Every step is compared with the ORIGINAL model's outputs, so
drift adds up visibly instead of hiding in step-to-step deltas."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx

from .calibration import InputSource, InputSpec, collect_feeds, resolve_inputs
from .errors import (
    InputDataError,
    ModelLoadError,
    OutputPathError,
    PassFailed,
    PipelineSpecError,
    RequirementError,
    RuntimeLoadError,
    ValidationFailed,
)
from .inspect_model import summarize
from .io import LoadInfo, check_model, load_with_info, same_file, save
from .passes import Pass, PassContext, PassResult, Requirement
from .report import COMMITTED, KEPT_FAILING, ROLLED_BACK, RunReport, StepReport, write_text_atomically
from .spec import format_pipeline, load_recipe, parse_pipeline
from .validate import EXACT, ProgressCallback, Reference, Tolerances, ValidationResult

log = logging.getLogger(__name__)

Policy = Literal["rollback", "raise", "keep"]
POLICIES: tuple[Policy, ...] = ("rollback", "raise", "keep")

# Errors that mean "the caller must fix what they gave", never "this pass is broken": they propagate.
_CALLER_ERRORS = (PipelineSpecError, RequirementError, InputDataError)

_REQUIREMENT_HINTS = {
    Requirement.CALIBRATION: "pass --calibration FILE|DIR on the command line or calibration=... in Python",
}


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


@dataclass
class PassManager:
    """Runs passes over a model under validation. The input model is never modified."""

    passes: Sequence[Pass]
    inputs: InputSource | None = None
    calibration: InputSource | None = None
    tolerances: Tolerances = field(default_factory=Tolerances)
    policy: Policy = "rollback"
    temperature: float = 1.0
    max_feeds: int | None = 64
    progress: ProgressCallback | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise PipelineSpecError(f"policy '{self.policy}' is not one of {', '.join(POLICIES)}")
        if not self.passes:
            raise PipelineSpecError("empty pipeline: give at least one pass (see `onnxsparse passes`)")
        for pass_ in self.passes[:-1]:
            if pass_.must_be_last:
                raise PipelineSpecError(f"{pass_.name} must be the last pass: it encodes the file for disk, and later passes read dense tensors")

    def run(self, model: onnx.ModelProto, label: str = "model", info: LoadInfo | None = None) -> tuple[onnx.ModelProto, RunReport]:
        started = time.perf_counter()
        self._check_requirements()
        source = self.inputs if self.inputs is not None else resolve_inputs(None, model)
        report = RunReport(
            pipeline=format_pipeline(self.passes), policy=self.policy, inputs=source.describe(), input=summarize(model, info)
        )
        report.input.source = label
        feeds = collect_feeds(source, model, limit=self.max_feeds)
        reference = Reference.of(model, feeds, f"{label} (original)", self._progress("reference"))
        current, last_tolerance = model, (None, EXACT)
        for index, pass_ in enumerate(self.passes):
            self._report_progress("passes", index, len(self.passes))
            step, result_model = self._run_step(pass_, current, reference, label)
            report.steps.append(step)
            if step.status in (COMMITTED, KEPT_FAILING):
                current, last_tolerance = result_model, (pass_.name, pass_.default_tolerance)
                report.standard = report.standard and step.standard
        self._report_progress("passes", len(self.passes), len(self.passes))
        final = _finalize_versions(clone(current), model)
        report.final_validation = reference.validate(
            final, lambda output: self.tolerances.for_output(output, *last_tolerance), f"{label} (final)", temperature=self.temperature
        )
        report.output = summarize(final, with_tensors=True)
        report.warnings.extend(w for step in report.steps for w in step.warnings)
        report.seconds = time.perf_counter() - started
        return final, report

    def _check_requirements(self) -> None:
        """Fail before any work when a pass needs something that was not given."""
        for pass_ in self.passes:
            if Requirement.CALIBRATION in pass_.needs() and self.calibration is None:
                raise RequirementError(f"{pass_.name} needs calibration data: {_REQUIREMENT_HINTS[Requirement.CALIBRATION]}")

    def _run_step(
        self, pass_: Pass, current: onnx.ModelProto, reference: Reference, label: str
    ) -> tuple[StepReport, onnx.ModelProto | None]:
        step = StepReport(pass_name=pass_.name, spec=pass_.spec())
        started = time.perf_counter()
        try:
            candidate = self._prepared_copy(pass_, current)
            result = pass_.run(candidate, PassContext(calibration=self.calibration))
        except _CALLER_ERRORS:
            raise
        except Exception as error:  # noqa: BLE001 - a broken pass is rolled back, not fatal
            log.debug("pass %s raised", pass_.name, exc_info=True)
            return self._structural_failure(step, f"pass raised {type(error).__name__}: {_first_line(error)}"), None
        step.seconds["run"] = time.perf_counter() - started
        _copy_result(step, result)
        checked = time.perf_counter()
        try:
            check_model(result.model, f"{label} after {pass_.name}", standard=result.standard)
        except ModelLoadError as error:
            return self._structural_failure(step, str(error)), None
        step.seconds["check"] = time.perf_counter() - checked
        validated = time.perf_counter()
        try:
            step.validation = reference.validate(
                result.model,
                lambda output: self.tolerances.for_output(output, pass_.name, pass_.default_tolerance),
                f"{label} after {pass_.name}",
                temperature=self.temperature,
                progress=self._progress(f"validate {pass_.name}"),
            )
        except (RuntimeLoadError, InputDataError) as error:
            return self._structural_failure(step, str(error)), None
        step.seconds["validate"] = time.perf_counter() - validated
        return self._judged(step, step.validation), result.model

    def _prepared_copy(self, pass_: Pass, current: onnx.ModelProto) -> onnx.ModelProto:
        candidate = clone(current)
        if Requirement.SHAPES in pass_.needs():
            try:
                candidate = onnx.shape_inference.infer_shapes(candidate, strict_mode=True, data_prop=True)
            except Exception as error:  # noqa: BLE001 - onnx raises several types
                raise RequirementError(f"{pass_.name} needs tensor shapes, and shape inference fails: {_first_line(error)}") from error
        return candidate

    def _structural_failure(self, step: StepReport, reason: str) -> StepReport:
        """The pass crashed or produced an invalid model: never kept, whatever the policy."""
        step.status, step.reason = ROLLED_BACK, reason
        log.info("%s rolled back: %s", step.pass_name, reason)
        if self.policy == "raise":
            raise PassFailed(f"{step.pass_name}: {reason}")
        return step

    def _judged(self, step: StepReport, validation: ValidationResult) -> StepReport:
        if validation.passed:
            return step
        reason = "; ".join(validation.verdict.failures)
        if self.policy == "raise":
            raise ValidationFailed(f"{step.pass_name}: {reason}")
        step.status = KEPT_FAILING if self.policy == "keep" else ROLLED_BACK
        step.reason = reason
        log.info("%s %s: %s", step.pass_name, step.status, reason)
        return step

    def _progress(self, label: str) -> ProgressCallback | None:
        if self.progress is None:
            return None
        callback = self.progress
        return lambda _, done, total: callback(label, done, total)

    def _report_progress(self, label: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(label, done, total)


def _copy_result(step: StepReport, result: PassResult) -> None:
    step.changes, step.skipped = result.changes, result.skipped
    step.figures, step.warnings, step.standard = result.figures, result.warnings, result.standard


def _finalize_versions(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Keep the input's IR version (onnxruntime 1.31 loads at most IR 13; onnx 1.23 writes 14),
    raised only as far as the opsets a pass introduced require."""
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(original.ir_version, needed)
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# the file-level job
# ---------------------------------------------------------------------------------------------


def optimize(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None,
    pipeline: str | Sequence[Pass] | None = None,
    *,
    recipe: str | os.PathLike[str] | None = None,
    inputs: InputSpec = None,
    calibration: InputSpec = None,
    tolerances: Tolerances | None = None,
    policy: Policy | None = None,
    samples: int = 4,
    seed: int = 0,
    dims: dict[str, int] | None = None,
    int_range: tuple[int, int] | None = None,
    report_path: str | os.PathLike[str] | None = None,
    overwrite_input: bool = False,
    progress: ProgressCallback | None = None,
) -> RunReport:
    """Load ``input_path``, run the pipeline (text, pass objects, or a TOML ``recipe``) under
    validation, write ``output_path`` atomically (None: run and report only), and return the report."""
    passes, tolerances, policy = _resolve_pipeline(pipeline, recipe, tolerances, policy)
    if output_path is not None and not overwrite_input and same_file(output_path, input_path):
        raise OutputPathError(f"{output_path}: output path is the input model; choose another output path")
    model, info = load_with_info(input_path)
    manager = PassManager(
        passes,
        inputs=resolve_inputs(inputs, model, samples=samples, seed=seed, dims=dims, int_range=int_range),
        calibration=None if calibration is None else resolve_inputs(calibration, model),
        tolerances=tolerances,
        policy=policy,
        progress=progress,
    )
    final, report = manager.run(model, label=str(input_path), info=info)
    if output_path is not None:
        written = save(final, output_path, protect=() if overwrite_input else (input_path,), standard=report.standard)
        report.output_path = str(written)
        report.output.source = str(written)
        report.output.file_bytes = Path(written).stat().st_size
    if report_path is not None:
        write_text_atomically(report_path, report.to_json())
    return report


def _resolve_pipeline(
    pipeline: str | Sequence[Pass] | None,
    recipe: str | os.PathLike[str] | None,
    tolerances: Tolerances | None,
    policy: Policy | None,
) -> tuple[list[Pass], Tolerances, Policy]:
    if (pipeline is None) == (recipe is None):
        raise PipelineSpecError("give exactly one of a pipeline (-p) or a recipe (--recipe)")
    if recipe is not None:
        loaded = load_recipe(recipe)
        return loaded.passes, tolerances or loaded.tolerances, policy or loaded.policy  # type: ignore[return-value]
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)  # type: ignore[arg-type]
    for item in passes:
        if not isinstance(item, Pass):
            raise PipelineSpecError(f"pipeline item {item!r} is not a Pass")
    return passes, tolerances or Tolerances(), policy or "rollback"

