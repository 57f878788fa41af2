"""Prometheus metrics of the model server.

Conveyor's own series carry version and protocol labels (`conveyor_*`); the two series dashboards built
for TF Serving use, `:tensorflow:serving:request_count` and `:tensorflow:serving:request_latency`, are also
exported under TF Serving's exact names and labels, so those dashboards work unchanged.
"""
from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

# `*_created` timestamps double the exposition for no dashboard's benefit.
disable_created_metrics()

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TF_SERVING_LATENCY_BUCKETS_US = tuple(10 * 1.8 ** i for i in range(33))  # TF Serving's exponential buckets
# The model label of a call naming no configured model: one series for all of them, whatever names they send.
UNKNOWN_MODEL = "(unknown)"


class _TfServingSeries:
    """TF Serving's request_count and request_latency series, with its names and labels."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], float] = {}
        self._latency: dict[tuple[str, str, str], list] = {}  # -> [bucket counts..., sum, count]

    def observe(self, model: str, api: str, entrypoint: str, status: str, microseconds: float) -> None:
        with self._lock:
            key = (model, "OK" if status == "OK" else status)
            self._counts[key] = self._counts.get(key, 0) + 1
            series = self._latency.setdefault((model, api, entrypoint),
                                              [0] * len(TF_SERVING_LATENCY_BUCKETS_US) + [0.0, 0])
            index = bisect.bisect_left(TF_SERVING_LATENCY_BUCKETS_US, microseconds)
            if index < len(TF_SERVING_LATENCY_BUCKETS_US):
                series[index] += 1
            series[-2] += microseconds
            series[-1] += 1

    def collect(self):
        with self._lock:
            counts = dict(self._counts)
            latency = {key: list(value) for key, value in self._latency.items()}
        name = ":tensorflow:serving:request_count"
        count_metric = Metric(name, "The total number of requests.", "counter")
        for (model, status), value in sorted(counts.items()):
            count_metric.add_sample(name, {"model_name": model, "status": status}, value)
        yield count_metric
        name = ":tensorflow:serving:request_latency"
        latency_metric = Metric(name, "Distribution of wall time (in microseconds) for Tensorflow Serving"
                                      " request.", "histogram")
        for (model, api, entrypoint), series in sorted(latency.items()):
            labels = {"model_name": model, "API": api, "entrypoint": entrypoint}
            cumulative = 0
            for bound, count in zip(TF_SERVING_LATENCY_BUCKETS_US, series):
                cumulative += count
                latency_metric.add_sample(f"{name}_bucket", {**labels, "le": f"{bound:g}"}, cumulative)
            latency_metric.add_sample(f"{name}_bucket", {**labels, "le": "+Inf"}, series[-1])
            latency_metric.add_sample(f"{name}_sum", labels, series[-2])
            latency_metric.add_sample(f"{name}_count", labels, series[-1])
        yield latency_metric


class ServingMetrics:
    def __init__(self, versions_loaded: Callable[[], dict[str, int]] | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter("conveyor_requests", "Requests by model, version, API, protocol and status.",
                                ["model", "version", "api", "protocol", "status"], registry=self.registry)
        self.latency = Histogram("conveyor_request_latency_seconds", "Request latency, end to end in the server.",
                                 ["model", "version", "api", "protocol"], buckets=LATENCY_BUCKETS_S,
                                 registry=self.registry)
        self.batch_size = Histogram("conveyor_batch_size", "Requests merged into one model call (rows).",
                                    ["model"], buckets=BATCH_SIZE_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("conveyor_batch_queue_depth", "Batches waiting or open in the batching queues.",
                                 registry=self.registry)
        self.load_seconds = Histogram("conveyor_model_load_seconds", "Time to load and warm up a model version.",
                                      ["model"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
                                      registry=self.registry)
        self.versions_loaded = Gauge("conveyor_model_versions_loaded", "Versions currently available.",
                                     ["model"], registry=self.registry)
        self.input_anomalies = Counter("conveyor_input_anomalies", "Request inputs outside the data schema, by feature "
                                       "and kind (below_min, above_max, nan, shape).", ["model", "feature", "kind"],
                                       registry=self.registry)
        self.predicted_class = Counter("conveyor_predicted_class", "Predicted classes, per model version.",
                                       ["model", "version", "class"], registry=self.registry)
        self.feedback = Counter("conveyor_feedback", "Ground-truth labels received for logged predictions.",
                                ["model", "version", "outcome"], registry=self.registry)
        self.live_accuracy = Gauge("conveyor_live_accuracy", "Accuracy on the labels received so far, per version.",
                                   ["model", "version"], registry=self.registry)
        self._versions_loaded_source = versions_loaded
        self._request_children: dict[tuple, tuple] = {}
        self._tf_serving = _TfServingSeries()
        self.registry.register(self._tf_serving)

    def observe_request(self, model: str, version: int | None, api: str, protocol: str, status: str,
                        seconds: float) -> None:
        """One answered call. Every label must come from a bounded set (the caller maps a model name no
        configuration knows to UNKNOWN_MODEL), so the exposition's size does not grow with what clients send."""
        key = (model, version, api, protocol, status)
        children = self._request_children.get(key)
        if children is None:  # labels() costs a lock and a lookup per label set: done once per set
            version_label = str(version) if version is not None else ""
            children = (self.requests.labels(model, version_label, api, protocol, status),
                        self.latency.labels(model, version_label, api, protocol))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        self._tf_serving.observe(model, api, "GRPC" if protocol == "grpc" else "REST", status, seconds * 1e6)

    def observe_batch(self, model: str, size: int, queue_depth: int) -> None:
        self.batch_size.labels(model).observe(size)
        self.queue_depth.set(queue_depth)

    def observe_load(self, model: str, version: int, seconds: float) -> None:
        self.load_seconds.labels(model).observe(seconds)

    def exposition(self) -> bytes:
        if self._versions_loaded_source:
            for model, count in self._versions_loaded_source().items():
                self.versions_loaded.labels(model).set(count)
        return generate_latest(self.registry)
