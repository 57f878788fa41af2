"""Lineage over ML Metadata: every model version from its data to live traffic, and every pipeline run.

One read of the store builds an index (artifacts, executions, events, which node and run each execution
belongs to); the questions are then answered from memory, so a store with hundreds of runs answers in
well under a second. Types this code does not know are carried along and shown by their type name.
"""
from __future__ import annotations

import json
from collections import defaultdict

from ml_metadata.proto import metadata_store_pb2 as pb

from conveyor_ml.base.clock import utc_from_milliseconds
from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import (
    CANARY_MEASUREMENT_EXECUTION,
    CANARY_VERDICT_EXECUTION,
    EVALUATOR,
    EXAMPLE_VALIDATOR,
    INFRA_VALIDATOR,
    PUSH_TARGETS,
    QUANTIZER,
    SHADOW_REPORT_EXECUTION,
    STATISTICS_GEN,
)
from conveyor_ml.metadata.index import ExecutionView, MetadataIndex
from conveyor_ml.metadata.values import props
from conveyor_ml.operations.records import (
    ArtifactRef,
    DataSpan,
    DriftVerdict,
    Evaluation,
    InfraValidation,
    ModelLineage,
    ModelVersion,
    PipelineRun,
    Placement,
    Push,
    QuantizedVariant,
    ReleaseChange,
    ReleaseState,
    Training,
)

# What the Evaluator recorded about its decision, shown as they are (see components/evaluator/comparison.py).
EVIDENCE_KEYS = ("decision", "eval_examples", "eval_spans", "candidate_accuracy", "accuracy_interval_low",
                 "accuracy_interval_high", "interval_level", "comparison_test", "p_value", "baseline_accuracy",
                 "accuracy_difference", "difference_interval_low", "difference_interval_high")
EVALUATION_PARAMETERS = ("max_accuracy_drop", "alpha", "test", "golden_span", "min_eval_examples")
RELEASE_FIELDS = ("target", "version", "label", "traffic_percent", "release_state", "endpoint")
# Executions that judged a release without changing it: shown in the release timeline by their summary.
RELEASE_OBSERVATIONS = (CANARY_MEASUREMENT_EXECUTION, CANARY_VERDICT_EXECUTION, SHADOW_REPORT_EXECUTION)


