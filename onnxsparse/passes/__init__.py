"""The passes: one module per pass family, each registering its passes by name.

To add a pass, copy ``cleanup.py`` (the smallest), rename the class and its ``name``, and add the
name and module to ``BUILT_IN`` in ``base.py`` (a pass's module is imported when the pass is first
asked for). Third-party packages register passes through the ``onnxsparse.passes`` entry-point group.
"""

from .base import (
    BUILT_IN,
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
