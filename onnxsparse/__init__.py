"""onnxsparse: make an exported ONNX model smaller and faster, and prove what it cost in accuracy.

The public API::

    import onnxsparse
    report = onnxsparse.optimize("model.onnx", "small.onnx", "cleanup,fold-batchnorm")
    model = onnxsparse.load("model.onnx")
    result = onnxsparse.validate("model.onnx", "small.onnx")
    best = onnxsparse.tune("model.onnx", "fast.onnx", budget="min_top1=0.95", calibration="c.npz")
    onnxsparse.list_passes()
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__

# Each public name and the module that defines it. They are imported on first use: onnx alone takes
# 0.6 s to import, and neither `import onnxsparse` nor `onnxsparse --version` should pay for it.
_API = {
    "EXACT": "validation", "Tolerance": "validation", "Tolerances": "validation", "ValidationResult": "validation",
    "OnnxsparseError": "errors",
    "load": "io", "save": "io",
    "Pass": "passes", "PassContext": "passes", "PassResult": "passes", "register": "passes", "list_passes": "passes",
    "PassManager": "pipeline", "optimize": "pipeline", "validate": "pipeline",  # the file-level comparison (the module is `validation`)
    "tune": "tuner", "TuneResult": "tuner",
    "RunReport": "report",
    "format_pipeline": "spec", "load_recipe": "spec", "parse_pipeline": "spec",
    # reachable from the package before it became lazy, kept so: not part of __all__
    "resolve_inputs": "calibration", "collect_feeds": "calibration", "InputSpec": "calibration", "Reference": "validation",
    "registered_passes": "passes", "DEFAULT_SYNTHETIC_SAMPLES": "limits", "DEFAULT_MAX_INPUT_BYTES": "limits",
}  # fmt: skip

if TYPE_CHECKING:
    from .errors import OnnxsparseError
    from .io import load, save
    from .passes import Pass, PassContext, PassResult, list_passes, register
    from .pipeline import PassManager, optimize, validate
    from .report import RunReport
    from .spec import format_pipeline, load_recipe, parse_pipeline
    from .tuner import TuneResult, tune
    from .validation import EXACT, Tolerance, Tolerances, ValidationResult


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: onnxsparse.spec after `import onnxsparse`
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'onnxsparse' has no attribute '{name}'")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
    "TuneResult",
    "ValidationResult",
    "format_pipeline",
    "list_passes",
    "load",
    "load_recipe",
    "optimize",
    "parse_pipeline",
    "register",
    "save",
    "tune",
    "validate",
]
