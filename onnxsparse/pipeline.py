"""The pass manager: for each pass, provide what it needs, clone, run, check, validate, then commit
or roll back according to the policy. Every step is compared with the ORIGINAL model's outputs, so
drift adds up visibly instead of hiding in step-to-step deltas."""

from __future__ import annotations

import copy
import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from .calibration import (
    DEFAULT_SYNTHETIC_SAMPLES,
    InputSource,
    InputSpec,
    IterableInputs,
    SpreadSamples,
    SyntheticInputs,
    collect_feeds,
    first_samples,
    held_out_split,
    model_inputs,
    resolve_inputs,
    sample_axis,
    sample_digests,
)
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
from .files import OutputLock, Staging
from .inspect_model import Footprint, footprint, summarize
from .io import LoadInfo, check_model, checked_output_path, load, load_with_info, same_file, stage_model
from .latency import RETIME_RUNS, RETIME_SECONDS, relative_latency, timing_feed
from .limits import DEFAULT_MAX_INPUT_BYTES, VALIDATION_SAMPLES
from .passes import Pass, PassContext, PassResult, Requirement
from .report import (
    COMMITTED,
    KEPT,
    KEPT_FAILING,
    KEPT_WORSE,
    NO_CHANGE,
    PENDING,
    RECOVERED,
    ROLLED_BACK,
    WORSE,
    RunReport,
    StepReport,
)
from .runtime import Runtime, open_session, return_freed_memory
from .shapes import infer_shapes
from .spec import format_pipeline, load_recipe, parse_pipeline
from .validation import (
    EXACT,
    Feed,
    MetricFunction,
    ProgressCallback,
    Reference,
    TaskMetric,
    Tolerance,
    Tolerances,
    ValidationResult,
    compare,
    loosest,
    run_feeds,
)
from .weightstore import WeightStore

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


@dataclass(frozen=True)
class DataPlan:
    """Which samples validate the steps and which the passes may fit on: never the same ones."""

    validation: InputSource
    calibration: InputSource | None  # what the passes receive; None when none was given
    fitting: tuple[str, ...]  # the passes that fit on calibration data
    held_out: bool = False  # validation is a share of the calibration data (already capped in samples)
    note: str = ""  # what the report must say about this choice


