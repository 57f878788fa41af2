"""`conveyor serve`: a TF-Serving-compatible model server (REST :8501, gRPC :8500) in one process."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import PROMETHEUS_PATH

log = logging.getLogger("conveyor.serving")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """tensorflow_model_server's flag names, plus --spec to serve what a pipeline pushed."""
    parser.add_argument("--spec", help="serve what this pipeline spec's serving_pusher pushed")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (default 8500)")
    parser.add_argument("--rest_api_port", type=int, default=8501, help="REST port (default 8501)")
    parser.add_argument("--grpc_host", default="127.0.0.1")
    parser.add_argument("--rest_api_host", default="127.0.0.1")
    parser.add_argument("--model_name", help="single model: its name (with --model_base_path)")
    parser.add_argument("--model_base_path", help="single model: directory holding <version>/ SavedModels")
    parser.add_argument("--model_config_file", help="ModelServerConfig text proto (several models, labels)")
    parser.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0.0,
                        help="re-read --model_config_file this often (0: read once)")
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                        help="look for new or removed versions this often (default 1)")
    parser.add_argument("--enable_batching", action="store_true", help="merge concurrent requests into batches")
    parser.add_argument("--batching_parameters_file", help="BatchingParameters text proto")
    parser.add_argument("--monitoring_config_file", help="MonitoringConfig text proto (Prometheus)")
    parser.add_argument("--enable_prometheus", action="store_true",
                        help="expose Prometheus metrics at /monitoring/prometheus/metrics")
    parser.add_argument("--max_request_body_bytes", type=int, default=16 * 1024 * 1024,
                        help="REST requests larger than this get 413 (default 16 MiB)")
    parser.add_argument("--input_schema", help="TFDV schema (pbtxt): count request values outside its domains "
                        "(--spec uses the spec's data.schema)")
    parser.add_argument("--reject_anomalous_inputs", action="store_true",
                        help="answer 400 to requests whose inputs break the schema, instead of only counting them")
    parser.add_argument("--traffic_file", help="weights per label for unversioned requests "
                                                "(default: traffic.json beside --model_config_file)")


def options_from_args(args: argparse.Namespace):
    from conveyor_ml.formats import serving_config
    from conveyor_ml.serving.model_server import ServerOptions

    model_config_file, model_name, base_path = args.model_config_file, args.model_name, args.model_base_path
    enable_batching, batching_file = args.enable_batching, args.batching_parameters_file
    config_poll = args.model_config_file_poll_wait_seconds
    prometheus_path = PROMETHEUS_PATH if args.enable_prometheus else None
    input_schema = args.input_schema
    if args.spec:
        model_config_file, model_name, base_path, batching_file = _from_spec(args.spec)
        from conveyor_ml.base.spec import load_spec

        input_schema = input_schema or str(load_spec(args.spec).data.schema)
        enable_batching = enable_batching or batching_file is not None
        config_poll = config_poll or 1.0
        prometheus_path = PROMETHEUS_PATH
    if args.monitoring_config_file:
        prometheus_path = serving_config.read_prometheus_path(Path(args.monitoring_config_file))
    if model_config_file and (model_name or base_path) and not args.spec:
        raise ConveyorError("use either --model_config_file or --model_name with --model_base_path, not both")
    if not model_config_file and not (model_name and base_path):
        raise ConveyorError("nothing to serve: pass --model_name and --model_base_path, --model_config_file, "
                            "or --spec pipelines/mnist.yaml after `make pipeline`")
    if model_config_file and not Path(model_config_file).is_file():
        raise ConveyorError(f"--model_config_file: no such file: {model_config_file}")
    if args.input_schema and not Path(args.input_schema).is_file():
        raise ConveyorError(f"--input_schema: no such file: {args.input_schema}")
    if batching_file and not Path(batching_file).is_file():
        raise ConveyorError(f"--batching_parameters_file: no such file: {batching_file}")
    return ServerOptions(
        port=args.port, rest_api_port=args.rest_api_port, grpc_host=args.grpc_host,
        rest_api_host=args.rest_api_host, model_name=model_name,
        model_base_path=str(Path(base_path).resolve()) if base_path and not model_config_file else base_path,
        model_config_file=model_config_file, model_config_file_poll_wait_seconds=config_poll,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds, enable_batching=enable_batching,
        batching_parameters_file=batching_file, prometheus_path=prometheus_path,
        max_request_body_bytes=args.max_request_body_bytes, traffic_file=args.traffic_file,
        input_schema=input_schema, reject_anomalous_inputs=args.reject_anomalous_inputs)


def _from_spec(spec_path: str):
    """(models.config, model name, base path, batching.config) for the spec's serving base path."""
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.formats import serving_config

    spec = load_spec(spec_path)
    pusher = spec.components.serving_pusher
    if pusher is None:
        raise ConveyorError(f"{spec_path}: no components.serving_pusher, so nothing was pushed to serve")
    base = pusher.base_path
    config_file = base / serving_config.MODELS_CONFIG
    batching_file = base / serving_config.BATCHING_CONFIG
    model_dir = base / pusher.model_name
    if not config_file.is_file() and not model_dir.is_dir():
        raise ConveyorError(f"nothing pushed yet under {base}: run `make pipeline` first")
    return (str(config_file) if config_file.is_file() else None, pusher.model_name, str(model_dir),
            str(batching_file) if batching_file.is_file() else None)


async def _serve(server, stop: asyncio.Event) -> None:
    from aiohttp import web

    from conveyor_ml.serving.grpc_service import build_grpc_server
    from conveyor_ml.serving.rest import RestApi

    try:
        grpc_server = build_grpc_server(server)
    except OSError as exc:
        raise ConveyorError(str(exc)) from None
    runner = web.AppRunner(RestApi(server).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, server.options.rest_api_host, server.options.rest_api_port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConveyorError(f"cannot listen on {server.options.rest_api_host}:{server.options.rest_api_port} "
                            f"(REST): {exc.strerror}") from None
    await grpc_server.start()
    models = ", ".join(f"{m.name} {m.available_versions() or '(no version yet)'}" for m in server.registry.models())
    print(f"conveyor serve: REST http://{server.options.rest_api_host}:{server.options.rest_api_port}  "
          f"gRPC {server.options.grpc_host}:{server.options.port}  models: {models}", flush=True)
    await stop.wait()
    await grpc_server.stop(grace=2)
    await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for host in {options.rest_api_host, options.grpc_host}:
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s: reachable from other machines", host)
    from conveyor_ml.serving.model_server import ModelServer

    server = ModelServer(options)
    server.start_polling()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await _serve(server, stop)

    try:
        asyncio.run(main())
    finally:
        server.stop()
    return 0
