"""The quantized canary: the pipeline's pushed int8 TFLite variant released as the canary version beside the
float SavedModel, served by `conveyor serve` with the float model's API, compared live by `conveyor monitor`."""
from __future__ import annotations

import json
import shutil
import threading
from collections import Counter

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.server_process import ServerProcess
from conveyor_ml.formats import release_state as releases
from conveyor_ml.operations.quantized_canary import add_variant_canary
from tests.conftest import run_conveyor, write_spec

pytestmark = pytest.mark.slow
CANARY_WEIGHT = 50


@pytest.fixture(scope="module")
def canary_spec(default_pipeline_run, tmp_path_factory):
    """A copy of the pipeline's workspace (version 1 stable, with its tflite/ variants) and a spec for it."""
    directory = tmp_path_factory.mktemp("canary")
    shutil.copytree(default_pipeline_run.workspace, directory / "workspace")
    return write_spec(directory)


@pytest.fixture(scope="module")
def serving(canary_spec):
    return canary_spec.parent / "workspace" / "serving"


@pytest.fixture(scope="module")
def released(canary_spec, serving):
    before = releases.read_release(serving, "mnist")
    result = run_conveyor("canary", "mnist", "--variant", "int8", "--weight", CANARY_WEIGHT, "--spec", canary_spec)
    assert result.returncode == 0, result.stderr
    assert "canary at 50%" in result.stdout
    return before, releases.read_release(serving, "mnist")


@pytest.fixture(scope="module")
def server(serving, released):
    with ServerProcess("--model_config_file", str(serving / "models.config"), "--prefer_tflite_model",
                       "--tflite_float_io", "--enable_prometheus") as process:
        process.wait_available("mnist", version=released[1].labels["canary"])
        process.wait_available("mnist", version=released[1].labels["stable"])
        yield process


def test_the_variant_becomes_a_tflite_version_labelled_canary(serving, released):
    before, after = released
    canary = after.labels["canary"]
    assert before.labels == {"stable": 1} and after.labels == {"stable": 1, "canary": canary}
    assert canary == 2 and after.weights == {"stable": 100 - CANARY_WEIGHT, "canary": CANARY_WEIGHT}
    version_dir = serving / "mnist" / str(canary)
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.tflite"]
    assert (version_dir / "model.tflite").read_bytes() == (serving / "mnist" / "1" / "tflite" / "int8.tflite").read_bytes()
    assert releases.read_release(serving, "mnist").labels == after.labels  # what the server and TF Serving read


def test_the_canary_is_recorded_in_ml_metadata(canary_spec, released):
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.metadata import store as metadata
    from conveyor_ml.metadata.values import props

    store = metadata.open_store(load_spec(canary_spec).metadata)
    [execution] = store.get_executions_by_type("conveyor.VariantCanary")
    assert props(execution)["model_name"] == "mnist" and "int8 variant of version 1" in props(execution)["reason"]


def test_a_second_canary_or_a_missing_variant_is_refused(serving, released):
    with pytest.raises(ConveyorError, match="already has a canary"):
        add_variant_canary(releases.read_release(serving, "mnist"), "float16", 10)
    stable_only = releases.ModelRelease("mnist", serving, labels={"stable": 1}, weights={"stable": 100})
    with pytest.raises(ConveyorError, match=r"has no int4 variant \(pushed variants: float32, float16, "
                                            r"dynamic_range, int8\)"):
        add_variant_canary(stable_only, "int4", 10)
    assert releases.read_release(serving, "mnist").labels == released[1].labels  # nothing changed
    assert sorted(releases.versions_on_disk(serving / "mnist")) == [1, 2]


def test_the_int8_version_answers_the_float_api_like_the_float_model(server, released, digits_eval):
    images = digits_eval.images[:32]
    answers = {}
    for label in ("stable", "canary"):
        response = requests.post(f"{server.rest_url}/v1/models/mnist/labels/{label}:predict",
                                 json={"instances": images.tolist()}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.headers["X-Model-Version"] == str(released[1].labels[label])
        answers[label] = response.json()["predictions"]
    metadata = requests.get(f"{server.rest_url}/v1/models/mnist/labels/canary/metadata", timeout=10).json()
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["images"]["dtype"] == "DT_FLOAT"  # int8 inside, float outside
    float_classes = [p["class_ids"] for p in answers["stable"]]
    int8_classes = [p["class_ids"] for p in answers["canary"]]
    assert np.mean(np.equal(float_classes, int8_classes)) >= 0.9
    probabilities = np.array([p["probabilities"] for p in answers["canary"]])
    assert probabilities.dtype == np.float64 and np.allclose(probabilities.sum(axis=1), 1.0, atol=0.05)


def test_an_empty_batch_is_answered_by_both_model_formats(server, released):
    """Zero images over gRPC are answered with zero rows, as TF Serving does, by the SavedModel and the TFLite
    version alike: LiteRT's XNNPACK delegate cannot be resized to zero rows (it failed as INTERNAL), nor does
    TensorFlow's oneDNN Conv2D run them on CPUs with AVX-512 VNNI (INVALID_ARGUMENT)."""
    request = predict_pb2.PredictRequest()
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((0, 8, 8), np.float32)))
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for label in ("stable", "canary"):
            request.model_spec.name, request.model_spec.version_label = "mnist", label
            answer = stub.Predict(request, timeout=30)
            shapes = {name: [dim.size for dim in tensor.tensor_shape.dim] for name, tensor in answer.outputs.items()}
            assert shapes == {"class_ids": [0], "logits": [0, 10], "probabilities": [0, 10]}, label
            assert answer.model_spec.version.value == released[1].labels[label]


def test_unversioned_traffic_is_split_and_monitor_compares_both_versions(server, released, digits_eval,
                                                                         canary_spec):
    images, labels = digits_eval.images, digits_eval.labels
    served, feedback = Counter(), []
    for index in range(60):
        response = requests.post(f"{server.rest_url}/v1/models/mnist:predict",
                                 json={"instances": images[index:index + 1].tolist()}, timeout=30)
        assert response.status_code == 200, response.text
        served[response.headers["X-Model-Version"]] += 1
        feedback.append({"prediction_id": response.headers["X-Prediction-Id"], "labels": [int(labels[index])]})
    stable, canary = str(released[1].labels["stable"]), str(released[1].labels["canary"])
    assert served[stable] >= 10 and served[canary] >= 10  # 50/50 over 60 requests
    accepted = requests.post(f"{server.rest_url}/v1/models/mnist/feedback", json={"feedback": feedback}, timeout=30)
    assert accepted.status_code == 200 and accepted.json()["accepted"] == 60

    stop = threading.Event()

    def load():
        while not stop.is_set():
            requests.post(f"{server.rest_url}/v1/models/mnist:predict", json={"instances": images[:1].tolist()},
                          timeout=30)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        result = run_conveyor("monitor", "mnist", "--url", server.rest_url, "--spec", canary_spec,
                              "--once", "--format", "json", "--interval", "1.5")
    finally:
        stop.set()
        worker.join()
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {row["version"]: row for row in report["versions"] if row["model"] == "mnist"}
    assert {stable, canary} <= set(rows)
    for version in (stable, canary):
        assert rows[version]["qps"] > 0 and rows[version]["error_rate"] == 0 and rows[version]["p50_ms"] > 0
    quality = report["quality"]["mnist"]["versions"]
    assert quality[canary]["labels"] == ["canary"] and quality[stable]["labels"] == ["stable"]
    for version in (stable, canary):
        assert quality[version]["feedback"]["count"] == served[version]
        assert quality[version]["feedback"]["accuracy"] >= 0.8
