"""Canary release end to end: two pipeline runs, a live server, promote and rollback, all recorded in MLMD."""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import requests
from ml_metadata.proto import metadata_store_pb2

from conveyor_ml.base.server_process import ServerProcess
from conveyor_ml.metadata.index import deployment_snapshots
from conveyor_ml.metadata.values import props
from tests.conftest import run_conveyor

pytestmark = pytest.mark.slow
IMAGE = [[[0.0] * 8] * 8]


def versions_served(server, count: int) -> Counter:
    session = requests.Session()
    seen = Counter()
    for _ in range(count):
        response = session.post(f"{server.rest_url}/v1/models/mnist:predict", json={"instances": IMAGE}, timeout=30)
        assert response.status_code == 200, response.text
        seen[int(response.headers["X-Model-Version"])] += 1
    return seen


def wait_until_only(server, version: int, timeout: float = 5.0) -> float:
    """Seconds until every unversioned request is answered by `version`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if set(versions_served(server, 20)) == {version}:
            return time.monotonic() - started
    raise AssertionError(f"version {version} did not take all traffic within {timeout}s")


@pytest.fixture(scope="module")
def canary_pipeline(canary_pipeline, tmp_path_factory):
    """A copy of the session's canary pipeline: this module promotes and rolls back, other modules read it."""
    return canary_pipeline.copy_to(tmp_path_factory.mktemp("release-workflow"))


@pytest.fixture(scope="module")
def serving(canary_pipeline):
    with ServerProcess("--spec", str(canary_pipeline.spec)) as server:
        server.wait_available("mnist", version=2)
        server.wait_available("mnist", version=1)
        yield server


def test_two_runs_leave_stable_and_canary(canary_pipeline):
    serving_dir = canary_pipeline.workspace / "serving"
    assert sorted(p.name for p in (serving_dir / "mnist").iterdir()) == ["1", "2"]
    traffic = json.loads((serving_dir / "traffic.json").read_text())
    assert traffic["models"]["mnist"] == {"stable": 90, "canary": 10}
    assert "pushed version 2 of mnist as canary (10% of unversioned traffic)" in canary_pipeline.stdout
    # The one release state: both pushes committed, and each confirmed in ML Metadata by the end of its run.
    state = json.loads((serving_dir / "release_state.json").read_text())
    assert state["models"]["mnist"] == {"labels": {"canary": 2, "stable": 1}, "weights": {"canary": 10, "stable": 90},
                                        "history": [1]}
    assert state["unrecorded"] == [] and not (serving_dir / "release_history.json").exists()
    assert "repaired" not in canary_pipeline.stdout  # nothing was interrupted, so nothing needed repair


def test_canary_share_of_unversioned_traffic(serving):
    seen = versions_served(serving, 600)
    share = seen[2] / sum(seen.values())
    # 10% expected; 600 draws give a standard deviation of 1.2 points: 4 sigma either way.
    assert 0.05 < share < 0.15, seen
    labelled = requests.post(f"{serving.rest_url}/v1/models/mnist/labels/canary:predict",
                             json={"instances": IMAGE}, timeout=30)
    assert labelled.headers["X-Model-Version"] == "2"  # explicit labels are never split


def test_status_reports_disk_labels_server_and_runs(canary_pipeline, serving):
    result = run_conveyor("status", "mnist", "--spec", canary_pipeline.spec, "--url", serving.rest_url,
                          "--format", "json")
    assert result.returncode == 0, result.stderr
    [model] = json.loads(result.stdout)["models"]
    rows = {row["version"]: row for row in model["versions"]}
    assert rows[2]["labels"] == ["canary"] and rows[2]["traffic_percent"] == 10
    assert rows[1]["labels"] == ["stable"] and rows[1]["traffic_percent"] == 90
    assert rows[1]["server_state"] == rows[2]["server_state"] == "AVAILABLE"
    assert rows[1]["pushed_by_run"] and rows[2]["pushed_by_run"] and rows[1]["pushed_by_run"] != rows[2]["pushed_by_run"]
    assert model["server"]["up"]


def test_invalid_release_requests_change_nothing(canary_pipeline):
    serving_dir = canary_pipeline.workspace / "serving"
    before = {name: (serving_dir / name).read_bytes() for name in ("models.config", "traffic.json")}
    for args, message in ((("promote", "nope"), "unknown model 'nope'"),
                          (("rollback", "mnist", "--to", "9"), "version 9 is not on disk"),
                          (("promote", "mnist", "--weight", "0"), "argument --weight: must be between 1 and 100")):
        result = run_conveyor(*args, "--spec", canary_pipeline.spec)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert before == {name: (serving_dir / name).read_bytes() for name in before}


def test_promote_then_rollback_against_the_running_server(canary_pipeline, serving):
    result = run_conveyor("promote", "mnist", "--spec", canary_pipeline.spec, "--reason", "canary looks good")
    assert result.returncode == 0, result.stderr
    assert wait_until_only(serving, 2) < 2.0

    result = run_conveyor("rollback", "mnist", "--spec", canary_pipeline.spec)
    assert result.returncode == 0, result.stderr
    assert "stable is now version 1" in result.stdout
    assert wait_until_only(serving, 1) < 2.0

    from tests.e2e.conftest import PipelineRun

    store = PipelineRun(canary_pipeline.spec, canary_pipeline.workspace, "", "").store()
    snapshots = deployment_snapshots(store, "mnist")
    kinds = [s.kind for s in snapshots]
    assert kinds[-2:] == ["conveyor.Promote", "conveyor.Rollback"]
    promote, rollback = snapshots[-2:]
    assert props(promote.execution)["reason"] == "canary looks good"
    # Each change consumed the state before it and produced the state after it.
    inputs = [e.artifact_id for e in store.get_events_by_execution_ids([promote.execution.id])
              if e.type == metadata_store_pb2.Event.INPUT]
    assert sorted(inputs) == sorted(a.id for a in snapshots[-3].deployments)
    after_promote = {props(a)["version"]: props(a) for a in promote.deployments}
    assert after_promote["2"]["label"] == "stable" and after_promote["2"]["traffic_percent"] == 100
    assert after_promote["1"]["release_state"] == "retired"
    after_rollback = {props(a)["version"]: props(a) for a in rollback.deployments}
    assert after_rollback["1"]["label"] == "stable" and after_rollback["2"]["release_state"] == "retired"
