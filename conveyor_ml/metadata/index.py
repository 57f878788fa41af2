"""One read of an ML Metadata store as an index (artifacts, executions, events, the node and run of each
execution), and the questions several commands ask of it: who produced an artifact, who consumed it, and
every release change of a model. Answered from memory, so a store with hundreds of runs answers at once;
types this code does not know are carried along by their type name."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from ml_metadata.proto import metadata_store_pb2 as pb

from conveyor_ml.base.names import (
    BASELINE_RESOLVER,
    DATA_DRIFT_REPORT_TYPE,
    DEPLOYMENT_TYPE,
    DRIFT_BLOCKED,
    NODE_CONTEXT,
    PIPELINE_CONTEXT,
    PIPELINE_RUN_CONTEXT,
    PUSH_TARGETS,
    RUN_FINISHED_PROPERTY,
    WARM_START_RESOLVER,
)
from conveyor_ml.metadata.values import props

EXECUTION_STATES = {pb.Execution.COMPLETE: "complete", pb.Execution.CACHED: "cached", pb.Execution.FAILED: "failed",
                    pb.Execution.RUNNING: "running", pb.Execution.NEW: "new", pb.Execution.CANCELED: "canceled"}


@dataclass
class ExecutionView:
    execution: pb.Execution
    type_name: str
    node: str  # the TFX node id, or the execution type for release commands (conveyor.Promote, …)
    run_id: str | None
    inputs: dict[str, list[int]] = field(default_factory=dict)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    pipeline: str | None = None  # the pipeline whose run made it (None for release commands)

    @property
    def id(self) -> int:
        return self.execution.id

    @property
    def state(self) -> str:
        return EXECUTION_STATES.get(self.execution.last_known_state, "unknown")

    @property
    def did_work(self) -> bool:
        return self.execution.last_known_state == pb.Execution.COMPLETE


class MetadataIndex:
    def __init__(self, store):
        self.artifact_types = {t.id: t.name for t in store.get_artifact_types()}
        execution_types = {t.id: t.name for t in store.get_execution_types()}
        context_types = {t.id: t.name for t in store.get_context_types()}
        self.artifacts = {a.id: a for a in store.get_artifacts()}
        node_of, run_of, pipeline_of = {}, {}, {}
        self.run_contexts = {}
        for context in store.get_contexts():
            kind = context_types.get(context.type_id)
            if kind == PIPELINE_CONTEXT:
                for execution in store.get_executions_by_context(context.id):
                    pipeline_of[execution.id] = context.name
            elif kind == NODE_CONTEXT:
                for execution in store.get_executions_by_context(context.id):
                    node_of[execution.id] = context.name.split(".", 1)[-1]
            elif kind == PIPELINE_RUN_CONTEXT:
                self.run_contexts[context.name] = context
                for execution in store.get_executions_by_context(context.id):
                    run_of[execution.id] = context.name
        executions = store.get_executions()
        self.executions = {}
        for execution in executions:
            type_name = execution_types.get(execution.type_id, "?")
            self.executions[execution.id] = ExecutionView(execution, type_name, node_of.get(execution.id, type_name),
                                                          run_of.get(execution.id),
                                                          pipeline=pipeline_of.get(execution.id))
        self.producers: dict[int, list[int]] = defaultdict(list)
        self.consumers: dict[int, list[int]] = defaultdict(list)
        for event in store.get_events_by_execution_ids(list(self.executions)) if self.executions else []:
            view = self.executions[event.execution_id]
            key = event.path.steps[0].key if event.path.steps else ""
            if event.type in (pb.Event.OUTPUT, pb.Event.DECLARED_OUTPUT, pb.Event.INTERNAL_OUTPUT):
                view.outputs.setdefault(key, []).append(event.artifact_id)
                self.producers[event.artifact_id].append(event.execution_id)
            elif event.type in (pb.Event.INPUT, pb.Event.DECLARED_INPUT, pb.Event.INTERNAL_INPUT):
                view.inputs.setdefault(key, []).append(event.artifact_id)
                self.consumers[event.artifact_id].append(event.execution_id)

    # -- small helpers -----------------------------------------------------------------------------------
    def type_of(self, artifact_id: int) -> str:
        return self.artifact_types.get(self.artifacts[artifact_id].type_id, "?")

    def producer(self, artifact_id: int) -> ExecutionView | None:
        """The execution that did the work of producing an artifact (not a cached re-use)."""
        views = [self.executions[i] for i in self.producers.get(artifact_id, [])]
        working = [v for v in views if v.did_work]
        return min(working or views, key=lambda v: v.id) if views else None

    def consumers_of(self, artifact_id: int, node: str, key: str | None = None) -> list[ExecutionView]:
        found = [self.executions[i] for i in self.consumers.get(artifact_id, [])]
        return sorted((v for v in found if v.node == node and v.did_work
                       and (key is None or artifact_id in v.inputs.get(key, []))), key=lambda v: v.id)

    def outputs(self, view: ExecutionView, key: str) -> list[pb.Artifact]:
        return [self.artifacts[i] for i in view.outputs.get(key, []) if i in self.artifacts]

    def inputs(self, view: ExecutionView, key: str) -> list[pb.Artifact]:
        return [self.artifacts[i] for i in view.inputs.get(key, []) if i in self.artifacts]

    def trained_models(self) -> list[pb.Artifact]:
        models = []
        for artifact in self.artifacts.values():
            if self.type_of(artifact.id) != "Model":
                continue
            producer = self.producer(artifact.id)
            if producer is not None and "model" in producer.outputs and artifact.id in producer.outputs["model"] \
                    and producer.node not in (WARM_START_RESOLVER, BASELINE_RESOLVER):
                models.append(artifact)
        return sorted(models, key=lambda a: a.id)

    def release_changes(self, model_name: str) -> list[tuple[ExecutionView, list[pb.Artifact]]]:
        """Every execution that left a release state for the model, oldest first, with that state."""
        by_execution: dict[int, list[pb.Artifact]] = defaultdict(list)
        for artifact in self.artifacts.values():
            if self.artifact_types.get(artifact.type_id) == DEPLOYMENT_TYPE and \
                    props(artifact).get("model_name") == model_name:
                for execution_id in self.producers.get(artifact.id, []):
                    # FAILED with Deployments: a release change that went part of the way, recorded as
                    # the target then was (TFX publishes no outputs of its failed executions).
                    view = self.executions[execution_id]
                    if view.did_work or view.execution.last_known_state == pb.Execution.FAILED:
                        by_execution[execution_id].append(artifact)
        views = sorted((self.executions[i] for i in by_execution),
                       key=lambda v: (v.execution.create_time_since_epoch, v.id))
        return [(v, sorted(by_execution[v.id], key=lambda a: a.id)) for v in views]

    # -- which versions serve, which spans were consumed ------------------------------------------------------
    def pushed_versions(self, target: str = "local") -> dict[str, int]:
        """{version: Model artifact id} for every version a pusher pushed to `target`."""
        versions = {}
        for view in self.executions.values():
            if PUSH_TARGETS.get(view.node) != target or not view.did_work:
                continue
            for pushed in self.outputs(view, "pushed_model"):
                values = props(pushed)
                if values.get("pushed") == 1:
                    for model in self.inputs(view, "model"):
                        versions[str(values.get("pushed_version"))] = model.id
        return versions

    def model_with_label(self, model_name: str, label: str, target: str = "local") -> int | None:
        """The Model artifact whose version carries `label` (e.g. stable) in the latest release state."""
        state: list[pb.Artifact] = []
        for _, deployments in self.release_changes(model_name):
            mine = [a for a in deployments if props(a).get("target", "local") == target]
            state = mine or state
        version = next((props(a).get("version") for a in state if props(a).get("label") == label), None)
        return None if version is None else self.pushed_versions(target).get(str(version))

    def run_finished(self, run_id: str) -> bool | None:
        """Whether the run's whole DAG ran, as the runner recorded it (RUN_FINISHED_PROPERTY); None for a run
        recorded before that mark existed."""
        context = self.run_contexts.get(run_id)
        mark = props(context).get(RUN_FINISHED_PROPERTY) if context is not None else None
        return None if mark is None else mark == 1

    def successful_runs(self, pipeline: str | None = None) -> set[str]:
        """Pipeline runs (of `pipeline`, if named) that ran through with no failed execution. A run killed
        between two steps has none failed or left running, only steps missing: the runner's mark tells it
        apart; a run from before the mark counts when none of its executions failed or was left running."""
        finished = {view.run_id for view in self.executions.values()
                    if view.run_id and (pipeline is None or view.pipeline == pipeline)}
        for view in self.executions.values():
            if view.run_id and view.state in ("failed", "running", "new", "canceled"):
                finished.discard(view.run_id)
        return {run_id for run_id in finished if self.run_finished(run_id) is not False}

    def _span(self, artifact_id: int) -> int | None:
        artifact = self.artifacts.get(artifact_id)
        if artifact is None or self.type_of(artifact_id) != "Examples":
            return None
        return props(artifact).get("span")

    def consumed_through(self, pipeline: str | None = None) -> int:
        """The newest span a successful run (of `pipeline`, if named: a store may hold several) consumed
        (imported or trained on); 0 when none did. A run covers every span up to its newest: it imports the
        ones it has not seen and trains on its window."""
        successful = self.successful_runs(pipeline)
        spans = [self._span(i) for view in self.executions.values() if view.run_id in successful
                 for ids in (*view.inputs.values(), *view.outputs.values()) for i in ids]
        return max((s for s in spans if s is not None), default=0)

    def blocked_spans(self, pipeline: str | None = None) -> set[int]:
        """Spans the drift gate (of `pipeline`, if named) blocked (the newest report about a span decides):
        settled, never trained on."""
        latest: dict[int, pb.Artifact] = {}
        mine = None if pipeline is None else {artifact_id for view in self.executions.values()
                                              if view.pipeline == pipeline
                                              for ids in view.outputs.values() for artifact_id in ids}
        for artifact in self.artifacts.values():
            if mine is not None and artifact.id not in mine:
                continue
            if self.artifact_types.get(artifact.type_id) == DATA_DRIFT_REPORT_TYPE:
                span = props(artifact).get("span")
                if span is not None and (span not in latest or artifact.id > latest[span].id):
                    latest[span] = artifact
        return {span for span, report in latest.items() if props(report).get("verdict") == DRIFT_BLOCKED}


@dataclass
class Snapshot:
    """One release change: the execution that made it (push, promote, rollback) and the state it left."""

    execution: pb.Execution
    kind: str
    deployments: list[pb.Artifact]
    run_id: str | None


def deployment_snapshots(store, model_name: str, target: str | None = None) -> list[Snapshot]:
    """Every release change of a model (push, promote, rollback), oldest first, with the state it left;
    read through the lineage index, which skips cached re-runs that produced nothing new."""
    snapshots = []
    for view, deployments in MetadataIndex(store).release_changes(model_name):
        mine = [a for a in deployments if target is None or props(a).get("target") == target]
        if mine:
            snapshots.append(Snapshot(view.execution, view.type_name, mine, view.run_id))
    return snapshots


def latest_deployments(store, model_name: str, target: str) -> list[pb.Artifact]:
    """The Deployments the newest release change of a model on `target` left: what `deployment_snapshots`
    ends with, found with a few filtered queries instead of a read of the whole store (each release change
    consumes the state before it, so every push, promote and rollback asks this)."""
    import ml_metadata as mlmd

    def quoted(text: str) -> str:
        return "'" + text.replace("'", "\\'") + "'"

    query = (f"type = {quoted(DEPLOYMENT_TYPE)} AND custom_properties.model_name.string_value = {quoted(model_name)}"
             f" AND custom_properties.target.string_value = {quoted(target)}")
    deployments = store.get_artifacts(list_options=mlmd.ListOptions(filter_query=query))
    if not deployments:
        return []
    # Every execution that outputs each Deployment: the change that made it, and each cached re-run of the
    # pusher, which outputs the same artifacts again (one producer per artifact kept whichever came last, and
    # the newest state read as the one before it, or as none).
    producers: dict[int, set[int]] = defaultdict(set)
    for event in store.get_events_by_artifact_ids([a.id for a in deployments]):
        if event.type in (pb.Event.OUTPUT, pb.Event.DECLARED_OUTPUT, pb.Event.INTERNAL_OUTPUT):
            producers[event.artifact_id].add(event.execution_id)
    changes = [e for e in store.get_executions_by_id(sorted(set().union(*producers.values())))
               if e.last_known_state in (pb.Execution.COMPLETE, pb.Execution.FAILED)]
    if not changes:
        return []
    newest = max(changes, key=lambda e: (e.create_time_since_epoch, e.id))
    return sorted((a for a in deployments if newest.id in producers[a.id]), key=lambda a: a.id)


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
