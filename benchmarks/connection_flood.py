"""Connection floods against `conveyor serve`: 20,000 connections that send half a request line (REST) or
nothing (gRPC) and stall, from two client processes, against the server with its default connection bounds and
with them lifted (what it did before they existed: no bound, connections idle for an hour). During each
flood: the descriptors the server holds, its resident memory, how a client's REST and gRPC calls are
answered, how long a version pushed meanwhile takes to become available, and how often the server could not
open a file. Writes its section of benchmarks/results/reliability.md and benchmarks/results/reliability-
connections.json.

Run: .venv/bin/python -m benchmarks.connection_flood   (after `make pipeline`, for the model: ~3 minutes here)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import requests
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from benchmarks.common import machine, write_reliability_section
from conveyor_ml.base.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- connections: start -->", "<!-- connections: end -->"
FLOOD = 20_000  # connection attempts, half from each of two client processes (each has its own descriptors)
PROBES = 10  # client calls during each flood, per protocol (each waits at most 5 s)
UNBOUNDED = ["--max_connections", "1000000", "--idle_connection_timeout_in_ms", "3630000"]
# Run by each client process: opens its share of connections, sends `first` on each, holds them until stdin
# closes, and prints how many it holds and how many the server closed within a second.
HOLDER = r"""
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, count, first = int(sys.argv[1]), int(sys.argv[2]), bytes.fromhex(sys.argv[3])
held, refused = [], 0
for _ in range(count):
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if first:
            sock.sendall(first)
        held.append(sock)
    except OSError:
        refused += 1
time.sleep(1)
closed = 0
for sock in held:  # closed by the server, after whatever it sent first (a 503; gRPC's HTTP/2 settings)
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        closed += 1
    except BlockingIOError:
        pass
    except OSError:
        closed += 1
