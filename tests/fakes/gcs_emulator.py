"""gcp-storage-emulator (a pure-Python Cloud Storage API server) as a child process on 127.0.0.1,
plus a fault-injecting HTTP proxy in front of it for the failures the emulator cannot produce."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conveyor_ml.base.ports import free_port


class StorageEmulator:
    def __init__(self):
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StorageEmulator:
        executable = Path(sys.executable).with_name("gcp-storage-emulator")
        self.process = subprocess.Popen(
            [str(executable), "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                connection.request("GET", "/storage/v1/b?project=probe")
                connection.getresponse().read()
                return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("gcp-storage-emulator exited at start") from None
                time.sleep(0.1)
        raise RuntimeError("gcp-storage-emulator did not answer in 30 s")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)


class FaultyProxy:
    """Forwards HTTP to `target`; requests whose method and path (query included) match a rule get its status
    instead (with `Retry-After` when given), `times` times (None: always). `misbehave` rules do worse:
    reset       read the request (an upload's bytes), then reset the connection (RST) without answering
    slow        wait `seconds`, then forward
    huge        answer 200 with a `size`-byte JSON body, streamed (the rule's `sent` counts what got out)
    endless     answer 200 and dribble body bytes until the client hangs up (or the proxy stops)
    A resumable upload that lost its session is `fail("PUT", "upload_id", 404)` (or 410). The Host header is
    forwarded, so the emulator's resumable-session URLs point back at the proxy."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.rules: list[list] = []  # [method, path_contains, status, times, retry_after]
        self.misbehaviours: list[dict] = []
        self.stopping = threading.Event()
        self.failed = 0
        self.paths: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, method: str, path_contains: str, status: int, times: int | None = None,
             retry_after: str | None = None) -> None:
        self.rules.append([method, path_contains, status, times, retry_after])

    def misbehave(self, method: str, path_contains: str, mode: str, times: int | None = None, *,
                  seconds: float = 0.0, size: int = 100 * 1024 * 1024) -> dict:
        rule = {"method": method, "path_contains": path_contains, "mode": mode, "times": times,
                "seconds": seconds, "size": size, "sent": 0}
        self.misbehaviours.append(rule)
        return rule

    def _misbehaviour(self, method: str, path: str) -> dict | None:
        for rule in self.misbehaviours:
            if rule["method"] == method and rule["path_contains"] in path and rule["times"] != 0:
                if rule["times"] is not None:
                    rule["times"] -= 1
                return rule
        return None

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def _matching_rule(self, method: str, path: str):
        for rule in self.rules:
            if rule[0] == method and rule[1] in path and rule[3] != 0:
                if rule[3] is not None:
                    rule[3] -= 1
                return rule
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.paths.append((self.command, self.path.split("?")[0]))
                bad = proxy._misbehaviour(self.command, self.path)
                if bad and bad["mode"] == "slow":
                    time.sleep(bad["seconds"])
                elif bad:
                    proxy.failed += 1
                    self._misbehave(bad)
                    return
                rule = proxy._matching_rule(self.command, self.path)
                if rule:
                    proxy.failed += 1
                    payload = (b'{"error": {"code": %d, "message": "injected by the test proxy"}}' % rule[2])
                    self.send_response(rule[2])
                    if rule[4] is not None:
                        self.send_header("Retry-After", rule[4])
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                connection.close()

            def _misbehave(self, rule: dict) -> None:
                self.close_connection = True
                if rule["mode"] == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if rule["mode"] == "huge":
                    self.send_header("Content-Length", str(rule["size"]))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                block = b" " * 65536
                deadline = time.monotonic() + 120
                try:
                    while not proxy.stopping.is_set() and time.monotonic() < deadline:
                        if rule["mode"] == "huge":
                            if rule["sent"] >= rule["size"]:
                                return
                            chunk = block[:rule["size"] - rule["sent"]]
                        else:
                            chunk = b" "
                            time.sleep(0.05)
                        self.wfile.write(chunk)
                        rule["sent"] += len(chunk)
                except OSError:
                    return  # the client hung up

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        return Handler