@dataclass
class PassManager:
    """Runs passes over a model under validation. The input model is never modified.

    Validation samples and calibration samples never overlap: given both, an overlap is refused;
    given calibration data only, a seeded share of it is held out for validation and the passes
    fit on the rest (``held_out_seed``). ``fallback_inputs`` (seeded synthetic data by default)
    validate when no real data was given. A step that changed nothing is reported as such, and one
    that left the model larger on disk and not faster, or slower, is rolled back as ``worse``
    unless ``keep_worse``."""

    passes: Sequence[Pass]
    inputs: InputSource | None = None
    calibration: InputSource | None = None
    tolerances: Tolerances = field(default_factory=Tolerances)
    policy: Policy = "rollback"
    temperature: float = 1.0
    max_samples: int | None = VALIDATION_SAMPLES  # validation samples judged on, the first ones (None: all)
    progress: ProgressCallback | None = None
    fallback_inputs: InputSource | None = None
    held_out_seed: int = 0
    keep_worse: bool = False
    metric: TaskMetric | None = None  # the user's task metric, judged beside the tolerances everywhere
    # False: no step is timed, and none is judged worse for its speed or for growing without being
    # faster (sizes are recorded): for a caller that times the results itself, one at a time (the tuner
    # builds candidates side by side).
    measure_speed: bool = True
    report: RunReport | None = field(default=None, init=False)
    # The run's onnxruntime sessions, one per model version and use, timing or not (see runtime.py).
    runtime: Runtime = field(default_factory=Runtime, init=False)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise PipelineSpecError(f"policy '{self.policy}' is not one of {', '.join(POLICIES)}")
        if not self.passes:
            raise PipelineSpecError("empty pipeline: give at least one pass (see `onnxsparse passes`)")
        for pass_ in self.passes[:-1]:
            if pass_.must_be_last:
                raise PipelineSpecError(f"{pass_.name} must be the last pass: it encodes the file for disk, and later passes read dense tensors")

    def run(self, model: onnx.ModelProto, label: str = "model", info: LoadInfo | None = None) -> tuple[onnx.ModelProto, RunReport]:
        """Run every pass; the report is also kept in ``self.report`` as it grows, so a caller
        that catches an error (policy ``raise``) can still write what happened."""
        try:
            return self._run(model, label, info)
        finally:
            log.debug("onnxruntime sessions: %d made, %d reused", self.runtime.created, self.runtime.reused)
            self.runtime.clear()  # their memory goes with the run

    def _run(self, model: onnx.ModelProto, label: str, info: LoadInfo | None) -> tuple[onnx.ModelProto, RunReport]:
        started = time.perf_counter()
        self._check_requirements()
        data = self._plan_data(model)
        report = self.report = RunReport(pipeline=format_pipeline(self.passes), policy=self.policy, inputs="", input=summarize(model, info))
        report.input.source = label
        limit = None if data.held_out else self.max_samples
        feeds = collect_feeds(first_samples(data.validation, model, limit), model, extras=self.metric is not None)
        if self.inputs is not None and self.calibration is not None and data.fitting:
            _refuse_overlap(self.inputs, feeds, self.calibration, model, data.fitting)  # type: ignore[arg-type]
        validated = _count_samples(feeds, model)
        report.inputs = _describe_feeds(data.validation, validated, limit)
        report.calibration = data.calibration.describe() if data.calibration is not None and data.fitting else ""
        if data.note:
            report.warnings.append(data.note)
        phase = time.perf_counter()
        # The first step's timing loads the original once more, unless its outputs come from that
        # session. A big original is held for it only when the pass does not run the model on
        # calibration data in sessions of its own meanwhile (two copies of a big model's weights).
        first = self.passes[0] if self.passes else None
        timed = self.measure_speed and first is not None and first.may_change_speed
        pin = timed and first is not None and not first.fits_on_calibration()
        reference = Reference.of(model, feeds, f"{label} (original)", self._progress("reference"), runtime=self.runtime, metric=self.metric,
                                 timed_later=timed, pin=pin)
        log.info("reference: the original's outputs on %s in %.1f s", report.inputs, time.perf_counter() - phase)
        chain = _Chain(model, reference.outputs, footprint(model))
        judge = _CalibrationJudge(model, data.calibration, self.temperature, self.runtime, self.metric)
        # steps judged again after the recovery step that follows them, and the chain from before them
        pending: list[StepReport] = []
        before: _Chain | None = None
        for index, pass_ in enumerate(self.passes):
            self._report_progress("passes", index, len(self.passes))
            recovery_follows = index + 1 < len(self.passes) and self.passes[index + 1].recovers
            step, result_model, outputs = self._run_step(pass_, chain, reference, data, judge, label, recovery_follows)
            self.runtime.drop_handed()  # a result the pass timed and handed over, if the step did not validate it
            return_freed_memory()  # the step's sessions and arrays, before the next step maps weights or loads a model
            step.judged_on = report.inputs if step.validation is not None else ""  # a step that changed nothing was not judged
            log.info("step %d/%d %s: %s (%s)", index + 1, len(self.passes), pass_.name, step.status,
                     ", ".join(f"{phase_name} {seconds:.1f} s" for phase_name, seconds in step.seconds.items()))
            if step.status == PENDING and result_model is not None:
                before = before or copy.copy(chain)  # the chain as it was, to go back to
                pending.append(step)
            elif pending and before is not None:
                chain = self._settled(pending, step, chain, before, pass_.name)
                pending, before = [], None
            if step.status in (*KEPT, PENDING) and result_model is not None:
                chain.commit(result_model, outputs, pass_)
                report.standard = report.standard and step.standard
        self._report_progress("passes", len(self.passes), len(self.passes))
        final = _finalize_versions(clone(chain.model), model)
        phase = time.perf_counter()
        final_tolerance = chain.tolerance_of(None, reference.labels, self.tolerances, reference.sequences)
        if chain.outputs_current and final.ir_version == chain.model.ir_version:  # the model its last step already ran
            report.final_validation = reference.compared(chain.outputs, final_tolerance, temperature=self.temperature)
        else:
            report.final_validation = reference.validate(final, final_tolerance, f"{label} (final)", temperature=self.temperature,
                                                         runtime=self.runtime)
        log.info("final validation: %s in %.1f s", "passed" if report.final_validation.passed else "FAILED", time.perf_counter() - phase)
        report.output = summarize(final, with_tensors=True)
        report.warnings.extend(dict.fromkeys(w for step in report.steps for w in step.warnings))
        report.warnings.extend(note for note in report.final_validation.verdict.notes if note not in report.warnings)
        if validated < FEW_VALIDATION_SAMPLES:
            report.warnings.append(f"validated on {validated} sample(s) only: a verdict on so few says little; give more validation "
                                   "data (--inputs), or more calibration data to hold out from")
        if isinstance(data.validation, SyntheticInputs):
            report.warnings.append(f"validated on {data.validation.describe()}: real data may tell another story; give --inputs "
                                   "(or --calibration, part of which is then held out for validation)")
        report.seconds = time.perf_counter() - started
        return final, report

    def _plan_data(self, model: onnx.ModelProto) -> DataPlan:
        """Validate on the user's inputs; else on calibration samples held out of every fit (on all of
        them when no pass fits on data); else on the fallback (seeded synthetic) inputs."""
        fitting = tuple(p.name for p in self.passes if p.fits_on_calibration())
        if self.calibration is None:
            validation = self.inputs or self.fallback_inputs or resolve_inputs(None, model)
            return DataPlan(validation, None, fitting)
        if self.inputs is not None:
            return DataPlan(self.inputs, self.calibration, fitting)
        if not fitting:  # real data beats synthetic, and nothing fits on it
            return DataPlan(self.calibration, self.calibration, fitting)
        _, sizes = sample_digests(self.calibration, _input_names(model), sample_axis(model), hashed=False)
        if sum(sizes) < 2:  # nothing to hold out: judge on synthetic inputs rather than on what the passes fit
            validation = self.fallback_inputs or resolve_inputs(None, model)
            return DataPlan(validation, self.calibration, fitting, note=(
                f"{self.calibration.describe()} holds {sum(sizes)} sample: none could be held out of the fit to validate on, so the "
                f"steps were judged on {validation.describe()}; give validation inputs of your own (--inputs)"))
        split = held_out_split(self.calibration, sizes, self.held_out_seed)
        log.info("validating on %s; the passes fit on %s", split.held_out.describe(), split.fit.describe())
        return DataPlan(split.held_out, split.fit, fitting, held_out=True)

    def _check_requirements(self) -> None:
        """Fail before any work when a pass needs something that was not given."""
        for pass_ in self.passes:
            if Requirement.CALIBRATION in pass_.needs() and self.calibration is None:
                raise RequirementError(f"{pass_.name} needs calibration data: {_REQUIREMENT_HINTS[Requirement.CALIBRATION]}")

    def _settled(self, pending: list[StepReport], recovery: StepReport, chain: _Chain, before: _Chain, recovery_name: str) -> _Chain:
        """The chain after a recovery step: the pending steps before it are kept when the model after it
        holds the tolerance, else they all go and the chain is as it was before the first of them."""
        kept = recovery.status in (COMMITTED, KEPT_WORSE)
        for earlier in pending:
            if kept:
                earlier.status, earlier.reason = RECOVERED, f"out of tolerance alone ({earlier.reason}); within it after {recovery_name}"
            else:
                earlier.status = ROLLED_BACK
                earlier.reason += f"; {recovery_name} did not bring it back within tolerance ({recovery.status})"
                log.info("%s rolled back: %s", earlier.pass_name, earlier.reason)
        return chain if kept else before

    def _run_step(
        self, pass_: Pass, chain: _Chain, reference: Reference, data: DataPlan, judge: _CalibrationJudge, label: str,
        recovery_follows: bool = False,
    ) -> tuple[StepReport, onnx.ModelProto | None, list[dict[str, np.ndarray]] | None]:
        step = StepReport(pass_name=pass_.name, spec=pass_.spec())
        if self.report is not None:  # in the report at once: a `raise` below still leaves it there
            self.report.steps.append(step)
        started = time.perf_counter()
        fits = pass_.fits_on_calibration()
        step.fitted_on = data.calibration.describe() if fits and data.calibration is not None else ""
        tolerance_of = chain.tolerance_of(pass_, reference.labels, self.tolerances, reference.sequences)

        def validate(model: onnx.ModelProto) -> ValidationResult:  # for passes that search (the qdq guard): calibration only
            verdict = judge.validate(model, tolerance_of, f"{label} trial of {pass_.name}")
            assert verdict is not None  # only a confirmation finds no samples
            return verdict

        def confirm(model: onnx.ModelProto) -> ValidationResult | None:  # the same, on calibration samples `validate` never sees
            return judge.validate(model, tolerance_of, f"{label} confirmation of {pass_.name}", confirming=True)

        crash = ""
        try:
            result = pass_.run(self._prepared_copy(pass_, chain),
                               PassContext(calibration=data.calibration, validate=validate if data.calibration is not None else None,
                                           confirm=confirm if data.calibration is not None else None,
                                           progress=self.progress, runtime=self.runtime, original=judge.original,
                                           timing=data.validation, after_lossy=chain.drifted))
        except _CALLER_ERRORS:
            raise
        except Exception as error:  # a broken pass is rolled back, not fatal
            log.debug("pass %s raised", pass_.name, exc_info=True)
            crash = f"pass raised {type(error).__name__}: {_first_line(error)}"
        # The original's session, held for a first pass that times its result against it: the pass is
        # done with it, and the validation's sessions come next.
        self.runtime.unpin()
        # A pass's graphsurgeon graph is a web of cycles that refcounting never frees, and it holds the
        # weights the pass read (memory maps) and wrote: freed here, whether the pass returned or raised,
        # before the check and the sessions (and the next step) need the memory.
        gc.collect()
        if crash:
            return self._structural_failure(step, crash), None, None
        step.seconds["run"] = time.perf_counter() - started
        _copy_result(step, result)
        if not result.changes:
            step.status, step.reason = (WORSE, f"worse than its input: {result.worse}") if result.worse else (NO_CHANGE, _why_nothing_changed(result))
            log.info("%s %s: %s", pass_.name, step.status, step.reason)
            return step, None, None
        checked = time.perf_counter()
        try:
            check_model(result.model, f"{label} after {pass_.name}", standard=result.standard)
        except ModelLoadError as error:
            return self._structural_failure(step, str(error)), None, None
        step.seconds["check"] = time.perf_counter() - checked
        validated = time.perf_counter()
        try:
            session = open_session(result.model, f"{label} after {pass_.name}", runtime=self.runtime)
            outputs = run_feeds(session, reference.feeds, f"{label} after {pass_.name}", self._progress(f"validate {pass_.name}"))
        except (RuntimeLoadError, InputDataError) as error:
            return self._structural_failure(step, str(error)), None, None
        step.validation = compare(reference.outputs, outputs, tolerance_of, temperature=self.temperature, scores=reference.scores,
                                  metric=reference.metric, feeds=reference.feeds)
        if pass_.tolerance() == EXACT and chain.drifted:
            # An exact pass after a lossy one: the drift from the original belongs to the earlier
            # pass; this one is held to its own bound against the model it was given.
            own = self.tolerances.per_pass.get(pass_.name, EXACT)
            step.step_validation = compare(chain.outputs, outputs, lambda _: own, temperature=self.temperature, scores=reference.scores)
        step.seconds["validate"] = time.perf_counter() - validated
        step.warnings.extend(note for note in step.validation.verdict.notes if note not in step.warnings)  # how far to trust it
        step = self._judged(step, recovery_follows)
        if step.status in KEPT:
            measured = time.perf_counter()
            step = self._judged_for_size_and_speed(step, pass_, chain, result.model, data, result.latency_vs_input)
            step.seconds["compare"] = time.perf_counter() - measured
        return step, result.model, outputs

    def _judged_for_size_and_speed(self, step: StepReport, pass_: Pass, chain: _Chain, model: onnx.ModelProto, data: DataPlan,
                                   latency_vs_input: float | None = None) -> StepReport:
        """A step that leaves the model larger on disk and not faster, or slower than its input in
        onnxruntime, is worse whatever its accuracy: rolled back unless ``keep_worse``. Only passes
        that can change the speed, and steps that grew the model, are timed."""
        before, after = chain.footprint, footprint(model)
        step.figures.update(bytes_before=before.bytes, bytes_after=after.bytes, parameters_before=before.elements, parameters_after=after.elements)
        grew = after.bytes > before.bytes * SIZE_NOISE
        if not (grew or pass_.may_change_speed) or not self.measure_speed:
            return step
        ratio = _confirmed_latency_ratio(chain.model, model, timing_feed(chain.model, data.calibration or data.validation), grew, self.runtime,
                                         measured=latency_vs_input)
        step.figures["latency_vs_input"] = round(ratio, 3)
        why = ""
        if grew and ratio > 1.0 - SPEED_NOISE:
            why = (f"{after.bytes / max(before.bytes, 1):.2f}x the bytes of its input (parameters {before.elements:,} -> {after.elements:,}) and not faster "
                   f"({ratio:.2f}x its time in onnxruntime, one thread)")
        elif ratio > 1.0 + SLOWER_MARGIN:
            why = f"{ratio:.2f}x its input's time in onnxruntime (one thread)"
        if not why:
            return step
        if step.status == KEPT_FAILING:  # kept past its tolerance (--policy keep): both verdicts stay in view
            step.reason += f"; also worse than its input: {why}" + ("" if self.keep_worse else " (rolled back: --keep-worse keeps it)")
            if not self.keep_worse:
                step.status = WORSE
            return step
        # Worse is not a tolerance breach: under every policy it rolls back (exit 4 at the end), or is kept on request.
        step.status = KEPT_WORSE if self.keep_worse else WORSE
        step.reason = f"worse than its input: {why}" + ("" if self.keep_worse else "; rolled back to its input (--keep-worse keeps such a step)")
        log.info("%s %s: %s", step.pass_name, step.status, step.reason)
        return step

    def _prepared_copy(self, pass_: Pass, chain: _Chain) -> onnx.ModelProto:
        """The pass's own copy of the committed model, with every tensor's shape if it needs them:
        inferred once per model version, and not again after a step whose pass preserves them."""
        if Requirement.SHAPES in pass_.needs() and chain.shaped is None:
            chain.shaped = infer_shapes(chain.model, f"{pass_.name} needs tensor shapes, and the model")
        given = chain.shaped if Requirement.SHAPES in pass_.needs() and chain.shaped is not None else chain.model
        chain.input_shaped = given is chain.shaped
        return clone(given)

    def _structural_failure(self, step: StepReport, reason: str) -> StepReport:
        """The pass crashed or produced an invalid model: never kept, whatever the policy."""
        step.status, step.reason = ROLLED_BACK, reason
        log.info("%s rolled back: %s", step.pass_name, reason)
        if self.policy == "raise":  # the model stays as it was: the step reads rolled back
            raise PassFailed(f"{step.pass_name}: {reason}")
        return step

    def _judged(self, step: StepReport, recovery_follows: bool = False) -> StepReport:
        if step.step_validation is not None:
            # An exact pass after drift is judged on what it changed itself; its distance to the
            # original is the earlier passes' (and is reported beside it).
            failures = [f"vs the model before this pass: {f}" for f in step.step_validation.verdict.failures]
        else:
            failures = list(step.validation.verdict.failures) if step.validation is not None else []
        if not failures:
            return step
        reason = "; ".join(failures)
        if self.policy == "raise":
            step.status, step.reason = ROLLED_BACK, reason
            raise ValidationFailed(f"{step.pass_name}: {reason}")
        step.status = KEPT_FAILING if self.policy == "keep" else PENDING if recovery_follows else ROLLED_BACK
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


