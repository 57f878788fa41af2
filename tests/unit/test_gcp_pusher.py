"""The GcpPusher executor against a Cloud Storage emulator and a Vertex AI fake, both on 127.0.0.1, through
the real google-cloud-storage and google-cloud-aiplatform clients."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from tfx.types import standard_artifacts

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import GcpPusherSettings, load_spec
from conveyor_ml.components.artifacts import Deployment
from conveyor_ml.components.gcp_pusher import executor, traffic
from conveyor_ml.components.parameters import parameter_values
from conveyor_ml.metadata import store as metadata
from conveyor_ml.metadata.index import deployment_snapshots
from conveyor_ml.metadata.values import props
from tests.artifacts import output
from tests.fakes.gcs_emulator import FaultyProxy
from tests.fakes.vertex_ai import FakeVertexAI
from tests.unit.conftest import GCS_BUCKET

BUCKET = GCS_BUCKET


@pytest.fixture
def vertex():
    with FakeVertexAI() as fake:
        yield fake


def settings(emulator, vertex, **overrides) -> GcpPusherSettings:
    base = GcpPusherSettings(project="test-project", region="europe-west4", bucket=BUCKET, prefix="models",
                         model_display_name="digits", canary_weight=10, retry_seconds=3,
                         storage_endpoint=emulator.url if emulator else None,
                         vertex_endpoint=vertex.url if vertex else None)
    return replace(base, **overrides)


def push(model, spec: GcpPusherSettings, tmp_path, *, blessed: int = 1):
    blessing = output(standard_artifacts.ModelBlessing, tmp_path / f"blessing-{blessed}")
    blessing.set_int_custom_property("blessed", blessed)
    outputs = {"pushed_model": [output(standard_artifacts.PushedModel, tmp_path / "pushed")],
               "deployment": [output(Deployment, tmp_path / "deployment")]}
    result = executor.Executor().Do({"model": [model], "model_blessing": [blessing]}, outputs,
                                    {"model_name": "digits", "pipeline_name": "digits-ct", **parameter_values(spec)})
    rows = [json.loads((tmp_path / "deployment" / f"version-{a.custom_properties['version'].string_value}"
                        / "deployment.json").read_text())
            for a in result.output_artifacts["deployment"].artifacts]
    return outputs["pushed_model"][0], rows


def objects(emulator, prefix: str) -> dict[str, storage.Blob]:
    client = storage.Client(project="test-project", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": emulator.url})
    return {blob.name: blob for blob in client.list_blobs(BUCKET, prefix=prefix)}


def test_first_push_uploads_registers_and_deploys_at_full_traffic(emulator, vertex, tiny_model_artifact, tmp_path):
    pushed, rows = push(tiny_model_artifact, settings(emulator, vertex), tmp_path)
    prefix = f"models/digits/{tiny_model_artifact.id}/"
    uploaded = objects(emulator, prefix)
    assert f"{prefix}saved_model.pb" in uploaded and f"{prefix}conveyor-push.json" in uploaded
    assert any(name.startswith(f"{prefix}variables/") for name in uploaded)
    assert pushed.get_string_custom_property("pushed_destination") == f"gs://{BUCKET}/{prefix.rstrip('/')}"

    upload = vertex.calls("models:upload")[0].body
    assert upload["model"]["artifactUri"] == f"gs://{BUCKET}/{prefix.rstrip('/')}"
    assert upload["model"]["containerSpec"]["imageUri"].startswith("us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu")
    assert upload["model"]["labels"]["mlmd_model_id"] == str(tiny_model_artifact.id)
    assert upload["model"]["labels"]["conveyor_pipeline"] == "digits-ct"
    assert "parentModel" not in upload or not upload["parentModel"]
    deploy = vertex.calls(":deployModel")[0].body
    assert deploy["trafficSplit"] == {"0": 100}
    assert deploy["deployedModel"]["dedicatedResources"]["machineSpec"]["machineType"] == "n1-standard-2"
    endpoint = vertex.endpoint("digits-endpoint")
    assert list(endpoint["trafficSplit"].values()) == [100]
    assert [(r["label"], r["traffic_percent"], r["target"]) for r in rows] == [("stable", 100, "vertex")]
    assert vertex.model("digits")["versions"][0]["versionAliases"] == ["stable"]


def test_second_push_is_a_canary_version_of_the_same_model(emulator, vertex, tiny_model_artifact, tmp_path):
    spec = settings(emulator, vertex)
    push(tiny_model_artifact, spec, tmp_path / "one")
    uploads_before = len(objects(emulator, "models/"))
    _, rows = push(tiny_model_artifact, spec, tmp_path / "two")
    assert len(objects(emulator, "models/")) == uploads_before  # same model re-pushed: nothing uploaded again
    second_upload = vertex.calls("models:upload")[1].body
    assert second_upload["parentModel"] == vertex.model("digits")["versions"][0]["name"]
    endpoint = vertex.endpoint("digits-endpoint")
    assert sorted(endpoint["trafficSplit"].values()) == [10, 90]
    assert {(r["version"], r["label"], r["traffic_percent"]) for r in rows} == {("1", "stable", 90),
                                                                                  ("2", "canary", 10)}
    versions = vertex.model("digits")["versions"]
    assert versions[0]["versionAliases"] == ["stable"] and versions[1]["versionAliases"] == ["canary"]

    # A third push replaces the canary; the old canary is undeployed once it has no traffic.
    _, rows = push(tiny_model_artifact, spec, tmp_path / "three")
    endpoint = vertex.endpoint("digits-endpoint")
    assert len(endpoint["deployedModels"]) == 2
    assert {(r["version"], r["release_state"]) for r in rows} == {("1", "live"), ("2", "retired"), ("3", "canary")}


def test_unblessed_model_is_not_pushed(emulator, vertex, tiny_model_artifact, tmp_path):
    pushed, rows = push(tiny_model_artifact, settings(emulator, vertex), tmp_path, blessed=0)
    assert pushed.get_int_custom_property("pushed") == 0 and rows == []
    assert vertex.calls() == []


def test_dry_run_prints_every_call_and_makes_none(tiny_model_artifact, tmp_path, caplog):
    caplog.set_level("INFO", logger="conveyor_ml.components.gcp_pusher")
    spec = settings(None, None, dry_run=True, storage_endpoint="http://127.0.0.1:9", vertex_endpoint="http://127.0.0.1:9")
    pushed, rows = push(tiny_model_artifact, spec, tmp_path)
    printed = caplog.text  # the executor logs each call; the runner prints the log under the component
    assert rows == [] and pushed.get_int_custom_property("pushed") == 0
    assert f"gs://{BUCKET}/models/digits/{tiny_model_artifact.id}/saved_model.pb" in printed
    for method in ("ModelService.ListModels", "ModelService.UploadModel", "EndpointService.CreateEndpoint",
                   "EndpointService.DeployModel"):
        assert f"would call {method}" in printed
    assert '"artifactUri": "gs://conveyor-models/models/digits/' in printed


def test_permission_denied_fails_with_one_line_naming_the_resource(emulator, vertex, tiny_model_artifact, tmp_path):
    vertex.fail("models:upload", 403)
    with pytest.raises(ConveyorError) as error:
        push(tiny_model_artifact, settings(emulator, vertex), tmp_path)
    message = str(error.value)
    assert "\n" not in message and "UploadModel" in message and "403" in message
    assert "roles/aiplatform.user" in message
    assert vertex.calls(":deployModel") == []


def test_unavailable_is_retried_with_backoff_then_succeeds(emulator, vertex, tiny_model_artifact, tmp_path):
    vertex.fail(":deployModel", 503, times=2)
    _, rows = push(tiny_model_artifact, settings(emulator, vertex), tmp_path)
    assert [r.status for r in vertex.calls(":deployModel")] == [503, 503, 200]
    assert rows[0]["traffic_percent"] == 100


def test_quota_exhausted_for_good_fails_after_the_retry_budget(emulator, vertex, tiny_model_artifact, tmp_path):
    vertex.fail("models:upload", 429)
    with pytest.raises(ConveyorError, match=r"429 .*quota exhausted"):
        push(tiny_model_artifact, settings(emulator, vertex, retry_seconds=2), tmp_path)
    assert len(vertex.calls("models:upload")) >= 2


def test_missing_bucket_is_named(emulator, vertex, tiny_model_artifact, tmp_path):
    with pytest.raises(ConveyorError, match="bucket gs://no-such-bucket does not exist"):
        push(tiny_model_artifact, settings(emulator, vertex, bucket="no-such-bucket"), tmp_path)
    assert vertex.calls() == []


def test_interrupted_uploads_are_retried(emulator, vertex, tiny_model_artifact, tmp_path):
    with FaultyProxy(emulator.port) as proxy:
        proxy.fail("PUT", "upload", 503, times=2)
        proxy.fail("POST", "upload", 503, times=1)
        spec = settings(emulator, vertex, storage_endpoint=proxy.url, prefix="retried")
        push(tiny_model_artifact, spec, tmp_path)
    assert proxy.failed >= 1
    uploaded = objects(emulator, f"retried/digits/{tiny_model_artifact.id}/")
    assert f"retried/digits/{tiny_model_artifact.id}/saved_model.pb" in uploaded


def test_upload_failing_for_good_is_reported_and_nothing_is_registered(emulator, vertex, tiny_model_artifact, tmp_path):
    with FaultyProxy(emulator.port) as proxy:
        proxy.fail("POST", "upload", 503)
        proxy.fail("PUT", "upload", 503)
        with pytest.raises(ConveyorError, match="gs://conveyor-models/broken/digits/"):
            push(tiny_model_artifact, settings(emulator, vertex, storage_endpoint=proxy.url, prefix="broken", retry_seconds=2),
                 tmp_path)
    assert f"broken/digits/{tiny_model_artifact.id}/conveyor-push.json" not in objects(emulator, "broken/")
    assert vertex.calls() == []


def deployed(*rows):
    return [traffic.Deployed(id=i, model="projects/p/locations/r/models/1", version=v, created=c, traffic=t)
            for i, v, c, t in rows]


def test_traffic_rules_for_push_promotion_and_rollback():
    assert traffic.for_push([], 10) == traffic.TrafficChange({"0": 100}, [], "0")
    one = deployed(("a", "1", 1.0, 100))
    assert traffic.for_push(one, 10) == traffic.TrafficChange({"0": 10, "a": 90}, [], "a")
    assert traffic.for_push(one, 100) == traffic.TrafficChange({"0": 100}, ["a"], "0")
    two = deployed(("a", "1", 1.0, 90), ("b", "2", 2.0, 10))
    assert traffic.for_push(two, 20) == traffic.TrafficChange({"0": 20, "a": 80}, ["b"], "a")
    assert traffic.for_promotion(two, None, "e") == traffic.TrafficChange({"b": 100}, ["a"], "b")
    assert traffic.for_promotion(two, 50, "e") == traffic.TrafficChange({"b": 50, "a": 50}, [], "a")
    assert traffic.for_rollback(two, "e") == traffic.TrafficChange({"a": 100}, ["b"], "a")
    with pytest.raises(ConveyorError, match="no canary to promote"):
        traffic.for_promotion(one, None, "e")
    with pytest.raises(ConveyorError, match="no canary to roll back"):
        traffic.for_rollback(one, "e")
    rows = traffic.rows_after(two, traffic.for_rollback(two, "e"))
    assert [(r["version"], r["label"], r["traffic_percent"], r["release_state"]) for r in rows] == \
        [("1", "stable", 100, "live"), ("2", "", 0, "retired")]


def gcp_spec(emulator, vertex, tmp_path):
    from tests.conftest import write_spec

    gcp_section = {"project": "test-project", "region": "europe-west4", "bucket": BUCKET, "prefix": "models",
                   "model_display_name": "digits", "retry_seconds": 3, "storage_endpoint": emulator.url,
                   "vertex_endpoint": vertex.url}
    path = write_spec(tmp_path, **{"components.gcp_pusher": gcp_section})
    spec = load_spec(path)
    spec.workspace.mkdir()
    return path, spec


def endpoint_rows(vertex) -> set[tuple[str, int]]:
    """(version, traffic) of every model deployed on the fake's endpoint: the truth to compare records with."""
    endpoint = vertex.endpoint("digits-endpoint")
    return {(d["modelVersionId"], endpoint["trafficSplit"].get(d["id"], 0)) for d in endpoint["deployedModels"]}


