"""`conveyor serve` as a real process, spoken to with TF Serving's REST API and the official gRPC client."""
from __future__ import annotations

import base64
import shutil

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from conveyor_ml.base.server_process import ServerProcess
from conveyor_ml.formats.examples import serialize_example
from tests.tiny_models import write_tiny_model
from tests.unit.test_serving_files import REFERENCE_BATCHING

pytestmark = pytest.mark.slow
BODY_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def base(tmp_path_factory, trained_export):
    """mnist versions 1 (stable) and 2 (canary), a tiny model, and a model with no version yet."""
    root = tmp_path_factory.mktemp("serving")
    for version in (1, 2):
        shutil.copytree(trained_export, root / "mnist" / str(version))
    write_tiny_model(root / "tiny" / "1")
    (root / "empty").mkdir()
    config = model_server_config_pb2.ModelServerConfig()
    for name in ("mnist", "tiny", "empty"):
        entry = config.model_config_list.config.add(name=name, base_path=str(root / name),
                                                    model_platform="tensorflow")
        if name == "mnist":
            entry.model_version_policy.specific.versions.extend([1, 2])
            entry.version_labels["stable"] = 1
            entry.version_labels["canary"] = 2
    (root / "models.config").write_text(text_format.MessageToString(config))
    (root / "batching.config").write_text(REFERENCE_BATCHING)
    return root


@pytest.fixture(scope="module")
def server(base):
    with ServerProcess("--model_config_file", str(base / "models.config"),
                       "--model_config_file_poll_wait_seconds", "0.5", "--file_system_poll_wait_seconds", "0.5",
                       "--enable_batching", "--batching_parameters_file", str(base / "batching.config"),
                       "--enable_prometheus", "--max_request_body_bytes", str(BODY_LIMIT)) as process:
        process.wait_available("mnist", version=2)
        process.wait_available("tiny")
        yield process


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel), model_service_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture(scope="module")
def reference(trained_export):
    """The same SavedModel loaded in this process: what the server's answers must equal."""
    return tf.saved_model.load(str(trained_export)).signatures["serving_default"]


def post(server, path, body=None, data=None):
    return requests.post(f"{server.rest_url}{path}", json=body, data=data, timeout=30)


def test_model_status_for_all_versions_a_version_and_a_label(server):
    everything = requests.get(f"{server.rest_url}/v1/models/mnist", timeout=10).json()
    assert {(s["version"], s["state"]) for s in everything["model_version_status"]} == {
        ("1", "AVAILABLE"), ("2", "AVAILABLE")}
    assert everything["model_version_status"][0]["status"] == {"error_code": "OK", "error_message": ""}
    one = requests.get(f"{server.rest_url}/v1/models/mnist/versions/1", timeout=10).json()
    assert [s["version"] for s in one["model_version_status"]] == ["1"]
    canary = requests.get(f"{server.rest_url}/v1/models/mnist/labels/canary", timeout=10).json()
    assert [s["version"] for s in canary["model_version_status"]] == ["2"]


