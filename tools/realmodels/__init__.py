"""Real trained models exported to ONNX, with their task data and task metrics.

``tools/fetch_models.py`` builds the cache; this package reads it. Importing the package needs only
the standard library (the fetch script uses it before anything is installed); ``load_task`` and
``Task`` need numpy and onnxruntime and are imported on first use.

    from realmodels import available_models, load_task
    task = load_task("mobilenetv2")
    print(task.evaluate_model("candidate.onnx"))   # candidate vs the fp32 model, on the eval split
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .paths import CACHE_ENV, FETCH_COMMAND, MODEL_FILES, MODEL_NAMES, available_models, cache_dir, is_present, model_dir

if TYPE_CHECKING:
    from .tasks import Task, load_task

__all__ = [
    "CACHE_ENV",
    "FETCH_COMMAND",
    "MODEL_FILES",
    "MODEL_NAMES",
    "Task",
    "available_models",
    "cache_dir",
    "is_present",
    "load_task",
    "model_dir",
]


def __getattr__(name: str) -> Any:
    # Lazy: keeps ``import realmodels`` free of numpy for the fetch script (PEP 562).
    if name in ("Task", "load_task"):
        from . import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'realmodels' has no attribute {name!r}")