@dataclass
class _Chain:
    """The committed model so far, its outputs on the validation feeds, and the tolerance budget
    its passes add up to against the original (lossy passes widen it; exact ones do not)."""

    model: onnx.ModelProto
    outputs: list[dict[str, np.ndarray]]
    footprint: Footprint
    budget: Tolerance = EXACT
    score_budget: Tolerance = EXACT  # the same for outputs labels are read from (Pass.score_tolerance, validation.with_score_bounds)
    last_pass: str | None = None
    drifted: bool = False
    outputs_current: bool = True  # ``outputs`` are the committed model's own (not an earlier one's)
    # The committed model with every tensor's shape in its value_info, once inferred (Requirement.SHAPES);
    # a step whose pass preserves SHAPES and was given them commits a model that still has them.
    shaped: onnx.ModelProto | None = None
    input_shaped: bool = False  # the running step's pass was given ``shaped``

    def budget_with(self, pass_: Pass) -> Tolerance:
        return _widened(self.budget, pass_.tolerance())

    def score_budget_with(self, pass_: Pass) -> Tolerance:
        return _widened(self.score_budget, pass_.score_tolerance())

    def tolerance_of(self, pass_: Pass | None, labels: frozenset[str] | None, tolerances: Tolerances,
                     sequences: frozenset[str] = frozenset()) -> Callable[[str], Tolerance]:
        """Each output's tolerance: the user's, else the budget with ``pass_``; outputs read as a label per
        sample (``labels``) or a sequence of them (``sequences``) have the score budget's bound on that."""
        budget = self.budget_with(pass_) if pass_ is not None else self.budget
        score_budget = self.score_budget_with(pass_) if pass_ is not None else self.score_budget
        of_labels, of_sequences = replace(score_budget, max_sequence_drop=None), replace(score_budget, max_top1_drop=None)
        name = pass_.name if pass_ is not None else self.last_pass

        def default(output: str) -> Tolerance:
            return of_labels if labels and output in labels else of_sequences if output in sequences else budget
        return lambda output: tolerances.for_output(output, name, default(output))

    def commit(self, model: onnx.ModelProto, outputs: list[dict[str, np.ndarray]] | None, pass_: Pass) -> None:
        self.budget = self.budget_with(pass_)
        self.score_budget = self.score_budget_with(pass_)
        self.shaped = model if self.input_shaped and Requirement.SHAPES in pass_.preserves else None
        self.model, self.last_pass = model, pass_.name
        self.footprint = footprint(model)
        self.outputs = outputs if outputs is not None else self.outputs
        self.outputs_current = outputs is not None
        self.drifted = self.drifted or pass_.tolerance() != EXACT


