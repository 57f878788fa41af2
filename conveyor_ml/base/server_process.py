"""`conveyor serve` as a child process on free local ports: for the InfraValidator, tests and benchmarks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from conveyor_ml.base.ports import free_port
from conveyor_ml.base.process_lifetime import child_environment, owned_scratch_prefix, remove_orphaned_scratch

LOG_PREFIX = "conveyor-serve-log-"  # the server's output, in the temporary directory
KEPT_LOG_BYTES = 64 * 1024  # how much of the server's output stays readable after stop() removed its file


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """Starts `conveyor serve <args>` on 127.0.0.1 with free REST and gRPC ports; stops it by PID."""

    def __init__(self, *serve_args: str, env: dict | None = None):
        self.rest_port, self.grpc_port = free_port(), free_port()
        remove_orphaned_scratch(LOG_PREFIX)  # logs of servers whose starter was killed before removing them
        self.log_path = Path(tempfile.mkstemp(prefix=owned_scratch_prefix(LOG_PREFIX), suffix=".log")[1])
        argv = [sys.executable, "-m", "conveyor_ml.cli", "serve", *serve_args,
                "--port", str(self.grpc_port), "--rest_api_port", str(self.rest_port)]
        self._log = open(self.log_path, "wb")
        self._kept_log: str | None = None  # the log's end, kept once stop() has removed the file
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            # The server stops when this process dies, even by SIGKILL: no orphan is left serving.
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore", **child_environment(),
                 **(env or {})})

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_text(self) -> str:
        """What the server printed (after stop(), its last KEPT_LOG_BYTES)."""
        if self._kept_log is not None:
            return self._kept_log
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_available(self, model: str, timeout: float = 120.0, version: int | None = None) -> None:
        """Until the model (or that version) reports AVAILABLE; raises with the server's log if it cannot."""
        deadline = time.monotonic() + timeout
        url = f"{self.rest_url}/v1/models/{model}"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    statuses = json.loads(response.read())["model_version_status"]
                wanted = [s for s in statuses if version is None or int(s["version"]) == version]
                if any(s["state"] == "AVAILABLE" for s in wanted):
                    return
                failed = [s["status"]["error_message"] for s in wanted
                          if s["state"] == "END" and s["status"]["error_message"]]
                if wanted and len(failed) == len(wanted):
                    raise ServerStartError(f"model {model} failed to load: {failed[0]}")
            except (urllib.error.URLError, ConnectionError, OSError, KeyError, ValueError):
                pass
            time.sleep(0.2)
        raise ServerStartError(f"model {model} not AVAILABLE within {timeout:.0f}s:\n{self.log_tail()}")

    def wait_listening(self, timeout: float = 120.0) -> None:
        """Until the server printed its start-up line: every server process (--server_processes) listens
        then, where a model turns AVAILABLE as soon as the first process has loaded it."""
        deadline = time.monotonic() + timeout
        while "conveyor serve: " not in self.log_text():
            if self.process.poll() is not None:
                raise ServerStartError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"the server did not listen within {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (graceful), then SIGKILL; returns the exit code."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        if self._kept_log is None:  # the temporary file goes; its end stays readable (log_tail) for errors
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - KEPT_LOG_BYTES))
                self._kept_log = log.read().decode(errors="replace")
            self.log_path.unlink(missing_ok=True)
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
