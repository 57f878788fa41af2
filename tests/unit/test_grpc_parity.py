"""TF Serving's gRPC answers for odd and hostile requests, in process: the real servicers on a grpc.aio server
on 127.0.0.1 (no `conveyor serve`), called with the official tensorflow-serving-api stubs and a generic client
sending raw bytes. Nothing a client sends may be answered INTERNAL or UNKNOWN, hang or crash the server.
Expected texts are TF Serving 2.16.1's: servables/tensorflow/predict_util.cc, classifier.cc, regressor.cc,
multi_inference.cc, util.cc, get_model_metadata_impl.cc, model_servers/get_model_status_impl.cc,
server_core.cc, core/manager.h (ServableRequest::DebugString); a tensor's own refusals are Conveyor's
(serving/tensors.py), always INVALID_ARGUMENT as TF Serving's "tensor parsing error"."""
import asyncio
import random
import resource
import socket
import threading
import time

import grpc
import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    input_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from tests.tiny_models import write_tiny_model

CLASSIFY, REGRESS = "tensorflow/serving/classify", "tensorflow/serving/regress"
F = types_pb2
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


class _Odd(tf.Module):
    """Signatures of odd shapes: a scalar, strings, narrow and unusual dtypes, two inputs, none, a classifier and
    a regressor over parsed tf.Examples."""

    def __init__(self):
        super().__init__()
        self.c = tf.Variable(3.0)

    @tf.function(input_signature=[tf.TensorSpec([], tf.float32, name="x")])
    def scalar(self, x):
        return {"y": x * 2.0, "z": x + 1.0}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def strings(self, text):
        return {"length": tf.strings.length(text)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int8, name="i8"), tf.TensorSpec([None], tf.uint8, name="u8"),
                                  tf.TensorSpec([None], tf.bool, name="b"), tf.TensorSpec([None], tf.float16, name="h"),
                                  tf.TensorSpec([None], tf.int64, name="i64")])
    def types(self, i8, u8, b, h, i64):
        return {"sum": sum(tf.cast(value, tf.float32) for value in (i8, u8, b, h, i64))}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="a"),
                                  tf.TensorSpec([None], tf.float32, name="b")])
    def two(self, a, b):
        return {"sum": a + b}

    @tf.function(input_signature=[])
    def none(self):
        return {"c": tf.identity(self.c)}

    @staticmethod
    def _parse(inputs):
        return tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0])})["x"]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(self, inputs):
        x = self._parse(inputs)
        return {"scores": tf.concat([x, 1.0 - x], axis=1),
                "classes": tf.tile(tf.constant([["a", "b"]]), [tf.shape(x)[0], 1])}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress(self, inputs):
        return {"outputs": tf.reshape(self._parse(inputs), [-1]) * 2.0}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class InProcessGrpc:
    """A ModelServer with its gRPC services on an event loop of its own thread, on 127.0.0.1."""

    def __init__(self, config_file, **options):
        from conveyor_ml.serving.grpc_service import build_grpc_server
        from conveyor_ml.serving.model_server import ModelServer, ServerOptions

        self.port = _free_port()
        self.server = ModelServer(ServerOptions(port=self.port, rest_api_port=0, model_config_file=str(config_file),
                                                file_system_poll_wait_seconds=0, **options))
        self.server.start_polling()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            grpc_server, _ = build_grpc_server(self.server)
            await grpc_server.start()
            return grpc_server

        self.grpc = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def call(self, method: str, request, timeout: float = 30.0):
        """(code, details) of the call; the response as details when it succeeds."""
        stub = self.models if method in ("GetModelStatus", "HandleReloadConfigRequest") else self.predictions
        try:
            return grpc.StatusCode.OK, getattr(stub, method)(request, timeout=timeout)
        except grpc.RpcError as error:
            return error.code(), error.details()

    def raw(self, method: str, data: bytes, service: str = "tensorflow.serving.PredictionService"):
        send = self.channel.unary_unary(f"/{service}/{method}", request_serializer=None, response_deserializer=None)
        try:
            return grpc.StatusCode.OK, send(data, timeout=30)
        except grpc.RpcError as error:
            return error.code(), error.details()

    def stop(self):
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.grpc.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.server.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc")
    module = _Odd()
    tf.saved_model.save(module, str(root / "odd" / "1"), signatures={
        "serving_default": module.scalar.get_concrete_function(), "strings": module.strings.get_concrete_function(),
        "types": module.types.get_concrete_function(), "two": module.two.get_concrete_function(),
        "none": module.none.get_concrete_function(), "classify": module.classify.get_concrete_function(),
        "regress": module.regress.get_concrete_function()})
    write_tiny_model(root / "tiny" / "1")
    config = root / "models.config"
    config.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{root / name}" model_platform: "tensorflow" }}\n'
        for name in ("odd", "tiny")) + "}\n")
    server = InProcessGrpc(config, max_request_body_bytes=1 << 20)
    yield server
    server.stop()