def test_metadata_lists_the_signatures(server):
    metadata = requests.get(f"{server.rest_url}/v1/models/mnist/versions/1/metadata", timeout=10).json()
    assert metadata["model_spec"] == {"name": "mnist", "signature_name": "", "version": "1"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "bytes_predictor", "serving_examples", "classification"} <= set(signatures)
    assert signatures["serving_default"]["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert signatures["classification"]["method_name"] == "tensorflow/serving/classify"


def test_predict_row_and_columnar_match_the_model(server, reference, digits_eval):
    images = digits_eval.images[:8]
    expected = reference(images=tf.constant(images))
    rows = post(server, "/v1/models/mnist/labels/stable:predict", {"instances": images.tolist()})
    assert rows.status_code == 200 and rows.headers["X-Model-Version"] == "1"
    predictions = rows.json()["predictions"]
    assert [p["class_ids"] for p in predictions] == expected["class_ids"].numpy().tolist()
    np.testing.assert_allclose([p["probabilities"] for p in predictions], expected["probabilities"].numpy(),
                               atol=1e-6)
    columns = post(server, "/v1/models/mnist/versions/1:predict", {"inputs": {"images": images.tolist()}}).json()
    assert columns["outputs"]["class_ids"] == expected["class_ids"].numpy().tolist()
    assert np.asarray(columns["outputs"]["logits"]).shape == (8, 10)


def test_b64_images_through_bytes_predictor(server, reference, digits_eval):
    images = np.round(digits_eval.images[:4]).astype(np.uint8)
    encoded = [{"b64": base64.b64encode(tf.io.encode_png(i[..., None]).numpy()).decode()} for i in images]
    response = post(server, "/v1/models/mnist/versions/1:predict",
                    {"signature_name": "bytes_predictor", "instances": encoded})
    assert response.status_code == 200, response.text
    expected = reference(images=tf.constant(images, tf.float32))["class_ids"].numpy().tolist()
    assert [p["class_ids"] for p in response.json()["predictions"]] == expected


def test_classify_over_rest_and_regress_error(server, reference, digits_eval):
    images = digits_eval.images[:3]
    examples = [{"image": image.reshape(-1).tolist()} for image in images]
    response = post(server, "/v1/models/mnist/versions/1:classify",
                    {"signature_name": "classification", "examples": examples})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    best = [max(row, key=lambda pair: pair[1])[0] for row in results]
    assert best == [str(c) for c in reference(images=tf.constant(images))["class_ids"].numpy()]
    regress = post(server, "/v1/models/mnist:regress", {"examples": examples})
    assert regress.status_code == 400
    # TF Serving's default (no method-name check): serving_default is refused for not being shaped like a
    # regression signature (three outputs).
    assert regress.json()["error"] == "Expected one output Tensor."


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/models/nope:predict", {"instances": [[1.0]]}, 404, "Servable not found for request: Latest(nope)"),
    ("/v1/models/mnist/versions/7:predict", {"instances": [[1.0]]}, 404, "Specific(mnist, 7)"),
    ("/v1/models/mnist/labels/beta:predict", {"instances": [[1.0]]}, 400, "Unrecognized servable version label"),
    ("/v1/models/mnist:predict", {"signature_name": "nope", "instances": [[1.0]]}, 400,
     'Serving signature name: "nope" not found'),
    # TensorFlow's own reason (about the padded batch: batching is on), then the shapes this client sent.
    ("/v1/models/mnist:predict", {"instances": [[1.0, 2.0]]}, 400, "(the model refused the inputs: images [1,2])"),
    ("/v1/models/mnist:predict", {"instances": [[["a"] * 8] * 8]}, 400, "is not of expected type: float"),
    ("/v1/models/mnist:predict", {"inputs": {"pixels": [[[0] * 8] * 8]}}, 400, "Missing named input: images"),
    ("/v1/models/mnist:predict", {"signature_name": "bytes_predictor", "instances": [{"b64": "@@@"}]}, 400,
     "Unable to base64 decode"),
    ("/v1/models/empty:predict", {"instances": [[1.0]]}, 503, "no version is loaded yet"),
    ("/v1/models/mnist:explain", {"instances": [[1.0]]}, 400, "Malformed request"),
])
def test_errors_have_tf_serving_codes_and_bodies(server, path, body, status, message):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_invalid_json_non_images_and_oversized_bodies(server):
    broken = post(server, "/v1/models/mnist:predict", data=b'{"instances": [')
    assert broken.status_code == 400 and broken.json()["error"].startswith("JSON Parse error")
    not_an_image = post(server, "/v1/models/mnist:predict", {
        "signature_name": "bytes_predictor", "instances": [{"b64": base64.b64encode(b"plain text").decode()}]})
    assert not_an_image.status_code == 400
    huge = post(server, "/v1/models/mnist:predict", data=b" " * (BODY_LIMIT + 1))
    assert huge.status_code == 413 and "too large" in huge.json()["error"]
    assert post(server, "/v1/models/mnist:predict", {"instances": [[[0.0] * 8] * 8]}).status_code == 200


def test_grpc_predict_by_version_and_label(stub, reference, digits_eval):
    prediction, _ = stub
    images = digits_eval.images[:5]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.version_label = "canary"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    response = prediction.Predict(request, timeout=30)
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"
    expected = reference(images=tf.constant(images))["class_ids"].numpy()
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["class_ids"]), expected)

    request.model_spec.ClearField("version_label")
    request.model_spec.version.value = 1
    request.output_filter.append("class_ids")
    response = prediction.Predict(request, timeout=30)
    assert response.model_spec.version.value == 1 and list(response.outputs) == ["class_ids"]


