"""Shadow traffic: a share of live Predict requests is also answered by the model's `shadow` version, in the
background, and the two answers are compared. The shadow's answer never reaches the client.

The live path only offers a copy (`ShadowMirror.offer`): a dictionary lookup, a random draw and a
non-blocking put into a bounded queue. When the queue is full the copy is dropped and counted; nothing the
shadow does — slowness, errors, a version still loading — can delay or fail the live request. One worker
thread answers the copies with the shadow version (not through the batcher, whose queues belong to live
traffic) and records per shadowed request: whether the predicted classes agree, how far the probabilities
are apart (total variation distance, 0..1, averaged over the request's instances), and both latencies.

Which version shadows which model, and what share it sees, comes from traffic.json ("shadow": {model:
{"label": "shadow", "percent": P}}), written by `conveyor release shadow` or a `release: shadow` push. A
canary analysis mirrors both ways ({"label": "stable", "pair": "canary"}): the canary's requests to stable
and stable's to the canary, so that both versions' latencies bear the same extra load.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from conveyor_ml.formats.serving_config import TrafficWeights
from conveyor_ml.serving.metrics import LATENCY_BUCKETS_S, ServingMetrics
from conveyor_ml.serving.servable import Servable
from conveyor_ml.serving.version_manager import ModelRegistry

log = logging.getLogger("conveyor.serving")

QUEUE_CAPACITY = 64  # copies waiting for the shadow; beyond it they are dropped (and counted)
LATENCY_WINDOW = 1000  # recent latencies kept per shadow for the monitoring endpoint's percentiles
DIFFERENCE_BUCKETS = (0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


@dataclass
class _Copy:
    model: str
    shadow_version: int
    signature: str
    inputs: dict
    live_outputs: dict
    live_seconds: float


@dataclass
class ShadowWatch:
    """One shadow version's figures since the server started."""

    label: str
    percent: int
    requests: int = 0  # copies answered and compared
    instances: int = 0
    agreeing: int = 0
    difference_sum: float = 0.0  # per instance
    errors: int = 0
    dropped: int = 0
    live_latency: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    shadow_latency: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


def predicted_classes(outputs: dict) -> np.ndarray | None:
    """The predicted class per instance: class_ids if the signature returns them, else the argmax of the
    probabilities (or scores); None when the outputs hold neither."""
    if "class_ids" in outputs:
        return np.asarray(outputs["class_ids"]).reshape(-1).astype(np.int64)
    probabilities = _probabilities(outputs)
    return None if probabilities is None else np.argmax(probabilities, axis=-1)


def _probabilities(outputs: dict) -> np.ndarray | None:
    for key in ("probabilities", "scores"):
        if key in outputs:
            values = np.asarray(outputs[key], dtype=np.float64)
            return values.reshape(values.shape[0], -1) if values.ndim else None
    return None


def compare(live: dict, shadow: dict) -> tuple[int, int, float]:
    """(instances, instances whose classes agree, sum over instances of the total variation distance between
    the two probability vectors — 0 when the outputs carry no probabilities)."""
    live_classes, shadow_classes = predicted_classes(live), predicted_classes(shadow)
    if live_classes is None or shadow_classes is None or live_classes.shape != shadow_classes.shape:
        raise ValueError("the shadow's outputs cannot be compared with the live version's (different classes "
                         "or shapes)")
    difference = 0.0
    live_p, shadow_p = _probabilities(live), _probabilities(shadow)
    if live_p is not None and shadow_p is not None and live_p.shape == shadow_p.shape:
        difference = float(0.5 * np.abs(live_p - shadow_p).sum(axis=-1).sum())
    return len(live_classes), int((live_classes == shadow_classes).sum()), difference


def _percentile_ms(values) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    array = np.asarray(values) * 1000
    return {"p50": round(float(np.percentile(array, 50)), 3), "p99": round(float(np.percentile(array, 99)), 3)}


