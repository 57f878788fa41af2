"""ML Metadata in step with the serving base path: a committed change is recorded exactly once, by the command
that made it or, after a crash, by the next command, which says so; a failed record puts the files back."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import load_spec
from conveyor_ml.components.release_record import (
    FAILED,
    is_recorded,
    reconcile,
    record_release_execution,
)
from conveyor_ml.formats import release_state as releases
from conveyor_ml.formats import serving_config
from conveyor_ml.metadata import store as metadata
from conveyor_ml.metadata.index import deployment_snapshots, latest_deployments
from conveyor_ml.metadata.values import props
from conveyor_ml.operations.release_commands import PROMOTE, change_release
from tests.conftest import write_spec
from tests.unit.test_release import fake_model


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


@pytest.fixture
def spec(tmp_path):
    fake_model(tmp_path / "src")
    loaded = load_spec(write_spec(tmp_path))
    loaded.workspace.mkdir()
    return loaded


def commit_push(spec, mode="direct", pid=None):
    """A push as the ServingPusher commits it, made by process `pid`; nothing recorded in MLMD."""
    state = releases.read_state(spec.serving_base)
    release = state.release("mnist")
    before = release.copy()
    version = releases.next_version(release)
    releases.write_version_atomically(release.model_dir, version, {"": spec.workspace.parent / "src"})
    releases.release_new_version(release, version, mode, 10)
    change = releases.ReleaseChange.new("conveyor.Push", "mnist", releases.snapshot(before.labels, release),
                                        releases.change_details(before, release, version=str(version)))
    change.pid = pid or dead_pid()
    change.started = releases.process_start(change.pid)
    releases.apply_change(state, release, change)
    return change


def test_a_change_a_crash_left_unrecorded_is_recorded_by_the_next_command_which_says_so(spec):
    change = commit_push(spec)
    lines: list[str] = []
    reconcile(spec, lines.append)
    assert len(lines) == 1 and lines[0].startswith("conveyor: repaired: the conveyor.Push of mnist")
    assert "recorded it now" in lines[0] and change.id[:8] in lines[0]
    [snapshot] = deployment_snapshots(metadata.open_store(spec.metadata), "mnist")
    assert snapshot.kind == "conveyor.Push" and "repaired" in props(snapshot.execution)
    assert [(props(a)["version"], props(a)["label"]) for a in snapshot.deployments] == [("1", "stable")]
    assert releases.read_state(spec.serving_base).unrecorded == []
    reconcile(spec, lines.append)  # nothing left to repair: nothing said, nothing recorded twice
    assert len(lines) == 1 and len(deployment_snapshots(metadata.open_store(spec.metadata), "mnist")) == 1


def test_a_change_already_recorded_is_forgotten_without_a_second_record(spec):
    change = commit_push(spec)
    record_release_execution(spec, "conveyor.Push", "mnist", "local", change.rows, base_path="", reason="",
                             details={}, change_id=change.id)
    lines: list[str] = []
    reconcile(spec, lines.append)
    assert lines == []
    assert len(deployment_snapshots(metadata.open_store(spec.metadata), "mnist")) == 1
    assert releases.read_state(spec.serving_base).unrecorded == []


def test_a_change_whose_process_still_runs_is_left_for_it_to_record(spec):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        change = commit_push(spec, pid=sleeper.pid)
        reconcile(spec, lambda line: None)
        assert [c.id for c in releases.read_state(spec.serving_base).unrecorded] == [change.id]
        assert not is_recorded(metadata.open_store(spec.metadata), change.id)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_change_recorded_by_its_still_running_process_is_forgotten(spec):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        change = commit_push(spec, pid=sleeper.pid)
        record_release_execution(spec, "conveyor.Push", "mnist", "local", change.rows, base_path="", reason="",
                                 details={}, change_id=change.id)  # as TFX publishes a push before its run ends
        reconcile(spec, lambda line: None)
        assert releases.read_state(spec.serving_base).unrecorded == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_promote_waits_for_a_push_still_being_recorded(spec):
    commit_push(spec)
    reconcile(spec, lambda line: None)
    finishing = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    commit_push(spec, mode="canary", pid=finishing.pid)  # its process dies before recording it
    lines: list[str] = []
    change_release(spec, "mnist", PROMOTE, say=lines.append)
    finishing.wait()
    assert len(lines) == 1 and "conveyor.Push of mnist" in lines[0]
    kinds = [s.kind for s in deployment_snapshots(metadata.open_store(spec.metadata), "mnist")]
    assert kinds == ["conveyor.Push", "conveyor.Push", "conveyor.Promote"]  # in the order they happened


def test_promote_records_once_and_leaves_nothing_unrecorded(spec):
    commit_push(spec)
    commit_push(spec, mode="canary")
    reconcile(spec, lambda line: None)
    release = change_release(spec, "mnist", PROMOTE, reason="fine", say=lambda line: None)
    assert release.labels == {"stable": 2}
    state = releases.read_state(spec.serving_base)
    assert state.unrecorded == [] and state.models["mnist"].history == [1, 2]
    snapshots = deployment_snapshots(metadata.open_store(spec.metadata), "mnist")
    assert [s.kind for s in snapshots] == ["conveyor.Push", "conveyor.Push", "conveyor.Promote"]
    assert props(snapshots[-1].execution)["release_change"]
    assert {(props(a)["version"], props(a)["release_state"]) for a in snapshots[-1].deployments} == \
        {("2", "live"), ("1", "retired")}


def test_a_failed_record_puts_the_release_files_back(spec, tmp_path):
    commit_push(spec)
    commit_push(spec, mode="canary")
    reconcile(spec, lambda line: None)
    base = spec.serving_base
    files = {name: (base / name).read_bytes() for name in (releases.STATE_FILE, serving_config.MODELS_CONFIG,
                                                           serving_config.TRAFFIC_FILE)}
    broken = tmp_path / "not-a-store"
    broken.mkdir()  # an SQLite "file" that is a directory: the record fails, not the process
    from dataclasses import replace

    with pytest.raises(ConveyorError, match="cannot open the metadata store"):
        change_release(replace(spec, metadata=replace(spec.metadata, sqlite=broken)), "mnist", PROMOTE,
                       say=lambda line: None)
    assert files == {name: (base / name).read_bytes() for name in files}


def test_the_newest_release_state_by_query_equals_the_full_history(spec):
    store = metadata.open_store(spec.metadata)
    assert latest_deployments(store, "mnist", "local") == []
    rows = [{"version": 1, "label": "stable", "traffic_percent": 100, "release_state": "live"}]
    record_release_execution(spec, "conveyor.Push", "mnist", "local", rows, base_path="", reason="", details={})
    record_release_execution(spec, "conveyor.Push", "mnist", "vertex", rows, base_path="", reason="", details={})
    record_release_execution(spec, "conveyor.Push", "other", "local", rows, base_path="", reason="", details={})
    partial = [{"version": 2, "label": "stable", "traffic_percent": 100, "release_state": "live"},
               {"version": 1, "label": "", "traffic_percent": 0, "release_state": "idle"}]
    record_release_execution(spec, "conveyor.Promote", "mnist", "local", partial, base_path="", reason="",
                             details={"error": "boom"}, state=FAILED)
    for target in ("local", "vertex"):
        [*_, newest] = deployment_snapshots(store, "mnist", target=target)
        assert [a.id for a in latest_deployments(store, "mnist", target)] == [a.id for a in newest.deployments]
    assert {props(a)["version"] for a in latest_deployments(store, "mnist", "local")} == {"1", "2"}
