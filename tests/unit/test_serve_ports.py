"""`conveyor serve` on a port it cannot listen on, or a host no name resolves: one line, exit status 2, said
before any model loads (a big model took minutes to load, and was then thrown away). One check
(base/ports.check_port_free) serves one process and the supervisor of several alike. Real sockets on
127.0.0.1, a real tiny SavedModel, the real CLI in a child process."""
from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.ports import check_port_free, free_port
from conveyor_ml.base.server_process import ServerProcess
from tests.conftest import run_conveyor
from tests.tiny_models import write_tiny_model

LOADED = "loaded default version 1"  # serving/version_manager.py's line once a version is loaded
UNRESOLVABLE = "no-such-host.invalid"  # .invalid never resolves (RFC 2606)


@pytest.fixture(scope="module")
def model_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve") / "default"
    write_tiny_model(base / "1")
    return base


def test_with_its_ports_free_the_server_loads_the_model_and_logs_it(model_base):
    """What the tests below look for and must not find: they cannot pass for want of a load line."""
    server = ServerProcess("--model_base_path", str(model_base))
    try:
        server.wait_available("default")
        assert LOADED in server.log_text()
    finally:
        server.stop()


class ListeningSocket:
    """A port another program listens on, as a plain socket does."""

    def __enter__(self) -> int:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        return self.socket.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.socket.close()


class GrpcServer:
    """A port another gRPC server listens on with grpcio's defaults (SO_REUSEPORT: it would share it)."""

    def __enter__(self) -> int:
        self.server = grpc.server(ThreadPoolExecutor(1))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return port

    def __exit__(self, *exc) -> None:
        self.server.stop(None)


@pytest.mark.parametrize(("api", "holder"), [("REST", ListeningSocket), ("gRPC", ListeningSocket),
                                             ("gRPC", GrpcServer)])
def test_a_port_taken_is_one_line_and_exit_2_before_any_model_loads(model_base, api, holder):
    with holder() as port:
        other = str(free_port())
        ports = ["--rest_api_port", str(port), "--port", other] if api == "REST" else \
            ["--port", str(port), "--rest_api_port", other]
        result = run_conveyor("serve", "--model_base_path", str(model_base), *ports, timeout=120)
    assert LOADED not in result.stderr and "Restoring parameters" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"conveyor: error: cannot listen on 127.0.0.1:{port} ({api}): Address already in use"
    assert "chttp2_server" not in result.stderr  # grpc's own multi-line C++ refusal


@pytest.mark.parametrize("flags", [("--grpc_host", UNRESOLVABLE), ("--rest_api_host", UNRESOLVABLE),
                                   ("--rest_api_host", UNRESOLVABLE, "--server_processes", "2")],
                         ids=["gRPC", "REST", "REST, server processes"])
def test_a_host_no_name_resolves_is_said_so_not_taken_for_a_port_in_use(model_base, flags):
    rest, grpc_port = free_port(), free_port()
    result = run_conveyor("serve", "--model_base_path", str(model_base), "--rest_api_port", str(rest),
                          "--port", str(grpc_port), *flags, timeout=120)
    api, port = ("gRPC", grpc_port) if flags[0] == "--grpc_host" else ("REST", rest)
    assert LOADED not in result.stderr and result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"conveyor: error: cannot listen on {UNRESOLVABLE}:{port} ({api}): the host "
                           f"'{UNRESOLVABLE}' cannot be resolved ("), last
    assert "in use" not in last and "taken" not in last and "chttp2_server" not in result.stderr


def test_the_one_check_refuses_a_taken_port_and_an_unresolvable_host_and_passes_a_free_port():
    with ListeningSocket() as port:
        with pytest.raises(ConveyorError, match=rf"^cannot listen on 127\.0\.0\.1:{port} \(REST\): "
                                                 r"Address already in use$"):
            check_port_free("127.0.0.1", port, "REST")
    with GrpcServer() as port:  # SO_REUSEPORT does not let a second server share it
        with pytest.raises(ConveyorError, match="Address already in use"):
            check_port_free("127.0.0.1", port, "gRPC")
    with pytest.raises(ConveyorError) as error:
        check_port_free(UNRESOLVABLE, 8500, "gRPC")
    assert str(error.value).startswith(f"cannot listen on {UNRESOLVABLE}:8500 (gRPC): the host "
                                       f"'{UNRESOLVABLE}' cannot be resolved (")
    with pytest.raises(ConveyorError, match="cannot be resolved"):
        check_port_free("a" * 64 + ".example", 8500, "REST")  # a label IDNA cannot encode: UnicodeError
    assert check_port_free("127.0.0.1", free_port(), "REST") is None
