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
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

# `*_created` timestamps double the exposition for no dashboard's benefit.
disable_created_metrics()

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TF_SERVING_LATENCY_BUCKETS_US = tuple(10 * 1.8 ** i for i in range(33))  # TF Serving's exponential buckets
# The model label of a call naming no configured model: one series for all of them, whatever names they send.
UNKNOWN_MODEL = "(unknown)"


class _Latency:
    """One label set's latency histogram, in Conveyor's buckets (seconds) and TF Serving's (microseconds) at
    once: a bucket counts the calls at most its bound and over the previous one."""

    __slots__ = ("ours", "tf_serving", "seconds", "calls")

    def __init__(self):
        self.ours = [0] * len(LATENCY_BUCKETS_S)
        self.tf_serving = [0] * len(TF_SERVING_LATENCY_BUCKETS_US)
        self.seconds = 0.0
        self.calls = 0

    def add(self, seconds: float) -> None:
        index = bisect.bisect_left(LATENCY_BUCKETS_S, seconds)
        if index < len(self.ours):
            self.ours[index] += 1
        index = bisect.bisect_left(TF_SERVING_LATENCY_BUCKETS_US, seconds * 1e6)
        if index < len(self.tf_serving):
            self.tf_serving[index] += 1
        self.seconds += seconds
        self.calls += 1

    def copy(self) -> _Latency:
        copied = _Latency()
        copied.ours, copied.tf_serving = list(self.ours), list(self.tf_serving)
        copied.seconds, copied.calls = self.seconds, self.calls
        return copied


class _RequestSeries:
    """Every answered call, recorded once under one lock (a few dict updates: this runs for every request on
    the event loop), and exported as four series: ours, `conveyor_requests_total` and
    `conveyor_request_latency_seconds` (by model, version, API, protocol, status), and TF Serving's
    `:tensorflow:serving:request_count` and `:tensorflow:serving:request_latency` with its names, labels and
    microsecond buckets, summed from the same records when scraped."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, str, str, str], int] = {}  # (model, version, api, protocol, status)
        self._latency: dict[tuple[str, str, str, str], _Latency] = {}  # (model, version, api, protocol)
        self._tf_serving: tuple[dict, dict] = ({}, {})  # TF Serving's sums, as of the last collect()

    def observe(self, model: str, version: str, api: str, protocol: str, status: str, seconds: float) -> None:
        key = (model, version, api, protocol)
        with self._lock:
            counted = key + (status,)
            self._counts[counted] = self._counts.get(counted, 0) + 1
            latency = self._latency.get(key)
            if latency is None:
                latency = self._latency[key] = _Latency()
            latency.add(seconds)

    def _snapshot(self) -> tuple[dict, dict]:
        with self._lock:
            return dict(self._counts), {key: latency.copy() for key, latency in self._latency.items()}

    def collect(self):
        """Conveyor's two families (TF Serving's are written apart: tf_serving_families)."""
        counts, latencies = self._snapshot()
        requests = CounterMetricFamily("conveyor_requests", "Requests by model, version, API, protocol and status.",
                                       labels=("model", "version", "api", "protocol", "status"))
        for (model, version, api, protocol, status), value in sorted(counts.items()):
            requests.add_metric((model, version, api, protocol, status), value)
        yield requests
        ours = HistogramMetricFamily("conveyor_request_latency_seconds", "Request latency, end to end in the server.",
                                     labels=("model", "version", "api", "protocol"))
        for (model, version, api, protocol), latency in sorted(latencies.items()):
            ours.add_metric((model, version, api, protocol), _cumulative(LATENCY_BUCKETS_S, latency.ours, latency.calls),
                            latency.seconds)
        yield ours

    def tf_serving_families(self) -> list[Metric]:
        """`:tensorflow:serving:request_count` and `:tensorflow:serving:request_latency`, summed from the same
        records (written by tf_serving_text, as TF Serving writes them)."""
        counts, latencies = self._snapshot()
        tf_counts: dict[tuple[str, str], int] = {}
        for (model, _, _, _, status), value in counts.items():
            tf_counts[(model, status)] = tf_counts.get((model, status), 0) + value
        tf_latency: dict[tuple[str, str, str], _Latency] = {}
        for (model, _, api, protocol), latency in latencies.items():
            total = tf_latency.setdefault((model, api, "GRPC" if protocol == "grpc" else "REST"), _Latency())
            total.tf_serving = [a + b for a, b in zip(total.tf_serving, latency.tf_serving)]
            total.seconds += latency.seconds
            total.calls += latency.calls
        name = ":tensorflow:serving:request_count"
        count_metric = Metric(name, "The total number of requests.", "counter")
        for (model, status), value in sorted(tf_counts.items()):
            count_metric.add_sample(name, {"model_name": model, "status": status}, value)
        name = ":tensorflow:serving:request_latency"
        latency_metric = Metric(name, "Distribution of wall time (in microseconds) for Tensorflow Serving"
                                      " request.", "histogram")
        for (model, api, entrypoint), total in sorted(tf_latency.items()):
            labels = {"model_name": model, "API": api, "entrypoint": entrypoint}
            for bound, cumulative in _cumulative(TF_SERVING_LATENCY_BUCKETS_US, total.tf_serving, total.calls,
                                                  lambda bound: f"{bound:g}"):
                latency_metric.add_sample(f"{name}_bucket", {**labels, "le": bound}, cumulative)
            latency_metric.add_sample(f"{name}_sum", labels, total.seconds * 1e6)  # TF Serving's is in µs
            latency_metric.add_sample(f"{name}_count", labels, total.calls)
        return [count_metric, latency_metric]


TF_SERVING_PREFIX = ":tensorflow:"


def tf_serving_text(families: list[Metric]) -> bytes:
    """TF Serving's families as its PrometheusExporter writes them (util/prometheus_exporter.cc): a `# TYPE`
    line naming the metric itself, no HELP, and a counter's samples under that name. prometheus_client would
    write `# TYPE <name>_total counter`, a family whose name no sample has."""
    lines = []
    for family in families:
        lines.append(f"# TYPE {family.name} {family.type}\n")
        for sample in family.samples:
            name = family.name if family.type == "counter" else sample.name
            labels = ",".join(f'{key}="{_label_value(text)}"' for key, text in sorted(sample.labels.items()))
            value = sample.value  # counts as integers, as TF Serving writes them ("} %d")
            count = float(value).is_integer() and name != f"{family.name}_sum"
            text = str(int(value)) if count else floatToGoString(value)
            lines.append(f"{name}{{{labels}}} {text}\n")
    return "".join(lines).encode()


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _cumulative(bounds: tuple[float, ...], counts: list[int], calls: int,
                bound_text: Callable[[float], str] = floatToGoString) -> list[tuple[str, int]]:
    """Prometheus buckets (le, calls at most le) from per-bucket counts; +Inf holds every call."""
    buckets, cumulative = [], 0
    for bound, count in zip(bounds, counts):
        cumulative += count
        buckets.append((bound_text(bound), cumulative))
    buckets.append(("+Inf", calls))
    return buckets


class ServingMetrics:
    def __init__(self, versions_loaded: Callable[[], dict[str, int]] | None = None):
        self.registry = CollectorRegistry()
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
        self._requests = _RequestSeries()
        self.registry.register(self._requests)

    def observe_request(self, model: str, version: int | None, api: str, protocol: str, status: str,
                        seconds: float) -> None:
        """One answered call. Every label must come from a bounded set (the caller maps a model name no
        configuration knows to UNKNOWN_MODEL), so the exposition's size does not grow with what clients send."""
        self._requests.observe(model, "" if version is None else str(version), api, protocol, status, seconds)

    def observe_batch(self, model: str, size: int, queue_depth: int) -> None:
        self.batch_size.labels(model).observe(size)
        self.queue_depth.set(queue_depth)

    def observe_load(self, model: str, version: int, seconds: float) -> None:
        self.load_seconds.labels(model).observe(seconds)

    def exposition(self) -> bytes:
        if self._versions_loaded_source:
            for model, count in self._versions_loaded_source().items():
                self.versions_loaded.labels(model).set(count)
        return generate_latest(self.registry) + tf_serving_text(self._requests.tf_serving_families())


