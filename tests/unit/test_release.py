"""Release state of a serving base path: versions, labels, weights, history, retention, crash leftovers, the
one state file the served files derive from, and what a damaged file or an interrupted command leaves."""
import json
import os
import stat
import subprocess
import sys

import pytest

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.formats import release_state as releases
from conveyor_ml.formats import serving_config as config


def fake_model(path):
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"model")
    (path / "variables" / "variables.index").write_bytes(b"index")
    return path


def push(base, source, mode="direct", weight=10, keep=None):
    state = releases.read_state(base)
    current = state.release("mnist")
    before = current.copy()
    version = releases.next_version(current)
    releases.write_version_atomically(current.model_dir, version, {"": source})
    releases.release_new_version(current, version, mode, weight)
    change = releases.ReleaseChange.new("conveyor.Push", "mnist", releases.snapshot(before.labels, current), {},
                                        retire=releases.retention(current, keep) if keep else [])
    releases.apply_change(state, current, change)
    return version


@pytest.fixture
def base(tmp_path):
    fake_model(tmp_path / "src")
    return tmp_path / "serving"


def test_versions_count_up_and_zero_padding_counts(base, tmp_path):
    assert push(base, tmp_path / "src") == 1
    (base / "mnist" / "0007").mkdir()
    assert releases.next_version(releases.read_release(base, "mnist")) == 8


def test_direct_then_canary_then_promote(base, tmp_path):
    push(base, tmp_path / "src")
    push(base, tmp_path / "src", mode="canary", weight=10)
    state = releases.read_release(base, "mnist")
    assert state.labels == {"stable": 1, "canary": 2}
    assert state.weights == {"stable": 90, "canary": 10}
    server_config = config.read_model_server_config(base / "models.config").model_config_list.config[0]
    assert list(server_config.model_version_policy.specific.versions) == [1, 2]
    assert dict(server_config.version_labels) == {"stable": 1, "canary": 2}

    releases.promote(state, weight=50)
    assert state.weights == {"stable": 50, "canary": 50}
    releases.promote(state)
    assert state.labels == {"stable": 2} and state.weights == {"stable": 100}
    assert state.history == [1, 2]


def test_first_canary_push_becomes_stable(base, tmp_path):
    push(base, tmp_path / "src", mode="canary")
    assert releases.read_release(base, "mnist").labels == {"stable": 1}


def test_rollback_steps_back_through_history(base, tmp_path):
    for _ in range(3):
        push(base, tmp_path / "src")
    state = releases.read_release(base, "mnist")
    assert state.history == [1, 2, 3]
    assert releases.rollback(state) == 2
    assert releases.rollback(state) == 1
    with pytest.raises(ConveyorError, match="no previous stable version"):
        releases.rollback(state)
    assert releases.rollback(state, to_version=3) == 3


def test_rollback_of_a_first_canary_removes_it_and_keeps_stable(base, tmp_path):
    push(base, tmp_path / "src")
    push(base, tmp_path / "src", mode="canary", weight=10)
    state = releases.read_release(base, "mnist")
    assert releases.rollback(state) == 1
    assert state.labels == {"stable": 1} and state.weights == {"stable": 100} and state.history == [1]
    with pytest.raises(ConveyorError, match="no previous stable version"):
        releases.rollback(state)  # no canary left, nothing earlier


def test_invalid_release_moves(base, tmp_path):
    push(base, tmp_path / "src")
    state = releases.read_release(base, "mnist")
    with pytest.raises(ConveyorError, match="has no canary to promote"):
        releases.promote(state)
    with pytest.raises(ConveyorError, match="version 9 is not on disk"):
        releases.rollback(state, to_version=9)
    empty = releases.read_release(base, "other")
    with pytest.raises(ConveyorError, match="has no stable version"):
        releases.rollback(empty)


def test_retention_keeps_labelled_versions(base, tmp_path):
    push(base, tmp_path / "src")                      # 1 stable
    for _ in range(4):
        push(base, tmp_path / "src", mode="canary")   # 2..5, canary moves along, stable stays 1
    state = releases.read_release(base, "mnist")
    assert releases.retention(state, keep=2) == [2, 3]
    push(base, tmp_path / "src", mode="canary", keep=2)  # 6 the canary: 2..4 retired, 5 and 6 the newest
    assert releases.read_release(base, "mnist").versions() == [1, 5, 6]
    assert sorted(p.name for p in (base / "mnist").iterdir()) == ["1", "5", "6"]  # nothing hidden left


def test_version_is_written_whole_or_not_at_all(base, tmp_path):
    model_dir = base / "mnist"
    target = releases.write_version_atomically(model_dir, 1, {"": tmp_path / "src"})
    assert (target / "variables" / "variables.index").read_bytes() == b"index"
    with pytest.raises(ConveyorError, match="already exists"):
        releases.write_version_atomically(model_dir, 1, {"": tmp_path / "src"})
    with pytest.raises(FileNotFoundError):
        releases.write_version_atomically(model_dir, 2, {"": tmp_path / "missing"})
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


def test_leftovers_of_dead_pushes_are_cleaned(base):
    model_dir = base / "mnist"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = model_dir / f".3.tmp-{dead.stdout.strip()}"
    mine = model_dir / f".4.tmp-{os.getpid()}"
    leftover.mkdir(parents=True)
    mine.mkdir()
    assert releases.clean_leftovers(model_dir) == [leftover]
    assert mine.exists()


