"""The model server core shared by the REST and gRPC front ends: models, versions, batching, metrics."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tensorflow_serving.config import model_server_config_pb2

from conveyor_ml.formats import serving_config
from conveyor_ml.serving.batcher import Batcher
from conveyor_ml.serving.errors import ServingError
from conveyor_ml.serving.metrics import ServingMetrics
from conveyor_ml.serving.model_quality import ModelQuality
from conveyor_ml.serving.servable import Servable
from conveyor_ml.serving.version_manager import ModelRegistry, ModelVersions

log = logging.getLogger("conveyor.serving")


@dataclass(frozen=True)
class ServerOptions:
    """Named like tensorflow_model_server's flags."""

    port: int = 8500
    rest_api_port: int = 8501
    grpc_host: str = "127.0.0.1"
    rest_api_host: str = "127.0.0.1"
    model_name: str | None = None
    model_base_path: str | None = None
    model_config_file: str | None = None
    model_config_file_poll_wait_seconds: float = 0.0
    file_system_poll_wait_seconds: float = 1.0
    enable_batching: bool = False
    batching_parameters_file: str | None = None
    prometheus_path: str | None = None
    max_request_body_bytes: int = 16 * 1024 * 1024
    traffic_file: str | None = None
    input_schema: str | None = None  # a TFDV schema: inputs outside its domains are counted (and maybe rejected)
    reject_anomalous_inputs: bool = False


class ModelServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = ServingMetrics(versions_loaded=self._versions_loaded)
        self.registry = ModelRegistry(Servable, on_load=self.metrics.observe_load)
        self.quality = ModelQuality(self.metrics, schema_file=options.input_schema,
                                    reject_anomalous=options.reject_anomalous_inputs)
        self.traffic = serving_config.TrafficWeights()
        self._traffic_path = self._traffic_file()
        self._config_mtime = 0.0
        self.batcher = None
        if options.enable_batching:
            batching = (serving_config.read_batching_options(Path(options.batching_parameters_file))
                        if options.batching_parameters_file else serving_config.BatchingOptions())
            self.batcher = Batcher(batching, on_batch=self.metrics.observe_batch)
        # Model calls without batching run here, off the REST event loop.
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="predict")
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._load_config(initial=True)

    def _traffic_file(self) -> Path | None:
        if self.options.traffic_file:
            return Path(self.options.traffic_file)
        if self.options.model_config_file:
            return Path(self.options.model_config_file).parent / serving_config.TRAFFIC_FILE
        return None

    def _load_config(self, initial: bool = False) -> None:
        if self.options.model_config_file:
            path = Path(self.options.model_config_file)
            mtime = path.stat().st_mtime if path.exists() else 0.0
            if not initial and mtime == self._config_mtime:
                return
            config = serving_config.read_model_server_config(path)
            self._config_mtime = mtime
        else:
            config = serving_config.single_model_config(self.options.model_name, self.options.model_base_path)
        self.registry.apply(config)

    def apply_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """HandleReloadConfigRequest: replace the model list now and load what it wants."""
        self.registry.apply(config)
        self.registry.poll_all()

    def _load_traffic(self) -> None:
        if self._traffic_path is None:
            return
        try:
            self.traffic = serving_config.read_traffic(self._traffic_path)
        except Exception as exc:  # a bad traffic file keeps the last good weights
            log.error("ignoring %s: %s", self._traffic_path, exc)

    def poll_once(self) -> None:
        self._load_traffic()
        self.registry.poll_all()

    def start_polling(self) -> None:
        self.poll_once()
        self._poller = threading.Thread(target=self._poll_loop, name="poller", daemon=True)
        self._poller.start()

    def _poll_loop(self) -> None:
        fs_wait = max(0.05, self.options.file_system_poll_wait_seconds)
        config_wait = self.options.model_config_file_poll_wait_seconds
        next_config = time.monotonic() + config_wait
        while not self._stop.wait(fs_wait):
            if config_wait > 0 and time.monotonic() >= next_config:
                next_config = time.monotonic() + config_wait
                try:
                    self._load_config()
                except Exception as exc:  # keep serving the last good config
                    log.error("ignoring the new model config: %s", exc)
            self.poll_once()

    def _versions_loaded(self) -> dict[str, int]:
        return {model.name: len(model.available_versions()) for model in self.registry.models()}

    def is_ready(self) -> bool:
        models = self.registry.models()
        return bool(models) and all(model.available_versions() for model in models)

    def model(self, name: str) -> ModelVersions:
        return self.registry.get(name)

    def resolve(self, name: str, version: int | None, label: str | None) -> Servable:
        model = self.registry.get(name)
        weights = self.traffic.for_model(name) if version is None and not label else None
        return model.resolve(version, label, weights)

    def predict_future(self, servable: Servable, signature: str, inputs: dict[str, np.ndarray],
                       output_filter: tuple[str, ...] = ()) -> Future:
        """Runs a prediction through the batcher when batching is on, else on the executor."""
        if self.batcher is not None and not output_filter:
            # Checked per request: after merging and padding, a bad request would fail the whole batch.
            name = servable.validate_inputs(signature, inputs)
            return self.batcher.submit(servable, name, inputs)
        return self.executor.submit(servable.predict, signature, inputs, output_filter)

    def observe(self, model: str, version: int | None, api: str, protocol: str, error: ServingError | None,
                seconds: float) -> None:
        status = "OK" if error is None else error.code.name
        self.metrics.observe_request(model, version, api, protocol, status, seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._poller:
            self._poller.join(timeout=5)
        if self.batcher:
            self.batcher.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
