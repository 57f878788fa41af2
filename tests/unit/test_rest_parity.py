"""TF Serving's REST answers for odd requests, in process (aiohttp's test server on 127.0.0.1, no `conveyor serve`):
scalars, signatures of no inputs, TF Serving's URL grammar and preflight, rapidjson's parse errors, odd JSON
that must never be a 500. Expected texts are TF Serving 2.16.1's: util/json_tensor.cc,
model_servers/http_rest_api_util.cc, http_rest_api_handler.cc, http_server.cc, core/manager.h
(ServableRequest::DebugString)."""
import asyncio
import itertools

import orjson
import pytest
import tensorflow as tf


class _Odd(tf.Module):
    """A scalar-friendly input, a signature of no inputs (TF Serving's counter model's get_counter), a
    regressor that answers NaN, a float16 input, strings echoed as bytes."""

    def __init__(self):
        super().__init__()
        self.counter = tf.Variable(0.0)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x")])
    def scale(self, x):
        return {"y": x * 2.0}

    @tf.function(input_signature=[])
    def get_counter(self):
        return {"output_0": tf.identity(self.counter)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress(self, inputs):
        return {"outputs": tf.fill(tf.shape(inputs), float("nan"))}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float16, name="h")])
    def half(self, h):
        return {"y": h * 2}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def echo(self, text):
        return {"echo_bytes": tf.identity(text)}


@pytest.fixture(scope="module")
def odd_server(tmp_path_factory):
    from conveyor_ml.serving.model_server import ModelServer, ServerOptions

    base = tmp_path_factory.mktemp("odd") / "odd"
    module = _Odd()
    tf.saved_model.save(module, str(base / "1"), signatures={
        "serving_default": module.scale.get_concrete_function(),
        "get_counter": module.get_counter.get_concrete_function(),
        "regress": module.regress.get_concrete_function(), "half": module.half.get_concrete_function(),
        "echo": module.echo.get_concrete_function()})
    server = ModelServer(ServerOptions(model_name="odd", model_base_path=str(base),
                                       file_system_poll_wait_seconds=0))
    server.start_polling()
    yield server
    server.stop()


def rest_answers(server, requests: list[tuple]) -> list[tuple[int, str, dict]]:
    """(status, body, headers) for each (method, path, body[, headers]) sent to the REST API in process."""
    from aiohttp.test_utils import RawTestServer, TestClient

    from conveyor_ml.serving.rest import RestApi

    async def send():
        rest = RestApi(server)
        answers = []
        test_server = RawTestServer(rest.handle, request_factory=rest.make_request, host="127.0.0.1")
        async with TestClient(test_server) as client:
            for method, path, body, *headers in requests:
                response = await client.request(method, path, data=body,
                                                headers=headers[0] if headers else None)
                answers.append((response.status, await response.text(), dict(response.headers)))
        return answers

    return asyncio.run(send())


def rest_error(server, method: str, path: str, body=None) -> tuple[int, str]:
    [(status, text, _)] = rest_answers(server, [(method, path, body)])
    return status, orjson.loads(text)["error"] if text else ""


def test_a_scalar_input_is_a_scalar_tensor(odd_server):
    """FillTensorMapFromInputsMap: a plain value is a tensor of shape [] (was 500: orjson and 0-d arrays)."""
    answers = rest_answers(odd_server, [("POST", "/v1/models/odd:predict", '{"inputs": 1.0}'),
                                        ("POST", "/v1/models/odd:predict", '{"inputs": {"x": 2.0}}')])
    assert [(status, orjson.loads(body)) for status, body, _ in answers] == [(200, {"outputs": 2.0}),
                                                                               (200, {"outputs": 4.0})]


def test_columnar_keys_the_signature_does_not_name_are_ignored(odd_server):
    """FillTensorMapFromInputsMap looks up each input of the signature and nothing else."""
    [(status, body, _)] = rest_answers(odd_server, [("POST", "/v1/models/odd:predict",
                                                     '{"inputs": {"x": [1.0], "z": [2.0]}}')])
    assert (status, orjson.loads(body)) == (200, {"outputs": [2.0]})


