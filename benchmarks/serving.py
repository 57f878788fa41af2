"""Serving throughput and latency, measured fairly: `conveyor serve` over REST and gRPC (batching on and off, the
SavedModel and its TFLite float32 variant, one process and one per core), the Flask service users start with
(Werkzeug's development server, and the same app under gunicorn, one worker per core), and from the same run
two ceilings and a floor: the model called in-process at each batch size, the transport (the same HTTP and gRPC
stack answering a fixed response, in one process and in as many as the per-core server), and the minimal
Predict path (that stack, the server's codec and model run and one plain batching thread, none of its
features: benchmarks/minimal_predict.py).

Fairness:
- Load generators are native (wrk for REST, h2load for gRPC) with the same number of client threads (2, or
  1 at concurrency 1) and the same shape of load: `concurrency` connections with one request in flight each.
- Throughput divides answered requests by the duration each tool measured, not by the nominal one.
- Errors count: wrk counts non-2xx answers; h2load sees only HTTP statuses, and gRPC errors travel in
  trailers, so every gRPC run is checked on the server's side too: the OK count of TF Serving's
  `:tensorflow:serving:request_count` series must grow by what h2load counted, anything else is an error.
  Before and after each server's runs a sample of answers (REST and gRPC) is compared with the model's own
  output for the request.
- Every server runs at once, and each round measures every row in turn at one concurrency: the figures a
  ratio compares are taken within a minute of each other (this VM's speed drifts by more than the margins
  between one server's runs and the next's).
- Every request carries one image; batching uses exactly what `make serve` uses (the spec's defaults,
  conveyor_ml/base/spec.py BatchingSettings), and the results say so.
Client and server share this machine's cores, as they do on a laptop; the results record the load average.

Run: make bench (or .venv/bin/python -m benchmarks.serving). Needs a pushed model (make pipeline), wrk, h2load.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import spread, write_results

CONCURRENCY = (1, 8, 32)
TOP = max(CONCURRENCY)
MINIMAL = "minimal Predict path (no server features)"  # benchmarks/minimal_predict.py
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%s]==]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %%d, "errors": %%d, "duration_us": %%d, "p50_us": %%d, '
    .. '"p95_us": %%d, "p99_us": %%d}\\n', summary.requests, e.status + e.connect + e.read + e.write + e.timeout,
    summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def client_threads(concurrency: int) -> int:
    return min(2, concurrency)


def wrk_load(url: str, body: str, concurrency: int, seconds: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % body)
    try:
        out = subprocess.run(["wrk", f"-t{client_threads(concurrency)}", f"-c{concurrency}", f"-d{seconds:g}s",
                              "--timeout", "10s", "-s", script.name, url], capture_output=True, text=True,
                             timeout=seconds + 60)
    finally:
        os.unlink(script.name)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}{out.stderr}")
    raw = json.loads(line[len("WRK_JSON "):])
    ok = raw["requests"] - raw["errors"]
    return {"requests": raw["requests"], "errors": raw["errors"], "qps": ok / (raw["duration_us"] / 1e6),
            "p50_ms": raw["p50_us"] / 1000, "p95_ms": raw["p95_us"] / 1000, "p99_ms": raw["p99_us"] / 1000}


def predict_request(model: str, image_shape):
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.full((1, *image_shape), 7.0, np.float32)))
    return request


def grpc_frame(request) -> bytes:
    """One gRPC message: a 0 compression flag, the big-endian length, then the serialized request."""
    payload = request.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def grpc_ok_count(rest_url: str, model: str) -> float:
    """The server's count of gRPC-and-REST calls answered OK for `model` (TF Serving's series)."""
    with urllib.request.urlopen(f"{rest_url}/monitoring/prometheus/metrics", timeout=30) as response:
        page = response.read().decode()
    series = f':tensorflow:serving:request_count{{model_name="{model}",status="OK"}} '
    pattern = re.compile("^" + re.escape(series) + r"(\S+)$", re.M)
    match = pattern.search(page)
    return float(match.group(1)) if match else 0.0


def h2load_grpc(target: str, frame_file: str, concurrency: int, seconds: float,
                ok_count=None) -> dict:
    """h2load with wrk's shape of load: `concurrency` connections, one stream in flight on each. `ok_count()`
    reads the server's OK count: what h2load saw answered but the server did not count OK is an error."""
    import numpy as np

    before = ok_count() if ok_count else None
    with tempfile.NamedTemporaryFile(suffix=".log", delete=False) as log:
        pass
    try:
        out = subprocess.run(
            ["h2load", "-t", str(client_threads(concurrency)), "-c", str(concurrency), "-m", "1",
             "-D", f"{seconds:g}", "-d", frame_file, "-H", "content-type: application/grpc", "-H", "te: trailers",
             "--log-file", log.name, f"http://{target}/tensorflow.serving.PredictionService/Predict"],
            capture_output=True, text=True, timeout=seconds + 60)
        rows = [line.split("\t") for line in Path(log.name).read_text().splitlines() if line.strip()]
    finally:
        os.unlink(log.name)
    finished = re.search(r"finished in ([\d.]+)(m?s)", out.stdout)
    if not rows or not finished:
        raise RuntimeError(f"no gRPC answers from {target} in {seconds:g}s: {out.stdout[-800:]}{out.stderr}")
    duration = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    # log columns: start time (µs since epoch), HTTP status, elapsed µs
    latencies = np.array([int(r[2]) for r in rows if r[1] == "200"]) / 1000
    errors = sum(1 for r in rows if r[1] != "200")
    if ok_count:
        counted_ok = ok_count() - before
        errors += max(0, int(len(latencies) - counted_ok))
    ok = len(rows) - errors
    return {"requests": len(rows), "errors": errors, "qps": ok / duration,
            "p50_ms": float(np.percentile(latencies, 50)), "p95_ms": float(np.percentile(latencies, 95)),
            "p99_ms": float(np.percentile(latencies, 99))}


