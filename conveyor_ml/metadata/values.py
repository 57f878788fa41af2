"""The one reader of ML Metadata values: a property or custom property as a plain Python value.

The values this project records and then reads back as numbers or text (a Deployment's traffic_percent, an
Examples' span, ...) are read as the type they are recorded with (RECORDED_TYPES), whatever a store edited by
hand or written by another tool holds: a value that says one thing unambiguously ("50" for traffic_percent,
2 for a version) is read as that; one that does not ("abc", a struct) is unknown (None), and one line on
standard error names the artifact, execution or context and its property (once per process). So the
commands that read these records (models, lineage, runs, status, monitor, the release commands, the scheduler)
never meet a value of another type than the one recorded, and carry on instead of ending in a traceback."""
from __future__ import annotations

import math
import re
import sys
from typing import Any

from conveyor_ml.base.names import (
    CANARY_MEASUREMENT_EXECUTION,
    CANARY_STEP_EXECUTION,
    CANARY_VERDICT_EXECUTION,
    DATA_DRIFT_REPORT_TYPE,
    DEPLOYMENT_TYPE,
    PIPELINE_RUN_CONTEXT,
    PROMOTE_EXECUTION,
    PUSH_EXECUTION,
    QUANTIZED_MODEL_TYPE,
    ROLLBACK_EXECUTION,
    RUN_FINISHED_PROPERTY,
    SHADOW_END_EXECUTION,
    SHADOW_REPORT_EXECUTION,
    SHADOW_START_EXECUTION,
    VARIANT_CANARY_EXECUTION,
)

_INTEGER = re.compile(r"[+-]?\d{1,19}")
_INT64 = range(-2 ** 63, 2 ** 63)
# What the readers of these records expect; a release command records every value as text.
_RELEASE_EXECUTION = {key: str for key in ("model_name", "target", "version", "user", "reason", "summary")}
_EVALUATION = {"accuracy": float, "decision": str, "eval_examples": int, "eval_spans": str,
               "candidate_accuracy": float, "accuracy_interval_low": float, "accuracy_interval_high": float,
               "interval_level": float, "comparison_test": str, "p_value": float, "baseline_accuracy": float,
               "accuracy_difference": float, "difference_interval_low": float,
               "difference_interval_high": float, "reason": str}
RECORDED_TYPES: dict[str, dict[str, type]] = {
    DEPLOYMENT_TYPE: {"model_name": str, "target": str, "version": str, "label": str, "traffic_percent": int,
                      "release_state": str, "endpoint": str},
    "PushedModel": {"pushed": int, "pushed_version": str, "pushed_destination": str, "skip_reason": str},
    "Examples": {"span": int},
    "Model": {"eval_accuracy": float},
    "ModelEvaluation": _EVALUATION,
    "ModelBlessing": {**_EVALUATION, "blessed": int},
    "InfraBlessing": {"blessed": int},
    QUANTIZED_MODEL_TYPE: {"variant": str, "size_bytes": int, "accuracy": float, "blessed": int},
    DATA_DRIFT_REPORT_TYPE: {"span": int, "verdict": str, "policy": str, "label_linf": float,
                             "pixel_js": float, "reason": str},
    PIPELINE_RUN_CONTEXT: {RUN_FINISHED_PROPERTY: int},
    **{kind: _RELEASE_EXECUTION for kind in (
        PUSH_EXECUTION, PROMOTE_EXECUTION, ROLLBACK_EXECUTION, VARIANT_CANARY_EXECUTION,
        CANARY_STEP_EXECUTION, CANARY_MEASUREMENT_EXECUTION, CANARY_VERDICT_EXECUTION,
        SHADOW_START_EXECUTION, SHADOW_REPORT_EXECUTION, SHADOW_END_EXECUTION)},
}
_WHAT = {int: "a whole number", float: "a number", str: "text"}
_warned: set[tuple[str, int, str]] = set()


def value_of(value) -> Any:
    """An MLMD Value (int, double, string, struct, proto, bool) as a plain value; None when unset."""
    kind = value.WhichOneof("value")
    if kind == "struct_value":
        from google.protobuf import json_format

        return json_format.MessageToDict(value.struct_value)
    return getattr(value, kind) if kind else None


def props(artifact_or_execution) -> dict[str, Any]:
    """Properties and custom properties of an MLMD artifact, execution or context as plain values (declared
    properties win: stores written before our types moved their values to custom properties hold both), each
    one RECORDED_TYPES knows read as its type (see the module's text)."""
    values = {key: value_of(v) for key, v in artifact_or_execution.custom_properties.items()}
    values.update({key: value_of(v) for key, v in artifact_or_execution.properties.items()})
    expected = RECORDED_TYPES.get(getattr(artifact_or_execution, "type", ""))
    if expected:
        for key in expected.keys() & values.keys():
            read = _as(expected[key], values[key])
            if read is None and values[key] is not None:
                _warn(artifact_or_execution, key, values[key], expected[key])
            values[key] = read
    return values


def _as(kind: type, value: Any) -> Any:
    """`value` as `kind` where it says one such value unambiguously, else None."""
    if value is None or type(value) is kind:
        return value
    if isinstance(value, bool):
        value = int(value)
    if kind is str:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return str(int(value))  # 2.0 where a version was recorded as "2"
        return str(value) if isinstance(value, (int, float)) else None
    if isinstance(value, str):
        text = value.strip()
        if kind is int:
            if _INTEGER.fullmatch(text) and int(text) in _INT64:
                return int(text)
            value = _as(float, text)  # "50.0"
        else:
            try:
                return float(text) if "_" not in text else None  # float() reads "1_0" as 10
            except ValueError:
                return None
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        return None
    return float(value) if isinstance(value, int) else None  # kind is float


def _warn(record, key: str, value: Any, kind: type) -> None:
    what = type(record).__name__.lower()  # artifact, execution, context
    if (what, record.id, key) in _warned:
        return
    _warned.add((what, record.id, key))
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    print(f"conveyor: warning: ML Metadata {what} #{record.id} ({record.type}): property {key} is {shown}, "
          f"not {_WHAT[kind]}; read as unknown", file=sys.stderr, flush=True)
