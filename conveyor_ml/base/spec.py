"""The pipeline spec: one YAML file declares the data, the components with their options, the runner and the
metadata store. This module is the one source of every option and its default: the JSON Schema
(schemas/pipeline.schema.json), the README's reference table and the values the components receive are all
derived from the classes below (`make reference` rewrites the two files; a test checks they are current).

"Settings" classes are what the YAML says; the TFX ComponentSpecs the components declare are named "...Spec" in
components/. Nothing here imports TensorFlow or TFX: `conveyor validate` stays fast and a bad spec is rejected
before any TFX object is built.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args

# jsonschema imports rfc3987_syntax when installed (Jupyter, a TFX dependency, pulls it in), which builds
# a grammar for 1.3 s at import; our schema checks no IRI formats, so every command is spared the wait.
sys.modules.setdefault("rfc3987_syntax", None)
import jsonschema  # noqa: E402
import yaml  # noqa: E402

from conveyor_ml.base.dataclass_schema import document_schema, from_document, option  # noqa: E402
from conveyor_ml.base.errors import ConveyorError  # noqa: E402
from conveyor_ml.base.yaml_loading import load_yaml_file  # noqa: E402

Variant = Literal["float32", "float16", "dynamic_range", "int8"]
QUANTIZATION_VARIANTS: tuple[str, ...] = get_args(Variant)
Strategy = Literal["mirrored", "multi_worker", "one_device"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
DriftPolicy = Literal["retrain", "block", "ignore"]
ComparisonTest = Literal["mcnemar", "bootstrap"]
DRIFT_POLICIES: tuple[str, ...] = get_args(DriftPolicy)
POSITIVE = {"minimum": 1}
FRACTION = {"exclusiveMinimum": 0, "exclusiveMaximum": 1}

# A component needs the ones it names here; the builder wires them, the user only lists components.
COMPONENT_NEEDS = {
    "example_validator": ("statistics_gen",),
    "evaluator": ("trainer",),
    "infra_validator": ("trainer",),
    "quantizer": ("trainer", "evaluator"),
    "serving_pusher": ("trainer", "evaluator"),
    "gcp_pusher": ("trainer", "evaluator"),
}


@dataclass(frozen=True)
class DriftSettings:
    """How the newest span is compared with the previous one, and what drift does to the run."""

    policy: DriftPolicy = option(
        "retrain", doc="What drift does: retrain (train anyway, recorded), block (stop before training), ignore.")
    label_linf_threshold: float = option(
        0.1, doc="L-infinity distance between the spans' label distributions above which they drift.",
        exclusiveMinimum=0, maximum=1)
    pixel_js_threshold: float = option(
        0.1, doc="Jensen-Shannon divergence between the spans' pixel distributions above which they drift.",
        exclusiveMinimum=0, maximum=1)


@dataclass(frozen=True)
class DataSettings:
    """Where the examples come from and how spans are used."""

    SCHEMA_EXTRA = {"if": {"properties": {"source": {"const": "sklearn-digits"}}}, "else": {"required": ["path"]}}

    source: Literal["sklearn-digits", "tfrecord", "csv", "mnist-idx", "image-folder"] = option(
        doc="sklearn-digits (embedded, 1,797 8x8 digits), tfrecord, csv, mnist-idx or image-folder.")
    image_shape: tuple[int, ...] = option(
        doc="Height and width of the images the model takes.",
        items={"type": "integer", "minimum": 2, "maximum": 512}, minItems=2, maxItems=2)
    schema: Path = option(doc="The TFDV schema (pbtxt) every span is validated against.", minLength=1)
    path: str | None = option(
        None, doc="File source: a .tfrecord(.gz) file or glob, a .csv file, a directory holding MNIST IDX "
                  "files, or a directory of class folders (0..9) of PNG/JPEG images. Local or gs://. Required "
                  "unless the source is sklearn-digits.", minLength=1)
    eval_fraction: float = option(0.2, doc="Share of each span held out as its eval split.", **FRACTION)
    window_spans: int | None = option(
        None, doc="Train on the latest K spans (a rolling window); unset: on every span, so the training set grows "
                  "with the data.", default_text="all spans", **POSITIVE)
    drift: DriftSettings = option(default_factory=DriftSettings, doc="Drift between consecutive spans.")


@dataclass(frozen=True)
class ModelArchitecture:
    """The digit CNN's shape."""

    conv_filters: tuple[int, ...] = option((16, 32), doc="Filters of each 3x3 convolution layer.",
                                           items=POSITIVE | {"type": "integer"}, minItems=1, maxItems=4)
    dense_units: int = option(64, doc="Units of the dense layer before the logits.", **POSITIVE)
    dropout: float = option(0.1, doc="Dropout rate before the logits.", minimum=0, exclusiveMaximum=1)


