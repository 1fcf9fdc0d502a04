"""A pass's options: typed dataclass fields, converted from pipeline text or TOML values (and
checked when a pass is built from Python), and written back as text. The pass base class and the
pipeline parser (``spec``) both use these; they import nothing above the pass contract.

Text values are :class:`RawText`: quoted parts (with ``\\`` escapes) are resolved only once the
option's declared type says how to split them (list, map, scalar).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import PipelineSpecError

if TYPE_CHECKING:
    from .base import Pass


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
        value = unquote(value) if isinstance(value, RawText) else value
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
    return _convert_scalar(unquote(value) if isinstance(value, RawText) else value, annotation, where)


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


def outside_quotes(text: str, start: int = 0) -> Iterator[tuple[int, str]]:
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
    cuts = [index for index, char in outside_quotes(text) if char == separator]
    bounds = [-1, *cuts, len(text)]
    return [text[a + 1 : b] for a, b in itertools.pairwise(bounds)]


def unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _split_list(text: str) -> list[str]:
    if not text.strip():
        return []
    return [unquote(item) for item in _split_outside_quotes(text, ",")]


def _split_map(text: str, where: str) -> dict[str, str]:
    pairs = {}
    for item in _split_outside_quotes(text, ",") if text.strip() else []:
        pieces = _split_outside_quotes(item, ":")
        if len(pieces) < 2 or not pieces[0].strip():
            raise PipelineSpecError(f"{where}: '{item}' is not key:value")
        pairs[unquote(":".join(pieces[:-1]))] = unquote(pieces[-1])
    return pairs


def converted_options(cls: type[Pass], options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` of ``cls`` converted to their declared types (a list becomes a tuple, an int a
    float where a float is declared), or a PipelineSpecError naming the option and what it takes."""
    types_by_name = option_types(cls)
    return {name: convert(value, types_by_name[name], f"{cls.name}{{{name}}}") for name, value in options.items()}


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