@pytest.mark.parametrize("body", ['{"signature_name": "get_counter", "instances": [1]}',
                                  '{"signature_name": "get_counter", "inputs": {}}',
                                  '{"signature_name": "get_counter"}'])
def test_a_signature_of_no_inputs(odd_server, body):
    # json_tensor.cc FillPredictRequestFromJson: "Failed to get input map for signature: ", signame/DEFAULT
    assert rest_error(odd_server, "POST", "/v1/models/odd:predict", body) == (
        400, "Failed to get input map for signature: get_counter")


@pytest.mark.parametrize("api", ["regress", "classify"])
def test_a_uint64_feature_is_refused(odd_server, api):
    # json_tensor.cc AddValueToFeature: "Feature: ", name, " has uint64_t element. Only int64_t is supported."
    assert rest_error(odd_server, "POST", f"/v1/models/odd:{api}",
                      '{"signature_name": "regress", "examples": [{"x": 18446744073709551615}]}') == (
        400, "Feature: x has uint64_t element. Only int64_t is supported.")


def test_a_nan_regression_is_written_as_tf_servings_token(odd_server):
    """WriteDecimal writes NaN as NaN (RawValue), not null."""
    request = ("POST", "/v1/models/odd:regress", '{"signature_name": "regress", "examples": [{"x": 1}]}')
    [(status, body, _)] = rest_answers(odd_server, [request])
    assert status == 200 and body.replace(" ", "") == '{"results":[NaN]}'


@pytest.mark.parametrize("method, path, status, message", [
    # http_rest_api_handler.cc ProcessModelStatusRequest
    ("GET", "/v1/models", 400, "Missing model name in request."),
    # ProcessRequest's default status; the dispatcher takes every (?i)/v1/.* path
    ("GET", "/v1/foo", 400, "Malformed request: GET /v1/foo"),
    ("POST", "/v1/foo", 400, "Malformed request: POST /v1/foo"),
    ("POST", "/v1/models", 400, "Malformed request: POST /v1/models"),
    ("PUT", "/v1/models/odd", 400, "Malformed request: PUT /v1/models/odd"),
    ("DELETE", "/V1/whatever", 400, "Malformed request: DELETE /V1/whatever"),
    ("POST", "/v1/models/foo/versions/HELLO:regress", 400,
     "Malformed request: POST /v1/models/foo/versions/HELLO:regress"),
    # http_rest_api_util.cc ParseModelInfo
    ("POST", "/v1/models/foo/versions/18446744073709551615:regress", 400,
     "Failed to convert version: 18446744073709551615 to numeric."),
    ("GET", "/v1/models/odd/versions/18446744073709551615", 400,
     "Failed to convert version: 18446744073709551615 to numeric."),
    # basic_manager.cc "Servable not found for request: " + ServableRequest::DebugString()
    ("POST", "/v1/models/foo/versions/50:predict", 404, "Servable not found for request: Specific(foo, 50)"),
    ("POST", "/v1/models/foo:predict", 404, "Servable not found for request: Latest(foo)"),
])
def test_tf_servings_url_grammar(odd_server, method, path, status, message):
    assert rest_error(odd_server, method, path, '{"instances": [1]}' if method == "POST" else None) == (
        status, message)


def test_the_url_grammar_ignores_case_and_our_endpoints_still_answer(odd_server):
    answers = rest_answers(odd_server, [("GET", "/V1/MODELS/odd", None),
                                        ("GET", "/v1/Models/odd/Metadata", None),
                                        ("POST", "/V1/models/odd:PREDICT", '{"inputs": [1.0]}'),
                                        ("GET", "/healthz", None), ("GET", "/readyz", None),
                                        ("GET", "/v1/models/odd/monitoring", None)])
    assert [status for status, _, _ in answers] == [200, 200, 200, 200, 200, 200]
    assert orjson.loads(answers[2][1]) == {"outputs": [2.0]}


def test_cors_preflight_is_answered_with_or_without_the_flag(odd_server):
    """http_server.cc: OPTIONS on a /v1/ path is OK with an http(s) Origin, FAILED_PRECONDITION (400) without,
    no body either way; the CORS headers come with --rest_api_enable_cors_support only."""
    preflight = {"Origin": "https://example.com"}
    answers = rest_answers(odd_server, [("OPTIONS", "/v1/models/odd", None, preflight),
                                        ("OPTIONS", "/v1/models/odd", None)])
    assert [(status, body) for status, body, _ in answers] == [(200, ""), (400, "")]
    assert "Access-Control-Allow-Origin" not in answers[0][2]


