"""Bounds on the connections clients may hold: how many, and how long one may sit idle.

Every connection holds a file descriptor. Unbounded, ~20,000 connections that sent half a request line and
stalled (about 130 MB here) took every descriptor this process may open: new clients were refused, and the
server could no longer open a version's files to load it (its version polling failed every second) until
the clients let go, an hour later (aiohttp's low-level server keeps an idle connection 3,630 s). Bounded:
- the process's open-file limit is raised to its hard limit at start (as Go's runtime does);
- each listener (REST, the gRPC port, the gRPC Unix socket) may hold `max_connections`, by default its share
  of what the limit allows with RESERVED_FILES kept back for the server's own files (model versions, configs,
  logs);
- at the bound, a new REST connection takes the place of the connection idle the longest (no request in
  progress: a half-sent request line counts as idle), or is answered 503 and closed when every connection
  is busy; grpc refuses connections past the bound itself (grpc.max_allowed_incoming_connections);
- a connection with nothing in flight for the idle timeout is closed: REST between requests and before
  a request's headers are complete, gRPC before its HTTP/2 preface (grpc.server_handshake_timeout_ms) and
  between calls (grpc.max_connection_idle_ms: a GOAWAY, after which clients reconnect on their next call).
"""
from __future__ import annotations

import logging
import resource
from collections import OrderedDict

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("conveyor.serving")

RESERVED_FILES = 512  # descriptors kept from clients: a SavedModel's files, configs, logs, the peers' sockets
MIN_CONNECTIONS = 64
KERNEL_FILE_LIMIT = 1 << 20  # Linux's default fs.nr_open: what an unlimited hard limit allows
AT_CAPACITY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n%s")


def raise_open_file_limit() -> int:
    """Raises this process's open-file limit to its hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else KERNEL_FILE_LIMIT  # Linux allows no more than nr_open
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft
    return target


def default_max_connections(open_files: int, listeners: int) -> int:
    """Connections each listener (REST, the gRPC port, the gRPC Unix socket: grpc bounds each of its own)
    may hold, with RESERVED_FILES descriptors kept back."""
    return max(MIN_CONNECTIONS, (open_files - RESERVED_FILES) // max(1, listeners))


class BoundedServer(web.Server):
    """aiohttp's low-level server holding at most `max_connections`: past it, the connection idle the
    longest makes room for the new one, which is answered 503 and closed when none is idle. An idle
    connection (none of its requests in progress) is closed after `keepalive_timeout` seconds (a keyword
    argument of aiohttp's, here bounding the wait for a request's headers too). Built on what aiohttp's
    Server does for every connection (connection_made, connection_lost, its _connections dict, counted here
    without copying it); the pinned aiohttp's behaviour is checked by tests/e2e/test_server_reliability.py."""

    def __init__(self, handler, *, max_connections: int, **kwargs):
        self._handler = handler
        self.max_connections = max_connections
        # Connections with no request in progress, the one idle the longest first.
        self._idle: OrderedDict[RequestHandler, None] = OrderedDict()
        self.evicted = 0
        self.refused = 0
        super().__init__(self._handle, **kwargs)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        connection = request.protocol
        self._idle.pop(connection, None)
        try:
            return await self._handler(request)
        finally:
            if connection.transport is not None:  # still open: idle again, the most recently active
                self._idle[connection] = None

    def connection_made(self, handler: RequestHandler, transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) > self.max_connections:
            self._make_room(handler, transport)
        else:
            self._idle[handler] = None

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._idle.pop(handler, None)
        super().connection_lost(handler, exc)

    def _make_room(self, handler: RequestHandler, transport) -> None:
        if self._idle:
            oldest, _ = self._idle.popitem(last=False)
            oldest.force_close()
            self._idle[handler] = None
            self.evicted += 1
            self._log("closed the connection idle the longest", self.evicted)
            return
        body = (b'{"error": "The server holds its maximum of %d connections, all busy; retry later '
                b'(--max_connections)"}' % self.max_connections)
        transport.write(AT_CAPACITY % (len(body), body))
        # Closed once aiohttp has started the connection's task (it does so after this call): closed here, the
        # task found its connection gone and failed an assertion, one logged traceback per refusal.
        self._loop.call_soon(handler.force_close)
        self.refused += 1
        self._log("answered a new connection 503", self.refused)

    def _log(self, what: str, count: int) -> None:
        if count == 1 or count % 1000 == 0:  # the first and every thousandth: a flood cannot flood the log
            log.warning("REST holds its maximum of %d connections: %s (#%d so far)", self.max_connections,
                        what, count)
