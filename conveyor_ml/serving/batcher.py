"""Dynamic batching, after TF Serving's BasicBatchScheduler.

Requests for the same servable, signature and input shapes join an open batch; the batch closes when it
is full (`max_batch_size`) or `batch_timeout_micros` after its first request, then waits for one of
`num_batch_threads` workers. At most `max_enqueued_batches` batches (the open one included) wait per
queue; past that a request is refused with UNAVAILABLE, so memory stays bounded under overload. A batch is
padded up to the next `allowed_batch_sizes` entry by repeating its last row. A request may carry a deadline
(--rest_api_timeout_in_ms, a gRPC client's deadline): one already past when its batch runs fails with
DEADLINE_EXCEEDED without running, and the batch's model run is bounded by the latest deadline in it.
"""
from __future__ import annotations

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
    deadline: float | None = None  # time.monotonic() by which the client wants its answer
    future: Future = field(default_factory=Future)


@dataclass
class _Batch:
    key: tuple
    servable: Servable
    signature: str
    deadline: float
    tasks: list[_Task] = field(default_factory=list)
    size: int = 0


class _Queue:
    def __init__(self):
        self.open: _Batch | None = None
        self.closed: deque[_Batch] = deque()

    def depth(self) -> int:
        return len(self.closed) + (1 if self.open else 0)


class Batcher:
    def __init__(self, options: BatchingOptions,
                 on_batch: Callable[[str, int, int], None] | None = None):
        """`on_batch(model_name, batch_size, queue_depth)` is told of every batch run (for metrics)."""
        self.options = options
        self._on_batch = on_batch
        self._queues: dict[tuple, _Queue] = {}
        self._condition = threading.Condition()
        self._stopping = False
        self._workers = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for worker in self._workers:
            worker.start()

    def submit(self, servable: Servable, signature: str, inputs: dict[str, np.ndarray],
               deadline: float | None = None) -> Future:
        sizes = {array.shape[0] if array.ndim else -1 for array in inputs.values()}
        if len(sizes) != 1 or -1 in sizes:
            raise invalid_argument("Batching Run() input tensors must have equal 0th-dimension size")
        size = sizes.pop()
        if size > self.options.max_batch_size:
            raise invalid_argument(
                f"Task size {size} is larger than maximum input batch size {self.options.max_batch_size}")
        key = (id(servable), signature,
               tuple(sorted((name, array.shape[1:], array.dtype.str) for name, array in inputs.items())))
        task = _Task(inputs, size, deadline)
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
            batch.tasks.append(task)
            batch.size += size
            # With a zero timeout the batch closes when a worker takes it: only requests that arrive
            # while every worker is busy are merged, as in TF Serving.
            if batch.size == self.options.max_batch_size:
                queue.closed.append(batch)
                queue.open = None
            self._condition.notify()
        return task.future

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
                        if queue.open.deadline <= now:
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
        # A client that went away cancels its future; claiming each future first means a cancelled one is
        # skipped and a claimed one can no longer be cancelled, so setting results below cannot fail (an
        # unclaimed cancelled future made set_result raise and killed the worker: every later batch hung).
        live = [task.future.set_running_or_notify_cancel() for task in batch.tasks]
        now = time.monotonic()
        for index, task in enumerate(batch.tasks):
            if live[index] and task.deadline is not None and task.deadline <= now:
                task.future.set_exception(ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                       "Deadline exceeded while the request waited for its batch"))
                live[index] = False
        if not any(live):
            return
        if self._on_batch:
            self._on_batch(batch.servable.model_name, batch.size, self.queue_depth())
        deadlines = [task.deadline for task, claimed in zip(batch.tasks, live) if claimed]
        timeout_ms = None if None in deadlines else max(1, int((max(deadlines) - now) * 1000))
        try:
            outputs = batch.servable.predict(batch.signature, self._merge(batch), timeout_ms=timeout_ms)
        except Exception as exc:  # a ServingError for the client, or a bug: either way the worker lives on
            for task, claimed in zip(batch.tasks, live):
                if claimed:
                    task.future.set_exception(exc)
            return
        offset = 0
        for task, claimed in zip(batch.tasks, live):
            if claimed:
                task.future.set_result({name: value[offset:offset + task.size] if np.ndim(value) else value
                                        for name, value in outputs.items()})
            offset += task.size

    def _merge(self, batch: _Batch) -> dict[str, np.ndarray]:
        padded = next((s for s in self.options.allowed_batch_sizes if s >= batch.size), batch.size)
        merged = {}
        for name in batch.tasks[0].inputs:
            parts = [task.inputs[name] for task in batch.tasks]
            if padded > batch.size:
                parts.append(np.repeat(parts[-1][-1:], padded - batch.size, axis=0))
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
        for task in pending:
            task.future.set_exception(unavailable("the server is shutting down"))
        for worker in self._workers:
            worker.join(timeout=5)
