"""Monitoring against a live `conveyor serve` on the pipeline's model: schema checks on inputs, the
prediction log with feedback and live accuracy, prediction drift, and `conveyor monitor --once`."""
from __future__ import annotations

import json
import shutil
import threading

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from conveyor_ml.base.server_process import ServerProcess
from tests.conftest import ROOT, run_conveyor

pytestmark = pytest.mark.slow
SCHEMA = ROOT / "schemas" / "mnist" / "schema.pbtxt"


def start_server(trained_export, directory, *flags) -> ServerProcess:
    shutil.copytree(trained_export, directory / "mnist" / "1")
    server = ServerProcess("--model_name", "mnist", "--model_base_path", directory / "mnist", "--enable_prometheus",
                           "--input_schema", SCHEMA, *map(str, flags))
    server.wait_available("mnist")
    return server


@pytest.fixture(scope="module")
def watched(trained_export, tmp_path_factory):
    server = start_server(trained_export, tmp_path_factory.mktemp("watched"))
    yield server
    server.stop()


def predict(server, images) -> requests.Response:
    return requests.post(f"{server.rest_url}/v1/models/mnist:predict",
                         json={"instances": np.asarray(images).tolist()}, timeout=30)


def metric(server, prefix: str) -> float:
    text = requests.get(f"{server.rest_url}/monitoring/prometheus/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]
    return sum(values)


def test_out_of_schema_inputs_are_counted_per_feature(watched, digits_eval):
    series = 'conveyor_input_anomalies_total{feature="image",kind="above_max",model="mnist"}'
    before = metric(watched, series)
    bright = digits_eval.images[:2].copy()
    bright[0, 0, 0] = 300.0
    response = predict(watched, bright)
    assert response.status_code == 200  # counted, not rejected, unless the server is told to
    assert metric(watched, series) == before + 1
    assert predict(watched, digits_eval.images[:2]).status_code == 200
    assert metric(watched, series) == before + 1
    assert "anomalous input for mnist" in watched.log_tail(50)


def test_rejecting_mode_answers_400_naming_the_schema(trained_export, tmp_path, digits_eval):
    server = start_server(trained_export, tmp_path, "--reject_anomalous_inputs")
    try:
        bad = digits_eval.images[:1].copy()
        bad[0, 3, 3] = -5.0
        response = predict(server, bad)
        assert response.status_code == 400
        assert response.json()["error"].startswith("input anomaly: images: below min (schema: image in [0, 255]")
        assert predict(server, digits_eval.images[:1]).status_code == 200
    finally:
        server.stop()


def test_feedback_gives_live_accuracy_on_a_known_sequence(watched, digits_eval):
    ids, predicted = [], []
    for image in digits_eval.images[:12]:
        response = predict(watched, image[None])
        ids.append(response.headers["X-Prediction-Id"])
        class_ids = response.json()["predictions"][0]["class_ids"]
        predicted.append(class_ids[0] if isinstance(class_ids, list) else class_ids)
    truth = [int(label) for label in digits_eval.labels[:12]]
    truth[0] = (predicted[0] + 1) % 10  # one guaranteed miss, so the figure is not trivially 1.0
    expected = float(np.mean(np.asarray(predicted) == np.asarray(truth)))
    answer = requests.post(f"{watched.rest_url}/v1/models/mnist/feedback", timeout=10, json={
        "feedback": [{"prediction_id": i, "labels": [t]} for i, t in zip(ids, truth)] +
                    [{"prediction_id": "not-a-logged-id", "labels": [1]}]}).json()
    assert answer["accepted"] == 12 and answer["unknown_prediction_ids"] == ["not-a-logged-id"]
    assert answer["live_accuracy"]["1"] == pytest.approx(expected)
    assert metric(watched, 'conveyor_live_accuracy{model="mnist",version="1"}') == pytest.approx(expected)
    monitoring = requests.get(f"{watched.rest_url}/v1/models/mnist/monitoring", timeout=10).json()
    assert monitoring["versions"]["1"]["feedback"]["count"] == 12
    bad = requests.post(f"{watched.rest_url}/v1/models/mnist/feedback", json={"feedback": [{"prediction_id": ids[1]}]},
                        timeout=10)
    assert bad.status_code == 400 and "labels" in bad.json()["error"]
    replayed = requests.post(f"{watched.rest_url}/v1/models/mnist/feedback", timeout=10,
                             json={"feedback": [{"prediction_id": ids[0], "labels": [predicted[0]]}]}).json()
    assert replayed["accepted"] == 0 and replayed["unknown_prediction_ids"] == [ids[0]]  # an id counts once
    assert metric(watched, 'conveyor_live_accuracy{model="mnist",version="1"}') == pytest.approx(expected)
    fresh = predict(watched, digits_eval.images[12][None]).headers["X-Prediction-Id"]
    wrong_count = requests.post(f"{watched.rest_url}/v1/models/mnist/feedback", timeout=10,
                                json={"feedback": [{"prediction_id": fresh, "labels": [1, 2]}]})
    assert wrong_count.status_code == 400
    assert requests.post(f"{watched.rest_url}/v1/models/nope/feedback", json={"feedback": []}, timeout=10).status_code == 404


def test_grpc_predictions_carry_their_id_in_trailing_metadata(watched, digits_eval):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(digits_eval.images[:1].astype(np.float32)))
    with grpc.insecure_channel(watched.grpc_target) as channel:
        _, call = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict.with_call(request, timeout=30)
    trailers = dict(call.trailing_metadata())
    assert len(trailers["x-prediction-id"]) == 32


