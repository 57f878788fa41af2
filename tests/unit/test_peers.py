"""Control calls between server processes (serving/peers.py) over real Unix sockets: answers, errors carried
with their gRPC code, a process that is not there, and one still starting."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from conveyor_ml.serving.errors import ServingError, invalid_argument
from conveyor_ml.serving.peers import Peers, WorkerSlot, start_control_server


async def echo(body: bytes) -> bytes:
    return b"echo:" + body


async def refuse(body: bytes) -> bytes:
    raise invalid_argument(f"feedback for {body.decode()}: 2 labels for 1 predicted instances")


def run_with_peer(tmp_path, scenario, peers_listening=(1,), count=3):
    """Runs `scenario(peers)` as process 0 of `count`, with the processes in `peers_listening` answering."""

    async def main():
        runners = [await start_control_server(WorkerSlot(index, count, str(tmp_path)),
                                              {"echo": echo, "refuse": refuse}, max_body_bytes=4 << 20)
                   for index in peers_listening]
        peers = Peers(WorkerSlot(0, count, str(tmp_path)))
        try:
            return await scenario(peers)
        finally:
            await peers.close()
            for runner in runners:
                await runner.cleanup()

    return asyncio.run(main())


def test_an_answer_and_an_error_with_its_code(tmp_path):
    async def scenario(peers):
        answer = await peers.ask(1, "echo", b"hello")
        with pytest.raises(ServingError) as refused:
            await peers.ask(1, "refuse", b"0-abc")
        with pytest.raises(ServingError) as unknown:
            await peers.ask(1, "no-such-call")
        return answer, refused.value, unknown.value

    answer, refused, unknown = run_with_peer(tmp_path, scenario)
    assert answer == b"echo:hello"
    assert (refused.code, refused.http_status) == (grpc.StatusCode.INVALID_ARGUMENT, 400)
    assert refused.message == "feedback for 0-abc: 2 labels for 1 predicted instances"
    assert unknown.code == grpc.StatusCode.NOT_FOUND


def test_a_body_larger_than_aiohttps_default_limit_goes_through(tmp_path):
    async def scenario(peers):
        return await peers.ask(1, "echo", b"x" * (3 << 20))  # aiohttp's own default limit is 1 MiB

    assert len(run_with_peer(tmp_path, scenario)) == len(b"echo:") + (3 << 20)


def test_a_process_not_listening_is_unavailable_or_left_out_of_figures(tmp_path):
    async def scenario(peers):
        with pytest.raises(ServingError) as missing:
            await peers.ask_others("echo", b"x")  # process 2 has no control socket
        figures = await peers.ask_others("echo", b"x", listening_only=True)
        return missing.value, figures

    missing, figures = run_with_peer(tmp_path, scenario, peers_listening=(1,), count=3)
    assert missing.code == grpc.StatusCode.UNAVAILABLE
    assert "server process 2 did not answer (echo)" in missing.message
    assert figures == [b"echo:x"]  # process 1's only


def test_the_slot_travels_in_the_environment(tmp_path, monkeypatch):
    slot = WorkerSlot(1, 4, str(tmp_path))
    for name, value in slot.environment().items():
        monkeypatch.setenv(name, value)
    assert WorkerSlot.from_environment() == slot
    assert slot.socket_path(3) == str(tmp_path / "worker-3.sock")
