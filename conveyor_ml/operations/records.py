"""What `conveyor models | lineage | runs | status | monitor` report, as typed records. Their `--format json`
output is each record's `to_json()`: a public contract, documented field by field in the README ("JSON
output"). A field that is unknown or does not apply (None, "") is left out of the JSON (status prints it as null);
lists stay, even empty."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


def _plain(value: Any) -> Any:
    if isinstance(value, JsonRecord):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class JsonRecord:
    """A dataclass whose JSON leaves out what is unknown (None) or empty text, unless the record keeps every
    field (`KEEPS_UNKNOWN`: `conveyor status` has always printed null for what it does not know)."""

    KEEPS_UNKNOWN: ClassVar[bool] = False

    def to_json(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if self.KEEPS_UNKNOWN or getattr(self, f.name) not in (None, "")}


# -- conveyor models: one row per trained model ---------------------------------------------------------------
@dataclass
class QuantizedVariant(JsonRecord):
    variant: str | None = None
    size_bytes: int | None = None
    accuracy: float | None = None
    blessed: bool | None = None


@dataclass
class Placement(JsonRecord):
    """Where a model serves now: a target (local, vertex), its label there and its share of traffic."""

    target: str
    version: str | None = None
    label: str | None = None
    traffic_percent: int | None = None
    endpoint: str | None = None


@dataclass
class ModelVersion(JsonRecord):
    model_id: int
    version: str | None = None
    vertex_version: str | None = None
    created: str | None = None
    run_id: str | None = None
    spans: list[int] = field(default_factory=list)
    eval_accuracy: float | None = None
    eval_examples: int | None = None  # the Evaluator's eval set, on which the paired test below was made
    accuracy_difference: float | None = None  # candidate minus baseline accuracy on that eval set
    p_value: float | None = None  # the paired test's one-sided p-value (candidate worse than baseline)
    blessed: bool | None = None
    infra_blessed: bool | None = None
    quantized: list[QuantizedVariant] = field(default_factory=list)
    deployed: list[Placement] = field(default_factory=list)
    state: str = "trained"  # live | canary | retired | blessed | rejected | trained
    reason: str | None = None  # why it was rejected
    uri: str | None = None


@dataclass
class ModelVersions(JsonRecord):
    model: str
    versions: list[ModelVersion]


# -- conveyor lineage: one model from its data to live traffic -----------------------------------------------
@dataclass
class ArtifactRef(JsonRecord):
    id: int
    uri: str | None = None
    blessed: Any = None  # ExampleValidator's per-split verdicts, on anomalies


@dataclass
class DataSpan(JsonRecord):
    examples_id: int
    span: int | None = None
    uri: str | None = None
    imported_by: str | None = None
    statistics: list[ArtifactRef] = field(default_factory=list)
    anomalies: list[ArtifactRef] = field(default_factory=list)


@dataclass
class Training(JsonRecord):
    execution_id: int
    run_id: str | None = None
    node: str | None = None
    started: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)  # what the Trainer recorded on the Model
    warm_start_from: list[int] = field(default_factory=list)


@dataclass
class Evaluation(JsonRecord):
    execution_id: int
    run_id: str | None = None
    accuracy: float | None = None
    baseline_model_id: int | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    blessed: bool | None = None
    reason: str | None = None
    # The Evaluator's evidence (components/evaluator/comparison.py); absent on evaluations made before it.
    decision: str | None = None  # blessed | rejected, as the Evaluator decided it
    eval_examples: int | None = None
    eval_spans: str | None = None  # "1,2,3": the spans whose eval splits were scored
    candidate_accuracy: float | None = None
    accuracy_interval_low: float | None = None
    accuracy_interval_high: float | None = None
    interval_level: float | None = None  # of both intervals: 1 - 2 alpha
    comparison_test: str | None = None  # "McNemar exact, one-sided" | "paired bootstrap, ..."
    p_value: float | None = None
    baseline_accuracy: float | None = None
    accuracy_difference: float | None = None
    difference_interval_low: float | None = None
    difference_interval_high: float | None = None


@dataclass
class InfraValidation(JsonRecord):
    execution_id: int
    blessed: bool


@dataclass
class Push(JsonRecord):
    """A push a pusher made (version, destination) or skipped (skipped: why)."""

    target: str
    execution_id: int
    run_id: str | None = None
    version: str | None = None
    destination: str | None = None
    time: str | None = None
    skipped: str | None = None


@dataclass
class ReleaseState(JsonRecord):
    """One version's place in a release state: its label, traffic share and state (live, canary, retired)."""

    target: str | None = None
    version: str | None = None
    label: str | None = None
    traffic_percent: int | None = None
    release_state: str | None = None
    endpoint: str | None = None


