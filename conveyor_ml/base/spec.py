"""Loads a pipeline YAML, validates all of it against schemas/pipeline.schema.json, returns typed specs.

Nothing here imports TensorFlow or TFX: `conveyor validate` stays fast and a bad spec is rejected
before any TFX object is built.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

# jsonschema imports rfc3987_syntax when installed (Jupyter, a TFX dependency, pulls it in), which builds
# a grammar for 1.3 s at import; our schema checks no IRI formats, so every command is spared the wait.
sys.modules.setdefault("rfc3987_syntax", None)
import jsonschema  # noqa: E402
import yaml  # noqa: E402

from conveyor_ml.base.errors import ConveyorError  # noqa: E402
from conveyor_ml.base.yaml_loading import load_yaml_file  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = PROJECT_ROOT / "schemas" / "pipeline.schema.json"
QUANTIZATION_VARIANTS = ("float32", "float16", "dynamic_range", "int8")

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
class DriftSpec:
    policy: str = "retrain"
    label_linf_threshold: float = 0.1
    pixel_js_threshold: float = 0.1


@dataclass(frozen=True)
class DataSpec:
    source: str
    image_shape: tuple[int, int]
    schema: Path
    path: str | None = None
    eval_fraction: float = 0.2
    window_spans: int = 1
    drift: DriftSpec = field(default_factory=DriftSpec)


@dataclass(frozen=True)
class ModelArchitecture:
    conv_filters: tuple[int, ...] = (16, 32)
    dense_units: int = 64
    dropout: float = 0.1


@dataclass(frozen=True)
class TrainerSpec:
    strategy: str = "mirrored"
    cpu_replicas: int = 1
    num_workers: int = 2
    train_steps: int = 600
    batch_size: int = 32
    learning_rate: float = 0.003
    scale_learning_rate: bool = False
    warm_start: bool = False
    model: ModelArchitecture = field(default_factory=ModelArchitecture)


@dataclass(frozen=True)
class EvaluatorSpec:
    min_accuracy: float = 0.9
    max_accuracy_drop: float = 0.01


@dataclass(frozen=True)
class InfraValidatorSpec:
    num_examples: int = 10
    timeout_seconds: float = 120.0


@dataclass(frozen=True)
class QuantizerSpec:
    variants: tuple[str, ...] = QUANTIZATION_VARIANTS
    required_variants: tuple[str, ...] = ()
    representative_examples: int = 200
    max_accuracy_drop_points: float = 1.0
    threads: int = 2
    latency_runs: int = 200
    throughput_batch_size: int = 64


@dataclass(frozen=True)
class BatchingSpec:
    max_batch_size: int = 128
    batch_timeout_micros: int = 5000
    max_enqueued_batches: int = 10
    num_batch_threads: int = 2


@dataclass(frozen=True)
class AutoscalingSpec:
    min_replicas: int = 2
    max_replicas: int = 10
    target_cpu_utilization: int = 70


@dataclass(frozen=True)
class ServingPusherSpec:
    model_name: str
    base_path: Path
    release: str = "direct"
    canary_weight: int = 10
    keep_versions: int = 5
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    autoscaling: AutoscalingSpec = field(default_factory=AutoscalingSpec)


@dataclass(frozen=True)
class GcpPusherSpec:
    project: str
    region: str
    bucket: str
    prefix: str = "conveyor"
    model_display_name: str | None = None
    endpoint: str | None = None
    machine_type: str = "n1-standard-2"
    min_replicas: int = 1
    max_replicas: int = 2
    canary_weight: int = 10
    serving_image: str = "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-16:latest"
    credentials: str | None = None
    dry_run: bool = False
    retry_seconds: float = 300.0
    upload_workers: int = 8
    # Emulators and fakes (tests, local trials); unset means Google's own endpoints.
    storage_endpoint: str | None = None
    vertex_endpoint: str | None = None


@dataclass(frozen=True)
class MysqlSpec:
    host: str
    database: str
    user: str
    port: int = 3306
    password_env: str | None = None

    def password(self) -> str:
        return os.environ.get(self.password_env, "") if self.password_env else ""


@dataclass(frozen=True)
class MetadataSpec:
    sqlite: Path | None = None
    mysql: MysqlSpec | None = None


@dataclass(frozen=True)
class ComponentsSpec:
    statistics_gen: bool = False
    example_validator: bool = False
    trainer: TrainerSpec | None = None
    evaluator: EvaluatorSpec | None = None
    infra_validator: InfraValidatorSpec | None = None
    quantizer: QuantizerSpec | None = None
    serving_pusher: ServingPusherSpec | None = None
    gcp_pusher: GcpPusherSpec | None = None


@dataclass(frozen=True)
class KubeflowSpec:
    image: str = "gcr.io/your-project/conveyor:latest"
    pipeline_root: str = "gs://your-bucket/conveyor"
    data_root_override: str | None = None

    @property
    def data_root(self) -> str:
        return self.data_root_override or f"{self.pipeline_root.rstrip('/')}/data"


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    workspace: Path
    data: DataSpec
    components: ComponentsSpec
    beam_args: tuple[str, ...]
    metadata: MetadataSpec
    source_file: Path
    schedule_cron: str | None = None
    kubeflow: KubeflowSpec = field(default_factory=KubeflowSpec)

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


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def load_spec(path: str | os.PathLike) -> PipelineSpec:
    """Reads and validates a spec file; raises ConveyorError listing every problem found."""
    spec_path = Path(path)
    return parse_spec(_read_document(spec_path), spec_path)


def _read_document(spec_path: Path, extended_by: tuple[Path, ...] = ()) -> Any:
    """The YAML document, with `extends: other.yaml` (relative to this file) merged under it: mappings
    merge key by key, anything else is replaced, and `key: null` removes a key of the base."""
    if not spec_path.is_file():
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
    base_path = (spec_path.parent / str(document.pop("extends"))).resolve()
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
    if problems:
        raise ConveyorError(f"{source_file}: invalid spec:\n" + "\n".join(f"  {p}" for p in problems))
    return _build(document, source_file)


def validation_problems(document: Any) -> list[str]:
    """Every schema and wiring problem, each as '<yaml.path>: <what is wrong>', in document order."""
    if not isinstance(document, dict):
        return ["(top level): must be a mapping of keys such as name, data, components"]
    errors = sorted(_validator().iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    problems: list[str] = []
    for error in errors:
        for problem in _describe(error):
            if problem not in problems:
                problems.append(problem)
    if not problems:
        problems.extend(_cross_field_problems(document))
    return problems


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
    return problems


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
        unknown = sorted(k for k in value if k not in allowed)
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


def _build(doc: dict, source_file: Path) -> PipelineSpec:
    workspace = Path(doc.get("workspace", "workspace"))
    data = dict(doc["data"])
    data["image_shape"] = tuple(data["image_shape"])
    data["schema"] = Path(data["schema"])
    data["drift"] = DriftSpec(**data.get("drift", {}))
    components_doc = doc["components"]
    components = ComponentsSpec(
        statistics_gen="statistics_gen" in components_doc,
        example_validator="example_validator" in components_doc,
        trainer=_trainer(components_doc["trainer"]) if "trainer" in components_doc else None,
        evaluator=_optional(EvaluatorSpec, components_doc, "evaluator"),
        infra_validator=_optional(InfraValidatorSpec, components_doc, "infra_validator"),
        quantizer=_quantizer(components_doc["quantizer"]) if "quantizer" in components_doc else None,
        serving_pusher=(_serving_pusher(components_doc["serving_pusher"], workspace)
                        if "serving_pusher" in components_doc else None),
        gcp_pusher=_optional(GcpPusherSpec, components_doc, "gcp_pusher"),
    )
    metadata_doc = doc.get("metadata", {"sqlite": str(workspace / "metadata.sqlite")})
    metadata = MetadataSpec(
        sqlite=Path(metadata_doc["sqlite"]) if "sqlite" in metadata_doc else None,
        mysql=MysqlSpec(**metadata_doc["mysql"]) if "mysql" in metadata_doc else None,
    )
    return PipelineSpec(
        name=doc["name"],
        workspace=workspace,
        data=DataSpec(**data),
        components=components,
        beam_args=tuple(doc.get("beam", {}).get("args", ("--direct_running_mode=in_memory",))),
        metadata=metadata,
        source_file=source_file,
        schedule_cron=doc.get("schedule", {}).get("cron"),
        kubeflow=KubeflowSpec(**{("data_root_override" if k == "data_root" else k): v
                                 for k, v in doc.get("kubeflow", {}).items()}),
    )


def _optional(cls, components_doc: dict, key: str):
    return cls(**components_doc[key]) if key in components_doc else None


def _trainer(doc: dict) -> TrainerSpec:
    doc = dict(doc)
    model = dict(doc.pop("model", {}))
    if "conv_filters" in model:
        model["conv_filters"] = tuple(model["conv_filters"])
    return TrainerSpec(model=ModelArchitecture(**model), **doc)


def _quantizer(doc: dict) -> QuantizerSpec:
    doc = dict(doc)
    for key in ("variants", "required_variants"):
        if key in doc:
            doc[key] = tuple(doc[key])
    return QuantizerSpec(**doc)


def _serving_pusher(doc: dict, workspace: Path) -> ServingPusherSpec:
    doc = dict(doc)
    doc["base_path"] = Path(doc.get("base_path", workspace / "serving"))
    doc["batching"] = BatchingSpec(**doc.get("batching", {}))
    doc["autoscaling"] = AutoscalingSpec(**doc.get("autoscaling", {}))
    return ServingPusherSpec(**doc)
