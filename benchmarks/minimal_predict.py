"""The minimal Predict path: the stack `conveyor serve` runs on (aiohttp's low-level server and grpc.aio on one
uvloop event loop), the server's own codec functions and model run, and one plain batching thread — and
nothing else: no admission, metrics, version routing, input checks, prediction logging, deadlines or batching
policy (a batch is whatever waited while the thread ran the last one). What any Predict path with batching
reaches on this stack, between the transport ceiling (benchmarks/transport_ceiling.py) and `conveyor serve`:
the gap to the server is what its features cost per request.

Run by benchmarks/serving.py: python -m benchmarks.minimal_predict SAVED_MODEL MODEL_NAME REST_PORT GRPC_PORT
MAX_BATCH_SIZE
"""
from __future__ import annotations

import asyncio
import sys
import threading
from collections import deque
from pathlib import Path

import numpy as np
from aiohttp import web
from tensorflow_serving.apis import predict_pb2

from benchmarks.transport_ceiling import start_stack
from conveyor_ml.serving import heap, json_codec
from conveyor_ml.serving.grpc_service import predict_inputs, predict_response
from conveyor_ml.serving.model_server import ServerOptions
from conveyor_ml.serving.servable import SavedModelServable

SIGNATURE = "serving_default"


class BatchThread:
    """One thread runs whatever requests waited while it ran the last batch (up to `max_batch_size` rows) and
    settles their futures with one call into the loop per batch."""

    def __init__(self, servable: SavedModelServable, loop: asyncio.AbstractEventLoop, max_batch_size: int):
        self.servable, self.loop, self.max_batch_size = servable, loop, max_batch_size
        self.waiting: deque[tuple[dict[str, np.ndarray], asyncio.Future]] = deque()
        self.condition = threading.Condition()
        threading.Thread(target=self._work, name="batch", daemon=True).start()

    def predict(self, inputs: dict[str, np.ndarray]) -> asyncio.Future:
        future = self.loop.create_future()
        with self.condition:
            self.waiting.append((inputs, future))
            self.condition.notify()
        return future

    def _take(self) -> list[tuple[dict[str, np.ndarray], asyncio.Future]]:
        with self.condition:
            while not self.waiting:
                self.condition.wait()
            batch, rows = [], 0
            while self.waiting and (not batch or rows + len(next(iter(self.waiting[0][0].values())))
                                    <= self.max_batch_size):
                inputs, future = self.waiting.popleft()
                batch.append((inputs, future))
                rows += len(next(iter(inputs.values())))
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            try:
                merged = {name: np.concatenate([inputs[name] for inputs, _ in batch]) for name in batch[0][0]}
                outputs, error = self.servable.predict(SIGNATURE, merged), None
            except Exception as exc:  # answered to every request of the batch
                outputs, error = None, exc
            self.loop.call_soon_threadsafe(_settle, batch, outputs, error)


def _settle(batch: list, outputs: dict[str, np.ndarray] | None, error: Exception | None) -> None:
    offset = 0
    for inputs, future in batch:
        rows = len(next(iter(inputs.values())))
        if error is not None and not future.done():  # done: the client went away
            future.set_exception(error)
        elif not future.done():
            future.set_result({name: value[offset:offset + rows] for name, value in outputs.items()})
        offset += rows


async def serve(saved_model: Path, model_name: str, rest_port: int, grpc_port: int, max_batch_size: int) -> None:
    servable = SavedModelServable(model_name, 1, saved_model)
    dtypes = servable.input_dtypes(SIGNATURE)
    limit = ServerOptions.max_request_body_bytes
    batches = BatchThread(servable, asyncio.get_running_loop(), max_batch_size)
    heap.tune_collector()  # the server's garbage collection (serving/heap.py): the loaded model frozen
    heap.freeze_long_lived()

    async def predict_rest(request: web.BaseRequest) -> web.Response:
        inputs, request_format = json_codec.decode_predict(json_codec.parse_body(await request.read()), dtypes)
        outputs = await batches.predict(inputs)
        return web.Response(body=json_codec.encode_predict(outputs, request_format), content_type="application/json")

    async def predict_grpc(request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        outputs = await batches.predict(predict_inputs(request, limit))
        return predict_response(servable, SIGNATURE, outputs, False)

    runner, server = await start_stack(rest_port, grpc_port, predict_rest, predict_grpc,
                      request_deserializer=predict_pb2.PredictRequest.FromString,
                      response_serializer=predict_pb2.PredictResponse.SerializeToString)
    print("minimal Predict path: serving", flush=True)
    await server.wait_for_termination()  # until the process is stopped; the aiohttp runner serves meanwhile


def main() -> None:
    saved_model, model_name = Path(sys.argv[1]), sys.argv[2]
    rest_port, grpc_port, max_batch_size = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(saved_model, model_name, rest_port, grpc_port, max_batch_size))


if __name__ == "__main__":
    main()
