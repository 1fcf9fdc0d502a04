"""The passes: one module per pass family, each registering its passes by name.

To add a pass, copy ``cleanup.py`` (the smallest), rename the class and its ``name``, and add the
name and module to ``BUILT_IN`` below (a pass's module is imported when the pass is first asked
for). Third-party packages register passes through the ``onnxsparse.passes`` entry-point group.
"""

import importlib
from collections.abc import Iterable

from . import base
from .base import (
    ENTRY_POINT_GROUP,
    Change,
    Pass,
    PassContext,
    PassResult,
    Requirement,
    Skip,
)

# The built-in passes by name -> their module in this package, imported when the pass is first asked
# for: a run imports only the passes its pipeline names (all of them cost 0.1 s of every command's start).
BUILT_IN: dict[str, str] = {
    "channel-prune": "channel_prune",
    "cleanup": "cleanup",
    "cluster": "cluster",
    "distill": "distill",
    "fold-batchnorm": "fold_batchnorm",
    "fp16": "fp16",
    "magnitude-prune": "magnitude",
    "mixed-precision": "mixed_precision",
    "qdq": "qdq",
    "simplify": "simplify",
    "sparse-encode": "sparse_encode",
    "weight-only": "weight_only",
}


def _import_built_in(names: Iterable[str]) -> None:
    for name in names:
        module = BUILT_IN.get(name)
        if module is not None:
            importlib.import_module(f"{__name__}.{module}")  # its @register fills the registry


def pass_class(name: str) -> type[Pass]:
    """The pass registered as ``name``, or an error listing the known ones (built-in passes are
    imported first, plugins after them)."""
    _import_built_in([name] if name in BUILT_IN else BUILT_IN)  # an unknown name: the error lists every pass
    return base.pass_class(name)


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name`` (a built-in pass's name is taken, and
    says so here, not at a later lookup)."""
    _import_built_in([cls.name] if cls.name in BUILT_IN else [])
    return base.register(cls)


def registered_passes() -> dict[str, type[Pass]]:
    """Every known pass by name, plugins included, sorted by name."""
    _import_built_in(BUILT_IN)
    return base.registered_passes()


def list_passes() -> dict[str, type[Pass]]:
    """Every available pass by name (built-in and plugins)."""
    return registered_passes()


__all__ = [
    "BUILT_IN",
    "ENTRY_POINT_GROUP",
    "Change",
    "Pass",
    "PassContext",
    "PassResult",
    "Requirement",
    "Skip",
    "list_passes",
    "pass_class",
    "register",
    "registered_passes",
]
