"""The per-request series: every answered call counted once and exported as Conveyor's series and as
TF Serving's (names, labels, microsecond buckets), with figures worked out by hand here."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from conveyor_ml.serving.metrics import ServingMetrics, merge_expositions


def samples(metrics: ServingMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.exposition().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_each_call_is_counted_under_its_labels_in_both_series():
    metrics = ServingMetrics()
    for seconds in (0.0004, 0.004, 0.02):
        metrics.observe_request("digits", 2, "predict", "rest", "OK", seconds)
    metrics.observe_request("digits", 2, "predict", "grpc", "OK", 0.001)
    metrics.observe_request("digits", None, "predict", "rest", "NOT_FOUND", 0.0)
    got = samples(metrics)

    def ours(status, protocol, version):
        return got[("conveyor_requests_total", (("api", "predict"), ("model", "digits"), ("protocol", protocol),
                                                ("status", status), ("version", version)))]

    assert ours("OK", "rest", "2") == 3
    assert ours("OK", "grpc", "2") == 1
    assert ours("NOT_FOUND", "rest", "") == 1
    # TF Serving's count: by model and status only, every protocol and version together (a parser names a
    # counter's samples <family>_total).
    assert got[(":tensorflow:serving:request_count_total", (("model_name", "digits"), ("status", "OK")))] == 4
    assert got[(":tensorflow:serving:request_count_total", (("model_name", "digits"), ("status", "NOT_FOUND")))] == 1


def test_latency_buckets_are_cumulative_in_seconds_and_in_tf_servings_microseconds():
    metrics = ServingMetrics()
    for seconds in (0.0004, 0.004, 0.02):
        metrics.observe_request("digits", 2, "predict", "rest", "OK", seconds)
    got = samples(metrics)
    labels = (("api", "predict"), ("model", "digits"), ("protocol", "rest"), ("version", "2"))

    def bucket(le):
        return got[("conveyor_request_latency_seconds_bucket", tuple(sorted(labels + (("le", le),))))]

    assert (bucket("0.0005"), bucket("0.005"), bucket("0.015"), bucket("0.025"), bucket("+Inf")) == (1, 2, 2, 3, 3)
    assert got[("conveyor_request_latency_seconds_count", labels)] == 3
    assert abs(got[("conveyor_request_latency_seconds_sum", labels)] - 0.0244) < 1e-9
    # TF Serving's buckets are 10 * 1.8**i microseconds: 612.22 holds 400 us; 6426.84 holds 4,000 us;
    # 20822.96 holds 20,000 us (and 11568.31 does not).
    tf_labels = (("API", "predict"), ("entrypoint", "REST"), ("model_name", "digits"))

    def tf_bucket(le):
        return got[(":tensorflow:serving:request_latency_bucket", tuple(sorted(tf_labels + (("le", le),))))]

    assert (tf_bucket("340.122"), tf_bucket("612.22"), tf_bucket("6426.84"), tf_bucket("11568.3"),
            tf_bucket("20823"), tf_bucket("+Inf")) == (0, 1, 2, 2, 3, 3)
    assert abs(got[(":tensorflow:serving:request_latency_sum", tf_labels)] - 24400) < 1e-6
    assert got[(":tensorflow:serving:request_latency_count", tf_labels)] == 3


def test_grpc_calls_are_tf_servings_grpc_entrypoint():
    metrics = ServingMetrics()
    metrics.observe_request("digits", 1, "predict", "grpc", "OK", 0.002)
    metrics.observe_request("digits", 1, "classify", "rest", "OK", 0.002)
    got = samples(metrics)
    assert got[(":tensorflow:serving:request_latency_count",
                (("API", "predict"), ("entrypoint", "GRPC"), ("model_name", "digits")))] == 1
    assert got[(":tensorflow:serving:request_latency_count",
                (("API", "classify"), ("entrypoint", "REST"), ("model_name", "digits")))] == 1


def tf_serving_counter_lines(text: str) -> list[str]:
    name = ":tensorflow:serving:request_count"
    return [line for line in text.splitlines() if line.startswith((name, f"# TYPE {name}", f"# HELP {name}"))]


def test_tf_servings_counter_is_one_family_named_as_tf_serving_names_it():
    """TF Serving's PrometheusExporter (util/prometheus_exporter.cc, SerializeScalar) writes
    `# TYPE <name> counter` and samples `<name>{...} N`, no HELP; prometheus_client's own writer would name
    the family `<name>_total`, a family no sample belongs to. Alone and merged across server processes."""
    metrics = ServingMetrics()
    metrics.observe_request("digits", 1, "predict", "rest", "OK", 0.001)
    metrics.observe_request("digits", 1, "predict", "grpc", "OK", 0.001)
    other = ServingMetrics()
    other.observe_request("digits", 1, "predict", "rest", "OK", 0.001)
    for text, count in ((metrics.exposition().decode(), 2),
                        (merge_expositions([metrics.exposition(), other.exposition()]).decode(), 3)):
        assert tf_serving_counter_lines(text) == [
            "# TYPE :tensorflow:serving:request_count counter",
            f':tensorflow:serving:request_count{{model_name="digits",status="OK"}} {count}']
        families = {family.name: family for family in text_string_to_metric_families(text)}
        family = families[":tensorflow:serving:request_count"]
        assert family.type == "counter"
        assert [(sample.labels, sample.value) for sample in family.samples] == [
            ({"model_name": "digits", "status": "OK"}, count)]
        assert families[":tensorflow:serving:request_latency"].type == "histogram"
        assert ":tensorflow:serving:request_count_total" not in families
