"""Conveyor's own MLMD artifact types; standard TFX types are used wherever one fits.

Their values are custom properties, not declared PROPERTIES: Kubeflow Pipelines v2 (and Vertex AI
Pipelines) compile custom artifact types only as the generic schema, which declares none.
"""
import json
from pathlib import Path

from tfx.types.artifact import Artifact

from conveyor_ml.base.clock import utc_now
from conveyor_ml.base.names import (
    DATA_DRIFT_REPORT_TYPE,
    DEPLOYMENT_TYPE,
    QUANTIZATION_REPORT_TYPE,
    QUANTIZED_MODEL_TYPE,
    RELEASE_CHANGE_PROPERTY,
)
from conveyor_ml.metadata.values import props


class QuantizedModel(Artifact):
    """One TFLite variant of a trained model, measured on the eval split and blessed or rejected."""

    TYPE_NAME = QUANTIZED_MODEL_TYPE


class QuantizationReport(Artifact):
    """report.json and report.md comparing every variant with the float SavedModel."""

    TYPE_NAME = QUANTIZATION_REPORT_TYPE


class Deployment(Artifact):
    """Where a model version is live: a local serving label or a Vertex AI endpoint, with its traffic share."""

    TYPE_NAME = DEPLOYMENT_TYPE


class DataDriftReport(Artifact):
    """Drift of the newest span against the previous one, with the policy's verdict."""

    TYPE_NAME = DATA_DRIFT_REPORT_TYPE


def recorded_value(artifact: Artifact, key: str):
    """A value this project records, read as a custom property, or as a declared property where a store
    written before the types dropped their PROPERTIES holds it that way."""
    return props(artifact.mlmd_artifact).get(key)


def set_custom_properties(artifact: Artifact, values: dict) -> None:
    """Records plain values as typed MLMD custom properties (bools as 0/1, None skipped)."""
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            artifact.set_int_custom_property(key, int(value))
        elif isinstance(value, int):
            artifact.set_int_custom_property(key, value)
        elif isinstance(value, float):
            artifact.set_float_custom_property(key, value)
        else:
            artifact.set_string_custom_property(key, str(value))


def span_of(examples: Artifact) -> int:
    """The data span of an Examples artifact (TFX 1.16 records it as a custom property)."""
    if examples.has_custom_property("span"):
        return examples.get_int_custom_property("span")
    return int(getattr(examples, "span", 0) or 0)


def deployment(row: dict, *, model_name: str, base_path: str, uri: str, target: str = "local",
               endpoint: str = "", pushed_at: str | None = None, change_id: str = "") -> Deployment:
    """A Deployment artifact for one row of a release snapshot (see formats.release_state.snapshot); `uri` is a
    record directory, where the row is also written as deployment.json for people and scripts. `change_id`
    names the release change it records (how a repair finds it)."""
    Path(uri).mkdir(parents=True, exist_ok=True)
    (Path(uri) / "deployment.json").write_text(json.dumps(
        {"model_name": model_name, "base_path": base_path, "target": target, "endpoint": endpoint, **row},
        indent=2, default=str) + "\n")
    artifact = Deployment()
    artifact.uri = uri
    set_custom_properties(artifact, {
        "target": target, "model_name": model_name, "version": str(row["version"]), "label": row.get("label", ""),
        "traffic_percent": int(row.get("traffic_percent", 0)), "base_path": base_path, "endpoint": endpoint,
        "pushed_at": pushed_at or utc_now(),
        "release_state": row["release_state"]})
    if change_id:
        artifact.set_string_custom_property(RELEASE_CHANGE_PROPERTY, change_id)
    return artifact
