"""Training ONNX graphs with PyTorch's autograd: the engine under distillation.

``GraphModule(model)`` runs a model's ONNX graph as torch operations, one rule per op
(:mod:`onnxsparse.train.ops`), with its float weights (initializers and Constant-node values) as
``torch.nn.Parameter``s keyed by their ONNX names; ``write_back`` puts trained values into a copy of
the same graph, everything else unchanged. torch is an optional extra (``pip install
'onnxsparse[train]'``): nothing outside this package imports it, and this package imports it only
when a module is built.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import RequirementError

TORCH_REQUIREMENT = "torch==2.13.0"


def require_torch() -> ModuleType:
    """torch, or a RequirementError that says how to get it."""
    try:
        return importlib.import_module("torch")
    except ImportError as error:
        raise RequirementError(
            f"training needs PyTorch, which is not installed: pip install 'onnxsparse[train]' (or pip install {TORCH_REQUIREMENT})"
        ) from error
