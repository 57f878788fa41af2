"""TensorFlow Serving's own model-server tests, ported to run against `conveyor serve`.

Source: tensorflow_serving/model_servers/tensorflow_model_server_test.py and its test base
(test_util/tensorflow_model_server_test_base.py). Each ported case keeps upstream's flags, requests and
expected values; the harness below re-implements upstream's (not copied): servers are started with the flags
upstream's RunServer passes (--rest_api_timeout_in_ms=5000, --grpc_socket_path, --grpc_channel_arguments ending
in grpc.so_reuseaddr=1, ...), one per distinct flag set and shared by the tests that use it, and are ready
when a Predict for `intentionally_missing_model` fails naming the Servable (upstream's WaitForServerReady).

The models are TF Serving's test models, rebuilt at test time by tests/tf_serving_models.py — our own
generator of the same graphs, names and values, not TF Serving's script.

upstream test -> here:
  testGetModelStatus -> TestHalfPlusTwo.test_get_model_status
  testGetModelMetadata -> TestHalfPlusTwo.test_get_model_metadata
  testClassify / testRegress / testMultiInference -> TestHalfPlusTwo.test_classify / test_regress /
      test_multi_inference
  testClassifyTf2 / testRegressTf2 / testMultiInferenceTf2 -> TestHalfPlusTwoTf2.*
  testPredictSavedModel -> TestHalfPlusTwo.test_predict_saved_model
  testClassifyREST / testRegressREST / testPredictREST / testPredictColumnarREST / testGetStatusREST /
      testGetModelMetadataREST -> TestHalfPlusTwo.test_*_rest
  testPredictUDS -> TestHalfPlusTwo.test_predict_uds
  testGoodModelConfig -> TestGoodModelConfig.test_good_model_config
  testBadModelConfig -> test_bad_model_config
  testModelConfigReload -> TestModelConfigReload.test_model_config_reload
  testModelConfigReloadWithZeroPollPeriod -> TestModelConfigReloadWithZeroPollPeriod.*
  testGoodGrpcChannelArgs -> TestGoodGrpcChannelArgs.test_good_grpc_channel_args
  testPrometheusEndpoint -> TestPrometheusEndpoint.test_prometheus_endpoint
  testPredictOnTfLite / testPredictWithSignatureDefOnTfLite -> TestPredictOnTfLite*
  test_tf_saved_model_save / test_tf_saved_model_save_multiple_signatures /
      test_sequential_keras_saved_model_save / test_distrat_sequential_keras_saved_model_save -> Test*SavedModelSave*
  (removed upstream with SessionBundle, portable:) testPredictBatching -> TestPredictBatching.test_predict_batching
Not ported: test_profiler_service_with_valid_trace_request (needs TensorFlow's C++ profiler gRPC service,
which conveyor serve refuses to claim: --enable_profiler=true is refused) and test_tf_text (its model needs
tensorflow-text's custom ops, not a dependency here). _TestBadModel is not a test upstream.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from conveyor_ml.base.ports import free_port
from conveyor_ml.base.server_process import ServerProcess
from tests import tf_serving_models as models
from tests.conftest import ROOT, run_conveyor

pytestmark = pytest.mark.slow

RPC_TIMEOUT = 20.0  # upstream's test file
HTTP_REST_TIMEOUT_MS = 5000
WAIT_FOR_SERVER_READY_SECONDS = 240  # upstream: 60; TensorFlow starts slower on a shared 2-core machine
SERVERS_AHEAD = 2  # servers started ahead of the test class that will use them
EXPECTED_METADATA = ROOT / "tests" / "fixtures" / "tf_serving_half_plus_two_metadata.json"

# Upstream's testdata files, character for character.
GOOD_MODEL_CONFIG = """model_config_list: {
  config: {
    name: "half_plus_two",
    base_path: "${TEST_HALF_PLUS_TWO_DIR}",
    model_platform: "tensorflow"
  },
  config: {
    name: "half_plus_three",
    base_path: "${TEST_HALF_PLUS_THREE_DIR}",
    model_platform: "tensorflow"
  }
}
"""
BAD_MODEL_CONFIG = "improperly formatted file"
BATCHING_CONFIG = """max_batch_size { value: 128 }
batch_timeout_micros { value: 0 }
max_enqueued_batches { value: 1000000 }
num_batch_threads { value: 8 }
"""
MONITORING_CONFIG = """prometheus_config: {
  enable: true,
  path: "/monitoring/prometheus/metrics"
}
"""
RELOAD_CONFIG = """
    model_config_list: {{
      config: {{
        name: "{name}",
        base_path: "{model_path}",
        model_platform: "tensorflow"
      }}
    }}
    """


# -- upstream's harness, re-implemented ---------------------------------------------------------------------
def harness_flags(socket_path: str, model_name: str | None = None, model_path: Path | None = None,
                  model_type: str = "tf", model_config_file: Path | None = None,
                  monitoring_config_file: Path | None = None, batching_parameters_file: Path | None = None,
                  grpc_channel_arguments: str = "", model_config_file_poll_period: int | None = None) -> list[str]:
    """The flags upstream's RunServer passes (ports are added by ServerProcess), in its order."""
    flags = [f"--rest_api_timeout_in_ms={HTTP_REST_TIMEOUT_MS}", f"--grpc_socket_path={socket_path}"]
    if model_config_file:
        flags.append(f"--model_config_file={model_config_file}")
    elif model_path:
        flags += [f"--model_name={model_name}", f"--model_base_path={model_path}"]
    else:
        raise ValueError("Both model_config_file and model_path cannot be empty!")
    if model_type == "tflite":
        flags.append("--prefer_tflite_model=true")
    if monitoring_config_file:
        flags.append(f"--monitoring_config_file={monitoring_config_file}")
    if model_config_file_poll_period is not None:
        flags.append(f"--model_config_file_poll_wait_seconds={model_config_file_poll_period}")
    if batching_parameters_file:
        flags += ["--enable_batching", f"--batching_parameters_file={batching_parameters_file}"]
    # Upstream always appends so_reuseaddr; a later repeat of a key wins.
    channel = f"{grpc_channel_arguments},grpc.so_reuseaddr=1" if grpc_channel_arguments else "grpc.so_reuseaddr=1"
    flags.append(f"--grpc_channel_arguments={channel}")
    return flags


