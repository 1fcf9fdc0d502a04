"""The passes: one module per pass family, each registering its passes by name.

To add a pass, copy ``cleanup.py`` (the smallest), rename the class and its ``name``, and import the
module below. Third-party packages register passes through the ``onnxsparse.passes`` entry-point group.
"""

from . import channel_prune, cleanup, cluster, distill, fold_batchnorm, fp16, magnitude, qdq, simplify, sparse_encode, weight_only  # noqa: E402,F401  (registers the built-in passes)
from .base import (
    ENTRY_POINT_GROUP,
    Change,
    Pass,
    PassContext,
    PassResult,
    Requirement,
    Skip,
    pass_class,
    register,
    registered_passes,
)


def list_passes() -> dict[str, type[Pass]]:
    """Every available pass by name (built-in and plugins)."""
    return registered_passes()


__all__ = [
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
