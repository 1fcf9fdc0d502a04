"""What a pass (or a step of one, such as a refit) reports: the things it changed, the things it
looked at and left alone with the reason, its figures and warnings. Plain records, below every
module that fills them, so that a helper such as the refit can report without importing the pass
contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx


@dataclass(frozen=True)
class Change:
    """One thing a pass changed: a tensor, a node, a group of channels."""

    target: str
    action: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """One thing a pass looked at and left alone, with the reason (every skip has one)."""

    target: str
    reason: str


@dataclass
class PassResult:
    """What a pass hands back to the manager."""

    model: onnx.ModelProto
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # numbers and text; a scan's table per tensor or group
    warnings: list[str] = field(default_factory=list)
    # False when the model deliberately leaves the ONNX standard (onnxruntime loads it, the checker
    # does not): the manager then checks it by loading it in onnxruntime only, and says so.
    standard: bool = True
    # Why the pass handed back its input because its own result was worse (ran slower): the step is
    # then reported as "worse", like one the manager rolls back, not as a pass that found nothing to do.
    worse: str = ""
    # The pass's own timing of its model against its input (one thread, interleaved, as the manager
    # times a step), when it took one: the manager judges the step's speed on it, not on a second timing.
    latency_vs_input: float | None = None