@dataclass(frozen=True)
class TrainerSettings:
    """Training under a tf.distribute strategy."""

    strategy: Strategy = option(
        "mirrored", doc="mirrored (all GPUs, else CPU replicas), multi_worker (MultiWorkerMirroredStrategy), "
                        "one_device.")
    cpu_replicas: int = option(1, doc="Without GPUs: split the CPU into N logical devices (N replicas).",
                               **POSITIVE)
    num_workers: int = option(2, doc="multi_worker without TF_CONFIG: how many local worker processes to start.",
                              **POSITIVE)
    train_steps: int = option(600, doc="Training steps.", **POSITIVE)
    batch_size: int = option(32, doc="Per-replica batch; the global batch is batch_size x replicas.", **POSITIVE)
    learning_rate: float = option(0.003, doc="Adam's learning rate.", exclusiveMinimum=0, maximum=10)
    scale_learning_rate: bool = option(False, doc="Multiply the learning rate by the number of replicas.")
    warm_start: bool = option(
        False, doc="Start from the weights of the model serving as stable (else the newest blessed model), among "
                   "the models trained before the newest span.")
    cache_budget_mb: int = option(
        512, doc="A split whose examples fit in this many MiB is cached in memory after its first pass; a "
                 "larger one is streamed from its shards every time.", minimum=0)
    model: ModelArchitecture = option(default_factory=ModelArchitecture, doc="The model's architecture.")


@dataclass(frozen=True)
class EvaluatorSettings:
    """TFMA's metrics, then the candidate against its baseline on the same eval examples (a paired test)."""

    min_accuracy: float = option(0.9, doc="Accuracy the candidate must reach on the eval set (its interval is "
                                          "reported).", minimum=0, maximum=1)
    max_accuracy_drop: float = option(
        0.01, doc="A candidate significantly worse than its baseline is still blessed when it is at most this much "
                  "less accurate.", minimum=0, maximum=1)
    test: ComparisonTest = option(
        "mcnemar", doc="The paired test of candidate against baseline: mcnemar (exact, one-sided) or bootstrap "
                       "(10,000 paired resamples).")
    alpha: float = option(0.05, doc="Significance level: a candidate counts as worse only when the test's p-value "
                                    "is below it.", exclusiveMinimum=0, maximum=0.5)
    golden_span: int | None = option(
        None, doc="Score every candidate and its baseline on this span's eval split, a fixed held-out set.",
        default_text="the eval splits of every span in the training window", **POSITIVE)
    min_eval_examples: int | None = option(
        None, doc="Fewest eval examples a comparison with the baseline may rest on; on fewer, the candidate is not "
                  "blessed for lack of evidence (one example would weigh more than max_accuracy_drop).",
        default_text="1 / max_accuracy_drop (100)", minimum=0)


@dataclass(frozen=True)
class InfraValidatorSettings:
    """A real `conveyor serve` on the candidate before it may be pushed."""

    num_examples: int = option(10, doc="Eval images sent over REST and gRPC.", **POSITIVE)
    timeout_seconds: float = option(120.0, doc="How long the server may take to load the model.",
                                    exclusiveMinimum=0, maximum=3600)


@dataclass(frozen=True)
class QuantizerSettings:
    """TFLite variants, each measured on the eval split and blessed or not."""

    variants: tuple[Variant, ...] = option(QUANTIZATION_VARIANTS, doc="The variants to convert and measure.",
                                           minItems=1, uniqueItems=True)
    required_variants: tuple[Variant, ...] = option((), doc="Variants whose failed conversion fails the run.",
                                                    uniqueItems=True)
    representative_examples: int = option(200, doc="int8 calibration images from the training split.",
                                          **POSITIVE)
    max_accuracy_drop_points: float = option(
        1.0, doc="A variant more than this many accuracy points below the SavedModel is not blessed.",
        minimum=0, maximum=100)
    threads: int = option(2, doc="LiteRT interpreter threads for the measurements.", **POSITIVE)
    latency_runs: int = option(200, doc="Single-image runs timed for the latency percentiles.", **POSITIVE)
    throughput_batch_size: int = option(64, doc="Batch size of the throughput measurement.", **POSITIVE)


