"""Dataclasses as the single source of a configuration's options: each field declares its default, its JSON
Schema constraints and its description once, and the JSON Schema, the typed object built from a YAML document
and the README's reference table are all derived from them."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

_PRESENCE = "presence"


def option(default: Any = dataclasses.MISSING, *, doc: str, default_factory: Any = dataclasses.MISSING,
           default_text: str | None = None, presence: bool = False, **schema: Any) -> Any:
    """A field that is an option of the spec: `doc` is its one-line description, `schema` its JSON Schema
    constraints (minimum, maximum, pattern, ...), `default_text` how the reference table shows a default computed
    elsewhere (e.g. "<workspace>/serving"). A `presence` option is a bool set by the key's mere presence (`{}`)."""
    metadata = {"doc": doc, "schema": schema, "default_text": default_text, _PRESENCE: presence}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _options(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "doc" in f.metadata]


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _without_none(annotation: Any) -> Any:
    """X for `X | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kept = [a for a in typing.get_args(annotation) if a is not type(None)]
        return kept[0] if len(kept) == 1 else annotation
    return annotation


def _type_schema(annotation: Any, defs: dict) -> dict:
    annotation = _without_none(annotation)
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        name = annotation.__name__
        if name not in defs:
            defs[name] = {}  # placeholder first: a class may refer to itself
            defs[name] = object_schema(annotation, defs)
        return {"$ref": f"#/$defs/{name}"}
    if origin is Literal:
        return {"enum": list(typing.get_args(annotation))}
    if origin is tuple:
        return {"type": "array", "items": _type_schema(typing.get_args(annotation)[0], defs)}
    scalar = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "string"}
    if annotation in scalar:
        return {"type": scalar[annotation]}
    raise TypeError(f"no JSON Schema for {annotation!r}")


def object_schema(cls, defs: dict) -> dict:
    """The JSON Schema of one settings class: its options, which of them are required, nothing else allowed."""
    hints = _hints(cls)
    properties, required = {}, []
    for field in _options(cls):
        if field.metadata[_PRESENCE]:
            schema = {"type": "object", "additionalProperties": False, "properties": {}}
        else:
            schema = {**_type_schema(hints[field.name], defs), **field.metadata["schema"]}
        default = _plain_default(field)
        if default is not None:
            schema["default"] = default
        properties[field.name] = {**schema, "description": field.metadata["doc"]}
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            required.append(field.name)
    schema = {"type": "object", "additionalProperties": False}
    if cls.__doc__:
        schema["description"] = " ".join(cls.__doc__.split())
    if required:
        schema["required"] = required
    schema["properties"] = properties
    schema.update(getattr(cls, "SCHEMA_EXTRA", {}))
    return schema


def _plain_default(field: dataclasses.Field) -> Any:
    """A scalar or list default as JSON (editors show it); None for nested settings and computed defaults."""
    if field.default is dataclasses.MISSING or field.default is None or field.metadata["default_text"]:
        return None
    value = field.default
    if isinstance(value, tuple):
        return list(value)
    return str(value) if isinstance(value, Path) else value


def document_schema(cls, title: str, schema_id: str) -> dict:
    """The whole JSON Schema (draft 2020-12) of a document whose top level is `cls`."""
    defs: dict = {}
    top = object_schema(cls, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": schema_id, "title": title,
            **top, "$defs": dict(sorted(defs.items()))}


def from_document(cls, document: dict) -> Any:
    """An instance of `cls` from a document already validated against its schema: nested settings become
    their classes, lists tuples, paths Paths; what the document leaves out keeps the field's default."""
    hints = _hints(cls)
    values = {}
    for field in _options(cls):
        if field.metadata[_PRESENCE]:
            values[field.name] = field.name in document
        elif field.name in document:
            values[field.name] = _convert(hints[field.name], document[field.name])
    return cls(**values)


def _convert(annotation: Any, value: Any) -> Any:
    annotation = _without_none(annotation)
    if value is None:
        return None
    if dataclasses.is_dataclass(annotation):
        return from_document(annotation, value)
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        return tuple(_convert(item, v) for v in value)
    if annotation is Path:
        return Path(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, float):
        # JSON Schema's "integer" takes 10.0 (a number with no fraction), YAML reads it as a float: the code
        # downstream (release weights, batching settings) needs the int.
        return int(value)
    return value


def to_document(instance: Any) -> dict:
    """The inverse of from_document for one settings object: plain values, as a YAML document would hold them."""
    values = {}
    for field in _options(type(instance)):
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(value):
            value = to_document(value)
        elif isinstance(value, tuple):
            value = [to_document(v) if dataclasses.is_dataclass(v) else v for v in value]
        elif isinstance(value, Path):
            value = str(value)
        values[field.name] = value
    return values


@dataclasses.dataclass(frozen=True)
class ReferenceRow:
    """One option in the reference table: where it sits in the YAML, what it takes, its default, what it does."""

    path: str
    takes: str
    default: str
    description: str


def reference_rows(cls, prefix: str = "") -> list[ReferenceRow]:
    """Every option under `cls`, depth first, as rows of the README's reference table."""
    hints = _hints(cls)
    rows = []
    for field in _options(cls):
        path = f"{prefix}{field.name}"
        annotation = _without_none(hints[field.name])
        if dataclasses.is_dataclass(annotation):
            rows += reference_rows(annotation, f"{path}.")
            continue
        rows.append(ReferenceRow(path, _takes(annotation, field), _default_text(field), field.metadata["doc"]))
    return rows


def _takes(annotation: Any, field: dataclasses.Field) -> str:
    if field.metadata[_PRESENCE]:
        return "`{}` (present or not)"
    schema = field.metadata["schema"]
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin is tuple:
        item = typing.get_args(annotation)[0]
        inner = (" \\| ".join(f"`{v}`" for v in typing.get_args(item)) if typing.get_origin(item) is Literal
                 else {int: "integers", str: "strings"}.get(item, "values"))
        return f"list of {inner}"
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}[annotation]
    bounds = []
    for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in schema:
            bounds.append(f"{sign} {schema[key]}")
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _default_text(field: dataclasses.Field) -> str:
    if field.metadata["default_text"]:
        return field.metadata["default_text"]
    if field.metadata[_PRESENCE]:
        return "absent"
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    elif field.default is dataclasses.MISSING:
        return "required"
    else:
        value = field.default
    if value is None:
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value}`"
