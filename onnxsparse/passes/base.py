"""The pass contract: a small frozen dataclass whose fields are its options, registered by name.

A pass receives a private copy of the model (the manager cloned it), edits or replaces it, and
returns a :class:`PassResult` saying what it changed, what it skipped and why, and the figures that
matter to it. It never writes into an array it did not create: weights read through
:func:`onnxsparse.graph.tensor_array` are read-only, so such a bug fails loudly.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from importlib import metadata
from typing import Any, ClassVar

import onnx

from ..calibration import InputSource
from ..errors import PipelineSpecError
from ..results import Change, PassResult, Skip  # the records a pass fills, part of its contract: a pass imports them from here
from ..runtime import Runtime
from ..text import did_you_mean
from ..validation import EXACT, Tolerance, ValidationResult, with_score_bounds
from .options import converted_options, format_pass

log = logging.getLogger(__name__)

__all__ = ["ENTRY_POINT_GROUP", "Change", "Pass", "PassContext", "PassResult", "Requirement", "Skip", "did_you_mean", "pass_class", "register",
           "registered_passes"]

ENTRY_POINT_GROUP = "onnxsparse.passes"


class Requirement(enum.Enum):
    """What a pass may need the manager to provide before it runs."""

    SHAPES = "shapes"  # value_info filled by shape inference
    CALIBRATION = "calibration"  # representative inputs to run the model on


@dataclass
class PassContext:
    """What the manager provides to a pass, according to its ``requires``.

    ``validate`` compares a candidate with the original model under this step's tolerance (a
    pass that searches, like the quantizer's accuracy guard, uses it); ``progress`` reports
    (label, done, total) of long work; ``runtime`` makes a model's onnxruntime session once per
    run (a pass that times or runs a model the manager will run too asks it, not onnxruntime)."""

    calibration: InputSource | None = None
    validate: Callable[[onnx.ModelProto], ValidationResult] | None = None
    # The same judgement on calibration samples ``validate`` never sees (None: the set has no others): a
    # pass that searched many trials against ``validate`` checks its choice here, since the choice is
    # fitted to those samples a little.
    confirm: Callable[[onnx.ModelProto], ValidationResult | None] | None = None
    progress: Callable[[str, int, int], None] | None = None
    runtime: Runtime | None = None
    original: onnx.ModelProto | None = None  # the run's input model, as a teacher (distill); never edited
    # What a pass times models on: the run's validation inputs when it has no calibration, so that a
    # timing without calibration data runs at the user's --dims (not a synthetic default shape).
    timing: InputSource | None = None
    # Whether an earlier lossy step changed the model this pass gets (its drift from the original then
    # counts against this step's tolerance too): qdq's choice of mode then weighs its own drift.
    after_lossy: bool = False

    def timing_inputs(self) -> InputSource | None:
        """The inputs to time on: the calibration data, else :attr:`timing`."""
        return self.calibration if self.calibration is not None else self.timing


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses registered with :func:`register`.

    Class attributes: ``name`` (the registry key, e.g. ``fold-batchnorm``), ``requires`` (what the
    manager must provide), ``preserves`` (analyses the pass keeps valid), ``default_tolerance``
    (how far outputs may move when the user sets no tolerance: exact passes keep :data:`EXACT`).
    Option fields take ``metadata={"help": "..."}``.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[Requirement]] = frozenset()
    preserves: ClassVar[frozenset[Requirement]] = frozenset()
    default_tolerance: ClassVar[Tolerance] = EXACT
    must_be_last: ClassVar[bool] = False  # an encoding for the file on disk (sparse-encode)
    # True for passes whose rewrites can make onnxruntime faster or slower (new op types, changed
    # shapes): the manager times each such step against its input and rolls back one that ran slower.
    may_change_speed: ClassVar[bool] = False
    # True for a pass that moves the model back toward the original (distill): a lossy step right
    # before it that breaks its tolerance is judged again after it, and kept if the two together hold.
    recovers: ClassVar[bool] = False
    # True for a lossy pass whose default tolerance also bounds the labels read from class scores:
    # a cosine bound alone let a byte classifier through at 0.923 label agreement (-3.8 points of
    # accuracy), and PP-OCRv4 int8 variants reading 0.69 of their lines unchanged.
    bounds_labels: ClassVar[bool] = False

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        raise NotImplementedError

    def needs(self) -> frozenset[Requirement]:
        """What this instance needs; options can add to the class's ``requires`` (wanda needs data)."""
        return self.requires

    def fits_on_calibration(self) -> bool:
        """Whether the pass chooses anything by calibration data when there is some: what it needs, or
        uses when given (qdq's dynamic mode, whose guard judges its trials on calibration samples). The
        manager then keeps those samples out of the verdict, and reports what the pass fitted on."""
        return Requirement.CALIBRATION in self.needs()

    def tolerance(self) -> Tolerance:
        """The tolerance used when the user sets none; options may make a pass exact (zero-only)."""
        return self.default_tolerance

    def score_tolerance(self) -> Tolerance:
        """The tolerance of the class-score outputs labels are read from (validation.label_outputs) when
        the user sets none: a lossy pass that sets ``bounds_labels`` bounds what is read there too."""
        return with_score_bounds(self.tolerance()) if self.bounds_labels else self.tolerance()

    @classmethod
    def summary(cls) -> str:
        """The first paragraph of the pass's docstring, on one line."""
        first = (cls.__doc__ or "").strip().split("\n\n")[0]
        return " ".join(first.split())

    def spec(self) -> str:
        """The pass as pipeline text (non-default options only); parses back to an equal pass."""
        return format_pass(self)


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Pass]] = {}
_entry_points_loaded = False

