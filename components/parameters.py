"""A component's execution parameters are the options of its spec section: the ComponentSpec declares them from
the settings class, the builder passes the settings object, the executor gets the same object back. Names,
types and defaults are written once, in conveyor_ml/base/spec.py."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from tfx.types.component_spec import ExecutionParameter

from conveyor_ml.base.dataclass_schema import from_document, to_document


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kept = [a for a in typing.get_args(annotation) if a is not type(None)]
        return kept[0], True
    return annotation, False


def _parameter_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        item = typing.get_args(annotation)[0]
        return list[_parameter_type(item)]
    if origin is Literal or annotation is Path:
        return str
    return annotation


def _flat_fields(settings_cls, renamed: dict[str, str] | None, prefix: str = ""):
    """(parameter name, path of option names, annotation, optional) for every leaf option. Nested settings are
    flattened as `<option>_<sub-option>`: TFX 1.16 parses a dict parameter back only when all its values have
    one type, and flat parameters show each option on its own in MLMD."""
    hints = typing.get_type_hints(settings_cls)
    for field in dataclasses.fields(settings_cls):
        annotation, optional = _unwrap_optional(hints[field.name])
        name = prefix + (renamed or {}).get(field.name, field.name)
        if dataclasses.is_dataclass(annotation):
            # An optional section (e.g. serving_pusher.analysis) makes each of its options optional: absent
            # when the section is, so the executor gets None back for it.
            for leaf, path, leaf_annotation, leaf_optional in _flat_fields(annotation, None, f"{name}_"):
                yield leaf, (field.name, *path), leaf_annotation, leaf_optional or optional
        else:
            yield name, (field.name,), annotation, optional


def execution_parameters(settings_cls, renamed: dict[str, str] | None = None) -> dict[str, ExecutionParameter]:
    """One ExecutionParameter per option of a settings class (lists as lists, nested settings flattened).
    `renamed` gives an option another parameter name where its own would clash with a channel's."""
    return {name: ExecutionParameter(type=_parameter_type(annotation), optional=optional)
            for name, _, annotation, optional in _flat_fields(settings_cls, renamed)}


def parameter_values(settings, renamed: dict[str, str] | None = None) -> dict[str, Any]:
    """The settings as ComponentSpec arguments: plain values, options left unset (None) left out."""
    document = to_document(settings)
    values = {}
    for name, path, _, _ in _flat_fields(type(settings), renamed):
        value = document
        for key in path:
            value = value[key] if value is not None else None  # inside a section left out: None
        if value is not None:
            values[name] = value
    return values


def settings_from(settings_cls, exec_properties: dict[str, Any], renamed: dict[str, str] | None = None):
    """The settings object an executor was given. Kubeflow Pipelines v2 hands list parameters over as their
    JSON text and booleans as numbers (tfx 1.16's container entrypoint does not parse them back), the local
    runner as values: both arrive here as the same object."""
    document: dict[str, Any] = {}
    for name, path, annotation, _ in _flat_fields(settings_cls, renamed):
        value = exec_properties.get(name)
        if value is None:
            continue
        if typing.get_origin(annotation) is tuple and isinstance(value, str):
            value = json.loads(value)
        elif annotation in (bool, int, float):
            value = annotation(value)
        node = document
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return from_document(settings_cls, document)


def list_parameter(exec_properties: dict[str, Any], key: str) -> list:
    """A list parameter declared outside a settings class (e.g. image_shape), as settings_from reads lists."""
    value = exec_properties[key]
    return json.loads(value) if isinstance(value, str) else list(value)
