"""Pipelines as text and as TOML recipes.

Text: ``cleanup,magnitude-prune{sparsity=0.5 include=Conv,Gemm}``. Passes are separated by commas at
the top level; options sit in braces, separated by spaces; a list option is comma-separated; a value
with spaces or special characters is quoted. :func:`format_pipeline` writes the same form back, with
only the options that differ from their defaults, so ``parse(format(p)) == p``.

Recipe (TOML)::

    policy = "rollback"                      # or "raise", "keep"
    [tolerance]                              # global
    min_cosine = 0.999
    [tolerance.outputs.logits]               # per output
    max_rel = 1e-3
    [tolerance.passes.magnitude-prune]       # per pass
    min_top1 = 0.95
    [[pass]]
    name = "cleanup"
    [[pass]]
    name = "magnitude-prune"
    sparsity = 0.5
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomllib

from .errors import InputDataError, PipelineSpecError
from .passes import Pass, pass_class
from .passes.options import (  # the option helpers lived here: still reachable from spec
    RawText,
    convert,
    converted_options,
    default_of,
    format_pass,
    format_value,
    option_fields,
    option_types,
    outside_quotes,
    type_text,
    unquote,
)
from .text import did_you_mean
from .validation import TOLERANCE_FIELDS, Tolerance, Tolerances

__all__ = ["RawText", "Recipe", "build_pass", "convert", "converted_options", "default_of", "format_pass", "format_pipeline", "format_value",
           "load_recipe", "option_fields", "option_types", "parse_pipeline", "parse_recipe", "parse_tolerance", "parse_tolerance_text",
           "parse_tolerances", "type_text"]

_POLICIES = ("rollback", "raise", "keep")


# ---------------------------------------------------------------------------------------------
# building passes from text and TOML values
# ---------------------------------------------------------------------------------------------


def build_pass(name: str, options: Mapping[str, Any], where: str = "") -> Pass:
    """An instance of the pass ``name`` with ``options`` converted to their declared types."""
    cls = pass_class(name)
    types_by_name = option_types(cls)
    unknown = sorted(set(options) - set(types_by_name))
    if unknown:
        valid = ", ".join(types_by_name) or "none"
        hint = did_you_mean(unknown[0], types_by_name) if len(unknown) == 1 else ""
        raise PipelineSpecError(f"{where}{name}: unknown option(s) {', '.join(unknown)}{hint}; valid options: {valid}")
    values = {key: convert(value, types_by_name[key], f"{where}{name}{{{key}}}") for key, value in options.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:  # a pass's __post_init__ rejects a bad combination
        raise PipelineSpecError(f"{where}{name}: {error}") from error


# ---------------------------------------------------------------------------------------------
# text form
# ---------------------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def parse_pipeline(text: str) -> list[Pass]:
    """``"cleanup,fold-batchnorm{...}"`` → pass objects, or an error pointing at the bad part."""
    passes = []
    for item in _split_top_level(text):
        brace = item.find("{")
        name = (item if brace < 0 else item[:brace]).strip()
        if not _NAME.fullmatch(name):
            raise PipelineSpecError(f"pipeline '{text}': '{name or item}' is not a pass name")
        options: dict[str, RawText] = {}
        if brace >= 0:
            if not item.rstrip().endswith("}"):
                raise PipelineSpecError(f"pipeline '{text}': options of '{name}' are not closed with '}}'")
            options = _parse_options(item[brace + 1 : item.rstrip().rfind("}")], name)
        passes.append(build_pass(name, options))
    if not passes:
        raise PipelineSpecError("empty pipeline: give at least one pass (see `onnxsparse passes`)")
    return passes


def _split_top_level(text: str) -> list[str]:
    """The passes of a pipeline: split at commas outside braces and quotes."""
    depth, cuts = 0, []
    try:
        for index, char in outside_quotes(text):
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth < 0:
                    raise PipelineSpecError(f"pipeline '{text}': unbalanced '}}'")
            elif char == "," and depth == 0:
                cuts.append(index)
    except PipelineSpecError as error:
        raise PipelineSpecError(f"pipeline '{text}': unbalanced braces or quotes") from error
    if depth:
        raise PipelineSpecError(f"pipeline '{text}': unbalanced braces or quotes")
    bounds = [-1, *cuts, len(text)]
    return [item for item in (text[a + 1 : b].strip() for a, b in itertools.pairwise(bounds)) if item]


_KEY = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*")


def _parse_options(text: str, pass_name: str) -> dict[str, RawText]:
    options: dict[str, RawText] = {}
    position = 0
    while position < len(text.rstrip()):
        match = _KEY.match(text, position)
        if not match:
            raise PipelineSpecError(f"{pass_name}: cannot read options '{text[position:].strip()}' (expected key=value)")
        key = match.group(1).replace("-", "_")
        if key in options:
            raise PipelineSpecError(f"{pass_name}: option '{key}' given twice")
        end = _value_end(text, match.end())
        options[key] = RawText(text[match.end() : end])
        position = end
    return options


def _value_end(text: str, start: int) -> int:
    """A value runs to the first whitespace outside double quotes."""
    return next((index for index, char in outside_quotes(text, start) if char.isspace()), len(text))


def format_pipeline(passes: Sequence[Pass]) -> str:
    return ",".join(format_pass(p) for p in passes)


# ---------------------------------------------------------------------------------------------
# TOML recipes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    passes: list[Pass]
    tolerances: Tolerances
    policy: str = "rollback"
    metric: str | None = None  # the user's task metric, module:function or file.py:function


_RECIPE_KEYS = {"pass", "tolerance", "policy", "metric"}


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    location = Path(path)
    try:
        document = tomllib.loads(location.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineSpecError(f"{location}: no such recipe file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise PipelineSpecError(f"{location}: not a valid TOML recipe ({error})") from error
    recipe = parse_recipe(document, str(location))
    if recipe.metric is not None:  # a metric file is found beside the recipe that names it
        where, _, function = recipe.metric.rpartition(":")
        if where.endswith(".py") and not Path(where).is_absolute():
            recipe = replace(recipe, metric=f"{location.parent / where}:{function}")
    return recipe


def parse_recipe(document: Mapping[str, Any], label: str = "recipe") -> Recipe:
    unknown = sorted(set(document) - _RECIPE_KEYS)
    if unknown:
        raise PipelineSpecError(f"{label}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(_RECIPE_KEYS))}")
    entries = document.get("pass", [])
    if not isinstance(entries, list) or not entries:
        raise PipelineSpecError(f"{label}: no [[pass]] entries")
    passes = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise PipelineSpecError(f"{label}: [[pass]] #{index + 1} is not a table (write [[pass]] then name = \"...\")")
        options = dict(entry)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise PipelineSpecError(f"{label}: [[pass]] #{index + 1} has no name")
        passes.append(build_pass(name, {k.replace("-", "_"): v for k, v in options.items()}, f"{label}: "))
    policy = document.get("policy", "rollback")
    if policy not in _POLICIES:
        raise PipelineSpecError(f"{label}: policy '{policy}' is not one of {', '.join(_POLICIES)}")
    metric = document.get("metric")
    if metric is not None and not isinstance(metric, str):
        raise PipelineSpecError(f"{label}: metric must be \"module:function\" or \"file.py:function\", not {metric!r}")
    return Recipe(passes, parse_tolerances(document.get("tolerance", {}), label), policy, metric)


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PipelineSpecError(f"{where} must be a table of bounds, not {value!r}")
    return value


def parse_tolerances(table: Mapping[str, Any], label: str) -> Tolerances:
    table = _table(table, f"{label}: [tolerance]")
    bounds = {k: v for k, v in table.items() if k not in ("outputs", "passes")}
    default = parse_tolerance(bounds, f"{label}: [tolerance]") if bounds else None
    outputs = _table(table.get("outputs", {}), f"{label}: [tolerance.outputs]")
    per_output = {name: parse_tolerance(_table(t, f"{label}: [tolerance.outputs.{name}]"), f"{label}: [tolerance.outputs.{name}]")
                  for name, t in outputs.items()}
    per_pass = {}
    for name, t in _table(table.get("passes", {}), f"{label}: [tolerance.passes]").items():
        t = _table(t, f"{label}: [tolerance.passes.{name}]")
        pass_class(name)  # an unknown pass name here is a typo too
        per_pass[name] = parse_tolerance(t, f"{label}: [tolerance.passes.{name}]")
    return Tolerances(default=default, per_pass=per_pass, per_output=per_output)


def parse_tolerance(bounds: Mapping[str, Any], where: str) -> Tolerance:
    """A Tolerance from ``{"max_rel": 1e-3, ...}``; unknown bounds are an error."""
    unknown = sorted(set(bounds) - set(TOLERANCE_FIELDS))
    if unknown:
        raise PipelineSpecError(f"{where}: unknown bound(s) {', '.join(unknown)}; valid bounds: {', '.join(TOLERANCE_FIELDS)}")
    try:
        return Tolerance(**{key: convert(value, float, f"{where} {key}") for key, value in bounds.items()})
    except InputDataError as error:  # NaN bounds, bounds no metric can meet
        raise PipelineSpecError(f"{where}: {error}") from error


def parse_tolerance_text(text: str, where: str = "--tolerance") -> Tolerance:
    """``"max_rel=1e-3 min_cosine=0.999"`` (the CLI form) → Tolerance."""
    return parse_tolerance({k: unquote(v) for k, v in _parse_options(text.replace(",", " "), where).items()}, where)
