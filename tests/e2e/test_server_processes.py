"""`conveyor serve --server_processes 2` on the pipeline's model: calls spread over both processes, and what a
client reads back (metrics, monitoring, feedback, ReloadConfig) spans both, wherever its connection lands;
the processes start and stop as one."""
from __future__ import annotations

import shutil
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import psutil
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from conveyor_ml.base.server_process import ServerProcess
from tests.conftest import run_conveyor
from tests.tiny_models import write_tiny_model

pytestmark = pytest.mark.slow
CALLS = 40  # each on a new connection: all of them landing on one process has odds of 2**-39
# grpcio shares one connection between channels to the same target unless told not to.
NEW_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture(scope="module")
def served(trained_export, tmp_path_factory):
    base = tmp_path_factory.mktemp("processes")
    shutil.copytree(trained_export, base / "mnist" / "1")
    server = ServerProcess("--model_name", "mnist", "--model_base_path", str(base / "mnist"), "--enable_prometheus",
                           "--server_processes", "2")
    wait_all_listening(server)
    yield server, base
    server.stop()


def wait_all_listening(server: ServerProcess) -> None:
    """Until every process listens (a model is AVAILABLE once the first has loaded it)."""
    server.wait_listening()
    assert "processes: 2" in server.log_text()


def rest_predict(server, image) -> requests.Response:
    with requests.Session() as fresh:  # a new connection: the kernel picks the process
        response = fresh.post(f"{server.rest_url}/v1/models/mnist:predict",
                              json={"instances": np.asarray(image)[None].tolist()}, timeout=30)
    assert response.status_code == 200, response.text
    return response


def grpc_predict(server, image) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.asarray(image, np.float32)[None]))
    with grpc.insecure_channel(server.grpc_target, options=NEW_CONNECTION) as channel:  # a new connection each time
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)