@dataclass(frozen=True)
class BatchingSettings:
    """The batching.config the ServingPusher writes (TF Serving's BatchingParameters)."""

    max_batch_size: int = option(128, doc="Largest batch the server forms.", **POSITIVE)
    batch_timeout_micros: int = option(5000, doc="How long a batch waits for more requests.", minimum=0)
    max_enqueued_batches: int = option(10, doc="Batches waiting per queue before requests are refused.",
                                       **POSITIVE)
    num_batch_threads: int = option(2, doc="Threads running batches.", **POSITIVE)


@dataclass(frozen=True)
class AutoscalingSettings:
    """The rendered Kubernetes HorizontalPodAutoscaler."""

    min_replicas: int = option(2, doc="Fewest serving pods.", **POSITIVE)
    max_replicas: int = option(10, doc="Most serving pods.", **POSITIVE)
    target_cpu_utilization: int = option(70, doc="CPU percentage the autoscaler aims at.", minimum=1, maximum=100)


@dataclass(frozen=True)
class CanaryAnalysisSettings:
    """An analysed canary: its weight rises step by step while its metrics, read from the server's Prometheus
    endpoint and compared with stable's over the same window, stay inside the thresholds; any breach rolls it
    back at once; the last step promotes it (`conveyor release canary`, whose flags override these keys)."""

    steps: tuple[int, ...] = option((10, 25, 50, 100), doc="The canary's traffic percent at each step; the last "
                                    "must be 100.", items={"type": "integer", "minimum": 1, "maximum": 100},
                                    minItems=1, maxItems=20)
    interval_seconds: float = option(300.0, doc="How long each step is measured before the next.",
                                     exclusiveMinimum=0)
    max_error_rate: float = option(0.01, doc="Highest share of the canary's requests that may fail.",
                                   minimum=0, maximum=1)
    max_p99_ratio: float = option(1.2, doc="Highest canary p99 latency as a multiple of stable's.", exclusiveMinimum=0)
    min_agreement: float = option(0.98, doc="Lowest overlap of the canary's and stable's predicted-class "
                                  "distributions (1: the same).", minimum=0, maximum=1)
    min_live_accuracy_drop: float = option(-1.0, doc="Lowest canary live accuracy minus stable's, in points "
                                           "(judged once both have feedback in the window).", minimum=-100, maximum=100)
    mirror_percent: int = option(100, doc="Percent of requests also answered by the other version (canary or "
                                 "stable) in the background, to measure agreement; each costs a second model run.",
                                 minimum=0, maximum=100)
    min_requests: int = option(20, doc="Canary requests a window needs before it can decide (a quieter window "
                               "is measured again, up to 3 times, then rolled back).", **POSITIVE)
    route_key: str | None = option(None, doc="Request header whose hash picks the version (sticky per user); "
                                   "requests without it are split by weight.", pattern="^[A-Za-z0-9-]{1,64}$")
    server_url: str = option("http://127.0.0.1:8501", doc="The model server whose metrics decide.",
                             pattern="^https?://")


@dataclass(frozen=True)
class ServingPusherSettings:
    """Blessed models into a TF Serving base path, as atomic integer versions with release labels."""

    model_name: str = option(doc="The served model's name.", pattern="^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    base_path: Path | None = option(None, doc="The serving base path.", default_text="`<workspace>/serving`",
                                    minLength=1)
    release: Literal["direct", "canary", "shadow"] = option(
        "direct", doc="direct: a new version becomes stable (100%); canary: it becomes canary at canary_weight % "
                      "(or the first analysis step); shadow: it answers shadow_percent % of live requests' copies "
                      "in the background, never the client.")
    canary_weight: int = option(10, doc="Percent of unversioned traffic a new canary takes.", minimum=1, maximum=99)
    shadow_percent: int = option(100, doc="release: shadow: percent of live requests mirrored to the new version.",
                                 minimum=1, maximum=100)
    analysis: CanaryAnalysisSettings | None = option(
        None, doc="release: canary: analyse the canary and promote or roll it back automatically; `conveyor "
                  "schedule` runs the analysis after the run, and no later run pushes over it.")
    keep_versions: int = option(5, doc="Versions kept on disk (labelled ones are always kept).", **POSITIVE)
    batching: BatchingSettings = option(default_factory=BatchingSettings, doc="batching.config.")
    autoscaling: AutoscalingSettings = option(default_factory=AutoscalingSettings,
                                              doc="Rendered Kubernetes autoscaling.")


