"""The per-pass and per-run report: JSON for machines, Markdown for people."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .files import write_text_atomically  # noqa: F401 - it lived here: still reachable from report
from .inspect_model import ModelSummary
from .passes import Change, Skip
from .validation import ValidationResult

COMMITTED = "committed"
NO_CHANGE = "no-change"  # the pass changed nothing; the reason says why (pins, weights it could not reach)
ROLLED_BACK = "rolled-back"  # crashed, invalid model, or tolerance broken
WORSE = "worse"  # rolled back: larger on disk and not faster, or slower, than its input
KEPT_FAILING = "kept-failing"  # tolerance broken, kept because the policy is "keep"
KEPT_WORSE = "kept-worse"  # worse, kept because the caller asked to keep such steps
RECOVERED = "recovered"  # out of tolerance alone, within it after the recovery step that follows (distill)
PENDING = "pending"  # out of tolerance, judged again after the recovery step that follows (never final)
KEPT = (COMMITTED, KEPT_FAILING, KEPT_WORSE, RECOVERED)  # the statuses whose model the next step starts from


@dataclass
class StepReport:
    pass_name: str
    spec: str
    status: str = COMMITTED
    reason: str = ""
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    validation: ValidationResult | None = None  # against the original model
    step_validation: ValidationResult | None = None  # an exact pass after a lossy one: against the model it was given
    standard: bool = True  # False: deliberately non-standard ONNX (checked in onnxruntime only)
    fitted_on: str = ""  # the calibration samples the pass could fit on ("" when it takes none)
    judged_on: str = ""  # the samples its verdict was computed on


@dataclass
class RunReport:
    pipeline: str
    policy: str
    inputs: str
    input: ModelSummary
    calibration: str = ""  # what the passes fitted on (the part of the calibration data not held out)
    output: ModelSummary | None = None
    output_path: str | None = None
    steps: list[StepReport] = field(default_factory=list)
    final_validation: ValidationResult | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    standard: bool = True

    @property
    def rolled_back(self) -> list[StepReport]:
        """Steps asked for and not kept: they broke, broke the tolerance, or made the model worse."""
        return [step for step in self.steps if step.status in (ROLLED_BACK, WORSE)]

    def to_dict(self, *, tensors: bool = False) -> dict[str, Any]:
        data = json_ready(dataclasses.asdict(self))
        if not tensors:
            for summary in (data["input"], data.get("output")):
                if summary:
                    summary.pop("tensors", None)
        return data

    def to_json(self, *, tensors: bool = False) -> str:
        return json.dumps(self.to_dict(tensors=tensors), indent=2)

    def to_markdown(self) -> str:
        lines = [f"# onnxsparse report: `{self.pipeline}`", ""]
        lines += [f"- input: `{self.input.source}` ({self.input.file_bytes:,} bytes, {self.input.nodes} nodes, {self.input.parameters:,} parameters)"]
        if self.output is not None:
            lines += [f"- output: `{self.output_path}` ({self.output.file_bytes:,} bytes, {self.output.nodes} nodes, {self.output.parameters:,} parameters)"]
        lines += [f"- validated on: {self.inputs}"]
        if self.calibration:
            lines += [f"- passes fitted on: {self.calibration}"]
        lines += [f"- failure policy: {self.policy}; total {self.seconds:.2f} s", ""]
        lines += ["| pass | status | changes | skipped | worst output | run s | validate s |", "|---|---|---|---|---|---|---|"]
        for step in self.steps:
            lines.append(
                f"| `{step.spec}` | {step.status} | {len(step.changes)} | {len(step.skipped)} | "
                f"{worst_output(step.validation)} | {step.seconds.get('run', 0):.3f} | {step.seconds.get('validate', 0):.3f} |"
            )
        for step in self.steps:
            if step.reason:
                lines += ["", f"**{step.pass_name}** {step.status}: {step.reason}"]
        for warning in self.warnings:
            lines += ["", f"> {warning}"]
        return "\n".join(lines) + "\n"


def worst_output(validation: ValidationResult | None) -> str:
    """A one-cell summary of the output that moved most (by scale-relative max error)."""
    if validation is None:
        return "-"
    compared = [o for o in validation.outputs if o.compared]
    if not compared:
        return "not compared"
    floats = [o for o in compared if o.cosine is not None] or compared
    worst = max(floats, key=lambda o: o.max_rel or 0.0)
    text = f"{worst.name}: rel {worst.max_rel:.2g}"
    if worst.cosine is not None:
        text += f", cos {worst.cosine:.6f}"
    if worst.agreement is not None:
        text += f", equal {worst.agreement:.3f}"
    if worst.top1 is not None:
        text += f", top1 {worst.top1:.3f}"
    if worst.sequence_agreement is not None:
        text += f", same read {worst.sequence_agreement:.3f} (drop {worst.sequence_drop:.3g})"
    if validation.metric is not None:
        text += f", metric {validation.metric.value:.4g}"
    return text


def json_ready(value: Any) -> Any:
    """JSON-safe: non-finite floats become strings ("inf"), mappings and tuples plain containers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_ready(value.item())
    return value
