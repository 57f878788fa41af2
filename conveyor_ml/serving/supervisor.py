"""`conveyor serve --server_processes N`: the process that runs N server processes on the same ports.

Started once server.run has checked the ports are free, it starts the workers (`conveyor serve` again, with the same flags and its
slot in the environment: serving/peers.py), prints the start-up line once every worker listens, and then
only watches: SIGTERM or SIGINT stops every worker (each finishes its requests in flight) and ends with 0;
a worker that dies stops the others and ends with 1, so that whatever restarts the server (systemd, a
Kubernetes pod) starts it whole. It loads no model itself.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conveyor_ml.base.process_lifetime import child_environment, owned_scratch_prefix, remove_orphaned_scratch
from conveyor_ml.serving.peers import WorkerSlot

log = logging.getLogger("conveyor.serving")
POLL_SECONDS = 0.1
CONTROL_PREFIX = "conveyor-serve-control-"  # the workers' control sockets, in the temporary directory
STOP_SECONDS = 15.0  # after SIGTERM a worker gets this long (its own grace included) before SIGKILL


def supervise(options, argv: list[str]) -> int:
    """Runs `options.server_processes` workers of `conveyor <argv>` until a signal (0) or a worker's death (1);
    the caller has checked that no other process listens on their ports (server.run)."""
    stop_signal: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, frame: stop_signal.append(received))
    remove_orphaned_scratch(CONTROL_PREFIX)  # what supervisors killed outright left
    # Mode 0700: only this user reaches the sockets.
    control_dir = tempfile.mkdtemp(prefix=owned_scratch_prefix(CONTROL_PREFIX))
    count = options.server_processes
    workers: list[subprocess.Popen] = []
    try:
        for index in range(count):
            slot = WorkerSlot(index, count, control_dir)
            # A worker stops when the supervisor dies, even by SIGKILL: no worker is left holding the ports.
            environment = {**os.environ, **slot.environment(), **child_environment()}
            workers.append(subprocess.Popen([sys.executable, "-m", "conveyor_ml.cli", *argv], env=environment))
        slot = WorkerSlot(0, count, control_dir)
        ready = [Path(slot.ready_path(index)) for index in range(count)]
        announced = False
        while not stop_signal:
            dead = [(index, worker) for index, worker in enumerate(workers) if worker.poll() is not None]
            if dead:
                index, worker = dead[0]
                print(f"conveyor serve: server process {index} (pid {worker.pid}) exited with status "
                      f"{worker.returncode}; stopping the others", file=sys.stderr, flush=True)
                return 1
            if not announced and all(path.exists() for path in ready):
                print(f"{ready[0].read_text().strip()}  processes: {count}", flush=True)
                announced = True
            time.sleep(POLL_SECONDS)
        return 0
    finally:
        _stop(workers)
        shutil.rmtree(control_dir, ignore_errors=True)


def _stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for worker in workers:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("server process %d did not stop within %.0f s: killed", worker.pid, STOP_SECONDS)
            worker.kill()
            worker.wait()