# -- request builders ---------------------------------------------------------------------------------------

def tensor(dtype, dims=(), unknown_rank=False, **fields) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.unknown_rank = unknown_rank
    for size in dims:
        proto.tensor_shape.dim.add().size = size
    for name, values in fields.items():
        if name == "tensor_content":
            proto.tensor_content = values
        else:
            getattr(proto, name).extend(values)
    return proto


def spec_into(spec, model="odd", signature="", version=None, label=None):
    spec.name = model
    spec.signature_name = signature
    if version is not None:
        spec.version.value = version
    if label is not None:
        spec.version_label = label


def predict(model="odd", signature="", inputs=None, output_filter=(), **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(output_filter=list(output_filter))
    spec_into(request.model_spec, model, signature, **spec)
    for alias, proto in (inputs or {}).items():
        request.inputs[alias].CopyFrom(proto)
    return request


def example(**features) -> example_pb2.Example:
    built = example_pb2.Example()
    for name, value in features.items():
        feature = built.features.feature[name]
        if isinstance(value, bytes):
            feature.bytes_list.value.append(value)
        elif isinstance(value, int):
            feature.int64_list.value.append(value)
        elif isinstance(value, list):
            feature.float_list.value.extend(value)
        elif value is not None:
            feature.float_list.value.append(value)
    return built


def examples(items=None, context=None) -> input_pb2.Input:
    model_input = input_pb2.Input()
    if items is None and context is None:
        return model_input  # no kind set
    if context is not None:
        model_input.example_list_with_context.context.CopyFrom(context)
        model_input.example_list_with_context.examples.extend(items or [])
    else:
        model_input.example_list.SetInParent()
        model_input.example_list.examples.extend(items)
    return model_input


def classify(model="odd", signature="classify", model_input=None, **spec):
    request = classification_pb2.ClassificationRequest()
    spec_into(request.model_spec, model, signature, **spec)
    request.input.CopyFrom(model_input if model_input is not None else examples([example(x=0.25)]))
    return request


def regress(model="odd", signature="regress", model_input=None, **spec):
    request = regression_pb2.RegressionRequest()
    spec_into(request.model_spec, model, signature, **spec)
    request.input.CopyFrom(model_input if model_input is not None else examples([example(x=0.25)]))
    return request


def multi(tasks, model_input=None):
    request = inference_pb2.MultiInferenceRequest()
    for model, signature, method in tasks:
        task = request.tasks.add(method_name=method)
        spec_into(task.model_spec, model, signature)
    request.input.CopyFrom(model_input if model_input is not None else examples([example(x=0.25)]))
    return request


def metadata(model="odd", fields=("signature_def",), has_spec=True, **spec):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=list(fields))
    if has_spec:
        spec_into(request.model_spec, model, **spec)
    return request


def status(model="odd", has_spec=True, **spec):
    request = get_model_status_pb2.GetModelStatusRequest()
    if has_spec:
        spec_into(request.model_spec, model, **spec)
    return request


