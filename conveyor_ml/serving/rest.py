"""TF Serving's REST API (same URLs, JSON and error bodies) on aiohttp, plus health and metrics endpoints.

Liveness: `GET /healthz` answers 200 while the server's event loop runs. Readiness: `GET /readyz` answers
200 once every configured model has a version available, else 503 naming what each model waits for.
Predict, Classify and Regress are bounded by --rest_api_timeout_in_ms (TF Serving's meaning: the model run,
not the request parsing); past it the answer is 504 with TF Serving's error body.
"""
from __future__ import annotations

import asyncio
import re
import time

import orjson
from aiohttp import web
from google.protobuf import json_format

from conveyor_ml.serving import json_codec
from conveyor_ml.serving.errors import ModelRunError, ServingError, invalid_argument
from conveyor_ml.serving.grpc_service import model_status_response, signature_def_map
from conveyor_ml.serving.model_quality import parse_feedback
from conveyor_ml.serving.model_server import ModelServer
from conveyor_ml.serving.routing import route_key

# TF Serving's own URL grammar (http_rest_api_handler.cc), so a malformed path fails the same way.
MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<action>/metadata|:predict|:classify|:regress)?$")
VERSION_HEADER = "X-Model-Version"
PREDICTION_ID_HEADER = "X-Prediction-Id"  # our extension: the id to send ground truth for (feedback)
JSON = "application/json"
CORS_HEADERS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, GET",
                "Access-Control-Allow-Headers": "Content-Type"}


def _json(body: bytes, status: int = 200, version: int | None = None, prediction_id: str | None = None) -> web.Response:
    headers = {VERSION_HEADER: str(version)} if version is not None else {}
    if prediction_id:
        headers[PREDICTION_ID_HEADER] = prediction_id
    return web.Response(body=body, status=status, content_type=JSON, headers=headers or None)


