"""Read-only questions to ML Metadata that several commands ask: runs, producers, deployments."""
from __future__ import annotations

from dataclasses import dataclass

from ml_metadata import errors
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


def _type_names(store) -> dict[int, str]:
    return {t.id: t.name for t in store.get_execution_types()}


def run_of_execution(store, execution_id: int) -> str | None:
    try:
        contexts = store.get_contexts_by_execution(execution_id)
    except errors.NotFoundError:  # recorded outside any pipeline (a release command before the first run)
        return None
    for context in contexts:
        if context.type == PIPELINE_RUN_CONTEXT or _context_type(store, context) == PIPELINE_RUN_CONTEXT:
            return context.name
    return None


_context_types: dict[int, str] = {}


def _context_type(store, context) -> str:
    if context.type_id not in _context_types:
        [context_type] = store.get_context_types_by_id([context.type_id])
        _context_types[context.type_id] = context_type.name
    return _context_types[context.type_id]


def deployment_snapshots(store, model_name: str, target: str | None = None) -> list[Snapshot]:
    """Every release change of a model, oldest first."""
    try:
        deployments = store.get_artifacts_by_type(DEPLOYMENT_TYPE)
    except Exception:  # the type is not registered: nothing was ever deployed
        return []
    mine = {a.id: a for a in deployments if props(a).get("model_name") == model_name
            and (target is None or props(a).get("target") == target)}
    if not mine:
        return []
    by_execution: dict[int, list] = {}
    for event in store.get_events_by_artifact_ids(list(mine)):
        if event.type == metadata_store_pb2.Event.OUTPUT:
            by_execution.setdefault(event.execution_id, []).append(mine[event.artifact_id])
    executions = store.get_executions_by_id(list(by_execution))
    names = _type_names(store)
    snapshots = [Snapshot(e, names.get(e.type_id, "?"), sorted(by_execution[e.id], key=lambda a: a.id),
                          run_of_execution(store, e.id))
                 for e in sorted(executions, key=lambda e: (e.create_time_since_epoch, e.id))]
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
