"""TF Serving's configuration files, read and written with its protos, plus Conveyor's traffic weights.

- `models.config`: ModelServerConfig text proto (tensorflow-serving-api's own proto).
- `batching.config`: BatchingParameters text proto; `monitoring.config`: MonitoringConfig text proto.
  tensorflow-serving-api does not ship these two, so `protos/serving_config.proto` declares them with
  TF Serving's field names and numbers and grpcio-tools compiles it at import time.
- `traffic.json`: the weights per version label for unversioned requests (TF Serving has no weights;
  in production Istio splits traffic between per-label deployments, see `conveyor deploy render`).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.files import write_atomically
from conveyor_ml.base.names import PROMETHEUS_PATH

MODELS_CONFIG = "models.config"
BATCHING_CONFIG = "batching.config"
TRAFFIC_FILE = "traffic.json"


def _compile_serving_protos():
    protos_dir = str(Path(__file__).parent / "protos")
    sys.path.insert(0, protos_dir)
    try:
        return grpc.protos("serving_config.proto")
    finally:
        sys.path.remove(protos_dir)


serving_config_pb2 = _compile_serving_protos()


# The full names TF Serving's parser reports (our copies of two of its protos live in another package).
TF_SERVING_PROTO_NAMES = {
    "ModelServerConfig": "tensorflow.serving.ModelServerConfig",
    "BatchingParameters": "tensorflow.serving.BatchingParameters",
    "MonitoringConfig": "tensorflow.serving.MonitoringConfig",
}


def _parse_text_proto(path: Path, message, what: str):
    """`message` parsed from the text proto at `path`; a file that does not parse is reported in one line
    the way TF Serving reports it (`Error parsing text-format tensorflow.serving.ModelServerConfig: ...`)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConveyorError(f"{what} not found: {path}") from None
    except UnicodeDecodeError:
        raise ConveyorError(f"{path}: not a {what} text proto (not UTF-8 text)") from None
    except OSError as exc:
        raise ConveyorError(f"{path}: cannot read the {what} text proto ({exc.strerror})") from None
    try:
        return text_format.Parse(text, message)
    except RecursionError:
        raise ConveyorError(f"{path}: Error parsing text-format {TF_SERVING_PROTO_NAMES.get(what, what)}: "
                            f"nested too deeply (not a valid {what} text proto)") from None
    except text_format.ParseError as exc:
        detail = " ".join(str(exc).split())
        raise ConveyorError(f"{path}: Error parsing text-format {TF_SERVING_PROTO_NAMES.get(what, what)}: "
                            f"{detail} (not a valid {what} text proto)") from None


def read_model_server_config(path: Path) -> model_server_config_pb2.ModelServerConfig:
    config = _parse_text_proto(path, model_server_config_pb2.ModelServerConfig(), "ModelServerConfig")
    if config.WhichOneof("config") == "custom_model_config":
        raise ConveyorError(f"{path}: custom_model_config is not supported; use model_config_list")
    seen = set()
    for model in config.model_config_list.config:
        if not model.name or not model.base_path:
            raise ConveyorError(f"{path}: every model needs a name and a base_path")
        if model.name in seen:
            raise ConveyorError(f"{path}: model {model.name!r} is configured twice")
        seen.add(model.name)
    return config


def write_model_server_config(path: Path, config: model_server_config_pb2.ModelServerConfig) -> None:
    write_atomically(path, text_format.MessageToString(config))


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """What `--model_name` + `--model_base_path` mean: one model, latest version."""
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = name
    model.base_path = str(base_path)
    model.model_platform = "tensorflow"
    return config


