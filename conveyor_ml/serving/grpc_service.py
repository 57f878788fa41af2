"""TF Serving's gRPC services (PredictionService, ModelService) on the official tensorflow-serving-api protos,
plus the standard gRPC health service (--enable_grpc_healthcheck_service).

Served by grpc.aio on the REST server's event loop: a request waiting for its batch costs a coroutine, not
a blocked thread (a thread per request capped gRPC at ~40 % of REST's throughput under load). Listens on a
TCP port (--port, 0: none) and/or a Unix domain socket (--grpc_socket_path), with the options of
--grpc_channel_arguments.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import any_pb2
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

from conveyor_ml.base.ports import check_port_free
from conveyor_ml.serving.errors import ModelRunError, ServingError, bounded_message, invalid_argument
from conveyor_ml.serving.metrics import UNKNOWN_MODEL
from conveyor_ml.serving.model_server import ModelServer
from conveyor_ml.serving.routing import route_key
from conveyor_ml.serving.servable import (
    CLASSIFY_METHOD,
    DEFAULT_SIGNATURE,
    REGRESS_METHOD,
    Classification,
    serialized_examples,
)
from conveyor_ml.serving.tensors import (
    DECODED_BYTES_PER_REQUEST_BYTE,
    DecodeBudget,
    decode_tensor,
    fill_tensor_proto,
)

log = logging.getLogger("conveyor.serving")
HEALTH_SERVICE = "grpc.health.v1.Health"
# Service names the health service answers SERVING for, as TF Serving registers them ("" is the server).
HEALTH_SERVICES = ("", "ModelService", "PredictionService",
                   "tensorflow.serving.ModelService", "tensorflow.serving.PredictionService")

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


def predict_inputs(request: predict_pb2.PredictRequest, max_request_body_bytes: int) -> dict[str, np.ndarray]:
    """A PredictRequest's input arrays, decoded within the byte budget of a request of the largest size."""
    budget = DecodeBudget(DECODED_BYTES_PER_REQUEST_BYTE * max_request_body_bytes)
    return {alias: decode_tensor(alias, proto, budget) for alias, proto in request.inputs.items()}