class Lineage:
    """The questions `conveyor models | lineage | runs` answer, over one MetadataIndex."""

    def __init__(self, index: MetadataIndex, model_name: str):
        self.index = index
        self.model_name = model_name
        self.changes = index.release_changes(model_name)
        self.observations = [view for view in index.executions.values() if view.type_name in RELEASE_OBSERVATIONS
                             and props(view.execution).get("model_name") == model_name]
        # (target, version) -> model artifact id, from the pushes that created each version
        self.version_owner: dict[tuple[str, str], int] = {}
        self.pushes: dict[int, list[Push]] = defaultdict(list)
        for view in index.executions.values():
            target = PUSH_TARGETS.get(view.node)
            if target is None or not view.did_work:
                continue
            for model in index.inputs(view, "model"):
                for pushed in index.outputs(view, "pushed_model"):
                    values = props(pushed)
                    if values.get("pushed") == 1:
                        version = str(values.get("pushed_version"))
                        self.version_owner[(target, version)] = model.id
                        self.pushes[model.id].append(Push(
                            target=target, version=version, destination=values.get("pushed_destination"),
                            run_id=view.run_id, time=utc_from_milliseconds(view.execution.create_time_since_epoch),
                            execution_id=view.id))
                    elif values.get("skip_reason"):
                        self.pushes[model.id].append(Push(target=target, skipped=values["skip_reason"],
                                                          run_id=view.run_id, execution_id=view.id))

    # -- the current release state ---------------------------------------------------------------------
    def current_deployments(self) -> dict[int, list[Placement]]:
        """model id -> where it serves now."""
        latest: dict[str, list[pb.Artifact]] = {}
        for _, state in self.changes:
            for target in {props(a).get("target", "local") for a in state}:
                latest[target] = [a for a in state if props(a).get("target", "local") == target]
        current: dict[int, list[Placement]] = defaultdict(list)
        for target, state in latest.items():
            for artifact in state:
                values = props(artifact)
                owner = self.version_owner.get((target, str(values.get("version"))))
                if owner is not None and values.get("release_state") in ("live", "canary"):
                    current[owner].append(Placement(target=target, version=values.get("version"),
                                                    label=values.get("label"),
                                                    traffic_percent=values.get("traffic_percent"),
                                                    endpoint=values.get("endpoint")))
        return current

    # -- one row per model version ---------------------------------------------------------------------
    def models(self) -> list[ModelVersion]:
        current = self.current_deployments()
        return [self._model_row(model, current.get(model.id, [])) for model in self.index.trained_models()]

    def _evaluation(self, model_id: int) -> Evaluation | None:
        index = self.index
        evaluations = index.consumers_of(model_id, EVALUATOR, "model")
        if not evaluations:
            return None
        view = evaluations[-1]
        blessing = next(iter(index.outputs(view, "blessing")), None)
        evaluation = next(iter(index.outputs(view, "evaluation")), None)
        baseline = next(iter(index.inputs(view, "baseline_model")), None)
        parameters = props(view.execution)
        thresholds = {**_thresholds(parameters.get("eval_config")),
                      **{k: parameters[k] for k in EVALUATION_PARAMETERS if parameters.get(k) is not None}}
        accuracy = props(evaluation).get("accuracy") if evaluation is not None else None
        blessed = props(blessing).get("blessed") == 1 if blessing is not None else None
        # The paired test's evidence (recorded by our Evaluator; absent on evaluations made before it).
        recorded = props(evaluation) if evaluation is not None else {}
        reason = recorded.get("reason") or None
        if blessed is False:
            reason = (f"not blessed by the Evaluator: {reason}" if reason
                      else _rejection_reason(accuracy, thresholds, baseline))
        return Evaluation(execution_id=view.id, run_id=view.run_id, accuracy=accuracy,
                          baseline_model_id=baseline.id if baseline is not None else None,
                          thresholds=thresholds, blessed=blessed, reason=reason,
                          **{key: recorded.get(key) for key in EVIDENCE_KEYS})

    def _model_row(self, artifact: pb.Artifact, deployed: list[Placement], into: type = ModelVersion, **more):
        index = self.index
        producer = index.producer(artifact.id)
        values = props(artifact)
        evaluation = self._evaluation(artifact.id)
        infra = [props(b).get("blessed") == 1 for v in index.consumers_of(artifact.id, INFRA_VALIDATOR, "model")
                 for b in index.outputs(v, "blessing")]
        quantized = [QuantizedVariant(variant=props(q).get("variant"), size_bytes=props(q).get("size_bytes"),
                                      accuracy=props(q).get("accuracy"), blessed=props(q).get("blessed") == 1)
                     for v in index.consumers_of(artifact.id, QUANTIZER, "model")
                     for q in index.outputs(v, "quantized_models")]
        spans = sorted({props(e).get("span") for e in index.inputs(producer, "examples")} - {None}) if producer else []
        pushes = [p for p in self.pushes.get(artifact.id, []) if p.version is not None]
        blessed = evaluation.blessed if evaluation else None
        if blessed is False or (infra and not all(infra)):
            state = "rejected"
            reason = (evaluation.reason if evaluation else None) or "not blessed by the InfraValidator"
        elif any(d.label == "stable" for d in deployed):
            state, reason = "live", None
        elif deployed:
            state, reason = "canary", None
        elif pushes:
            state, reason = "retired", None
        elif blessed:
            state, reason = "blessed", None
        else:
            state, reason = "trained", None
        versions = {p.target: p.version for p in pushes}
        accuracy = evaluation.accuracy if evaluation and evaluation.accuracy is not None else values.get("eval_accuracy")
        return into(
            model_id=artifact.id, version=versions.get("local"), vertex_version=versions.get("vertex"),
            created=utc_from_milliseconds(artifact.create_time_since_epoch), run_id=producer.run_id if producer else None,
            spans=spans, eval_accuracy=accuracy,
            eval_examples=evaluation.eval_examples if evaluation else None,
            accuracy_difference=evaluation.accuracy_difference if evaluation else None,
            p_value=evaluation.p_value if evaluation else None, blessed=blessed, infra_blessed=all(infra) if infra else None,
            quantized=quantized, deployed=deployed, state=state, reason=reason, uri=artifact.uri, **more)

    # -- the full chain of one version ------------------------------------------------------------------
    def resolve(self, *, version: str | None = None, label: str | None = None, run_id: str | None = None) -> int:
        """The model artifact id for --version / --label / --run (default: the newest trained model)."""
        if version is not None:
            owner = self.version_owner.get(("local", str(version))) or self.version_owner.get(("vertex", str(version)))
            if owner is None:
                known = sorted({v for (_, v) in self.version_owner}, key=lambda v: (len(v), v))
                raise ConveyorError(f"model {self.model_name}: no pushed version {version} "
                                    f"(pushed versions: {', '.join(known) or 'none'})")
            return owner
        if label is not None:
            for model_id, placements in self.current_deployments().items():
                if any(placement.label == label for placement in placements):
                    return model_id
            raise ConveyorError(f"model {self.model_name}: no version carries the label {label!r} now")
        models = self.index.trained_models()
        if run_id is not None:
            if run_id not in self.index.run_contexts:
                raise ConveyorError(f"no pipeline run {run_id!r} in the metadata store (see `conveyor runs`)")
            produced = [m for m in models if (p := self.index.producer(m.id)) and p.run_id == run_id]
            if not produced:
                raise ConveyorError(f"run {run_id} trained no model (its Trainer was cached or did not run)")
            return produced[-1].id
        if not models:
            raise ConveyorError("no trained model in the metadata store yet; run `make pipeline`")
        return models[-1].id

    def lineage(self, model_id: int) -> ModelLineage:
        index = self.index
        model = index.artifacts[model_id]
        trainer = index.producer(model_id)
        deployed = self.current_deployments().get(model_id, [])
        data = []
        for examples in index.inputs(trainer, "examples") if trainer else []:
            producer = index.producer(examples.id)
            statistics = [s for v in index.consumers_of(examples.id, STATISTICS_GEN)
                          for s in index.outputs(v, "statistics")]
            anomalies = [a for s in statistics for v in index.consumers_of(s.id, EXAMPLE_VALIDATOR)
                         for a in index.outputs(v, "anomalies")]
            data.append(DataSpan(examples_id=examples.id, span=props(examples).get("span"), uri=examples.uri,
                                 imported_by=producer.node if producer else None,
                                 statistics=[ArtifactRef(s.id, s.uri) for s in statistics[:1]],
                                 anomalies=[ArtifactRef(a.id, a.uri, props(a).get("blessed")) for a in anomalies[:1]]))
        schema = [ArtifactRef(s.id, s.uri) for s in (index.inputs(trainer, "schema") if trainer else [])]
        training = None
        if trainer:
            training = Training(execution_id=trainer.id, run_id=trainer.run_id, node=trainer.node,
                                started=utc_from_milliseconds(trainer.execution.create_time_since_epoch),
                                parameters={k: v for k, v in props(trainer.execution).items()
                                            if not k.startswith("__") and k not in ("module_file",)},
                                facts=props(model), warm_start_from=[b.id for b in index.inputs(trainer, "base_model")])
        infra = [InfraValidation(execution_id=v.id, blessed=props(b).get("blessed") == 1)
                 for v in index.consumers_of(model_id, INFRA_VALIDATOR, "model") for b in index.outputs(v, "blessing")]
        versions = {(p.target, p.version) for p in self.pushes.get(model_id, []) if p.version is not None}
        releases = []
        for view, state in self.changes:
            mine = [props(a) for a in state if (props(a).get("target", "local"), str(props(a).get("version"))) in versions]
            if not mine:
                continue
            details = props(view.execution)
            releases.append(ReleaseChange(
                kind=view.node, execution_id=view.id, run_id=view.run_id,
                time=utc_from_milliseconds(view.execution.create_time_since_epoch), by=details.get("user"),
                reason=details.get("reason"),
                state=[ReleaseState(**{k: s.get(k) for k in RELEASE_FIELDS}) for s in mine]))
        for view in self.observations:  # canary measurements and verdicts, shadow reports, of these versions
            details = props(view.execution)
            if (details.get("target", "local"), details.get("version")) in versions:
                releases.append(ReleaseChange(
                    kind=view.type_name, execution_id=view.id,
                    time=utc_from_milliseconds(view.execution.create_time_since_epoch), by=details.get("user"),
                    reason=details.get("summary") or details.get("reason")))
        releases.sort(key=lambda change: change.execution_id)  # MLMD's ids follow the order of the records
        return self._model_row(
            model, deployed, into=ModelLineage, model=self.model_name, data=data, schema=schema, training=training,
            evaluation=self._evaluation(model_id), infra_validation=infra, pushes=self.pushes.get(model_id, []),
            releases=releases,
            traffic_percent_now=sum(d.traffic_percent or 0 for d in deployed if d.target == "local"))

    # -- runs ---------------------------------------------------------------------------------------------
    def runs(self, limit: int | None = None) -> list[PipelineRun]:
        index = self.index
        by_run: dict[str, list[ExecutionView]] = defaultdict(list)
        for view in index.executions.values():
            if view.run_id:
                by_run[view.run_id].append(view)
        rows = []
        for run_id, context in index.run_contexts.items():
            views = sorted(by_run.get(run_id, []), key=lambda v: v.id)
            failed = [v for v in views if v.state in ("failed", "running", "new")]
            # A step the next run found unfinished and canceled (pipelines/workspace.py): its run was
            # stopped during it, and its last update is that run's, not this one's.
            stopped = [v for v in views if v.state == "canceled"]
            started = min((v.execution.create_time_since_epoch for v in views), default=context.create_time_since_epoch)
            ended = max((v.execution.create_time_since_epoch if v.state == "canceled"
                         else v.execution.last_update_time_since_epoch for v in views), default=started)
            produced = []
            for v in views:
                if v.did_work and not v.type_name.endswith("Resolver"):  # resolvers pass artifacts on, make none
                    for key, ids in v.outputs.items():
                        if key in ("model", "pushed_model", "deployment", "drift_report"):
                            produced += [f"{index.type_of(i)}#{i}" for i in ids]
            drift = [props(index.artifacts[i]) for v in views for i in v.outputs.get("drift_report", [])]
            rows.append(PipelineRun(
                run_id=run_id, started=utc_from_milliseconds(started), duration_s=round((ended - started) / 1000, 1),
                status=(f"failed at {failed[0].node}" if failed
                        else f"stopped during {stopped[0].node}" if stopped
                        else "complete" if index.run_finished(run_id) is not False
                        else f"stopped after {views[-1].node}" if views else "stopped before its first step"),
                complete=[v.node for v in views if v.state == "complete"],
                cached=[v.node for v in views if v.state == "cached"],
                produced=produced,
                drift=[DriftVerdict(**{k: d.get(k) for k in ("verdict", "policy", "label_linf", "pixel_js", "reason")})
                       for d in drift]))
        rows.sort(key=lambda r: r.started or "")
        return rows[-limit:] if limit else rows


