"""`conveyor serve` started with the exact container arguments `conveyor deploy render --target k8s` writes for
TF Serving, and the rendered probes answered; then the TF Serving flags whose effect a client sees
(--rest_api_timeout_in_ms, --grpc_channel_arguments, --rest_api_enable_cors_support,
--enable_serialization_as_tensor_content, --enable_grpc_healthcheck_service) on the same server."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from conveyor_ml.base.server_process import ServerProcess
from conveyor_ml.base.spec import AutoscalingSettings, BatchingSettings
from conveyor_ml.formats.release_state import ModelRelease
from conveyor_ml.operations import manifests
from tests.tiny_models import write_tiny_model

pytestmark = pytest.mark.slow
MAX_RECEIVE_BYTES = 4096


def _health_request(service: str) -> bytes:
    """grpc.health.v1.HealthCheckRequest{service} on the wire, written by hand (field 1, length-delimited)."""
    encoded = service.encode()
    return (b"\x0a" + bytes([len(encoded)]) + encoded) if encoded else b""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """The stable Deployment's container and its ConfigMap as rendered for model `tiny`, version 1."""
    root = tmp_path_factory.mktemp("k8s")
    write_tiny_model(root / "models" / "tiny" / "1")
    release = ModelRelease("tiny", root / "models", labels={"stable": 1}, weights={"stable": 100})
    objects = manifests.k8s_objects(release, BatchingSettings(batch_timeout_micros=5000), AutoscalingSettings())
    [container] = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    (root / "config").mkdir()
    for name, text in config_map["data"].items():  # mounted at /config, models at /models in the pod
        (root / "config" / name).write_text(text.replace(manifests.CONTAINER_MODELS, str(root / "models")))
    args = [arg.replace(manifests.CONTAINER_CONFIG, str(root / "config")) for arg in container["args"]]
    return container, args


@pytest.fixture(scope="module")
def server(deployment):
    _, args = deployment
    # ServerProcess appends its own free --port and --rest_api_port: later flags win, as in TF Serving. First,
    # TF Serving's own default where ours differs: the rendered args must start the real image's server too.
    with ServerProcess("--allow_version_labels_for_unavailable_models=false", *args, "--rest_api_timeout_in_ms=1",
                       "--rest_api_enable_cors_support", "--enable_serialization_as_tensor_content",
                       f"--grpc_channel_arguments=grpc.max_receive_message_length={MAX_RECEIVE_BYTES}") as process:
        process.wait_available("tiny")
        yield process


def test_the_rendered_probes_answer(server, deployment):
    container, _ = deployment
    for probe in ("startupProbe", "readinessProbe"):
        check = container[probe]["httpGet"]
        assert check["port"] == 8501  # the REST port, here the process's own
        response = requests.get(f"{server.rest_url}{check['path']}", timeout=10)
        assert response.status_code == 200
        assert response.json()["model_version_status"][0]["state"] == "AVAILABLE"
    assert container["livenessProbe"]["grpc"] == {"port": 8500}  # no service name: the server as a whole
    with grpc.insecure_channel(server.grpc_target) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        assert check(_health_request(""), timeout=10) == b"\x08\x01"  # status: SERVING
        assert check(_health_request("tensorflow.serving.PredictionService"), timeout=10) == b"\x08\x01"
        with pytest.raises(grpc.RpcError) as unknown:
            check(_health_request("nope"), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(server.grpc_target) as channel:  # not a HealthCheckRequest: the client's fault
        garbage = b"\xff\xff\xff"
        for attempt in (lambda: channel.unary_unary("/grpc.health.v1.Health/Check")(garbage, timeout=10),
                        lambda: list(channel.unary_stream("/grpc.health.v1.Health/Watch")(garbage, timeout=10))):
            with pytest.raises(grpc.RpcError) as refused:
                attempt()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid grpc.health.v1.HealthCheckRequest" in refused.value.details()
    assert requests.get(f"{server.rest_url}/healthz", timeout=10).status_code == 200
    assert requests.get(f"{server.rest_url}/readyz", timeout=10).json() == {"ready": True}


def test_rest_timeout_bounds_the_model_run(server):
    slow = requests.post(f"{server.rest_url}/v1/models/tiny:predict",
                         json={"signature_name": "slow", "instances": [[1.0, 2.0, 3.0]]}, timeout=30)
    assert slow.status_code == 504  # DEADLINE_EXCEEDED, as TF Serving maps it
    assert "Deadline exceeded" in slow.json()["error"]


def test_channel_arguments_reach_the_grpc_server(server):
    def predict(rows: int):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "tiny"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((rows, 3), np.float32)))
        with grpc.insecure_channel(server.grpc_target) as channel:
            return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)

    small = predict(2)
    # --enable_serialization_as_tensor_content: raw bytes instead of float_val.
    assert not small.outputs["y"].float_val
    np.testing.assert_array_equal(tf.make_ndarray(small.outputs["y"]), np.full((2, 3), 2.0))
    with pytest.raises(grpc.RpcError) as too_big:
        predict(1000)  # 12 kB of floats > grpc.max_receive_message_length
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cors_headers_and_preflight(server):
    response = requests.get(f"{server.rest_url}/v1/models/tiny", timeout=10)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Access-Control-Allow-Methods"] == "POST, GET"
    preflight = requests.options(f"{server.rest_url}/v1/models/tiny:predict",
                                 headers={"Origin": "https://example.com"}, timeout=10)
    assert preflight.status_code == 200 and preflight.headers["Access-Control-Allow-Headers"] == "Content-Type"
    anonymous = requests.options(f"{server.rest_url}/v1/models/tiny:predict", timeout=10)
    # http_server.cc: FAILED_PRECONDITION "Origin header is missing in CORS preflight" is the status only; the
    # body written is the (empty) output, as for an accepted preflight.
    assert anonymous.status_code == 400 and anonymous.content == b""
