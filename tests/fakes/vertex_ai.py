"""A fake of the few Vertex AI REST methods Conveyor calls, on 127.0.0.1, for the real client to talk to.

It answers with the documented JSON shapes (long-running operations included), enforces the rules the real
service enforces that our code relies on (a traffic split sums to 100; a model with traffic cannot be
undeployed; an alias lives on one version of a model), records every request, and can be told to fail
(`fail`) or to misbehave at the HTTP level (`misbehave`: Retry-After, resets, slow, huge or endless bodies,
malformed JSON, operations that never finish or finish with an error). By default it does neither.
"""
from __future__ import annotations

import itertools
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

STATUS_NAMES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 409: "ALREADY_EXISTS",
                429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
TYPE = "type.googleapis.com/google.cloud.aiplatform.v1."
# An operation's error is a google.rpc.Status: gRPC codes.
GRPC_CODES = {400: 3, 403: 7, 404: 5, 409: 6, 429: 8, 500: 13, 503: 14}
HTTP_MODES = ("status", "reset", "slow", "huge", "endless", "malformed", "wrong_shape")
OPERATION_MODES = ("pending", "op_error")


@dataclass
class Failure:
    path_contains: str
    status: int
    times: int | None  # None: every time


@dataclass
class Misbehaviour:
    """What the fake does instead of answering normally, for requests whose path contains `path_contains`
    (and whose method is `method`, if given), `times` times (None: every time). Modes:
    status      answer `status` (with `Retry-After: retry_after` when given), doing nothing
    reset       read the request, then reset the connection (RST) without answering, doing nothing
    slow        wait `seconds`, then answer normally
    huge        answer 200 with a `size`-byte JSON body, streamed (counts what it managed to send)
    endless     answer 200 and dribble body bytes until the client hangs up (or the fake stops)
    malformed   answer 200 with a body that is not JSON
    wrong_shape answer 200 with JSON of the wrong shape (`body`, default a list)
    pending     a write answers a long-running operation that never finishes (and never acts)
    op_error    a write answers a long-running operation that finished with error `status` (did nothing)
    """
    path_contains: str
    mode: str
    times: int | None = None
    method: str | None = None
    status: int = 503
    retry_after: str | None = None
    seconds: float = 0.0
    size: int = 100 * 1024 * 1024
    body: object = field(default_factory=lambda: [1, 2, 3])
    sent: int = 0  # body bytes the fake wrote before the client stopped reading (huge, endless)


@dataclass
class Recorded:
    method: str
    path: str
    body: dict
    status: int = 0


@dataclass
class FakeVertexState:
    models: dict = field(default_factory=dict)  # model name -> {"displayName", "versions": [model json]}
    endpoints: dict = field(default_factory=dict)  # endpoint name -> endpoint json
    operations: dict = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    hang_on: str | None = None  # a request whose path contains this is held, then failed without effect
    misbehaviours: list[Misbehaviour] = field(default_factory=list)


