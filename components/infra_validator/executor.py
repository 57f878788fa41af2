"""InfraValidator executor: a real `conveyor serve` process, real REST and gRPC requests, then bless or not."""
from __future__ import annotations

import base64
import json
import logging
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc
from tfx.dsl.components.base import base_executor
from tfx.types import artifact_utils
from tfx.utils import io_utils, path_utils

from conveyor_ml.base.server_process import ServerProcess, ServerStartError
from conveyor_ml.base.spec import InfraValidatorSettings
from conveyor_ml.components.artifacts import set_custom_properties
from conveyor_ml.components.parameters import list_parameter, settings_from
from conveyor_ml.components.split_reader import sample, split_files

CANDIDATE = "candidate"
BLESSED_FILE, NOT_BLESSED_FILE = "INFRA_BLESSED", "INFRA_NOT_BLESSED"
IMAGE_INPUT, IMAGE_OUTPUTS = "images", ("class_ids", "probabilities")  # what this project's trainer exports
BYTES_SIGNATURE = "bytes_predictor"
PREDICT, LOAD_ONLY = "predict", "load_only"

log = logging.getLogger(__name__)


class InfraCheckFailed(Exception):
    pass


class Executor(base_executor.BaseExecutor):
    def Do(self, input_dict: dict[str, list], output_dict: dict[str, list], exec_properties: dict[str, Any]) -> None:
        model = artifact_utils.get_single_instance(input_dict["model"])
        examples = artifact_utils.get_single_instance(input_dict["examples"])
        blessing = artifact_utils.get_single_instance(output_dict["blessing"])
        settings = settings_from(InfraValidatorSettings, exec_properties)
        num_examples, timeout = settings.num_examples, settings.timeout_seconds
        image_shape = tuple(list_parameter(exec_properties, "image_shape"))

        # A sample: the first num_examples eval images, read from the start of the split only.
        images = sample(split_files(examples, "eval"), image_shape, num_examples)[0]
        result = validate(path_utils.serving_model_path(model.uri), images, timeout)
        blessed = result["error"] is None
        io_utils.write_string_file(str(Path(blessing.uri) / (BLESSED_FILE if blessed else NOT_BLESSED_FILE)), "")
        set_custom_properties(blessing, {"blessed": int(blessed), "reason": result["error"] or "",
                                         "requests": result["requests"], "mode": result["mode"],
                                         "rest_latency_ms": result.get("rest_latency_ms"),
                                         "grpc_latency_ms": result.get("grpc_latency_ms")})
        log.info("infra validation: %s (%d requests)", "blessed" if blessed else "NOT blessed: " + result["error"],
                 result["requests"])


def validate(export_dir: str, images: np.ndarray, timeout: float) -> dict:
    """Serves `export_dir` as version 1 of a throwaway model. Any model the server loads (what TF Serving
    would serve) must report AVAILABLE and answer its metadata over REST and gRPC; an image classifier like
    the one this project trains (serving_default: `images` in, class ids and probabilities out) must also
    answer predictions that make sense, over REST and gRPC and, if it has one, through bytes_predictor.
    Anything else is validated as TFX's InfraValidator validates without requests (load only)."""
    result: dict = {"error": None, "requests": 0, "mode": LOAD_ONLY}
    with tempfile.TemporaryDirectory(prefix="conveyor-infra-") as workdir:
        base = Path(workdir) / CANDIDATE
        base.mkdir()
        (base / "1").symlink_to(Path(export_dir).resolve(), target_is_directory=True)
        with ServerProcess("--model_name", CANDIDATE, "--model_base_path", str(base)) as server:
            try:
                server.wait_available(CANDIDATE, timeout=timeout)
                signatures = _signatures(server)
                default = signatures.get("serving_default", {})
                if IMAGE_INPUT in default.get("inputs", {}) and set(IMAGE_OUTPUTS) <= set(default.get("outputs", {})):
                    result["mode"] = PREDICT
                    _check_requests(server, images, result, bytes_input=BYTES_SIGNATURE in signatures)
            except (ServerStartError, InfraCheckFailed) as exc:
                result["error"] = str(exc).strip().splitlines()[0]
            except (urllib.error.URLError, grpc.RpcError, OSError, ValueError, KeyError) as exc:
                result["error"] = f"request failed: {exc}"
    return result


def _signatures(server: ServerProcess) -> dict:
    """The version's SignatureDefs as the REST metadata API prints them; the gRPC API must list the same."""
    try:
        with urllib.request.urlopen(f"{server.rest_url}/v1/models/{CANDIDATE}/metadata", timeout=30) as response:
            signatures = json.loads(response.read())["metadata"]["signature_def"]["signature_def"]
    except urllib.error.HTTPError as exc:
        raise InfraCheckFailed(f"REST metadata {exc.code}: {exc.read().decode(errors='replace')[:300]}") from None
    with grpc.insecure_channel(server.grpc_target) as channel:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = CANDIDATE
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=30)
    listed = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(listed)
    if set(listed.signature_def) != set(signatures):
        raise InfraCheckFailed("REST and gRPC list different signatures")
    return signatures


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise InfraCheckFailed(f"REST {exc.code}: {exc.read().decode(errors='replace')[:300]}") from None


def _check_predictions(classes: np.ndarray, probabilities: np.ndarray, count: int, what: str) -> None:
    if classes.shape != (count,) or probabilities.shape[0] != count:
        raise InfraCheckFailed(f"{what}: expected {count} predictions, got shapes {classes.shape}, "
                               f"{probabilities.shape}")
    if not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3):
        raise InfraCheckFailed(f"{what}: probabilities do not sum to 1")
    if (classes < 0).any() or (classes >= probabilities.shape[1]).any():
        raise InfraCheckFailed(f"{what}: class ids out of range")


def _check_requests(server: ServerProcess, images: np.ndarray, result: dict, bytes_input: bool) -> None:
    count = len(images)
    started = time.perf_counter()
    rest = _post(f"{server.rest_url}/v1/models/{CANDIDATE}:predict", {"instances": images.tolist()})
    result["rest_latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    rest_classes = np.array([p["class_ids"] for p in rest["predictions"]])
    _check_predictions(rest_classes, np.array([p["probabilities"] for p in rest["predictions"]]), count, "REST")

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = CANDIDATE
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images.astype(np.float32)))
        started = time.perf_counter()
        response = stub.Predict(request, timeout=30)
        result["grpc_latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    grpc_classes = tf.make_ndarray(response.outputs["class_ids"])
    _check_predictions(grpc_classes, tf.make_ndarray(response.outputs["probabilities"]), count, "gRPC")
    if not np.array_equal(rest_classes, grpc_classes):
        raise InfraCheckFailed("REST and gRPC disagree on the predicted classes")

    result["requests"] = 2
    if not bytes_input:
        return
    png = tf.io.encode_png(np.clip(np.round(images[0]), 0, 255).astype(np.uint8)[..., None]).numpy()
    encoded = _post(f"{server.rest_url}/v1/models/{CANDIDATE}:predict",
                    {"signature_name": BYTES_SIGNATURE, "instances": [{"b64": base64.b64encode(png).decode()}]})
    if len(encoded["predictions"]) != 1:
        raise InfraCheckFailed(f"{BYTES_SIGNATURE}: expected one prediction")
    result["requests"] = 3