@pytest.mark.parametrize("body, message", [
    # rapidjson's GetParseError_En between "JSON Parse error: " and " at offset: N" (json_tensor.cc ParseJson)
    ("instances = [1, 2]", "JSON Parse error: Invalid value. at offset: 0"),
    ('{"inputs": 1.0} x',
     "JSON Parse error: The document root must not be followed by other values. at offset: 16"),
    ('{"inputs": [1.0 2.0]}',
     "JSON Parse error: Missing a comma or ']' after an array element. at offset: 16"),
    ('{"inputs": 1.0 "x": 2}',
     "JSON Parse error: Missing a comma or '}' after an object member. at offset: 15"),
    ('{"inputs" 1.0}', "JSON Parse error: Missing a colon after a name of object member. at offset: 10"),
    ("{inputs: 1.0}", "JSON Parse error: Missing a name for object member. at offset: 1"),
    ('{"inputs": "abc', "JSON Parse error: Missing a closing quotation mark in string. at offset: 15"),
    ("   ", "JSON Parse error: The document is empty. at offset: 3"),
    ("", "JSON Parse error: The document is empty"),
    # reader.h ParseNumber: kParseErrorNumberTooBig at the number's first character (1142, 1318)
    ('{"inputs": [1e400]}', "JSON Parse error: Number too big to be stored in double. at offset: 12"),
    ('{"inputs": [NaN, -1e400]}', "JSON Parse error: Number too big to be stored in double. at offset: 17"),
    # reader.h ParseStringToStream (891-895): a control character in a string
    ('{"inputs": "a\x01"}', "JSON Parse error: Invalid escape character in string. at offset: 13"),
])
def test_json_parse_errors_are_rapidjsons(odd_server, body, message):
    assert rest_error(odd_server, "POST", "/v1/models/odd:predict", body) == (400, message)


def test_odd_json_never_answers_500(odd_server):
    """A small fuzz over the shapes and types a client may put where tensors and examples go."""
    values = ["1.0", "null", "true", '"s"', "{}", "[]", "[[]]", "[{}]", '{"b64": 1}', '{"b64": "***"}',
              '{"b64": "AA=="}', "18446744073709551616", "-9223372036854775809", "1e308", "[1, [2]]",
              '[{"x": 1}, 2]', '{"x": {"y": 1}}', '{"x": null}', '[null]', "[true, 1]", '["a", 1]']
    keys = ["instances", "inputs", "examples", "context", "signature_name"]
    requests = []
    for key, value in itertools.product(keys, values):
        for api in ("predict", "classify", "regress"):
            requests.append(("POST", f"/v1/models/odd:{api}", f'{{"{key}": {value}}}'))
            requests.append(("POST", f"/v1/models/odd:{api}", f'{{"signature_name": "regress", "examples": '
                                                               f'[{{"x": {value}}}], "{key}": {value}}}'))
    answers = rest_answers(odd_server, requests)
    failures = [(request, status, body)
                for request, (status, body, _) in zip(requests, answers) if status >= 500]
    assert not failures, failures[:5]