def scrape(server) -> dict[str, float]:
    with requests.Session() as fresh:
        text = fresh.get(f"{server.rest_url}/monitoring/prometheus/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def counted(figures: dict[str, float], prefix: str) -> float:
    return sum(value for name, value in figures.items() if name.startswith(prefix))


def test_calls_spread_over_both_processes_and_every_scrape_counts_them_all(served, digits_eval):
    server, _ = served
    before = [scrape(server) for _ in range(4)]
    ids = [rest_predict(server, image).headers["X-Prediction-Id"] for image in digits_eval.images[:CALLS]]
    for image in digits_eval.images[:10]:
        grpc_predict(server, image)
    assert {prediction_id.split("-")[0] for prediction_id in ids} == {"0", "1"}  # ids name the process
    rest = 'conveyor_requests_total{api="predict",model="mnist",protocol="rest",status="OK",version="1"}'
    grpc_ = 'conveyor_requests_total{api="predict",model="mnist",protocol="grpc",status="OK",version="1"}'
    tf_serving = ':tensorflow:serving:request_count{model_name="mnist",status="OK"}'
    for earlier in before:  # four scrapes on new connections: whichever process answers, the sums agree
        now = scrape(server)
        assert now.get(rest, 0) - earlier.get(rest, 0) == CALLS
        assert now.get(grpc_, 0) - earlier.get(grpc_, 0) == 10
        assert now[tf_serving] - earlier.get(tf_serving, 0) >= CALLS + 10  # the scrapes count too
        assert now['conveyor_model_versions_loaded{model="mnist"}'] == 1  # each process loads it: not 2


def test_feedback_reaches_the_process_that_logged_each_prediction(served, digits_eval):
    server, _ = served
    before = requests.get(f"{server.rest_url}/v1/models/mnist/monitoring", timeout=10).json()["versions"].get("1")
    before = before or {"predictions": 0, "feedback": {"count": 0, "correct": 0}}
    ids, predicted = [], []
    for image in digits_eval.images[:12]:
        response = rest_predict(server, image)
        ids.append(response.headers["X-Prediction-Id"])
        predicted.append(int(np.ravel(response.json()["predictions"][0]["class_ids"])[0]))
    truth = [guess if i % 3 else (guess + 1) % 10 for i, guess in enumerate(predicted)]  # 8 right, 4 wrong
    entries = [{"prediction_id": i, "labels": [label]} for i, label in zip(ids, truth)]
    entries += [entries[0], {"prediction_id": "1-" + "0" * 32, "labels": [1]}, {"prediction_id": "x", "labels": [1]}]
    result = requests.post(f"{server.rest_url}/v1/models/mnist/feedback", json={"feedback": entries}, timeout=30)
    assert result.status_code == 200, result.text
    answer = result.json()
    assert answer["accepted"] == 12
    assert answer["unknown_prediction_ids"] == [ids[0], "1-" + "0" * 32, "x"]  # a replay, never issued, no process
    after = requests.get(f"{server.rest_url}/v1/models/mnist/monitoring", timeout=10).json()["versions"]["1"]
    count, correct = after["feedback"]["count"] - before["feedback"]["count"], after["feedback"]["correct"] - \
        before["feedback"]["correct"]
    assert (count, correct) == (12, 8)
    assert answer["live_accuracy"]["1"] == pytest.approx(after["feedback"]["correct"] / after["feedback"]["count"])
    assert after["predictions"] == before["predictions"] + 12  # both processes' windows (neither full yet)
    figures = scrape(server)
    right = figures['conveyor_feedback_total{model="mnist",outcome="correct",version="1"}']
    wrong = figures['conveyor_feedback_total{model="mnist",outcome="wrong",version="1"}']
    assert right + wrong == after["feedback"]["count"]
    assert figures['conveyor_live_accuracy{model="mnist",version="1"}'] == pytest.approx(right / (right + wrong))


def test_a_malformed_feedback_entry_changes_nothing_in_any_process(served, digits_eval):
    server, _ = served
    ids = [rest_predict(server, image).headers["X-Prediction-Id"] for image in digits_eval.images[:6]]
    before = requests.get(f"{server.rest_url}/v1/models/mnist/monitoring", timeout=10).json()["versions"]["1"]
    entries = [{"prediction_id": i, "labels": [1]} for i in ids] + [{"prediction_id": ids[0], "labels": "one"}]
    result = requests.post(f"{server.rest_url}/v1/models/mnist/feedback", json={"feedback": entries}, timeout=30)
    assert result.status_code == 400
    after = requests.get(f"{server.rest_url}/v1/models/mnist/monitoring", timeout=10).json()["versions"]["1"]
    assert after["feedback"] == before["feedback"]


def test_a_large_feedback_body_is_forwarded_whole(served):
    server, _ = served
    never_issued = [f"{index % 2}-{number:032x}" for index, number in enumerate(range(40_000))]  # ~2 MB of JSON
    result = requests.post(f"{server.rest_url}/v1/models/mnist/feedback", timeout=60, json={
        "feedback": [{"prediction_id": prediction_id, "labels": [1]} for prediction_id in never_issued]})
    assert result.status_code == 200, result.text[:300]
    assert result.json()["unknown_prediction_ids"] == never_issued


def test_reload_config_applies_in_every_process(served):
    server, base = served
    shutil.copytree(base / "mnist", base / "digits")
    config = model_server_config_pb2.ModelServerConfig()
    for name in ("mnist", "digits"):
        config.model_config_list.config.add(name=name, base_path=str(base / name), model_platform="tensorflow")
    with grpc.insecure_channel(server.grpc_target, options=NEW_CONNECTION) as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=config), timeout=120)
    assert response.status.error_code == 0
    for _ in range(12):  # new connections: both processes answer for the new model
        with requests.Session() as fresh:
            status = fresh.get(f"{server.rest_url}/v1/models/digits", timeout=10)
        assert status.status_code == 200 and status.json()["model_version_status"][0]["state"] == "AVAILABLE"
    loaded = scrape(server)
    assert loaded['conveyor_model_versions_loaded{model="digits"}'] == 1


def test_reloads_sent_at_once_to_different_processes_leave_every_process_the_same(served):
    server, base = served
    both, one = model_server_config_pb2.ModelServerConfig(), model_server_config_pb2.ModelServerConfig()
    for config, names in ((both, ("mnist", "digits")), (one, ("mnist",))):
        for name in names:
            config.model_config_list.config.add(name=name, base_path=str(base / name), model_platform="tensorflow")
    if not (base / "digits").exists():
        shutil.copytree(base / "mnist", base / "digits")

    def reload(config) -> int:
        # Each on its own connection, so the reloads land on both processes.
        with grpc.insecure_channel(server.grpc_target, options=NEW_CONNECTION) as channel:
            return model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
                model_management_pb2.ReloadConfigRequest(config=config), timeout=120).status.error_code

    applied = server.log_text().count("[process 0] ReloadConfig applied in all 2 server processes")
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(reload, [both, one] * 4)) == [0] * 8
    # Each went through the first process, wherever it landed: one at a time, so every process ends alike.
    assert server.log_text().count("[process 0] ReloadConfig applied in all 2 server processes") == \
        applied + 8
    seen = set()
    for _ in range(12):
        with requests.Session() as fresh:
            seen.add(fresh.get(f"{server.rest_url}/v1/models/digits", timeout=10).status_code)
    assert len(seen) == 1, seen  # every process serves digits, or none does


