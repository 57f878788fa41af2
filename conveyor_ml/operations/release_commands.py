"""`conveyor status | promote | rollback`: release controls outside a pipeline run, recorded in MLMD."""
from __future__ import annotations

import getpass
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

from ml_metadata.proto import metadata_store_pb2

from conveyor_ml.base.clock import compact_utc_now, utc_now
from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import PIPELINE_CONTEXT, PROMOTE_EXECUTION, ROLLBACK_EXECUTION
from conveyor_ml.base.spec import PipelineSpec
from conveyor_ml.components.artifacts import Deployment, deployment, set_custom_properties
from conveyor_ml.formats import release_state as releases
from conveyor_ml.metadata import store as metadata
from conveyor_ml.metadata.index import deployment_snapshots, pushing_runs
from conveyor_ml.metadata.values import props
from conveyor_ml.operations.records import ModelStatus, ServerState, StatusReport, VersionStatus

PROMOTE, ROLLBACK = PROMOTE_EXECUTION, ROLLBACK_EXECUTION


def _serving_base(spec: PipelineSpec) -> Path:
    if spec.serving_base is None:
        raise ConveyorError(f"{spec.source_file}: no components.serving_pusher, so there is nothing to release")
    return spec.serving_base


def _existing_release(base: Path, model: str) -> releases.ModelRelease:
    known = releases.known_models(base)
    if model not in known:
        raise ConveyorError(f"unknown model {model!r} under {base} (known: {', '.join(known) or 'none'}; "
                            "run `make pipeline` to push one)")
    return releases.read_release(base, model)


def server_statuses(url: str, model: str) -> dict[str, str] | None:
    """{version: state} from a running server's REST status API, or None when none answers."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models/{model}", timeout=1.5) as response:
            document = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return {} if exc.code == 404 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return {s["version"]: s["state"] for s in document.get("model_version_status", [])}


def status(spec: PipelineSpec, model: str | None, url: str) -> StatusReport:
    """Everything `conveyor status` shows, as data."""
    base = _serving_base(spec)
    models = [model] if model else releases.known_models(base)
    if model:
        _existing_release(base, model)
    runs_by_model = {}
    if metadata.store_exists(spec.metadata):
        store = metadata.open_store(spec.metadata)
        runs_by_model = {name: pushing_runs(store, name) for name in models}
    report = StatusReport(base_path=str(base))
    for name in models:
        release = releases.read_release(base, name)
        served = server_statuses(url, name)
        labels_by_version: dict[int, list[str]] = {}
        for label, version in release.labels.items():
            labels_by_version.setdefault(version, []).append(label)
        versions = sorted(set(release.versions()) | set(release.labels.values()), reverse=True)
        report.models.append(ModelStatus(
            model=name,
            server=ServerState(url=url, up=served is not None),
            versions=[VersionStatus(
                version=v,
                on_disk=v in release.versions(),
                labels=sorted(labels_by_version.get(v, [])),
                traffic_percent=sum(release.weights.get(label, 0) for label in labels_by_version.get(v, [])),
                server_state=(served or {}).get(str(v)),
                pushed_by_run=runs_by_model.get(name, {}).get(str(v)),
            ) for v in versions],
            stable_history=release.history,
        ))
    return report


def change_release(spec: PipelineSpec, model: str, kind: str, *, weight: int | None = None,
                   to_version: int | None = None, reason: str = "") -> releases.ModelRelease:
    """Promote or roll back: validate, rewrite the release files atomically, record the change in MLMD."""
    base = _serving_base(spec)
    with releases.locked(base):
        release = _existing_release(base, model)
        before = releases.ModelRelease(release.name, release.base_path, dict(release.labels),
                                       dict(release.weights), list(release.history))
        if kind == PROMOTE:
            releases.promote(release, weight)
        else:
            releases.rollback(release, to_version)
        releases.write_release(release)
        try:
            record_change(spec, kind, before, release, reason)
        except Exception:
            releases.write_release(before)  # the files and the record stay in step
            raise
    return release


def record_change(spec: PipelineSpec, kind: str, before: releases.ModelRelease, after: releases.ModelRelease,
                  reason: str) -> int:
    """A local release change in MLMD: the Deployments that were current in, the new state out."""
    details = {"labels_before": json.dumps(before.labels, sort_keys=True),
               "labels_after": json.dumps(after.labels, sort_keys=True),
               "weights_after": json.dumps(after.weights, sort_keys=True)}
    return record_release_execution(spec, kind, after.name, "local", releases.snapshot(before.labels, after),
                                    base_path=str(after.base_path.resolve()), reason=reason, details=details)


def record_release_execution(spec: PipelineSpec, kind: str, model_name: str, target: str, rows: list[dict], *,
                             base_path: str, reason: str, details: dict, endpoint: str = "") -> int:
    """An MLMD execution consuming the model's Deployments on `target` that were current and producing one
    Deployment per row of the new state, in the pipeline's context."""
    store = metadata.open_store(spec.metadata)
    deployment_type_id = store.put_artifact_type(Deployment().artifact_type, can_add_fields=True, can_omit_fields=True)
    execution_type_id = store.put_execution_type(metadata_store_pb2.ExecutionType(name=kind), can_add_fields=True)
    history = deployment_snapshots(store, model_name, target=target)
    previous = history[-1].deployments if history else []

    execution = metadata_store_pb2.Execution(type_id=execution_type_id,
                                             last_known_state=metadata_store_pb2.Execution.COMPLETE)
    details = {"model_name": model_name, "target": target, "user": getpass.getuser(), "host": socket.gethostname(),
               "reason": reason, "changed_at": utc_now(), **details}
    for key, value in details.items():
        execution.custom_properties[key].string_value = value

    artifact_and_events = [(artifact, metadata_store_pb2.Event(type=metadata_store_pb2.Event.INPUT))
                           for artifact in previous]
    record_dir = (spec.pipeline_root / "_releases" / kind.split(".")[-1] /
                  compact_utc_now()).resolve()
    for row in rows:
        new = deployment(row, model_name=model_name, base_path=base_path, target=target, endpoint=endpoint,
                         uri=str(record_dir / f"{target}-version-{row['version']}"))
        set_custom_properties(new, {k: row[k] for k in ("model_resource", "deployed_model_id") if k in row})
        new = new.mlmd_artifact
        new.type_id = deployment_type_id
        new.state = metadata_store_pb2.Artifact.LIVE
        artifact_and_events.append((new, metadata_store_pb2.Event(type=metadata_store_pb2.Event.OUTPUT)))

    contexts = []
    pipeline_context = store.get_context_by_type_and_name(PIPELINE_CONTEXT, spec.name)
    if pipeline_context is not None:
        contexts.append(pipeline_context)
    execution_id, _, _ = store.put_execution(execution, artifact_and_events, contexts,
                                             reuse_context_if_already_exist=True)
    return execution_id


