"""`conveyor status | promote | rollback`: release controls outside a pipeline run, recorded in MLMD.

Every command first repairs what an interrupted one left (components/release_record.py), saying so in one
line per repair on stderr, then makes its own change as one atomic commit of the release state.
"""
from __future__ import annotations

import getpass
import json
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import PROMOTE_EXECUTION, ROLLBACK_EXECUTION, VARIANT_CANARY_EXECUTION
from conveyor_ml.base.spec import PipelineSpec
from conveyor_ml.components.release_record import (
    FAILED,
    reconcile_release_state,
    record_intent,
    record_release_execution,
    recorded_execution,
    unfinished_intents,
)
from conveyor_ml.formats import release_state as releases
from conveyor_ml.metadata import store as metadata
from conveyor_ml.metadata.index import deployment_snapshots, pushing_runs
from conveyor_ml.metadata.values import props
from conveyor_ml.operations.quantized_canary import add_variant_canary
from conveyor_ml.operations.records import ModelStatus, ServerState, StatusReport, VersionStatus

PROMOTE, ROLLBACK, VARIANT_CANARY = PROMOTE_EXECUTION, ROLLBACK_EXECUTION, VARIANT_CANARY_EXECUTION
IN_FLIGHT_WAIT_SECONDS = 60.0


def say_repair(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _waiting_for_lock(say: Callable[[str], None]) -> Callable[[Path], None]:
    return lambda lock: say(f"conveyor: waiting for {lock}: another conveyor command or a pipeline push is "
                            "changing releases there")


def _serving_base(spec: PipelineSpec) -> Path:
    if spec.serving_base is None:
        raise ConveyorError(f"{spec.source_file}: no components.serving_pusher, so there is nothing to release")
    if spec.serving_base.exists() and not spec.serving_base.is_dir():
        raise ConveyorError(f"serving base path {spec.serving_base} is a file; set serving_pusher.base_path (or "
                            "`workspace:`) in the spec to a directory")
    return spec.serving_base


def _existing_release(state: releases.ReleaseState, model: str) -> releases.ModelRelease:
    if model not in state.models:
        raise ConveyorError(f"unknown model {model!r} under {state.base_path} (known: "
                            f"{', '.join(sorted(state.models)) or 'none'}; run `make pipeline` to push one)")
    return state.release(model)


@contextmanager
def locked_release(spec: PipelineSpec, model: str, say: Callable[[str], None] = say_repair):
    """(state, the model's release) under the base path's lock, after repairing what an interrupted command
    left; an unknown model is an error that creates nothing."""
    base = _serving_base(spec)
    if not base.is_dir():
        _existing_release(releases.ReleaseState(base), model)
    with releases.locked(base, _waiting_for_lock(say)):
        state = releases.read_state(base)
        reconcile_release_state(spec, state, say)
        yield state, _existing_release(state, model)


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


def status(spec: PipelineSpec, model: str | None, url: str, say: Callable[[str], None] = say_repair) -> StatusReport:
    """Everything `conveyor status` shows, as data (after repairing what an interrupted command left)."""
    base = _serving_base(spec)
    if base.is_dir():
        with releases.locked(base, _waiting_for_lock(say)):
            state = releases.read_state(base)
            reconcile_release_state(spec, state, say)
    else:
        state = releases.ReleaseState(base)  # nothing pushed yet: nothing to repair, nothing to create
    models = [model] if model else sorted(state.models)
    if model:
        _existing_release(state, model)
    runs_by_model = {}
    if metadata.store_exists(spec.metadata):
        store = metadata.open_store(spec.metadata)
        runs_by_model = {name: pushing_runs(store, name) for name in models}
    report = StatusReport(base_path=str(base))
    for name in models:
        release = state.release(name)
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
                   to_version: int | None = None, reason: str = "",
                   say: Callable[[str], None] = say_repair) -> releases.ModelRelease:
    """Promote or roll back: repair what an interrupted command left, validate, commit the new release
    state with the change (one rename), rewrite the served files, record the change in MLMD under its id,
    then forget it. A kill anywhere in between is repaired by the next command."""
    base = _serving_base(spec)
    if not base.is_dir():
        _existing_release(releases.ReleaseState(base), model)  # unknown: say so, and create nothing
    deadline = time.monotonic() + IN_FLIGHT_WAIT_SECONDS
    while True:
        with releases.locked(base, _waiting_for_lock(say)):
            state = releases.read_state(base)
            reconcile_release_state(spec, state, say)
            in_flight = [c for c in state.unrecorded if c.model == model]
            if not in_flight:
                return _change_locked(spec, state, model, kind, weight, to_version, reason)
        # A pipeline run committed a push it has not recorded yet (TFX publishes after the pusher returns):
        # changing now would put this record before that one in MLMD's history.
        if time.monotonic() > deadline:
            raise ConveyorError(f"a push of {model} by process {in_flight[0].pid} is still being recorded in ML "
                                f"Metadata after {IN_FLIGHT_WAIT_SECONDS:.0f}s; try again when its run is done")
        time.sleep(0.2)