def _widened(budget: Tolerance, own: Tolerance) -> Tolerance:
    """The budget of the passes so far and one more: lossy passes widen it, exact ones do not."""
    if own == EXACT:
        return budget
    return own if budget == EXACT else loosest(budget, own)


# A step "grew" the model when its constant tensors take more than 1% more bytes (QDQ adds a few scales);
# such a step must run at least 3% faster to be kept. Any step "slower" by more than 10% than its input
# (confirmed by a longer timing: one timing on a shared machine is off by a few percent) is worse.
SIZE_NOISE = 1.01
SPEED_NOISE = 0.03
SLOWER_MARGIN = 0.10


def _confirmed_latency_ratio(before: onnx.ModelProto, after: onnx.ModelProto, feed: dict[str, np.ndarray], grew: bool, runtime: Runtime,
                             measured: float | None = None) -> float:
    """``after``'s onnxruntime time over ``before``'s (``measured`` when the pass timed it already); a
    ratio that would condemn the step is timed again, longer. The first timing stops early when the
    ratio is clearly on one side of the bound that judges it."""
    bound = 1.0 - SPEED_NOISE if grew else 1.0 + SLOWER_MARGIN  # a grown step must be faster; any other, not slower
    ratio = measured if measured is not None else relative_latency(before, after, feed, runtime=runtime, decide_at=(bound,))
    if (grew and ratio > 1.0 - SPEED_NOISE) or ratio > 1.0 + SLOWER_MARGIN:
        ratio = relative_latency(before, after, feed, min_runs=RETIME_RUNS, min_seconds=RETIME_SECONDS, runtime=runtime)
    return ratio


