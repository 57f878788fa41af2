"""TF Serving's gRPC services (PredictionService, ModelService) on the official tensorflow-serving-api protos.

Served by grpc.aio on the REST server's event loop: a request waiting for its batch costs a coroutine, not
a blocked thread (a thread per request capped gRPC at ~40 % of REST's throughput under load).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import tensorflow as tf
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

from conveyor_ml.serving.errors import ServingError, invalid_argument
from conveyor_ml.serving.model_server import ModelServer
from conveyor_ml.serving.servable import CLASSIFY_METHOD, REGRESS_METHOD

MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def _serialized_examples(model_input) -> list[bytes]:
    kind = model_input.WhichOneof("kind")
    if kind == "example_list":
        return [example.SerializeToString() for example in model_input.example_list.examples]
    if kind == "example_list_with_context":
        context = model_input.example_list_with_context.context
        merged = []
        for example in model_input.example_list_with_context.examples:
            combined = tf.train.Example()
            combined.CopyFrom(context)
            combined.MergeFrom(example)
            merged.append(combined.SerializeToString())
        return merged
    raise invalid_argument("Input is empty")


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server: ModelServer):
        self.server = server

    async def _handle(self, model_spec, api: str, context, work: Callable[..., Awaitable]):
        """Resolves the servable, runs `work(servable)`, turns a ServingError into the matching gRPC status."""
        started = time.perf_counter()
        version = None
        try:
            if not model_spec.name:
                raise invalid_argument("Missing ModelSpec")
            servable = self.server.resolve(model_spec.name,
                                           model_spec.version.value if model_spec.HasField("version") else None,
                                           model_spec.version_label or None)
            version = servable.version
            response = await work(servable)
        except ServingError as exc:
            self.server.observe(model_spec.name, version, api, "grpc", exc, time.perf_counter() - started)
            await context.abort(exc.code, exc.message)
        self.server.observe(model_spec.name, version, api, "grpc", None, time.perf_counter() - started)
        return response

    def _off_loop(self, function, *args) -> Awaitable:
        """Model work that does not go through the batcher runs on the server's executor, not the event loop."""
        return asyncio.get_running_loop().run_in_executor(self.server.executor, function, *args)

    @staticmethod
    def _fill_spec(target, servable, signature_name: str) -> None:
        target.name = servable.model_name
        target.version.value = servable.version
        target.signature_name = signature_name

    async def Predict(self, request, context):
        async def work(servable):
            try:
                inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
            except (TypeError, ValueError) as exc:
                raise invalid_argument(f"cannot read the input tensors: {exc}") from None
            signature, _ = servable.signature(request.model_spec.signature_name)
            self.server.quality.check_inputs(servable.model_name, inputs)
            outputs = await asyncio.wrap_future(
                self.server.predict_future(servable, signature, inputs, tuple(request.output_filter)))
            prediction_id = self.server.quality.record_predictions(servable.model_name, servable.version, outputs)
            if prediction_id:
                context.set_trailing_metadata((("x-prediction-id", prediction_id),))
            response = predict_pb2.PredictResponse()
            self._fill_spec(response.model_spec, servable, signature)
            for key, value in outputs.items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
            return response

        return await self._handle(request.model_spec, "predict", context, work)

    async def Classify(self, request, context):
        def work(servable):
            response = classification_pb2.ClassificationResponse()
            self._classify_into(servable, request.model_spec.signature_name, request.input, response)
            return response

        return await self._handle(request.model_spec, "classify", context, lambda s: self._off_loop(work, s))

    async def Regress(self, request, context):
        def work(servable):
            response = regression_pb2.RegressionResponse()
            self._regress_into(servable, request.model_spec.signature_name, request.input, response)
            return response

        return await self._handle(request.model_spec, "regress", context, lambda s: self._off_loop(work, s))

    def _classify_into(self, servable, signature_name: str, model_input, response) -> None:
        examples = _serialized_examples(model_input)
        classes, scores = servable.classify(signature_name, examples)
        signature, _ = servable.signature(signature_name)
        self._fill_spec(response.model_spec, servable, signature)
        width = (classes if classes is not None else scores).shape[1]
        for row in range(len(examples)):
            classifications = response.result.classifications.add()
            for column in range(width):
                entry = classifications.classes.add()
                if classes is not None:
                    entry.label = classes[row][column].decode()
                if scores is not None:
                    entry.score = float(scores[row][column])

    def _regress_into(self, servable, signature_name: str, model_input, response) -> None:
        examples = _serialized_examples(model_input)
        values = servable.regress(signature_name, examples)
        signature, _ = servable.signature(signature_name)
        self._fill_spec(response.model_spec, servable, signature)
        for value in values:
            response.result.regressions.add().value = float(value)

    async def MultiInference(self, request, context):
        if not request.tasks:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Tasks field is empty")
        response = inference_pb2.MultiInferenceResponse()
        for task in request.tasks:
            def work(servable, task=task):
                if task.method_name == CLASSIFY_METHOD:
                    holder = classification_pb2.ClassificationResponse()
                    self._classify_into(servable, task.model_spec.signature_name, request.input, holder)
                elif task.method_name == REGRESS_METHOD:
                    holder = regression_pb2.RegressionResponse()
                    self._regress_into(servable, task.model_spec.signature_name, request.input, holder)
                else:
                    raise invalid_argument(f"Unsupported signature method_name: {task.method_name}")
                return holder

            holder = await self._handle(task.model_spec, "multi_inference", context, lambda s, w=work: self._off_loop(w, s))
            result = response.results.add()
            if isinstance(holder, classification_pb2.ClassificationResponse):
                result.classification_result.CopyFrom(holder.result)
            else:
                result.regression_result.CopyFrom(holder.result)
            result.model_spec.CopyFrom(holder.model_spec)
        return response

    async def GetModelMetadata(self, request, context):
        async def work(servable):
            unsupported = [field for field in request.metadata_field if field != "signature_def"]
            if unsupported or not request.metadata_field:
                raise invalid_argument(f"Metadata field {(unsupported or [''])[0]} is not supported")
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            self._fill_spec(response.model_spec, servable, "")
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            for key, signature in servable.signature_defs.items():
                signature_map.signature_def[key].CopyFrom(signature)
            packed = any_pb2.Any()
            packed.Pack(signature_map)
            response.metadata["signature_def"].CopyFrom(packed)
            return response

        return await self._handle(request.model_spec, "metadata", context, work)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server: ModelServer):
        self.server = server

    async def GetModelStatus(self, request, context):
        spec = request.model_spec
        try:
            model = self.server.model(spec.name)
            version = spec.version.value if spec.HasField("version") else None
            statuses = model.statuses(version, spec.version_label or None)
        except ServingError as exc:
            await context.abort(exc.code, exc.message)
        response = get_model_status_pb2.GetModelStatusResponse()
        for status in statuses:
            entry = response.model_version_status.add()
            entry.version = status.version
            entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(status.state)
            entry.status.error_code = 0 if not status.error else 2
            entry.status.error_message = status.error
        return response

    async def HandleReloadConfigRequest(self, request, context):
        await asyncio.get_running_loop().run_in_executor(self.server.executor, self.server.apply_config, request.config)
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto(error_code=0))


def build_grpc_server(server: ModelServer) -> grpc.aio.Server:
    """Must be called on the running event loop that will serve it."""
    grpc_server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(server), grpc_server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(server), grpc_server)
    address = f"{server.options.grpc_host}:{server.options.port}"
    try:
        bound = grpc_server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address} (gRPC): the port is taken or the host is not local")
    return grpc_server
