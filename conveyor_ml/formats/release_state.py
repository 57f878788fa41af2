"""The state of a serving base path: versions on disk, labels, traffic weights, history; the moves between
states; and how a change reaches the disk so that a SIGKILL at any moment leaves a state that parses and agrees.

Layout:

    <base>/release_state.json     THE release state: per model its labels, traffic weights and stable history
                                  (for rollback), plus the changes ML Metadata has not confirmed yet
    <base>/models.config          ModelServerConfig: per model its base_path, version policy and labels  } derived
    <base>/traffic.json           weights per label for unversioned requests (e.g. stable 90, canary 10) } from it
    <base>/batching.config        BatchingParameters for --enable_batching
    <base>/<model>/<version>/     SavedModels (+ tflite/ variants), written by `write_version_atomically`

TF Serving and `conveyor serve` read models.config and traffic.json, in the formats they always had. Nothing
reads them back as the truth: a change commits the whole new state with ONE atomic rename of
release_state.json, then rewrites the two served files from it, idempotently, in an order that never lets a
reader see traffic.json weigh a label models.config lacks. A crash before the rename leaves the old state, one
after it a state whose served files `repair_files` brings in line on the next command.

The committed state also carries the change itself (`ReleaseChange`: its id, the MLMD rows to record, the
versions it retires) until ML Metadata holds a record with that id. The next command finds a change whose
process is gone, and records it if the record is missing (components/release_record.py): a crash between
the files and the MLMD write is detected and repaired, never lost. Retention is part of a change too: the
labels move first, then each retired version is renamed out of sight and only then deleted.

Every change holds an exclusive lock on `<base>/.conveyor.lock`, so a pipeline push and a `conveyor promote`
never interleave; a lock dies with its process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from conveyor_ml.base.clock import utc_now
from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.files import exclusive_lock, fsync_directory, fsync_tree, write_atomically
from conveyor_ml.base.names import CANARY_LABEL, SHADOW_LABEL, STABLE_LABEL
from conveyor_ml.base.process_lifetime import process_running
from conveyor_ml.formats import serving_config

STABLE, CANARY, SHADOW = STABLE_LABEL, CANARY_LABEL, SHADOW_LABEL
STATE_FILE = "release_state.json"
LEGACY_HISTORY_FILE = "release_history.json"  # before release_state.json: the history alone
STATE_FORMAT = 1
LOCK_FILE = ".conveyor.lock"
# Hidden version directories: a push still copying (tmp) and a retired version on its way out (retiring).
HIDDEN_VERSION = re.compile(r"^\.(?P<version>\d+)\.(?:tmp|retiring)-(?P<pid>\d+)$")
VERSION_DIR = re.compile(r"^\d+$")
# What a state file may hold, checked when it is read: versions are int64 in TF Serving's protos, a pid is
# a pid_t that os.kill takes, a change's id and kind become parts of a record directory's path.
MAX_VERSION = 2 ** 63 - 1
MAX_PID = 2 ** 31 - 1
CHANGE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
CHANGE_KIND = re.compile(r"conveyor\.[A-Za-z]{1,64}")
_ROW_KEYS = {"version": int, "label": str, "traffic_percent": int, "release_state": str,
             "previous_label": str}
# write_atomically's temporary files (".<name>.<random>") of the files a base path holds.
_WRITTEN_FILES = (STATE_FILE, serving_config.MODELS_CONFIG, serving_config.TRAFFIC_FILE,
                  serving_config.BATCHING_CONFIG, LEGACY_HISTORY_FILE)


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
    # Mirroring: `shadow_percent`% of live requests also go to the version `shadow_label` names, answered in
    # the background and compared. The label is `shadow` for a candidate. A canary analysis mirrors both
    # ways to measure agreement request by request: `shadow_label` stable with `shadow_pair` canary sends
    # the canary's requests to stable and stable's to the canary, so both bear the same extra load.
    shadow_percent: int = 0
    shadow_label: str = SHADOW
    shadow_pair: str = ""
    route_key: str = ""  # a request header whose hash picks the version ("": by weight only)
    # The canary analysis that owns the canary ({"version", "pid", "host", "started", "release"}), or a
    # pending one a pipeline push asked for ({"version", "pending": True}); None without one.
    analysis: dict | None = None

    @property
    def model_dir(self) -> Path:
        return self.base_path / self.name

    def versions(self) -> list[int]:
        return sorted(versions_on_disk(self.model_dir))

    def copy(self) -> ModelRelease:
        return ModelRelease(self.name, self.base_path, dict(self.labels), dict(self.weights), list(self.history),
                            self.shadow_percent, self.shadow_label, self.shadow_pair, self.route_key,
                            dict(self.analysis) if self.analysis else None)

    def stop_mirroring(self) -> None:
        self.shadow_percent, self.shadow_label, self.shadow_pair = 0, SHADOW, ""

    def pending_analysis(self) -> int | None:
        """The canary version a pipeline push left for an analysis nobody runs yet (None if none)."""
        owner = self.analysis or {}
        if owner.get("pending") and self.labels.get(CANARY) == owner.get("version"):
            return owner["version"]
        return None

    def analysis_running(self) -> bool:
        """Whether a live process is analysing this model's canary now (a dead one's claim does not count)."""
        owner = self.analysis or {}
        if "pid" not in owner or self.labels.get(CANARY) != owner.get("version"):
            return False
        return (owner.get("host") == socket.gethostname() and process_running(owner["pid"])
                and process_start(owner["pid"]) == owner.get("started"))


@dataclass
class ReleaseChange:
    """A committed change that ML Metadata may not hold yet: what to record, and what it retires on disk."""

    id: str
    kind: str  # the MLMD execution type a repair records it as (conveyor.Push, conveyor.Promote, ...)
    model: str
    rows: list[dict]  # the state after the change, one row per version (see `snapshot`)
    details: dict[str, str]  # the execution's properties: labels before/after, reason, user, ...
    retire: list[int] = field(default_factory=list)  # versions to delete once no label names them
    pid: int = field(default_factory=os.getpid)  # the process making it: in flight while that one lives
    host: str = field(default_factory=socket.gethostname)
    started: int | None = field(default_factory=lambda: process_start(os.getpid()))  # tells a reused pid apart

    @classmethod
    def new(cls, kind: str, model: str, rows: list[dict], details: dict[str, str],
            retire: list[int] | None = None) -> ReleaseChange:
        return cls(uuid.uuid4().hex, kind, model, rows, {"changed_at": utc_now(), **details}, list(retire or []))

    def in_flight(self) -> bool:
        """True while the process that made the change may still record it (a pipeline run publishes its
        push after the pusher returns); a change from another host counts as finished."""
        return (self.host == socket.gethostname() and self.pid != os.getpid() and process_running(self.pid)
                and process_start(self.pid) == self.started)


@dataclass
class ReleaseState:
    base_path: Path
    models: dict[str, ModelRelease] = field(default_factory=dict)
    unrecorded: list[ReleaseChange] = field(default_factory=list)
    stored: bool = False  # False: built from the files older versions wrote (or from nothing)

    def release(self, name: str) -> ModelRelease:
        """A copy of the model's release (empty for a model never pushed), to change and `apply_change`."""
        found = self.models.get(name)
        return found.copy() if found else ModelRelease(name, self.base_path)


