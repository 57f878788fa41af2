"""The bounded probe before a MySQL metadata connection: what answers at host:port, in one line, where
MLMD's client (no timeouts) would wait forever or say only `mysql_real_connect failed`."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from conveyor_ml.metadata import store


def one_shot_server(greeting: bytes) -> int:
    """A port whose first connection receives `greeting`, then is closed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer() -> None:
        connection, _ = listener.accept()
        if greeting:
            connection.sendall(greeting)
        time.sleep(0.2)
        connection.close()
        listener.close()

    threading.Thread(target=answer, daemon=True).start()
    return listener.getsockname()[1]


@pytest.mark.parametrize(("greeting", "said"), [
    (b"\x0a\x00\x00\x00\x0a5.7.44\x00\x01\x00\x00\x00", None),  # protocol 10: a MySQL server
    (b"\x17\x00\x00\x00\xff\x10\x04Too many connections",
     "the server turned the connection away: Too many connections (error 1040)"),
    (b"\x25\x00\x00\x00\xff\x69\x04#HY000Host '10.0.0.7' is blocked",
     "the server turned the connection away: Host '10.0.0.7' is blocked (error 1129)"),
    (b"HTTP/1.0 400 Bad Request\r\n\r\n", "what answers there is not a MySQL server; fix metadata.mysql.port"),
    (b"", "the connection was closed without a MySQL greeting (a proxy whose server is down, or not a MySQL "
          "server); check the server, or fix metadata.mysql.port"),
])
def test_probe_says_what_answers(greeting, said):
    assert store._probe_mysql("127.0.0.1", one_shot_server(greeting)) == said


def test_probe_of_a_closed_port_and_of_a_silent_one(monkeypatch):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: refused
        assert store._probe_mysql("127.0.0.1", port) == (
            "no server answers there (Connection refused); start it or fix metadata.mysql.host/port")
    monkeypatch.setattr(store, "GREETING_TIMEOUT_S", 0.3)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel accepts; nothing ever speaks
        started = time.monotonic()
        said = store._probe_mysql("127.0.0.1", silent.getsockname()[1])
    assert time.monotonic() - started < 2
    assert said.startswith("something accepts connections there but sends no MySQL greeting within 0.3 s")
