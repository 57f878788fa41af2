"""How the figures of several server processes (--server_processes) add up: Prometheus expositions,
monitoring windows and feedback, shadow comparisons; which process owns a prediction id; the admission
limits each process gets. Expected values are worked out by hand."""
from __future__ import annotations

import pytest

from conveyor_ml.serving.metrics import ServingMetrics, merge_expositions
from conveyor_ml.serving.model_quality import ModelQuality, owner
from conveyor_ml.serving.model_server import ServerOptions, admission_for
from conveyor_ml.serving.peers import WorkerSlot
from conveyor_ml.serving.shadow import ShadowMirror


def samples(exposition: bytes) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in exposition.decode().splitlines() if line and not line.startswith("#")}


def process_metrics(requests: list[tuple[str, float]], correct: int, wrong: int) -> ServingMetrics:
    metrics = ServingMetrics(versions_loaded=lambda: {"m": 1})
    for protocol, seconds in requests:
        metrics.observe_request("m", 1, "predict", protocol, "OK", seconds)
    metrics.observe_batch("m", 4, queue_depth=2)
    if correct:
        metrics.feedback.labels("m", "1", "correct").inc(correct)
    if wrong:
        metrics.feedback.labels("m", "1", "wrong").inc(wrong)
    metrics.live_accuracy.labels("m", "1").set(correct / (correct + wrong))
    return metrics


def test_one_exposition_comes_back_byte_for_byte():
    exposition = process_metrics([("rest", 0.003), ("grpc", 0.0123)], correct=3, wrong=1).exposition()
    assert merge_expositions([exposition]) == exposition


def test_two_processes_counts_and_buckets_add_up():
    first = process_metrics([("rest", 0.003), ("grpc", 0.0123)], correct=3, wrong=1).exposition()
    second = process_metrics([("rest", 0.0004)], correct=0, wrong=4).exposition()
    merged = samples(merge_expositions([first, second]))
    labels = 'api="predict",model="m",protocol="rest",status="OK",version="1"'
    assert merged[f"conveyor_requests_total{{{labels}}}"] == 2
    latency = 'conveyor_request_latency_seconds_bucket{api="predict",le="%s",model="m",protocol="rest",version="1"}'
    assert merged[latency % "0.0005"] == 1  # the second process's 0.4 ms call
    assert merged[latency % "0.003"] == 2  # and the first's 3 ms one
    assert merged['conveyor_request_latency_seconds_sum{api="predict",model="m",protocol="rest",version="1"}'] == \
        pytest.approx(0.0034)
    assert merged[':tensorflow:serving:request_count{model_name="m",status="OK"}'] == 3
    assert merged['conveyor_batch_size_count{model="m"}'] == 2
    assert merged["conveyor_batch_queue_depth"] == 4  # each process's own queues
    assert merged['conveyor_model_versions_loaded{model="m"}'] == 1  # each loads it: not 2
    assert merged['conveyor_feedback_total{model="m",outcome="correct",version="1"}'] == 3
    assert merged['conveyor_feedback_total{model="m",outcome="wrong",version="1"}'] == 5
    assert merged['conveyor_live_accuracy{model="m",version="1"}'] == pytest.approx(3 / 8)  # not 0.75 + 0.0


def test_a_series_only_one_process_has_is_kept():
    first = process_metrics([("rest", 0.003)], correct=1, wrong=0).exposition()
    second = process_metrics([("grpc", 0.02)], correct=1, wrong=0).exposition()
    merged = samples(merge_expositions([first, second]))
    assert merged['conveyor_requests_total{api="predict",model="m",protocol="rest",status="OK",version="1"}'] == 1
    assert merged['conveyor_requests_total{api="predict",model="m",protocol="grpc",status="OK",version="1"}'] == 1


def test_monitoring_windows_and_feedback_add_up():
    metrics = ServingMetrics()
    first, second = ModelQuality(metrics, id_prefix="0-"), ModelQuality(metrics, id_prefix="1-")
    ids = [first.record_predictions("m", 1, {"class_ids": [[2]]}) for _ in range(3)]
    ids += [second.record_predictions("m", 1, {"class_ids": [[5], [2]]})]
    first.feedback("m", [{"prediction_id": ids[0], "labels": [2]}, {"prediction_id": ids[1], "labels": [7]}])
    second.feedback("m", [{"prediction_id": ids[3], "labels": [5, 5]}])
    summary = first.summarize([first.state("m"), second.state("m")])
    assert summary["1"]["predictions"] == 5
    assert summary["1"]["class_histogram"] == [0, 0, 4, 0, 0, 1]
    assert summary["1"]["feedback"] == {"count": 4, "correct": 2, "accuracy": 0.5}
    assert [prediction_id[:2] for prediction_id in ids] == ["0-", "0-", "0-", "1-"]


def test_shadow_figures_add_up_and_percentiles_span_both():
    state = {"label": "shadow", "percent": 10, "requests": 2, "instances": 4, "agreeing": 3,
             "difference_sum": 0.4, "errors": 1, "dropped": 0, "live_latency": [0.001, 0.002],
             "shadow_latency": [0.004, 0.004]}
    other = {**state, "requests": 1, "instances": 4, "agreeing": 1, "difference_sum": 0.0, "errors": 0,
             "dropped": 5, "live_latency": [0.003], "shadow_latency": [0.010]}
    summary = ShadowMirror.summarize([{"versions": {"2": state}, "queue": {"depth": 1, "capacity": 64}},
                                      {"versions": {"2": other}, "queue": {"depth": 0, "capacity": 64}}])
    version = summary["versions"]["2"]
    assert (version["requests"], version["instances"], version["errors"], version["dropped"]) == (3, 8, 1, 5)
    assert version["agreement"] == 0.5
    assert version["mean_probability_difference"] == 0.05
    assert version["live_latency_ms"]["p50"] == 2.0  # the median of 1, 2 and 3 ms
    assert summary["queue"] == {"depth": 1, "capacity": 128}


@pytest.mark.parametrize("prediction_id, expected", [
    ("0-" + "a" * 32, 0), ("1-" + "a" * 32, 1), ("2-" + "a" * 32, None), ("a" * 32, None), ("-1-x", None),
    ("x-1", None)])
def test_the_owner_of_a_prediction_id(prediction_id, expected):
    assert owner(prediction_id, processes=2) == expected


def test_admission_limits_are_shared_out_between_processes():
    alone = admission_for(ServerOptions(max_inflight_requests=1000, max_request_body_bytes=100))
    assert (alone.max_requests, alone.max_bytes) == (1000, 400)
    three = admission_for(ServerOptions(max_inflight_requests=1000, max_request_body_bytes=100,
                                        worker=WorkerSlot(0, 3, "/nonexistent")))
    assert (three.max_requests, three.max_bytes) == (334, 134)  # rounded up: together at least the limit
    many = admission_for(ServerOptions(max_inflight_requests=1000, max_request_body_bytes=100,
                                       worker=WorkerSlot(1, 8, "/nonexistent")))
    assert many.max_bytes == 100  # still room for one body of the largest allowed size
