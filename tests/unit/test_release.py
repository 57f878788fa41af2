"""Release state of a serving base path: versions, labels, weights, history, retention, crash leftovers."""
import os
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


def push(base, source, mode="direct", weight=10):
    current = releases.read_release(base, "mnist")
    version = releases.next_version(current)
    releases.write_version_atomically(current.model_dir, version, {"": source})
    releases.release_new_version(current, version, mode, weight)
    releases.write_release(current)
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
    removed = releases.apply_retention(state, keep=2)
    assert removed == [2, 3]
    assert state.versions() == [1, 4, 5]


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