def _why_nothing_changed(result: PassResult) -> str:
    """The pass's own reasons for leaving things alone, grouped by reason, else its warnings."""
    by_reason: dict[str, list[str]] = {}
    for skip in result.skipped:
        by_reason.setdefault(skip.reason, []).append(skip.target)
    parts = [f"{reason} ({_some(targets)})" for reason, targets in by_reason.items()]
    parts = parts or list(dict.fromkeys(result.warnings))
    if not parts:
        return "the pass found nothing to change (and gave no reason: a gap in the pass, please report it)"
    more = f"; and {len(parts) - 4} other reason(s) in the report" if len(parts) > 4 else ""
    return "; ".join(parts[:4]) + more


def _some(names: list[str]) -> str:
    return ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")


# Below this many validation samples a run warns that its verdicts say little (one held-out sample of three).
FEW_VALIDATION_SAMPLES = 8


def _count_samples(feeds: list[Feed], model: onnx.ModelProto) -> int:
    """Samples in the validation feeds, counted as the held-out split counts them."""
    return sum(sample_digests(IterableInputs(feeds), _input_names(model), sample_axis(model), hashed=False)[1])


def _input_names(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model_inputs(model)]


def _refuse_overlap(inputs: InputSource, feeds: list[Feed], calibration: InputSource, model: onnx.ModelProto, fitting: tuple[str, ...]) -> None:
    """Validation samples that are also calibration samples would judge a fitted pass on what it
    fitted (a refit that memorised 32 views validated at top-1 0.875 and scored 0.062 on others)."""
    names, batched = _input_names(model), sample_axis(model)
    validation, _ = sample_digests(IterableInputs(feeds), names, batched)
    known = set(sample_digests(calibration, names, batched)[0])
    shared = sum(digest in known for digest in validation)
    if shared:
        raise InputDataError(
            f"{inputs.describe()}: {shared} of its {len(validation)} validation samples are also in the calibration data "
            f"({calibration.describe()}), on which {', '.join(dict.fromkeys(fitting))} fit: the verdict would be computed on what they "
            "fitted. Give validation inputs apart from the calibration data, or leave --inputs out to hold out part of the calibration data")


