"""TF Serving's gRPC services (PredictionService, ModelService) on the official tensorflow-serving-api protos,
plus the standard gRPC health service (--enable_grpc_healthcheck_service).

Served by grpc.aio on the REST server's event loop: a request waiting for its batch costs a coroutine, not
a blocked thread (a thread per request capped gRPC at ~40 % of REST's throughput under load). Listens on a
TCP port (--port, 0: none) and/or a Unix domain socket (--grpc_socket_path), with the options of
--grpc_channel_arguments.
"""
from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import any_pb2
from tensorflow.core.framework import tensor_pb2, types_pb2
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
    status_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from conveyor_ml.serving.errors import ModelRunError, ServingError, invalid_argument
from conveyor_ml.serving.model_server import ModelServer
from conveyor_ml.serving.routing import route_key
from conveyor_ml.serving.servable import (
    CLASSIFY_METHOD,
    DEFAULT_SIGNATURE,
    REGRESS_METHOD,
    Classification,
    serialized_examples,
)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Service names the health service answers SERVING for, as TF Serving registers them ("" is the server).
HEALTH_SERVICES = ("", "ModelService", "PredictionService",
                   "tensorflow.serving.ModelService", "tensorflow.serving.PredictionService")

# TensorFlow's AsProtoField: which typed field holds the values of each dtype (TF Serving's default answer;
# --enable_serialization_as_tensor_content packs numbers into tensor_content instead).
_TYPED_FIELD = {
    types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val", types_pb2.DT_INT16: "int_val", types_pb2.DT_INT8: "int_val",
    types_pb2.DT_UINT8: "int_val", types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val", types_pb2.DT_UINT32: "uint32_val", types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val", types_pb2.DT_STRING: "string_val",
    types_pb2.DT_HALF: "half_val", types_pb2.DT_BFLOAT16: "half_val",
    types_pb2.DT_COMPLEX64: "scomplex_val", types_pb2.DT_COMPLEX128: "dcomplex_val",
}


def tensor_proto(value: np.ndarray, as_tensor_content: bool = False) -> tensor_pb2.TensorProto:
    """A TensorProto as TF Serving answers it: values in the dtype's typed field (float_val...), or raw
    bytes in tensor_content when asked (strings always go to string_val)."""
    array = np.asarray(value)
    dtype = tf.string if array.dtype == object or array.dtype.kind in "SU" else tf.dtypes.as_dtype(array.dtype)
    proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if dtype == tf.string:
        proto.string_val.extend(item if isinstance(item, bytes) else str(item).encode() for item in array.reshape(-1))
        return proto
    if as_tensor_content:
        proto.tensor_content = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        return proto
    flat = array.reshape(-1)
    if dtype in (tf.float16, tf.bfloat16):
        flat = flat.view(np.uint16)
    elif dtype.is_complex:
        flat = np.stack([flat.real, flat.imag], axis=-1).reshape(-1)
    getattr(proto, _TYPED_FIELD[dtype.as_datatype_enum]).extend(flat.tolist())
    return proto