def test_the_state_file_is_the_truth_and_the_served_files_follow_it(base, tmp_path):
    push(base, tmp_path / "src")
    push(base, tmp_path / "src", mode="canary", weight=20)
    document = json.loads((base / releases.STATE_FILE).read_text())
    assert document["models"]["mnist"] == {"labels": {"canary": 2, "stable": 1},
                                           "weights": {"canary": 20, "stable": 80}, "history": [1]}
    assert [c["kind"] for c in document["unrecorded"]] == ["conveyor.Push", "conveyor.Push"]
    assert json.loads((base / "traffic.json").read_text()) == {"models": {"mnist": {"canary": 20, "stable": 80}}}
    # In step already: syncing again writes nothing (the server's poll sees no change).
    inodes = {name: (base / name).stat().st_ino for name in ("models.config", "traffic.json")}
    assert releases.sync_served_files(releases.read_state(base)) is False
    assert inodes == {name: (base / name).stat().st_ino for name in inodes}
    # A served file that lags behind (a crash between the commit and its rewrite) is rewritten from the state.
    (base / "traffic.json").write_text('{"models": {"mnist": {"stable": 100}}}')
    state = releases.read_state(base)
    assert any("rewrote models.config and traffic.json" in line for line in releases.repair_files(state))
    assert config.read_traffic(base / "traffic.json").for_model("mnist") == {"stable": 80, "canary": 20}


def test_release_files_are_readable_by_everyone(base, tmp_path):
    push(base, tmp_path / "src")
    releases.write_batching_config(base, 32, 1000, 4, 1)
    for name in (releases.STATE_FILE, "models.config", "traffic.json", "batching.config"):
        assert stat.S_IMODE((base / name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "models": {"mnist": {"labels": []}}}', "[]",
                                     '{"format": 2, "models": {}, "unrecorded": []}'])
def test_a_damaged_state_file_is_an_error_naming_it_never_an_empty_state(base, tmp_path, content):
    push(base, tmp_path / "src")
    (base / releases.STATE_FILE).write_text(content)
    with pytest.raises(ConveyorError, match=rf"{releases.STATE_FILE}: .*restore it from a backup") as error:
        releases.read_state(base)
    assert "\n" not in str(error.value)
    assert (base / releases.STATE_FILE).read_text() == content  # left for the user to look at


def test_state_is_built_once_from_the_files_older_versions_wrote(base, tmp_path):
    push(base, tmp_path / "src")
    push(base, tmp_path / "src")
    (base / releases.STATE_FILE).unlink()
    (base / releases.LEGACY_HISTORY_FILE).write_text('{"mnist": [1, 2]}')
    state = releases.read_state(base)
    assert not state.stored and state.models["mnist"].history == [1, 2]
    assert state.models["mnist"].labels == {"stable": 2} and state.models["mnist"].weights == {"stable": 100}
    assert any(releases.STATE_FILE in line for line in releases.repair_files(state))
    assert releases.read_state(base).stored and not (base / releases.LEGACY_HISTORY_FILE).exists()


def test_a_damaged_history_file_is_an_error_never_an_empty_history(base, tmp_path):
    push(base, tmp_path / "src")
    (base / releases.STATE_FILE).unlink()
    (base / releases.LEGACY_HISTORY_FILE).write_text('{"mnist": [1, ')
    with pytest.raises(ConveyorError, match=rf"{releases.LEGACY_HISTORY_FILE}: not a valid release history"):
        releases.read_state(base)


def test_repair_removes_what_a_killed_writer_left(base, tmp_path):
    push(base, tmp_path / "src")
    push(base, tmp_path / "src", mode="canary")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = dead.stdout.strip()
    (base / ".traffic.json.abc123").write_text("{")
    (base / ".release_state.json.k2j3").write_text("")
    (base / "mnist" / f".7.tmp-{pid}").mkdir()
    (base / "mnist" / f".1.retiring-{pid}").mkdir()
    lines = releases.repair_files(releases.read_state(base))
    assert len(lines) == 1 and "removed 4 temporary file(s)" in lines[0]
    assert sorted(p.name for p in base.iterdir()) == ["mnist", "models.config",
                                                      releases.STATE_FILE, "traffic.json"]
    assert sorted(p.name for p in (base / "mnist").iterdir()) == ["1", "2"]


def test_an_interrupted_retirement_is_finished_and_never_touches_a_labelled_version(base, tmp_path):
    for _ in range(3):
        push(base, tmp_path / "src")
    state = releases.read_state(base)
    release = state.release("mnist")
    # As if a push committed "retire 1 and 3" and died before deleting: 3 is labelled again since.
    state.unrecorded.append(releases.ReleaseChange("dead", "conveyor.Push", "mnist", [], {}, retire=[1, 3],
                                                   pid=int(subprocess.run([sys.executable, "-c",
                                                                           "import os; print(os.getpid())"],
                                                                          capture_output=True, text=True).stdout)))
    releases.commit(state)
    assert release.labels == {"stable": 3}
    lines = releases.repair_files(releases.read_state(base))
    assert lines == ["finished retiring version(s) 1 of mnist"]
    assert releases.read_release(base, "mnist").versions() == [2, 3]