class _CalibrationJudge:
    """Judges a pass's trial candidates (the qdq guard, its choice of mode) against the original on
    calibration samples spread over the set, never on the validation samples: what a pass chooses
    by must not be what its verdict is then computed on. The reference is computed on first use."""

    SAMPLES = 32
    # A pass that tried many trials against the judge's samples has fitted its choice to them a little; it
    # confirms the choice on up to this many others, spread over the rest of the set.
    CONFIRMING_SAMPLES = 128

    def __init__(self, original: onnx.ModelProto, calibration: InputSource | None, temperature: float, runtime: Runtime,
                 metric: TaskMetric | None = None) -> None:
        self.original, self.calibration, self.temperature, self.runtime = original, calibration, temperature, runtime
        self.metric = metric
        self._references: dict[bool, Reference] = {}

    def validate(self, model: onnx.ModelProto, tolerance_of: Callable[[str], Tolerance], label: str, *,
                 confirming: bool = False) -> ValidationResult | None:
        """``model`` against the original on the judge's calibration samples; ``confirming``: on up to
        CONFIRMING_SAMPLES of the others instead (None when the set has no others)."""
        if self.calibration is None:
            raise RequirementError("a pass asked to judge a trial model without calibration data")
        reference = self._references.get(confirming)
        if reference is None:
            batched = sample_axis(self.original)
            source = SpreadSamples(self.calibration, self.SAMPLES, others=confirming, batched=batched)
            if confirming:
                if source.total == 0:
                    return None
                source = SpreadSamples(source, self.CONFIRMING_SAMPLES, batched=batched)
            feeds = collect_feeds(source, self.original, extras=self.metric is not None)
            reference = self._references[confirming] = Reference.of(
                self.original, feeds, f"original on {'other ' if confirming else ''}calibration samples", runtime=self.runtime, metric=self.metric)
        return reference.validate(model, tolerance_of, label, temperature=self.temperature, runtime=self.runtime)


