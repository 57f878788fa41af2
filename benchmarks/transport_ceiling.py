"""The transport ceiling: the HTTP and gRPC stack `conveyor serve` runs on (aiohttp's low-level server and
grpc.aio on one uvloop event loop, the same listener options) answering a fixed, precomputed Predict response with no model, no
JSON or tensor conversion, no metrics. What the server reaches is compared with what this allows.

Run by benchmarks/serving.py: python -m benchmarks.transport_ceiling REST_PORT GRPC_PORT RESPONSE.json RESPONSE.pb
[--reuse-port] (the two files hold the real server's answers to the benchmark's request, so the bytes sent are
the same; with --reuse-port several of these share the ports, as `conveyor serve --server_processes` does).
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
from aiohttp import web


async def start_stack(rest_port: int, grpc_port: int, predict_rest, predict_grpc, reuse_port: bool = False,
                      request_deserializer=None, response_serializer=None) -> tuple[web.ServerRunner, grpc.aio.Server]:
    """aiohttp's low-level server answering every REST request with `predict_rest`, and grpc.aio answering
    PredictionService/Predict with `predict_grpc`, on 127.0.0.1 with the listener options `conveyor serve` uses
    (no (de)serializers: raw bytes in and out). Both serve while the caller holds them (a grpc.aio server
    that is garbage collected stops)."""
    runner = web.ServerRunner(web.Server(predict_rest, access_log=None))  # aiohttp's low-level server, as there
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", rest_port, reuse_address=True, reuse_port=reuse_port, backlog=1024).start()
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(predict_grpc, request_deserializer=request_deserializer,
                                                  response_serializer=response_serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "tensorflow.serving.PredictionService", {"Predict": handler}),))
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    return runner, server


async def serve(rest_port: int, grpc_port: int, rest_body: bytes, grpc_body: bytes, reuse_port: bool) -> None:
    async def predict_rest(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(body=rest_body, content_type="application/json")

    async def predict_grpc(request: bytes, context) -> bytes:
        return grpc_body

    # Raw bytes in and out: the request is not even parsed, the response not serialized per call.
    runner, server = await start_stack(rest_port, grpc_port, predict_rest, predict_grpc, reuse_port)
    print("transport ceiling: serving", flush=True)
    await server.wait_for_termination()  # until the process is stopped; the aiohttp runner serves meanwhile


def main() -> None:
    rest_port, grpc_port = int(sys.argv[1]), int(sys.argv[2])
    rest_body, grpc_body = Path(sys.argv[3]).read_bytes(), Path(sys.argv[4]).read_bytes()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(serve(rest_port, grpc_port, rest_body, grpc_body, "--reuse-port" in sys.argv[5:]))


if __name__ == "__main__":
    main()
