"""The model server core shared by the REST and gRPC front ends: models, versions, batching, metrics."""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import orjson
from tensorflow_serving.config import model_server_config_pb2

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.formats import serving_config
from conveyor_ml.serving.batcher import Batcher
from conveyor_ml.serving.errors import ServingError, invalid_argument, not_found, too_large, unavailable
from conveyor_ml.serving.loader import load_servable
from conveyor_ml.serving.metrics import UNKNOWN_MODEL, ServingMetrics, merge_expositions
from conveyor_ml.serving.model_quality import ModelQuality, feedback_entry, owner
from conveyor_ml.serving.peers import ControlHandler, Peers, WorkerSlot
from conveyor_ml.serving.routing import sticky_servable
from conveyor_ml.serving.servable import LoadOptions, Servable, input_size
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
    allow_version_labels_for_unavailable_models: bool = True  # TF Serving's default is false
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
    max_request_body_bytes: int = 16 * 1024 * 1024  # REST bodies and gRPC messages alike
    max_inflight_bytes: int | None = None  # request bytes admitted at once; None: 4 x max_request_body_bytes
    max_inflight_requests: int = 1000  # calls admitted at once
    max_connections: int | None = None  # per listener (REST, gRPC); None: what the open-file limit allows
    idle_connection_timeout_in_ms: int = 75_000  # a connection with nothing in flight this long is closed
    traffic_file: str | None = None
    input_schema: str | None = None  # a TFDV schema: inputs outside its domains are counted (and maybe rejected)
    reject_anomalous_inputs: bool = False
    server_processes: int = 1  # worker processes on the same ports (serving/peers.py)
    worker: WorkerSlot | None = None  # which of them this one is; None when serving in one process


LARGE_REQUEST_BYTES = 256 * 1024  # bodies from this size are decoded and encoded off the event loop
# A model whose calls cost less than this (Servable.estimated_run_seconds) runs on the event loop: handing
# a call to a pool thread and back costs about as much on this 2-core VM (300-450 us: two thread wake-ups,
# each an interrupt to the other core). Measured there: the digit model's Session run, ~150 us on the calling
# thread, answered REST at concurrency 1 and 32 about 1.3x as fast inline; its float32 TFLite variant (~40 us)
# 1.7x at concurrency 1.
INLINE_RUN_SECONDS = 300e-6
# After versions change, the servables are reported settled this much later (conveyor serve then refreezes its
# heap: a 0.2-0.4 s collection holding the GIL). Right away, it delayed the new version's first answers by as
# much (hot swap: rename to first answer 1.0 s -> 1.4 s); half a second later the new version has answered and
# requests still on the old one are done.
SETTLE_SECONDS = 0.5
RELOAD_COORDINATOR = 0  # the server process every ReloadConfig goes through (--server_processes)


def _runs_inline(servable: Servable, call: Call, inputs: dict[str, np.ndarray]) -> bool:
    """Whether the call's model run is cheap enough to run on the event loop (see INLINE_RUN_SECONDS), for
    inputs of its size."""
    if call.nbytes >= LARGE_REQUEST_BYTES:
        return False
    cost = servable.estimated_run_seconds(input_size(inputs))
    return cost is not None and cost < INLINE_RUN_SECONDS


@dataclass
class Call:
    """One API call from its admission to its answer: the labels its metrics are recorded under, and the
    request bytes it holds of the admission budget. `status` is a gRPC code name, REST calls included."""

    model: str  # a metrics label: the model's name if configured, else UNKNOWN_MODEL
    api: str
    protocol: str
    nbytes: int
    started: float = field(default_factory=time.perf_counter)
    version: int | None = None
    status: str = "OK"
    arriving: bool = False  # a Predict not yet handed to the batcher

    def fail(self, error: ServingError) -> None:
        self.status = error.code.name