@dataclass(frozen=True)
class GcpPusherSettings:
    """Blessed models to Cloud Storage and a Vertex AI model version, endpoint and canary split."""

    project: str = option(doc="Google Cloud project id.", pattern="^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
    region: str = option(doc="Vertex AI region, e.g. europe-west4.", pattern="^[a-z]+-[a-z]+[0-9]+$")
    bucket: str = option(doc="Cloud Storage bucket for the model files.",
                         pattern="^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
    prefix: str = option("conveyor", doc="Object prefix inside the bucket.")
    model_display_name: str | None = option(None, doc="Vertex AI model name.", default_text="the serving model's name",
                                            minLength=1, maxLength=128)
    endpoint: str | None = option(None, doc="Vertex AI endpoint display name.",
                                  default_text="`<model>-endpoint`", minLength=1, maxLength=128)
    machine_type: str = option("n1-standard-2", doc="Machine type of the deployed model.", minLength=1)
    min_replicas: int = option(1, doc="Fewest serving nodes.", **POSITIVE)
    max_replicas: int = option(2, doc="Most serving nodes.", **POSITIVE)
    canary_weight: int = option(10, doc="Percent of the endpoint's traffic a new version takes (100: replace).",
                                minimum=0, maximum=100)
    serving_image: str = option("us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-16:latest",
                                doc="Prebuilt TF Serving container of the model version.", minLength=1)
    credentials: str | None = option(None, doc="Service-account key file; default: Application Default "
                                               "Credentials.", minLength=1)
    dry_run: bool = option(False, doc="Print every Cloud Storage and Vertex AI call with its request, make none.")
    retry_seconds: float = option(300.0, doc="How long 429/503 answers are retried with backoff before the push "
                                             "fails.", exclusiveMinimum=0, maximum=3600)
    operation_seconds: float = option(3600.0, doc="How long a Vertex AI long-running operation (a deploy takes "
                                                  "10-30 minutes) is waited for before the push fails; a rerun "
                                                  "converges.", exclusiveMinimum=0, maximum=86400)
    upload_workers: int = option(8, doc="Parallel uploads.", minimum=1, maximum=64)
    # Emulators and fakes (tests, local trials); unset means Google's own endpoints.
    storage_endpoint: str | None = option(None, doc="Cloud Storage endpoint (an emulator).", pattern="^https?://")
    vertex_endpoint: str | None = option(None, doc="Vertex AI endpoint (a fake).", pattern="^https?://")


@dataclass(frozen=True)
class ComponentsSettings:
    """The components in the DAG; a component left out is left out of the DAG, the wiring is derived."""

    statistics_gen: bool = option(False, presence=True, doc="TFDV statistics of every span.")
    example_validator: bool = option(False, presence=True, doc="Checks every span against the schema.")
    trainer: TrainerSettings | None = option(None, doc="The Trainer.")
    evaluator: EvaluatorSettings | None = option(None, doc="The Evaluator.")
    infra_validator: InfraValidatorSettings | None = option(None, doc="The InfraValidator.")
    quantizer: QuantizerSettings | None = option(None, doc="The Quantizer.")
    serving_pusher: ServingPusherSettings | None = option(None, doc="The ServingPusher.")
    gcp_pusher: GcpPusherSettings | None = option(None, doc="The GcpPusher.")


@dataclass(frozen=True)
class BeamSettings:
    """Apache Beam, which runs every data component."""

    args: tuple[str, ...] = option(("--direct_running_mode=in_memory",), doc="Beam pipeline arguments (the "
                                   "runner and its options).", items={"type": "string", "pattern": "^--"})


@dataclass(frozen=True)
class MysqlSettings:
    """A MySQL/MariaDB metadata store."""

    host: str = option(doc="Server host.", minLength=1)
    database: str = option(doc="Database name.", pattern="^[A-Za-z0-9_]+$")
    user: str = option(doc="User name.", minLength=1)
    port: int = option(3306, doc="Server port.", minimum=1, maximum=65535)
    password_env: str | None = option(None, doc="Environment variable holding the password.",
                                      pattern="^[A-Za-z_][A-Za-z0-9_]*$")

    def password(self) -> str:
        return os.environ.get(self.password_env, "") if self.password_env else ""


@dataclass(frozen=True)
class MetadataSettings:
    """The ML Metadata store: a SQLite file or a MySQL database (one of the two)."""

    SCHEMA_EXTRA = {"minProperties": 1, "maxProperties": 1}

    sqlite: Path | None = option(None, doc="SQLite file.", default_text="`<workspace>/metadata.sqlite`",
                                 minLength=1)
    mysql: MysqlSettings | None = option(None, doc="MySQL/MariaDB instead of SQLite.")


CRON_PATTERN = r"^[0-9A-Za-z*/,?#-]+( [0-9A-Za-z*/,?#-]+){4}$"  # minute hour day month weekday, one line


@dataclass(frozen=True)
class ScheduleSettings:
    """When the pipeline runs by itself."""

    cron: str | None = option(None, doc="Cron expression (five fields) for `conveyor schedule --print-cron` and "
                                        "the compiled pipeline's schedule.", pattern=CRON_PATTERN)


@dataclass(frozen=True)
class KubeflowSettings:
    """`conveyor compile`: the pipeline on Kubeflow Pipelines v2 / Vertex AI Pipelines."""

    image: str = option("gcr.io/your-project/conveyor:latest",
                        doc="Container image with Conveyor installed, for every step.", minLength=1)
    pipeline_root: str = option("gs://your-bucket/conveyor", doc="Where the steps write artifacts.",
                                pattern="^(gs|s3|minio)://")
    data_root: str | None = option(None, doc="The span-N directories, as the workers see them.",
                                   default_text="`<pipeline_root>/data`", pattern="^(gs|s3|minio)://")

    @property
    def data_root_uri(self) -> str:
        return self.data_root or f"{self.pipeline_root.rstrip('/')}/data"


@dataclass(frozen=True)
class PipelineSpec:
    """One YAML file declares a TFX pipeline: data, components and their parameters, runner and metadata store.
    Components left out are left out of the DAG; the wiring is derived."""

    name: str = option(doc="Pipeline name (letters, digits, '-' and '_').", pattern="^[A-Za-z][A-Za-z0-9_-]{0,62}$")
    data: DataSettings = option(doc="The data.")
    components: ComponentsSettings = option(doc="The components.")
    workspace: Path = option(Path("workspace"), doc="Directory for everything a run writes.", minLength=1)
    beam: BeamSettings = option(default_factory=BeamSettings, doc="Apache Beam.")
    metadata: MetadataSettings = option(default_factory=MetadataSettings, doc="The ML Metadata store.")
    schedule: ScheduleSettings = option(default_factory=ScheduleSettings, doc="Scheduling.")
    kubeflow: KubeflowSettings = option(default_factory=KubeflowSettings, doc="Kubeflow / Vertex AI Pipelines.")
    source_file: Path = Path("")  # where the spec was read from; not an option

    @property
    def gcp_model_name(self) -> str:
        """The model's name on Google Cloud: the gcp section's display name, else the serving model's name."""
        gcp = self.components.gcp_pusher
        serving = self.components.serving_pusher
        return (gcp.model_display_name if gcp and gcp.model_display_name else None) or \
            (serving.model_name if serving else self.name)

    @property
    def data_root(self) -> Path:
        return self.workspace / "data"

    @property
    def pipeline_root(self) -> Path:
        return self.workspace / "pipeline_root"

    @property
    def serving_base(self) -> Path | None:
        pusher = self.components.serving_pusher
        return pusher.base_path if pusher else None


SCHEMA_ID = "https://conveyor.dev/schemas/pipeline.schema.json"


def pipeline_schema() -> dict:
    """The JSON Schema of a spec, derived from the classes above (schemas/pipeline.schema.json is its copy)."""
    return document_schema(PipelineSpec, "Conveyor pipeline spec", SCHEMA_ID)


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(pipeline_schema())


def load_spec(path: str | os.PathLike) -> PipelineSpec:
    """Reads and validates a spec file; raises ConveyorError listing every problem found."""
    spec_path = Path(path)
    return parse_spec(_read_document(spec_path), spec_path)


MAX_EXTENDS = 16  # specs a spec may extend, one through the next (a chain of thousands ended in RecursionError)


def _read_document(spec_path: Path, extended_by: tuple[Path, ...] = ()) -> Any:
    """The YAML document, with `extends: other.yaml` (relative to this file) merged under it: mappings
    merge key by key, anything else is replaced, and `key: null` removes a key of the base."""
    try:
        is_file = spec_path.is_file()
    except (OSError, ValueError):  # a NUL byte in the name, a name too long for the file system
        is_file = False
    if not is_file:
        referrer = f" (extended by {extended_by[-1]})" if extended_by else ""
        raise ConveyorError(
            f"spec file not found: {spec_path}{referrer} (pass a pipeline YAML, e.g. pipelines/mnist.yaml)")
    try:
        document = load_yaml_file(spec_path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{spec_path}:{mark.line + 1}:{mark.column + 1}" if mark else str(spec_path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConveyorError(f"{where}: YAML syntax error: {problem}") from None
    except UnicodeDecodeError:
        raise ConveyorError(f"{spec_path}: not a text file; a spec is UTF-8 YAML") from None
    if not isinstance(document, dict) or "extends" not in document:
        return document
    if len(extended_by) >= MAX_EXTENDS:
        raise ConveyorError(f"{spec_path}: more than {MAX_EXTENDS} specs extend one another in a chain; "
                            "merge some of them")
    extends = str(document.pop("extends"))
    try:
        base_path = (spec_path.parent / extends).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symbolic link loop (Python 3.10)
        raise ConveyorError(f"{spec_path}: extends {extends!r}, which cannot be opened: {exc}") from None
    if base_path in extended_by or base_path == spec_path.resolve():
        raise ConveyorError(f"{spec_path}: extends {base_path}, which extends it back (a cycle)")
    return _merged(_read_document(base_path, (*extended_by, spec_path.resolve())), document)


def _merged(base: Any, override: Any) -> Any:
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merged(base.get(key), value)
    return merged


def parse_spec(document: Any, source_file: Path) -> PipelineSpec:
    problems = validation_problems(document)
    if len(problems) == 1:
        raise ConveyorError(f"{source_file}: invalid spec: {problems[0]}")
    if problems:
        raise ConveyorError(f"{source_file}: invalid spec:\n" + "\n".join(f"  {p}" for p in problems))
    return _build(document, source_file)


def validation_problems(document: Any) -> list[str]:
    """Every schema and wiring problem, each as '<yaml.path>: <what is wrong>', in document order."""
    if not isinstance(document, dict):
        return ["(top level): must be a mapping of keys such as name, data, components"]
    non_finite = dict(_non_finite_numbers(document))
    problems: list[str] = [f"{_yaml_path(path)}: must be a finite number, not {value}"
                           for path, value in non_finite.items()]
    errors = sorted((e for e in _validator().iter_errors(document) if tuple(e.absolute_path) not in non_finite),
                    key=lambda e: [str(p) for p in e.absolute_path])
    for error in errors:
        for problem in _describe(error):
            if problem not in problems:
                problems.append(problem)
    if not problems:
        problems.extend(_cross_field_problems(document))
    return problems


def _non_finite_numbers(value: Any, path: tuple = ()):
    """(path, value) of every .nan, .inf and -.inf in the document: JSON Schema's bounds are comparisons, which
    NaN passes, and no setting means anything by them (`compile` would write them into invalid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite_numbers(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite_numbers(item, (*path, index))


def _cross_field_problems(document: dict) -> list[str]:
    """Rules JSON Schema cannot say: which components need which, and ordered pairs of values."""
    problems = []
    components = document["components"]
    for name, needs in COMPONENT_NEEDS.items():
        if name in components:
            problems += [f"components.{name}: needs components.{need}, which the spec leaves out"
                         for need in needs if need not in components]
    quantizer = components.get("quantizer", {})
    unknown_required = [v for v in quantizer.get("required_variants", ())
                        if v not in quantizer.get("variants", QUANTIZATION_VARIANTS)]
    if unknown_required:
        problems.append(f"components.quantizer.required_variants: {', '.join(unknown_required)} "
                        "is not among components.quantizer.variants")
    for path, low, high in (("serving_pusher.autoscaling", "min_replicas", "max_replicas"),
                            ("gcp_pusher", "min_replicas", "max_replicas")):
        section = components
        for key in path.split("."):
            section = section.get(key, {})
        if low in section and high in section and section[low] > section[high]:
            problems.append(f"components.{path}.{low}: must be <= {high} ({section[high]})")
    steps = components.get("serving_pusher", {}).get("analysis", {}).get("steps")
    problem = canary_steps_problem(tuple(steps)) if steps else None
    if problem:
        problems.append(f"components.serving_pusher.analysis.steps: {problem}")
    return problems


def canary_steps_problem(steps: tuple[int, ...]) -> str | None:
    """Why `steps` cannot be an analysed canary's weights (None when they can): each 1..100, rising, ending
    at 100 (the last step is the whole traffic, judged before the promotion)."""
    if not steps or any(not 1 <= s <= 100 for s in steps):
        return "each step is a percent from 1 to 100"
    if list(steps) != sorted(set(steps)):
        return f"steps must rise: {', '.join(map(str, steps))}"
    if steps[-1] != 100:
        return f"the last step must be 100 (the whole traffic), not {steps[-1]}"
    return None


def _yaml_path(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _describe(error: jsonschema.ValidationError) -> list[str]:
    where = _yaml_path(error.absolute_path)
    kind, limit, value = error.validator, error.validator_value, error.instance
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted((k for k in value if k not in allowed), key=str)  # YAML keys may be numbers too
        prefix = "" if where == "(top level)" else f"{where}."
        return [f"{prefix}{key}: unknown key (allowed: {', '.join(allowed) or 'none'})" for key in unknown]
    if kind == "required":
        prefix = "" if where == "(top level)" else f"{where}."
        return [f"{prefix}{key}: required key is missing" for key in limit if key not in value]
    messages = {
        "minimum": lambda: f"must be >= {limit}",
        "exclusiveMinimum": lambda: f"must be > {limit}",
        "maximum": lambda: f"must be <= {limit}",
        "exclusiveMaximum": lambda: f"must be < {limit}",
        "type": lambda: f"must be {_a(limit)}, not {_a(_json_type(value))}",
        "enum": lambda: f"must be one of {', '.join(map(str, limit))} (got {value!r})",
        "const": lambda: f"must be {limit!r}",
        "pattern": lambda: f"{value!r} is not a valid value (must match {limit})",
        "minLength": lambda: "must not be empty",
        "maxLength": lambda: f"must be at most {limit} characters",
        "minItems": lambda: f"must have at least {limit} item{'s' if limit != 1 else ''}",
        "maxItems": lambda: f"must have at most {limit} item{'s' if limit != 1 else ''}",
        "uniqueItems": lambda: "must not repeat an item",
        "minProperties": lambda: f"must set at least {limit} key",
        "maxProperties": lambda: f"must set at most {limit} key (choose one)",
    }
    describe = messages.get(kind)
    return [f"{where}: {describe() if describe else error.message}"]


def _a(type_name: Any) -> str:
    name = "/".join(type_name) if isinstance(type_name, list) else str(type_name)
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _build(document: dict, source_file: Path) -> PipelineSpec:
    """The typed spec, with the defaults that depend on the workspace filled in."""
    spec = replace(from_document(PipelineSpec, document), source_file=source_file)
    metadata = spec.metadata
    if metadata.sqlite is None and metadata.mysql is None:
        metadata = replace(metadata, sqlite=spec.workspace / "metadata.sqlite")
    components = spec.components
    if components.serving_pusher and components.serving_pusher.base_path is None:
        components = replace(components, serving_pusher=replace(components.serving_pusher,
                                                                base_path=spec.workspace / "serving"))
    return replace(spec, metadata=metadata, components=components)