@pytest.mark.parametrize("change, code", [
    (lambda r: setattr(r.model_spec, "name", "nope"), grpc.StatusCode.NOT_FOUND),
    (lambda r: r.model_spec.version.__setattr__("value", 9), grpc.StatusCode.NOT_FOUND),
    (lambda r: setattr(r.model_spec, "version_label", "beta"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: setattr(r.model_spec, "signature_name", "nope"), grpc.StatusCode.FAILED_PRECONDITION),
    (lambda r: r.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((2, 3), np.float32))),
     grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: setattr(r.model_spec, "name", "empty"), grpc.StatusCode.UNAVAILABLE),
])
def test_grpc_status_codes(stub, change, code):
    prediction, _ = stub
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 8, 8), np.float32)))
    change(request)
    with pytest.raises(grpc.RpcError) as error:
        prediction.Predict(request, timeout=30)
    assert error.value.code() == code


def test_grpc_metadata_status_classify_and_multi_inference(stub, digits_eval):
    prediction, models = stub
    metadata_request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata_request.model_spec.name = "mnist"
    metadata = prediction.GetModelMetadata(metadata_request, timeout=30)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    metadata.metadata["signature_def"].Unpack(signature_map)
    assert "bytes_predictor" in signature_map.signature_def

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "mnist"
    status_request.model_spec.version_label = "stable"
    [status] = models.GetModelStatus(status_request, timeout=30).model_version_status
    assert status.version == 1 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE

    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "mnist"
    classify.model_spec.signature_name = "classification"
    for image, label in zip(digits_eval.images[:4], digits_eval.labels[:4]):
        classify.input.example_list.examples.add().ParseFromString(serialize_example(image, int(label)))
    result = prediction.Classify(classify, timeout=30)
    assert len(result.result.classifications) == 4
    assert len(result.result.classifications[0].classes) == 10
    assert abs(sum(c.score for c in result.result.classifications[0].classes) - 1.0) < 1e-4

    regress = regression_pb2.RegressionRequest(model_spec=classify.model_spec, input=classify.input)
    with pytest.raises(grpc.RpcError) as error:
        prediction.Regress(regress, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    multi = inference_pb2.MultiInferenceRequest(input=classify.input)
    task = multi.tasks.add(method_name="tensorflow/serving/classify")
    task.model_spec.CopyFrom(classify.model_spec)
    [inference] = prediction.MultiInference(multi, timeout=30).results
    assert len(inference.classification_result.classifications) == 4


def test_prometheus_metrics_count_requests_and_batches(server):
    for _ in range(3):
        post(server, "/v1/models/tiny:predict", {"instances": [[1.0, 2.0, 3.0]]})
    text = requests.get(f"{server.rest_url}/monitoring/prometheus/metrics", timeout=10).text
    counts = [line for line in text.splitlines()
              if line.startswith('conveyor_requests_total{api="predict",model="tiny",protocol="rest",status="OK"')]
    assert counts and float(counts[0].split()[-1]) >= 3
    assert 'conveyor_request_latency_seconds_bucket{api="predict",le="0.005",model="tiny"' in text
    assert "conveyor_batch_size_count" in text
    assert 'conveyor_model_versions_loaded{model="mnist"} 2.0' in text
    assert ':tensorflow:serving:request_count{model_name="tiny",status="OK"}' in text
    assert ':tensorflow:serving:request_latency_bucket{API="predict",entrypoint="REST"' in text


def test_readiness_waits_for_every_model(server, base):
    assert requests.get(f"{server.rest_url}/healthz", timeout=10).status_code == 200
    ready = requests.get(f"{server.rest_url}/readyz", timeout=10)
    assert ready.status_code == 503  # "empty" has no version, and says why
    assert ready.json() == {"ready": False, "waiting": {"empty": (
        f"No versions of servable empty found under base path {base}/empty. Did you forget to name "
        "your leaf directory as a number (eg. '/1/')?")}}


def test_reload_config_over_grpc(stub, base, server):
    _, models = stub
    only_tiny = model_server_config_pb2.ModelServerConfig()
    only_tiny.model_config_list.config.add(name="tiny", base_path=str(base / "tiny"), model_platform="tensorflow")
    response = models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=only_tiny), timeout=60)
    assert response.status.error_code == 0
    assert requests.get(f"{server.rest_url}/v1/models/mnist", timeout=10).status_code == 404
    assert requests.get(f"{server.rest_url}/readyz", timeout=10).status_code == 200
    original = text_format.Parse((base / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=original), timeout=120)
    server.wait_available("mnist", version=2)
