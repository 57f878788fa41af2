"""Dynamic batching, after TF Serving's BasicBatchScheduler.

Requests for the same servable, signature and input shapes join an open batch. A free worker (one of
`num_batch_threads`) takes the open batch as soon as no other request is on its way to the batcher (the
front ends count the calls they admitted and have not handed over yet), or once it is full
(`max_batch_size`), or `batch_timeout_micros` after its first request: an idle server adds no wait, and a
busy one batches what arrives while its workers run (TF Serving waits out the timeout even when nothing
else is coming). Until a worker takes it, an open batch keeps taking requests. At most `max_enqueued_batches` batches (the open one included) wait per
queue; past that a request is refused with UNAVAILABLE, so memory stays bounded under overload. A batch is
padded up to the next `allowed_batch_sizes` entry by repeating its last row. A request may carry a deadline
(--rest_api_timeout_in_ms, a gRPC client's deadline): one already past when its batch runs fails with
DEADLINE_EXCEEDED without running, and the batch's model run is bounded by the latest deadline in it.

Requests submitted from an asyncio event loop get an asyncio future, settled with one call into the loop
per batch (not one thread hand-off per request), and their batch is offered to the workers when the loop
has run everything that was ready (so requests that arrived together are batched together, and workers
are woken once per batch); others get a concurrent.futures.Future and their batch is ready at once. A
batch that holds one request for a model measured as cheaper than a thread hand-off runs on the loop instead
(a worker would have run it at once too: nothing else came to share it).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc
import numpy as np

from conveyor_ml.formats.serving_config import BatchingOptions
from conveyor_ml.serving.errors import ServingError, invalid_argument, unavailable
from conveyor_ml.serving.servable import Servable


@dataclass
class _Task:
    inputs: dict[str, np.ndarray]
    size: int
    deadline: float | None  # time.monotonic() by which the client wants its answer
    future: Future | asyncio.Future
    loop: asyncio.AbstractEventLoop | None  # the loop of an asyncio future
    cheap: bool = False  # the model measured cheaper than a thread hand-off: alone in its batch, run on the loop


@dataclass
class _Batch:
    key: tuple
    servable: Servable
    signature: str
    deadline: float
    tasks: list[_Task] = field(default_factory=list)
    size: int = 0
    ready: bool = False  # a worker may take it once nothing else is arriving (else at its deadline)


class _Queue:
    def __init__(self):
        self.open: _Batch | None = None
        self.closed: deque[_Batch] = deque()

    def depth(self) -> int:
        return len(self.closed) + (1 if self.open else 0)


class Batcher:
    def __init__(self, options: BatchingOptions,
                 on_batch: Callable[[str, int, int], None] | None = None,
                 arriving: Callable[[], int] = lambda: 0):
        """`on_batch(model_name, batch_size, queue_depth)` is told of every batch run (for metrics);
        `arriving()` is how many requests are on their way to the batcher (none: a free worker need not wait)."""
        self.options = options
        self._on_batch = on_batch
        self._arriving = arriving
        self._queues: dict[tuple, _Queue] = {}
        self._condition = threading.Condition()
        self._flush_scheduled = False
        self._stopping = False
        self._workers = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for worker in self._workers:
            worker.start()

    def _task_size(self, inputs: dict[str, np.ndarray]) -> int:
        sizes = {array.shape[0] if array.ndim else -1 for array in inputs.values()}
        if len(sizes) != 1 or -1 in sizes:
            raise invalid_argument("Batching Run() input tensors must have equal 0th-dimension size")
        size = sizes.pop()
        if size > self.options.max_batch_size:
            raise invalid_argument(
                f"Task size {size} is larger than maximum input batch size {self.options.max_batch_size}")
        return size

    def submit(self, servable: Servable, signature: str, inputs: dict[str, np.ndarray],
               deadline: float | None = None, cheap: bool = False) -> Future | asyncio.Future:
        """Queues a request; `cheap`: its model run costs less than handing it to a worker (see _flush)."""
        size = self._task_size(inputs)
        key = (id(servable), signature,
               tuple(sorted((name, array.shape[1:], array.dtype.str) for name, array in inputs.items())))
        try:
            loop = asyncio.get_running_loop()
            task = _Task(inputs, size, deadline, loop.create_future(), loop, cheap)
        except RuntimeError:  # not on an event loop
            task = _Task(inputs, size, deadline, Future(), None, cheap)
        timeout = self.options.batch_timeout_micros / 1e6
        with self._condition:
            if self._stopping:
                raise unavailable("the server is shutting down")
            queue = self._queues.setdefault(key, _Queue())
            batch = queue.open
            if batch is None or batch.size + size > self.options.max_batch_size:
                if batch is not None:
                    queue.closed.append(batch)
                    queue.open = None
                if queue.depth() >= self.options.max_enqueued_batches:
                    raise unavailable("The batch scheduling queue to which this task was submitted is full")
                batch = queue.open = _Batch(key, servable, signature, time.monotonic() + timeout)
            opened = not batch.tasks
            batch.tasks.append(task)
            batch.size += size
            if batch.size == self.options.max_batch_size:
                queue.closed.append(batch)
                queue.open = None
                self._condition.notify()
            elif task.loop is None:  # from a thread: ready now, unless announced requests are to join it
                batch.ready = True
                if opened or self._arriving() <= 0:
                    self._condition.notify()
            elif not self._flush_scheduled:
                # From an event loop: offered to the workers once the loop has run everything ready now, so
                # every request that arrived with this one joins it first, and workers are woken once per
                # batch rather than once per request.
                self._flush_scheduled = True
                task.loop.call_soon(self._flush)
        return task.future

    async def predict(self, servable: Servable, signature: str, inputs: dict[str, np.ndarray],
                      deadline: float | None = None, cheap: bool = False) -> dict[str, np.ndarray]:
        """submit() from the running event loop, awaited. A cheap call yields to the loop once first: _flush
        was queued before that yield, so when it runs the call's lone batch right there, the answer is ready
        as the call resumes, a loop turn sooner than a wake-up by the future (a batch that others joined
        still wakes it)."""
        answer = self.submit(servable, signature, inputs, deadline, cheap)
        if cheap:
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:  # the client went away: as if it had awaited the answer,
                if not answer.cancel():  # a worker skips it; one already given is retrieved (no warning)
                    answer.exception()
                raise
        return await answer

    def _flush(self) -> None:
        """On the loop, once it has run everything ready: open batches go to the workers, except a batch that
        holds one cheap request and nothing queued before it, which runs here at once — handing it to a
        worker and back would cost more than its run, and nothing else came to share it."""
        here = []
        with self._condition:
            self._flush_scheduled = False
            ready = 0
            for queue in self._queues.values():
                batch = queue.open
                if batch is None:
                    continue
                if len(batch.tasks) == 1 and batch.tasks[0].cheap and not queue.closed:
                    queue.open = None
                    here.append(batch)
                else:
                    batch.ready = True
                    ready += 1
            self._condition.notify(ready)
        for batch in here:
            self._run(batch)

    def queue_depth(self) -> int:
        with self._condition:
            return sum(queue.depth() for queue in self._queues.values())

    def _next_batch(self) -> _Batch | None:
        """Waits for a closed batch or an open one past its deadline; None when stopping."""
        with self._condition:
            while not self._stopping:
                now = time.monotonic()
                next_deadline = None
                for key, queue in list(self._queues.items()):
                    if queue.closed:
                        return queue.closed.popleft()
                    if queue.open is not None:
                        if queue.open.deadline <= now or (queue.open.ready and self._arriving() <= 0):
                            batch, queue.open = queue.open, None
                            return batch
                        next_deadline = min(next_deadline or queue.open.deadline, queue.open.deadline)
                    else:
                        del self._queues[key]
                self._condition.wait(None if next_deadline is None else max(0.0, next_deadline - now))
            return None

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: _Batch) -> None:
        outcomes: list[tuple[_Task, dict | None, BaseException | None]] = []
        try:
            self._run_batch(batch, outcomes)
        except Exception as exc:  # a ServingError for the clients, or a bug: either way the worker lives on
            settled = {id(task) for task, _, _ in outcomes}
            outcomes.extend((task, None, exc) for task in batch.tasks if id(task) not in settled)
        _settle(outcomes)

    def _run_batch(self, batch: _Batch, outcomes: list) -> None:
        now = time.monotonic()
        live = []
        for task in batch.tasks:
            if task.future.done():  # the client went away (its future was cancelled)
                continue
            if task.deadline is not None and task.deadline <= now:
                outcomes.append((task, None, ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                          "Deadline exceeded while the request waited for its batch")))
                continue
            live.append(task)
        if not live:
            return
        if self._on_batch:
            self._on_batch(batch.servable.model_name, batch.size, self.queue_depth())
        deadlines = [task.deadline for task in live]
        timeout_ms = None if None in deadlines else max(1, int((max(deadlines) - now) * 1000))
        # A batch of one request costs what the request alone does: noted, it tells whether the model is cheap.
        run = batch.servable.timed_predict if len(live) == 1 else batch.servable.predict
        outputs = run(batch.signature, self._merge(live), timeout_ms=timeout_ms)
        if len(live) == 1 and all(np.ndim(value) == 0 or len(value) == live[0].size for value in outputs.values()):
            outcomes.append((live[0], outputs, None))  # the whole answer is this request's (nothing padded)
            return
        offset = 0
        for task in live:
            outcomes.append((task, {name: value[offset:offset + task.size] if np.ndim(value) else value
                                    for name, value in outputs.items()}, None))
            offset += task.size

    def _merge(self, tasks: list[_Task]) -> dict[str, np.ndarray]:
        size = sum(task.size for task in tasks)
        padded = next((s for s in self.options.allowed_batch_sizes if s >= size), size)
        merged = {}
        for name in tasks[0].inputs:
            parts = [task.inputs[name] for task in tasks]
            if padded > size:
                parts.append(np.repeat(parts[-1][-1:], padded - size, axis=0))
            merged[name] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        return merged

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            pending = [task for queue in self._queues.values()
                       for batch in ([queue.open] if queue.open else []) + list(queue.closed)
                       for task in batch.tasks]
            self._queues.clear()
            self._condition.notify_all()
        _settle([(task, None, unavailable("the server is shutting down")) for task in pending])
        for worker in self._workers:
            worker.join(timeout=2)


def _settle(outcomes: list[tuple[_Task, dict | None, BaseException | None]]) -> None:
    """Gives each task its result or error: concurrent futures at once, asyncio futures in one call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for task, result, error in outcomes:
        if task.loop is not None:
            by_loop.setdefault(task.loop, []).append((task.future, result, error))
        elif task.future.set_running_or_notify_cancel():  # False: cancelled by a client that went away
            if error is not None:
                task.future.set_exception(error)
            else:
                task.future.set_result(result)
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for loop, settled in by_loop.items():
        if loop is running:  # a batch run on the loop itself (Batcher._flush)
            _settle_on_loop(settled)
            continue
        try:
            loop.call_soon_threadsafe(_settle_on_loop, settled)
        except RuntimeError:  # the loop is closed: nobody waits for these answers any more
            pass


def _settle_on_loop(settled: list) -> None:
    for future, result, error in settled:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