def recorded_rows(rows) -> set[tuple[str, int]]:
    return {(str(r["version"]), r["traffic_percent"]) for r in rows if r["release_state"] != "retired"}


def test_rollback_on_vertex_drops_the_canary_and_records_it(emulator, vertex, tiny_model_artifact, tmp_path):
    from conveyor_ml.operations.release_commands import ROLLBACK, change_vertex_release

    _, spec = gcp_spec(emulator, vertex, tmp_path)
    push(tiny_model_artifact, spec.components.gcp_pusher, tmp_path / "one")
    push(tiny_model_artifact, spec.components.gcp_pusher, tmp_path / "two")
    rows = change_vertex_release(spec, "digits", ROLLBACK, reason="canary errors")
    endpoint = vertex.endpoint("digits-endpoint")
    assert list(endpoint["trafficSplit"].values()) == [100] and len(endpoint["deployedModels"]) == 1
    assert endpoint["deployedModels"][0]["modelVersionId"] == "1"
    assert {(r["version"], r["release_state"]) for r in rows} == {("1", "live"), ("2", "retired")}
    [snapshot] = deployment_snapshots(metadata.open_store(spec.metadata), "digits", target="vertex")
    assert snapshot.kind == "conveyor.Rollback"
    assert props(snapshot.execution)["reason"] == "canary errors"
    with pytest.raises(ConveyorError, match="unknown model 'mnist' on Google Cloud"):
        change_vertex_release(spec, "mnist", ROLLBACK)