def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name``."""
    # Checked on the class itself: a subclass of a dataclass that is not decorated inherits the flag,
    # and its own fields would then be plain class attributes that no option parser can see.
    params = cls.__dict__.get("__dataclass_params__")
    if params is None or not params.frozen:
        raise TypeError(f"pass {cls.__name__} must be a frozen dataclass")
    if not cls.name:
        raise TypeError(f"pass {cls.__name__} has no name")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise TypeError(f"pass name '{cls.name}' is taken by {existing.__module__}.{existing.__name__}")
    _check_options_when_built(cls)
    _REGISTRY[cls.name] = cls
    return cls


def _check_options_when_built(cls: type[Pass]) -> None:
    """Make ``cls(...)`` check its options as the pipeline text does, before the pass's own
    ``__post_init__`` sees them: from Python too, a value of the wrong type or outside a Literal's
    choices (``criterion="L1"``) and an unknown option are a PipelineSpecError naming the pass and
    the option, never a silent default or a bare TypeError."""
    generated = cls.__init__
    names = [f.name for f in fields(cls) if f.init]

    @functools.wraps(generated)
    def checked_init(self: Pass, *args: Any, **kwargs: Any) -> None:
        if type(self) is cls:  # a subclass checks its own options
            if len(args) > len(names):
                raise PipelineSpecError(f"{cls.name}: takes {len(names)} options, {len(args)} given in order")
            given = dict(zip(names, args))
            unknown = sorted(set(kwargs) - set(names)) + sorted(set(kwargs) & set(given))
            if unknown:
                hint = did_you_mean(unknown[0], names) if len(unknown) == 1 else ""
                raise PipelineSpecError(f"{cls.name}: unknown or repeated option(s) {', '.join(unknown)}{hint}; valid options: {', '.join(names) or 'none'}")
            args, kwargs = (), converted_options(cls, {**given, **kwargs})
        try:
            generated(self, *args, **kwargs)
        except TypeError as error:  # an option without a default was not given
            raise PipelineSpecError(f"{cls.name}: {error}; valid options: {', '.join(names) or 'none'}") from None
        except ValueError as error:  # the pass's own __post_init__ rejects a value or a combination
            raise PipelineSpecError(f"{cls.name}: {error}") from None

    cls.__init__ = checked_init  # type: ignore[method-assign,assignment]


def _load_entry_points() -> None:
    """Third-party passes: packages declare ``[project.entry-points."onnxsparse.passes"]``."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except Exception as error:  # noqa: BLE001 - a broken plugin must not break the built-in passes
            log.warning("pass plugin %s could not be loaded: %s", entry_point.value, error)
            continue
        for cls in loaded if isinstance(loaded, Iterable) else [loaded]:
            if isinstance(cls, type) and issubclass(cls, Pass) and cls.name not in _REGISTRY:
                register(cls)


def pass_class(name: str) -> type[Pass]:
    """The pass registered as ``name``, or an error listing the known ones."""
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise PipelineSpecError(f"unknown pass '{name}'{did_you_mean(name, _REGISTRY)}; known passes: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_passes() -> dict[str, type[Pass]]:
    """Every known pass by name, plugins included, sorted by name."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))
