"""Serving throughput and latency: `conveyor serve` over REST and gRPC, batching on and off, against the Flask
service users start with, and the in-process ceiling, at concurrency 1, 8 and 32.

Load generators are native, so the client is not the bottleneck: wrk (Debian's `wrk`) for REST, and
h2load (Debian's `nghttp2-client`) for gRPC, sending the serialized PredictRequest as a gRPC frame over
HTTP/2 (the request is checked with the official client first, and every answer's grpc-status is read
from h2load's log... h2load sees HTTP status only, so errors are counted by a post-run status query).
Every request carries one image, so batching is what the server does with concurrent requests. Client
and server share the machine's cores, as they do on a laptop; the results say how many.

Run: make bench (or .venv/bin/python -m benchmarks.serving). Needs a pushed model (make pipeline), wrk and h2load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import spread, write_results

CONCURRENCY = (1, 8, 32)
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


def wrk_load(url: str, body: str, concurrency: int, seconds: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % body)
    try:
        out = subprocess.run(["wrk", f"-t{min(2, concurrency)}", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s",
                              "-s", script.name, url], capture_output=True, text=True, timeout=seconds + 60)
    finally:
        os.unlink(script.name)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}{out.stderr}")
    raw = json.loads(line[len("WRK_JSON "):])
    ok = raw["requests"] - raw["errors"]
    return {"requests": raw["requests"], "errors": raw["errors"], "qps": ok / (raw["duration_us"] / 1e6),
            "p50_ms": raw["p50_us"] / 1000, "p95_ms": raw["p95_us"] / 1000, "p99_ms": raw["p99_us"] / 1000}


def grpc_frame(model: str, image_shape) -> bytes:
    """One gRPC message: a 0 compression flag, the big-endian length, then the serialized PredictRequest."""
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.full((1, *image_shape), 7.0, np.float32)))
    payload = request.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def check_grpc_request(target: str, frame: bytes) -> None:
    """The bytes h2load sends are a request the official client's server answers (not an error)."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest.FromString(frame[5:])
    with grpc.insecure_channel(target) as channel:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)


def h2load_grpc(target: str, frame_file: str, concurrency: int, seconds: float) -> dict:
    import numpy as np

    connections = min(concurrency, 4)
    with tempfile.NamedTemporaryFile(suffix=".log", delete=False) as log:
        pass
    try:
        out = subprocess.run(
            ["h2load", "-t", "1", "-c", str(connections), "-m", str(concurrency // connections), "-D", f"{seconds:g}",
             "-d", frame_file, "-H", "content-type: application/grpc", "-H", "te: trailers",
             "--log-file", log.name, f"http://{target}/tensorflow.serving.PredictionService/Predict"],
            capture_output=True, text=True, timeout=seconds + 60)
        rows = [line.split("\t") for line in Path(log.name).read_text().splitlines() if line.strip()]
    finally:
        os.unlink(log.name)
    if not rows:
        raise RuntimeError(f"no gRPC answers from {target} in {seconds:g}s: {out.stdout[-800:]}{out.stderr}")
    # log columns: start time (µs since epoch), HTTP status, elapsed µs
    latencies = np.array([int(r[2]) for r in rows if r[1] == "200"]) / 1000
    errors = sum(1 for r in rows if r[1] != "200")
    return {"requests": len(rows), "errors": errors, "qps": len(latencies) / seconds,
            "p50_ms": float(np.percentile(latencies, 50)), "p95_ms": float(np.percentile(latencies, 95)),
            "p99_ms": float(np.percentile(latencies, 99))}


def wait_http(url: str, timeout: float = 120, body: bytes | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}),
                                   timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout:g}s")


def repeated(measure, repeats: int) -> dict:
    runs = [measure() for _ in range(repeats)]
    figures = {key: spread([r[key] for r in runs]) for key in ("qps", "p50_ms", "p95_ms", "p99_ms")}
    figures["errors"] = sum(r["errors"] for r in runs)
    return figures


