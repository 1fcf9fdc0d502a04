"""onnxsparse: make an exported ONNX model smaller and faster, and prove what it cost in accuracy.

The public API::

    import onnxsparse
    report = onnxsparse.optimize("model.onnx", "small.onnx", "cleanup,fold-batchnorm")
    model = onnxsparse.load("model.onnx")
    result = onnxsparse.validate("model.onnx", "small.onnx")
    onnxsparse.list_passes()
"""

from __future__ import annotations

import os

from .calibration import DEFAULT_SYNTHETIC_SAMPLES, InputSpec, collect_feeds, resolve_inputs
from .errors import OnnxsparseError
from .io import load, save
from .limits import DEFAULT_MAX_INPUT_BYTES
from .passes import Pass, PassContext, PassResult, register, registered_passes
from .pipeline import PassManager, optimize
from .report import RunReport
from .spec import format_pipeline, load_recipe, parse_pipeline
from .validate import EXACT, Reference, Tolerance, Tolerances, ValidationResult

__version__ = "0.1.0"


def list_passes() -> dict[str, type[Pass]]:
    """Every available pass by name (built-in and plugins)."""
    return registered_passes()


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
    max_feeds: int | None = 64,
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
) -> ValidationResult:
    """Run both models on the same inputs in onnxruntime and compare the candidate with the reference.

    ``max_input_bytes``: the most an input file, a synthetic feed or a model's densified sparse
    tensors may unpack to (see ``onnxsparse.limits``)."""
    original, other = load(reference, max_input_bytes=max_input_bytes), load(candidate, max_input_bytes=max_input_bytes)
    source = resolve_inputs(inputs, original, samples=samples, seed=seed, dims=dims, int_range=int_range, max_input_bytes=max_input_bytes)
    feeds = collect_feeds(source, original, limit=max_feeds)
    chosen = (tolerances or Tolerances(default=tolerance)).checked([o.name for o in original.graph.output])
    outputs = Reference.of(original, feeds, str(reference))
    return outputs.validate(other, lambda name: chosen.for_output(name, None, EXACT), str(candidate), temperature=temperature)


__all__ = [
    "EXACT",
    "OnnxsparseError",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "RunReport",
    "Tolerance",
    "Tolerances",
    "ValidationResult",
    "format_pipeline",
    "list_passes",
    "load",
    "load_recipe",
    "optimize",
    "parse_pipeline",
    "register",
    "save",
    "validate",
]