def _timeout_ms(context) -> int | None:
    """The client's deadline as a model-run timeout, as TF Serving derives RunOptions.timeout_in_ms."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    if remaining <= 0:
        raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded before the model ran")
    return max(1, int(remaining * 1000))


def _fill_spec(target, servable, signature_name: str) -> None:
    target.name = servable.model_name
    target.version.value = servable.version
    target.signature_name = signature_name


def _classification_into(result, classification: Classification) -> None:
    classes, scores = classification.classes, classification.scores
    reference = classes if classes is not None else scores
    for row in range(reference.shape[0]):
        classifications = result.classifications.add()
        for column in range(reference.shape[1]):
            entry = classifications.classes.add()
            if classes is not None:
                label = classes[row][column]
                entry.label = label.decode("utf-8", "replace") if isinstance(label, bytes) else str(label)
            if scores is not None:
                entry.score = float(scores[row][column])


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server: ModelServer):
        self.server = server

    async def _handle(self, model_spec, api: str, context, work: Callable[..., Awaitable]):
        """Resolves the servable, runs `work(servable)`, turns a ServingError into the matching gRPC status."""
        started = time.perf_counter()
        version = None
        try:
            if not model_spec.name:
                raise invalid_argument("ModelSpec has no name specified.")
            servable = self.server.resolve(model_spec.name,
                                           model_spec.version.value if model_spec.HasField("version") else None,
                                           model_spec.version_label or None,
                                           route_key(self.server.traffic, model_spec.name,  # sticky split
                                                     {k.lower(): v for k, v in context.invocation_metadata() or ()})
                                           if self.server.traffic.route_keys else None)
            version = servable.version
            response = await work(servable)
        except ServingError as exc:
            self.server.observe(model_spec.name, version, api, "grpc", exc, time.perf_counter() - started)
            await context.abort(exc.code, exc.message)
        self.server.observe(model_spec.name, version, api, "grpc", None, time.perf_counter() - started)
        return response

    def _off_loop(self, function, *args) -> Awaitable:
        """Model work that does not go through the batcher runs on the gRPC pool, not the event loop."""
        return asyncio.wrap_future(self.server.run("grpc", function, *args))

    async def Predict(self, request, context):
        async def work(servable):
            signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
            if signature not in servable.signature_defs:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f'Serving signature key "{signature}" not found.')
            inputs = {}
            for alias, proto in request.inputs.items():
                try:
                    inputs[alias] = tf.make_ndarray(proto)
                except (TypeError, ValueError):
                    raise invalid_argument(f"tensor parsing error: {alias}") from None
            self.server.quality.check_inputs(servable.model_name, inputs)
            started = time.perf_counter()
            try:
                outputs = await asyncio.wrap_future(self.server.predict_future(
                    servable, signature, inputs, tuple(request.output_filter), "grpc", _timeout_ms(context)))
            except ModelRunError as exc:
                raise exc.for_request(inputs) from None
            if not request.output_filter:  # a filtered answer cannot be compared with the shadow's
                self.server.shadow.offer(servable, signature, inputs, outputs, time.perf_counter() - started)
            prediction_id = self.server.quality.record_predictions(servable.model_name, servable.version, outputs)
            if prediction_id:
                context.set_trailing_metadata((("x-prediction-id", prediction_id),))
            response = predict_pb2.PredictResponse()
            _fill_spec(response.model_spec, servable, signature)
            as_content = self.server.options.enable_serialization_as_tensor_content
            for key, value in outputs.items():
                response.outputs[key].CopyFrom(tensor_proto(value, as_content))
            return response

        return await self._handle(request.model_spec, "predict", context, work)

    async def Classify(self, request, context):
        async def work(servable):
            examples = serialized_examples(request.input)
            result = await self._off_loop(servable.classify, request.model_spec.signature_name, examples,
                                          _timeout_ms(context))
            response = classification_pb2.ClassificationResponse()
            _fill_spec(response.model_spec, servable, request.model_spec.signature_name or DEFAULT_SIGNATURE)
            _classification_into(response.result, result)
            return response

        return await self._handle(request.model_spec, "classify", context, work)

    async def Regress(self, request, context):
        async def work(servable):
            examples = serialized_examples(request.input)
            values = await self._off_loop(servable.regress, request.model_spec.signature_name, examples,
                                          _timeout_ms(context))
            response = regression_pb2.RegressionResponse()
            _fill_spec(response.model_spec, servable, request.model_spec.signature_name or DEFAULT_SIGNATURE)
            for value in values:
                response.result.regressions.add().value = float(value)
            return response

        return await self._handle(request.model_spec, "regress", context, work)

    async def MultiInference(self, request, context):
        if not request.tasks:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Tasks field is empty")
        names = {task.model_spec.name for task in request.tasks}
        if "" in names:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Found ModelSpec with an empty model name.")
        if len(names) > 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "All ModelSpecs in a MultiInferenceRequest must access the same model name.")

        async def work(servable):
            tasks = [(task.model_spec.signature_name, task.method_name) for task in request.tasks]
            examples = serialized_examples(request.input)
            results = await self._off_loop(servable.multi_inference, tasks, examples, _timeout_ms(context))
            response = inference_pb2.MultiInferenceResponse()
            for task, result in zip(request.tasks, results):
                entry = response.results.add()
                _fill_spec(entry.model_spec, servable, task.model_spec.signature_name or DEFAULT_SIGNATURE)
                if task.method_name == CLASSIFY_METHOD:
                    _classification_into(entry.classification_result, result)
                elif task.method_name == REGRESS_METHOD:
                    for value in result:
                        entry.regression_result.regressions.add().value = float(value)
            return response

        # TF Serving serves the whole request from the first task's model version.
        return await self._handle(request.tasks[0].model_spec, "multi_inference", context, work)

    async def GetModelMetadata(self, request, context):
        async def work(servable):
            if not request.metadata_field:
                raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
            for field in request.metadata_field:
                if field != "signature_def":
                    raise invalid_argument(f"Metadata field {field} is not supported")
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            _fill_spec(response.model_spec, servable, "")
            packed = any_pb2.Any()
            packed.Pack(signature_def_map(servable))
            response.metadata["signature_def"].CopyFrom(packed)
            return response

        if not request.HasField("model_spec"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        return await self._handle(request.model_spec, "metadata", context, work)


def signature_def_map(servable) -> get_model_metadata_pb2.SignatureDefMap:
    """Every SignatureDef of the version (TF2's __saved_model_init_op included, as TF Serving lists it)."""
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature)
    return signature_map


