"""TF Serving's REST API (same URLs, JSON and error bodies) on aiohttp, plus health and metrics endpoints.

Liveness: `GET /healthz` answers 200 while the server's event loop runs. Readiness: `GET /readyz` answers
200 once every configured model has a version available, else 503 naming what each model waits for.
Predict, Classify and Regress are bounded by --rest_api_timeout_in_ms (TF Serving's meaning: the model run,
not the request parsing); past it the answer is 504 with TF Serving's error body.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time

import grpc
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import json_format

from conveyor_ml.serving import json_codec
from conveyor_ml.serving.errors import ModelRunError, ServingError, invalid_argument, too_large
from conveyor_ml.serving.grpc_service import model_status_response, signature_def_map
from conveyor_ml.serving.model_quality import parse_feedback
from conveyor_ml.serving.model_server import Call, ModelServer
from conveyor_ml.serving.routing import route_key

# TF Serving's own URL grammar (http_rest_api_util.cc: kPredictionApiGegex, kModelStatusApiRegex, both (?i)),
# so a malformed path fails the same way. Every path under /v1/ is TF Serving's
# (kHTTPRestApiHandlerPathRegex).
MODEL_PATH = re.compile(
    r"^/v1/models(?:/(?P<name>[^/:]+))?"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<action>/metadata|:predict|:classify|:regress)?$", re.IGNORECASE)
API_PREFIX = re.compile(r"^/v1/", re.IGNORECASE)
EXTENSION_PATH = re.compile(r"^/v1/models/(?P<name>[^/]+)/(?P<what>feedback|monitoring)$")
VERSION_HEADER = "X-Model-Version"
PREDICTION_ID_HEADER = "X-Prediction-Id"  # our extension: the id to send ground truth for (feedback)
JSON = "application/json"
INT64_MAX = 2**63 - 1
CORS_HEADERS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, GET",
                "Access-Control-Allow-Headers": "Content-Type"}


def _int64(digits: str) -> int:
    """A URL's version digits as a number; -1 when no int64 holds it (int() of thousands of digits would
    raise, and of hundreds would be a number no version can have)."""
    digits = digits.lstrip("0") or "0"
    if len(digits) > 19:
        return -1
    value = int(digits)
    return value if value <= INT64_MAX else -1


class MalformedHttpLog(logging.Filter):
    """aiohttp answers a request it cannot parse as HTTP (a bad header, chunk size or method, a URL over 8 KiB)
    with 400 itself, and logs each at ERROR with a traceback: a client's garbage, not a server fault, and a
    flood of it would fill the log. On aiohttp's server logger, such a record becomes one WARNING line: the
    first, then one in a hundred."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        self.seen += 1
        if self.seen > 1 and self.seen % 100:
            return False
        record.msg = "malformed HTTP request answered 400 (%s: %s; #%d so far)"
        record.args = (type(error).__name__, " ".join(str(error.message).split())[:200], self.seen)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _json(body: bytes, status: int = 200, version: int | None = None, prediction_id: str | None = None) -> web.Response:
    headers = {"Content-Type": JSON}  # as a header: content_type= would parse and rebuild it per response
    if version is not None:
        headers[VERSION_HEADER] = str(version)
    if prediction_id:
        headers[PREDICTION_ID_HEADER] = prediction_id
    return web.Response(body=body, status=status, headers=headers)


def error_response(error: ServingError) -> web.Response:
    """TF Serving's error body (json_tensor.cc MakeJsonFromStatus: rapidjson's PrettyWriter)."""
    body = '{\n    "error": ' + json_codec.rapidjson_string(error.message) + "\n}"
    return _json(body.encode(), status=error.http_status)


def proto_json(message, proto_field_names: bool = True) -> str:
    """TF Serving's JSON printing: default-valued fields included, int64s as strings, enums by name."""
    return json_format.MessageToJson(message, including_default_value_fields=True,
                                     preserving_proto_field_name=proto_field_names)


def metadata_json(servable) -> bytes:
    """GetModelMetadata as TF Serving's REST API prints it: the model spec and the SignatureDefMap printed
    apart (TF Serving works around a protobuf Any bug so) and joined under "metadata": {"signature_def": ...}."""
    spec = proto_json(_model_spec(servable))
    signatures = proto_json(signature_def_map(servable))
    return ('{\n"model_spec":' + spec + ',\n"metadata": {"signature_def": ' + signatures + '}\n}\n').encode()


def _model_spec(servable):
    from tensorflow_serving.apis import model_pb2

    spec = model_pb2.ModelSpec(name=servable.model_name)
    spec.version.value = servable.version
    return spec