def _describe_feeds(source: InputSource, samples: int, limit: int | None) -> str:
    text = source.describe()
    if limit is not None and samples >= limit:
        text += f" (validated on the first {limit} samples)"
    return text


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
    samples: int = DEFAULT_SYNTHETIC_SAMPLES,
    seed: int = 0,
    dims: dict[str, int] | None = None,
    int_range: tuple[int, int] | None = None,
    temperature: float = 1.0,
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    report_path: str | os.PathLike[str] | None = None,
    markdown_path: str | os.PathLike[str] | None = None,
    overwrite_input: bool = False,
    keep_worse: bool = False,
    external_data: bool | None = None,
    progress: ProgressCallback | None = None,
    metric: TaskMetric | MetricFunction | str | None = None,
    measure_speed: bool = True,
) -> RunReport:
    """Load ``input_path``, run the pipeline (text, pass objects, or a TOML ``recipe``) under
    validation, write ``output_path`` atomically (None: run and report only), and return the report.

    Validation runs on ``inputs``, which must not share a sample with ``calibration``; without
    ``inputs``, on a seeded share of ``calibration`` held out of every fit (``seed``); without either,
    on ``samples`` seeded synthetic samples (``dims``, ``int_range``).

    Nothing the run reads (the model, its external data, the recipe, input files) is ever
    overwritten by what it writes (model, report, Markdown), unless ``overwrite_input`` allows the
    output model to replace the input model itself. The model, its external data and the reports are
    written together at the end, or none of them (a full disk, a model that does not verify); only
    the reports are written when a pass fails under policy ``raise``. ``external_data``: None keeps
    the input's layout (external data in, external data out; by size otherwise), True/False forces.
    ``metric``: the user's task metric (a function, or ``module:function`` / ``file.py:function``; see
    :class:`TaskMetric`), judged beside the tolerances by every guard, step and the final validation.
    ``measure_speed=False``: no step is timed or judged worse for its speed (see :class:`PassManager`).
    """
    passes, tolerances, policy, recipe_metric = _resolve_pipeline(pipeline, recipe, tolerances, policy)
    written_paths = [p for p in (output_path, report_path, markdown_path) if p is not None]
    read_paths = [recipe, *paths_in(inputs), *paths_in(calibration)]
    check_output_paths(written_paths, read_paths, model=Path(input_path), overwrite_model=overwrite_input and output_path is not None)
    # A model with external data keeps it there: the store (beside the output) takes a copy of its
    # files and holds what the passes write, so no message ever holds the weights.
    with WeightStore(Path(output_path).parent.resolve() if output_path is not None else None) as weights:
        phase = time.perf_counter()
        model, info = load_with_info(input_path, max_input_bytes=max_input_bytes, weights=weights)
        log.info("loaded %s (%d bytes, %d nodes) and checked it in %.1f s", input_path, info.file_bytes, len(model.graph.node), time.perf_counter() - phase)
        model_folder = Path(input_path).resolve().parent
        protected = [*(model_folder / name for name in info.external_data_files), *(p for p in read_paths if p is not None)]
        check_output_paths(written_paths, protected)
        if not overwrite_input:
            protected.append(Path(input_path))
        manager = PassManager(
            passes,
            inputs=None if inputs is None else resolve_inputs(inputs, model, max_input_bytes=max_input_bytes),
            calibration=None if calibration is None else resolve_inputs(calibration, model, max_input_bytes=max_input_bytes),
            fallback_inputs=_synthetic_inputs(model, inputs, calibration, samples=samples, seed=seed, dims=dims, int_range=int_range,
                                              max_input_bytes=max_input_bytes),
            held_out_seed=seed,
            keep_worse=keep_worse,
            tolerances=tolerances.checked([o.name for o in model.graph.output], [p.name for p in passes]),
            policy=policy,
            temperature=temperature,
            progress=progress,
            metric=task_metric(metric if metric is not None else recipe_metric),
            measure_speed=measure_speed,
        )
        # Held for the whole run: a second run writing the same output fails now, not after its work.
        outputs = _Outputs(output_path, report_path, markdown_path, tuple(Path(p) for p in protected), _layout(external_data, info))
        with OutputLock(written_paths):
            try:
                final, report = manager.run(model, label=str(input_path), info=info)
            except (PassFailed, ValidationFailed):
                outputs.publish(None, manager.report)  # the reports say why; there is no model to write
                raise
            phase = time.perf_counter()
            outputs.publish(final, report)
            log.info("wrote %s in %.1f s (staged, verified, renamed)", ", ".join(str(p) for p in written_paths) or "nothing", time.perf_counter() - phase)
        return report


def validate(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    *,
    inputs: InputSpec = None,
    tolerance: Tolerance | None = None,
    tolerances: Tolerances | None = None,
    samples: int = DEFAULT_SYNTHETIC_SAMPLES,
    seed: int = 0,
    dims: dict[str, int] | None = None,
    int_range: tuple[int, int] | None = None,
    temperature: float = 1.0,
    max_samples: int | None = VALIDATION_SAMPLES,
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    metric: TaskMetric | MetricFunction | str | None = None,
) -> ValidationResult:
    """Run both models on the same inputs in onnxruntime and compare the candidate with the reference
    (``onnxsparse.validate``, the ``validate`` command).

    ``max_samples``: the validation samples compared, the first ones (None: all).
    ``max_input_bytes``: the most an input file, a synthetic feed or a model's densified sparse
    tensors may unpack to (see ``onnxsparse.limits``)."""
    with WeightStore() as weights:  # external data stays out of the messages (see weightstore.py)
        original = load(reference, max_input_bytes=max_input_bytes, weights=weights)
        other = load(candidate, max_input_bytes=max_input_bytes, weights=weights)
        source = resolve_inputs(inputs, original, samples=samples, seed=seed, dims=dims, int_range=int_range, max_input_bytes=max_input_bytes)
        feeds = collect_feeds(first_samples(source, original, max_samples), original, extras=metric is not None)
        chosen = (tolerances or Tolerances(default=tolerance)).checked([o.name for o in original.graph.output])
        outputs = Reference.of(original, feeds, str(reference), metric=task_metric(metric))
        return outputs.validate(other, lambda name: chosen.for_output(name, None, EXACT), str(candidate), temperature=temperature)


