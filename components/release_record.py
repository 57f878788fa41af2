"""Release changes in ML Metadata, and the repair that keeps MLMD in step with the serving base path.

Every release change (a push, a promotion, a rollback) is one execution that consumes the model's
Deployments that were current and produces one Deployment per version of the new state. Each carries the
change's id (`release_change`), which is how a repair tells a recorded change from a lost one: the base
path's release_state.json keeps a committed change until MLMD holds a record with its id (see
formats/release_state.py), and `reconcile_release_state` records any whose process died first.

Vertex AI changes have no local state file; their journal is MLMD itself: an execution in state RUNNING is
written before the endpoint is touched and completed with what the endpoint then holds
(`record_intent`, `unfinished_intents`).
"""
from __future__ import annotations

import getpass
import socket
from collections.abc import Callable

import ml_metadata as mlmd
from ml_metadata.proto import metadata_store_pb2

from conveyor_ml.base.clock import compact_utc_now, utc_now
from conveyor_ml.base.names import (
    PIPELINE_CONTEXT,
    PROMOTE_EXECUTION,
    RELEASE_CHANGE_PROPERTY,
    RELEASE_CONTEXT,
    ROLLBACK_EXECUTION,
)
from conveyor_ml.base.spec import PipelineSpec
from conveyor_ml.formats import release_state as releases
from conveyor_ml.metadata import store as metadata
from conveyor_ml.metadata.index import latest_deployments
from conveyor_ml.metadata.values import props

RUNNING, COMPLETE, FAILED = (metadata_store_pb2.Execution.RUNNING, metadata_store_pb2.Execution.COMPLETE,
                             metadata_store_pb2.Execution.FAILED)


def _by_change(change_id: str) -> mlmd.ListOptions:
    return mlmd.ListOptions(filter_query=f"custom_properties.{RELEASE_CHANGE_PROPERTY}.string_value = '{change_id}'")


def is_recorded(store, change_id: str) -> bool:
    """Whether MLMD holds a finished record of the change: a Deployment it produced (a TFX push publishes
    those with its execution in one transaction) or a completed execution carrying its id."""
    if store.get_artifacts(list_options=_by_change(change_id)):  # only Deployments carry the property
        return True
    return any(e.last_known_state in (COMPLETE, FAILED) for e in store.get_executions(list_options=_by_change(change_id)))


def recorded_execution(store, change_id: str) -> int | None:
    """The id of the completed execution that records the change, None while MLMD holds none."""
    return next((e.id for e in store.get_executions(list_options=_by_change(change_id))
                 if e.last_known_state == COMPLETE), None)


def _execution_type_id(store, kind: str) -> int:
    return store.put_execution_type(metadata_store_pb2.ExecutionType(name=kind), can_add_fields=True)


def _contexts(store, spec: PipelineSpec, release=None) -> list:
    pipeline_context = store.get_context_by_type_and_name(PIPELINE_CONTEXT, spec.name)
    return ([pipeline_context] if pipeline_context is not None else []) + ([release] if release is not None else [])


def release_context(spec: PipelineSpec, model_name: str, name: str, properties: dict[str, str]):
    """The context that groups one progressive release's executions (its steps, measurements and verdict,
    or a shadow phase) as a timeline; created once per `name`."""
    store = metadata.open_store(spec.metadata)
    type_id = store.put_context_type(metadata_store_pb2.ContextType(name=RELEASE_CONTEXT), can_add_fields=True)
    found = store.get_context_by_type_and_name(RELEASE_CONTEXT, name)
    if found is not None:
        return found
    context = metadata_store_pb2.Context(type_id=type_id, name=name)
    for key, value in {"model_name": model_name, **properties}.items():
        context.custom_properties[key].string_value = str(value)
    [context_id] = store.put_contexts([context])
    [stored] = store.get_contexts_by_id([context_id])
    return stored


def record_observation(spec: PipelineSpec, kind: str, model_name: str, details: dict, *, release=None,
                       target: str = "local", reason: str = "", store=None) -> int:
    """An execution that judged the release without changing it (a canary measurement, a verdict, a shadow
    phase's figures): it reads the model's current Deployments (INPUT events), so lineage finds it from the
    versions, and joins the release's context (`release_context`) when one is given."""
    store = store or metadata.open_store(spec.metadata)
    execution = metadata_store_pb2.Execution(type_id=_execution_type_id(store, kind), last_known_state=COMPLETE)
    _set_properties(execution, {**_who(model_name, target, reason), **details})
    events = [(artifact, metadata_store_pb2.Event(type=metadata_store_pb2.Event.INPUT))
              for artifact in latest_deployments(store, model_name, target)]
    execution_id, _, _ = store.put_execution(execution, events, _contexts(store, spec, release),
                                             reuse_context_if_already_exist=True)
    return execution_id


def record_intent(spec: PipelineSpec, kind: str, model_name: str, target: str, *, change_id: str, reason: str,
                  details: dict[str, str], store=None) -> metadata_store_pb2.Execution:
    """An execution in state RUNNING, written before a change is sent: if the process dies before the
    change is recorded, the next command finds it (`unfinished_intents`) and records what happened."""
    store = store or metadata.open_store(spec.metadata)
    execution = metadata_store_pb2.Execution(type_id=_execution_type_id(store, kind), last_known_state=RUNNING)
    _set_properties(execution, {**_who(model_name, target, reason), **details, RELEASE_CHANGE_PROPERTY: change_id})
    execution_id, _, _ = store.put_execution(execution, [], _contexts(store, spec), reuse_context_if_already_exist=True)
    [stored] = store.get_executions_by_id([execution_id])
    return stored