def reload(*models, config_kind="list"):
    request = model_management_pb2.ReloadConfigRequest()
    if config_kind == "custom":
        request.config.custom_model_config.type_url = "type.googleapis.com/x"
    elif config_kind == "list":
        request.config.model_config_list.SetInParent()
        for model in models:
            request.config.model_config_list.config.add(**model)
    return request


X1 = {"x": tensor(F.DT_FLOAT, float_val=[1.0])}
INVALID, NOT_FOUND, PRECONDITION = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                    grpc.StatusCode.FAILED_PRECONDITION)

# (method, request, code, message: the whole text, or a prefix ending in "...")
CASES = {
    # Conveyor's tensor checks (tensors.py), before any allocation
    "overflowing dims before a zero": ("Predict", predict(inputs={"x": tensor(F.DT_FLOAT, [2**62, 2**62, 0])}),
                                       INVALID, "input 'x': the dimensions of shape [4611686018427387904,"
                                       "4611686018427387904,0] of DT_FLOAT multiply past what an int64 holds"),
    "empty dims numpy cannot shape": ("Predict", predict(inputs={"x": tensor(F.DT_FLOAT, [0, 2**63 - 1])}),
                                      INVALID, "input 'x': the dimensions of shape [0,9223372036854775807] of DT_FLOAT "
                                      "multiply past what an int64 holds"),
    "odd complex parts": ("Predict", predict(inputs={"x": tensor(F.DT_COMPLEX64, [2], scomplex_val=[1, 2, 3])}),
                          INVALID, "input 'x' is DT_COMPLEX64 but the model's tensor serving_default_x:0 takes DT_FLOAT"),
    "float_val for an int": ("Predict", predict(inputs={"x": tensor(F.DT_INT32, float_val=[2])}), INVALID,
                             "input 'x' is DT_INT32 but the model's tensor serving_default_x:0 takes DT_FLOAT"),
    "short tensor_content": ("Predict", predict(inputs={"x": tensor(F.DT_FLOAT, tensor_content=b"abc")}), INVALID,
                             "input 'x': tensor_content holds 3 bytes, the shape [] of DT_FLOAT needs 4"),
    "negative dim": ("Predict", predict(inputs={"x": tensor(F.DT_FLOAT, [-1])}), INVALID,
                     "input 'x': dimension sizes must be known and non-negative, got [-1]"),
    "unknown rank": ("Predict", predict(inputs={"x": tensor(F.DT_FLOAT, unknown_rank=True)}), INVALID,
                     "input 'x': a tensor must have a known shape"),
    "huge dim": ("Predict", predict(inputs={"x": tensor(F.DT_FLOAT, [2**40])}), INVALID,
                 "input 'x' declares shape [1099511627776] of DT_FLOAT: 4,398,046,511,104 bytes decoded, ..."),
    "64 dims": ("Predict", predict(inputs={"x": tensor(F.DT_FLOAT, [1] * 64)}), INVALID,
                "input 'x': a tensor of rank 64; at most 32 dimensions are supported"),
    "DT_RESOURCE": ("Predict", predict(inputs={"x": tensor(F.DT_RESOURCE)}), INVALID,
                    "input 'x': tensor type DT_RESOURCE cannot be sent in a request"),
    "DT_VARIANT": ("Predict", predict(inputs={"x": tensor(F.DT_VARIANT)}), INVALID,
                   "input 'x': tensor type DT_VARIANT cannot be sent in a request"),
    "DT_INVALID": ("Predict", predict(inputs={"x": tensor(F.DT_INVALID)}), INVALID,
                   "input 'x': tensor type DT_INVALID cannot be sent in a request"),
    "no such dtype": ("Predict", predict(inputs={"x": tensor(12345)}), INVALID,
                      "input 'x': tensor type 12345 cannot be sent in a request"),
    "strings as tensor_content": ("Predict", predict(signature="strings", inputs={
        "text": tensor(F.DT_STRING, [1], tensor_content=b"12345678")}), INVALID,
        "input 'text': DT_STRING values cannot be sent as tensor_content"),
    # predict_util.cc
    "unknown signature": ("Predict", predict(signature="nope"), PRECONDITION,
                          'Serving signature key "nope" not found.'),
    "extra input": ("Predict", predict(inputs={**X1, "q": tensor(F.DT_FLOAT)}), INVALID,
                    "input size does not match signature: 2!=1 len({q,x}) != len({x}). Sent extra: {q}. "
                    "Missing but required: {}."),
    "no inputs": ("Predict", predict(), INVALID, "input size does not match signature: 0!=1 len({}) != len({x}). "
                  "Sent extra: {}. Missing but required: {x}."),
    "input to no-input signature": ("Predict", predict(signature="none", inputs=X1), INVALID,
                                    "input size does not match signature: 1!=0 len({x}) != len({}). Sent extra: {x}. "
                                    "Missing but required: {}."),
    "empty input key": ("Predict", predict(inputs={"": tensor(F.DT_FLOAT)}), INVALID,
                        "input tensor alias not found in signature: . Inputs expected to be in the set {x}."),
    "unknown output filter": ("Predict", predict(inputs=X1, output_filter=["nope"]), INVALID,
                              "output tensor alias not found in signature: nope Outputs expected to be in the set "
                              "{y,z}."),
    "duplicate output filter": ("Predict", predict(inputs=X1, output_filter=["y", "y"]), INVALID,
                                "duplicate output tensor alias: y"),
    # server_core.cc, manager.h
    "empty model name": ("Predict", predict(model=""), INVALID, "ModelSpec has no name specified."),
    "unknown model": ("Predict", predict(model="nope"), NOT_FOUND, "Servable not found for request: Latest(nope)"),
    "negative version": ("Predict", predict(version=-1), NOT_FOUND,
                         "Servable not found for request: Specific(odd, -1)"),
    "huge version": ("Predict", predict(version=2**63 - 1), NOT_FOUND,
                     "Servable not found for request: Specific(odd, 9223372036854775807)"),
    "unknown label": ("Predict", predict(label="canary"), INVALID, "Unrecognized servable version label: canary"),
    # util.cc, classifier.cc, regressor.cc, multi_inference.cc
    "no examples": ("Classify", classify(model_input=examples([])), INVALID, "Input is empty."),
    "input unset": ("Classify", classify(model_input=examples()), INVALID, "Input is empty."),
    "context without examples": ("Regress", regress(model_input=examples([], context=example(x=1.0))), INVALID,
                                 "Input is empty."),
    "feature of the wrong kind": ("Classify", classify(model_input=examples([example(x=b"abc")])), INVALID,
                                  "Name: <unknown>, Key: x, Index: 0. Data types don't match. ..."),
    "classify: unknown signature": ("Classify", classify(signature="nope"), INVALID,
                                    "No signature was found with the name: nope"),
    "classify: two inputs": ("Classify", classify(signature="two"), INVALID, "Expected one input Tensor."),
    "regress: classifier's two outputs": ("Regress", regress(signature="classify"), INVALID,
                                          "Expected one output Tensor."),
    "regress: empty model name": ("Regress", regress(model=""), INVALID, "ModelSpec has no name specified."),
    "multi: no tasks": ("MultiInference", multi([]), INVALID, "Tasks field is empty"),
    "multi: two models": ("MultiInference", multi([("odd", "classify", CLASSIFY), ("tiny", "regress", REGRESS)]),
                          INVALID, "All ModelSpecs in a MultiInferenceRequest must access the same model name."),
    "multi: duplicate signature": ("MultiInference", multi([("odd", "classify", CLASSIFY),
                                                            ("odd", "classify", CLASSIFY)]),
                                   INVALID, "Duplicate evaluation of signature: classify"),
    "multi: empty model": ("MultiInference", multi([("", "classify", CLASSIFY)]), INVALID,
                           "Found ModelSpec with an empty model name."),
    "multi: unknown signature": ("MultiInference", multi([("odd", "nope", CLASSIFY)]), INVALID,
                                 "Requested signature not found in model graph: nope"),
    "multi: predict method": ("MultiInference", multi([("odd", "classify", "tensorflow/serving/predict")]),
                              grpc.StatusCode.UNIMPLEMENTED,
                              "Unsupported signature method_name: tensorflow/serving/predict"),
    # get_model_metadata_impl.cc
    "metadata: no field": ("GetModelMetadata", metadata(fields=()), INVALID,
                           "GetModelMetadataRequest must specify at least one metadata_field"),
    "metadata: unknown field": ("GetModelMetadata", metadata(fields=("nope",)), INVALID,
                                "Metadata field nope is not supported"),
    "metadata: no spec": ("GetModelMetadata", metadata(has_spec=False), INVALID, "Missing ModelSpec"),
    "metadata: unknown model": ("GetModelMetadata", metadata(model="nope"), NOT_FOUND,
                                "Servable not found for request: Latest(nope)"),
    # get_model_status_impl.cc
    "status: no spec": ("GetModelStatus", status(has_spec=False), INVALID, "Missing ModelSpec"),
    "status: unknown model": ("GetModelStatus", status(model="nope"), NOT_FOUND,
                              "Could not find any versions of model nope"),
    "status: empty model": ("GetModelStatus", status(model=""), NOT_FOUND, "Could not find any versions of model "),
    "status: unknown model and version": ("GetModelStatus", status(model="nope", version=3), NOT_FOUND,
                                          "Could not find version 3 of model nope"),
    "status: unknown version": ("GetModelStatus", status(version=-1), NOT_FOUND,
                                "Could not find version -1 of model odd"),
    # server_core.cc
    "reload: no config": ("HandleReloadConfigRequest", reload(config_kind="none"), INVALID,
                          "ServerModelConfig type not supported by HandleReloadConfigRequest. Only ModelConfigList "
                          "is currently supported"),
    "reload: custom config": ("HandleReloadConfigRequest", reload(config_kind="custom"), INVALID,
                              "ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
                              "ModelConfigList is currently supported"),
    "reload: model twice": ("HandleReloadConfigRequest", reload({"name": "a", "base_path": "/tmp"},
                                                                {"name": "a", "base_path": "/tmp"}),
                            INVALID, "Illegal to list model a multiple times in config list"),
    "reload: relative path": ("HandleReloadConfigRequest", reload({"name": "a", "base_path": "models/a"}), INVALID,
                              "Expected model a to have an absolute path or URI; got base_path()=models/a"),
}