def test_monitor_once_reports_traffic_and_flags_a_skewed_prediction_stream(trained_export, tmp_path, digits_eval,
                                                                          default_pipeline_run):
    server = start_server(trained_export, tmp_path)
    try:
        zeros = digits_eval.images[digits_eval.labels == 0]
        for _ in range(6):
            assert predict(server, zeros).status_code == 200
        stop = threading.Event()

        def load():
            while not stop.is_set():
                predict(server, zeros[:1])

        worker = threading.Thread(target=load)
        worker.start()
        try:
            result = run_conveyor("monitor", "--url", server.rest_url, "--spec", default_pipeline_run.spec, "--once",
                                  "--format", "json", "--interval", "1")
        finally:
            stop.set()
            worker.join()
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        [row] = [v for v in report["versions"] if v["model"] == "mnist" and v["version"] == "1"]
        assert row["qps"] > 1 and row["error_rate"] == 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        drift = report["quality"]["mnist"]["versions"]["1"]["prediction_drift"]
        assert drift["status"] == "DRIFT" and drift["linf"] > 0.5
        assert sum(drift["training"]) == pytest.approx(1.0, abs=1e-3) and max(drift["training"]) < 0.2
        assert report["gpus"] == "no GPU" or isinstance(report["gpus"], list)
        table = run_conveyor("monitor", "--url", server.rest_url, "--spec", default_pipeline_run.spec, "--once",
                             "--interval", "0.2")
        assert "DRIFT" in table.stdout
        named = run_conveyor("monitor", "mnist", "--url", server.rest_url, "--once", "--interval", "0.2")
        assert named.returncode == 0 and "mnist" in named.stdout, named.stderr
        unknown = run_conveyor("monitor", "digits", "--url", server.rest_url, "--once", "--interval", "0.2")
        assert unknown.returncode == 2 and unknown.stdout == "", unknown.stdout  # it was an empty table, exit 0
        assert unknown.stderr.strip().splitlines() == [
            f"conveyor: error: {server.rest_url} serves no model named 'digits'; `conveyor monitor` without a "
            "name shows every model it serves"]
    finally:
        server.stop()
    gone = run_conveyor("monitor", "--url", server.rest_url, "--once")
    assert gone.returncode == 2 and "no server at" in gone.stderr
