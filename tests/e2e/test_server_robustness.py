"""The server under malformed input (fuzzing) and under version swaps with traffic flowing."""
from __future__ import annotations

import http.client
import json
import shutil
import threading
import time

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor_ml.base.server_process import ServerProcess
from conveyor_ml.formats import release_state as releases

pytestmark = pytest.mark.slow

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=40)
request_like = st.fixed_dictionaries(
    {}, optional={"instances": json_values, "inputs": json_values,
                  "signature_name": st.sampled_from(["", "serving_default", "bytes_predictor", "nope"]) | json_values})
bodies = (st.binary(max_size=300)
          | json_values.map(lambda v: json.dumps(v).encode())
          | request_like.map(lambda v: json.dumps(v).encode())
          | st.builds(lambda n, b64: json.dumps({"signature_name": "bytes_predictor",
                                                  "instances": [{"b64": b64}] * n}).encode(),
                      st.integers(1, 3), st.text(max_size=40)))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, trained_export):
    base = tmp_path_factory.mktemp("fuzz") / "mnist"
    shutil.copytree(trained_export, base / "1")
    with ServerProcess("--model_name", "mnist", "--model_base_path", str(base), "--enable_batching") as server:
        server.wait_available("mnist")
        yield server


@settings(max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
@given(body=bodies, path=st.sampled_from(["/v1/models/mnist:predict", "/v1/models/mnist:classify",
                                          "/v1/models/mnist/versions/1:predict", "/v1/models/mnist:regress"]))
def test_malformed_bodies_never_cause_a_server_error(fuzz_server, body, path):
    connection = http.client.HTTPConnection("127.0.0.1", fuzz_server.rest_port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    assert response.status in (200, 400, 404, 413, 503), (response.status, body[:200], payload[:300])
    if response.status != 200:
        assert "error" in json.loads(payload)


def test_server_is_alive_after_the_fuzzing(fuzz_server):
    assert fuzz_server.process.poll() is None
    response = requests.post(f"{fuzz_server.rest_url}/v1/models/mnist:predict",
                             json={"instances": [[[0.0] * 8] * 8]}, timeout=30)
    assert response.status_code == 200


def test_no_request_fails_while_versions_are_pushed_and_removed(tmp_path, trained_export):
    base = tmp_path / "serving"
    release = releases.read_release(base, "mnist")
    releases.write_version_atomically(release.model_dir, 1, {"": trained_export})
    seen, failures, stop = [], [], threading.Event()

    def client():
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.post(f"{server.rest_url}/v1/models/mnist:predict",
                                        json={"instances": [[[0.0] * 8] * 8]}, timeout=30)
                if response.status_code == 200:
                    seen.append(int(response.headers["X-Model-Version"]))
                else:
                    failures.append((response.status_code, response.text))
            except requests.RequestException as exc:
                failures.append(repr(exc))

    with ServerProcess("--model_name", "mnist", "--model_base_path", str(release.model_dir),
                       "--file_system_poll_wait_seconds", "0.2") as server:
        server.wait_available("mnist", version=1)
        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        try:
            for new, old in ((2, 1), (3, 2)):
                time.sleep(0.5)
                releases.write_version_atomically(release.model_dir, new, {"": trained_export})
                deadline = time.monotonic() + 60
                while (not seen or seen[-1] != new) and time.monotonic() < deadline:
                    time.sleep(0.05)
                shutil.rmtree(release.model_dir / str(old))
            time.sleep(1.0)
        finally:
            stop.set()
            for thread in clients:
                thread.join()
    assert failures == []
    assert {1, 2, 3} <= set(seen)
    assert len(seen) > 50
    assert set(seen[-20:]) == {3}  # once the old versions are gone, only the newest answers