def _matches(details: str, message: str) -> bool:
    """`details` is `message`, or starts with it when `message` ends in "..." (TensorFlow's own refusals carry
    a node name after their reason)."""
    return details.startswith(message[:-3]) if message.endswith("...") else details == message


@pytest.mark.parametrize("name", list(CASES))
def test_odd_requests_get_tf_servings_status(served, name):
    method, request, code, message = CASES[name]
    got, details = served.call(method, request)
    assert got == code and _matches(details, message), (got, details)


def test_valid_requests_still_answer(served):
    code, answer = served.call("Predict", predict(inputs=X1))
    assert code == grpc.StatusCode.OK and list(answer.outputs["y"].float_val) == [2.0]
    code, answer = served.call("Predict", predict(signature="two", inputs={"a": tensor(F.DT_FLOAT, [0]),
                                                                           "b": tensor(F.DT_FLOAT, [0])}))
    assert code == grpc.StatusCode.OK and [dim.size for dim in answer.outputs["sum"].tensor_shape.dim] == [0]
    code, answer = served.call("Predict", predict(signature="types", inputs={
        "i8": tensor(F.DT_INT8, [1], int_val=[1000]), "u8": tensor(F.DT_UINT8, [1], int_val=[-5]),
        "b": tensor(F.DT_BOOL, [1], bool_val=[True]), "h": tensor(F.DT_HALF, [1], half_val=[15360]),
        "i64": tensor(F.DT_INT64, [1], int64_val=[1])}))  # -24 + 251 + 1 + 1.0 + 1: TensorFlow's casts
    assert code == grpc.StatusCode.OK and list(answer.outputs["sum"].float_val) == [230.0]
    code, answer = served.call("Classify", classify(model_input=examples([example(y=1.0)], context=example(x=0.5))))
    assert code == grpc.StatusCode.OK and [c.score for c in answer.result.classifications[0].classes] == [0.5, 0.5]
    code, answer = served.call("MultiInference", multi([("odd", "classify", CLASSIFY), ("odd", "regress", REGRESS)]))
    assert code == grpc.StatusCode.OK and len(answer.results) == 2