class RestApi:
    def __init__(self, server: ModelServer):
        self.server = server

    def make_request(self, message, payload, protocol, writer, task) -> web.BaseRequest:
        """aiohttp's low-level server's request factory, with --max_request_body_bytes as the body limit."""
        return web.BaseRequest(message, payload, protocol, writer, task, asyncio.get_running_loop(),
                               client_max_size=self.server.options.max_request_body_bytes)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request, routed by one look at its path: the server runs on aiohttp's low-level server, as
        its router and middleware machinery cost more per call than the rest of a small Predict."""
        cors = self.server.options.rest_api_enable_cors_support
        if request.method == "OPTIONS" and API_PREFIX.match(request.path):
            # TF Serving's preflight (http_server.cc), with or without --rest_api_enable_cors_support: no
            # body, CORS headers only with the flag; without an http(s) Origin FAILED_PRECONDITION, 400.
            ok = re.search(r"https?://", request.headers.get("Origin", "")) is not None
            return web.Response(status=200 if ok else 400, headers=CORS_HEADERS if cors else None)
        response = await self._route(request)
        if cors:
            response.headers.update(CORS_HEADERS)
        return response

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        path, method = request.path, request.method
        if path.startswith("/v1/models/"):
            extension = EXTENSION_PATH.match(path)  # our extensions: the model URL grammar would refuse them
            if extension and (extension.group("what"), method) in (("feedback", "POST"), ("monitoring", "GET")):
                endpoint = self.feedback if method == "POST" else self.monitoring
                return await endpoint(request, extension.group("name"))
            return await self.handle_model(request)
        if API_PREFIX.match(path):  # TF Serving's whole /v1/ space, any case, any method
            return await self.handle_model(request)
        if method == "GET":
            if path == "/healthz":
                return _json(b'{"status": "alive"}')
            if path == "/readyz":
                return self.readyz()
            if path == self.server.options.prometheus_path:
                try:
                    exposition = await self.server.exposition()
                except ServingError as exc:  # another server process did not answer
                    return error_response(exc)
                return web.Response(body=exposition, content_type="text/plain", charset="utf-8")
        return error_response(ServingError(grpc.StatusCode.NOT_FOUND, f"Malformed request: {method} {path}"))

    def readyz(self) -> web.Response:
        waiting = self.server.readiness()
        ready = bool(self.server.registry.models()) and not waiting
        body = {"ready": ready}
        if waiting:
            body["waiting"] = waiting
        return _json(orjson.dumps(body), status=200 if ready else 503)

    async def handle_model(self, request: web.BaseRequest) -> web.Response:
        match = MODEL_PATH.match(request.path)
        action = (match.group("action") or "").lower() if match else ""
        is_post = request.method == "POST"
        if (not match or request.method not in ("GET", "POST") or is_post != action.startswith(":")
                or (is_post and not match.group("name"))):
            # INVALID_ARGUMENT, as TF Serving answers a /v1/ path it cannot parse (ParseModelInfo).
            return error_response(invalid_argument(f"Malformed request: {request.method} {request.path}"))
        version = _int64(match.group("version")) if match.group("version") else None
        if version == -1:  # http_rest_api_util.cc: SimpleAtoi into an int64
            return error_response(invalid_argument(f"Failed to convert version: {match.group('version')} to "
                                                   "numeric."))
        name, label = match.group("name"), match.group("label")
        if not name:  # GET /v1/models (ProcessModelStatusRequest)
            return error_response(invalid_argument("Missing model name in request."))
        api = action.lstrip(":/") or "status"
        try:
            call = self.server.begin(name, api, "rest", declared=(request.content_length or 0) if is_post else 0)
        except ServingError as exc:
            return error_response(exc)
        return await self._run(call, self._answer(call, request, name, version, label, action))

    async def _run(self, call: Call, answer) -> web.Response:
        """Awaits the call's answer; every way it can end is answered as JSON and recorded with its status."""
        try:
            return await answer
        except ServingError as exc:
            call.fail(exc)
            return error_response(exc)
        except web.HTTPRequestEntityTooLarge:
            error = too_large(self.server.options.max_request_body_bytes)
            call.fail(error)
            return error_response(error)
        except asyncio.CancelledError:  # the client went away
            call.status = grpc.StatusCode.CANCELLED.name
            raise
        except Exception as exc:
            return error_response(self.server.internal_error(call, exc))
        finally:
            self.server.finish(call)

    async def _answer(self, call: Call, request: web.BaseRequest, name: str, version: int | None, label: str | None,
                      action: str) -> web.Response:
        if action == "":
            return _json(proto_json(model_status_response(self.server, name, version, label),
                                    proto_field_names=False).encode())
        if action == "/metadata":
            servable = self.server.resolve(name, version, label)
            call.version = servable.version
            return _json(metadata_json(servable), version=servable.version)
        body = await self._read_body(call, request)
        document = await self.server.off_loop(call, json_codec.parse_body, body)
        servable = self.server.resolve(name, version, label,
                                       route_key(self.server.traffic, name, request.headers))  # sticky split
        call.version = servable.version
        if call.api == "predict":
            payload, prediction_id = await self._predict(call, servable, document)
            return _json(payload, version=servable.version, prediction_id=prediction_id)
        return _json(await self._classify_or_regress(call, servable, document), version=servable.version)

    async def _read_body(self, call: Call, request: web.BaseRequest) -> bytes:
        """The body, read within --rest_api_timeout_in_ms (TF Serving's HTTP server times out the whole call):
        a client that sends it too slowly gets 408 and gives its admission share back."""
        timeout = self._timeout_ms()
        try:
            if request.content.is_eof():  # all of it is here already (small bodies usually are): read at once
                body = await request.read()  # (past the body limit: HTTPRequestEntityTooLarge, answered 413)
                self.server.admission.grow(call, len(body))
                return body
            read = self._read_arriving(call, request)
            return await (asyncio.wait_for(read, timeout / 1000) if timeout else read)
        except asyncio.TimeoutError:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, f"The request body did not arrive within "
                               f"{timeout} ms (--rest_api_timeout_in_ms)", http_status=408) from None
        except ConnectionError:  # the client went away mid-body: its call, not a server fault
            raise ServingError(grpc.StatusCode.CANCELLED, "The client closed the connection before its body "
                               "arrived") from None
        except web.RequestPayloadError as exc:  # e.g. a Content-Encoding its bytes are not in, a bad chunk
            raise invalid_argument(f"The request body could not be read: {' '.join(str(exc).split())}") from None

    async def _read_arriving(self, call: Call, request: web.BaseRequest) -> bytes:
        """The body, charged to admission as it arrives, whether its length was declared or not (chunked):
        charged at what it may reach, four stalled uploads would hold the whole byte budget (every other call
        refused) until they timed out."""
        limit, parts = self.server.options.max_request_body_bytes, []
        async for chunk in request.content.iter_any():
            if call.nbytes + len(chunk) > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=call.nbytes + len(chunk))
            self.server.admission.grow(call, len(chunk))
            parts.append(chunk)
        return b"".join(parts)

    def _decode_predict(self, servable, document: dict) -> tuple[str, dict, str]:
        signature = json_codec.signature_name(document)
        inputs, request_format = json_codec.decode_predict(document, servable.input_dtypes(signature),
                                                           signature)
        self.server.quality.check_inputs(servable.model_name, inputs)
        return signature, inputs, request_format

    async def _predict(self, call: Call, servable, document: dict) -> tuple[bytes, str | None]:
        signature, inputs, request_format = await self.server.off_loop(call, self._decode_predict, servable,
                                                                       document)
        started = time.perf_counter()
        try:
            outputs = await self.server.predict(call, servable, signature, inputs, (), self._timeout_ms())
        except ModelRunError as exc:
            raise exc.for_request(inputs) from None
        self.server.shadow.offer(servable, signature, inputs, outputs, time.perf_counter() - started)  # shadow.py
        prediction_id = self.server.quality.record_predictions(servable.model_name, servable.version, outputs)
        return await self.server.off_loop(call, json_codec.encode_predict, outputs, request_format), prediction_id

    async def feedback(self, request: web.BaseRequest, name: str) -> web.Response:
        """Ground-truth labels for logged predictions (our extension; TF Serving has no such API)."""
        try:
            call = self.server.begin(name, "feedback", "rest", declared=request.content_length or 0)
        except ServingError as exc:
            return error_response(exc)
        return await self._run(call, self._feedback(call, request, name))

    async def _feedback(self, call: Call, request: web.BaseRequest, name: str) -> web.Response:
        self.server.model(name)
        # Strings here are ids and labels, not tensors: bytes that are not UTF-8 stay a parse error.
        body = await self._read_body(call, request)
        document = await self.server.off_loop(call, json_codec.parse_body, body, False)
        return _json(orjson.dumps(await self.server.feedback(name, parse_feedback(document))))

    async def monitoring(self, request: web.BaseRequest, name: str) -> web.Response:
        """Per version: labels, the rolling predicted-class histogram and live accuracy (our extension)."""
        try:
            model = self.server.model(name)
            versions, shadow = await self.server.monitoring(name)
        except ServingError as exc:
            return error_response(exc)
        labels: dict[str, list[str]] = {}
        for label, version in model.labels().items():
            labels.setdefault(str(version), []).append(label)
        for version in model.available_versions():
            versions.setdefault(str(version), self.server.quality.empty_version())
        for version, entry in versions.items():
            entry["labels"] = sorted(labels.get(version, []))
        return _json(orjson.dumps({"model": name, "versions": versions,
                                   "traffic": self.server.traffic.for_model(name) or {},
                                   "shadow": shadow}))

    def _timeout_ms(self) -> int | None:
        return self.server.options.rest_api_timeout_in_ms or None

    async def _classify_or_regress(self, call: Call, servable, document: dict) -> bytes:
        signature = json_codec.signature_name(document)
        examples = await self.server.off_loop(call, json_codec.decode_examples, document)
        if call.api == "classify":
            result = await asyncio.wrap_future(self.server.run("rest", servable.classify, signature, examples,
                                                               self._timeout_ms()))
            return json_codec.encode_classification(result.classes, result.scores, len(examples))
        if call.api == "regress":
            values = await asyncio.wrap_future(self.server.run("rest", servable.regress, signature, examples,
                                                               self._timeout_ms()))
            return json_codec.encode_regression(values)
        raise invalid_argument(f"unknown method {call.api}")
