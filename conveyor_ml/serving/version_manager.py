"""Which versions of each model are served: disk polling, version policy, labels, hot swaps, traffic split.

Mirrors TF Serving's source → loader → servable chain with its availability-preserving policy: a new
version is loaded in the background and served only once fully loaded (and warmed up); an old version is
unloaded only after its replacement serves; a version that fails to load never replaces a healthy one.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tensorflow_serving.config import model_server_config_pb2

from conveyor_ml.formats.release_state import versions_on_disk
from conveyor_ml.serving.errors import ServingError, invalid_argument, not_found, unavailable
from conveyor_ml.serving.loader import load_servable
from conveyor_ml.serving.servable import TFLITE_MODEL_FILE, IncompleteModelError, Servable

log = logging.getLogger("conveyor.serving")

START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


@dataclass
class VersionStatus:
    version: int
    state: str
    error: str = ""


@dataclass(frozen=True)
class LoadRetries:
    """--max_num_load_retries and --load_retry_interval_micros: extra attempts after a failed load."""

    retries: int = 0
    interval_seconds: float = 0.0


class ModelVersions:
    """The versions of one model and the servables loaded for them."""

    def __init__(self, config: model_server_config_pb2.ModelConfig,
                 loader: Callable[[str, int, Path], Servable] = load_servable,
                 on_load: Callable[[str, int, float], None] | None = None,
                 retries: LoadRetries = LoadRetries()):
        self.config = config
        self._loader = loader
        self._on_load = on_load
        self._retries = retries
        self._lock = threading.RLock()
        self._servables: dict[int, Servable] = {}
        self._status: dict[int, VersionStatus] = {}
        self._failures: dict[int, tuple[float, str]] = {}  # version -> (directory mtime, error)
        self.waiting_reason = ""  # why no version can load (logged once per change), for /readyz

    @property
    def name(self) -> str:
        return self.config.name

    def update_config(self, config: model_server_config_pb2.ModelConfig) -> None:
        with self._lock:
            self.config = config

    def _wanted(self, on_disk: dict[int, Path]) -> set[int]:
        healthy = sorted(v for v, path in on_disk.items() if not self._failed(v, path))
        policy = self.config.model_version_policy
        kind = policy.WhichOneof("policy_choice")
        if kind == "all":
            wanted = set(healthy)
        elif kind == "specific":
            wanted = set(policy.specific.versions) & set(healthy)
        else:
            wanted = set(healthy[-(policy.latest.num_versions or 1):])
        return wanted | (set(self.config.version_labels.values()) & set(healthy))

    def _failed(self, version: int, path: Path) -> bool:
        failure = self._failures.get(version)
        return failure is not None and failure[0] == _mtime(path)

    def poll(self) -> bool:
        """One pass of the file-system source: load what the policy wants, then unload what it no longer does.
        True when a version was loaded or unloaded."""
        with self._lock:
            served_before = set(self._servables)
        base_path = Path(self.config.base_path)
        on_disk = versions_on_disk(base_path)
        self._note_waiting(base_path, on_disk)
        tried: set[int] = set()
        while True:  # a version that fails is skipped by the policy: load what it wants instead, this poll
            with self._lock:
                wanted = self._wanted(on_disk)
                to_load = sorted(v for v in wanted if v not in self._servables and v not in tried)
            if not to_load:
                break
            for version in reversed(to_load):  # newest first: it is usually the one clients wait for
                tried.add(version)
                self._load(version, on_disk[version])
        with self._lock:
            for version in on_disk:
                if version not in wanted and version not in self._servables and version in self._failures:
                    self._status[version] = VersionStatus(version, END, self._failures[version][1])
            if any(v in self._servables for v in wanted):
                for version in [v for v in self._servables if v not in wanted]:
                    self._status[version] = VersionStatus(version, UNLOADING)
                    del self._servables[version]  # requests holding it finish; the GC frees it after
                    self._status[version] = VersionStatus(version, END)
                    log.info("unloaded %s version %d", self.name, version)
            for version in [v for v in self._status if v not in on_disk and v not in self._servables]:
                self._status[version] = VersionStatus(version, END, self._status[version].error)
            return set(self._servables) != served_before

    def _note_waiting(self, base_path: Path, on_disk: dict[int, Path]) -> None:
        """TF Serving's warnings when a model has nothing to load, logged when the reason changes."""
        if not base_path.is_dir():
            reason = f"Could not find base path {base_path} for servable {self.name}"
        elif not on_disk:
            reason = (f"No versions of servable {self.name} found under base path {base_path}. Did you forget to "
                      "name your leaf directory as a number (eg. '/1/')?")
        else:
            reason = ""
        if reason and reason != self.waiting_reason:
            log.warning(reason)
        self.waiting_reason = reason

    def _load(self, version: int, path: Path) -> None:
        with self._lock:
            self._status[version] = VersionStatus(version, LOADING)
        started = time.perf_counter()
        try:
            servable = self._load_with_retries(version, path)
        except Exception as exc:  # a corrupt or incomplete model must not take the server down
            # Marked failed either way, so the version policy skips it and serves the newest healthy version
            # (TF Serving would keep aspiring to the broken newest one and serve nothing after a restart). An
            # incomplete directory may still be being copied: it is retried when it changes (see _failed).
            message = f"Loading servable: {{name: {self.name} version: {version}}} failed: {exc}"
            if isinstance(exc, IncompleteModelError):
                message += "; retried when the directory changes"
            log.error(message)
            with self._lock:
                self._failures[version] = (_mtime(path), message)
                self._status[version] = VersionStatus(version, END, message)
            return
        seconds = time.perf_counter() - started
        with self._lock:
            self._servables[version] = servable
            self._status[version] = VersionStatus(version, AVAILABLE)
            self._failures.pop(version, None)
        log.info("loaded %s version %d in %.2fs", self.name, version, seconds)
        if self._on_load:
            self._on_load(self.name, version, seconds)

    def _load_with_retries(self, version: int, path: Path) -> Servable:
        """The servable, warmed up; an incomplete directory is not retried (it is when it changes)."""
        attempt = 0
        while True:
            try:
                servable = self._loader(self.name, version, path)
                servable.warm_up()
                return servable
            except IncompleteModelError:
                raise
            except Exception as exc:
                if attempt >= self._retries.retries:
                    raise
                attempt += 1
                log.warning("loading %s version %d failed (%s); retry %d of %d in %.1fs", self.name, version,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__, attempt,
                            self._retries.retries, self._retries.interval_seconds)
                time.sleep(max(0.0, self._retries.interval_seconds))

    def available_versions(self) -> list[int]:
        with self._lock:
            return sorted(self._servables)

    def labels(self) -> dict[str, int]:
        with self._lock:
            return dict(self.config.version_labels)

    def label_version(self, label: str) -> int:
        with self._lock:
            if label not in self.config.version_labels:
                raise invalid_argument(f"Unrecognized servable version label: {label}")
            return self.config.version_labels[label]

    def resolve(self, version: int | None = None, label: str | None = None,
                weights: dict[str, int] | None = None) -> Servable:
        """The servable for a request: explicit version, label, else the weighted split, else the latest."""
        if label:
            version = self.label_version(label)
        with self._lock:
            if version is not None:
                servable = self._servables.get(version)
                if servable is None:
                    raise not_found(f"Servable not found for request: Specific({self.name}, {version})")
                return servable
            if not self._servables:
                raise unavailable(f"Servable not found for request: Latest({self.name}): "
                                  "no version is loaded yet")
            if not weights:  # the usual request: the latest (the label map, a protobuf field, is not read)
                return self._servables[max(self._servables)]
            labels = self.config.version_labels
            split = [(labels[label], weight) for label, weight in weights.items()
                     if weight > 0 and labels.get(label) in self._servables]
            if split:
                versions, shares = zip(*split)
                return self._servables[random.choices(versions, weights=shares)[0]]
            return self._servables[max(self._servables)]

    def statuses(self, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        if label:
            version = self.label_version(label)
        with self._lock:
            if version is not None:
                if version not in self._status:
                    raise not_found(f"Could not find version {version} of model {self.name}")
                return [self._status[version]]
            return [self._status[v] for v in sorted(self._status, reverse=True)]


def _mtime(path: Path) -> float:
    """When the version's directory or its model file last changed: a failed version is retried after that."""
    times = []
    for candidate in (path, path / "saved_model.pb", path / "saved_model.pbtxt", path / TFLITE_MODEL_FILE):
        try:
            times.append(candidate.stat().st_mtime)
        except OSError:
            continue
    return max(times, default=0.0)


class ModelRegistry:
    """All configured models; applies a new ModelServerConfig without dropping models that stay."""

    def __init__(self, loader: Callable[[str, int, Path], Servable] = load_servable,
                 on_load: Callable[[str, int, float], None] | None = None,
                 retries: LoadRetries = LoadRetries(), load_threads: int = 0):
        self._loader = loader
        self._on_load = on_load
        self._retries = retries
        self._load_threads = load_threads  # --num_load_threads: 0 loads the models one after another
        self._models: dict[str, ModelVersions] = {}
        self._lock = threading.Lock()

    def apply(self, config: model_server_config_pb2.ModelServerConfig) -> bool:
        """Replaces the model list; True when a model (and so its loaded versions) was dropped."""
        with self._lock:
            configured = {model.name: model for model in config.model_config_list.config}
            dropped = [name for name in self._models if name not in configured]
            for name in dropped:
                del self._models[name]
            for name, model_config in configured.items():
                if name in self._models:
                    self._models[name].update_config(model_config)
                else:
                    self._models[name] = ModelVersions(model_config, self._loader, self._on_load, self._retries)
            return bool(dropped)

    def get(self, name: str) -> ModelVersions:
        with self._lock:
            model = self._models.get(name)
        if model is None:
            raise not_found(f"Servable not found for request: Latest({name})")
        return model

    def has(self, name: str) -> bool:
        """Whether `name` is a configured model (a dict lookup: safe without the lock)."""
        return name in self._models

    def models(self) -> list[ModelVersions]:
        with self._lock:
            return list(self._models.values())

    def poll_all(self) -> bool:
        """Polls every model; True when any loaded or unloaded a version."""
        models = self.models()
        if self._load_threads > 1 and len(models) > 1:
            with ThreadPoolExecutor(self._load_threads, thread_name_prefix="load") as pool:
                return any(list(pool.map(self._poll_one, models)))
        return any([self._poll_one(model) for model in models])  # a list: every model is polled

    @staticmethod
    def _poll_one(model: ModelVersions) -> bool:
        try:
            return model.poll()
        except ServingError:
            raise
        except Exception:  # keep polling the other models
            log.exception("polling %s failed", model.name)
            return False