class Admission:
    """Bounded admission: at most `max_requests` calls and `max_bytes` request bytes at once; past either a
    call is refused at once with UNAVAILABLE (REST 503), before its body is read or decoded, so a flood
    costs memory for what is admitted only. A single call of any allowed size is admitted when nothing else
    is in flight. Used from the event loop only (both front ends run on it)."""

    def __init__(self, max_requests: int, max_bytes: int):
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self.arriving = 0  # admitted Predict calls not yet handed to the batcher

    def admit(self, call: Call, declared: int = 0) -> None:
        """Charges the call's bytes (`call.nbytes`, held already: a gRPC message). `declared`, the bytes a REST
        body is to bring, must fit beside what is held now but is charged only as it arrives (grow): charged at
        admission, four clients that declared the largest body and sent nothing held the whole budget, every
        other call refused, until their read timed out."""
        if self.requests >= self.max_requests or (
                self.requests and self.bytes + call.nbytes + declared > self.max_bytes):
            raise self._at_capacity()
        self.requests += 1
        self.bytes += call.nbytes
        if call.arriving:
            self.arriving += 1

    def grow(self, call: Call, nbytes: int) -> None:
        """`nbytes` more of an admitted call's REST body arrived: refused past the byte budget, as an admission
        is, unless the call is alone."""
        if self.requests > 1 and self.bytes + nbytes > self.max_bytes:
            raise self._at_capacity()
        call.nbytes += nbytes
        self.bytes += nbytes

    def _at_capacity(self) -> ServingError:
        return unavailable(f"The server is at capacity ({self.requests} requests, {self.bytes:,} request bytes "
                           "in flight); retry later")

    def handed_over(self, call: Call) -> None:
        if call.arriving:
            call.arriving = False
            self.arriving -= 1

    def release(self, call: Call) -> None:
        self.handed_over(call)
        self.requests -= 1
        self.bytes -= call.nbytes