def predict_response(servable, signature: str, outputs: dict[str, np.ndarray],
                     as_tensor_content: bool) -> predict_pb2.PredictResponse:
    """The PredictResponse for a version's outputs (--enable_serialization_as_tensor_content: as_tensor_content)."""
    response = predict_pb2.PredictResponse()
    _fill_spec(response.model_spec, servable, signature)
    for key, value in outputs.items():
        fill_tensor_proto(response.outputs[key], value, as_tensor_content)
    return response


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server: ModelServer):
        self.server = server

    async def _handle(self, model_spec, api: str, request, context, work: Callable[..., Awaitable]):
        """Admits the call, resolves the servable, runs `work(call, servable)`; every way it can end becomes
        the matching gRPC status and is recorded with it."""
        try:
            call = self.server.begin(model_spec.name, api, "grpc", request.ByteSize())
        except ServingError as exc:
            return _fail(context, exc.code, exc.message)
        # The status to answer with, not the exception: a raised exception's traceback holds this frame, and
        # keeping it here would make a cycle that holds the request and its decoded arrays until the cyclic
        # collector runs (rarely in this server: serving/heap.py).
        failure: tuple[grpc.StatusCode, str] | None = None
        try:
            if not model_spec.name:
                raise invalid_argument("ModelSpec has no name specified.")
            servable = self.server.resolve(model_spec.name,
                                           model_spec.version.value if model_spec.HasField("version") else None,
                                           model_spec.version_label or None,
                                           route_key(self.server.traffic, model_spec.name,  # sticky split
                                                     {k.lower(): v for k, v in context.invocation_metadata() or ()})
                                           if self.server.traffic.route_keys else None)
            call.version = servable.version
            return await work(call, servable)
        except ServingError as exc:
            call.fail(exc)
            failure = exc.code, exc.message
        except asyncio.CancelledError:  # the client went away or its deadline passed
            call.status = grpc.StatusCode.CANCELLED.name
            raise
        except Exception as exc:
            error = self.server.internal_error(call, exc)  # a new error, never raised: no traceback
            failure = error.code, error.message
        finally:
            self.server.finish(call)
        return _fail(context, *failure)

    def _off_loop(self, function, *args) -> Awaitable:
        """Model work that does not go through the batcher runs on the gRPC pool, not the event loop."""
        return asyncio.wrap_future(self.server.run("grpc", function, *args))

    def _decode_inputs(self, servable, request) -> dict[str, np.ndarray]:
        inputs = predict_inputs(request, self.server.options.max_request_body_bytes)
        self.server.quality.check_inputs(servable.model_name, inputs)
        return inputs

    def _predict_response(self, servable, signature: str, outputs: dict[str, np.ndarray]):
        return predict_response(servable, signature, outputs, self.server.options.enable_serialization_as_tensor_content)

    async def Predict(self, request, context):
        async def work(call, servable):
            signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
            if signature not in servable.signature_defs:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f'Serving signature key "{signature}" not found.')
            inputs = await self.server.off_loop(call, self._decode_inputs, servable, request)
            started = time.perf_counter()
            try:
                outputs = await self.server.predict(call, servable, signature, inputs, tuple(request.output_filter),
                                                    _timeout_ms(context))
            except ModelRunError as exc:
                raise exc.for_request(inputs) from None
            if not request.output_filter:  # a filtered answer cannot be compared with the shadow's
                self.server.shadow.offer(servable, signature, inputs, outputs, time.perf_counter() - started)
            prediction_id = self.server.quality.record_predictions(servable.model_name, servable.version, outputs)
            if prediction_id:
                context.set_trailing_metadata((("x-prediction-id", prediction_id),))
            return await self.server.off_loop(call, self._predict_response, servable, signature, outputs)

        return await self._handle(request.model_spec, "predict", request, context, work)

    async def Classify(self, request, context):
        async def work(call, servable):
            examples = serialized_examples(request.input)
            result = await self._off_loop(servable.classify, request.model_spec.signature_name, examples,
                                          _timeout_ms(context))
            response = classification_pb2.ClassificationResponse()
            _fill_spec(response.model_spec, servable, request.model_spec.signature_name or DEFAULT_SIGNATURE)
            _classification_into(response.result, result)
            return response

        return await self._handle(request.model_spec, "classify", request, context, work)

    async def Regress(self, request, context):
        async def work(call, servable):
            examples = serialized_examples(request.input)
            values = await self._off_loop(servable.regress, request.model_spec.signature_name, examples,
                                          _timeout_ms(context))
            response = regression_pb2.RegressionResponse()
            _fill_spec(response.model_spec, servable, request.model_spec.signature_name or DEFAULT_SIGNATURE)
            for value in values:
                response.result.regressions.add().value = float(value)
            return response

        return await self._handle(request.model_spec, "regress", request, context, work)

    async def MultiInference(self, request, context):
        names = {task.model_spec.name for task in request.tasks}
        refusal = None
        if not request.tasks:
            refusal = invalid_argument("Tasks field is empty")
        elif "" in names:
            refusal = invalid_argument("Found ModelSpec with an empty model name.")
        elif len(names) > 1:
            refusal = invalid_argument("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        if refusal is not None:  # answered before any model is resolved, yet recorded like every answer
            self.server.refuse(self.server.model_label(min(names, default="")), "multi_inference", "grpc", refusal)
            return _fail(context, refusal.code, refusal.message)

        async def work(call, servable):
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
        return await self._handle(request.tasks[0].model_spec, "multi_inference", request, context, work)

    async def GetModelMetadata(self, request, context):
        async def work(call, servable):
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
            return _fail(context, grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        return await self._handle(request.model_spec, "metadata", request, context, work)


def signature_def_map(servable) -> get_model_metadata_pb2.SignatureDefMap:
    """Every SignatureDef of the version (TF2's __saved_model_init_op included, as TF Serving lists it)."""
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature)
    return signature_map


def model_status_response(server: ModelServer, name: str, version: int | None,
                          label: str | None) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatus for REST and gRPC alike: every version known, or the one asked for."""
    if not server.registry.has(name):  # get_model_status_impl.cc: what the state monitor has never seen
        if version is not None and not label:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
        raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
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
        """Admitted and recorded as REST's model status calls are (api "status")."""
        spec = request.model_spec
        if not request.HasField("model_spec"):  # get_model_status_impl.cc
            refusal = invalid_argument("Missing ModelSpec")
            self.server.refuse(self.server.model_label(""), "status", "grpc", refusal)
            return _fail(context, refusal.code, refusal.message)
        try:
            call = self.server.begin(spec.name, "status", "grpc")
        except ServingError as exc:
            return _fail(context, exc.code, exc.message)
        try:
            return model_status_response(self.server, spec.name,
                                         spec.version.value if spec.HasField("version") else None,
                                         spec.version_label or None)
        except ServingError as exc:
            call.fail(exc)
            failure = exc.code, exc.message  # not the exception: see PredictionService._handle
        except Exception as exc:
            error = self.server.internal_error(call, exc)
            failure = error.code, error.message
        finally:
            self.server.finish(call)
        return _fail(context, *failure)

    async def HandleReloadConfigRequest(self, request, context):
        try:
            await self.server.reload_config(request.config)
        except ServingError as exc:
            log.error("ReloadConfig failed: %s", exc.message)
            return _fail(context, exc.code, exc.message)
        except Exception as exc:  # a bug: logged with its traceback, answered in one line
            log.error("ReloadConfig failed", exc_info=exc)
            return _fail(context, grpc.StatusCode.INTERNAL, f"Internal error: {type(exc).__name__}: {exc}")
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto(error_code=0))


