"""The GcpPusher against misbehaving Google Cloud endpoints: the Cloud Storage emulator behind a
fault-injecting proxy and the Vertex AI fake, both on 127.0.0.1, told to answer 5xx/429/4xx, reset
connections, stall, stream huge or endless bodies, send malformed JSON, or leave long-running operations
unfinished. Each test checks the one-line error, what was retried, how long it took, and what the failure
left behind (and that a rerun converges)."""
from __future__ import annotations

import time

import pytest

from conveyor_ml.base.errors import ConveyorError
from tests.fakes.gcs_emulator import FaultyProxy
from tests.fakes.vertex_ai import FakeVertexAI
from tests.unit.test_gcp_pusher import endpoint_rows, objects, push, settings

HUNDRED_MB = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def big_model_artifact(tiny_model_artifact, tmp_path_factory):
    """The tiny model plus a file over 8 MiB: Cloud Storage gets it by resumable upload (a session, then PUTs
    of 8 MiB chunks); smaller files go in one multipart POST."""
    import shutil

    from tfx.types import standard_artifacts

    from tests.artifacts import output

    root = tmp_path_factory.mktemp("big") / "model"
    shutil.copytree(tiny_model_artifact.uri, root)
    (root / "Format-Serving" / "assets").mkdir(exist_ok=True)
    (root / "Format-Serving" / "assets" / "big.bin").write_bytes(b"\x07" * (8 * 1024 * 1024 + 4096))
    model = output(standard_artifacts.Model, root)
    model.id = 4242
    return model


@pytest.fixture
def vertex():
    with FakeVertexAI() as fake:
        yield fake