def error_response(error: ServingError) -> web.Response:
    return _json(orjson.dumps({"error": error.message}), status=error.http_status)


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

    def app(self) -> web.Application:
        middlewares = [self._errors] + ([self._cors] if self.server.options.rest_api_enable_cors_support else [])
        app = web.Application(client_max_size=self.server.options.max_request_body_bytes, middlewares=middlewares)
        # Our extensions first: the generic route below would take their paths.
        app.router.add_post("/v1/models/{name}/feedback", self.feedback)
        app.router.add_get("/v1/models/{name}/monitoring", self.monitoring)
        app.router.add_route("GET", "/v1/models/{tail:.*}", self.handle_model)
        app.router.add_route("POST", "/v1/models/{tail:.*}", self.handle_model)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        if self.server.options.prometheus_path:
            app.router.add_get(self.server.options.prometheus_path, self.metrics)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            limit = self.server.options.max_request_body_bytes
            return _json(orjson.dumps({"error": f"Request body too large: the limit is {limit} bytes "
                                                "(--max_request_body_bytes)"}), status=413)
        except web.HTTPException as exc:
            if exc.status == 404:
                return _json(orjson.dumps({"error": f"Malformed request: {request.method} {request.path}"}),
                             status=404)
            raise

    @web.middleware
    async def _cors(self, request: web.Request, handler):
        """--rest_api_enable_cors_support: TF Serving's CORS headers, and its preflight answer."""
        if request.method == "OPTIONS":
            if not re.match(r"^https?://", request.headers.get("Origin", "")):
                return _json(orjson.dumps({"error": "Origin header is missing in CORS preflight"}), status=400)
            return web.Response(status=200, headers=CORS_HEADERS)
        response = await handler(request)
        response.headers.update(CORS_HEADERS)
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return _json(b'{"status": "alive"}')

    async def readyz(self, request: web.Request) -> web.Response:
        waiting = self.server.readiness()
        ready = bool(self.server.registry.models()) and not waiting
        body = {"ready": ready}
        if waiting:
            body["waiting"] = waiting
        return _json(orjson.dumps(body), status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.server.metrics.exposition(),
                            content_type="text/plain", charset="utf-8")

    async def handle_model(self, request: web.Request) -> web.Response:
        match = MODEL_PATH.match(request.path)
        action = match and (match.group("action") or "")
        is_post = request.method == "POST"
        if not match or is_post != action.startswith(":"):
            # INVALID_ARGUMENT, as TF Serving answers a /v1/ path it cannot parse.
            return _json(orjson.dumps({"error": f"Malformed request: {request.method} {request.path}"}), status=400)
        name, label = match.group("name"), match.group("label")
        version = int(match.group("version")) if match.group("version") else None
        api = action.lstrip(":/") or "status"
        started = time.perf_counter()
        served_version, error = None, None
        try:
            if action == "":
                return _json(proto_json(model_status_response(self.server, name, version, label),
                                        proto_field_names=False).encode())
            if action == "/metadata":
                servable = self.server.resolve(name, version, label)
                served_version = servable.version
                return _json(metadata_json(servable), version=served_version)
            body = await request.read()
            document = json_codec.parse_body(body)
            servable = self.server.resolve(name, version, label,
                                           route_key(self.server.traffic, name, request.headers))  # sticky split
            served_version = servable.version
            prediction_id = None
            if api == "predict":
                payload, prediction_id = await self._predict(servable, document)
            else:
                payload = await self._classify_or_regress(servable, document, api)
            return _json(payload, version=served_version, prediction_id=prediction_id)
        except ServingError as exc:
            error = exc
            return error_response(exc)
        finally:
            self.server.observe(name, served_version, api, "rest", error, time.perf_counter() - started)

    async def _predict(self, servable, document: dict) -> tuple[bytes, str | None]:
        signature = json_codec.signature_name(document)
        inputs, request_format = json_codec.decode_predict(document, servable.input_dtypes(signature))
        self.server.quality.check_inputs(servable.model_name, inputs)
        started = time.perf_counter()
        try:
            outputs = await asyncio.wrap_future(self.server.predict_future(servable, signature, inputs, (), "rest",
                                                                           self._timeout_ms()))
        except ModelRunError as exc:
            raise exc.for_request(inputs) from None
        self.server.shadow.offer(servable, signature, inputs, outputs, time.perf_counter() - started)  # shadow.py
        prediction_id = self.server.quality.record_predictions(servable.model_name, servable.version, outputs)
        return json_codec.encode_predict(outputs, request_format), prediction_id

    async def feedback(self, request: web.Request) -> web.Response:
        """Ground-truth labels for logged predictions (our extension; TF Serving has no such API)."""
        name = request.match_info["name"]
        try:
            self.server.model(name)
            entries = parse_feedback(json_codec.parse_body(await request.read()))
            return _json(orjson.dumps(self.server.quality.feedback(name, entries)))
        except ServingError as exc:
            return error_response(exc)

    async def monitoring(self, request: web.Request) -> web.Response:
        """Per version: labels, the rolling predicted-class histogram and live accuracy (our extension)."""
        name = request.match_info["name"]
        try:
            model = self.server.model(name)
        except ServingError as exc:
            return error_response(exc)
        labels: dict[str, list[str]] = {}
        for label, version in model.labels().items():
            labels.setdefault(str(version), []).append(label)
        versions = self.server.quality.snapshot(name)
        for version in model.available_versions():
            versions.setdefault(str(version), self.server.quality.empty_version())
        for version, entry in versions.items():
            entry["labels"] = sorted(labels.get(version, []))
        return _json(orjson.dumps({"model": name, "versions": versions,
                                   "traffic": self.server.traffic.for_model(name) or {},
                                   "shadow": self.server.shadow.snapshot(name)}))

    def _timeout_ms(self) -> int | None:
        return self.server.options.rest_api_timeout_in_ms or None

    async def _classify_or_regress(self, servable, document: dict, api: str) -> bytes:
        signature = json_codec.signature_name(document)
        examples = json_codec.decode_examples(document)
        if api == "classify":
            result = await asyncio.wrap_future(self.server.run("rest", servable.classify, signature, examples,
                                                               self._timeout_ms()))
            return json_codec.encode_classification(result.classes, result.scores, len(examples))
        if api == "regress":
            values = await asyncio.wrap_future(self.server.run("rest", servable.regress, signature, examples,
                                                               self._timeout_ms()))
            return json_codec.encode_regression(values)
        raise invalid_argument(f"unknown method {api}")