def admission_for(options: ServerOptions) -> Admission:
    """The admission limits of one server process: the configured ones, shared out between the processes
    when there are several (so that together they admit what one would), a body of the largest allowed size
    still admitted."""
    requests = options.max_inflight_requests
    nbytes = options.max_inflight_bytes or 4 * options.max_request_body_bytes
    count = options.worker.count if options.worker is not None else 1
    return Admission(-(-requests // count), max(options.max_request_body_bytes, -(-nbytes // count)))


SUPPORTED_PLATFORMS = ("", "tensorflow", "tflite")


def check_reload_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    """What TF Serving's ServerCore checks before a reload, in its words (a config that is not a
    ModelConfigList, empty included; a model listed twice; a relative base path; an unknown platform), and
    beyond it: a base path that is not a directory is refused here, where TF Serving's reload would wait for
    it until the client's deadline."""
    if config.WhichOneof("config") != "model_config_list":
        raise invalid_argument("ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
                               "ModelConfigList is currently supported")
    seen: set[str] = set()
    for model in config.model_config_list.config:
        if not model.name:
            raise invalid_argument("Every model in a ModelConfigList needs a name")
        if model.name in seen:
            raise invalid_argument(f"Illegal to list model {model.name} multiple times in config list")
        seen.add(model.name)
        if not os.path.isabs(model.base_path):
            raise invalid_argument(f"Expected model {model.name} to have an absolute path or URI; got "
                                   f"base_path()={model.base_path}")
        if model.model_platform not in SUPPORTED_PLATFORMS:
            raise invalid_argument(f"Model {model.name} requests unsupported platform {model.model_platform}")
        try:
            found = Path(model.base_path).is_dir()
        except OSError as exc:  # a path the OS refuses to look up (too long, say): a client's mistake too
            raise invalid_argument(f"Could not look up the base path of servable {model.name} ({exc.strerror}): "
                                   f"{model.base_path}") from None
        if not found:
            raise invalid_argument(f"Could not find base path {model.base_path} for servable {model.name}")


class ModelServer:
    def __init__(self, options: ServerOptions, on_servables_changed: Callable[[], None] | None = None,
                 settle_seconds: float = SETTLE_SECONDS):
        """`on_servables_changed()` runs once the servables settle after versions were loaded or unloaded
        (`conveyor serve` refreezes its heap then: serving/heap.py): at once for the models loaded before the
        ports open, else `settle_seconds` after the last change, on a timer thread, so the new version answers
        first and requests still on the old one finish; changes meanwhile are reported once."""
        self.options = options
        self._on_servables_changed = on_servables_changed
        self._settle_seconds = settle_seconds
        self._settle_timer: threading.Timer | None = None
        self._settle_lock = threading.Lock()
        worker = options.worker
        self.peers = Peers(worker) if worker is not None and worker.count > 1 else None
        self._reload_lock = asyncio.Lock()  # the reload coordinator's: one ReloadConfig at a time
        self.admission = admission_for(options)
        self.metrics = ServingMetrics(versions_loaded=self._versions_loaded)
        self.registry = ModelRegistry(functools.partial(load_servable, options=options.load),
                                      on_load=self.metrics.observe_load, retries=options.load_retries,
                                      load_threads=options.num_load_threads)
        self.quality = ModelQuality(self.metrics, schema_file=options.input_schema,
                                    reject_anomalous=options.reject_anomalous_inputs,
                                    id_prefix=f"{worker.index}-" if self.peers else "")
        self.traffic = serving_config.TrafficWeights()
        self._traffic_path = self._traffic_file()
        self._config_text: str | None = None
        self.batcher = None
        if options.enable_batching:
            batching = (serving_config.read_batching_options(Path(options.batching_parameters_file))
                        if options.batching_parameters_file else serving_config.BatchingOptions())
            self.batcher = Batcher(batching, on_batch=self.metrics.observe_batch,
                                   arriving=lambda: self.admission.arriving)
        # Model calls without batching run off the event loop: REST's and gRPC's on their own pools, sized by
        # --rest_api_num_threads and --grpc_max_threads.
        self.executors = {
            "rest": ThreadPoolExecutor(max_workers=options.rest_api_num_threads, thread_name_prefix="rest"),
            "grpc": ThreadPoolExecutor(max_workers=options.grpc_max_threads, thread_name_prefix="grpc"),
        }
        # Decoding and encoding large bodies: off the event loop, so one 16 MiB body does not stall every other
        # call (health probes included) while it is parsed. One thread: admission bounds what waits for it.
        self.codec_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codec")
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        # Progressive delivery (serving/shadow.py): mirrored copies of live requests for the shadow version.
        self.shadow = ShadowMirror(self.registry, lambda: self.traffic, self.metrics,
                                   options.rest_api_timeout_in_ms or None)
        self._load_config(initial=True)

    # -- what every server process knows a part of (serving/peers.py) -------------------------------------
    async def exposition(self) -> bytes:
        """The Prometheus exposition: this process's, added up with every other server process's."""
        own = self.metrics.exposition()
        if self.peers is None:
            return own
        return merge_expositions([own, *await self.peers.ask_others("metrics", listening_only=True)])

    async def monitoring(self, model: str) -> tuple[dict, dict]:
        """(per-version quality figures, shadow figures) of `model` across every server process."""
        states = [self._monitoring_state(model)]
        if self.peers is not None:
            states += [orjson.loads(answer) for answer in await self.peers.ask_others("state", model.encode(),
                                                                                 listening_only=True)]
        return (self.quality.summarize([state["quality"] for state in states]),
                self.shadow.summarize([state["shadow"] for state in states]))

    def _monitoring_state(self, model: str) -> dict:
        return {"quality": self.quality.state(model), "shadow": self.shadow.state(model)}

    async def feedback(self, model: str, entries: list[dict]) -> dict:
        """Ground truth for logged predictions: each entry applied by the process that logged its id (every
        entry is checked first, so a malformed one changes nothing anywhere); live accuracy across all."""
        if self.peers is None:
            return self.quality.feedback(model, entries)
        groups: dict[int, list[dict]] = {}
        for entry in entries:
            index = owner(feedback_entry(entry)[0], self.peers.slot.count)
            groups.setdefault(self.peers.slot.index if index is None else index, []).append(entry)
        accepted, unknown, touched = 0, collections.Counter(), set()
        for index, group in groups.items():
            if index == self.peers.slot.index:
                result = self.quality.feedback(model, group)
            else:
                result = orjson.loads(await self.peers.ask(index, "feedback", orjson.dumps(
                    {"model": model, "entries": group})))
            accepted += result["accepted"]
            unknown.update(result["unknown_prediction_ids"])
            touched.update(result["live_accuracy"])
        figures = (await self.monitoring(model))[0] if touched else {}
        in_order = []  # the unknown ids in the order they were sent, as one process lists them
        for entry in entries:
            prediction_id = str(entry["prediction_id"])
            if unknown[prediction_id]:
                unknown[prediction_id] -= 1
                in_order.append(prediction_id)
        return {"accepted": accepted, "unknown_prediction_ids": in_order,
                "live_accuracy": {version: figures[version]["feedback"]["accuracy"] for version in sorted(touched)}}

    async def reload_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """HandleReloadConfigRequest (apply_config). With several server processes every reload goes through
        the first, which applies it in itself and then in the others, one reload at a time: two reloads sent
        at once to different processes leave every process with the same config."""
        if self.peers is None:
            await self._apply_config_off_loop(config)
        elif self.peers.slot.index != RELOAD_COORDINATOR:
            await self.peers.ask(RELOAD_COORDINATOR, "reload-everywhere", config.SerializeToString(), timeout=None)
        else:
            await self._reload_everywhere(config)

    async def _reload_everywhere(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        async with self._reload_lock:
            # Every process must be listening: one still starting would miss the reload and keep the old config.
            starting = self.peers.starting()
            if starting:
                raise unavailable(f"server processes {starting} are still starting; retry the ReloadConfig")
            await self._apply_config_off_loop(config)
            await self.peers.ask_others("reload", config.SerializeToString(), timeout=None)
            log.info("ReloadConfig applied in all %d server processes: %s", self.peers.slot.count,
                     ", ".join(model.name for model in config.model_config_list.config))

    def _apply_config_off_loop(self, config: model_server_config_pb2.ModelServerConfig) -> asyncio.Future:
        """apply_config on the gRPC pool: it loads models, which must not stall the event loop."""
        return asyncio.wrap_future(self.run("grpc", self.apply_config, config))

    def control_handlers(self) -> dict[str, ControlHandler]:
        """What the other server processes may ask this one (serving/peers.py's control calls)."""

        async def metrics(body: bytes) -> bytes:
            return self.metrics.exposition()

        async def state(body: bytes) -> bytes:
            return orjson.dumps(self._monitoring_state(body.decode()))

        async def feedback(body: bytes) -> bytes:
            request = orjson.loads(body)
            return orjson.dumps(self.quality.feedback(request["model"], request["entries"]))

        async def reload(body: bytes) -> bytes:
            config = model_server_config_pb2.ModelServerConfig.FromString(body)
            await self._apply_config_off_loop(config)
            return b"{}"

        async def reload_everywhere(body: bytes) -> bytes:  # asked of the first process only
            await self._reload_everywhere(model_server_config_pb2.ModelServerConfig.FromString(body))
            return b"{}"

        return {"metrics": metrics, "state": state, "feedback": feedback, "reload": reload,
                "reload-everywhere": reload_everywhere}

    def _traffic_file(self) -> Path | None:
        if self.options.traffic_file:
            return Path(self.options.traffic_file)
        if self.options.model_config_file:
            return Path(self.options.model_config_file).parent / serving_config.TRAFFIC_FILE
        return None

    def _load_config(self, initial: bool = False) -> None:
        """The config at start-up (ServerCore::Create) and, polled, the config file again when it changed
        (Server::PollFilesystemAndReloadConfig). Either way TF Serving's ServerCore::ReloadConfig checks the
        version labels first (UpdateModelVersionLabelMap, server_core.cc:469): at start-up a refusal stops the
        server ("Failed to start server. Error: <status>", main.cc); polled, it is logged and the models and
        labels served stay as they are, the file being read again at the next poll (server.cc:172-176).
        Checked here with --allow_version_labels_for_unavailable_models=false only: with it true (our default)
        the one label TF Serving refuses is an existing one moved to a version not loaded yet, which is what
        Conveyor's own releases write (a direct push or a rollback moves "stable" to a version the new config
        is the first to ask for: refused, it would never load)."""
        text = None
        if self.options.model_config_file:
            path = Path(self.options.model_config_file)
            text = path.read_text() if path.is_file() else None
            if not initial and text == self._config_text:
                return
            config = serving_config.read_model_server_config(path)
        else:
            config = serving_config.single_model_config(self.options.model_name, self.options.model_base_path)
        if not self.options.allow_version_labels_for_unavailable_models:
            try:
                self._check_labels(config)
            except ServingError as exc:
                if initial:
                    raise ConveyorError(f"Failed to start server. Error: {exc.code.name}: "
                                        f"{exc.message}") from None
                log.error("PollFilesystemAndReloadConfig failed to ReloadConfig: %s", exc.message)
                return
        if self.options.model_config_file:
            self._config_text = text
        if self.registry.apply(config):
            self._servables_changed()

    def apply_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """HandleReloadConfigRequest: checks the config (INVALID_ARGUMENT naming the first problem, the
        models served stay as they are), then replaces the model list and loads what it wants."""
        check_reload_config(config)
        new = {model.name for model in config.model_config_list.config if not self.registry.has(model.name)}
        self._check_labels(config, skip=new)  # labels of models served now: before anything changes
        dropped = self.registry.apply(config)
        if self.registry.poll_all() or dropped:
            self._servables_changed()
        self._check_labels(config, only=new)  # a model new to the server: once its versions loaded

    def _check_labels(self, config: model_server_config_pb2.ModelServerConfig, skip: set[str] = frozenset(),
                      only: set[str] | None = None) -> None:
        """TF Serving's ServerCore::UpdateModelVersionLabelMap: a label may name a version not available for
        inference only with --allow_version_labels_for_unavailable_models, and only a label that is new (or
        keeps its version): moving an existing label there is refused."""
        allow_unavailable = self.options.allow_version_labels_for_unavailable_models
        for model_config in config.model_config_list.config:
            name = model_config.name
            if name in skip or (only is not None and name not in only) or not model_config.version_labels:
                continue
            model = self.registry.get(name) if self.registry.has(name) else None
            labels = model.labels() if model is not None else {}
            available = set(model.available_versions()) if model is not None else set()
            for label, version in model_config.version_labels.items():
                moved = label in labels and labels[label] != version
                if (moved or not allow_unavailable) and version not in available:
                    raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"Request to assign label to version {version} of model {name}, "
                                       "which is not currently available for inference")

    def _load_traffic(self) -> None:
        if self._traffic_path is None:
            return
        try:
            self.traffic = serving_config.read_traffic(self._traffic_path)
        except Exception as exc:  # a bad traffic file keeps the last good weights
            log.error("ignoring %s: %s", self._traffic_path, exc)

    def poll_once(self) -> None:
        self._load_traffic()
        self._poll_versions()

    def _poll_versions(self, at_once: bool = False) -> None:
        if self.registry.poll_all():
            self._servables_changed(at_once)

    def _servables_changed(self, at_once: bool = False) -> None:
        if self._on_servables_changed is None:
            return
        if at_once:
            self._on_servables_changed()
            return
        with self._settle_lock:
            if self._settle_timer is not None:
                self._settle_timer.cancel()
            self._settle_timer = threading.Timer(self._settle_seconds, self._settled)
            self._settle_timer.daemon = True
            self._settle_timer.start()

    def _settled(self) -> None:
        with self._settle_lock:
            self._settle_timer = None
        if not self._stop.is_set():
            self._on_servables_changed()

    def start_polling(self) -> None:
        """Loads what is on disk now (before the ports open, as TF Serving does), then polls in the background:
        versions every --file_system_poll_wait_seconds (0: never again), the config file every
        --model_config_file_poll_wait_seconds (0: never again), traffic weights with the versions."""
        self._load_traffic()
        self._poll_versions(at_once=True)  # nothing is served yet: no need to wait
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
                self._poll_versions()  # load what a changed config wants now
            if due["traffic"] is not None and now >= due["traffic"]:
                due["traffic"] = now + traffic_wait
                self._load_traffic()
            if due["versions"] is not None and now >= due["versions"]:
                due["versions"] = now + fs_wait
                self._poll_versions()

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
        try:
            model = self.registry.get(name)
        except ServingError:
            if label:  # ServerCore::GetModelVersionForLabel: no label map for the model
                raise invalid_argument(f"Unrecognized servable version label: {label}") from None
            if version is not None:  # ServableRequest::Specific's DebugString
                raise not_found(f"Servable not found for request: Specific({name}, {version})") from None
            raise
        weights = self.traffic.for_model(name) if version is None and not label else None
        if weights and route_key is not None:
            servable = sticky_servable(model, weights, route_key)
            if servable is not None:
                return servable
        return model.resolve(version, label, weights)

    def run(self, protocol: str, function, *args) -> Future:
        """Runs model work on the protocol's pool ("rest" or "grpc")."""
        return self.executors[protocol].submit(function, *args)

    # -- calls ------------------------------------------------------------------------------------------
    def model_label(self, model: str) -> str:
        """The metrics label for a model a client named: its name if configured, else UNKNOWN_MODEL (labels
        never take what clients invent, so the number of series stays bounded)."""
        return model if model and self.registry.has(model) else UNKNOWN_MODEL

    def begin(self, model: str, api: str, protocol: str, nbytes: int = 0, declared: int = 0) -> Call:
        """Admits a call (UNAVAILABLE when the server is at capacity, recorded like any answer): `nbytes`, the
        request bytes it holds already (a gRPC message); `declared`, a REST body's Content-Length, refused at
        once past the body limit and charged as the body arrives (Admission.grow)."""
        label = self.model_label(model)
        call = Call(label, api, protocol, nbytes, arriving=api == "predict" and self.batcher is not None)
        try:
            if max(nbytes, declared) > self.options.max_request_body_bytes:
                raise too_large(self.options.max_request_body_bytes)
            self.admission.admit(call, declared)
        except ServingError as exc:
            self.refuse(label, api, protocol, exc)
            raise
        return call

    def refuse(self, model_label: str, api: str, protocol: str, error: ServingError) -> None:
        """Records a call answered with `error` before it was admitted."""
        self.metrics.observe_request(model_label, None, api, protocol, error.code.name, 0.0)

    def finish(self, call: Call) -> None:
        """Records the call's answer and gives its share of the admission budget back."""
        self.admission.release(call)
        self.metrics.observe_request(call.model, call.version, call.api, call.protocol, call.status,
                                     time.perf_counter() - call.started)

    async def off_loop(self, call: Call, function: Callable, *args):
        """Runs `function(*args)` on the codec thread when the call's request is large, else here on the loop."""
        if call.nbytes < LARGE_REQUEST_BYTES:
            return function(*args)
        return await asyncio.wrap_future(self.codec_executor.submit(function, *args))

    async def predict(self, call: Call, servable: Servable, signature: str, inputs: dict[str, np.ndarray],
                      output_filter: tuple[str, ...] = (), timeout_ms: int | None = None) -> dict[str, np.ndarray]:
        """Runs a prediction through the batcher when batching is on, else on the protocol's pool; the model
        run is bounded by `timeout_ms` (--rest_api_timeout_in_ms, a gRPC client's deadline). A model measured
        as cheaper than a thread hand-off runs on the event loop instead: every call unbatched, and with
        batching on, a batch that holds this call alone when the loop offers it (see Batcher)."""
        if self.batcher is not None and not output_filter:
            # Checked per request: after merging and padding, a bad request would fail the whole batch.
            name = servable.validate_inputs(signature, inputs)
            deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None
            self.admission.handed_over(call)  # before submitting: the batcher may close the batch now
            # (A lone batch padded to the next allowed_batch_sizes costs more than its rows: the estimate, made
            # for the request, is low by at most the ratio of neighbouring allowed sizes.)
            return await self.batcher.predict(servable, name, inputs, deadline, cheap=_runs_inline(servable, call, inputs))
        self.admission.handed_over(call)
        if _runs_inline(servable, call, inputs):
            return servable.timed_predict(signature, inputs, output_filter, timeout_ms)
        return await asyncio.wrap_future(self.run(call.protocol, servable.timed_predict, signature, inputs,
                                                  output_filter, timeout_ms))

    def internal_error(self, call: Call, exc: BaseException) -> ServingError:
        """An error no check foresaw: logged with its traceback, answered INTERNAL naming it in one line."""
        log.error("%s %s of %s failed", call.protocol, call.api, call.model, exc_info=exc)
        error = ServingError(grpc.StatusCode.INTERNAL, f"Internal error: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:500]}")
        call.fail(error)
        return error

    def stop(self) -> None:
        self._stop.set()
        with self._settle_lock:
            if self._settle_timer is not None:
                self._settle_timer.cancel()
        if self._poller:
            self._poller.join(timeout=5)
        self.shadow.stop()
        if self.batcher:
            self.batcher.stop()
        for executor in (*self.executors.values(), self.codec_executor):
            executor.shutdown(wait=False, cancel_futures=True)