def in_process_ceiling(saved_model_dir: str, image_shape, seconds: float) -> dict:
    import numpy as np
    import tensorflow as tf

    predict = tf.saved_model.load(saved_model_dir).signatures["serving_default"]
    ceiling = {}
    for batch in CONCURRENCY:
        images = tf.constant(np.zeros((batch, *image_shape), np.float32))
        predict(images=images)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            predict(images=images)
            calls += 1
        ceiling[batch] = calls * batch / (time.perf_counter() - start)
    return ceiling


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-path", default="workspace/serving")
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from conveyor_ml.base.ports import free_port
    from conveyor_ml.base.server_process import ServerProcess
    from conveyor_ml.formats.release_state import versions_on_disk

    model_dir = Path(args.base_path) / args.model
    versions = versions_on_disk(model_dir) if model_dir.is_dir() else {}
    if not versions:
        print(f"benchmarks.serving: no pushed versions under {model_dir}; run `make pipeline` first", file=sys.stderr)
        return 2
    missing = [tool for tool, package in (("wrk", "wrk"), ("h2load", "nghttp2-client")) if shutil.which(tool) is None]
    if missing:
        print(f"benchmarks.serving: {' and '.join(missing)} not found; install with `apt-get install wrk "
              "nghttp2-client` (make bench does)", file=sys.stderr)
        return 2
    saved_model = str(versions[max(versions)])
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model).signatures["serving_default"]
    image_shape = tuple(loaded.structured_input_signature[1]["images"].shape[1:])
    body = json.dumps({"instances": [[[7.0] * image_shape[1]] * image_shape[0]]})

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        frame_file = Path(scratch) / "predict.grpc"
        frame_file.write_bytes(grpc_frame(args.model, image_shape))
        batching_file = Path(scratch) / "batching.config"
        batching_file.write_text("max_batch_size { value: 32 }\nbatch_timeout_micros { value: 1000 }\n"
                                 "max_enqueued_batches { value: 100 }\nnum_batch_threads { value: 2 }\n")
        for batching in (True, False):
            flags = ["--model_name", args.model, "--model_base_path", str(model_dir.resolve())]
            if batching:
                flags += ["--enable_batching", "--batching_parameters_file", str(batching_file)]
            server = ServerProcess(*flags)
            try:
                server.wait_available(args.model)
                url = f"{server.rest_url}/v1/models/{args.model}:predict"
                wrk_load(url, body, 8, 1)  # warm-up
                check_grpc_request(server.grpc_target, frame_file.read_bytes())
                state = "on" if batching else "off"
                for concurrency in CONCURRENCY:
                    print(f"conveyor batching {state}, concurrency {concurrency}", flush=True)
                    results[f"conveyor REST, batching {state}|{concurrency}"] = repeated(
                        lambda c=concurrency, u=url: wrk_load(u, body, c, args.seconds), args.repeats)
                    results[f"conveyor gRPC, batching {state}|{concurrency}"] = repeated(
                        lambda c=concurrency, t=server.grpc_target: h2load_grpc(t, str(frame_file), c, args.seconds),
                        args.repeats)
            finally:
                server.stop()

        port = free_port()
        flask = subprocess.Popen([sys.executable, "-m", "benchmarks.flask_baseline", saved_model, str(port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/predict"
            wait_http(url, body=body.encode())
            wrk_load(url, body, 8, 1)
            for concurrency in CONCURRENCY:
                print(f"Flask, concurrency {concurrency}", flush=True)
                results[f"Flask (threaded)|{concurrency}"] = repeated(
                    lambda c=concurrency: wrk_load(url, body, c, args.seconds), args.repeats)
        finally:
            flask.terminate()
            flask.wait(timeout=30)

    ceiling = in_process_ceiling(saved_model, image_shape, args.seconds)
    write_results("serving", {"model": saved_model, "seconds": args.seconds, "repeats": args.repeats,
                              "results": results, "in_process_examples_per_s": ceiling},
                  markdown(results, ceiling, args))
    return 0


def markdown(results: dict, ceiling: dict, args) -> str:
    def median(name: str, concurrency: int, key: str) -> float:
        return results[f"{name}|{concurrency}"][key]["median"]

    rows = []
    for key, figures in results.items():
        name, concurrency = key.split("|")
        rows.append(f"| {name} | {concurrency} | {figures['qps']['median']:,.0f} "
                    f"({figures['qps']['min']:,.0f}–{figures['qps']['max']:,.0f}) | {figures['p50_ms']['median']:.2f} | "
                    f"{figures['p95_ms']['median']:.2f} | {figures['p99_ms']['median']:.2f} "
                    f"({figures['p99_ms']['min']:.2f}–{figures['p99_ms']['max']:.2f}) | {figures['errors']} |")
    c = max(CONCURRENCY)
    rest_on, rest_off = median("conveyor REST, batching on", c, "qps"), median("conveyor REST, batching off", c, "qps")
    grpc_on = median("conveyor gRPC, batching on", c, "qps")
    flask = median("Flask (threaded)", c, "qps")
    checks = [
        ("REST with batching ≥ 2× Flask's throughput", rest_on / flask, 2.0),
        ("REST with batching: lower P99 than Flask",
         median("Flask (threaded)", c, "p99_ms") / median("conveyor REST, batching on", c, "p99_ms"), 1.0),
        ("gRPC ≥ REST (batching on)", grpc_on / rest_on, 1.0),
        ("REST batching on ≥ 1.5× off", rest_on / rest_off, 1.5),
        ("gRPC batching on ≥ 1.5× off", grpc_on / median("conveyor gRPC, batching off", c, "qps"), 1.5),
    ]
    check_rows = [f"| {what} | {ratio:.2f}× | {'met' if ratio >= target else 'NOT met'} |" for what, ratio, target in checks]
    return (
        "# Serving benchmark\n\n"
        f"Model: the pipeline's pushed SavedModel; one image per request. {args.repeats} runs of {args.seconds:g} s per "
        "row: medians, with min–max. REST load from wrk (2 threads), gRPC load from h2load (1 thread); client "
        f"and server share this machine's {os.cpu_count()} cores. Batching: max_batch_size 32, batch_timeout_micros "
        "1000, 2 batch threads.\n\n"
        "| server | concurrency | requests/s (min–max) | P50 ms | P95 ms | P99 ms (min–max) | errors |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "In-process ceiling (the SavedModel called directly, examples/s): "
        + ", ".join(f"batch {b}: {v:,.0f}" for b, v in ceiling.items()) + "\n\n"
        f"Targets at concurrency {c}:\n\n| target | measured | |\n|---|---|---|\n" + "\n".join(check_rows) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
