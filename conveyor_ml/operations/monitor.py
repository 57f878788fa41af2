"""`conveyor monitor`: what a running server (conveyor serve, or TF Serving for its own metric names) is
doing, from two scrapes of its Prometheus endpoint: QPS, error rate and latency percentiles per model
version, batch sizes and queue depth; the predicted-class histogram against the training labels
(prediction drift) and live accuracy from feedback; GPU utilisation where NVML finds a GPU."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import LABEL_KEY, NUM_CLASSES, PROMETHEUS_PATH, STATISTICS_GEN
from conveyor_ml.operations.records import BatchingFigures, Gpu, MonitorSnapshot, VersionTraffic


def fetch(url: str, timeout: float = 5.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise ConveyorError(f"{url} answered {exc.code}; is Prometheus on (conveyor serve --enable_prometheus)?") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _no_server(url, exc) from None


def _no_server(url: str, exc: OSError) -> ConveyorError:
    return ConveyorError(f"no server at {url} ({getattr(exc, 'reason', exc)}); start one with `make serve`")


def scrape(base_url: str) -> dict[tuple, float]:
    """{(metric sample name, sorted labels): value} of one Prometheus scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(fetch(base_url.rstrip("/") + PROMETHEUS_PATH).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _delta(before: dict, after: dict) -> dict:
    return {key: after[key] - before.get(key, 0.0) for key in after}


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Linear interpolation inside cumulative histogram buckets, as Prometheus' histogram_quantile does."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank, previous_bound, previous_count = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return previous_bound
            span = count - previous_count
            return previous_bound + (bound - previous_bound) * ((rank - previous_count) / span if span else 0)
        previous_bound, previous_count = bound, count
    return previous_bound


def traffic_figures(before: dict, after: dict, seconds: float, model: str | None) -> dict:
    delta = _delta(before, after)
    per_version: dict[tuple[str, str], dict] = defaultdict(lambda: {"requests": 0.0, "errors": 0.0, "buckets": defaultdict(float)})
    for (name, labels), value in delta.items():
        labels = dict(labels)
        if model and labels.get("model") not in (None, model):
            continue
        key = (labels.get("model", ""), labels.get("version", ""))
        if name == "conveyor_requests_total":
            per_version[key]["requests"] += value
            if labels.get("status") != "OK":
                per_version[key]["errors"] += value
        elif name == "conveyor_request_latency_seconds_bucket":
            per_version[key]["buckets"][float(labels["le"])] += value
    versions = []
    for (name, version), figures in sorted(per_version.items()):
        buckets = list(figures["buckets"].items())
        versions.append(VersionTraffic(
            model=name, version=version, qps=round(figures["requests"] / seconds, 2),
            error_rate=round(figures["errors"] / figures["requests"], 4) if figures["requests"] else 0.0,
            **{f"p{q}_ms": (round(v * 1000, 3) if (v := _quantile(buckets, q / 100)) is not None else None)
               for q in (50, 95, 99)}))
    batch = [(float(dict(labels)["le"]), value) for (name, labels), value in delta.items()
             if name == "conveyor_batch_size_bucket" and (not model or dict(labels).get("model") == model)]
    batch_sum = sum(v for (n, labels), v in delta.items() if n == "conveyor_batch_size_sum")
    batch_count = sum(v for (n, labels), v in delta.items() if n == "conveyor_batch_size_count")
    anomalies = {f"{dict(labels)['feature']}:{dict(labels)['kind']}": value for (n, labels), value in after.items()
                 if n == "conveyor_input_anomalies_total" and (not model or dict(labels).get("model") == model)}
    return {"versions": versions,
            "batching": BatchingFigures(batches=batch_count,
                                        mean_batch_size=round(batch_sum / batch_count, 2) if batch_count else None,
                                        p95_batch_size=_quantile(batch, 0.95) if batch else None,
                                        queue_depth=after.get(("conveyor_batch_queue_depth", ()), 0.0)),
            "input_anomalies_total": anomalies}


def gpus() -> list[Gpu] | str:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: the common case on a laptop
        return "no GPU"
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(Gpu(index=index, name=str(pynvml.nvmlDeviceGetName(handle)),
                             utilization_percent=utilization.gpu, memory_used_mib=memory.used // 2**20,
                             memory_total_mib=memory.total // 2**20))
        return found or "no GPU"
    finally:
        pynvml.nvmlShutdown()


_TRAINING_DISTRIBUTIONS: dict[tuple[str, str, str], list[float] | None] = {}


def training_label_distribution(spec, model: str, version: str) -> list[float] | None:
    """The label distribution the version was trained on; read once per version, as the live view asks
    for it on every refresh and a version's training data never changes."""
    key = (str(spec.source_file), model, str(version))
    if key not in _TRAINING_DISTRIBUTIONS:
        _TRAINING_DISTRIBUTIONS[key] = _read_training_label_distribution(spec, model, version)
    return _TRAINING_DISTRIBUTIONS[key]


def _read_training_label_distribution(spec, model: str, version: str) -> list[float] | None:
    """From the StatisticsGen statistics MLMD links to the version (None when the store does not know it)."""
    from pathlib import Path

    from tensorflow_metadata.proto.v0 import statistics_pb2

    from conveyor_ml.metadata import store as metadata
    from conveyor_ml.metadata.index import MetadataIndex
    from conveyor_ml.operations.lineage import Lineage

    if not metadata.store_exists(spec.metadata):
        return None
    lineage = Lineage(MetadataIndex(metadata.open_store(spec.metadata, read_only=True)), model)
    owner = lineage.version_owner.get(("local", str(version)))
    trainer = lineage.index.producer(owner) if owner else None
    if trainer is None:
        return None
    counts = [0.0] * NUM_CLASSES
    for examples_id in trainer.inputs.get("examples", []):
        for statistics_gen in lineage.index.consumers_of(examples_id, STATISTICS_GEN):
            for artifact in lineage.index.outputs(statistics_gen, "statistics"):
                path = Path(artifact.uri) / "Split-train" / "FeatureStats.pb"
                if not path.is_file():
                    continue
                stats = statistics_pb2.DatasetFeatureStatisticsList.FromString(path.read_bytes())
                for dataset in stats.datasets:
                    for feature in dataset.features:
                        if feature.path.step and feature.path.step[0] == LABEL_KEY and feature.HasField("string_stats"):
                            for bucket in feature.string_stats.rank_histogram.buckets:
                                if bucket.label.isdigit() and int(bucket.label) < NUM_CLASSES:
                                    counts[int(bucket.label)] += bucket.sample_count
    total = sum(counts)
    return [c / total for c in counts] if total else None


MIN_PREDICTIONS = 50  # below this, class shares say more about chance than about drift


def prediction_drift(histogram: list[int], training: list[float] | None, threshold: float) -> dict:
    total = sum(histogram)
    if not total:
        return {"status": "no predictions yet"}
    if total < MIN_PREDICTIONS:
        return {"status": f"too few predictions ({total} < {MIN_PREDICTIONS})"}
    if training is None:
        return {"status": "no training distribution in MLMD"}
    predicted = [h / total for h in histogram]
    distance = max(abs(p - t) for p, t in zip(predicted, training))
    return {"status": "DRIFT" if distance > threshold else "ok", "linf": round(distance, 4), "threshold": threshold,
            "predicted": [round(p, 4) for p in predicted], "training": [round(t, 4) for t in training]}


def check_model_served(url: str, model: str) -> None:
    """A model named on the command line must be one the server has (else the view was an empty table)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models/{urllib.parse.quote(model, safe='')}",
                                    timeout=5):
            return
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise ConveyorError(f"{url}: asking for model {model!r} answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _no_server(url, exc) from None
    raise ConveyorError(f"{url} serves no model named {model!r}; `conveyor monitor` without a name shows every "
                        "model it serves")


def snapshot(url: str, model: str | None, spec, interval: float, drift_threshold: float) -> MonitorSnapshot:
    if model is not None:
        check_model_served(url, model)
    started = time.monotonic()
    before = scrape(url)
    time.sleep(interval)
    after = scrape(url)
    figures = traffic_figures(before, after, time.monotonic() - started, model)
    models = sorted({v.model for v in figures["versions"]} | ({model} if model else set()))
    quality = {}
    for name in models:
        try:
            document = json.loads(fetch(f"{url.rstrip('/')}/v1/models/{name}/monitoring"))
        except ConveyorError:
            continue
        for version, entry in document["versions"].items():
            training = training_label_distribution(spec, name, version) if spec is not None else None
            entry["prediction_drift"] = prediction_drift(entry["class_histogram"], training, drift_threshold)
        quality[name] = document
    return MonitorSnapshot(url=url, interval_s=interval, **figures, quality=quality, gpus=gpus())


def render(report: MonitorSnapshot):
    from rich.console import Group
    from rich.table import Table

    traffic = Table(title=f"{report.url}  (over {report.interval_s:g}s)", title_justify="left")
    for column in ("model", "version", "labels", "QPS", "errors", "P50 ms", "P95 ms", "P99 ms", "live accuracy",
                   "prediction drift"):
        traffic.add_column(column)
    quality = report.quality
    rows = {(v.model, v.version): v for v in report.versions}
    for name, document in quality.items():
        for version in document["versions"]:
            rows.setdefault((name, version), VersionTraffic(model=name, version=version, qps=0.0, error_rate=0.0))
    for (name, version), row in sorted(rows.items()):
        entry = quality.get(name, {}).get("versions", {}).get(version, {})
        accuracy = entry.get("feedback", {}).get("accuracy")
        drift = entry.get("prediction_drift", {})
        traffic.add_row(name, version or "-", ",".join(entry.get("labels", [])) or "-", f"{row.qps:.1f}",
                        f"{row.error_rate:.1%}", *(f"{value:.2f}" if value is not None else "-"
                                                   for value in (row.p50_ms, row.p95_ms, row.p99_ms)),
                        f"{accuracy:.3f} ({entry['feedback']['count']})" if accuracy is not None else "-",
                        f"{drift.get('status', '-')}" + (f" L∞ {drift['linf']:.3f}" if "linf" in drift else ""))
    batching = report.batching
    gpu = report.gpus
    gpu_text = gpu if isinstance(gpu, str) else ", ".join(
        f"{g.name} {g.utilization_percent}% {g.memory_used_mib}/{g.memory_total_mib} MiB" for g in gpu)
    footer = (f"batches {batching.batches:.0f}, mean size {batching.mean_batch_size or '-'}, "
              f"queue depth {batching.queue_depth:.0f}; input anomalies {report.input_anomalies_total or 'none'}; "
              f"GPU: {gpu_text}")
    return Group(traffic, footer, *shadow_lines(quality))


def shadow_lines(quality: dict) -> list[str]:
    """One line per shadow version the server compares (GET /v1/models/{m}/monitoring's "shadow")."""
    lines = []
    for name, document in sorted(quality.items()):
        shadow = document.get("shadow") or {}
        for version, figures in sorted(shadow.get("versions", {}).items()):
            agreement = figures.get("agreement")
            live, mirrored = figures.get("live_latency_ms", {}), figures.get("shadow_latency_ms", {})
            lines.append(f"shadow {name} v{version} ({figures['label']}, {figures['percent']}%): "
                         f"{figures['requests']:,} requests, "
                         f"{'-' if agreement is None else f'{agreement:.1%}'} agreement, mean probability "
                         f"difference {figures.get('mean_probability_difference') or 0:.3f}, p50 live "
                         f"{live.get('p50') or '-'} ms / shadow {mirrored.get('p50') or '-'} ms, "
                         f"{figures['dropped']:,} dropped, {figures['errors']:,} failed "
                         f"(queue {shadow['queue']['depth']}/{shadow['queue']['capacity']})")
    return lines


def monitor(url: str, model: str | None, spec, *, once: bool, fmt: str, interval: float, drift_threshold: float) -> int:
    if once:
        report = snapshot(url, model, spec, interval, drift_threshold)
        if fmt == "json":
            print(json.dumps(report.to_json(), indent=2, default=str))
        else:
            from rich.console import Console

            Console().print(render(report))
        return 0
    from rich.live import Live

    with Live(render(snapshot(url, model, spec, interval, drift_threshold)), refresh_per_second=1) as live:
        try:
            while True:
                live.update(render(snapshot(url, model, spec, interval, drift_threshold)))
        except KeyboardInterrupt:
            return 0