def _varint(value: int) -> bytes:
    out = b""
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            return out + bytes([low])
        out += bytes([low | 0x80])


@pytest.mark.parametrize("method, data, code, message", [
    ("Predict", b"\xff\xff\xff\xff\xff\x00garbage", INVALID,
     "the request is not a valid tensorflow.serving.PredictRequest: DecodeError"),
    ("Predict", predict(inputs=X1).SerializeToString()[:-3], INVALID,
     "the request is not a valid tensorflow.serving.PredictRequest: DecodeError"),
    ("Predict", b"\x0a\x04\x0a\x02\xff\xfe", INVALID,  # a model name that is not UTF-8
     "the request is not a valid tensorflow.serving.PredictRequest: DecodeError"),
    ("Predict", bytes([0x9B, 0x06]) * 100_000, INVALID,  # groups nested 100,000 deep (an unknown field)
     "the request is not a valid tensorflow.serving.PredictRequest: DecodeError"),
    ("Predict", b"\x0a" + _varint((1 << 20) + 8) + bytes((1 << 20) + 8), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "SERVER: Received message larger than max (1048588 vs. 1048576)"),
    ("Predict", b"", INVALID, "ModelSpec has no name specified."),
    ("Classify", b"\xff" * 10, INVALID,
     "the request is not a valid tensorflow.serving.ClassificationRequest: DecodeError"),
    ("MultiInference", b"\x08", INVALID,
     "the request is not a valid tensorflow.serving.MultiInferenceRequest: DecodeError"),
    ("GetModelStatus", b"\xff", INVALID,
     "the request is not a valid tensorflow.serving.GetModelStatusRequest: DecodeError"),
    ("HandleReloadConfigRequest", b"\x0a\x05\xff", INVALID,
     "the request is not a valid tensorflow.serving.ReloadConfigRequest: DecodeError"),
    ("NoSuchMethod", b"", grpc.StatusCode.UNIMPLEMENTED, "Method not found!"),
])
def test_raw_bytes_are_client_errors(served, method, data, code, message):
    service = ("tensorflow.serving.ModelService" if method in ("GetModelStatus", "HandleReloadConfigRequest")
               else "tensorflow.serving.PredictionService")
    assert served.raw(method, data, service) == (code, message)