def model_status_response(server: ModelServer, name: str, version: int | None,
                          label: str | None) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatus for REST and gRPC alike: every version known, or the one asked for."""
    model = server.model(name)
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in model.statuses(version, label):
        entry = response.model_version_status.add()
        entry.version = status.version
        entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(status.state)
        entry.status.CopyFrom(status_pb2.StatusProto(error_code=0 if not status.error else 2,
                                                     error_message=status.error))
    if not response.model_version_status:
        raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
    return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server: ModelServer):
        self.server = server

    async def GetModelStatus(self, request, context):
        spec = request.model_spec
        try:
            return model_status_response(self.server, spec.name,
                                         spec.version.value if spec.HasField("version") else None,
                                         spec.version_label or None)
        except ServingError as exc:
            await context.abort(exc.code, exc.message)

    async def HandleReloadConfigRequest(self, request, context):
        if request.config.WhichOneof("config") != "model_config_list":
            message = ("ServerModelConfig type not supported by HandleReloadConfigRequest. Only ModelConfigList "
                       "is currently supported")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        await self._off_loop_apply(request.config)
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto(error_code=0))

    async def _off_loop_apply(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        await asyncio.wrap_future(self.server.run("grpc", self.server.apply_config, config))


def _health_protos():
    protos_dir = str(Path(__file__).parent / "protos")
    sys.path.insert(0, protos_dir)
    try:
        return grpc.protos_and_services("health.proto")
    finally:
        sys.path.remove(protos_dir)


class HealthService:
    """grpc.health.v1.Health: SERVING while the server runs (TF Serving's meaning, for liveness probes),
    NOT_SERVING once it is shutting down; an unknown service name is NOT_FOUND."""

    def __init__(self):
        self.protos, self.services = _health_protos()
        self.stopping = False

    def _status(self):
        statuses = self.protos.HealthCheckResponse.ServingStatus
        return statuses.Value("NOT_SERVING" if self.stopping else "SERVING")

    async def Check(self, request, context):
        if request.service not in HEALTH_SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return self.protos.HealthCheckResponse(status=self._status())

    async def Watch(self, request, context):
        if request.service not in HEALTH_SERVICES:
            unknown = self.protos.HealthCheckResponse.ServingStatus.Value("SERVICE_UNKNOWN")
            yield self.protos.HealthCheckResponse(status=unknown)
            return
        last = None
        while True:
            status = self._status()
            if status != last:
                yield self.protos.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(1.0)

    def add_to(self, grpc_server: grpc.aio.Server) -> None:
        self.services.add_HealthServicer_to_server(self, grpc_server)


def build_grpc_server(server: ModelServer) -> tuple[grpc.aio.Server, HealthService | None]:
    """Must be called on the running event loop that will serve it; raises OSError naming what it could
    not listen on."""
    options = server.options
    channel_options = dict([("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    channel_options.update(dict(options.grpc_channel_arguments))  # later wins, as in TF Serving
    grpc_server = grpc.aio.server(options=list(channel_options.items()))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(server), grpc_server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(server), grpc_server)
    health = None
    if options.enable_grpc_healthcheck_service:
        health = HealthService()
        health.add_to(grpc_server)
    addresses = []
    if options.port:
        addresses.append((f"{options.grpc_host}:{options.port}", "the port is taken or the host is not local"))
    if options.grpc_socket_path:
        addresses.append((f"unix:{options.grpc_socket_path}", "the directory is missing or not writable"))
    for address, likely in addresses:
        try:
            bound = grpc_server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise OSError(f"cannot listen on {address} (gRPC): {likely}")
    return grpc_server, health