def _health_protos():
    protos_dir = str(Path(__file__).parent / "protos")
    sys.path.insert(0, protos_dir)
    try:
        return grpc.protos_and_services("health.proto")
    finally:
        sys.path.remove(protos_dir)


class HealthService:
    """grpc.health.v1.Health: SERVING while the server runs (TF Serving's meaning, for liveness probes),
    NOT_SERVING once it is shutting down; an unknown service name is NOT_FOUND, a request that is not a
    HealthCheckRequest INVALID_ARGUMENT (registered through grpc's generated code, it was UNKNOWN, a server
    fault for a client's garbage)."""

    def __init__(self):
        self.protos, _ = _health_protos()
        self.stopping = False

    def _status(self):
        statuses = self.protos.HealthCheckResponse.ServingStatus
        return statuses.Value("NOT_SERVING" if self.stopping else "SERVING")

    async def Check(self, request, context):
        if isinstance(request, _Unparsable):
            return _fail(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if request.service not in HEALTH_SERVICES:
            return _fail(context, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return self.protos.HealthCheckResponse(status=self._status())

    async def Watch(self, request, context):
        if isinstance(request, _Unparsable):
            _fail(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return
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
        """As the generated add_HealthServicer_to_server registers Check and Watch, with a request parser
        that lets the handlers refuse what is not a HealthCheckRequest."""
        parse = _parser(self.protos.HealthCheckRequest)
        grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
            "Check": grpc.unary_unary_rpc_method_handler(self.Check, request_deserializer=parse,
                                                         response_serializer=_serialize),
            "Watch": grpc.unary_stream_rpc_method_handler(self.Watch, request_deserializer=parse,
                                                          response_serializer=_serialize)}),))


class _Unparsable:
    """What a request that is not a valid protobuf of its type decodes to; the handler answers it."""

    def __init__(self, what: str, error: Exception):
        self.message = f"the request is not a valid {what}: {type(error).__name__}"


def _parser(request_type: type):
    """A request deserializer that hands what is not a valid `request_type` to the handler as _Unparsable."""
    def parse(data: bytes):
        try:
            return request_type.FromString(data)
        except Exception as exc:  # DecodeError, or RuntimeError from a C++ parser
            return _Unparsable(request_type.DESCRIPTOR.full_name, exc)
    return parse


