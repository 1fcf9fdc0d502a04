"""What the tuner knows of each candidate (:class:`Record`) and of the whole search (:class:`TuneResult`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .candidates import Objective

WITHIN, OVER, UNCHANGED, FAILED, DUPLICATE = "within", "over", "unchanged", "failed", "duplicate"
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class Record:
    """What one candidate is, and what it measured."""

    pipeline: str
    family: str
    rung: int = 0
    status: str = FAILED
    reason: str = ""
    file: str = ""  # its model, in the cache folder
    report: str = ""  # its run's JSON report, beside it
    bytes: int = 0
    size_ratio: float | None = None  # file bytes over the input's
    quality: float | None = None  # what the budget bounds (see _quality): higher is better
    worst: str = ""  # the output that moved most, in words
    steps: list[dict[str, Any]] = field(default_factory=list)
    build_seconds: float = 0.0
    peak_memory: int | None = None  # bytes: the build's process at its peak (None: built beside other work)
    machine: str = ""  # where the latencies below were measured
    latency_estimate: float | None = None  # one thread, short interleaved timing, over the input's time
    latency: float | None = None  # one thread, long interleaved timing (finalists)
    latency_all_cores: float | None = None  # onnxruntime's default threads (finalists)
    digest: str = ""  # of the model it wrote (file and data)
    duplicate_of: str = ""  # the earlier pipeline that wrote the same model
    status_as_built: str = ""  # a duplicate's own verdict (within/over), for its ladder
    reused: bool = False  # read from the cache, not built in this run
    peer: bool = False  # onnxruntime's quantizer: a reference point, never chosen

    def objective(self, objective: Objective) -> float | None:
        """Where it stands on ``objective``, over the input: size, or latency (the long timing when it
        has one, else the estimate)."""
        if objective == "size":
            return self.size_ratio
        return self.latency if self.latency is not None else self.latency_estimate


@dataclass
class TuneResult:
    objective: Objective
    budget: str
    quality_label: str
    input: str
    input_bytes: int
    records: list[Record]
    chosen: Record | None
    output: str | None
    seconds: float = 0.0
    cache: str = ""
    warnings: list[str] = field(default_factory=list)
    executor: str = ""  # where the candidates were built and timed
    layers: list[dict[str, str]] = field(default_factory=list)  # what each step of the chosen pipeline did, node by node
    sensitivity: list[dict[str, Any]] = field(default_factory=list)  # int8: each node's error alone (qdq{sensitivity=true})
    held_budget: bool = False  # some candidate of ours (not onnxruntime's) held the budget

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