print(len(held), refused, closed, flush=True)
sys.stdin.read()
"""
FIRST_BYTES = {"REST": b"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\n", "gRPC": b""}


def proc_status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def probe_rest(url: str) -> tuple[str, float]:
    started = time.perf_counter()
    try:
        status = str(requests.get(f"{url}/v1/models/mnist", timeout=5).status_code)
    except requests.RequestException as exc:
        status = type(exc).__name__
    return status, (time.perf_counter() - started) * 1000


def probe_grpc(target: str) -> tuple[str, float]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "mnist"
    started = time.perf_counter()
    with grpc.insecure_channel(target) as channel:  # a new client: a new connection
        try:
            model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=5)
            status = "OK"
        except grpc.RpcError as exc:
            status = exc.code().name
    return status, (time.perf_counter() - started) * 1000


def summary(probes: list[tuple[str, float]]) -> dict:
    statuses: dict[str, int] = {}
    for status, _ in probes:
        statuses[status] = statuses.get(status, 0) + 1
    return {"answers": statuses, "median_ms": statistics.median(ms for _, ms in probes),
            "max_ms": max(ms for _, ms in probes)}


def version_available(url: str, version: int, timeout: float) -> float | None:
    """Seconds until `version` is AVAILABLE (None: not within `timeout`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            states = requests.get(f"{url}/v1/models/mnist", timeout=5).json()["model_version_status"]
            if any(int(s["version"]) == version and s["state"] == "AVAILABLE" for s in states):
                return time.monotonic() - started
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(0.1)
    return None


def flood(server: ServerProcess, base: Path, export: Path, listener: str, version: int) -> dict:
    port = server.rest_port if listener == "REST" else server.grpc_port
    rss_before, fds_before = proc_status_mb(server.pid, "VmRSS"), descriptors(server.pid)
    errors_before = server.log_text().count("Too many open files")
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(port), str(FLOOD // 2), FIRST_BYTES[listener].hex()],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    started = time.monotonic()
    try:
        counts = [[int(value) for value in holder.stdout.readline().split()] for holder in holders]
        opened_s = time.monotonic() - started - 1
        rss, fds = proc_status_mb(server.pid, "VmRSS"), descriptors(server.pid)
        rest = summary([probe_rest(server.rest_url) for _ in range(PROBES)])
        grpc_probes = summary([probe_grpc(server.grpc_target) for _ in range(PROBES)])
        staging = base / f".staging-{version}"  # a new version, while the flood holds on: whole when it appears
        shutil.copytree(export, staging)
        staging.rename(base / str(version))
        loaded_s = version_available(server.rest_url, version, timeout=30)
    finally:
        for holder in holders:
            holder.stdin.close()
            holder.wait(timeout=60)
    return {"listener": listener, "attempts": FLOOD, "opened_s": opened_s,
            "held_by_clients": sum(c[0] for c in counts), "refused_at_connect": sum(c[1] for c in counts),
            "closed_by_server_within_1s": sum(c[2] for c in counts), "server_descriptors": [fds_before, fds],
            "rss_mb": [rss_before, rss], "rest": rest, "grpc": grpc_probes, "new_version_available_s": loaded_s,
            "cannot_open_file_errors": server.log_text().count("Too many open files") - errors_before}


def run(export: Path) -> list[dict]:
    results = []
    for setting, flags in (("default bounds", []), ("no bounds (as before)", UNBOUNDED)):
        with tempfile.TemporaryDirectory() as scratch:
            base = Path(scratch) / "mnist"
            shutil.copytree(export, base / "1")
            with ServerProcess("--model_name", "mnist", "--model_base_path", str(base), *flags) as server:
                server.wait_available("mnist")
                bound = re.search(r"connections: at most (\d+) per listener.*open-file limit (\d+)", server.log_text())
                for version, listener in enumerate(("REST", "gRPC"), start=2):
                    figures = flood(server, base, export, listener, version)
                    figures.update(setting=setting, max_connections=int(bound.group(1)),
                                   open_file_limit=int(bound.group(2)))
                    print(json.dumps(figures), flush=True)
                    results.append(figures)
                    time.sleep(2)  # the server notices the closed connections
    return results


def _answers(probe: dict) -> str:
    answers = ", ".join(f"{status} {count}" for status, count in sorted(probe["answers"].items()))
    return f"{answers}; median {probe['median_ms']:.0f} ms, slowest {probe['max_ms']:.0f} ms"


def section(results: list[dict]) -> str:
    info = machine()
    first = results[0]
    lines = [START, "## The model server under connection floods", "",
             f"{info['date']}, {info['cores']} cores ({info['cpu']}); the server's open-file limit "
             f"{first['open_file_limit']:,}, so at most {first['max_connections']:,} connections per listener by "
             f"default. Each flood: {FLOOD:,} connections from two client processes, each sending half a REST "
             "request line (or, to gRPC, nothing) and holding on; meanwhile "
             f"{PROBES} new REST clients and {PROBES} new gRPC clients each make one call, and a new version "
             "is pushed. \"No bounds\" is the server before connections were bounded: "
             f"`{' '.join(UNBOUNDED)}`. Source: `python -m benchmarks.connection_flood`.", "",
             "| bounds | flooded | connections the server closed at once | server descriptors | resident memory "
             "| new REST clients | new gRPC clients | new version available after | could not open a file |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results:
        loaded = f"{row['new_version_available_s']:.1f} s" if row["new_version_available_s"] is not None else \
            "not within 30 s"
        lines.append(
            f"| {row['setting']} | {row['listener']} | {row['closed_by_server_within_1s']:,} of "
            f"{row['held_by_clients']:,} | {row['server_descriptors'][0]:,} → {row['server_descriptors'][1]:,} | "
            f"{row['rss_mb'][0]:.0f} → {row['rss_mb'][1]:.0f} MB | {_answers(row['rest'])} | "
            f"{_answers(row['grpc'])} | {loaded} | {row['cannot_open_file_errors']} times |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(ROOT / "workspace" / "serving" / "mnist"),
                        help="a served model's base path (make pipeline pushes one); its newest version is used")
    args = parser.parse_args(argv)
    versions = sorted((path for path in Path(args.model_dir).glob("[0-9]*") if path.is_dir()), key=lambda p: int(p.name))
    if not versions:
        print(f"benchmarks.connection_flood: no model version under {args.model_dir}; run `make pipeline` first",
              file=sys.stderr)
        return 2
    results = run(versions[-1])
    write_reliability_section(START, END, section(results), "connections", {"flood": FLOOD, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
