"""Which thread runs a model: a Session run executes on the thread that calls it (no inter-op pool hand-off)
unless the user sized the inter-op pool or a deadline needs a run TensorFlow can stop; a request for a cheap
model runs on the event loop, with batching when its batch holds it alone; requests that came together are
batched on a worker.

The probe model is a TF1 SavedModel whose only op is a py_func recording the thread it runs on (the py_func
is registered in this process, so the model loads only here, while the probe holds its graph)."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2

from conveyor_ml.serving.model_server import INLINE_RUN_SECONDS, ModelServer, ServerOptions
from conveyor_ml.serving.servable import RECENT_RUNS, LoadOptions, SavedModelServable

v1 = tf.compat.v1
GATED = -1.0  # a row value whose run waits for ThreadProbe.gate


class ThreadProbe:
    """Writes the probe model to `export_dir`; `threads` lists the thread ident of every run, in order."""

    def __init__(self, export_dir: Path):
        self.threads: list[int] = []
        self.values: list[list[float]] = []  # the rows of each run
        self.gate = threading.Event()  # a run of a row holding GATED waits for it
        self.gate.set()
        self.graph = tf.Graph()  # kept alive: the py_func's registration lives as long as its graph

        def record(x):
            self.threads.append(threading.get_ident())
            self.values.append(x.reshape(-1).tolist())
            if GATED in self.values[-1]:
                self.gate.wait(timeout=30)
            return x

        with self.graph.as_default(), v1.Session(graph=self.graph) as session:
            x = v1.placeholder(tf.float32, [None, 1], name="x")
            y = tf.identity(v1.py_func(record, [x], tf.float32, stateful=True), name="y")
            info = v1.saved_model.utils.build_tensor_info
            signature = v1.saved_model.signature_def_utils.build_signature_def(
                {"x": info(x)}, {"y": info(y)}, v1.saved_model.signature_constants.PREDICT_METHOD_NAME)
            builder = v1.saved_model.Builder(str(export_dir))
            builder.add_meta_graph_and_variables(session, [v1.saved_model.SERVING],
                                                 signature_def_map={"serving_default": signature})
            builder.save()


@pytest.fixture
def probe(tmp_path):
    return ThreadProbe(tmp_path / "probe" / "1")


def one_row() -> dict[str, np.ndarray]:
    return {"x": np.array([[2.0]], np.float32)}


def test_a_session_run_executes_on_the_calling_thread(probe, tmp_path):
    servable = SavedModelServable("probe", 1, tmp_path / "probe" / "1")
    outputs = servable.predict("serving_default", one_row())
    np.testing.assert_array_equal(outputs["y"], [[2.0]])
    assert probe.threads == [threading.get_ident()]


def test_a_sized_inter_op_pool_runs_every_op_on_it(probe, tmp_path):
    config = config_pb2.ConfigProto(inter_op_parallelism_threads=2)
    servable = SavedModelServable("probe", 1, tmp_path / "probe" / "1", LoadOptions(session_config=config))
    servable.predict("serving_default", one_row())
    assert probe.threads and probe.threads[-1] != threading.get_ident()


def test_a_run_with_a_deadline_takes_the_pool_until_the_model_is_known_to_be_quick(probe, tmp_path):
    servable = SavedModelServable("probe", 1, tmp_path / "probe" / "1")
    servable.predict("serving_default", one_row(), timeout_ms=5000)
    assert probe.threads[-1] != threading.get_ident()  # cost unknown: a run TensorFlow can stop at the deadline
    servable.timed_predict("serving_default", one_row())  # measured: far under a tenth of 5 s
    servable.predict("serving_default", one_row(), timeout_ms=5000)
    assert probe.threads[-1] == threading.get_ident()
    for _ in range(RECENT_RUNS):
        servable.note_run_seconds(2.0)  # as if the model had become slow
    servable.predict("serving_default", one_row(), timeout_ms=5000)
    assert probe.threads[-1] != threading.get_ident()


def test_the_cost_estimate_is_the_fastest_recent_run(probe, tmp_path):
    servable = SavedModelServable("probe", 1, tmp_path / "probe" / "1")
    assert servable.estimated_run_seconds() is None
    servable.note_run_seconds(0.010)
    servable.note_run_seconds(0.0001)
    servable.note_run_seconds(0.050)  # a call that waited for the CPU does not raise it
    assert servable.estimated_run_seconds() == pytest.approx(0.0001)
    for _ in range(RECENT_RUNS):
        servable.note_run_seconds(0.004)  # the model really became slower: the estimate follows
    assert servable.estimated_run_seconds() == pytest.approx(0.004)


def test_the_cost_estimate_grows_with_the_size_of_a_calls_inputs(probe, tmp_path):
    servable = SavedModelServable("probe", 1, tmp_path / "probe" / "1")
    servable.note_run_seconds(0.0001, size=1)
    assert servable.estimated_run_seconds(1) == pytest.approx(0.0001)
    assert servable.estimated_run_seconds(10) == pytest.approx(0.001)  # in proportion to one-value calls
    servable.note_run_seconds(0.0008, size=32)  # a 32-value call: 25 us a value
    assert servable.estimated_run_seconds(10) == pytest.approx(0.0008)  # smaller than it: no more than it
    assert servable.estimated_run_seconds(64) == pytest.approx(0.0016)  # the 32-row call, doubled
    assert servable.estimated_run_seconds(1) == pytest.approx(0.0001)


def test_a_timed_call_is_noted_with_its_input_size(probe, tmp_path):
    servable = SavedModelServable("probe", 1, tmp_path / "probe" / "1")
    servable.timed_predict("serving_default", {"x": np.ones((5, 1), np.float32)})
    cost = servable.estimated_run_seconds(5)
    assert cost > 0
    assert servable.estimated_run_seconds(1) == pytest.approx(cost)  # noted as 5 values, not 1
    assert servable.estimated_run_seconds(10) == pytest.approx(2 * cost)


def batching_server(tmp_path) -> ModelServer:
    parameters = tmp_path / "batching.config"
    parameters.write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 1000 }\n"
                          "num_batch_threads { value: 1 }\n")
    options = ServerOptions(model_name="probe", model_base_path=str(tmp_path / "probe"),
                            file_system_poll_wait_seconds=0, enable_batching=True,
                            batching_parameters_file=str(parameters))
    server = ModelServer(options)
    server.start_polling()
    return server


async def predict_row(server: ModelServer, value: float) -> dict[str, np.ndarray]:
    """One predict call for a one-row request, admitted and finished as the front ends do."""
    servable = server.resolve("probe", None, None, None)
    call = server.begin("probe", "predict", "rest", 64)
    try:
        return await server.predict(call, servable, "serving_default", {"x": np.array([[value]], np.float32)})
    finally:
        server.finish(call)


def predict_together(server: ModelServer, calls: int) -> None:
    """`calls` predict calls sent in the same turn of the event loop (as requests read together arrive)."""
    async def one(value: float):
        outputs = await predict_row(server, value)
        np.testing.assert_array_equal(outputs["y"], [[value]])

    async def scenario():
        await asyncio.gather(*(one(float(k)) for k in range(calls)))

    asyncio.run(scenario())


def test_with_batching_a_lone_call_for_a_cheap_model_runs_on_the_event_loop(probe, tmp_path):
    server = batching_server(tmp_path)
    try:
        servable = server.resolve("probe", None, None, None)
        predict_together(server, calls=1)
        assert probe.threads[-1] != threading.get_ident()  # cost unknown: the batch worker ran it, timed
        assert servable.estimated_run_seconds() is not None
        if servable.estimated_run_seconds() >= INLINE_RUN_SECONDS:  # a loaded machine: state it, not time it
            servable.note_run_seconds(INLINE_RUN_SECONDS / 4)
        runs = len(probe.threads)
        predict_together(server, calls=1)
        assert probe.threads[runs:] == [threading.get_ident()]  # asyncio.run's loop is this thread
        predict_together(server, calls=3)
        # Three together: one batch of three (one run of the model), on the worker.
        assert len(probe.threads) == runs + 2 and probe.threads[-1] != threading.get_ident()
        assert server.batcher.queue_depth() == 0
    finally:
        server.stop()


def test_with_batching_a_lone_call_of_many_rows_goes_to_a_worker(probe, tmp_path):
    server = batching_server(tmp_path)
    try:
        servable = server.resolve("probe", None, None, None)
        for _ in range(RECENT_RUNS):
            servable.note_run_seconds(INLINE_RUN_SECONDS / 4)  # cheap, measured on one-value calls
        rows = np.arange(8, dtype=np.float32).reshape(8, 1)  # 8 rows: twice the inline budget

        async def scenario():
            call = server.begin("probe", "predict", "rest", 64)
            try:
                return await server.predict(call, servable, "serving_default", {"x": rows})
            finally:
                server.finish(call)

        outputs = asyncio.run(scenario())
        np.testing.assert_array_equal(outputs["y"], rows)
        assert probe.threads[-1] != threading.get_ident()  # the worker ran it, not the event loop
    finally:
        server.stop()


def test_calls_cancelled_while_they_wait_for_their_batch_are_not_run(probe, tmp_path):
    """A client that goes away right after its call joined a batch (during the cheap call's yield to the
    loop): the batch that later reaches a worker skips it, as it skips a call whose answer was awaited."""
    server = batching_server(tmp_path)
    try:
        servable = server.resolve("probe", None, None, None)
        predict_together(server, calls=1)  # measured...
        servable.note_run_seconds(INLINE_RUN_SECONDS / 4)  # ...and cheap, whatever this machine's load

        async def scenario():
            probe.gate.clear()
            # Two together: one batch, to the only worker, which the gated row holds.
            blocking = [asyncio.create_task(predict_row(server, v)) for v in (GATED, 5.0)]
            for _ in range(500):  # until the worker holds it (a loaded machine may take a while)
                if probe.values[-1] == [GATED, 5.0]:
                    break
                await asyncio.sleep(0.02)
            assert probe.values[-1] == [GATED, 5.0]
            gone = [asyncio.create_task(predict_row(server, v)) for v in (7.0, 8.0)]
            await asyncio.sleep(0)  # both submitted, a batch of two: each now yields once
            for task in gone:
                task.cancel()
            results = await asyncio.gather(*gone, return_exceptions=True)
            assert all(isinstance(result, asyncio.CancelledError) for result in results)
            probe.gate.set()
            answers = await asyncio.gather(*blocking)
            assert [float(answer["y"][0, 0]) for answer in answers] == [GATED, 5.0]
            for _ in range(500):  # until the worker has taken the cancelled calls' batch
                if server.batcher.queue_depth() == 0:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)  # and done with it (nothing to run: it returns at once)

        asyncio.run(scenario())
        assert [7.0, 8.0] not in probe.values and 7.0 not in sum(probe.values, [])
        assert server.batcher.queue_depth() == 0
    finally:
        probe.gate.set()
        server.stop()