# -- the bounded fuzz ---------------------------------------------------------------------------------------

DTYPES = [F.DT_FLOAT, F.DT_DOUBLE, F.DT_INT32, F.DT_INT8, F.DT_UINT8, F.DT_INT16, F.DT_UINT16, F.DT_INT64,
          F.DT_UINT32, F.DT_UINT64, F.DT_BOOL, F.DT_HALF, F.DT_BFLOAT16, F.DT_STRING, F.DT_COMPLEX64,
          F.DT_COMPLEX128, F.DT_RESOURCE, F.DT_VARIANT, F.DT_INVALID, F.DT_QINT8, F.DT_FLOAT_REF, 999, -1]
DIMS = [0, 1, 2, 3, -1, -2**63, 2**31, 2**40, 2**62, 2**63 - 1]
FIELDS = {"float_val": lambda r: [r.uniform(-1e30, 1e30) for _ in range(r.randint(0, 5))],
          "double_val": lambda r: [r.choice([0.0, float("nan"), float("inf"), -1.5])] * r.randint(0, 4),
          "int_val": lambda r: [r.randint(-2**31, 2**31 - 1) for _ in range(r.randint(0, 5))],
          "int64_val": lambda r: [r.randint(-2**63, 2**63 - 1) for _ in range(r.randint(0, 5))],
          "uint64_val": lambda r: [r.randint(0, 2**64 - 1) for _ in range(r.randint(0, 3))],
          "uint32_val": lambda r: [r.randint(0, 2**32 - 1) for _ in range(r.randint(0, 3))],
          "bool_val": lambda r: [r.random() < 0.5 for _ in range(r.randint(0, 5))],
          "half_val": lambda r: [r.randint(-2**31, 2**31 - 1) for _ in range(r.randint(0, 5))],
          "string_val": lambda r: [r.randbytes(r.randint(0, 6)) for _ in range(r.randint(0, 4))],
          "scomplex_val": lambda r: [r.random() for _ in range(r.randint(0, 5))],
          "dcomplex_val": lambda r: [r.random() for _ in range(r.randint(0, 5))],
          "tensor_content": lambda r: r.randbytes(r.choice([0, 1, 3, 4, 8, 12, 16, 17]))}