class ShadowMirror:
    def __init__(self, registry: ModelRegistry, traffic: Callable[[], TrafficWeights], metrics: ServingMetrics,
                 timeout_ms: int | None = None, capacity: int = QUEUE_CAPACITY):
        self._registry = registry
        self._traffic = traffic
        self._timeout_ms = timeout_ms
        self._queue: queue.Queue[_Copy | None] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self._watches: dict[tuple[str, int], ShadowWatch] = {}
        registry_ = metrics.registry
        self.requests = Counter("conveyor_shadow_requests", "Mirrored requests per shadow version, by outcome "
                                "(compared, error, dropped: the queue was full).", ["model", "version", "outcome"],
                                registry=registry_)
        self.instances = Counter("conveyor_shadow_instances", "Shadowed instances whose predicted class agrees "
                                 "(or not) with the live version's.", ["model", "version", "agreement"],
                                 registry=registry_)
        self.difference = Histogram("conveyor_shadow_probability_difference", "Total variation distance between "
                                    "the shadow's and the live version's probabilities, per instance.",
                                    ["model", "version"], buckets=DIFFERENCE_BUCKETS, registry=registry_)
        self.latency = Histogram("conveyor_shadow_latency_seconds", "Model run time of shadowed requests: the live "
                                 "version's (role=live) and the shadow's (role=shadow).",
                                 ["model", "version", "role"], buckets=LATENCY_BUCKETS_S, registry=registry_)
        self.depth = Gauge("conveyor_shadow_queue_depth", "Copies waiting for the shadow version.", registry=registry_)
        self._worker = threading.Thread(target=self._work, name="shadow", daemon=True)
        self._worker.start()

    # -- the live path's side ----------------------------------------------------------------------------
    def offer(self, servable: Servable, signature: str, inputs: dict, outputs: dict, live_seconds: float) -> None:
        """Maybe mirrors a live request (its share, its inputs and answer): returns at once, never raises."""
        try:
            shadow = self._traffic().shadows.get(servable.model_name)
            if not shadow or random.random() * 100 >= shadow["percent"]:
                return
            labels = self._registry.get(servable.model_name).labels()
            version = labels.get(shadow["label"])
            if version == servable.version and shadow.get("pair"):  # mirrored both ways (a canary analysis)
                version = labels.get(shadow["pair"])
            if version is None or version == servable.version:
                return
            copy = _Copy(servable.model_name, version, signature, inputs, outputs, live_seconds)
            try:
                self._queue.put_nowait(copy)
            except queue.Full:
                self._watch(copy.model, version, shadow).dropped += 1
                self.requests.labels(copy.model, str(version), "dropped").inc()
        except Exception:  # the live request must not notice a shadow problem
            log.exception("shadow: could not mirror a request of %s", servable.model_name)

    # -- the worker ----------------------------------------------------------------------------------------
    def _watch(self, model: str, version: int, shadow: dict) -> ShadowWatch:
        with self._lock:
            watch = self._watches.get((model, version))
            if watch is None:
                watch = self._watches[(model, version)] = ShadowWatch(shadow["label"], shadow["percent"])
            watch.percent = shadow["percent"]
            return watch

    def _work(self) -> None:
        while True:
            copy = self._queue.get()
            if copy is None:
                return
            self.depth.set(self._queue.qsize())
            try:
                self._answer(copy)
            except Exception:
                log.exception("shadow: the worker failed on a copy of %s", copy.model)

    def _answer(self, copy: _Copy) -> None:
        shadow = self._traffic().shadows.get(copy.model) or {"label": "shadow", "percent": 0}
        watch = self._watch(copy.model, copy.shadow_version, shadow)
        version = str(copy.shadow_version)
        started = time.perf_counter()
        try:
            servable = self._registry.get(copy.model).resolve(copy.shadow_version)
            outputs = servable.predict(copy.signature, copy.inputs, (), self._timeout_ms)
            seconds = time.perf_counter() - started
            instances, agreeing, difference = compare(copy.live_outputs, outputs)
        except Exception as exc:
            with self._lock:
                watch.errors += 1
            self.requests.labels(copy.model, version, "error").inc()
            log.debug("shadow version %s of %s failed: %s", version, copy.model, exc)
            return
        with self._lock:
            watch.requests += 1
            watch.instances += instances
            watch.agreeing += agreeing
            watch.difference_sum += difference
            watch.live_latency.append(copy.live_seconds)
            watch.shadow_latency.append(seconds)
        self.requests.labels(copy.model, version, "compared").inc()
        self.instances.labels(copy.model, version, "agree").inc(agreeing)
        self.instances.labels(copy.model, version, "disagree").inc(instances - agreeing)
        if instances:
            self.difference.labels(copy.model, version).observe(difference / instances)
        self.latency.labels(copy.model, version, "live").observe(copy.live_seconds)
        self.latency.labels(copy.model, version, "shadow").observe(seconds)

    # -- reading -------------------------------------------------------------------------------------------
    def state(self, model: str) -> dict:
        """What snapshots are made of, JSON-ready (another server process adds it to its own): per shadow
        version its counts, sums and recent latencies; the queue's depth and capacity."""
        with self._lock:
            versions = {str(version): {
                "label": watch.label, "percent": watch.percent, "requests": watch.requests,
                "instances": watch.instances, "agreeing": watch.agreeing, "difference_sum": watch.difference_sum,
                "errors": watch.errors, "dropped": watch.dropped, "live_latency": list(watch.live_latency),
                "shadow_latency": list(watch.shadow_latency),
            } for (name, version), watch in sorted(self._watches.items()) if name == model}
        return {"versions": versions, "queue": {"depth": self._queue.qsize(), "capacity": self._queue.maxsize}}

    @staticmethod
    def summarize(states: list[dict]) -> dict:
        """{shadow version: figures} for GET /v1/models/{m}/monitoring, plus the queues' depth and capacity,
        from one state per server process: counts added up, percentiles over every process's latencies."""
        merged: dict[str, dict] = {}
        for state in states:
            for version, figures in state["versions"].items():
                total = merged.get(version)
                if total is None:
                    merged[version] = {**figures, "live_latency": list(figures["live_latency"]),
                                       "shadow_latency": list(figures["shadow_latency"])}
                    continue
                for key in ("requests", "instances", "agreeing", "difference_sum", "errors", "dropped",
                            "live_latency", "shadow_latency"):
                    total[key] += figures[key]
        versions = {version: {
            "label": total["label"], "percent": total["percent"], "requests": total["requests"],
            "instances": total["instances"],
            "agreement": round(total["agreeing"] / total["instances"], 6) if total["instances"] else None,
            "mean_probability_difference": (round(total["difference_sum"] / total["instances"], 6)
                                            if total["instances"] else None),
            "errors": total["errors"], "dropped": total["dropped"],
            "live_latency_ms": _percentile_ms(total["live_latency"]),
            "shadow_latency_ms": _percentile_ms(total["shadow_latency"]),
        } for version, total in merged.items()}
        return {"versions": versions, "queue": {"depth": sum(state["queue"]["depth"] for state in states),
                                                "capacity": sum(state["queue"]["capacity"] for state in states)}}

    def snapshot(self, model: str) -> dict:
        """{shadow version: figures} for GET /v1/models/{m}/monitoring, plus the queue's depth and capacity."""
        return self.summarize([self.state(model)])

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # a daemon thread: it ends with the process
