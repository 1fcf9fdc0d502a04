"""onnxsparse: make an exported ONNX model smaller and faster, and prove what it cost in accuracy.

The public API::

    import onnxsparse
    report = onnxsparse.optimize("model.onnx", "small.onnx", "cleanup,fold-batchnorm")
    model = onnxsparse.load("model.onnx")
    result = onnxsparse.validate("model.onnx", "small.onnx")
    onnxsparse.list_passes()
"""

from __future__ import annotations

from .errors import OnnxsparseError
from .io import load, save
from .passes import Pass, PassContext, PassResult, register, registered_passes
from .pipeline import PassManager, optimize
from .pipeline import validate_files as validate
from .report import RunReport
from .spec import format_pipeline, load_recipe, parse_pipeline
from .validate import EXACT, Tolerance, Tolerances, ValidationResult
from .version import __version__ as __version__


def list_passes() -> dict[str, type[Pass]]:
    """Every available pass by name (built-in and plugins)."""
    return registered_passes()


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