validate_files = validate  # the name it had (and the CLI imports)


def task_metric(metric: TaskMetric | MetricFunction | str | None) -> TaskMetric | None:
    """The user's metric as given to :func:`optimize`: an object, a function, or where to import it from."""
    if metric is None or isinstance(metric, TaskMetric):
        return metric
    return TaskMetric.load(metric) if isinstance(metric, str) else TaskMetric(metric)


def _synthetic_inputs(model: onnx.ModelProto, inputs: InputSpec, calibration: InputSpec, **settings: Any) -> InputSource | None:
    """The seeded synthetic inputs validation falls back on without real ones: None when the user gave
    validation inputs; not an error, when calibration data was given, if the model's declared inputs
    are too large to synthesise (the calibration data will serve)."""
    if inputs is not None:
        return None
    try:
        return resolve_inputs(None, model, **settings)
    except InputDataError:
        if calibration is None:
            raise
        return None


def paths_in(spec: InputSpec) -> list[Path]:
    if isinstance(spec, (str, os.PathLike)):
        return [Path(spec)]
    if isinstance(spec, (list, tuple)) and all(isinstance(item, (str, os.PathLike)) for item in spec):
        return [Path(item) for item in spec]
    return []


def check_output_paths(written: list, read: list, *, model: Path | None = None, overwrite_model: bool = False) -> None:
    """Before any work: outputs must not replace what the run reads, nor each other. Only the
    output model (written[0]) may replace the input ``model``, and only with ``overwrite_model``."""
    for index, target in enumerate(written):
        if model is not None and same_file(target, model) and not (overwrite_model and index == 0):
            raise OutputPathError(f"{target}: output path is the input model; choose another output path")
        for source in read:
            if source is not None and same_file(target, source):
                raise OutputPathError(f"{target}: would overwrite {source}, which this run reads; choose another path")
        for other in written[index + 1 :]:
            if same_file(target, other):
                raise OutputPathError(f"{target}: given for two outputs; choose different paths")
        folder = Path(target).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise OutputPathError(f"{target}: folder {folder} does not exist or is not writable")


def _layout(external_data: bool | None, info: LoadInfo) -> bool | None:
    """The caller's choice, else the input's: a model read with external data is written with it."""
    if external_data is not None:
        return external_data
    return True if info.external_data_files else None


@dataclass(frozen=True)
class _Outputs:
    """What a run writes, staged together and renamed into place only when every part is written."""

    model_path: str | os.PathLike[str] | None
    report_path: str | os.PathLike[str] | None
    markdown_path: str | os.PathLike[str] | None
    protect: tuple[Path, ...]
    external_data: bool | None  # None: by size

    def publish(self, model: onnx.ModelProto | None, report: RunReport | None) -> None:
        if report is None:  # the run failed before it had anything to report
            return
        with Staging() as staging:
            if model is not None and self.model_path is not None:
                target = checked_output_path(self.model_path, self.protect)
                size = stage_model(model, target, staging, protect=self.protect, external_data=self.external_data, standard=report.standard)
                report.output_path = str(target)
                report.output.source = str(target)  # type: ignore[union-attr]
                report.output.file_bytes = size  # type: ignore[union-attr]
            if self.report_path is not None:
                if Path(self.report_path).suffix.lower() in (".html", ".htm"):
                    from .htmlpage import render_run  # here: only an HTML report needs it (and the html module)

                    staging.write_text(self.report_path, render_run(report))
                else:
                    staging.write_text(self.report_path, report.to_json())
            if self.markdown_path is not None:
                staging.write_text(self.markdown_path, report.to_markdown())
            staging.commit()


def _resolve_pipeline(
    pipeline: str | Sequence[Pass] | None,
    recipe: str | os.PathLike[str] | None,
    tolerances: Tolerances | None,
    policy: Policy | None,
) -> tuple[list[Pass], Tolerances, Policy, str | None]:
    """The passes, tolerances and policy to run (a recipe's where not given), and the recipe's metric."""
    if (pipeline is None) == (recipe is None):
        raise PipelineSpecError("give exactly one of a pipeline (-p) or a recipe (--recipe)")
    if recipe is not None:
        loaded = load_recipe(recipe)
        return loaded.passes, tolerances or loaded.tolerances, policy or loaded.policy, loaded.metric  # type: ignore[return-value]
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)  # type: ignore[arg-type]
    for item in passes:
        if not isinstance(item, Pass):
            raise PipelineSpecError(f"pipeline item {item!r} is not a Pass")
    return passes, tolerances or Tolerances(), policy or "rollback", None