@dataclass(frozen=True)
class BatchingOptions:
    """BatchingParameters with TF Serving's defaults filled in."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 100
    num_batch_threads: int = 2
    allowed_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_enqueued_batches < 1 or self.num_batch_threads < 1:
            raise ConveyorError("batching parameters: max_batch_size, max_enqueued_batches and "
                                "num_batch_threads must be >= 1")
        if self.batch_timeout_micros < 0:
            raise ConveyorError("batching parameters: batch_timeout_micros must be >= 0")
        sizes = self.allowed_batch_sizes
        if sizes and (list(sizes) != sorted(set(sizes)) or sizes[-1] != self.max_batch_size):
            raise ConveyorError("batching parameters: allowed_batch_sizes must increase and end with "
                                "max_batch_size (TF Serving's rule)")


def read_batching_options(path: Path) -> BatchingOptions:
    params = _parse_text_proto(path, serving_config_pb2.BatchingParameters(), "BatchingParameters")
    defaults = BatchingOptions()
    return BatchingOptions(
        max_batch_size=params.max_batch_size.value if params.HasField("max_batch_size") else defaults.max_batch_size,
        batch_timeout_micros=(params.batch_timeout_micros.value if params.HasField("batch_timeout_micros")
                              else defaults.batch_timeout_micros),
        max_enqueued_batches=(params.max_enqueued_batches.value if params.HasField("max_enqueued_batches")
                              else defaults.max_enqueued_batches),
        num_batch_threads=(params.num_batch_threads.value if params.HasField("num_batch_threads")
                           else defaults.num_batch_threads),
        allowed_batch_sizes=tuple(params.allowed_batch_sizes),
    )


def batching_parameters_text(max_batch_size: int, batch_timeout_micros: int, max_enqueued_batches: int,
                             num_batch_threads: int) -> str:
    params = serving_config_pb2.BatchingParameters()
    params.max_batch_size.value = max_batch_size
    params.batch_timeout_micros.value = batch_timeout_micros
    params.max_enqueued_batches.value = max_enqueued_batches
    params.num_batch_threads.value = num_batch_threads
    return text_format.MessageToString(params)


def read_prometheus_path(path: Path) -> str | None:
    """The metrics path a MonitoringConfig enables, or None when it leaves Prometheus off."""
    config = _parse_text_proto(path, serving_config_pb2.MonitoringConfig(), "MonitoringConfig")
    if not config.prometheus_config.enable:
        return None
    return config.prometheus_config.path or PROMETHEUS_PATH


def monitoring_config_text(path: str = PROMETHEUS_PATH) -> str:
    config = serving_config_pb2.MonitoringConfig()
    config.prometheus_config.enable = True
    config.prometheus_config.path = path
    return text_format.MessageToString(config)


@dataclass
class TrafficWeights:
    """{model name: {version label: percent}}; labels resolve through models.config's version_labels.

    Two optional parts ride along (older servers ignore them): `shadows`, {model: {"label": L, "percent": P}}
    (P % of live requests are mirrored to L's version in the background; with "pair": M, the requests L's
    version serves are mirrored to M's), and `route_keys`, {model: header}
    (the split is by a hash of that request header, so one user stays on one version)."""

    models: dict[str, dict[str, int]] = field(default_factory=dict)
    shadows: dict[str, dict] = field(default_factory=dict)
    route_keys: dict[str, str] = field(default_factory=dict)

    def for_model(self, name: str) -> dict[str, int]:
        return dict(self.models.get(name, {}))


def read_traffic(path: Path) -> TrafficWeights:
    """The weights in traffic.json (none when it is missing); a file that cannot be read is a one-line error
    naming it (release commands rewrite an unreadable one from release_state.json instead)."""
    fix = "it holds the traffic weights per version label: fix it or restore it from a backup"
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return TrafficWeights()
    except UnicodeDecodeError:
        raise ConveyorError(f"{path}: not UTF-8 text; {fix}") from None
    except OSError as exc:
        raise ConveyorError(f"{path}: cannot read it ({exc.strerror}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise ConveyorError(f"{path}: not valid JSON ({exc.msg}); {fix}") from None
    except RecursionError:
        raise ConveyorError(f"{path}: nested too deeply; {fix}") from None
    except ValueError as exc:  # a number Python's JSON reader refuses (an integer of over 4,300 digits)
        raise ConveyorError(f"{path}: not valid JSON ({exc}); {fix}") from None
    models = document.get("models", {}) if isinstance(document, dict) else None
    if not isinstance(models, dict):
        raise ConveyorError(f'{path}: expected {{"models": {{name: {{label: percent}}}}}}')
    weights = {}
    for name, split in models.items():
        if not isinstance(split, dict) or not all(isinstance(v, int) and v >= 0 for v in split.values()):
            raise ConveyorError(f"{path}: weights of {name!r} must be non-negative integers per label")
        weights[name] = dict(split)
    shadows = document.get("shadow", {})
    if not isinstance(shadows, dict) or not all(
            isinstance(s, dict) and isinstance(s.get("label"), str) and isinstance(s.get("percent"), int)
            and 0 <= s["percent"] <= 100 and isinstance(s.get("pair", ""), str) for s in shadows.values()):
        raise ConveyorError(f'{path}: "shadow" must map models to {{"label": L, "percent": 0..100}} (and an '
                            'optional "pair": M)')
    route_keys = document.get("route_key", {})
    if not isinstance(route_keys, dict) or not all(isinstance(h, str) and h for h in route_keys.values()):
        raise ConveyorError(f'{path}: "route_key" must map models to a request header name')
    return TrafficWeights(weights, {k: dict(v) for k, v in shadows.items()}, dict(route_keys))


def traffic_text(traffic: TrafficWeights) -> str:
    document: dict = {"models": traffic.models}
    if traffic.shadows:
        document["shadow"] = traffic.shadows
    if traffic.route_keys:
        document["route_key"] = traffic.route_keys
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def write_traffic(path: Path, traffic: TrafficWeights) -> None:
    write_atomically(path, traffic_text(traffic))