class VertexError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class FakeVertexAI:
    def __init__(self):
        self.state = FakeVertexState()
        self.ids = itertools.count(1001)
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.hung = threading.Event()  # set when a request matching hang_on arrived
        self.released = threading.Event()
        self.stopping = threading.Event()  # ends endless bodies
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeVertexAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def fail(self, path_contains: str, status: int, times: int | None = None) -> None:
        self.state.failures.append(Failure(path_contains, status, times))

    def misbehave(self, path_contains: str, mode: str, times: int | None = None, **options) -> Misbehaviour:
        """See `Misbehaviour`; returns the rule (its `sent` counts the bytes of a huge or endless body)."""
        rule = Misbehaviour(path_contains, mode, times, **options)
        self.state.misbehaviours.append(rule)
        return rule

    def _misbehaviour(self, method: str, path: str, modes: tuple[str, ...]) -> Misbehaviour | None:
        with self.lock:
            for rule in self.state.misbehaviours:
                if (rule.mode in modes and rule.path_contains in path and rule.times != 0
                        and rule.method in (None, method)):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return None

    def hang(self, path_contains: str) -> None:
        """Hold the next matching request until `release()`, then fail it with 503 without acting on it:
        a client killed meanwhile never learns what became of it (nor does anything happen)."""
        self.state.hang_on = path_contains

    def release(self) -> None:
        self.state.hang_on = None
        self.released.set()

    def calls(self, contains: str = "") -> list[Recorded]:
        return [r for r in self.state.requests if contains in r.path]

    def endpoint(self, display_name: str) -> dict | None:
        return next((e for e in self.state.endpoints.values() if e["displayName"] == display_name), None)

    def model(self, display_name: str) -> dict | None:
        return next((m for m in self.state.models.values() if m["displayName"] == display_name), None)

    # -- request handling ------------------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _serve(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                parts = urlsplit(self.path)
                record = Recorded(method, unquote(parts.path), body)
                rule = fake._misbehaviour(method, record.path, HTTP_MODES)
                if rule and rule.mode == "slow":
                    time.sleep(rule.seconds)
                elif rule:
                    with fake.lock:
                        fake.state.requests.append(record)
                    self._misbehave(rule, record)
                    return
                if fake.state.hang_on and fake.state.hang_on in record.path:
                    fake.hung.set()
                    fake.released.wait(timeout=120)
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with fake.lock:
                    fake.state.requests.append(record)
                    try:
                        status, answer = 200, fake._route(method, record.path, parse_qs(parts.query), body)
                    except VertexError as exc:
                        status = exc.status
                        answer = {"error": {"code": exc.status, "message": exc.message,
                                            "status": STATUS_NAMES.get(exc.status, "UNKNOWN")}}
                record.status = status
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _misbehave(self, rule: Misbehaviour, record: Recorded) -> None:
                self.close_connection = True
                if rule.mode == "reset":
                    record.status = -1
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    return
                if rule.mode == "status":
                    record.status = rule.status
                    error = {"code": rule.status, "message": f"injected {rule.status}",
                             "status": STATUS_NAMES.get(rule.status, "UNKNOWN")}
                    payload = json.dumps({"error": error}).encode()
                    self.send_response(rule.status)
                    if rule.retry_after is not None:
                        self.send_header("Retry-After", rule.retry_after)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                record.status = 200
                if rule.mode in ("malformed", "wrong_shape"):
                    payload = (b'{"name": "projects/' if rule.mode == "malformed"
                               else json.dumps(rule.body).encode())
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if rule.mode == "huge":
                    self.send_header("Content-Length", str(rule.size))
                self.end_headers()
                block = b" " * 65536
                deadline = time.monotonic() + 120
                try:
                    while not fake.stopping.is_set() and time.monotonic() < deadline:
                        if rule.mode == "huge":
                            if rule.sent >= rule.size:
                                return
                            chunk = block[:rule.size - rule.sent]
                        else:
                            chunk = b" "
                            time.sleep(0.05)
                        self.wfile.write(chunk)
                        rule.sent += len(chunk)
                except OSError:
                    return  # the client hung up: what it read is bounded by `sent`

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_PATCH(self):
                self._serve("PATCH")

        return Handler

    def _injected_failure(self, path: str) -> None:
        for failure in self.state.failures:
            if failure.path_contains in path and failure.times != 0:
                if failure.times is not None:
                    failure.times -= 1
                raise VertexError(failure.status, f"injected {failure.status} for {path}")

    def _route(self, method: str, path: str, query: dict, body: dict) -> dict:
        self._injected_failure(path)
        if path.startswith("/ui/projects/") and "/operations/" in path:  # where the REST client polls them
            path = "/v1/" + path[len("/ui/"):]
        if not path.startswith("/v1/projects/"):
            raise VertexError(404, f"unknown path {path}")
        resource, _, verb = path[len("/v1/"):].partition(":")
        pieces = resource.split("/")
        location = "/".join(pieces[:4])
        if method != "GET":
            rule = self._misbehaviour(method, path, OPERATION_MODES)
            if rule:  # an operation that never finishes, or fails: either way nothing happened
                name = f"{location}/operations/{next(self.ids)}"
                operation = {"name": name, "done": False}
                if rule.mode == "op_error":
                    error = {"code": GRPC_CODES.get(rule.status, 2),
                             "message": f"injected operation error {rule.status}"}
                    operation = {"name": name, "done": True, "error": error}
                self.state.operations[name] = operation
                return operation
        if pieces[4:5] == ["operations"] and method == "GET":
            if resource not in self.state.operations:
                raise VertexError(404, f"Operation {resource} not found")
            return self.state.operations[resource]
        if pieces[4:] == ["models"] and method == "GET":
            return {"models": self._filtered(self._latest_models(), query)}
        if pieces[4:] == ["models"] and verb == "upload":
            return self._upload(location, body)
        if pieces[4:5] == ["models"] and verb == "mergeVersionAliases":
            return self._merge_aliases(resource, body)
        if pieces[4:] == ["endpoints"] and method == "GET":
            return {"endpoints": self._filtered(list(self.state.endpoints.values()), query)}
        if pieces[4:] == ["endpoints"] and method == "POST":
            name = f"{location}/endpoints/{next(self.ids)}"
            endpoint = {"name": name, "displayName": body["displayName"], "labels": body.get("labels", {}),
                        "deployedModels": [], "trafficSplit": {}}
            self.state.endpoints[name] = endpoint
            return self._operation(location, "Endpoint", endpoint)
        if pieces[4:5] == ["endpoints"] and len(pieces) == 6:
            endpoint = self.state.endpoints.get(resource)
            if endpoint is None:
                raise VertexError(404, f"Endpoint {resource} not found")
            if method == "GET" and not verb:
                return endpoint
            if method == "PATCH":
                self._check_split(endpoint, body.get("trafficSplit", {}))
                endpoint["trafficSplit"] = {k: v for k, v in body["trafficSplit"].items() if v}
                return endpoint
            if verb == "deployModel":
                return self._deploy(location, endpoint, body)
            if verb == "undeployModel":
                return self._undeploy(location, endpoint, body)
        raise VertexError(404, f"no fake for {method} {path}")

    @staticmethod
    def _filtered(items: list[dict], query: dict) -> list[dict]:
        wanted = (query.get("filter") or [""])[0]
        if wanted.startswith("display_name="):
            name = wanted.split("=", 1)[1].strip('"')
            return [item for item in items if item["displayName"] == name]
        return items

    def _latest_models(self) -> list[dict]:
        return [entry["versions"][-1] for entry in self.state.models.values()]

    def _operation(self, location: str, response_type: str, response: dict) -> dict:
        name = f"{location}/operations/{next(self.ids)}"
        operation = {"name": name, "done": True, "response": {"@type": TYPE + response_type, **response}}
        self.state.operations[name] = operation
        return operation

    def _upload(self, location: str, body: dict) -> dict:
        model = body["model"]
        if not model.get("artifactUri", "").startswith("gs://"):
            raise VertexError(400, "artifactUri must be a gs:// URI")
        parent = body.get("parentModel")
        if parent:
            if parent not in self.state.models:
                raise VertexError(404, f"Model {parent} not found")
            name = parent
        else:
            name = f"{location}/models/{next(self.ids)}"
            self.state.models[name] = {"displayName": model["displayName"], "versions": []}
        versions = self.state.models[name]["versions"]
        version_id = str(len(versions) + 1)
        versions.append({**model, "name": name, "versionId": version_id, "versionAliases": [],
                         "versionCreateTime": _now()})
        return self._operation(location, "UploadModelResponse", {"model": name, "modelVersionId": version_id})

    def _merge_aliases(self, resource: str, body: dict) -> dict:
        name, _, version_id = resource.partition("@")
        versions = self.state.models[name]["versions"]
        target = next((v for v in versions if v["versionId"] == version_id), None)
        if target is None:
            raise VertexError(404, f"Model version {resource} not found")
        for alias in body.get("versionAliases", []):
            for version in versions:
                if alias in version["versionAliases"]:
                    version["versionAliases"].remove(alias)
            target["versionAliases"].append(alias)
        return target

    @staticmethod
    def _check_split(endpoint: dict, split: dict, new_id: str | None = None) -> None:
        known = {d["id"] for d in endpoint["deployedModels"]} | ({"0"} if new_id else set())
        unknown = set(split) - known
        if unknown:
            raise VertexError(400, f"traffic split names unknown deployed models {sorted(unknown)}")
        if split and sum(split.values()) != 100:
            raise VertexError(400, f"traffic split must sum to 100, not {sum(split.values())}")

    def _deploy(self, location: str, endpoint: dict, body: dict) -> dict:
        deployed = body["deployedModel"]
        model_name, _, version_id = deployed["model"].partition("@")
        if model_name not in self.state.models:
            raise VertexError(404, f"Model {model_name} not found")
        split = body.get("trafficSplit") or ({"0": 100} if not endpoint["deployedModels"] else {})
        self._check_split(endpoint, split, new_id="0")
        new_id = str(next(self.ids))
        record = {**deployed, "id": new_id, "model": model_name, "modelVersionId": version_id or "1",
                  "createTime": _now()}
        endpoint["deployedModels"].append(record)
        if split:
            endpoint["trafficSplit"] = {(new_id if k == "0" else k): v for k, v in split.items() if v}
        return self._operation(location, "DeployModelResponse", {"deployedModel": record})

    def _undeploy(self, location: str, endpoint: dict, body: dict) -> dict:
        deployed_id = body["deployedModelId"]
        if deployed_id not in {d["id"] for d in endpoint["deployedModels"]}:
            raise VertexError(404, f"deployed model {deployed_id} not found")
        if endpoint["trafficSplit"].get(deployed_id, 0) > 0 and len(endpoint["deployedModels"]) > 1:
            raise VertexError(400, f"deployed model {deployed_id} still receives traffic")
        endpoint["deployedModels"] = [d for d in endpoint["deployedModels"] if d["id"] != deployed_id]
        endpoint["trafficSplit"].pop(deployed_id, None)
        return self._operation(location, "UndeployModelResponse", {})


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