def test_a_push_whose_undeploy_fails_records_what_the_endpoint_holds(emulator, vertex, tiny_model_artifact, tmp_path,
                                                                      caplog):
    caplog.set_level("INFO", logger="conveyor_ml.components.gcp_pusher")
    spec = settings(emulator, vertex)
    push(tiny_model_artifact, spec, tmp_path / "one")
    push(tiny_model_artifact, spec, tmp_path / "two")
    vertex.fail(":undeployModel", 400)  # the old canary cannot go: the new one is deployed all the same
    pushed, rows = push(tiny_model_artifact, spec, tmp_path / "three")
    assert "WARNING: deployed, but the clean-up after it failed" in caplog.text
    assert "undeployModel" in pushed.get_string_custom_property("incomplete")
    assert endpoint_rows(vertex) == {("1", 90), ("2", 0), ("3", 10)}
    assert recorded_rows(rows) == endpoint_rows(vertex)
    assert {(r["version"], r["release_state"]) for r in rows} == {("1", "live"), ("2", "idle"), ("3", "canary")}

    vertex.state.failures.clear()  # the next push undeploys what this one left
    _, rows = push(tiny_model_artifact, spec, tmp_path / "four")
    assert endpoint_rows(vertex) == {("1", 90), ("4", 10)} == recorded_rows(rows)