ALIASES = ["x", "a", "b", "text", "i8", "u8", "h", "i64", "", "x ", "X", "nope", "\u00e9"]
SIGNATURES = ["", "serving_default", "strings", "types", "two", "none", "classify", "regress", "nope", "x" * 3000]
SIGNATURE_INPUTS = {
    ("odd", "serving_default"): {"x": F.DT_FLOAT}, ("odd", "strings"): {"text": F.DT_STRING},
    ("odd", "types"): {"i8": F.DT_INT8, "u8": F.DT_UINT8, "b": F.DT_BOOL, "h": F.DT_HALF, "i64": F.DT_INT64},
    ("odd", "two"): {"a": F.DT_FLOAT, "b": F.DT_FLOAT}, ("odd", "classify"): {"inputs": F.DT_STRING},
    ("tiny", "serving_default"): {"x": F.DT_FLOAT}, ("tiny", "add"): {"a": F.DT_FLOAT, "b": F.DT_FLOAT},
    ("tiny", "strings"): {"text": F.DT_STRING},
}
MODELS = ["odd", "odd", "odd", "tiny", "", "nope", "\u0000", "odd\n"]


def _random_tensor(r: random.Random) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=r.choice(DTYPES))
    rank = r.choice([0, 0, 1, 1, 2, 3, 33, 64])
    for _ in range(rank):
        proto.tensor_shape.dim.add().size = r.choice(DIMS) if r.random() < 0.3 else r.randint(0, 4)
    if r.random() < 0.05:
        proto.tensor_shape.unknown_rank = True
    for field in r.sample(list(FIELDS), r.randint(0, 2)):
        values = FIELDS[field](r)
        if field == "tensor_content":
            proto.tensor_content = values
        else:
            getattr(proto, field).extend(values)
    return proto


def _random_spec(r: random.Random, spec, signatures=SIGNATURES) -> None:
    spec_into(spec, r.choice(MODELS), r.choice(signatures))
    roll = r.random()
    if roll < 0.1:
        spec.version.value = r.choice([-1, 0, 1, 2, 2**63 - 1, -2**63])
    elif roll < 0.15:
        spec.version_label = r.choice(["", "stable", "canary", "x" * 500])


def _random_example(r: random.Random) -> example_pb2.Example:
    built = example_pb2.Example()
    for _ in range(r.randint(0, 3)):
        feature = built.features.feature[r.choice(["x", "y", ""])]
        kind = r.randint(0, 3)
        if kind == 0:
            feature.float_list.value.extend([r.random()] * r.choice([0, 1, 2, 1000]))
        elif kind == 1:
            feature.int64_list.value.extend([r.randint(-2**63, 2**63 - 1)] * r.randint(0, 3))
        elif kind == 2:
            feature.bytes_list.value.extend([r.randbytes(r.randint(0, 8))] * r.randint(0, 3))
    return built


