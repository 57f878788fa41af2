"""The model server core shared by the REST and gRPC front ends: models, versions, batching, metrics."""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tensorflow_serving.config import model_server_config_pb2

from conveyor_ml.formats import serving_config
from conveyor_ml.serving.batcher import Batcher
from conveyor_ml.serving.errors import ServingError
from conveyor_ml.serving.loader import load_servable
from conveyor_ml.serving.metrics import ServingMetrics
from conveyor_ml.serving.model_quality import ModelQuality
from conveyor_ml.serving.routing import sticky_servable
from conveyor_ml.serving.servable import LoadOptions, Servable
from conveyor_ml.serving.shadow import ShadowMirror
from conveyor_ml.serving.version_manager import LoadRetries, ModelRegistry, ModelVersions

log = logging.getLogger("conveyor.serving")
TRAFFIC_POLL_SECONDS = 1.0  # traffic.json is re-read this often when version polling is off


def default_threads() -> int:
    """TF Serving's default for --rest_api_num_threads and --grpc_max_threads: 4 per schedulable CPU."""
    return 4 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass(frozen=True)
class ServerOptions:
    """Named like tensorflow_model_server's flags (server.py validates them)."""

    port: int = 8500
    rest_api_port: int = 8501
    grpc_host: str = "127.0.0.1"
    rest_api_host: str = "127.0.0.1"
    grpc_socket_path: str | None = None
    grpc_channel_arguments: tuple[tuple[str, int | str], ...] = ()
    grpc_max_threads: int = field(default_factory=default_threads)
    enable_grpc_healthcheck_service: bool = False
    enable_serialization_as_tensor_content: bool = False
    rest_api_num_threads: int = field(default_factory=default_threads)
    rest_api_timeout_in_ms: int = 30000
    rest_api_enable_cors_support: bool = False
    model_name: str | None = None
    model_base_path: str | None = None
    model_config_file: str | None = None
    model_config_file_poll_wait_seconds: float = 0.0
    file_system_poll_wait_seconds: float = 1.0
    enable_batching: bool = False
    batching_parameters_file: str | None = None
    prometheus_path: str | None = None
    load: LoadOptions = field(default_factory=LoadOptions)
    load_retries: LoadRetries = field(default_factory=LoadRetries)
    num_load_threads: int = 0
    max_request_body_bytes: int = 16 * 1024 * 1024
    traffic_file: str | None = None
    input_schema: str | None = None  # a TFDV schema: inputs outside its domains are counted (and maybe rejected)
    reject_anomalous_inputs: bool = False


class ModelServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = ServingMetrics(versions_loaded=self._versions_loaded)
        self.registry = ModelRegistry(functools.partial(load_servable, options=options.load),
                                      on_load=self.metrics.observe_load, retries=options.load_retries,
                                      load_threads=options.num_load_threads)
        self.quality = ModelQuality(self.metrics, schema_file=options.input_schema,
                                    reject_anomalous=options.reject_anomalous_inputs)
        self.traffic = serving_config.TrafficWeights()
        self._traffic_path = self._traffic_file()
        self._config_text: str | None = None
        self.batcher = None
        if options.enable_batching:
            batching = (serving_config.read_batching_options(Path(options.batching_parameters_file))
                        if options.batching_parameters_file else serving_config.BatchingOptions())
            self.batcher = Batcher(batching, on_batch=self.metrics.observe_batch)
        # Model calls without batching run off the event loop: REST's and gRPC's on their own pools, sized by
        # --rest_api_num_threads and --grpc_max_threads.
        self.executors = {
            "rest": ThreadPoolExecutor(max_workers=options.rest_api_num_threads, thread_name_prefix="rest"),
            "grpc": ThreadPoolExecutor(max_workers=options.grpc_max_threads, thread_name_prefix="grpc"),
        }
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        # Progressive delivery (serving/shadow.py): mirrored copies of live requests for the shadow version.
        self.shadow = ShadowMirror(self.registry, lambda: self.traffic, self.metrics,
                                   options.rest_api_timeout_in_ms or None)
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
            text = path.read_text() if path.is_file() else None
            if not initial and text == self._config_text:
                return
            config = serving_config.read_model_server_config(path)
            self._config_text = text
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
        """Loads what is on disk now (before the ports open, as TF Serving does), then polls in the background:
        versions every --file_system_poll_wait_seconds (0: never again), the config file every
        --model_config_file_poll_wait_seconds (0: never again), traffic weights with the versions."""
        self.poll_once()
        self._poller = threading.Thread(target=self._poll_loop, name="poller", daemon=True)
        self._poller.start()

    def _poll_loop(self) -> None:
        fs_wait = self.options.file_system_poll_wait_seconds
        config_wait = self.options.model_config_file_poll_wait_seconds if self.options.model_config_file else 0.0
        traffic_wait = fs_wait if fs_wait > 0 else TRAFFIC_POLL_SECONDS
        now = time.monotonic()
        due = {"versions": now + fs_wait if fs_wait > 0 else None,
               "config": now + config_wait if config_wait > 0 else None,
               "traffic": now + traffic_wait if self._traffic_path else None}
        while True:
            pending = [t for t in due.values() if t is not None]
            if not pending or self._stop.wait(max(0.0, min(pending) - time.monotonic())):
                return
            now = time.monotonic()
            if due["config"] is not None and now >= due["config"]:
                due["config"] = now + config_wait
                try:
                    self._load_config()
                except Exception as exc:  # keep serving the last good config
                    log.error("Failed to read ModelServerConfig file: %s", exc)
                self.registry.poll_all()  # load what a changed config wants now
            if due["traffic"] is not None and now >= due["traffic"]:
                due["traffic"] = now + traffic_wait
                self._load_traffic()
            if due["versions"] is not None and now >= due["versions"]:
                due["versions"] = now + fs_wait
                self.registry.poll_all()

    def _versions_loaded(self) -> dict[str, int]:
        return {model.name: len(model.available_versions()) for model in self.registry.models()}

    def readiness(self) -> dict[str, str]:
        """{model: why it cannot serve yet} for every configured model without an available version."""
        waiting = {}
        for model in self.registry.models():
            if not model.available_versions():
                waiting[model.name] = model.waiting_reason or "no version loaded yet"
        return waiting

    def is_ready(self) -> bool:
        return bool(self.registry.models()) and not self.readiness()

    def model(self, name: str) -> ModelVersions:
        return self.registry.get(name)

    def resolve(self, name: str, version: int | None, label: str | None, route_key: str | None = None) -> Servable:
        """The servable for a request; an unversioned one with a route key (serving/routing.py) is served by
        the version its key hashes to."""
        model = self.registry.get(name)
        weights = self.traffic.for_model(name) if version is None and not label else None
        if weights and route_key is not None:
            servable = sticky_servable(model, weights, route_key)
            if servable is not None:
                return servable
        return model.resolve(version, label, weights)

    def run(self, protocol: str, function, *args) -> Future:
        """Runs model work on the protocol's pool ("rest" or "grpc")."""
        return self.executors[protocol].submit(function, *args)

    def predict_future(self, servable: Servable, signature: str, inputs: dict[str, np.ndarray],
                       output_filter: tuple[str, ...] = (), protocol: str = "rest",
                       timeout_ms: int | None = None) -> Future:
        """Runs a prediction through the batcher when batching is on, else on the protocol's pool; the model
        run is bounded by `timeout_ms` (--rest_api_timeout_in_ms, a gRPC client's deadline)."""
        if self.batcher is not None and not output_filter:
            # Checked per request: after merging and padding, a bad request would fail the whole batch.
            name = servable.validate_inputs(signature, inputs)
            deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None
            return self.batcher.submit(servable, name, inputs, deadline)
        return self.run(protocol, servable.predict, signature, inputs, output_filter, timeout_ms)

    def observe(self, model: str, version: int | None, api: str, protocol: str, error: ServingError | None,
                seconds: float) -> None:
        status = "OK" if error is None else error.code.name
        self.metrics.observe_request(model, version, api, protocol, status, seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._poller:
            self._poller.join(timeout=5)
        self.shadow.stop()
        if self.batcher:
            self.batcher.stop()
        for executor in self.executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
