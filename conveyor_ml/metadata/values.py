"""The one reader of ML Metadata values: a property or custom property as a plain Python value."""
from __future__ import annotations

from typing import Any


def value_of(value) -> Any:
    """An MLMD Value (int, double, string, struct, proto, bool) as a plain value; None when unset."""
    kind = value.WhichOneof("value")
    if kind == "struct_value":
        from google.protobuf import json_format

        return json_format.MessageToDict(value.struct_value)
    return getattr(value, kind) if kind else None


def props(artifact_or_execution) -> dict[str, Any]:
    """Properties and custom properties of an MLMD artifact, execution or context as plain values (declared
    properties win: stores written before our types moved their values to custom properties hold both)."""
    values = {key: value_of(v) for key, v in artifact_or_execution.custom_properties.items()}
    values.update({key: value_of(v) for key, v in artifact_or_execution.properties.items()})
    return values