def _random_input(r: random.Random) -> input_pb2.Input:
    items = [_random_example(r) for _ in range(r.choice([0, 1, 1, 2, 5]))]
    roll = r.random()
    if roll < 0.1:
        return examples()
    if roll < 0.35:
        return examples(items, context=_random_example(r))
    return examples(items)


def _random_request(r: random.Random):
    kind = r.choices(["Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata", "GetModelStatus",
                      "raw"], weights=[10, 3, 3, 3, 1, 1, 2])[0]
    if kind == "Predict":
        request = predict_pb2.PredictRequest()
        _random_spec(r, request.model_spec)
        if r.random() < 0.5:  # a signature's own aliases, mostly of its dtypes, of any shape: the model runs
            model, signature = r.choice(list(SIGNATURE_INPUTS))
            request.model_spec.name, request.model_spec.signature_name = model, signature
            for alias, dtype in SIGNATURE_INPUTS[model, signature].items():
                proto = request.inputs[alias]
                proto.CopyFrom(_random_tensor(r))
                if r.random() < 0.8:
                    proto.dtype = dtype
        for _ in range(r.choice([0, 0, 1, 2, 5])):
            request.inputs[r.choice(ALIASES)].CopyFrom(_random_tensor(r))
        request.output_filter.extend(r.choice([[], [], ["y"], ["y", "y"], ["nope"], ["sum", "length", "c"]]))
        return kind, request
    if kind in ("Classify", "Regress"):
        request = (classification_pb2.ClassificationRequest if kind == "Classify" else regression_pb2.RegressionRequest)()
        _random_spec(r, request.model_spec)
        request.input.CopyFrom(_random_input(r))
        return kind, request
    if kind == "MultiInference":
        request = inference_pb2.MultiInferenceRequest()
        for _ in range(r.choice([0, 1, 2, 2, 3])):
            task = request.tasks.add(method_name=r.choice([CLASSIFY, REGRESS, "", "tensorflow/serving/predict"]))
            _random_spec(r, task.model_spec)
            if r.random() < 0.7:
                task.model_spec.name = "odd"
        request.input.CopyFrom(_random_input(r))
        return kind, request
    if kind == "GetModelMetadata":
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            metadata_field=r.choice([[], ["signature_def"], [""], ["nope", "signature_def"]]))
        if r.random() < 0.9:
            _random_spec(r, request.model_spec)
        return kind, request
    if kind == "GetModelStatus":
        request = get_model_status_pb2.GetModelStatusRequest()
        if r.random() < 0.9:
            _random_spec(r, request.model_spec)
        return kind, request
    # raw: a valid request's bytes, cut or with bytes flipped
    method, request = _random_request(r)
    if method == "raw":
        return method, request
    data = bytearray(request.SerializeToString())
    if data and r.random() < 0.5:
        del data[r.randrange(len(data)):]
    for _ in range(r.randint(0, 3)):
        if data:
            data[r.randrange(len(data))] = r.randrange(256)
    return "raw", (method, bytes(data))


FUZZ_REQUESTS = 3000


def test_a_bounded_fuzz_gets_no_server_errors(served):
    """FUZZ_REQUESTS seeded random requests of every kind: no INTERNAL or UNKNOWN, each answered within its
    deadline, resident memory bounded, and the server answers a valid request afterwards."""
    r = random.Random(20261127)
    faults, started = [], time.monotonic()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for number in range(FUZZ_REQUESTS):
        method, request = _random_request(r)
        if method == "raw":
            method, data = request
            service = ("tensorflow.serving.ModelService" if method == "GetModelStatus"
                       else "tensorflow.serving.PredictionService")
            code, details = served.raw(method, data, service)
        else:
            code, details = served.call(method, request)
        if code in NEVER or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            faults.append((number, method, code, details, request))
    elapsed = time.monotonic() - started
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert not faults, faults[:5]
    assert elapsed < 240, elapsed
    assert grown_kib < 512 * 1024, f"peak resident memory grew {grown_kib} KiB"
    code, answer = served.call("Predict", predict(inputs=X1))
    assert code == grpc.StatusCode.OK and list(answer.outputs["y"].float_val) == [2.0]
