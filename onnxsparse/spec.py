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

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputDataError, PipelineSpecError
from .passes import Pass, pass_class
from .passes.base import did_you_mean
from .validate import TOLERANCE_FIELDS, Tolerance, Tolerances

_POLICIES = ("rollback", "raise", "keep")


# ---------------------------------------------------------------------------------------------
# option values: text and TOML into typed fields
# ---------------------------------------------------------------------------------------------


def option_fields(cls: type[Pass]) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.init]


def option_types(cls: type[Pass]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in option_fields(cls)}


def type_text(annotation: Any) -> str:
    """A readable name for an option's type (for ``onnxsparse passes`` and errors)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin is tuple:
        return f"list of {type_text(args[0])}"
    if origin in (dict, Mapping):
        return f"map {type_text(args[0])}:{type_text(args[1])}"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def convert(value: Any, annotation: Any, where: str) -> Any:
    """``value`` (text from the pipeline string, or a TOML value) as an instance of ``annotation``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, RawText) and value.lower() == "none")):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(value, arg, where)
            except PipelineSpecError:
                continue
        raise PipelineSpecError(f"{where}: '{value}' is not a {type_text(annotation)}")
    if origin is typing.Literal:
        value = _unquote(value) if isinstance(value, RawText) else value
        if value not in args:
            raise PipelineSpecError(f"{where}: '{value}' is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        items = _split_list(value) if isinstance(value, RawText) else ([value] if isinstance(value, str) else value)
        if not isinstance(items, (list, tuple)):
            raise PipelineSpecError(f"{where}: '{value}' is not a list")
        return tuple(convert(item, args[0], where) for item in items)
    if origin in (dict, Mapping):
        pairs = _split_map(value, where) if isinstance(value, RawText) else value
        if not isinstance(pairs, Mapping):
            raise PipelineSpecError(f"{where}: '{value}' is not a map of key:value")
        return types.MappingProxyType({convert(k, args[0], where): convert(v, args[1], where) for k, v in pairs.items()})
    return _convert_scalar(_unquote(value) if isinstance(value, RawText) else value, annotation, where)


def _convert_scalar(value: Any, annotation: Any, where: str) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise PipelineSpecError(f"{where}: '{value}' is not true or false")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise PipelineSpecError(f"{where}: '{value}' is not a {annotation.__name__}")
        try:
            converted = annotation(value)
        except (TypeError, ValueError):
            raise PipelineSpecError(f"{where}: '{value}' is not a {annotation.__name__}") from None
        if annotation is int and isinstance(value, float) and converted != value:
            raise PipelineSpecError(f"{where}: '{value}' is not an int")
        return converted
    if annotation is str:
        if not isinstance(value, str):
            raise PipelineSpecError(f"{where}: '{value}' is not a string")
        return value
    raise PipelineSpecError(f"{where}: options of type {type_text(annotation)} are not supported")


class RawText(str):
    """An option value as written in pipeline text: it may hold "quoted" parts with \\ escapes,
    which are resolved only once the option's type says how to split it (list, map, scalar)."""


def _outside_quotes(text: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(index, character) of the characters outside double quotes (with \\ escapes inside them);
    a ValueError at the end if a quote is left open."""
    quoted = escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif not quoted:
            yield index, char
    if quoted:
        raise PipelineSpecError(f"unclosed quote in '{text[start:]}'")


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    cuts = [index for index, char in _outside_quotes(text) if char == separator]
    bounds = [-1, *cuts, len(text)]
    return [text[a + 1 : b] for a, b in zip(bounds[:-1], bounds[1:])]


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _split_list(text: str) -> list[str]:
    if not text.strip():
        return []
    return [_unquote(item) for item in _split_outside_quotes(text, ",")]


def _split_map(text: str, where: str) -> dict[str, str]:
    pairs = {}
    for item in _split_outside_quotes(text, ",") if text.strip() else []:
        pieces = _split_outside_quotes(item, ":")
        if len(pieces) < 2 or not pieces[0].strip():
            raise PipelineSpecError(f"{where}: '{item}' is not key:value")
        pairs[_unquote(":".join(pieces[:-1]))] = _unquote(pieces[-1])
    return pairs


def converted_options(cls: type[Pass], options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` of ``cls`` converted to their declared types (a list becomes a tuple, an int a
    float where a float is declared), or a PipelineSpecError naming the option and what it takes."""
    types_by_name = option_types(cls)
    return {name: convert(value, types_by_name[name], f"{cls.name}{{{name}}}") for name, value in options.items()}


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
        options: dict[str, str] = {}
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
        for index, char in _outside_quotes(text):
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
    return [item for item in (text[a + 1 : b].strip() for a, b in zip(bounds[:-1], bounds[1:])) if item]


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
    return next((index for index, char in _outside_quotes(text, start) if char.isspace()), len(text))


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(_format_scalar(item) for item in value)
    if isinstance(value, Mapping):
        return ",".join(f"{_format_scalar(k, in_map=True)}:{_format_scalar(v, in_map=True)}" for k, v in value.items())
    return _format_scalar(value)


def _format_scalar(value: Any, *, in_map: bool = False) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    special = r"[\s{}=,\"':\\]" if in_map else r"[\s{}=,\"'\\]"
    if text == "" or re.search(special, text) or text.lower() == "none":
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return text


def format_pass(instance: Pass) -> str:
    options = [
        f"{f.name}={format_value(getattr(instance, f.name))}"
        for f in option_fields(type(instance))
        if getattr(instance, f.name) != default_of(f)
    ]
    return f"{instance.name}{{{' '.join(options)}}}" if options else instance.name


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


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


_RECIPE_KEYS = {"pass", "tolerance", "policy"}


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    location = Path(path)
    try:
        document = tomllib.loads(location.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineSpecError(f"{location}: no such recipe file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise PipelineSpecError(f"{location}: not a valid TOML recipe ({error})") from error
    return parse_recipe(document, str(location))


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
    return Recipe(passes, parse_tolerances(document.get("tolerance", {}), label), policy)


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
    return parse_tolerance({k: _unquote(v) for k, v in _parse_options(text.replace(",", " "), where).items()}, where)