# How the gauges of several server processes combine (counters and histograms add up); a gauge not named
# here adds up too (queue depths: each process has its own queues).
_SAME_IN_EVERY_PROCESS = {"conveyor_model_versions_loaded"}  # each process loads every version
_LIVE_ACCURACY = "conveyor_live_accuracy"  # worked out again from the summed feedback counts


class _Merged:
    """A registry-free collector of already merged families (for generate_latest)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


def merge_expositions(texts: list[bytes]) -> bytes:
    """One exposition for several server processes' (`--server_processes`): every sample added up across
    them by name and labels, except the gauges above; live accuracy from the summed correct and wrong
    feedback. One exposition comes back as it was."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}  # family -> (sample name, labels) -> value, in first-seen order
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            merged = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sample.labels.items()))
                if key not in merged:
                    merged[key] = sample.value
                elif family.name in _SAME_IN_EVERY_PROCESS:
                    merged[key] = max(merged[key], sample.value)
                else:
                    merged[key] += sample.value
    if _LIVE_ACCURACY in values and "conveyor_feedback" in values:
        outcomes: dict[tuple[str, str], dict[str, float]] = {}
        for (_, labels), value in values["conveyor_feedback"].items():
            labels = dict(labels)
            outcomes.setdefault((labels["model"], labels["version"]), {})[labels["outcome"]] = value
        for key in values[_LIVE_ACCURACY]:
            labels = dict(key[1])
            counts = outcomes.get((labels["model"], labels["version"]), {})
            total = counts.get("correct", 0.0) + counts.get("wrong", 0.0)
            if total:
                values[_LIVE_ACCURACY][key] = counts.get("correct", 0.0) / total
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    ours = [family for name, family in families.items() if not name.startswith(TF_SERVING_PREFIX)]
    tf_serving = [family for name, family in families.items() if name.startswith(TF_SERVING_PREFIX)]
    return generate_latest(_Merged(ours)) + tf_serving_text(tf_serving)  # type: ignore[arg-type]