def unfinished_intents(store, model_name: str, target: str) -> list[metadata_store_pb2.Execution]:
    """Promotions and rollbacks of the model on `target` whose process died between intent and record."""
    found = []
    for kind in (PROMOTE_EXECUTION, ROLLBACK_EXECUTION):
        for execution in store.get_executions_by_type(kind):
            values = props(execution)
            if execution.last_known_state == RUNNING and values.get("model_name") == model_name \
                    and values.get("target") == target:
                found.append(execution)
    return sorted(found, key=lambda e: e.id)


def _who(model_name: str, target: str, reason: str) -> dict[str, str]:
    return {"model_name": model_name, "target": target, "user": getpass.getuser(), "host": socket.gethostname(),
            "reason": reason, "changed_at": utc_now()}


def _set_properties(execution: metadata_store_pb2.Execution, values: dict[str, str]) -> None:
    for key, value in values.items():
        execution.custom_properties[key].string_value = str(value)


def record_release_execution(spec: PipelineSpec, kind: str, model_name: str, target: str, rows: list[dict], *,
                             base_path: str, reason: str, details: dict, endpoint: str = "", change_id: str = "",
                             state: int = COMPLETE, intent: metadata_store_pb2.Execution | None = None,
                             store=None, release=None) -> int:
    """An MLMD execution consuming the model's Deployments on `target` that were current and producing one
    Deployment per row of the new state, in the pipeline's context; `intent` completes an execution
    `record_intent` wrote instead of adding one. `state` FAILED records a change that went part of the way:
    the rows are then what the target holds after the failure."""
    # TFX's artifact classes cost seconds to import: only a command that records pays for them.
    from conveyor_ml.components.artifacts import Deployment, deployment, set_custom_properties

    store = store or metadata.open_store(spec.metadata)
    deployment_type_id = store.put_artifact_type(Deployment().artifact_type, can_add_fields=True, can_omit_fields=True)
    previous = latest_deployments(store, model_name, target)

    if intent is not None:
        execution = metadata_store_pb2.Execution()
        execution.CopyFrom(intent)
        execution.last_known_state = state
    else:
        execution = metadata_store_pb2.Execution(type_id=_execution_type_id(store, kind), last_known_state=state)
        _set_properties(execution, _who(model_name, target, reason))
    _set_properties(execution, {**details, **({RELEASE_CHANGE_PROPERTY: change_id} if change_id else {})})

    artifact_and_events = [(artifact, metadata_store_pb2.Event(type=metadata_store_pb2.Event.INPUT))
                           for artifact in previous]
    record_dir = (spec.pipeline_root / "_releases" / kind.split(".")[-1] /
                  f"{compact_utc_now()}-{(change_id or 'change')[:8]}").resolve()
    for row in rows:
        new = deployment(row, model_name=model_name, base_path=base_path, target=target, endpoint=endpoint,
                         uri=str(record_dir / f"{target}-version-{row['version']}"), change_id=change_id)
        set_custom_properties(new, {k: row[k] for k in ("model_resource", "deployed_model_id") if k in row})
        new = new.mlmd_artifact
        new.type_id = deployment_type_id
        new.state = metadata_store_pb2.Artifact.LIVE
        artifact_and_events.append((new, metadata_store_pb2.Event(type=metadata_store_pb2.Event.OUTPUT)))
    execution_id, _, _ = store.put_execution(execution, artifact_and_events, _contexts(store, spec, release),
                                             reuse_context_if_already_exist=True)
    return execution_id


def reconcile_release_state(spec: PipelineSpec, state: releases.ReleaseState,
                            say: Callable[[str], None]) -> None:
    """Repairs what an interrupted command left (call with the base path's lock held): the files
    (`release_state.repair_files`), then the committed changes: forgotten once MLMD holds their record,
    recorded now if their process is gone without one, left alone while it still runs (a pipeline run
    publishes its push after the pusher returns). One line through `say` per repair."""
    for line in releases.repair_files(state):
        say(f"conveyor: repaired: {line}")
    if not state.unrecorded:
        return
    store = metadata.open_store(spec.metadata)
    settled = []
    for change in state.unrecorded:
        if is_recorded(store, change.id):
            settled.append(change.id)  # recorded by the process that made it (a TFX publish, a promote)
        elif not change.in_flight():
            execution_id = record_release_execution(
                spec, change.kind, change.model, "local", change.rows, base_path=str(state.base_path.resolve()),
                reason=change.details.get("reason", ""), change_id=change.id, store=store,
                details={**change.details, "repaired": "recorded by the next command: the process that made "
                                                       "the change was killed before recording it"})
            say(f"conveyor: repaired: the {change.kind} of {change.model} at {change.details.get('changed_at', '?')} "
                f"changed the release files but a crash kept it out of ML Metadata; recorded it now "
                f"(execution {execution_id}, change {change.id[:8]})")
            settled.append(change.id)
    if settled:
        state.unrecorded = [change for change in state.unrecorded if change.id not in settled]
        releases.commit(state)


def reconcile(spec: PipelineSpec, say: Callable[[str], None]) -> None:
    """`reconcile_release_state` for the spec's serving base path, taking its lock (no-op without one)."""
    base = spec.serving_base
    if base is None or not base.is_dir():
        return
    with releases.locked(base):
        reconcile_release_state(spec, releases.read_state(base), say)