def _thresholds(eval_config_json: str | None) -> dict:
    """min_accuracy and max_accuracy_drop from the Evaluator's EvalConfig (JSON of the proto)."""
    if not eval_config_json:
        return {}
    found = {}
    try:
        config = json.loads(eval_config_json)
        for metrics_spec in config.get("metrics_specs", []):
            for metric in metrics_spec.get("metrics", []):
                threshold = metric.get("threshold", {})
                lower = threshold.get("value_threshold", {}).get("lower_bound")
                change = threshold.get("change_threshold", {}).get("absolute")
                if lower is not None:
                    found["min_accuracy"] = float(lower)
                if change is not None:
                    found["max_accuracy_drop"] = -float(change)
    except (ValueError, TypeError, AttributeError, RecursionError):  # not an EvalConfig (a store edited by hand)
        return {}
    return found


def _rejection_reason(accuracy, thresholds: dict, baseline) -> str:
    if accuracy is not None and "min_accuracy" in thresholds and accuracy < thresholds["min_accuracy"]:
        return f"not blessed by the Evaluator: accuracy {accuracy:.4f} < min_accuracy {thresholds['min_accuracy']}"
    if baseline is not None and "max_accuracy_drop" in thresholds:
        shown = f"accuracy {accuracy:.4f} is " if accuracy is not None else ""
        return (f"not blessed by the Evaluator: {shown}more than {thresholds['max_accuracy_drop']} below "
                f"the baseline model #{baseline.id}")
    return "not blessed by the Evaluator"