def test_grpc_model_status_without_a_model_spec(odd_server):
    """get_model_status_impl.cc: no model_spec is INVALID_ARGUMENT "Missing ModelSpec"."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2

    from conveyor_ml.serving.grpc_service import ModelService

    class Context:
        code = details = None

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    context = Context()
    request = get_model_status_pb2.GetModelStatusRequest()
    asyncio.run(ModelService(odd_server).GetModelStatus(request, context))
    assert (context.code, context.details) == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")


def test_error_bodies_are_rapidjsons_pretty_print(odd_server):
    """json_tensor.cc MakeJsonFromStatus (1075-1085) writes {"error": message} with rapidjson's PrettyWriter;
    the message quotes JSON pretty-printed too (JsonValueToString, 169-183)."""
    answers = rest_answers(odd_server, [
        ("POST", "/v1/models/odd:predict", '{"signature_name": "get_counter", "inputs": 1}'),
        ("POST", "/v1/models/odd:predict", '{"instances": [{"x": 1.0, "z": 2}]}'),
        ("POST", "/v1/models/odd:predict", '{"instances": 1, "s": [1]}')])
    assert [(status, body) for status, body, _ in answers] == [
        (400, '{\n    "error": "Failed to get input map for signature: get_counter"\n}'),
        # FillTensorMapFromInstancesList (503-512), AddInstanceItem (394-396): the key not in the signature
        (400, '{\n    "error": "Failed to process element: 0 key: z of \'instances\' list. Error: '
              'INVALID_ARGUMENT: JSON object: does not have named input: z"\n}'),
        (400, '{\n    "error": "JSON Value: {\\n    \\"instances\\": 1,\\n    \\"s\\": [\\n        1\\n'
              '    ]\\n} Expecting \'instances\' to be an list/array"\n}')]


def test_a_float16_input_is_unimplemented(odd_server):
    """json_tensor.cc AddValueToTensor (282-285): no JSON value converts to DT_HALF, UNIMPLEMENTED (REST 501,
    http_server.cc:74-75) as FillTensorMapFromInputsMap returns it (590); wrapped in INVALID_ARGUMENT by
    FillTensorMapFromInstancesList (529-532)."""
    path = "/v1/models/odd:predict"
    assert rest_error(odd_server, "POST", path, '{"signature_name": "half", "inputs": [1.0]}') == (
        501, "Conversion of JSON Value: 1.0 to type: half")
    assert rest_error(odd_server, "POST", path, '{"signature_name": "half", "instances": [1]}') == (
        400, "Failed to process element: 0 of 'instances' list. Error: UNIMPLEMENTED: Conversion of JSON "
             "Value: 1 to type: half")


def test_bytes_that_are_not_utf8_in_a_string_input_are_kept(odd_server):
    """json_tensor.cc ParseJson (431): rapidjson without kParseValidateEncodingFlag copies a string's bytes
    as they are (rapidjson 1.1.0 reader.h:897-902, encodings.h:691-696); the tensor holds them, a *_bytes
    output gives them back base64-encoded. Our /feedback extension still refuses them."""
    answers = rest_answers(odd_server, [
        ("POST", "/v1/models/odd:predict",
         b'{"signature_name": "echo", "instances": ["a\xffb", "\xc3\xa9"]}'),
        ("POST", "/v1/models/odd/feedback", b'{"prediction_id": "\xff", "labels": [1]}')])
    assert (answers[0][0], orjson.loads(answers[0][1])) == (
        200, {"predictions": [{"b64": "Yf9i"}, {"b64": "w6k="}]})
    assert answers[1][0] == 400 and orjson.loads(answers[1][1])["error"].startswith("JSON Parse error: ")


def test_strings_utf8_cannot_encode_never_answer_500(odd_server):
    """Bytes that are not UTF-8 and lone surrogate escapes, wherever a client may put a string."""
    strings = [b'"\xff"', b'"\\udcff"', b'"\\ud800"', b'"a\xed\xa0\x80"', b'{"b64": "\xff"}',
               b'["\xfe", "ok"]']
    requests = []
    for value in strings:
        for signature in (b"", b'"signature_name": "echo", ', b'"signature_name": "regress", ',
                          b'"signature_name": "half", ', b'"signature_name": ' + value + b", "):
            for body in (b'{%sinstances": [%s]}', b'{%sinputs": %s}', b'{%sinstances": [{%s: 1}]}',
                         b'{%sexamples": [{"f": %s}], "context": {%s: [1]}}'):
                filled = body.replace(b"{%s", b"{" + signature + b'"', 1).replace(b"%s", value)
                requests += [("POST", f"/v1/models/odd:{api}", filled)
                             for api in ("predict", "classify", "regress")]
        requests.append(("POST", "/v1/models/odd/feedback", b'{"prediction_id": %s, "labels": [1]}' % value))
    answers = rest_answers(odd_server, requests)
    failures = [(request, status, body)
                for request, (status, body, _) in zip(requests, answers) if status >= 500 and status != 501]
    assert not failures, failures[:5]