def test_a_push_whose_alias_move_fails_still_records_the_deployment(emulator, vertex, tiny_model_artifact, tmp_path):
    spec = settings(emulator, vertex)
    push(tiny_model_artifact, spec, tmp_path / "one")
    vertex.fail(":mergeVersionAliases", 403)
    pushed, rows = push(tiny_model_artifact, spec, tmp_path / "two")
    assert "MergeVersionAliases" in pushed.get_string_custom_property("incomplete")
    assert recorded_rows(rows) == endpoint_rows(vertex) == {("1", 90), ("2", 10)}


def test_a_promotion_failing_part_way_records_the_endpoint_as_it_is(emulator, vertex, tiny_model_artifact, tmp_path):
    from conveyor_ml.operations.release_commands import PROMOTE, change_vertex_release

    _, spec = gcp_spec(emulator, vertex, tmp_path)
    push(tiny_model_artifact, spec.components.gcp_pusher, tmp_path / "one")
    push(tiny_model_artifact, spec.components.gcp_pusher, tmp_path / "two")
    vertex.fail(":undeployModel", 400)  # traffic moves to the canary; the old stable cannot be undeployed
    with pytest.raises(ConveyorError, match="went part of the way and is recorded as the endpoint now is: "
                                            "version 2 100%, version 1 0%") as error:
        change_vertex_release(spec, "digits", PROMOTE, reason="looks good")
    assert "\n" not in str(error.value)
    assert endpoint_rows(vertex) == {("2", 100), ("1", 0)}
    [snapshot] = deployment_snapshots(metadata.open_store(spec.metadata), "digits", target="vertex")
    assert snapshot.execution.last_known_state == snapshot.execution.FAILED
    assert "undeployModel" in props(snapshot.execution)["error"]
    assert {(props(a)["version"], props(a)["traffic_percent"], props(a)["release_state"])
            for a in snapshot.deployments} == {("2", 100, "live"), ("1", 0, "idle")}