def failing_push(model, spec, tmp_path) -> tuple[str, float]:
    """(the one-line error, seconds it took)."""
    start = time.monotonic()
    with pytest.raises(ConveyorError) as error:
        push(model, spec, tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith("gcp_pusher: ")
    return message, time.monotonic() - start


def via(proxy, emulator, vertex, prefix: str, **overrides):
    """Settings whose Cloud Storage is the emulator behind `proxy`, under `prefix`."""
    return settings(emulator, vertex, storage_endpoint=proxy.url, prefix=prefix, **overrides)


def statuses(vertex, contains: str) -> list[int]:
    return [r.status for r in vertex.calls(contains)]


# -- Vertex AI --------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_vertex_server_errors_on_reads_are_retried(emulator, vertex, tiny_model_artifact, tmp_path, status):
    vertex.misbehave("/models", "status", times=2, method="GET", status=status, retry_after="1")
    _, rows = push(tiny_model_artifact, settings(emulator, vertex, retry_seconds=5), tmp_path)
    assert statuses(vertex, "/models")[:3] == [status, status, 200]
    assert rows[-1]["traffic_percent"] == 100


@pytest.mark.parametrize("status, words", [(401, "credentials"), (403, "roles/aiplatform.user"),
                                           (404, "gcp_pusher.project"), (400, "UploadModel")])
def test_vertex_client_errors_are_not_retried(emulator, vertex, tiny_model_artifact, tmp_path, status, words):
    vertex.misbehave("models:upload", "status", status=status)
    message, _ = failing_push(tiny_model_artifact, settings(emulator, vertex, retry_seconds=3), tmp_path)
    assert "UploadModel" in message and words in message
    # A 401 makes google-auth try to refresh the credentials, which anonymous ones (the tests') cannot.
    assert str(status) in message or status == 401
    assert statuses(vertex, "models:upload") == [status]
    assert vertex.calls(":deployModel") == []


def test_vertex_server_error_on_a_write_that_may_have_acted_is_not_repeated(
        emulator, vertex, tiny_model_artifact, tmp_path):
    """A 500 or a reset on UploadModel/DeployModel may come after the work was done: repeating it could
    register or deploy twice, so the push fails, saying a rerun converges, and the rerun does."""
    spec = settings(emulator, vertex, retry_seconds=3)
    vertex.misbehave(":deployModel", "status", times=1, status=500)
    message, _ = failing_push(tiny_model_artifact, spec, tmp_path / "one")
    assert "DeployModel" in message and "500" in message and "run the push again" in message
    assert statuses(vertex, ":deployModel") == [500]
    assert endpoint_rows(vertex) == set()  # no traffic anywhere
    vertex.misbehave(":deployModel", "reset", times=1)
    message, _ = failing_push(tiny_model_artifact, spec, tmp_path / "two")
    assert "DeployModel" in message and "connection" in message.lower()
    assert len(vertex.calls(":deployModel")) == 2
    _, rows = push(tiny_model_artifact, spec, tmp_path / "three")
    assert endpoint_rows(vertex) == {("3", 100)}  # versions 1 and 2 registered, never deployed
    assert [(r["version"], r["traffic_percent"]) for r in rows] == [("3", 100)]


def test_vertex_connection_reset_on_a_read_is_retried(emulator, vertex, tiny_model_artifact, tmp_path):
    vertex.misbehave("/endpoints", "reset", times=2, method="GET")
    _, rows = push(tiny_model_artifact, settings(emulator, vertex), tmp_path)
    assert statuses(vertex, "/endpoints")[:3] == [-1, -1, 200]
    assert rows[-1]["traffic_percent"] == 100


def test_vertex_slow_answers_time_out_and_fail_within_the_retry_budget(
        emulator, vertex, tiny_model_artifact, tmp_path):
    vertex.misbehave("/models", "slow", method="GET", seconds=6)
    message, took = failing_push(tiny_model_artifact, settings(emulator, vertex, retry_seconds=2), tmp_path)
    assert "ListModels" in message and "timed out" in message and "retry_seconds" in message
    assert took < 5
    assert vertex.calls("models:upload") == []


def test_a_deploy_operation_that_never_finishes_fails_by_its_deadline(
        emulator, vertex, tiny_model_artifact, tmp_path):
    spec = settings(emulator, vertex, retry_seconds=2, operation_seconds=1.5)
    vertex.misbehave(":deployModel", "pending", times=1)
    message, took = failing_push(tiny_model_artifact, spec, tmp_path / "one")
    assert "DeployModel" in message and "did not finish" in message and "run the push again" in message
    assert took < 6
    assert endpoint_rows(vertex) == set()
    _, rows = push(tiny_model_artifact, spec, tmp_path / "two")  # the rerun converges
    assert endpoint_rows(vertex) == {("2", 100)}


def test_an_operation_that_fails_is_reported_and_moves_no_traffic(
        emulator, vertex, tiny_model_artifact, tmp_path):
    spec = settings(emulator, vertex)
    push(tiny_model_artifact, spec, tmp_path / "one")
    vertex.misbehave(":deployModel", "op_error", times=1, status=400)
    message, _ = failing_push(tiny_model_artifact, spec, tmp_path / "two")
    assert "DeployModel" in message and "injected operation error" in message
    assert endpoint_rows(vertex) == {("1", 100)}
    assert vertex.model("digits")["versions"][0]["versionAliases"] == ["stable"]


@pytest.mark.parametrize("mode, path", [("malformed", "/models"), ("wrong_shape", "/endpoints"),
                                        ("malformed", "/operations/")])
def test_vertex_answers_that_are_not_the_documented_json_fail_with_one_line(
        emulator, vertex, tiny_model_artifact, tmp_path, mode, path):
    vertex.misbehave(path, mode, method="GET")
    if path == "/operations/":
        vertex.misbehave(":deployModel", "pending", times=1)  # so the client polls the operation
    message, took = failing_push(tiny_model_artifact, settings(emulator, vertex, retry_seconds=2), tmp_path)
    assert "Vertex AI" in message and "answer" in message
    assert took < 10
    assert vertex.endpoint("digits-endpoint") is None or endpoint_rows(vertex) == set()  # no traffic moved


def test_a_huge_vertex_answer_is_not_read_into_memory(emulator, vertex, tiny_model_artifact, tmp_path):
    rule = vertex.misbehave("/endpoints", "huge", method="GET", size=HUNDRED_MB)
    message, took = failing_push(tiny_model_artifact, settings(emulator, vertex, retry_seconds=2), tmp_path)
    assert "ListEndpoints" in message and "larger than" in message
    assert rule.sent < HUNDRED_MB // 2
    assert took < 10


def test_an_endless_vertex_answer_is_cut_off_by_the_deadline(emulator, vertex, tiny_model_artifact, tmp_path):
    vertex.misbehave("/models", "endless", method="GET")
    message, took = failing_push(tiny_model_artifact, settings(emulator, vertex, retry_seconds=2), tmp_path)
    assert "ListModels" in message and "timed out" in message
    assert took < 8


# -- Cloud Storage ----------------------------------------------------------------------------
def test_cloud_storage_resets_and_server_errors_are_retried(emulator, vertex, big_model_artifact, tmp_path):
    with FaultyProxy(emulator.port) as proxy:
        proxy.misbehave("PUT", "upload_id", "reset", times=2)  # mid-upload of the big file's chunks
        proxy.fail("POST", "uploadType=resumable", 500, times=1, retry_after="1")
        proxy.fail("POST", "uploadType=multipart", 503, times=1)
        proxy.misbehave("POST", "uploadType=multipart", "reset", times=1)
        proxy.fail("GET", "/o", 429, times=1)
        push(big_model_artifact, via(proxy, emulator, vertex, "resets", retry_seconds=5),
             tmp_path)
    assert proxy.failed == 6
    prefix = f"resets/digits/{big_model_artifact.id}/"
    uploaded = objects(emulator, prefix)
    assert f"{prefix}saved_model.pb" in uploaded and f"{prefix}conveyor-push.json" in uploaded
    assert uploaded[f"{prefix}assets/big.bin"].size == 8 * 1024 * 1024 + 4096


def test_bad_cloud_storage_credentials_fail_at_once_naming_the_fix(
        emulator, vertex, tiny_model_artifact, tmp_path):
    with FaultyProxy(emulator.port) as proxy:
        proxy.fail("GET", "/o", 401)
        proxy.fail("POST", "upload", 401)
        message, took = failing_push(
            tiny_model_artifact, via(proxy, emulator, vertex, "auth", retry_seconds=5),
            tmp_path)
    assert "credentials" in message and "gcloud auth application-default login" in message
    assert took < 4  # not retried for retry_seconds
    assert vertex.calls() == []


def test_a_lost_resumable_upload_session_is_not_reported_as_a_missing_bucket(
        emulator, vertex, big_model_artifact, tmp_path):
    tiny_model_artifact = big_model_artifact
    with FaultyProxy(emulator.port) as proxy:
        proxy.fail("PUT", "upload_id", 404)
        message, _ = failing_push(
            tiny_model_artifact, via(proxy, emulator, vertex, "lost", retry_seconds=2),
            tmp_path / "one")
        assert "does not exist" not in message and "upload session" in message
        assert f"lost/digits/{tiny_model_artifact.id}/conveyor-push.json" not in objects(emulator, "lost/")
        proxy.rules.clear()
        proxy.fail("PUT", "upload_id", 410, times=1)  # a session lost once: the file is started again
        push(tiny_model_artifact, via(proxy, emulator, vertex, "lost"),
             tmp_path / "two")
    assert f"lost/digits/{tiny_model_artifact.id}/conveyor-push.json" in objects(emulator, "lost/")
    assert len(vertex.calls("models:upload")) == 1


def test_a_slow_cloud_storage_times_out_within_the_retry_budget(
        emulator, vertex, tiny_model_artifact, tmp_path):
    with FaultyProxy(emulator.port) as proxy:
        proxy.misbehave("POST", "upload", "slow", seconds=8)
        message, took = failing_push(
            tiny_model_artifact, via(proxy, emulator, vertex, "slow", retry_seconds=1),
            tmp_path)
    assert "timed out" in message and "gs://conveyor-models/slow/digits/" in message
    # Each attempt stops after retry_seconds; google-resumable-media counts only the backoff sleeps against
    # the retry budget, so a few attempts fit (without the timeout: each attempt waits the full 8 s).
    assert took < 7
    assert vertex.calls() == []


@pytest.mark.parametrize("mode", ["huge", "endless"])
def test_cloud_storage_answers_are_read_in_bounded_memory_and_time(
        emulator, vertex, tiny_model_artifact, tmp_path, mode):
    with FaultyProxy(emulator.port) as proxy:
        rule = proxy.misbehave("GET", "conveyor-push.json", mode, size=HUNDRED_MB)
        message, took = failing_push(
            tiny_model_artifact, via(proxy, emulator, vertex, mode, retry_seconds=1),
            tmp_path)
    assert "conveyor-push.json" in message and ("larger than" in message or "timed out" in message)
    assert rule["sent"] < HUNDRED_MB // 2
    assert took < 10
    assert vertex.calls() == []