def _change_locked(spec: PipelineSpec, state: releases.ReleaseState, model: str, kind: str, weight: int | None,
                   to_version: int | None, reason: str) -> releases.ModelRelease:
    release = _existing_release(state, model)
    before = release.copy()
    if kind == PROMOTE:
        releases.promote(release, weight)
    else:
        releases.rollback(release, to_version)
    _commit_and_record(spec, state, kind, before, release, reason)
    return release


def _commit_and_record(spec: PipelineSpec, state: releases.ReleaseState, kind: str, before: releases.ModelRelease,
                       release: releases.ModelRelease, reason: str, *, context=None,
                       details: dict[str, str] | None = None) -> int:
    """Commits `release` with the change remembered, records it in MLMD under its id (in the release's
    `context` too, when given), then forgets it. A failed record, or an interrupt (Ctrl-C or SIGTERM: both raise
    a KeyboardInterrupt) before MLMD holds the record, puts the state and the served files back, so a
    command that fails leaves no change live (a kill instead is repaired by the next command, which records
    it). Returns the execution's id."""
    rows = releases.snapshot(before.labels, release)
    change = releases.ReleaseChange.new(kind, release.name, rows, releases.change_details(
        before, release, reason=reason, user=getpass.getuser(), host=socket.gethostname(), **(details or {})))
    store = metadata.open_store(spec.metadata)  # a store that cannot take the record: no file changes at all
    try:
        releases.apply_change(state, release, change)
        execution_id = record_release_execution(
            spec, kind, release.name, "local", rows, base_path=str(state.base_path.resolve()), reason=reason,
            details=change.details, change_id=change.id, release=context, store=store)
    except BaseException as exc:
        with _signals_held():  # a second Ctrl-C must not stop the undo half way
            execution_id = None if isinstance(exc, Exception) else _recorded_execution(spec, change.id, exc)
            if execution_id is None:
                releases.revert_change(state, before, change)
                raise
        # The interrupt came after MLMD took the record: the change is made, and this command finishes it.
    with _signals_held():
        releases.forget_change(state, change.id)
    return execution_id


def _recorded_execution(spec: PipelineSpec, change_id: str, interrupt: BaseException) -> int | None:
    """The execution recording an interrupted change, None if MLMD holds none. A store that cannot be read
    now re-raises the interrupt: the change stays committed, and the next command records it unless MLMD
    holds it already (as after a kill), so the files and MLMD never disagree."""
    try:
        return recorded_execution(metadata.open_store(spec.metadata), change_id)
    except Exception:
        raise interrupt from None


@contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM do nothing until the block ends (a signal that comes meanwhile is dropped): the
    block undoes a change, or forgets one MLMD already holds, and must not be stopped half way."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are delivered to the main thread only
        return
    previous = {number: signal.signal(number, lambda signum, frame: None) for number in (signal.SIGINT,
                                                                                             signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


@dataclass(frozen=True)
class CanarySource:
    """What becomes the canary: a version on disk (`version`), or a new version made of the pushed TFLite
    `variant` of the stable version (or of `from_version`)."""

    version: int | None = None
    variant: str | None = None
    from_version: int | None = None

    def describe(self, stable: int | None) -> str:
        if self.variant:
            return f"the {self.variant} variant of version {self.from_version or stable}"
        return f"version {self.version}"


@dataclass
class CanaryStart:
    release: releases.ModelRelease
    version: int
    execution_id: int


def start_canary(spec: PipelineSpec, model: str, source: CanarySource, weight: int, *, reason: str = "",
                 kind: str | None = None, route_key: str | None = None, claim: dict | None = None, context=None,
                 details: dict[str, str] | None = None, before_change: Callable | None = None,
                 say: Callable[[str], None] = say_repair) -> CanaryStart:
    """The one way a version becomes the canary outside a pipeline push: `conveyor canary --variant`, and the
    first step of `conveyor release canary`. Under the base path's lock: repairs, checks that no running
    analysis owns the canary, labels the version canary at `weight`% (with `route_key` for sticky routing
    and the analysis' `claim`), commits and records it. `before_change(release)` may change the release
    first (e.g. end a shadow phase). A new variant version that is not committed is removed again."""
    with locked_release(spec, model, say) as (state, release):
        base = state.base_path
        if release.analysis_running():
            raise ConveyorError(f"model {model}: a canary analysis of version {release.analysis['version']} is in "
                                f"progress (process {release.analysis['pid']}); wait for its verdict or stop it")
        if releases.STABLE not in release.labels:
            raise ConveyorError(f"model {model} has no stable version under {base}: push one first (make pipeline)")
        before = release.copy()
        if before_change is not None:
            before_change(release)
        version_dir = None
        if source.variant:
            version_dir = add_variant_canary(release, source.variant, max(1, min(weight, 99)), source.from_version)
            version = release.labels[releases.CANARY]
        else:
            version = source.version
            if version not in releases.versions_on_disk(release.model_dir):
                raise ConveyorError(f"model {model}: version {version} is not on disk (versions: "
                                    f"{', '.join(map(str, release.versions())) or 'none'})")
            current = release.labels.get(releases.CANARY)
            if current not in (None, version):
                raise ConveyorError(f"model {model} already has a canary (version {current}): promote or roll it "
                                    "back first")
        releases.set_canary(release, version, weight)
        release.route_key = route_key or ""
        # The claim names the version it owns: analysis_running() counts a live owner of this canary only.
        release.analysis = {**claim, "version": version} if claim is not None else None
        stable = release.labels[releases.STABLE]
        try:
            execution_id = _commit_and_record(
                spec, state, kind or VARIANT_CANARY, before, release,
                reason or f"{source.describe(stable)} as canary at {weight}%", context=context, details=details)
        except BaseException:  # Ctrl-C too: the change was put back, so is its directory
            if version_dir is not None and state.models.get(model) == before:  # reverted: nobody's directory
                releases.remove_version_directory(release.model_dir, version_dir)
            raise
    return CanaryStart(release, version, execution_id)


def release_variant_canary(spec: PipelineSpec, model: str, variant: str, *, weight: int = 10,
                           from_version: int | None = None, reason: str = "",
                           say: Callable[[str], None] = say_repair) -> releases.ModelRelease:
    """`conveyor canary MODEL --variant V`: the pushed TFLite variant V of the stable version (or of
    `from_version`) becomes a new version labelled canary at `weight` percent, recorded like a promotion;
    `conveyor release canary MODEL --variant V` is the same start followed by an analysis."""
    if not 1 <= weight <= 99:
        raise ConveyorError(f"--weight {weight}: a canary takes 1..99 percent")
    return start_canary(spec, model, CanarySource(variant=variant, from_version=from_version), weight,
                        reason=reason, say=say).release


def _observed_rows(vertex, endpoint: str, before) -> list[dict]:
    from conveyor_ml.components.gcp_pusher import traffic

    return traffic.rows_observed(vertex.deployed(endpoint), before)


def _repair_vertex_records(spec: PipelineSpec, vertex, endpoint: str, model_name: str, say) -> None:
    """Completes the Vertex AI changes whose process died between its intent and its record, with what the
    endpoint holds now (which is what that change left, as nothing else moved it since)."""
    from conveyor_ml.components.gcp_pusher import traffic

    store = metadata.open_store(spec.metadata)
    intents = unfinished_intents(store, model_name, "vertex")
    if not intents:
        return
    history = deployment_snapshots(store, model_name, target="vertex")
    before = [traffic.Deployed(id=p.get("deployed_model_id", ""), model=p.get("model_resource", ""),
                               version=p.get("version", ""), created=0.0, traffic=0)
              for p in (props(a) for a in (history[-1].deployments if history else []))
              if p.get("release_state") != "retired"]
    rows = _observed_rows(vertex, endpoint, before)
    for intent in intents:
        kind = store.get_execution_types_by_id([intent.type_id])[0].name
        execution_id = record_release_execution(
            spec, kind, model_name, "vertex", rows, base_path="", endpoint=endpoint, reason=props(intent).get("reason", ""),
            intent=intent, store=store,
            details={"repaired": "recorded by the next command with what the endpoint held: the process that "
                                 "moved the traffic was killed before recording it"})
        say(f"conveyor: repaired: the {kind} of {model_name} "
            f"on Vertex AI at {props(intent).get('changed_at', '?')} was never recorded; recorded the endpoint as "
            f"it is now (execution {execution_id})")
        rows = [row for row in rows if row["release_state"] != "retired"]  # only the first change retired them


def change_vertex_release(spec: PipelineSpec, model: str, kind: str, *, weight: int | None = None,
                          reason: str = "", dry_run: bool = False, say=print) -> list[dict]:
    """`promote|rollback --target gcp`: moves the Vertex AI endpoint's traffic, recorded like a local change.

    MLMD is the journal: an execution in state RUNNING is written before any call that changes the
    endpoint, and completed after: COMPLETE with the new state, or FAILED with what the endpoint holds after
    a call failed part of the way. One left RUNNING by a killed process is completed by the next command.
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
        if not dry_run:
            _repair_vertex_records(spec, vertex, endpoint, model_name, say_repair)
        deployed = vertex.deployed(endpoint)
        change = (traffic.for_promotion(deployed, weight, endpoint) if kind == PROMOTE
                  else traffic.for_rollback(deployed, endpoint))
        stable = next(d for d in deployed if d.id == change.stable)
        if dry_run:
            vertex.apply(endpoint, change)
            vertex.move_alias(stable.model, stable.version, "stable")
            return traffic.rows_after(deployed, change)
    except VertexError as exc:
        raise ConveyorError(f"gcp: {exc}") from None
    change_id = uuid.uuid4().hex
    details = {"traffic_split": json.dumps(change.split, sort_keys=True)}
    intent = record_intent(spec, kind, model_name, "vertex", change_id=change_id, reason=reason,
                           details={**details, "endpoint": endpoint})
    try:
        vertex.apply(endpoint, change)
        vertex.move_alias(stable.model, stable.version, "stable")
    except VertexError as exc:
        try:
            rows = _observed_rows(vertex, endpoint, deployed)
        except VertexError:
            raise ConveyorError(f"gcp: {exc}; the endpoint could not be read back either, so the next "
                                "`conveyor promote|rollback --target gcp` records what it then holds") from None
        record_release_execution(spec, kind, model_name, "vertex", rows, base_path="", endpoint=endpoint,
                                 reason=reason, details={**details, "error": str(exc)}, change_id=change_id,
                                 state=FAILED, intent=intent)
        now = ", ".join(f"version {r['version']} {r['traffic_percent']}%"
                        for r in sorted(rows, key=lambda r: -r["traffic_percent"])
                        if r["release_state"] != "retired") or "nothing deployed"
        raise ConveyorError(f"gcp: {exc}; the change went part of the way and is recorded as the endpoint now "
                            f"is: {now}") from None
    rows = traffic.rows_after(deployed, change)
    record_release_execution(spec, kind, model_name, "vertex", rows, base_path="", endpoint=endpoint,
                             reason=reason, details=details, change_id=change_id, intent=intent)
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