def wait_http(url: str, timeout: float = 180, body: bytes | None = None,
              process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {process.returncode} before answering")
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}),
                                   timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout:g}s")


def start_process(command: list[str], running: contextlib.ExitStack) -> subprocess.Popen:
    """A baseline server, stopped (SIGTERM, then SIGKILL) when `running` closes."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    running.callback(stop)
    return process


def summary(runs: list[dict]) -> dict:
    """A row's repeated measurements: median and min–max of each figure, errors and requests summed."""
    figures = {key: spread([r[key] for r in runs]) for key in ("qps", "p50_ms", "p95_ms", "p99_ms")}
    figures["errors"] = sum(r["errors"] for r in runs)
    figures["requests"] = sum(r["requests"] for r in runs)
    return figures


def check_answers(rest_url: str, grpc_target: str, model: str, body: str, request, expected: dict,
                  samples: int = 10) -> None:
    """A sample of REST and gRPC answers equals the model's own output for the request."""
    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    for _ in range(samples):
        with urllib.request.urlopen(urllib.request.Request(f"{rest_url}/v1/models/{model}:predict", data=body.encode(),
                                                           headers={"Content-Type": "application/json"}), timeout=30) as r:
            [row] = json.loads(r.read())["predictions"]
        for name, value in expected.items():
            np.testing.assert_allclose(np.asarray(row[name]), value[0], rtol=1e-4, atol=1e-5, err_msg=f"REST {name}")
    with grpc.insecure_channel(grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for _ in range(samples):
            response = stub.Predict(request, timeout=30)
            for name, value in expected.items():
                np.testing.assert_allclose(tf.make_ndarray(response.outputs[name]), value, rtol=1e-4, atol=1e-5,
                                           err_msg=f"gRPC {name}")


def in_process_ceiling(saved_model_dir: str, image_shape, seconds: float) -> dict:
    """Examples/s of the model alone at each batch size, run as the server runs it (its session, by tensor name)."""
    import numpy as np

    from conveyor_ml.serving.servable import SavedModelServable

    servable = SavedModelServable("ceiling", 1, Path(saved_model_dir))
    ceiling = {}
    for batch in CONCURRENCY:
        images = {"images": np.zeros((batch, *image_shape), np.float32)}
        servable.predict("", images)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            servable.predict("", images)
            calls += 1
        ceiling[batch] = calls * batch / (time.perf_counter() - start)
    servable.close()
    return ceiling


CODEC_ROUNDS, CODEC_CALLS = 5, 2000


def request_codec_costs(saved_model_dir: str, body: str, request) -> dict:
    """Thread CPU per call (µs, the median of CODEC_ROUNDS rounds of CODEC_CALLS) of each protocol's codec steps for the
    benchmark's own request and the model's answer to it, through the server's own functions: the REST body to
    input arrays and the outputs to a JSON answer; the gRPC message to input arrays (parse included) and the
    outputs to a serialized PredictResponse. In-process: one thread, no transport, so this VM's noise is small."""
    import statistics

    import numpy as np
    from tensorflow_serving.apis import predict_pb2

    from conveyor_ml.serving import json_codec
    from conveyor_ml.serving.grpc_service import predict_inputs, predict_response
    from conveyor_ml.serving.model_server import ServerOptions
    from conveyor_ml.serving.servable import SavedModelServable

    servable = SavedModelServable("codec", 1, Path(saved_model_dir))
    signature, limit = "serving_default", ServerOptions.max_request_body_bytes
    rest_body, grpc_message = body.encode(), request.SerializeToString()
    inputs, request_format = json_codec.decode_predict(json_codec.parse_body(rest_body),
                                                       servable.input_dtypes(signature))
    outputs = servable.predict(signature, inputs)
    grpc_inputs = predict_inputs(predict_pb2.PredictRequest.FromString(grpc_message), limit)
    assert all(np.array_equal(inputs[name], grpc_inputs[name]) for name in inputs), "REST and gRPC inputs differ"
    steps = {
        ("REST", "request to arrays"): lambda: json_codec.decode_predict(json_codec.parse_body(rest_body),
                                                                         servable.input_dtypes(signature)),
        ("REST", "outputs to answer"): lambda: json_codec.encode_predict(outputs, request_format),
        ("gRPC", "request to arrays"): lambda: predict_inputs(predict_pb2.PredictRequest.FromString(grpc_message),
                                                              limit),
        ("gRPC", "outputs to answer"): lambda: predict_response(servable, signature, outputs,
                                                                False).SerializeToString(),
    }
    costs: dict[str, dict[str, float]] = {}
    for (protocol, step), run in steps.items():
        run()
        measured = []
        for _ in range(CODEC_ROUNDS):
            start = time.thread_time()
            for _ in range(CODEC_CALLS):
                run()
            measured.append((time.thread_time() - start) / CODEC_CALLS * 1e6)
        costs.setdefault(protocol, {})[step] = statistics.median(measured)
    servable.close()
    return costs


def codec_markdown(costs: dict) -> str:
    if not costs:
        return ""
    import google.protobuf
    from google.protobuf.internal import api_implementation

    steps = list(next(iter(costs.values())))
    rows = [f"| {protocol} | " + " | ".join(f"{by_step[step]:.1f}" for step in steps)
            + f" | {sum(by_step.values()):.1f} |" for protocol, by_step in costs.items()]
    return ("Each protocol's codec steps for this request and its answer, in-process through the server's own "
            f"functions (thread CPU µs per call, median of {CODEC_ROUNDS} rounds of {CODEC_CALLS:,}; protobuf "
            f"{google.protobuf.__version__}, its {api_implementation.Type()} implementation):\n\n"
            "| protocol | " + " | ".join(steps) + " | both |\n|---|" + "---|" * (len(steps) + 1) + "\n"
            + "\n".join(rows) + "\n\n")


def short_frame(frame: str) -> str:
    """py-spy's "function (path/to/package/file.py:line)" as "function (package/file.py)": lines pooled."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame.strip())
    if not match:
        return frame.strip()
    return f"{match.group(1)} ({'/'.join(Path(match.group(2)).parts[-2:])})"


# Frames every sampled stack of the event loop runs under (the process's start-up, the loop itself): their
# "total" share says nothing about where the time goes, so the table leaves them out.
OUTER_FRAMES = ("(runpy.py)", "(conveyor_ml/cli.py)", "(asyncio/runners.py)", "(serving/server.py)", "(threading.py)")


def profile_server(pid: int, url: str, body: str, seconds: float, top: int = 30) -> dict:
    """Samples the server with py-spy while wrk loads it at the top concurrency: per function (file and name, all
    lines together), the share of samples it was running in itself (own) and anywhere on the stack (total).
    Only the thread holding the GIL is sampled: this is where Python work goes (the model's own run, epoll
    and grpc's poller release the GIL), and on 2 cores Python work is what the server is short of."""
    spy_binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as out:
        pass
    try:
        spy = subprocess.Popen([spy_binary, "record", "--pid", str(pid), "--duration", f"{max(1, round(seconds))}",
                                "--rate", "250", "--gil", "--nonblocking", "--format", "raw", "--output", out.name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # attached before the load starts
        wrk_load(url, body, TOP, seconds)
        _, error = spy.communicate(timeout=seconds + 60)
        stacks = Path(out.name).read_text().splitlines()
    finally:
        os.unlink(out.name)
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in stacks:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [short_frame(frame) for frame in stack.split(";")]
        frames = [frame for frame in frames if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    if not samples:
        return {"samples": 0, "error": (error or "no samples")[-300:], "own": [], "total": []}

    def share(counts: dict[str, int]) -> list[list]:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return [[name, count / samples] for name, count in ranked]

    return {"samples": samples, "own": share(own), "total": share(total)}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-path", default="workspace/serving")
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip sampling the server with py-spy under load")
    args = parser.parse_args(argv)

    from conveyor_ml.base.ports import free_port
    from conveyor_ml.base.server_process import ServerProcess
    from conveyor_ml.base.spec import BatchingSettings
    from conveyor_ml.formats.release_state import versions_on_disk

    model_dir = Path(args.base_path) / args.model
    versions = versions_on_disk(model_dir) if model_dir.is_dir() else {}
    if not versions:
        print(f"benchmarks.serving: no pushed versions under {model_dir}; run `make pipeline` first", file=sys.stderr)
        return 2
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        print(f"benchmarks.serving: {' and '.join(missing)} not found; install with `apt-get install wrk "
              "nghttp2-client` (make bench does)", file=sys.stderr)
        return 2
    saved_model = versions[max(versions)]
    tflite_model = saved_model / "tflite" / "float32.tflite"
    import numpy as np

    from conveyor_ml.serving.servable import SavedModelServable

    probe = SavedModelServable(args.model, 1, saved_model)
    image_shape = tuple(d.size for d in probe.signature_defs["serving_default"].inputs["images"].tensor_shape.dim[1:])
    expected = probe.predict("", {"images": np.full((1, *image_shape), 7.0, np.float32)})
    probe.close()
    body = json.dumps({"instances": [[[7.0] * image_shape[1]] * image_shape[0]]})
    request = predict_request(args.model, image_shape)
    batching = BatchingSettings()
    loads = [load_average()]

    profile: dict = {}
    # Every server runs at once and each round measures all of them in turn, concurrency by concurrency: the
    # figures a ratio compares are taken within a minute of each other. (One server after another, this VM's
    # speed drifted by up to 1.6x between the rows a ratio compared.)
    rows: dict[str, Callable[[int, float], dict]] = {}
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as running:
        scratch = Path(scratch)
        frame_file = scratch / "predict.grpc"
        frame_file.write_bytes(grpc_frame(request))
        batching_file = scratch / "batching.config"
        batching_file.write_text(f"max_batch_size {{ value: {batching.max_batch_size} }}\n"
                                 f"batch_timeout_micros {{ value: {batching.batch_timeout_micros} }}\n"
                                 f"max_enqueued_batches {{ value: {batching.max_enqueued_batches} }}\n"
                                 f"num_batch_threads {{ value: {batching.num_batch_threads} }}\n")
        tflite_base = scratch / "tflite" / args.model
        (tflite_base / "1").mkdir(parents=True)
        if tflite_model.is_file():  # TF Serving's layout: model.tflite in the version directory
            shutil.copy(tflite_model, tflite_base / "1" / "model.tflite")
        configurations = [
            ("conveyor", "batching on", ["--model_base_path", str(model_dir.resolve()), "--enable_batching",
                                         "--batching_parameters_file", str(batching_file)]),
            ("conveyor", "batching off", ["--model_base_path", str(model_dir.resolve())]),
        ]
        cores = os.cpu_count() or 1
        if cores > 1:  # one server process per core, as gunicorn's baseline below has one worker per core
            configurations.append((f"conveyor {cores} processes", "batching on", [
                "--model_base_path", str(model_dir.resolve()), "--enable_batching", "--batching_parameters_file",
                str(batching_file), "--server_processes", str(cores)]))
        if tflite_model.is_file():
            configurations.append(("conveyor TFLite f32", "batching off",
                                   ["--model_base_path", str(tflite_base), "--prefer_tflite_model"]))
        servers = []
        for name, state, flags in configurations:
            server = ServerProcess("--model_name", args.model, "--enable_prometheus", *flags)
            running.callback(server.stop)
            servers.append((name, state, server))
        for name, state, server in servers:
            server.wait_available(args.model, timeout=300)
            server.wait_listening(timeout=300)  # every server process, where there are several
            check_answers(server.rest_url, server.grpc_target, args.model, body, request, expected)
            url = f"{server.rest_url}/v1/models/{args.model}:predict"
            rows[f"{name} REST, {state}"] = lambda c, seconds, u=url: wrk_load(u, body, c, seconds)
            rows[f"{name} gRPC, {state}"] = lambda c, seconds, s=server: h2load_grpc(
                s.grpc_target, str(frame_file), c, seconds, lambda: grpc_ok_count(s.rest_url, args.model))

        # The same answers, precomputed, from the same stack with no model: the transport ceiling.
        from tensorflow_serving.apis import predict_pb2

        from conveyor_ml.serving.json_codec import encode_predict
        from conveyor_ml.serving.tensors import tensor_proto

        rest_answer, grpc_answer = scratch / "answer.json", scratch / "answer.pb"
        rest_answer.write_bytes(encode_predict(expected, "row"))
        answer = predict_pb2.PredictResponse()
        answer.model_spec.name = args.model
        for key, value in expected.items():
            answer.outputs[key].CopyFrom(tensor_proto(value))
        grpc_answer.write_bytes(answer.SerializeToString())
        # As many processes as each conveyor configuration. (A second process on the ports may still be
        # starting when the first answers: the baselines below take seconds to start, the ceiling under one.)
        for processes in sorted({1, cores}):
            rest_port, grpc_port = free_port(), free_port()
            for _ in range(processes):
                started = start_process([sys.executable, "-m", "benchmarks.transport_ceiling", str(rest_port),
                                         str(grpc_port), str(rest_answer), str(grpc_answer)]
                                        + (["--reuse-port"] if processes > 1 else []), running)
                url = f"http://127.0.0.1:{rest_port}/v1/models/{args.model}:predict"
                wait_http(url, body=body.encode(), process=started)
            named = "" if processes == 1 else f", {processes} processes"
            rows[f"transport ceiling REST{named} (no model)"] = lambda c, seconds, u=url: wrk_load(u, body, c, seconds)
            rows[f"transport ceiling gRPC{named} (no model)"] = lambda c, seconds, g=grpc_port: h2load_grpc(
                f"127.0.0.1:{g}", str(frame_file), c, seconds)

        # The same stack, codec and model with one plain batching thread and none of the server's features:
        # what any Predict path with batching reaches here (benchmarks/minimal_predict.py).
        rest_port, grpc_port = free_port(), free_port()
        started = start_process([sys.executable, "-m", "benchmarks.minimal_predict", str(saved_model), args.model,
                                 str(rest_port), str(grpc_port), str(batching.max_batch_size)], running)
        minimal_url = f"http://127.0.0.1:{rest_port}"
        wait_http(f"{minimal_url}/v1/models/{args.model}:predict", body=body.encode(), process=started)
        check_answers(minimal_url, f"127.0.0.1:{grpc_port}", args.model, body, request, expected)
        rows[f"{MINIMAL} REST"] = lambda c, seconds, u=f"{minimal_url}/v1/models/{args.model}:predict": wrk_load(
            u, body, c, seconds)
        rows[f"{MINIMAL} gRPC"] = lambda c, seconds, g=grpc_port: h2load_grpc(f"127.0.0.1:{g}", str(frame_file), c,
                                                                             seconds)

        baselines = [
            ("Flask (Werkzeug dev server, threaded)", [sys.executable, "-m", "benchmarks.flask_baseline",
                                                       str(saved_model), "{port}"]),
            (f"Flask (gunicorn, {cores} workers x 4 threads)",
             [str(Path(sys.executable).parent / "gunicorn"), "-w", str(cores), "--threads", "4", "-b",
              "127.0.0.1:{port}", "--log-level", "warning", f'benchmarks.flask_baseline:create_app("{saved_model}")']),
        ]
        for name, command in baselines:
            port = free_port()
            started = start_process([part.replace("{port}", str(port)) for part in command], running)
            url = f"http://127.0.0.1:{port}/predict"
            wait_http(url, body=body.encode(), process=started)
            with urllib.request.urlopen(urllib.request.Request(url, data=body.encode(), headers={
                    "Content-Type": "application/json"}), timeout=30) as answer_file:
                [row] = json.loads(answer_file.read())["predictions"]
            for key, value in expected.items():  # the same outputs as conveyor serve's
                np.testing.assert_allclose(np.asarray(row[key]), value[0], rtol=1e-4, atol=1e-5)
            rows[name] = lambda c, seconds, u=url: wrk_load(u, body, c, seconds)

        for measure in rows.values():  # warm-up
            measure(8, 1)
        runs: dict[str, list[dict]] = {f"{row}|{c}": [] for row in rows for c in CONCURRENCY}
        for round_number in range(1, args.repeats + 1):
            for concurrency in CONCURRENCY:
                print(f"round {round_number}/{args.repeats}, concurrency {concurrency}: {len(rows)} rows",
                      flush=True)
                for row, measure in rows.items():
                    runs[f"{row}|{concurrency}"].append(measure(concurrency, args.seconds))
            loads.append(load_average())
        results = {key: summary(measured) for key, measured in runs.items()}
        for *_, server in servers:
            check_answers(server.rest_url, server.grpc_target, args.model, body, request, expected)
        check_answers(minimal_url, f"127.0.0.1:{grpc_port}", args.model, body, request, expected)
        if args.profile:
            name, state, server = servers[0]
            print(f"profiling {name} {state}, REST concurrency {TOP}", flush=True)
            profile = profile_server(server.pid, f"{server.rest_url}/v1/models/{args.model}:predict", body,
                                     args.seconds)

    ceiling = in_process_ceiling(str(saved_model), image_shape, args.seconds)
    codecs = request_codec_costs(str(saved_model), body, request)
    settings = {"max_batch_size": batching.max_batch_size, "batch_timeout_micros": batching.batch_timeout_micros,
                "max_enqueued_batches": batching.max_enqueued_batches,
                "num_batch_threads": batching.num_batch_threads}
    write_results("serving", {"model": str(saved_model), "seconds": args.seconds, "repeats": args.repeats,
                              "batching": settings, "load_average_1_5_15": loads, "results": results,
                              "in_process_examples_per_s": ceiling, "codec_us_per_call": codecs,
                              "profile": profile},
                  markdown(results, ceiling, args, settings, loads, profile, codecs))
    return 0


def targets(results: dict) -> list[tuple[str, float, float]]:
    """(target, measured ratio, the ratio that meets it) at the top concurrency; missing rows are skipped."""
    def median(name: str, concurrency: int, key: str) -> float | None:
        row = results.get(f"{name}|{concurrency}")
        return row[key]["median"] if row else None

    gunicorn = next((key.split("|")[0] for key in results if key.startswith("Flask (gunicorn")), None)
    rest_on, grpc_on = median("conveyor REST, batching on", TOP, "qps"), median("conveyor gRPC, batching on", TOP, "qps")
    checks = [
        ("REST (batching on) ≥ 3× gunicorn-Flask throughput", rest_on, median(gunicorn, TOP, "qps"), 3.0),
        ("REST (batching on): lower P99 than gunicorn-Flask (ratio of P99s)",
         median(gunicorn, TOP, "p99_ms"), median("conveyor REST, batching on", TOP, "p99_ms"), 1.0),
        ("gRPC ≥ 1.2× REST (batching on)", grpc_on, rest_on, 1.2),
        ("gRPC ≥ 1.2× REST (batching off)", median("conveyor gRPC, batching off", TOP, "qps"),
         median("conveyor REST, batching off", TOP, "qps"), 1.2),
        ("REST (batching on) ≥ 50 % of the REST transport ceiling", rest_on,
         median("transport ceiling REST (no model)", TOP, "qps"), 0.5),
        ("gRPC (batching on) ≥ 50 % of the gRPC transport ceiling", grpc_on,
         median("transport ceiling gRPC (no model)", TOP, "qps"), 0.5),
        ("batching on: P50 at concurrency 1 within 20 % of batching off (off/on ratio ≥ 0.83)",
         median("conveyor REST, batching off", 1, "p50_ms"), median("conveyor REST, batching on", 1, "p50_ms"),
         1 / 1.2),
        ("TFLite f32 ≥ 2× the SavedModel at concurrency 1 (REST, batching off)",
         median("conveyor TFLite f32 REST, batching off", 1, "qps"), median("conveyor REST, batching off", 1, "qps"),
         2.0),
        ("TFLite f32 ≥ 2× the SavedModel at concurrency 1 (gRPC, batching off)",
         median("conveyor TFLite f32 gRPC, batching off", 1, "qps"), median("conveyor gRPC, batching off", 1, "qps"),
         2.0),
        ("REST (batching on) vs the Werkzeug dev server (for reference)", rest_on,
         median("Flask (Werkzeug dev server, threaded)", TOP, "qps"), 0.0),
        ("the minimal Predict path: REST vs the REST transport ceiling (for reference)",
         median(f"{MINIMAL} REST", TOP, "qps"), median("transport ceiling REST (no model)", TOP, "qps"), 0.0),
        ("the minimal Predict path: gRPC vs REST (for reference)", median(f"{MINIMAL} gRPC", TOP, "qps"),
         median(f"{MINIMAL} REST", TOP, "qps"), 0.0),
    ]
    several = next((key.split("|")[0][:-len(" REST, batching on")] for key in results
                    if re.match(r"conveyor \d+ processes REST, batching on\|", key)), None)
    if several:  # --server_processes: one per core, against the ceiling with as many processes
        processes = several.split()[1]
        rest_n, grpc_n = median(f"{several} REST, batching on", TOP, "qps"), median(f"{several} gRPC, batching on", TOP,
                                                                                     "qps")
        checks += [
            (f"{processes} processes: REST (batching on) ≥ 3× gunicorn-Flask throughput", rest_n,
             median(gunicorn, TOP, "qps"), 3.0),
            (f"{processes} processes: REST (batching on): lower P99 than gunicorn-Flask (ratio of P99s)",
             median(gunicorn, TOP, "p99_ms"), median(f"{several} REST, batching on", TOP, "p99_ms"), 1.0),
            (f"{processes} processes: gRPC ≥ 1.2× REST (batching on)", grpc_n, rest_n, 1.2),
            (f"{processes} processes: REST (batching on) ≥ 50 % of the REST transport ceiling "
             f"({processes} processes)", rest_n,
             median(f"transport ceiling REST, {processes} processes (no model)", TOP, "qps"), 0.5),
            (f"{processes} processes: gRPC (batching on) ≥ 50 % of the gRPC transport ceiling "
             f"({processes} processes)", grpc_n,
             median(f"transport ceiling gRPC, {processes} processes (no model)", TOP, "qps"), 0.5),
            (f"{processes} processes vs one: REST (batching on), for reference", rest_n, rest_on, 0.0),
        ]
    return [(what, top / bottom, goal) for what, top, bottom, goal in checks if top and bottom]


def profile_markdown(profile: dict) -> str:
    if not profile.get("samples"):
        return ("Profile: not taken" + (f" ({profile['error'].strip()})" if profile.get("error") else "")
                + ".\n")
    lines = [f"Where the server's Python time goes (py-spy --gil: {profile['samples']:,} samples of the thread "
             f"holding the GIL while wrk ran REST at concurrency {TOP}, batching on; the model's own run releases "
             "the GIL and is not in them): the functions it spent most time in themselves (own), and those most "
             "often on the stack (total, the process's start-up and the event loop's own frames left out).\n",
             "| own | function | | total | function |", "|---|---|---|---|---|"]
    inner = [entry for entry in profile["total"] if not entry[0].endswith(OUTER_FRAMES)]
    for (own_name, own_share), (total_name, total_share) in list(zip(profile["own"], inner))[:15]:
        lines.append(f"| {own_share:.1%} | `{own_name}` | | {total_share:.1%} | `{total_name}` |")
    return "\n".join(lines) + "\n"


def markdown(results: dict, ceiling: dict, args, settings: dict, loads: list, profile: dict,
             codecs: dict | None = None) -> str:
    rows = []
    for key, figures in results.items():
        name, concurrency = key.split("|")
        rows.append(f"| {name} | {concurrency} | {figures['qps']['median']:,.0f} "
                    f"({figures['qps']['min']:,.0f}–{figures['qps']['max']:,.0f}) | {figures['p50_ms']['median']:.2f} | "
                    f"{figures['p95_ms']['median']:.2f} | {figures['p99_ms']['median']:.2f} "
                    f"({figures['p99_ms']['min']:.2f}–{figures['p99_ms']['max']:.2f}) | {figures['errors']} |")
    check_rows = [f"| {what} | {ratio:.2f}× | {'met' if ratio >= goal else 'NOT met'} |" if goal else
                  f"| {what} | {ratio:.2f}× | |" for what, ratio, goal in targets(results)]
    fraction = []
    several = sorted({key.split("|")[0] for key in results if re.match(r"conveyor \d+ processes ", key)})
    for name in ("conveyor REST, batching on", "conveyor gRPC, batching on", "conveyor REST, batching off",
                 "conveyor gRPC, batching off", *several, f"{MINIMAL} REST", f"{MINIMAL} gRPC"):
        protocol = "REST" if "REST" in name else "gRPC"
        processes = re.match(r"conveyor (\d+) processes ", name)
        named = f", {processes.group(1)} processes" if processes else ""
        served = results.get(f"{name}|{TOP}")
        transport = results.get(f"transport ceiling {protocol}{named} (no model)|{TOP}")
        minimal = results.get(f"{MINIMAL} {protocol}|{TOP}")
        if served and transport:
            versus_minimal = (f"{served['qps']['median'] / minimal['qps']['median']:.0%} of the {protocol} minimal path"
                              if minimal and not processes and not name.startswith(MINIMAL) else "")
            fraction.append(f"| {name} | {served['qps']['median'] / transport['qps']['median']:.0%} of the "
                            f"{protocol}{named} transport ceiling | {versus_minimal} | "
                            f"{served['qps']['median'] / ceiling[TOP]:.0%} of the model's examples/s at batch {TOP} |")
    return (
        "# Serving benchmark\n\n"
        f"Model: the pipeline's pushed SavedModel (and its float32 TFLite variant, served as TF Serving's "
        f"`model.tflite` with `--prefer_tflite_model`); one image per request. Every server runs at once; "
        f"{args.repeats} rounds each measure every row in turn ({args.seconds:g} s each, concurrency by concurrency), "
        "so the rows a ratio compares were measured within a minute of each other: medians of the rounds, with "
        "min–max. REST load from wrk, gRPC load from h2load, both with "
        f"{client_threads(TOP)} client threads and one request in flight per connection; gRPC answers checked "
        "on the server's side (TF Serving's OK count must grow by what h2load counted) and a sample of REST and "
        "gRPC answers compared with the model's own output. Client and server share this machine's "
        f"{os.cpu_count()} cores; 1-minute load average before the first round and after each: "
        f"{', '.join(str(load[0]) for load in loads)}. Batching as `make serve` uses it (the spec's defaults): "
        + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".\n\n"
        "| server | concurrency | requests/s (min–max) | P50 ms | P95 ms | P99 ms (min–max) | errors |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "In-process ceiling (the SavedModel run as the server runs it, examples/s): "
        + ", ".join(f"batch {b}: {v:,.0f}" for b, v in ceiling.items()) + "\n\n"
        f"How far each figure is from what the stack and the model allow (concurrency {TOP}):\n\n"
        f"The {MINIMAL} is the same stack, the server's own codec functions and model run, and one plain "
        "batching thread, with none of the server's admission, metrics, version routing, input checks, "
        "prediction logging or deadlines (benchmarks/minimal_predict.py): what any Predict path with batching "
        "reaches here; the gap to it is what those features cost.\n\n"
        "| server | vs transport | vs the minimal Predict path | vs model |\n|---|---|---|---|\n"
        + "\n".join(fraction) + "\n\n"
        f"Targets (concurrency {TOP} unless stated):\n\n| target | measured | |\n|---|---|---|\n"
        + "\n".join(check_rows) + "\n\n" + codec_markdown(codecs or {}) + profile_markdown(profile))


if __name__ == "__main__":
    raise SystemExit(main())