def change_vertex_release(spec: PipelineSpec, model: str, kind: str, *, weight: int | None = None,
                          reason: str = "", dry_run: bool = False, say=print) -> list[dict]:
    """`promote|rollback --target gcp`: moves the Vertex AI endpoint's traffic, records it like a local change.
    A dry run reads the endpoint and prints the changes it would send."""
    from conveyor_ml.components.gcp_pusher import traffic
    from conveyor_ml.components.gcp_pusher.vertex import VertexApi, VertexError

    settings = spec.components.gcp_pusher
    if settings is None:
        raise ConveyorError(f"{spec.source_file}: no components.gcp_pusher, so there is no Vertex AI endpoint")
    model_name = spec.gcp_model_name
    if model != model_name:
        raise ConveyorError(f"unknown model {model!r} on Google Cloud: the spec's gcp_pusher pushes {model_name!r}")
    try:
        vertex = VertexApi(settings, model_name, say=say, dry_run="writes" if dry_run else False)
        endpoint = vertex.find_endpoint()
        deployed = vertex.deployed(endpoint)
        change = (traffic.for_promotion(deployed, weight, endpoint) if kind == PROMOTE
                  else traffic.for_rollback(deployed, endpoint))
        vertex.apply(endpoint, change)
        stable = next(d for d in deployed if d.id == change.stable)
        vertex.move_alias(stable.model, stable.version, "stable")
    except VertexError as exc:
        raise ConveyorError(f"gcp: {exc}") from None
    rows = traffic.rows_after(deployed, change)
    if not dry_run:
        record_release_execution(spec, kind, model_name, "vertex", rows, base_path="", endpoint=endpoint,
                                 reason=reason, details={"traffic_split": json.dumps(change.split, sort_keys=True)})
    return rows


def release_history(spec: PipelineSpec, model: str) -> list[dict]:
    """Every push, promotion and rollback of a model, oldest first, with the state it left."""
    store = metadata.open_store(spec.metadata)
    rows = []
    for snapshot in deployment_snapshots(store, model):
        state = [props(a) for a in snapshot.deployments]
        rows.append({"kind": snapshot.kind, "execution_id": snapshot.execution.id, "run_id": snapshot.run_id,
                     "time_ms": snapshot.execution.create_time_since_epoch,
                     "by": props(snapshot.execution).get("user"),
                     "state": [{k: s.get(k) for k in ("version", "label", "traffic_percent", "release_state", "target",
                                                       "endpoint")} for s in state]})
    return rows