class Served:
    """A started `conveyor serve` and the Unix socket its gRPC API also listens on."""

    def __init__(self, process: ServerProcess, socket_path: str):
        self.process = process
        self.socket_path = socket_path
        self.ready = False

    @property
    def grpc(self) -> str:
        return f"localhost:{self.process.grpc_port}"

    @property
    def rest(self) -> str:
        return f"localhost:{self.process.rest_port}"


def wait_for_server_ready(served: Served) -> None:
    """Upstream's WaitForServerReady: a Predict for a model nobody serves must fail naming the Servable."""
    if served.ready:
        return
    deadline = time.monotonic() + WAIT_FOR_SERVER_READY_SECONDS
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "intentionally_missing_model"
    while time.monotonic() < deadline:
        if served.process.process.poll() is not None:
            pytest.fail(f"conveyor serve exited with {served.process.process.returncode}:\n{served.process.log_tail()}")
        time.sleep(1)
        try:
            with grpc.insecure_channel(served.grpc) as channel:
                prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, 5.0)
        except grpc.RpcError as error:
            if "Servable" in (error.details() or ""):
                served.ready = True
                return
    pytest.fail(f"conveyor serve not ready within {WAIT_FOR_SERVER_READY_SECONDS}s:\n{served.process.log_tail()}")


class Servers:
    """One server per flag set, started in the order the test classes use them, a few ahead, so that
    TensorFlow's start-up of the next server overlaps the current tests; each is stopped after its class."""

    def __init__(self, plans: dict[str, Callable[[str], list[str]]]):
        self.plans = plans
        self.order = list(plans)
        self.started: dict[str, Served] = {}
        self.released: set[str] = set()
        self.socket_dir = Path(tempfile.mkdtemp(prefix="tfs-", dir="/tmp"))  # short: a socket path has 107 bytes

    def _start(self, key: str) -> None:
        if key not in self.started:
            socket_path = str(self.socket_dir / f"{key}.sock")
            self.started[key] = Served(ServerProcess(*self.plans[key](socket_path)), socket_path)

    def acquire(self, key: str) -> Served:
        self._start(key)
        upcoming = [k for k in self.order[self.order.index(key) + 1:] if k not in self.released]
        for ahead in upcoming[:SERVERS_AHEAD]:
            self._start(ahead)
        served = self.started[key]
        wait_for_server_ready(served)
        return served

    def release(self, key: str) -> None:
        """Asks the server to stop (SIGTERM) without waiting: close() collects it."""
        self.released.add(key)
        served = self.started.get(key)
        if served and served.process.process.poll() is None:
            served.process.process.terminate()

    def close(self) -> None:
        for served in self.started.values():
            served.process.__exit__(None, None, None)
        self.started.clear()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def call_rest(url: str, request: dict | None = None) -> bytes:
    """Upstream's CallREST: GET without a body, else POST of the JSON (urllib's default form content type)."""
    data = json.dumps(request).encode("utf-8") if request is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        pytest.fail(f"{url} answered {error.code}: {error.read().decode(errors='replace')}")