def _handlers(service: str, servicer, methods: dict[str, tuple[type, str]],
              server: ModelServer) -> grpc.GenericRpcHandler:
    """The service's unary methods (as the generated add_*Servicer_to_server registers them), except that a
    request grpc cannot parse answers INVALID_ARGUMENT, recorded like any call (grpc's own answer would be
    INTERNAL, "Exception deserializing request!", a server fault for a client's garbage)."""

    def answering(method, api: str):
        async def handle(request, context):
            if isinstance(request, _Unparsable):
                server.refuse(UNKNOWN_MODEL, api, "grpc", invalid_argument(request.message))
                return _fail(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await method(request, context)
        return handle

    handlers = {}
    for name, (request_type, api) in methods.items():
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            answering(getattr(servicer, name), api), request_deserializer=_parser(request_type),
            response_serializer=_serialize)
    return grpc.method_handlers_generic_handler(service, handlers)


def _fail(context, code: grpc.StatusCode, message: str) -> None:
    """Ends the call with `code` and `message` once the handler returns (grpc.aio answers a non-OK code set on
    the context without a response). Not context.abort(): the AbortError it raises carries a traceback of the
    handler's frames, which grpc keeps in a cycle with the call's state, the request included, until the
    cyclic collector runs — rarely in this server (serving/heap.py) — so a stream of refused large requests
    piled up memory (~150 MB for each 4 MB message of 2 million strings)."""
    context.set_code(code)
    context.set_details(bounded_message(message))  # most come bounded (ServingError); a client's service name not


def _serialize(message) -> bytes:
    return message.SerializeToString()


def build_grpc_server(server: ModelServer) -> tuple[grpc.aio.Server, HealthService | None]:
    """Must be called on the running event loop that will serve it; raises ConveyorError or OSError naming
    what it could not listen on."""
    options = server.options
    # One request-size limit for both APIs: a gRPC message over --max_request_body_bytes is refused by grpc
    # itself (RESOURCE_EXHAUSTED) before it is buffered whole; answers are not limited (TF Serving's -1).
    channel_options = dict([("grpc.max_receive_message_length", options.max_request_body_bytes),
                            ("grpc.max_send_message_length", -1),
                            # grpcio shares a port with any other process that asks by default: only the
                            # server's own processes (--server_processes) may share it; anyone else's is taken.
                            ("grpc.so_reuseport", int(options.worker is not None)),
                            # Bounds on connections (serving/connections.py): how long one may wait for its
                            # HTTP/2 preface or sit without calls, and how many there may be.
                            ("grpc.server_handshake_timeout_ms", options.idle_connection_timeout_in_ms),
                            ("grpc.max_connection_idle_ms", options.idle_connection_timeout_in_ms)])
    if options.max_connections is not None:
        channel_options["grpc.max_allowed_incoming_connections"] = options.max_connections
    channel_options.update(dict(options.grpc_channel_arguments))  # later wins, as in TF Serving
    # Calls past this many wait in grpc's own queue (HTTP/2 flow control holds their bytes back) instead of
    # reaching the handlers: admission refuses what exceeds the request-byte budget among those admitted.
    grpc_server = grpc.aio.server(options=list(channel_options.items()),
                                  maximum_concurrent_rpcs=options.max_inflight_requests)
    prediction = PredictionService(server)
    grpc_server.add_generic_rpc_handlers((_handlers("tensorflow.serving.PredictionService", prediction, {
        "Classify": (classification_pb2.ClassificationRequest, "classify"),
        "Regress": (regression_pb2.RegressionRequest, "regress"),
        "Predict": (predict_pb2.PredictRequest, "predict"),
        "MultiInference": (inference_pb2.MultiInferenceRequest, "multi_inference"),
        "GetModelMetadata": (get_model_metadata_pb2.GetModelMetadataRequest, "metadata"),
    }, server), _handlers("tensorflow.serving.ModelService", ModelService(server), {
        "GetModelStatus": (get_model_status_pb2.GetModelStatusRequest, "status"),
        "HandleReloadConfigRequest": (model_management_pb2.ReloadConfigRequest, "reload_config"),
    }, server)))
    health = None
    if options.enable_grpc_healthcheck_service:
        health = HealthService()
        health.add_to(grpc_server)
    if options.port and options.worker is None:
        # Asked first (conveyor serve asked before loading the models; a port may have been taken since):
        # grpc's own refusal is logged to stderr as a multi-line C++ error before ours.
        check_port_free(options.grpc_host, options.port, "gRPC")
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
