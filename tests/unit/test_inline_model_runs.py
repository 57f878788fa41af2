"""Where an unbatched predict call runs: a model measured as fast runs on the event loop (a pool hand-off
costs more than the call), a slow one, a large request, or one not yet measured, on the protocol's pool."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from conveyor_ml.serving.model_server import (
    INLINE_RUN_SECONDS,
    LARGE_REQUEST_BYTES,
    ModelServer,
    ServerOptions,
)
from conveyor_ml.serving.servable import RECENT_RUNS, LoadOptions, input_size
from tests.tf_serving_models import write_half_plus_two_tflite


@pytest.fixture
def server(tmp_path):
    write_half_plus_two_tflite(tmp_path / "half_plus_two" / "1", with_signature_defs=True)
    options = ServerOptions(model_name="half_plus_two", model_base_path=str(tmp_path / "half_plus_two"),
                            rest_api_num_threads=1, file_system_poll_wait_seconds=0,
                            load=LoadOptions(prefer_tflite_model=True))
    server = ModelServer(options)
    server.start_polling()
    yield server
    server.stop()


def predict_while_the_pool_is_busy(server: ModelServer, nbytes: int = 64,
                                   x: tuple = ([1.0], [3.0])) -> tuple[bool, np.ndarray]:
    """(answered while the REST pool's only thread was blocked?, the answer once it was released)."""
    release = threading.Event()
    blocker = server.executors["rest"].submit(release.wait, 30)

    async def scenario():
        servable = server.resolve("half_plus_two", None, None, None)
        call = server.begin("half_plus_two", "predict", "rest", nbytes)
        try:
            task = asyncio.ensure_future(server.predict(call, servable, "serving_default",
                                                        {"x": np.array(x, np.float32)}))
            done, _ = await asyncio.wait([task], timeout=0.5)
            release.set()
            return bool(done), (await task)["y"]
        finally:
            release.set()
            server.finish(call)

    try:
        return asyncio.run(scenario())
    finally:
        blocker.result(timeout=30)


def predict(server: ModelServer, times: int) -> None:
    async def calls():
        servable = server.resolve("half_plus_two", None, None, None)
        for _ in range(times):
            call = server.begin("half_plus_two", "predict", "rest", 64)
            try:
                await server.predict(call, servable, "serving_default", {"x": np.ones((1, 1), np.float32)})
            finally:
                server.finish(call)

    asyncio.run(calls())


def make_cost(servable, seconds: float) -> None:
    """Makes the servable's cost estimate `seconds`, as if its recent timed calls had all taken that long."""
    for _ in range(RECENT_RUNS):
        servable.note_run_seconds(seconds)


def test_a_model_measured_as_fast_runs_on_the_event_loop(server):
    servable = server.resolve("half_plus_two", None, None, None)
    assert servable.estimated_run_seconds() is None  # not measured yet: the first call goes to the pool
    answered, y = predict_while_the_pool_is_busy(server)
    assert not answered
    np.testing.assert_allclose(y, [[2.5], [3.5]])
    predict(server, 100)
    assert servable.estimated_run_seconds() > 0  # the calls, made one at a time, were measured
    # Whether half_plus_two measures under the threshold depends on the machine's load (CI's took 261 us
    # once): the routing is asserted for a known cost instead of a wall-clock one.
    make_cost(servable, INLINE_RUN_SECONDS / 4)
    answered, y = predict_while_the_pool_is_busy(server)
    assert answered  # it did not need the blocked pool thread
    np.testing.assert_allclose(y, [[2.5], [3.5]])


def test_a_requests_input_size_counts_every_value_of_every_input():
    # Rows of images and the length of sequences alike: what a model's cost grows with.
    assert input_size({"images": np.zeros((3, 8, 8), np.float32)}) == 192
    assert input_size({"tokens": np.zeros((1, 500), np.int64), "length": np.array([500])}) == 501
    assert input_size({"scale": np.float32(2.0)}) == 1


def test_slow_models_and_large_requests_stay_on_the_pool(server):
    servable = server.resolve("half_plus_two", None, None, None)
    make_cost(servable, INLINE_RUN_SECONDS / 4)
    assert not predict_while_the_pool_is_busy(server, nbytes=LARGE_REQUEST_BYTES)[0]

    # Cheap for one row, but a request of 8 rows is estimated at twice the inline budget. (Stated again: the
    # large request above ran on the pool, timed, and a fast machine's measure would make 8 rows cheap too.)
    make_cost(servable, INLINE_RUN_SECONDS / 4)
    answered, y = predict_while_the_pool_is_busy(server, x=tuple([float(k)] for k in range(8)))
    assert not answered
    np.testing.assert_allclose(y, [[0.5 * k + 2] for k in range(8)])

    make_cost(servable, 0.005)  # a model whose calls take 5 ms
    answered, y = predict_while_the_pool_is_busy(server)
    assert not answered
    np.testing.assert_allclose(y, [[2.5], [3.5]])
