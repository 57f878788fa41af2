"""Conveyor's own MLMD artifact types; standard TFX types are used wherever one fits."""
from tfx.types.artifact import Artifact, Property, PropertyType


class QuantizedModel(Artifact):
    """One TFLite variant of a trained model, measured on the eval split and blessed or rejected."""

    TYPE_NAME = "conveyor.QuantizedModel"
    PROPERTIES = {
        "variant": Property(type=PropertyType.STRING),
        "size_bytes": Property(type=PropertyType.INT),
        "accuracy": Property(type=PropertyType.FLOAT),
        "accuracy_delta": Property(type=PropertyType.FLOAT),
        "latency_p50_ms": Property(type=PropertyType.FLOAT),
        "latency_p95_ms": Property(type=PropertyType.FLOAT),
        "throughput_per_s": Property(type=PropertyType.FLOAT),
        "blessed": Property(type=PropertyType.INT),
    }


class QuantizationReport(Artifact):
    """report.json and report.md comparing every variant with the float SavedModel."""

    TYPE_NAME = "conveyor.QuantizationReport"


class Deployment(Artifact):
    """Where a model version is live: a local serving label or a Vertex AI endpoint, with its traffic share."""

    TYPE_NAME = "conveyor.Deployment"
    PROPERTIES = {
        "target": Property(type=PropertyType.STRING),  # local | vertex
        "model_name": Property(type=PropertyType.STRING),
        "version": Property(type=PropertyType.STRING),
        "label": Property(type=PropertyType.STRING),
        "traffic_percent": Property(type=PropertyType.INT),
        "base_path": Property(type=PropertyType.STRING),
        "endpoint": Property(type=PropertyType.STRING),
        "pushed_at": Property(type=PropertyType.STRING),
        # live | canary | retired ("state" itself is TFX's own artifact state)
        "release_state": Property(type=PropertyType.STRING),
    }


class DataDriftReport(Artifact):
    """Drift of the newest span against the previous one, with the policy's verdict."""

    TYPE_NAME = "conveyor.DataDriftReport"
    PROPERTIES = {
        "span": Property(type=PropertyType.INT),
        "baseline_span": Property(type=PropertyType.INT),
        "drift_detected": Property(type=PropertyType.INT),
        "policy": Property(type=PropertyType.STRING),
    }


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
               endpoint: str = "", pushed_at: str | None = None) -> Deployment:
    """A Deployment artifact for one row of a release snapshot (see serving.release.snapshot); `uri` is a
    record directory, where the row is also written as deployment.json for people and scripts."""
    import json
    import time
    from pathlib import Path

    Path(uri).mkdir(parents=True, exist_ok=True)
    (Path(uri) / "deployment.json").write_text(json.dumps(
        {"model_name": model_name, "base_path": base_path, "target": target, "endpoint": endpoint, **row},
        indent=2, default=str) + "\n")
    artifact = Deployment()
    artifact.uri = uri
    artifact.target = target
    artifact.model_name = model_name
    artifact.version = str(row["version"])
    artifact.label = row.get("label", "")
    artifact.traffic_percent = int(row.get("traffic_percent", 0))
    artifact.base_path = base_path
    artifact.endpoint = endpoint
    artifact.pushed_at = pushed_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    artifact.release_state = row["release_state"]
    return artifact