def workers_of(server: ServerProcess) -> list[psutil.Process]:
    return psutil.Process(server.pid).children()


def wait_gone(processes: list[psutil.Process], timeout: float = 30) -> None:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, alive


def start(trained_export, directory) -> ServerProcess:
    shutil.copytree(trained_export, directory / "mnist" / "1")
    server = ServerProcess("--model_name", "mnist", "--model_base_path", str(directory / "mnist"),
                           "--server_processes", "2")
    wait_all_listening(server)
    return server


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections' TIME_WAIT aside
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_sigterm_stops_every_process_with_status_0(trained_export, tmp_path):
    server = start(trained_export, tmp_path)
    workers = workers_of(server)
    assert len(workers) == 2
    assert server.stop() == 0
    wait_gone(workers)
    assert port_is_free(server.rest_port) and port_is_free(server.grpc_port)


def test_a_dead_process_stops_the_server_with_status_1(trained_export, tmp_path):
    server = start(trained_export, tmp_path)
    workers = workers_of(server)
    workers[1].send_signal(signal.SIGKILL)
    assert server.process.wait(timeout=30) == 1
    wait_gone(workers)
    assert "server process 1" in server.log_tail() and "stopping the others" in server.log_tail()
    server.stop()
    # The temporary log goes with the server; what it said stays readable for an error message.
    assert not server.log_path.exists() and "stopping the others" in server.log_tail()


def test_a_killed_supervisor_takes_its_processes_with_it(trained_export, tmp_path):
    server = start(trained_export, tmp_path)
    workers = workers_of(server)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    wait_gone(workers)
    deadline = time.monotonic() + 10
    while not port_is_free(server.rest_port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert port_is_free(server.rest_port)
    server.stop()


def test_a_port_in_use_is_refused_before_any_process_starts(trained_export, tmp_path):
    shutil.copytree(trained_export, tmp_path / "mnist" / "1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_conveyor("serve", "--model_base_path", str(tmp_path / "mnist"), "--rest_api_port", str(port),
                              "--port", "0", "--grpc_socket_path", str(tmp_path / "grpc.sock"),
                              "--server_processes", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"conveyor: error: cannot listen on 127.0.0.1:{port} (REST): "
                                                      "Address already in use")


def test_one_process_does_not_share_its_grpc_port_with_another_server(tmp_path):
    """grpcio binds with SO_REUSEPORT by default: a second server would silently take half the calls."""
    write_tiny_model(tmp_path / "tiny" / "1")
    other = grpc.server(ThreadPoolExecutor(1))  # grpcio's defaults, as another conveyor serve had them
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        result = run_conveyor("serve", "--model_base_path", str(tmp_path / "tiny"), "--port", str(port),
                              "--rest_api_port", "0", timeout=120)  # sharing the port, it would serve on
    finally:
        other.stop(None)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"conveyor: error: cannot listen on 127.0.0.1:{port} (gRPC): "
                                                      "Address already in use")
    assert "chttp2_server" not in result.stderr, result.stderr  # grpc's own multi-line C++ error, before


# Starts `conveyor serve` on the model directory it is given, as the InfraValidator does, prints the server's
# pid and ports once it listens, and waits to be killed.
STARTER = """import sys, time
from conveyor_ml.base.server_process import ServerProcess
server = ServerProcess("--model_base_path", sys.argv[1])
server.wait_listening()
print(server.pid, server.rest_port, server.grpc_port, flush=True)
time.sleep(120)
"""


def test_a_server_dies_with_the_process_that_started_it(tmp_path):
    """A `conveyor run` killed during its InfraValidator left the candidate's server serving on as an orphan
    (its own session, its output in a file: nothing told it). The kernel now stops it (die_with_parent)."""
    import subprocess
    import sys

    write_tiny_model(tmp_path / "tiny" / "1")
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path / "tiny")], stdout=subprocess.PIPE,
                               text=True)
    server = None
    try:
        pid, rest_port, grpc_port = map(int, starter.stdout.readline().split())
        server = psutil.Process(pid)
        starter.kill()
        starter.wait()
        wait_gone([server])
        assert port_is_free(rest_port) and port_is_free(grpc_port)
    finally:
        starter.kill()
        starter.wait()
        if server is not None and server.is_running():
            server.kill()