@contextmanager
def locked(base_path: Path, waiting: Callable[[Path], None] | None = None):
    """The base path's lock, held for the block; `waiting(lock file)` is called once if another process holds
    it (the wait is otherwise silent, and can be long: a pipeline pushing a large model holds it)."""
    base_path.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(base_path / LOCK_FILE, waiting):
        yield


# -- reading ---------------------------------------------------------------------------------------------
def read_state(base_path: Path) -> ReleaseState:
    """The committed state; from models.config, traffic.json and release_history.json where an older
    version of Conveyor wrote only those. A damaged file is an error naming it, never an empty state."""
    base_path = Path(base_path)
    path = base_path / STATE_FILE
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a directory, or a FIFO a read would wait on forever
            raise _damaged(path, "not a regular file")
        text = path.read_text()
    except FileNotFoundError:
        return _state_from_older_files(base_path)
    except (OSError, UnicodeDecodeError) as exc:
        raise _damaged(path, getattr(exc, "strerror", None) or "not UTF-8 text") from None
    try:
        return _parse_state(base_path, json.loads(text))
    except json.JSONDecodeError as exc:
        raise _damaged(path, f"not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise _damaged(path, "unexpected content: nested too deeply") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _damaged(path, f"unexpected content: {exc}") from None


def _damaged(path: Path, reason: str) -> ConveyorError:
    return ConveyorError(f"{path}: {reason}. It records which version each label serves and the rollback "
                         "history; restore it from a backup, or move it away to rebuild it from models.config and "
                         "traffic.json (the rollback history is then lost)")


def _shown(value) -> str:
    """A value as a message may quote it: one line, short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_model_name(name) -> bool:
    """The spec's rule for serving_pusher.model_name: one path component (no '/', no '..'), 1..63
    characters."""
    return isinstance(name, str) and _model_name_rule().fullmatch(name) is not None


@lru_cache(maxsize=1)
def _model_name_rule() -> re.Pattern:
    from conveyor_ml.base.spec import ServingPusherSettings  # the rule's one home; the spec costs its import

    [model_name] = [f for f in fields(ServingPusherSettings) if f.name == "model_name"]
    return re.compile(model_name.metadata["schema"]["pattern"])


def _model_name(name, what: str) -> str:
    if not is_model_name(name):
        raise ValueError(f"{what} {_shown(name)} is not a model name (1..63 letters, digits, '_', '.' or "
                         "'-', starting with a letter or digit)")
    return name


def _integer(value, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in {low}..{high}, not {_shown(value)}")
    return value


def _of_type(value, what: str, kind: type, kind_name: str):
    if not isinstance(value, kind):
        raise ValueError(f"{what} must be {kind_name}, not {_shown(value)}")
    return value


def _text(value, what: str) -> str:
    return _of_type(value, what, str, "a string")


def _object(value, what: str) -> dict:
    return _of_type(value, what, dict, "an object")


def _list(value, what: str) -> list:
    return _of_type(value, what, list, "a list")


def _int_map(value, what: str, high: int = MAX_VERSION) -> dict[str, int]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and type(v) is int and 0 <= v <= high
                                              for k, v in value.items()):
        raise ValueError(f"{what} must map names to integers in 0..{high}")
    return dict(value)


def _versions(value, what: str) -> list[int]:
    return [_integer(v, f"{what}[{i}]", 0, MAX_VERSION) for i, v in enumerate(_list(value, what))]


def _parse_analysis(value, what: str) -> dict | None:
    if value is None:
        return None
    analysis = _object(value, what)
    for key, item in analysis.items():
        if key == "version":
            _integer(item, f"{what}.{key}", 0, MAX_VERSION)
        elif key == "pid":
            _integer(item, f"{what}.{key}", 1, MAX_PID)
        elif key == "started":
            if item is not None:
                _integer(item, f"{what}.{key}", -(2 ** 63), 2 ** 63 - 1)
        elif key == "pending":
            if not isinstance(item, bool):
                raise ValueError(f"{what}.pending must be true or false, not {_shown(item)}")
        elif key in ("host", "since", "release"):
            _text(item, f"{what}.{key}")
        else:
            raise ValueError(f"{what} has an unknown key {_shown(key)}")
    return analysis


def _parse_model(base_path: Path, name, entry) -> ModelRelease:
    _model_name(name, "model")
    where = f"models.{name}"
    entry = _object(entry, where)
    history = _versions(entry["history"], f"{where}.history")
    shadow_percent, route_key = entry.get("shadow_percent", 0), entry.get("route_key", "")
    shadow_label, shadow_pair = entry.get("shadow_label", SHADOW), entry.get("shadow_pair", "")
    if type(shadow_percent) is not int or not 0 <= shadow_percent <= 100 or not isinstance(route_key, str) \
            or not isinstance(shadow_label, str) or not isinstance(shadow_pair, str):
        raise ValueError(f"{where}: shadow_percent 0..100, shadow_label and route_key names, analysis an "
                         "object")
    analysis = _parse_analysis(entry.get("analysis"), f"{where}.analysis")
    return ModelRelease(name, base_path, _int_map(entry["labels"], f"{where}.labels"),
                        _int_map(entry["weights"], f"{where}.weights", 100), history,
                        shadow_percent, shadow_label, shadow_pair, route_key, analysis)


def _parse_row(row, what: str) -> dict:
    row = _object(row, what)
    unknown = sorted(set(row) - set(_ROW_KEYS))
    if unknown:
        raise ValueError(f"{what} has an unknown key {_shown(unknown[0])}")
    for key in ("version", "release_state"):
        if key not in row:
            raise ValueError(f"{what} lacks {key!r}")
    for key, item in row.items():
        if _ROW_KEYS[key] is int:
            _integer(item, f"{what}.{key}", 0, MAX_VERSION if key == "version" else 100)
        else:
            _text(item, f"{what}.{key}")
    return row


def _parse_change(entry, what: str) -> ReleaseChange:
    entry = _object(entry, what)
    unknown = sorted(set(entry) - {f.name for f in fields(ReleaseChange)})
    if unknown:
        raise ValueError(f"{what} has an unknown key {_shown(unknown[0])}")
    for key in ("id", "kind", "model", "rows", "details"):
        if key not in entry:
            raise ValueError(f"{what} lacks {key!r}")
    if not isinstance(entry["id"], str) or not CHANGE_ID.fullmatch(entry["id"]):
        raise ValueError(f"{what}.id must be a change id (letters, digits, '_', '-'), not "
                         f"{_shown(entry['id'])}")
    if not isinstance(entry["kind"], str) or not CHANGE_KIND.fullmatch(entry["kind"]):
        raise ValueError(f"{what}.kind must be an execution type such as 'conveyor.Promote', not "
                         f"{_shown(entry['kind'])}")
    _model_name(entry["model"], f"{what}.model")
    rows = [_parse_row(row, f"{what}.rows[{i}]")
            for i, row in enumerate(_list(entry["rows"], f"{what}.rows"))]
    details = _object(entry["details"], f"{what}.details")
    for key, item in details.items():
        _text(item, f"{what}.details.{key}")
    retire = _versions(entry.get("retire", []), f"{what}.retire")
    if "pid" in entry:
        _integer(entry["pid"], f"{what}.pid", 1, MAX_PID)
    if "host" in entry:
        _text(entry["host"], f"{what}.host")
    if entry.get("started") is not None:
        _integer(entry["started"], f"{what}.started", -(2 ** 63), 2 ** 63 - 1)
    return ReleaseChange(**{**entry, "rows": rows, "details": dict(details), "retire": retire})


def _parse_state(base_path: Path, document) -> ReleaseState:
    """The state a release_state.json document holds, every part checked: names that become paths, numbers
    that reach os.kill or a proto, the shapes the release code indexes (a ValueError says what is wrong)."""
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise ValueError(f'expected {{"format": {STATE_FORMAT}, "models": ..., "unrecorded": ...}}')
    try:  # JSON's \ud800 escapes: strings that no proto, ML Metadata property or UTF-8 file can hold
        json.dumps(document, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValueError("a string holds an unpaired surrogate (\\ud800-\\udfff), which is not "
                         "text") from None
    models = {name: _parse_model(base_path, name, entry)
              for name, entry in _object(document["models"], "models").items()}
    unrecorded = [_parse_change(entry, f"unrecorded[{index}]")
                  for index, entry in enumerate(_list(document["unrecorded"], "unrecorded"))]
    return ReleaseState(base_path, models, unrecorded, stored=True)


def _state_from_older_files(base_path: Path) -> ReleaseState:
    state = ReleaseState(base_path)
    config_path = base_path / serving_config.MODELS_CONFIG
    if config_path.is_file():
        for model in serving_config.read_model_server_config(config_path).model_config_list.config:
            if not is_model_name(model.name):  # it becomes the model's directory under the base path
                raise ConveyorError(f"{config_path}: model name {_shown(model.name)} is not a model name "
                                    "(1..63 letters, digits, '_', '.' or '-'); fix it, or move the file away")
            state.models[model.name] = ModelRelease(model.name, base_path, dict(model.version_labels))
    traffic = serving_config.read_traffic(base_path / serving_config.TRAFFIC_FILE)
    history_path = base_path / LEGACY_HISTORY_FILE
    try:
        history = json.loads(history_path.read_text())
        if not isinstance(history, dict) or not all(
                isinstance(v, list) and all(type(x) is int and 0 <= x <= MAX_VERSION for x in v)
                for v in history.values()):
            raise ValueError("expected {model: [versions]}")
    except FileNotFoundError:
        history = {}
    except (ValueError, UnicodeDecodeError, OSError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ConveyorError(f"{history_path}: not a valid release history ({reason}); it holds each model's "
                            "stable versions for rollback: fix it, or delete it to start the history "
                            "afresh") from None
    for name, release in state.models.items():
        release.weights = traffic.for_model(name)
        release.history = list(history.get(name, []))
    return state


def read_release(base_path: Path, model_name: str) -> ModelRelease:
    return read_state(base_path).release(model_name)


def known_models(base_path: Path) -> list[str]:
    return sorted(read_state(base_path).models)


# -- writing ---------------------------------------------------------------------------------------------
def _model_document(release: ModelRelease) -> dict:
    """One model's entry; the progressive-delivery keys only when set, so older readers see what they knew."""
    document = {"labels": dict(sorted(release.labels.items())), "weights": dict(sorted(release.weights.items())),
                "history": list(release.history)}
    if release.shadow_percent:
        document["shadow_percent"] = release.shadow_percent
        document["shadow_label"] = release.shadow_label
        if release.shadow_pair:
            document["shadow_pair"] = release.shadow_pair
    if release.route_key:
        document["route_key"] = release.route_key
    if release.analysis:
        document["analysis"] = release.analysis
    return document


def _state_document(state: ReleaseState) -> dict:
    return {"format": STATE_FORMAT,
            "models": {name: _model_document(r) for name, r in sorted(state.models.items())},
            "unrecorded": [asdict(change) for change in state.unrecorded]}


def commit(state: ReleaseState) -> None:
    """The one write that changes the release: the whole state, by one atomic rename."""
    write_atomically(state.base_path / STATE_FILE, json.dumps(_state_document(state), indent=2) + "\n")
    state.stored = True
    # The history lives in the state now; the old file would only go stale.
    (state.base_path / LEGACY_HISTORY_FILE).unlink(missing_ok=True)


def _served_entry(entry: model_server_config_pb2.ModelConfig, release: ModelRelease) -> None:
    entry.Clear()
    entry.name = release.name
    entry.base_path = str(release.model_dir.resolve())
    entry.model_platform = "tensorflow"
    labelled = sorted(set(release.labels.values()))
    if labelled:
        entry.model_version_policy.specific.versions.extend(labelled)  # serve exactly the labelled versions
    else:
        entry.model_version_policy.latest.num_versions = 1
    for label, version in sorted(release.labels.items()):
        entry.version_labels[label] = version


def _check_writable_file(path: Path) -> None:
    """A file a command rewrites must be a file or missing: a directory in its place cannot be renamed over,
    and a FIFO would keep the command waiting; refused before anything is written."""
    real = Path(os.path.realpath(path))
    if real.exists() and not real.is_file():
        kind = "a directory" if real.is_dir() else "not a regular file"
        raise ConveyorError(f"{path}: {kind}, where Conveyor writes a file; move it away and run the command "
                            "again (it is written afresh)")


def _read_or_none(read, path: Path):
    """A served file as it is now; None when missing or unreadable (it is rewritten from the state then)."""
    try:
        return read(path) if path.is_file() else None
    except ConveyorError:
        return None


def sync_served_files(state: ReleaseState) -> bool:
    """Rewrites models.config and traffic.json from the state where they differ; True if it wrote any.

    Order: traffic first when it weighs a label the new config drops (with only the labels both configs
    have), then the config, then the traffic: at every moment each weighted label is in models.config.
    Entries of models the state does not know are kept as they are."""
    base = state.base_path
    config_path, traffic_path = base / serving_config.MODELS_CONFIG, base / serving_config.TRAFFIC_FILE
    for path in (config_path, traffic_path):
        _check_writable_file(path)
    current_config = _read_or_none(serving_config.read_model_server_config, config_path)
    current_traffic = _read_or_none(serving_config.read_traffic, traffic_path) or serving_config.TrafficWeights()
    config = model_server_config_pb2.ModelServerConfig()
    if current_config is not None:
        config.CopyFrom(current_config)
    entries = config.model_config_list.config
    for name, release in sorted(state.models.items()):
        entry = next((m for m in entries if m.name == name), None) or entries.add()
        _served_entry(entry, release)
    traffic = serving_config.TrafficWeights(
        {**current_traffic.models, **{name: dict(r.weights) for name, r in state.models.items()}},
        {**{n: s for n, s in current_traffic.shadows.items() if n not in state.models},
         **{name: {"label": r.shadow_label, "percent": r.shadow_percent,
                   **({"pair": r.shadow_pair} if r.shadow_pair in r.labels else {})}
            for name, r in state.models.items() if r.shadow_label in r.labels and r.shadow_percent}},
        {**{n: h for n, h in current_traffic.route_keys.items() if n not in state.models},
         **{name: r.route_key for name, r in state.models.items() if r.route_key}})

    labels_now = {m.name: set(m.version_labels) for m in current_config.model_config_list.config} \
        if current_config is not None else {}
    dropped = any(label not in state.models[name].labels
                  for name, split in current_traffic.models.items() if name in state.models for label in split) \
        or any(shadow["label"] not in state.models[name].labels
               for name, shadow in current_traffic.shadows.items() if name in state.models)
    wrote = False
    if dropped:
        interim = serving_config.TrafficWeights({**traffic.models, **{
            name: {label: w for label, w in r.weights.items() if label in labels_now.get(name, set())}
            for name, r in state.models.items()}},
            {name: shadow for name, shadow in traffic.shadows.items()
             if shadow["label"] in labels_now.get(name, set()) or name not in state.models},
            traffic.route_keys)
        wrote |= _write_if_changed(traffic_path, serving_config.traffic_text(interim))
    wrote |= _write_if_changed(config_path, text_format.MessageToString(config))
    wrote |= _write_if_changed(traffic_path, serving_config.traffic_text(traffic))
    return wrote


def _write_if_changed(path: Path, text: str) -> bool:
    _check_writable_file(path)
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_atomically(path, text)
    return True


def apply_change(state: ReleaseState, release: ModelRelease, change: ReleaseChange) -> list[int]:
    """Makes `release` the model's state, with `change` remembered until ML Metadata confirms it: commit,
    served files, then the retired versions; returns the versions retired."""
    state.models[release.name] = release
    state.unrecorded.append(change)
    commit(state)
    sync_served_files(state)
    return retire_versions(state, change)


def forget_change(state: ReleaseState, change_id: str) -> None:
    """ML Metadata holds the change now: the state need not carry it any longer."""
    state.unrecorded = [c for c in state.unrecorded if c.id != change_id]
    commit(state)


def revert_change(state: ReleaseState, before: ModelRelease, change: ReleaseChange) -> None:
    """Puts the model's state back as it was before `change` (whose record failed, or was interrupted), files
    included, and removes the temporary file an interrupted write left (call with the lock held)."""
    state.models[before.name] = before
    state.unrecorded = [c for c in state.unrecorded if c.id != change.id]
    commit(state)
    sync_served_files(state)
    clean_leftovers(state.base_path)


def retire_versions(state: ReleaseState, change: ReleaseChange) -> list[int]:
    """Deletes the versions a change retires that no label names (any more)."""
    release = state.models.get(change.model)
    if release is None:
        return []
    on_disk = versions_on_disk(release.model_dir)
    retired = []
    for version in change.retire:
        if version in release.labels.values() or version not in on_disk:
            continue
        remove_version_directory(release.model_dir, on_disk[version])
        retired.append(version)
    return retired


def remove_version_directory(model_dir: Path, version_dir: Path) -> None:
    """Renamed to a hidden name first, so no reader ever sees a numbered directory half deleted."""
    hidden = model_dir / f".{version_dir.name}.retiring-{os.getpid()}"
    os.rename(version_dir, hidden)
    fsync_directory(model_dir)
    shutil.rmtree(hidden, ignore_errors=True)


def repair_files(state: ReleaseState) -> list[str]:
    """What an interrupted command left on disk, put right (call with the lock held): temporary files and
    directories of dead processes removed, retirements finished, the served files rewritten from the state,
    and a state built from older files written. Returns one line per repair."""
    repairs = []
    if not state.base_path.is_dir():
        return repairs
    leftovers = clean_leftovers(state.base_path)
    for model_dir in sorted(p for p in state.base_path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        leftovers += clean_leftovers(model_dir)
    if leftovers:
        repairs.append(f"removed {len(leftovers)} temporary file(s) an interrupted command left: "
                       + ", ".join(path.name for path in leftovers[:5]) + (" ..." if len(leftovers) > 5 else ""))
    for change in state.unrecorded:
        if not change.in_flight():
            retired = retire_versions(state, change)
            if retired:
                repairs.append(f"finished retiring version(s) {', '.join(map(str, retired))} of {change.model}")
    if not state.stored and state.models:
        commit(state)
        repairs.append(f"wrote {STATE_FILE} from models.config, traffic.json and {LEGACY_HISTORY_FILE}")
    if state.models and sync_served_files(state):
        repairs.append(f"rewrote models.config and traffic.json from {STATE_FILE}, which an interrupted command "
                       "had changed without them")
    return repairs


def clean_leftovers(directory: Path) -> list[Path]:
    """Removes what writers that are gone (a crash, SIGKILL) left in a base path or model directory:
    hidden version directories of dead processes, and atomic-write temporaries (call with the lock held:
    every writer of those files holds it, so none is being written now)."""
    removed = []
    if not directory.is_dir():
        return removed
    for child in sorted(directory.iterdir()):
        match = HIDDEN_VERSION.match(child.name)
        if match and not process_running(int(match.group("pid"))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
        elif child.is_file() and any(child.name.startswith(f".{name}.") for name in _WRITTEN_FILES):
            child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def process_start(pid: int) -> int | None:
    """When the process started (clock ticks since boot, from /proc; None where there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces




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


# -- the moves -------------------------------------------------------------------------------------------
def _set_stable(release: ModelRelease, version: int) -> None:
    shadow = release.labels.get(SHADOW)
    release.labels = {STABLE: version, **({SHADOW: shadow} if shadow not in (None, version) else {})}
    if SHADOW not in release.labels or release.shadow_label != SHADOW:
        release.stop_mirroring()
    release.weights = {STABLE: 100}
    if not release.history or release.history[-1] != version:
        release.history.append(version)


def next_version(release: ModelRelease) -> int:
    """Highest version on disk, in a label or in the history, plus one (TF Serving serves the highest number
    as latest; a number once released is never reused, so its ML Metadata records stay unambiguous)."""
    return max([0, *release.versions(), *release.labels.values(), *release.history]) + 1


def retention(release: ModelRelease, keep: int) -> list[int]:
    """The versions to retire so that only the newest `keep` stay, never one a label points to."""
    versions = release.versions()
    protected = set(release.labels.values()) | set(versions[-keep:])
    return [version for version in versions if version not in protected]


def release_new_version(release: ModelRelease, version: int, mode: str, canary_weight: int,
                        shadow_percent: int = 100) -> None:
    """direct: the version becomes stable at 100%. canary: it becomes canary at `canary_weight`% and stable
    stays. shadow: it is labelled shadow and sees `shadow_percent`% of live requests' copies, answering none.
    The very first version is always stable: there is nothing to compare with."""
    if mode == "direct" or STABLE not in release.labels:
        _set_stable(release, version)
    elif mode == "shadow":
        set_shadow(release, version, shadow_percent)
    else:
        set_canary(release, version, canary_weight)


def set_canary(release: ModelRelease, version: int, weight: int) -> None:
    """`version` labelled canary at `weight`% (0..100: at 100 stable stays labelled but takes no traffic, the
    last step an analysis judges before promoting); a version that was the shadow stops being it."""
    if not 0 <= weight <= 100:
        raise ConveyorError(f"a canary takes 0..100 percent, not {weight}")
    if release.labels.get(STABLE) == version:
        raise ConveyorError(f"model {release.name}: version {version} is stable already")
    if release.labels.get(SHADOW) == version:
        end_shadow(release)
    release.labels[CANARY] = version
    release.weights = {STABLE: 100 - weight, CANARY: weight}


def set_shadow(release: ModelRelease, version: int, percent: int) -> None:
    """`version` labelled shadow: `percent`% of live requests are also sent to it, its answers only compared."""
    if not 1 <= percent <= 100:
        raise ConveyorError(f"--percent {percent}: a shadow sees 1..100 percent of live requests")
    if version in (release.labels.get(STABLE), release.labels.get(CANARY)):
        raise ConveyorError(f"model {release.name}: version {version} already takes live traffic; a shadow is a "
                            "candidate that does not")
    release.labels[SHADOW] = version
    release.stop_mirroring()
    release.shadow_percent = percent


def drop_canary(release: ModelRelease) -> int:
    """The canary removed and stable back at 100% (an analysis' rollback: stable itself does not move);
    returns the version that was the canary."""
    if CANARY not in release.labels:
        raise ConveyorError(f"model {release.name} has no canary (labels: {_labels_text(release)})")
    version = release.labels.pop(CANARY)
    release.weights = {STABLE: 100}
    if release.shadow_label != SHADOW:  # the canary's comparison with stable ends with it
        release.stop_mirroring()
    return version


def end_shadow(release: ModelRelease) -> int | None:
    """Removes the shadow label; returns the version that was the shadow (None if there was none)."""
    release.stop_mirroring()
    return release.labels.pop(SHADOW, None)


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
    """stable back to `to_version`, or one step back in the stable history; the canary is removed. With a
    canary and no earlier stable version, only the canary is removed. Returns the version now stable."""
    if STABLE not in release.labels:
        raise ConveyorError(f"model {release.name} has no stable version to roll back")
    current = release.labels[STABLE]
    on_disk = release.versions()
    if to_version is None:
        earlier = [v for v in release.history if v in on_disk]
        while earlier and earlier[-1] == current:
            earlier.pop()
        if not earlier and CANARY in release.labels:
            to_version = current  # nothing earlier to go back to: rolling back undoes the canary alone
        elif not earlier:
            raise ConveyorError(f"model {release.name}: no previous stable version to roll back to "
                                f"(stable is {current}); name one with --to")
        else:
            to_version = earlier[-1]
    if to_version not in on_disk:
        raise ConveyorError(f"model {release.name}: version {to_version} is not on disk "
                            f"(versions: {', '.join(map(str, on_disk)) or 'none'})")
    if to_version == current and CANARY not in release.labels:
        versions = ", ".join(map(str, on_disk))
        raise ConveyorError(f"model {release.name}: version {current} is stable already and there is no "
                            f"canary: nothing to roll back (versions on disk: {versions})")
    if to_version in release.history:
        # Going back: forget the releases after it, so a second rollback steps back further.
        release.history = release.history[:len(release.history) - release.history[::-1].index(to_version)]
    shadow = release.labels.get(SHADOW)
    release.labels = {STABLE: to_version, **({SHADOW: shadow} if shadow not in (None, to_version) else {})}
    if SHADOW not in release.labels or release.shadow_label != SHADOW:
        release.stop_mirroring()
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
                     "release_state": {CANARY: "canary", SHADOW: "shadow"}.get(label, "live")})
    for label, version in sorted(before.items()):
        if version not in after.labels.values():
            rows.append({"version": version, "label": "", "traffic_percent": 0, "release_state": "retired",
                         "previous_label": label})
    return rows


def change_details(before: ModelRelease, after: ModelRelease, **extra: str) -> dict[str, str]:
    """The execution properties every local release change records."""
    return {"labels_before": json.dumps(before.labels, sort_keys=True),
            "labels_after": json.dumps(after.labels, sort_keys=True),
            "weights_after": json.dumps(after.weights, sort_keys=True), **extra}


def _labels_text(release: ModelRelease) -> str:
    return ", ".join(f"{label}={version}" for label, version in sorted(release.labels.items())) or "none"


def write_batching_config(base_path: Path, max_batch_size: int, batch_timeout_micros: int,
                          max_enqueued_batches: int, num_batch_threads: int) -> None:
    text = serving_config.batching_parameters_text(max_batch_size, batch_timeout_micros, max_enqueued_batches,
                                                   num_batch_threads)
    _write_if_changed(base_path / serving_config.BATCHING_CONFIG, text)
