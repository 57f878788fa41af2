"""The worker processes of one `conveyor serve --server_processes N`, and how they reach each other.

Every worker listens on the same REST and gRPC ports (SO_REUSEPORT: the kernel spreads connections over
them), so any call can land on any worker. What only one worker knows is fetched from the others when a
client asks for it, over each worker's private control socket (a Unix socket in a directory only the
server's user can enter): a metrics scrape, a monitoring snapshot, feedback for a prediction another worker
logged, a ReloadConfig every worker must apply. Nothing is shared per request, so requests cost no more than
in one process.

The control protocol is HTTP on the Unix socket: `POST /<what>` with a body, answered 200 with a body, or
4xx/5xx with {"code": gRPC code name, "message": ...} (the caller raises it as the same ServingError).
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout, UnixConnector, web

from conveyor_ml.serving.errors import ServingError

WORKER_ENVIRONMENT = "CONVEYOR_SERVE_WORKER"  # "index,count,control directory": set by the supervisor
PEER_TIMEOUT_SECONDS = 10.0  # a peer that does not answer a figures call within this is reported UNAVAILABLE

ControlHandler = Callable[[bytes], Awaitable[bytes]]


@dataclass(frozen=True)
class WorkerSlot:
    """Which of the server's worker processes this is."""

    index: int
    count: int
    control_dir: str

    def socket_path(self, index: int) -> str:
        return os.path.join(self.control_dir, f"worker-{index}.sock")

    def ready_path(self, index: int) -> str:
        """Written by a worker once its ports are open: its one-line start-up report."""
        return os.path.join(self.control_dir, f"worker-{index}.ready")

    def environment(self) -> dict[str, str]:
        return {WORKER_ENVIRONMENT: f"{self.index},{self.count},{self.control_dir}"}

    @classmethod
    def from_environment(cls) -> WorkerSlot | None:
        value = os.environ.get(WORKER_ENVIRONMENT)
        if not value:
            return None
        index, count, control_dir = value.split(",", 2)
        return cls(int(index), int(count), control_dir)


class Peers:
    """The other workers, seen from one: control calls to one of them or to all of them at once."""

    def __init__(self, slot: WorkerSlot):
        self.slot = slot
        self.others = [index for index in range(slot.count) if index != slot.index]
        self._sessions: dict[int, ClientSession] = {}

    def _session(self, index: int) -> ClientSession:
        session = self._sessions.get(index)
        if session is None or session.closed:
            session = self._sessions[index] = ClientSession(
                connector=UnixConnector(path=self.slot.socket_path(index)))
        return session

    async def ask(self, index: int, what: str, body: bytes = b"",
                  timeout: float | None = PEER_TIMEOUT_SECONDS) -> bytes:
        """Worker `index`'s answer to control call `what`; its error, or its absence, as a ServingError.
        `timeout=None` waits as long as the work takes (a ReloadConfig loading models: the client's deadline
        bounds it, as in one process)."""
        try:
            async with self._session(index).post(f"http://worker/{what}", data=body,
                                                 timeout=ClientTimeout(total=timeout)) as response:
                answer = await response.read()
        except (ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, f"server process {index} did not answer ({what}): "
                               f"{type(exc).__name__}: {exc}") from None
        if response.status != 200:
            try:
                error = orjson.loads(answer)
                code, message = grpc.StatusCode[error["code"]], error["message"]
            except (orjson.JSONDecodeError, KeyError, TypeError):  # not our handler's answer
                code, message = grpc.StatusCode.INTERNAL, f"server process {index} answered {what} with HTTP " \
                    f"{response.status}: {answer[:200].decode(errors='replace')}"
            raise ServingError(code, message, http_status=response.status)
        return answer

    async def ask_others(self, what: str, body: bytes = b"", listening_only: bool = False,
                         timeout: float | None = PEER_TIMEOUT_SECONDS) -> list[bytes]:
        """Every other worker's answer to `what`, asked at once. `listening_only`: a worker still starting
        (its control socket not there yet) is left out rather than an error: it opens its control socket
        before its public ports, so it has answered no call yet and has nothing to add to figures."""
        starting = self.starting() if listening_only else []
        others = [index for index in self.others if index not in starting]
        return list(await asyncio.gather(*(self.ask(index, what, body, timeout) for index in others)))

    def starting(self) -> list[int]:
        """The other workers whose control socket is not there yet: still loading, before their ports open."""
        return [index for index in self.others if not os.path.exists(self.slot.socket_path(index))]

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


async def start_control_server(slot: WorkerSlot, handlers: dict[str, ControlHandler],
                               max_body_bytes: int) -> web.BaseRunner:
    """Listens on this worker's control socket; `handlers[what](body)` answers `POST /what`. A body may hold
    up to `max_body_bytes` (what a client's request forwarded to this process can grow to)."""

    async def handle(request: web.BaseRequest) -> web.Response:
        handler = handlers.get(request.path.lstrip("/"))
        if request.method != "POST" or handler is None:
            return _error(ServingError(grpc.StatusCode.NOT_FOUND, f"no control call {request.path}"))
        try:
            return web.Response(body=await handler(await request.read()))
        except ServingError as exc:
            return _error(exc)

    def make_request(message, payload, protocol, writer, task) -> web.BaseRequest:
        return web.BaseRequest(message, payload, protocol, writer, task, asyncio.get_running_loop(),
                               client_max_size=max_body_bytes)

    runner = web.ServerRunner(web.Server(handle, request_factory=make_request, access_log=None))
    await runner.setup()
    path = slot.socket_path(slot.index)
    if os.path.exists(path):
        os.unlink(path)  # left by a worker of the same slot that was killed
    await web.UnixSite(runner, path).start()
    return runner


def _error(error: ServingError) -> web.Response:
    return web.Response(status=error.http_status,
                        body=orjson.dumps({"code": error.code.name, "message": error.message}))