@dataclass
class ReleaseChange(JsonRecord):
    """A push, promotion or rollback that changed where the model serves."""

    kind: str  # the node (ServingPusher, GcpPusher) or conveyor.Promote / conveyor.Rollback
    execution_id: int
    run_id: str | None = None
    time: str | None = None
    by: str | None = None
    reason: str | None = None
    state: list[ReleaseState] = field(default_factory=list)


@dataclass
class ModelLineage(ModelVersion):
    model: str = ""
    data: list[DataSpan] = field(default_factory=list)
    schema: list[ArtifactRef] = field(default_factory=list)
    training: Training | None = None
    evaluation: Evaluation | None = None
    infra_validation: list[InfraValidation] = field(default_factory=list)
    pushes: list[Push] = field(default_factory=list)
    releases: list[ReleaseChange] = field(default_factory=list)
    traffic_percent_now: int = 0

    def to_json(self) -> dict[str, Any]:
        # The model's name first, as a reader expects.
        document = super().to_json()
        return {"model": document.pop("model"), **document}


# -- conveyor runs ----------------------------------------------------------------------------------------------
@dataclass
class DriftVerdict(JsonRecord):
    verdict: str | None = None
    policy: str | None = None
    label_linf: float | None = None
    pixel_js: float | None = None
    reason: str | None = None


@dataclass
class PipelineRun(JsonRecord):
    run_id: str
    status: str  # complete | failed at <node> | stopped during / after <node> | stopped before its first step
    started: str | None = None
    duration_s: float | None = None
    complete: list[str] = field(default_factory=list)  # nodes that did work
    cached: list[str] = field(default_factory=list)
    produced: list[str] = field(default_factory=list)  # "<type>#<artifact id>"
    drift: list[DriftVerdict] = field(default_factory=list)


@dataclass
class PipelineRuns(JsonRecord):
    runs: list[PipelineRun]


# -- conveyor status --------------------------------------------------------------------------------------------
@dataclass
class ServerState(JsonRecord):
    KEEPS_UNKNOWN = True

    url: str
    up: bool


@dataclass
class VersionStatus(JsonRecord):
    KEEPS_UNKNOWN = True

    version: int
    on_disk: bool
    labels: list[str] = field(default_factory=list)
    traffic_percent: int = 0
    server_state: str | None = None  # what a running server reports (AVAILABLE, LOADING, ...)
    pushed_by_run: str | None = None


@dataclass
class ModelStatus(JsonRecord):
    KEEPS_UNKNOWN = True

    model: str
    server: ServerState
    versions: list[VersionStatus] = field(default_factory=list)
    stable_history: list[int] = field(default_factory=list)


@dataclass
class StatusReport(JsonRecord):
    KEEPS_UNKNOWN = True

    base_path: str
    models: list[ModelStatus] = field(default_factory=list)


# -- conveyor monitor -------------------------------------------------------------------------------------------
@dataclass
class VersionTraffic(JsonRecord):
    """One model version's traffic between the two scrapes of a snapshot (latencies null without requests)."""

    KEEPS_UNKNOWN = True

    model: str
    version: str
    qps: float
    error_rate: float
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None


@dataclass
class BatchingFigures(JsonRecord):
    KEEPS_UNKNOWN = True

    batches: float
    mean_batch_size: float | None
    p95_batch_size: float | None
    queue_depth: float


@dataclass
class Gpu(JsonRecord):
    index: int
    name: str
    utilization_percent: int
    memory_used_mib: int
    memory_total_mib: int


@dataclass
class MonitorSnapshot(JsonRecord):
    """`conveyor monitor --once --format json`. `quality` is, per model, the server's own
    `GET /v1/models/{m}/monitoring` document, each version with the `prediction_drift` measured here."""

    KEEPS_UNKNOWN = True

    url: str
    interval_s: float
    versions: list[VersionTraffic]
    batching: BatchingFigures
    input_anomalies_total: dict[str, float]
    quality: dict[str, Any]
    gpus: list[Gpu] | str  # "no GPU" where NVML finds none
