"""Local TCP ports: free ones for child servers (the model server, multi-worker training) on 127.0.0.1, and
whether a server can listen on the one it is given."""
from __future__ import annotations

import socket

from conveyor_ml.base.errors import ConveyorError


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_port_free(host: str, port: int, what: str) -> None:
    """Unless a listener could bind host:port now, as grpc and aiohttp bind (SO_REUSEADDR, no SO_REUSEPORT:
    a port another process listens on is refused, not shared with it), raises ConveyorError in one line naming
    host:port, `what` would listen there (REST, gRPC) and why: the port is taken (the system's words), or the
    host cannot be resolved (not taken for a port in use)."""
    where = f"cannot listen on {host}:{port} ({what})"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode (a label > 63)
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConveyorError(f"{where}: the host {host!r} cannot be resolved ({reason})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConveyorError(f"{where}: {exc.strerror or exc}") from None