def sorted_object(value):
    """Upstream's SortedObject: dicts and lists compared regardless of order."""
    if isinstance(value, dict):
        return sorted((key, sorted_object(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return sorted(sorted_object(item) for item in value)
    return value


def model_version(path: Path) -> int:
    """Upstream's _GetModelVersion: the version directory's name as a number (00000123 -> 123)."""
    return int(os.listdir(path)[0])


def verify_model_spec(actual, name: str, signature_name: str, version: int) -> None:
    assert actual.name == name
    assert actual.signature_name == signature_name
    assert actual.version.value == version


def verify_predict_request(address: str, expected_output: float, expected_version: int, model_name: str = "default",
                           specify_output: bool = True, batch_input: bool = False,
                           signature_name: str = "serving_default", rpc_timeout: float = 5.0) -> None:
    """Upstream's VerifyPredictRequest: x = [2.0] (or [[2.0]]) as float_val, one float_val back."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    x = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[2.0])
    x.tensor_shape.dim.add(size=1)
    if batch_input:
        x.tensor_shape.dim.add(size=1)
    request.inputs["x"].CopyFrom(x)
    if specify_output:
        request.output_filter.append("y")
    with grpc.insecure_channel(address) as channel:
        result = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, rpc_timeout)
    assert "y" in result.outputs
    assert result.outputs["y"].dtype == types_pb2.DT_FLOAT
    assert len(result.outputs["y"].float_val) == 1
    assert result.outputs["y"].float_val[0] == expected_output
    verify_model_spec(result.model_spec, model_name, signature_name, expected_version)


def predict_twice(address: str, expected_output: float, expected_version: int, model_name: str = "default") -> None:
    """Upstream's _TestPredict: with output_filter ['y'], then without."""
    verify_predict_request(address, expected_output, expected_version, model_name)
    verify_predict_request(address, expected_output, expected_version, model_name, specify_output=False)


def example_x(value: float = 2.0):
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    example.features.feature["x"].float_list.value.append(value)
    return example


# -- servers --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def config_dir(tmp_path_factory, tf_serving_models) -> Path:
    """Upstream's config files; the good config with its ${...} placeholders filled as upstream's setUp does."""
    directory = tmp_path_factory.mktemp("tf-serving-configs")
    (directory / "good_model_config.conf").write_text(
        GOOD_MODEL_CONFIG.replace("${TEST_HALF_PLUS_TWO_DIR}", str(tf_serving_models[models.HALF_PLUS_TWO]))
        .replace("${TEST_HALF_PLUS_THREE_DIR}", str(tf_serving_models[models.HALF_PLUS_THREE])))
    (directory / "bad_model_config.txt").write_text(BAD_MODEL_CONFIG)
    (directory / "batching_config.txt").write_text(BATCHING_CONFIG)
    (directory / "monitoring_config.txt").write_text(MONITORING_CONFIG)
    for name in ("reload", "reload_zero"):
        (directory / name).mkdir()
        (directory / name / "model_config.txt").write_text(
            RELOAD_CONFIG.format(name="half_plus_two", model_path=tf_serving_models[models.HALF_PLUS_TWO]))
    return directory


@pytest.fixture(scope="module")
def servers(tf_serving_models, config_dir):
    paths, configs = tf_serving_models, config_dir
    plans = {
        "half_plus_two": lambda sock: harness_flags(sock, "default", paths[models.HALF_PLUS_TWO]),
        "half_plus_two_tf2": lambda sock: harness_flags(sock, "default", paths[models.HALF_PLUS_TWO_TF2]),
        "good_model_config": lambda sock: harness_flags(sock, model_config_file=configs / "good_model_config.conf"),
        "model_config_reload": lambda sock: harness_flags(
            sock, model_config_file=configs / "reload" / "model_config.txt", model_config_file_poll_period=1),
        "model_config_reload_zero": lambda sock: harness_flags(
            sock, model_config_file=configs / "reload_zero" / "model_config.txt", model_config_file_poll_period=0),
        "good_grpc_channel_args": lambda sock: harness_flags(
            sock, "default", paths[models.HALF_PLUS_TWO],
            grpc_channel_arguments="grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb"),
        "prometheus": lambda sock: harness_flags(sock, "default", paths[models.HALF_PLUS_TWO],
                                                 monitoring_config_file=configs / "monitoring_config.txt"),
        "tflite": lambda sock: harness_flags(sock, "default", paths[models.HALF_PLUS_TWO_TFLITE], model_type="tflite"),
        "tflite_with_sigdef": lambda sock: harness_flags(sock, "default", paths[models.HALF_PLUS_TWO_TFLITE_WITH_SIGDEF],
                                                         model_type="tflite"),
        "tf_saved_model_save": lambda sock: harness_flags(sock, "default", paths[models.TF_SAVED_MODEL_SAVE]),
        "tf_saved_model_save_multiple_signatures": lambda sock: harness_flags(
            sock, "default", paths[models.TF_SAVED_MODEL_SAVE_MULTIPLE_SIGNATURES]),
        "keras_sequential": lambda sock: harness_flags(sock, "default", paths[models.KERAS_SEQUENTIAL]),
        "keras_mirrored": lambda sock: harness_flags(sock, "default", paths[models.KERAS_MIRRORED]),
        "batching": lambda sock: harness_flags(sock, "default", paths[models.HALF_PLUS_TWO],
                                               batching_parameters_file=configs / "batching_config.txt"),
    }
    launcher = Servers(plans)
    yield launcher
    launcher.close()


def _served(key: str):
    @pytest.fixture(scope="class")
    def fixture(servers):
        yield servers.acquire(key)
        servers.release(key)

    return fixture


half_plus_two = _served("half_plus_two")
half_plus_two_tf2 = _served("half_plus_two_tf2")
good_model_config = _served("good_model_config")
model_config_reload = _served("model_config_reload")
model_config_reload_zero = _served("model_config_reload_zero")
good_grpc_channel_args = _served("good_grpc_channel_args")
prometheus = _served("prometheus")
tflite = _served("tflite")
tflite_with_sigdef = _served("tflite_with_sigdef")
tf_saved_model_save = _served("tf_saved_model_save")
tf_saved_model_save_multiple_signatures = _served("tf_saved_model_save_multiple_signatures")
keras_sequential = _served("keras_sequential")
keras_mirrored = _served("keras_mirrored")
batching = _served("batching")


# -- shared checks (upstream's _TestClassify, _TestRegress, _TestMultiInference) ------------------------------
def check_classify(address: str, version: int) -> None:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "default"
    request.model_spec.signature_name = "classify_x_to_y"
    request.input.example_list.examples.add().CopyFrom(example_x())
    with grpc.insecure_channel(address) as channel:
        result = prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(request, RPC_TIMEOUT)
    assert len(result.result.classifications) == 1
    assert len(result.result.classifications[0].classes) == 1
    assert result.result.classifications[0].classes[0].score == 3.0
    verify_model_spec(result.model_spec, "default", "classify_x_to_y", version)


def check_regress(address: str, version: int) -> None:
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "default"
    request.model_spec.signature_name = "regress_x_to_y"
    request.input.example_list.examples.add().CopyFrom(example_x())
    with grpc.insecure_channel(address) as channel:
        result = prediction_service_pb2_grpc.PredictionServiceStub(channel).Regress(request, RPC_TIMEOUT)
    assert len(result.result.regressions) == 1
    assert result.result.regressions[0].value == 3.0
    verify_model_spec(result.model_spec, "default", "regress_x_to_y", version)


def check_multi_inference(address: str, version: int) -> None:
    request = inference_pb2.MultiInferenceRequest()
    for signature, method in (("regress_x_to_y", "tensorflow/serving/regress"),
                              ("classify_x_to_y", "tensorflow/serving/classify")):
        task = request.tasks.add(method_name=method)
        task.model_spec.name = "default"
        task.model_spec.signature_name = signature
    request.input.example_list.examples.add().CopyFrom(example_x())
    with grpc.insecure_channel(address) as channel:
        result = prediction_service_pb2_grpc.PredictionServiceStub(channel).MultiInference(request, RPC_TIMEOUT)
    assert len(result.results) == 2
    assert result.results[0].regression_result.regressions[0].value == 3.0
    assert result.results[1].classification_result.classifications[0].classes[0].score == 3.0
    for task, inference in zip(request.tasks, result.results):
        verify_model_spec(inference.model_spec, task.model_spec.name, task.model_spec.signature_name, version)


# -- the ported tests ------------------------------------------------------------------------------------------
class TestHalfPlusTwo:
    """Tests that share upstream's server for ('default', saved_model_half_plus_two_cpu)."""

    def test_get_model_status(self, half_plus_two, tf_serving_models):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "default"
        with grpc.insecure_channel(half_plus_two.grpc) as channel:
            result = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, RPC_TIMEOUT)
        assert len(result.model_version_status) == 1
        assert result.model_version_status[0].version == model_version(tf_serving_models[models.HALF_PLUS_TWO])
        assert result.model_version_status[0].status.error_code == 0

    def test_get_model_metadata(self, half_plus_two):
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = "default"
        with grpc.insecure_channel(half_plus_two.grpc) as channel:
            result = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, RPC_TIMEOUT)
        assert result.model_spec.name == "default"
        assert result.model_spec.version.value == 123
        assert len(result.metadata) == 1
        assert "signature_def" in result.metadata

    def test_classify(self, half_plus_two):
        check_classify(half_plus_two.grpc, 123)

    def test_regress(self, half_plus_two):
        check_regress(half_plus_two.grpc, 123)

    def test_multi_inference(self, half_plus_two):
        check_multi_inference(half_plus_two.grpc, 123)

    def test_predict_saved_model(self, half_plus_two, tf_serving_models):
        predict_twice(half_plus_two.grpc, 3.0, model_version(tf_serving_models[models.HALF_PLUS_TWO]))

    def test_classify_rest(self, half_plus_two):
        body = call_rest(f"http://{half_plus_two.rest}/v1/models/default:classify",
                         {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]})
        assert json.loads(body) == {"results": [[["", 3.0]]]}

    def test_regress_rest(self, half_plus_two):
        body = call_rest(f"http://{half_plus_two.rest}/v1/models/default:regress",
                         {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]})
        assert json.loads(body) == {"results": [3.0]}

    def test_predict_rest(self, half_plus_two):
        body = call_rest(f"http://{half_plus_two.rest}/v1/models/default:predict", {"instances": [2.0, 3.0, 4.0]})
        assert json.loads(body) == {"predictions": [3.0, 3.5, 4.0]}

    def test_predict_columnar_rest(self, half_plus_two):
        body = call_rest(f"http://{half_plus_two.rest}/v1/models/default:predict", {"inputs": [2.0, 3.0, 4.0]})
        assert json.loads(body) == {"outputs": [3.0, 3.5, 4.0]}

    def test_get_status_rest(self, half_plus_two):
        body = call_rest(f"http://{half_plus_two.rest}/v1/models/default")
        assert json.loads(body) == {"model_version_status": [
            {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}

    def test_get_model_metadata_rest(self, half_plus_two):
        body = call_rest(f"http://{half_plus_two.rest}/v1/models/default/metadata")
        expected = json.loads(EXPECTED_METADATA.read_text())
        assert sorted_object(json.loads(body)) == sorted_object(expected)

    def test_predict_uds(self, half_plus_two, tf_serving_models):
        # Upstream's servers all share /tmp/tf-serving.sock (whichever started last answers); each server
        # here has its own socket, so this one is known to be half_plus_two's.
        verify_predict_request(f"unix:{half_plus_two.socket_path}", 3.0,
                               model_version(tf_serving_models[models.HALF_PLUS_THREE]), specify_output=False)


class TestHalfPlusTwoTf2:
    """The TF2 model: every signature carries the predict method name, so these work because
    --enable_signature_method_name_check is off by default, as in TF Serving."""

    def test_classify_tf2(self, half_plus_two_tf2):
        check_classify(half_plus_two_tf2.grpc, 123)

    def test_regress_tf2(self, half_plus_two_tf2):
        check_regress(half_plus_two_tf2.grpc, 123)

    def test_multi_inference_tf2(self, half_plus_two_tf2):
        check_multi_inference(half_plus_two_tf2.grpc, 123)


class TestGoodModelConfig:
    def test_good_model_config(self, good_model_config, tf_serving_models):
        two = model_version(tf_serving_models[models.HALF_PLUS_TWO])
        three = model_version(tf_serving_models[models.HALF_PLUS_THREE])
        predict_twice(good_model_config.grpc, 3.0, two, model_name="half_plus_two")
        predict_twice(good_model_config.grpc, 4.0, three, model_name="half_plus_three")


def test_bad_model_config(config_dir):
    """The server reports the unparsable file as TF Serving does, in one line on stderr, and exits."""
    with tempfile.TemporaryDirectory(prefix="tfs-", dir="/tmp") as sockets:
        result = run_conveyor("serve", f"--port={free_port()}", f"--rest_api_port={free_port()}", *harness_flags(
            f"{sockets}/bad.sock", model_config_file=config_dir / "bad_model_config.txt"), timeout=120)
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in result.stderr
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


class TestModelConfigReload:
    def test_model_config_reload(self, model_config_reload, config_dir, tf_serving_models):
        verify_predict_request(model_config_reload.grpc, 3.0, 123, model_name="half_plus_two", specify_output=False)
        (config_dir / "reload" / "model_config.txt").write_text(
            RELOAD_CONFIG.format(name="half_plus_three", model_path=tf_serving_models[models.HALF_PLUS_THREE]))
        # Upstream sleeps 10 s, then predicts; here the same 10 s are the limit, polled.
        deadline = time.monotonic() + 10
        while True:
            try:
                verify_predict_request(model_config_reload.grpc, 4.0, 123, model_name="half_plus_three",
                                       specify_output=False)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


class TestModelConfigReloadWithZeroPollPeriod:
    def test_model_config_reload_with_zero_poll_period(self, model_config_reload_zero, config_dir, tf_serving_models):
        verify_predict_request(model_config_reload_zero.grpc, 3.0, 123, model_name="half_plus_two",
                               specify_output=False)
        (config_dir / "reload_zero" / "model_config.txt").write_text(
            RELOAD_CONFIG.format(name="half_plus_three", model_path=tf_serving_models[models.HALF_PLUS_THREE]))
        time.sleep(0 + 1)
        verify_predict_request(model_config_reload_zero.grpc, 3.0, 123, model_name="half_plus_two",
                               specify_output=False)
        # And the new config was not read (upstream does not check this).
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "half_plus_three"
        with grpc.insecure_channel(model_config_reload_zero.grpc) as channel, pytest.raises(grpc.RpcError) as error:
            model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, RPC_TIMEOUT)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


class TestGoodGrpcChannelArgs:
    def test_good_grpc_channel_args(self, good_grpc_channel_args, tf_serving_models):
        verify_predict_request(good_grpc_channel_args.grpc, 3.0, model_version(tf_serving_models[models.HALF_PLUS_TWO]),
                               specify_output=False)


class TestPrometheusEndpoint:
    def test_prometheus_endpoint(self, prometheus):
        body = call_rest(f"http://{prometheus.rest}/monitoring/prometheus/metrics")
        assert "# TYPE" in body.decode("utf-8")


class TestPredictOnTfLite:
    def test_predict_on_tflite(self, tflite, tf_serving_models):
        verify_predict_request(tflite.grpc, 3.0, model_version(tf_serving_models[models.HALF_PLUS_TWO_TFLITE]),
                               specify_output=False)


class TestPredictWithSignatureDefOnTfLite:
    def test_predict_with_signature_def_on_tflite(self, tflite_with_sigdef, tf_serving_models):
        version = model_version(tf_serving_models[models.HALF_PLUS_TWO_TFLITE_WITH_SIGDEF])
        verify_predict_request(tflite_with_sigdef.grpc, 3.0, version, specify_output=False)


class TestTfSavedModelSave:
    def test_tf_saved_model_save(self, tf_saved_model_save):
        verify_predict_request(tf_saved_model_save.grpc, 12.0, 123, specify_output=False)


class TestTfSavedModelSaveMultipleSignatures:
    def test_tf_saved_model_save_multiple_signatures(self, tf_saved_model_save_multiple_signatures):
        address = tf_saved_model_save_multiple_signatures.grpc
        verify_predict_request(address, 2.0, 123, signature_name="custom_signature_key")
        verify_predict_request(address, 1.0, 123)


class TestSequentialKerasSavedModelSave:
    def test_sequential_keras_saved_model_save(self, keras_sequential):
        verify_predict_request(keras_sequential.grpc, 2.0, 123, specify_output=False, batch_input=True)


class TestDistratSequentialKerasSavedModelSave:
    def test_distrat_sequential_keras_saved_model_save(self, keras_mirrored):
        verify_predict_request(keras_mirrored.grpc, 2.0, 123, specify_output=False, batch_input=True)


class TestPredictBatching:
    def test_predict_batching(self, batching, tf_serving_models):
        predict_twice(batching.grpc, 3.0, model_version(tf_serving_models[models.HALF_PLUS_TWO]))
