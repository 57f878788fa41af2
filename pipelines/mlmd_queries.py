"""Read-only questions to ML Metadata that several commands ask: runs, producers, deployments."""
from __future__ import annotations

from dataclasses import dataclass

from ml_metadata.proto import metadata_store_pb2

DEPLOYMENT_TYPE = "conveyor.Deployment"
PIPELINE_RUN_CONTEXT = "pipeline_run"
PIPELINE_CONTEXT = "pipeline"


def value_of(value: metadata_store_pb2.Value):
    kind = value.WhichOneof("value")
    if kind == "struct_value":
        from google.protobuf import json_format

        return json_format.MessageToDict(value.struct_value)
    return getattr(value, kind) if kind else None


def props(artifact_or_execution) -> dict:
    """Properties and custom properties of an artifact or execution as plain values."""
    values = {key: value_of(v) for key, v in artifact_or_execution.custom_properties.items()}
    values.update({key: value_of(v) for key, v in artifact_or_execution.properties.items()})
    return values


@dataclass
class Snapshot:
    """One release change: the execution that made it (push, promote, rollback) and the state it left."""

    execution: metadata_store_pb2.Execution
    kind: str
    deployments: list[metadata_store_pb2.Artifact]
    run_id: str | None


def deployment_snapshots(store, model_name: str, target: str | None = None) -> list[Snapshot]:
    """Every release change of a model (push, promote, rollback), oldest first, with the state it left;
    read through the lineage index, which skips cached re-runs that produced nothing new."""
    from pipelines.lineage import MetadataIndex

    snapshots = []
    for view, deployments in MetadataIndex(store).release_changes(model_name):
        mine = [a for a in deployments if target is None or props(a).get("target") == target]
        if mine:
            snapshots.append(Snapshot(view.execution, view.type_name, mine, view.run_id))
    return snapshots


def pushing_runs(store, model_name: str) -> dict[str, str]:
    """{version: pipeline run id} for every version a pipeline run pushed."""
    runs = {}
    for snapshot in deployment_snapshots(store, model_name, target="local"):
        if snapshot.run_id is None:
            continue
        for artifact in snapshot.deployments:
            values = props(artifact)
            if values.get("release_state") in ("live", "canary"):
                runs.setdefault(values["version"], snapshot.run_id)
    return runs