def test_a_vertex_promotion_killed_after_moving_traffic_is_recorded_by_the_next_command(
        emulator, vertex, tiny_model_artifact, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT, run_conveyor

    path, spec = gcp_spec(emulator, vertex, tmp_path)
    push(tiny_model_artifact, spec.components.gcp_pusher, tmp_path / "one")
    push(tiny_model_artifact, spec.components.gcp_pusher, tmp_path / "two")
    vertex.hang(":undeployModel")  # the traffic has moved when the undeploy arrives: kill the command there
    command = subprocess.Popen([sys.executable, "-m", "conveyor_ml.cli", "promote", "digits", "--target", "gcp",
                                "--spec", str(path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        assert vertex.hung.wait(timeout=120)
    finally:
        os.kill(command.pid, signal.SIGKILL)
        command.wait()
        vertex.release()
    assert endpoint_rows(vertex) == {("2", 100), ("1", 0)}
    store = metadata.open_store(spec.metadata)
    assert deployment_snapshots(store, "digits", target="vertex") == []  # the traffic moved, nothing recorded yet

    result = run_conveyor("promote", "digits", "--target", "gcp", "--weight", "50", "--spec", path)
    assert result.returncode == 0, result.stderr
    [repaired] = [line for line in result.stderr.splitlines() if line.startswith("conveyor: repaired:")]
    assert "conveyor.Promote of digits on Vertex AI" in repaired and "recorded the endpoint as it is now" in repaired
    killed, promoted = deployment_snapshots(metadata.open_store(spec.metadata), "digits", target="vertex")
    assert killed.kind == promoted.kind == "conveyor.Promote" and "repaired" in props(killed.execution)
    assert {(props(a)["version"], props(a)["traffic_percent"]) for a in killed.deployments} == {("2", 100), ("1", 0)}
    assert {(props(a)["version"], props(a)["traffic_percent"]) for a in promoted.deployments} == \
        endpoint_rows(vertex) == {("2", 50), ("1", 50)}


def test_cloud_storage_needs_object_permissions_only(emulator, vertex, tiny_model_artifact, tmp_path):
    """roles/storage.objectAdmin (what the README grants) has no storage.buckets.get: a push reads no bucket
    metadata, and a 403 names the object permission the call needed."""
    with FaultyProxy(emulator.port) as proxy:
        push(tiny_model_artifact, settings(emulator, vertex, storage_endpoint=proxy.url, prefix="perm"), tmp_path / "a")
        assert proxy.paths and not [p for m, p in proxy.paths if m == "GET" and p.rstrip("/").endswith(f"/b/{BUCKET}")]
        proxy.fail("POST", "upload", 403)
        proxy.fail("PUT", "upload", 403)
        with pytest.raises(ConveyorError, match=r"the account lacks storage\.objects\.create on gs://conveyor-models"):
            push(tiny_model_artifact, settings(emulator, vertex, storage_endpoint=proxy.url, prefix="perm2"),
                 tmp_path / "b")
