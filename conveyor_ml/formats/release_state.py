"""The state of a serving base path: versions on disk, labels, traffic weights; and the moves between states.

Layout (what TF Serving and `conveyor serve` read):

    <base>/models.config          ModelServerConfig: per model its base_path, version policy and labels
    <base>/traffic.json           weights per label for unversioned requests (e.g. stable 90, canary 10)
    <base>/batching.config        BatchingParameters for --enable_batching
    <base>/release_history.json   per model, the versions that were stable, oldest first (for rollback)
    <base>/<model>/<version>/     SavedModels (+ tflite/ variants), written by `write_version_atomically`

Every change takes an exclusive lock on `<base>/.conveyor.lock` and rewrites files atomically, so a
pipeline push and a `conveyor promote` never interleave and a server never reads half a file.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tensorflow_serving.config import model_server_config_pb2

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.files import fsync_directory, fsync_tree, write_atomically
from conveyor_ml.formats import serving_config

STABLE, CANARY = "stable", "canary"
HISTORY_FILE = "release_history.json"
TEMP_VERSION = re.compile(r"^\.(?P<version>\d+)\.tmp-(?P<pid>\d+)$")
VERSION_DIR = re.compile(r"^\d+$")


def versions_on_disk(base_path: Path) -> dict[int, Path]:
    """Integer-named subdirectories (zero-padded names such as 0001 parse as 1); anything else is ignored,
    so a writer's hidden temporary directory is never mistaken for a version."""
    found: dict[int, Path] = {}
    try:
        children = sorted(Path(base_path).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return found
    for child in children:
        if VERSION_DIR.match(child.name) and child.is_dir():
            found.setdefault(int(child.name), child)
    return found


@dataclass
class ModelRelease:
    """One model's release state: which version each label points to and the traffic weights."""

    name: str
    base_path: Path
    labels: dict[str, int] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    history: list[int] = field(default_factory=list)  # stable versions, oldest first

    @property
    def model_dir(self) -> Path:
        return self.base_path / self.name

    def versions(self) -> list[int]:
        return sorted(versions_on_disk(self.model_dir))


@contextmanager
def locked(base_path: Path):
    base_path.mkdir(parents=True, exist_ok=True)
    with open(base_path / ".conveyor.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_release(base_path: Path, model_name: str) -> ModelRelease:
    release = ModelRelease(model_name, Path(base_path))
    config_path = base_path / serving_config.MODELS_CONFIG
    if config_path.is_file():
        for model in serving_config.read_model_server_config(config_path).model_config_list.config:
            if model.name == model_name:
                release.labels = dict(model.version_labels)
    release.weights = serving_config.read_traffic(base_path / serving_config.TRAFFIC_FILE).for_model(model_name)
    release.history = list(_read_history(base_path).get(model_name, []))
    return release


def _read_history(base_path: Path) -> dict[str, list[int]]:
    try:
        return json.loads((base_path / HISTORY_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def known_models(base_path: Path) -> list[str]:
    config_path = base_path / serving_config.MODELS_CONFIG
    if not config_path.is_file():
        return []
    return [m.name for m in serving_config.read_model_server_config(config_path).model_config_list.config]


def write_release(release: ModelRelease) -> None:
    """Writes the model's entry of models.config (labels; the policy serves exactly the labelled versions)
    and its traffic weights; other models' entries are kept as they are."""
    base = release.base_path
    config_path = base / serving_config.MODELS_CONFIG
    config = (serving_config.read_model_server_config(config_path) if config_path.is_file()
              else model_server_config_pb2.ModelServerConfig())
    entries = config.model_config_list.config
    entry = next((m for m in entries if m.name == release.name), None)
    if entry is None:
        entry = entries.add()
    entry.Clear()
    entry.name = release.name
    entry.base_path = str(release.model_dir.resolve())
    entry.model_platform = "tensorflow"
    labelled = sorted(set(release.labels.values()))
    if labelled:
        entry.model_version_policy.specific.versions.extend(labelled)
    else:
        entry.model_version_policy.latest.num_versions = 1
    for label, version in sorted(release.labels.items()):
        entry.version_labels[label] = version
    serving_config.write_model_server_config(config_path, config)
    traffic_path = base / serving_config.TRAFFIC_FILE
    traffic = serving_config.read_traffic(traffic_path)
    traffic.models[release.name] = dict(release.weights)
    serving_config.write_traffic(traffic_path, traffic)
    history = _read_history(base)
    history[release.name] = release.history
    write_atomically(base / HISTORY_FILE, json.dumps(history, indent=2, sort_keys=True) + "\n")


def _set_stable(release: ModelRelease, version: int) -> None:
    release.labels = {STABLE: version}
    release.weights = {STABLE: 100}
    if not release.history or release.history[-1] != version:
        release.history.append(version)


def next_version(release: ModelRelease) -> int:
    """Highest version on disk or in a label, plus one (TF Serving serves the highest number as latest)."""
    return max([0, *release.versions(), *release.labels.values()]) + 1


def clean_leftovers(model_dir: Path) -> list[Path]:
    """Removes temporary version directories left by pushes whose process is gone (a crash, SIGKILL)."""
    removed = []
    if not model_dir.is_dir():
        return removed
    for child in model_dir.iterdir():
        match = TEMP_VERSION.match(child.name)
        if match and not _pid_alive(int(match.group("pid"))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_version_atomically(model_dir: Path, version: int, sources: dict[str, Path]) -> Path:
    """Copies `sources` ({relative destination: file or directory}; "" is the SavedModel itself) into a hidden
    temporary directory, fsyncs it, then renames it to `<version>`: a reader sees no version or a whole one."""
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / str(version)
    if target.exists():
        raise ConveyorError(f"version {version} already exists at {target}")
    staging = model_dir / f".{version}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for relative, source in sources.items():
            destination = staging / relative if relative else staging
            if Path(source).is_dir():
                shutil.copytree(source, destination, dirs_exist_ok=True)
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination)
        fsync_tree(staging)
        os.rename(staging, target)
        fsync_directory(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def apply_retention(release: ModelRelease, keep: int) -> list[int]:
    """Deletes all but the newest `keep` versions, never one a label points to; returns what it deleted."""
    versions = release.versions()
    protected = set(release.labels.values()) | set(versions[-keep:])
    removed = []
    for version in versions:
        if version not in protected:
            shutil.rmtree(versions_on_disk(release.model_dir)[version], ignore_errors=True)
            removed.append(version)
    return removed


def release_new_version(release: ModelRelease, version: int, mode: str, canary_weight: int) -> None:
    """direct: the version becomes stable at 100%. canary: it becomes canary at `canary_weight`% and stable
    stays (the very first version is always stable: there is nothing to compare a canary with)."""
    if mode == "direct" or STABLE not in release.labels:
        _set_stable(release, version)
    else:
        release.labels[CANARY] = version
        release.weights = {STABLE: 100 - canary_weight, CANARY: canary_weight}


def promote(release: ModelRelease, weight: int | None = None) -> None:
    """Canary to stable at 100%, or with `weight`, step the canary's share up (1..99)."""
    if CANARY not in release.labels:
        raise ConveyorError(f"model {release.name} has no canary to promote (labels: {_labels_text(release)})")
    if weight is None or weight >= 100:
        _set_stable(release, release.labels[CANARY])
    else:
        if not 1 <= weight <= 99:
            raise ConveyorError("--weight must be between 1 and 100")
        release.weights = {STABLE: 100 - weight, CANARY: weight}


def rollback(release: ModelRelease, to_version: int | None = None) -> int:
    """stable back to `to_version`, or one step back in the stable history; the canary is removed.
    Returns the version now stable."""
    if STABLE not in release.labels:
        raise ConveyorError(f"model {release.name} has no stable version to roll back")
    current = release.labels[STABLE]
    on_disk = release.versions()
    if to_version is None:
        earlier = [v for v in release.history if v in on_disk]
        while earlier and earlier[-1] == current:
            earlier.pop()
        if not earlier:
            raise ConveyorError(f"model {release.name}: no previous stable version to roll back to "
                                f"(stable is {current}); name one with --to")
        to_version = earlier[-1]
    if to_version not in on_disk:
        raise ConveyorError(f"model {release.name}: version {to_version} is not on disk "
                            f"(versions: {', '.join(map(str, on_disk)) or 'none'})")
    if to_version in release.history:
        # Going back: forget the releases after it, so a second rollback steps back further.
        release.history = release.history[:len(release.history) - release.history[::-1].index(to_version)]
    release.labels = {STABLE: to_version}
    release.weights = {STABLE: 100}
    if not release.history or release.history[-1] != to_version:
        release.history.append(to_version)
    return to_version


def snapshot(before: dict[str, int], after: ModelRelease) -> list[dict]:
    """The release state after a change, one row per version it concerns: every labelled version with its
    traffic share, and as `retired` each version that lost its label in this change."""
    rows = []
    for label, version in sorted(after.labels.items()):
        rows.append({"version": version, "label": label, "traffic_percent": after.weights.get(label, 0),
                     "release_state": "canary" if label == CANARY else "live"})
    for label, version in sorted(before.items()):
        if version not in after.labels.values():
            rows.append({"version": version, "label": "", "traffic_percent": 0, "release_state": "retired",
                         "previous_label": label})
    return rows


def _labels_text(release: ModelRelease) -> str:
    return ", ".join(f"{label}={version}" for label, version in sorted(release.labels.items())) or "none"


def write_batching_config(base_path: Path, max_batch_size: int, batch_timeout_micros: int,
                          max_enqueued_batches: int, num_batch_threads: int) -> None:
    text = serving_config.batching_parameters_text(max_batch_size, batch_timeout_micros, max_enqueued_batches,
                                                   num_batch_threads)
    path = base_path / serving_config.BATCHING_CONFIG
    if not path.is_file() or path.read_text() != text:
        write_atomically(path, text)
