"""Hostile input to the release commands: a --variant that is a path or a corrupt model, a damaged variant
manifest, release_state.json with names that are paths or numbers no process or proto takes, served files
that are directories or garbage, and a rollback that changes nothing. Each is one ConveyorError line that
names what is wrong, and nothing on disk or in ML Metadata changes."""
from __future__ import annotations

import json
from pathlib import Path

import flatbuffers
import pytest
from ai_edge_litert import schema_py_generated as tflite_schema

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import load_spec
from conveyor_ml.components.release_record import reconcile
from conveyor_ml.formats import release_state as releases
from conveyor_ml.formats import serving_config
from conveyor_ml.metadata import store as metadata
from conveyor_ml.metadata.index import deployment_snapshots
from conveyor_ml.operations.release_commands import (
    PROMOTE,
    ROLLBACK,
    change_release,
    release_variant_canary,
    status,
)
from tests.conftest import write_spec
from tests.unit.test_release import fake_model

NO_SERVER = "http://127.0.0.1:9"  # nothing listens: status reports the server down at once


def tiny_tflite() -> bytes:
    """A real TFLite model, y = x + x on a float32 [1, 4] tensor, built with LiteRT's schema (no
    TensorFlow)."""
    model = tflite_schema.ModelT()
    model.version = 3
    model.buffers = [tflite_schema.BufferT()]  # buffer 0, the empty one every model starts with
    add = tflite_schema.OperatorCodeT()
    add.builtinCode = add.deprecatedBuiltinCode = tflite_schema.BuiltinOperator.ADD
    add.version = 1
    model.operatorCodes = [add]
    graph = tflite_schema.SubGraphT()
    graph.name, graph.inputs, graph.outputs, graph.tensors = "main", [0], [1], []
    for name in ("x", "y"):
        tensor = tflite_schema.TensorT()
        tensor.name, tensor.shape, tensor.buffer = name, [1, 4], 0
        tensor.type = tflite_schema.TensorType.FLOAT32
        graph.tensors.append(tensor)
    operator = tflite_schema.OperatorT()
    operator.opcodeIndex, operator.inputs, operator.outputs = 0, [0, 0], [1]
    operator.builtinOptionsType = tflite_schema.BuiltinOptions.AddOptions
    operator.builtinOptions = tflite_schema.AddOptionsT()
    graph.operators = [operator]
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.fixture
def spec(tmp_path):
    return pushed_spec(tmp_path)


def pushed_spec(tmp_path: Path):
    """A spec whose serving base path has version 1 of mnist stable, pushed with float16 and int8 TFLite
    variants and a manifest naming them, and recorded in ML Metadata."""
    fake_model(tmp_path / "src")
    variants = tmp_path / "variants"
    variants.mkdir()
    for name in ("float16", "int8"):
        (variants / f"{name}.tflite").write_bytes(tiny_tflite())
    (variants / "manifest.json").write_text(json.dumps({"variants": [
        {"variant": "float16", "file": "float16.tflite"}, {"variant": "int8", "file": "int8.tflite"}]}))
    loaded = load_spec(write_spec(tmp_path))
    loaded.workspace.mkdir()
    state = releases.read_state(loaded.serving_base)
    release = state.release("mnist")
    before = release.copy()
    releases.write_version_atomically(release.model_dir, 1, {"": tmp_path / "src", **{
        f"tflite/{path.name}": path for path in variants.iterdir()}})
    releases.release_new_version(release, 1, "direct", 10)
    releases.apply_change(state, release, releases.ReleaseChange.new(
        "conveyor.Push", "mnist", releases.snapshot(before.labels, release),
        releases.change_details(before, release)))
    reconcile(loaded, lambda line: None)  # records the push, as the next command after a pipeline run does
    return loaded


def on_disk(base: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under the serving base path, but the lock."""
    return {str(path.relative_to(base)): (path.read_bytes() if path.is_file() else None)
            for path in sorted(base.rglob("*")) if path.name != releases.LOCK_FILE}


def recorded(spec) -> list[str]:
    """The kinds of the release changes ML Metadata holds for mnist, oldest first."""
    return [snapshot.kind for snapshot in deployment_snapshots(metadata.open_store(spec.metadata), "mnist")]


def refused(call, *args, match: str, **kwargs) -> str:
    with pytest.raises(ConveyorError, match=match) as error:
        call(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


# -- 1. canary --variant: a name from the manifest, a model LiteRT loads -----------------------------------
def test_the_pushed_variant_becomes_the_canary(spec):
    release = release_variant_canary(spec, "mnist", "int8", say=lambda line: None)
    assert release.labels == {"stable": 1, "canary": 2} and release.weights == {"stable": 90, "canary": 10}
    model_dir = spec.serving_base / "mnist"
    pushed = model_dir / "1" / "tflite" / "int8.tflite"
    assert (model_dir / "2" / "model.tflite").read_bytes() == pushed.read_bytes()
    assert recorded(spec) == ["conveyor.Push", "conveyor.VariantCanary"]


@pytest.mark.parametrize("variant", ["{evil}", "{evil_relative}", "../1/tflite/int8", "int8.tflite", "int4",
                                     "int8\nx"])
def test_a_variant_is_a_name_the_manifest_lists_never_a_path(spec, tmp_path, variant):
    (tmp_path / "x").mkdir()
    evil = tmp_path / "x" / "evil"
    evil.with_suffix(".tflite").write_bytes(tiny_tflite())  # loadable, and still no pushed variant
    tflite_dir = spec.serving_base / "mnist" / "1" / "tflite"
    variant = variant.format(evil=evil, evil_relative=Path(*[".."] * len(tflite_dir.parts)) / str(evil)[1:])
    before = on_disk(spec.serving_base)
    refused(release_variant_canary, spec, "mnist", variant, say=lambda line: None,
            match=r"has no .* variant \(pushed variants: float16, int8\)")
    assert on_disk(spec.serving_base) == before
    assert recorded(spec) == ["conveyor.Push"]


@pytest.mark.parametrize("content", [b"corrupt", b"", tiny_tflite()[:150]])
def test_a_corrupt_variant_is_refused_before_anything_changes(spec, content):
    variant_file = spec.serving_base / "mnist" / "1" / "tflite" / "int8.tflite"
    variant_file.write_bytes(content)
    _int8_canary_refused_changing_nothing(
        spec, rf"{variant_file}: not a TFLite model LiteRT can load .*restore it from a backup")


def _int8_canary_refused_changing_nothing(spec, match: str) -> None:
    before = on_disk(spec.serving_base)
    refused(release_variant_canary, spec, "mnist", "int8", say=lambda line: None, match=match)
    assert on_disk(spec.serving_base) == before
    assert recorded(spec) == ["conveyor.Push"]


@pytest.mark.parametrize("content", [
    b"\xff\xfe{}", "directory", b"[" * 100_000 + b"]" * 100_000, b'{"variants": [{"variant": 5}]}',
    b'{"variants": [{"variant": "../int8"}]}', b'{"variants": 5}', b"[]",
    b'{"variants": [{"variant": "int8"}', b"1" * 5000])
def test_a_damaged_manifest_is_one_line_naming_it(spec, content):
    manifest = spec.serving_base / "mnist" / "1" / "tflite" / "manifest.json"
    manifest.unlink()
    if content == "directory":
        manifest.mkdir()
    else:
        manifest.write_bytes(content)
    _int8_canary_refused_changing_nothing(spec, rf"^{manifest}: .*restore it from a backup")


def test_a_version_without_a_manifest_has_no_variants(spec):
    (spec.serving_base / "mnist" / "1" / "tflite" / "manifest.json").unlink()
    refused(release_variant_canary, spec, "mnist", "int8", say=lambda line: None,
            match=r"has no int8 variant \(pushed variants: none")


# -- 3 and 4. release_state.json: every part checked as it is read ------------------------------------------
def _state_with(spec, **changes) -> dict:
    document = json.loads((spec.serving_base / releases.STATE_FILE).read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = document
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[leaf] = json.loads(json.dumps(value))  # a copy: tests change it further
    return document


UNRECORDED = {"id": "0123abcd", "kind": "conveyor.Promote", "model": "mnist", "details": {"reason": "x"},
              "rows": [{"version": 1, "label": "stable", "traffic_percent": 100, "release_state": "live"}],
              "retire": [], "pid": 4194000, "host": "elsewhere", "started": None}
GARBLED = {
    "pid a string": {"pid": "abc"},
    "pid too big for os.kill": {"pid": 99999999999999999999},
    "pid zero": {"pid": 0},
    "retire not a list": {"retire": 5},
    "retire a string": {"retire": "1"},
    "a row without version": {"rows": [{"label": "stable", "release_state": "live"}]},
    "a row not an object": {"rows": [1]},
    "a version too big for a proto": {"rows": [{"version": 2 ** 64, "release_state": "live"}]},
    "a kind that is a path": {"kind": "../../../../tmp/evil"},
    "an id that breaks a query": {"id": "x' OR '1'='1"},
    "details not strings": {"details": {"reason": {"nested": 1}}},
    "a model that is a path": {"model": "../../escape"},
    "an unknown key": {"surprise": 1},
    "started a string": {"started": "yesterday"},
}


@pytest.mark.parametrize("garbled", GARBLED.values(), ids=GARBLED.keys())
def test_a_garbled_unrecorded_change_is_one_line_in_every_release_command(spec, garbled):
    document = _state_with(spec, unrecorded=[{**UNRECORDED, **garbled}])
    (spec.serving_base / releases.STATE_FILE).write_text(json.dumps(document))
    before = on_disk(spec.serving_base)
    for command in (lambda: releases.read_state(spec.serving_base),
                    lambda: status(spec, None, NO_SERVER, say=lambda line: None),
                    lambda: change_release(spec, "mnist", ROLLBACK, to_version=1, say=lambda line: None),
                    lambda: change_release(spec, "mnist", PROMOTE, say=lambda line: None)):
        refused(command, match=rf"{releases.STATE_FILE}: unexpected content: unrecorded\[0\].* restore it "
                               "from a backup")
    assert on_disk(spec.serving_base) == before
    assert recorded(spec) == ["conveyor.Push"]


@pytest.mark.parametrize("where", ["models.mnist.labels", "unrecorded.0.details", "unrecorded.0.host"])
def test_a_lone_surrogate_no_proto_or_property_takes_is_unexpected_content(spec, where):
    document = _state_with(spec, unrecorded=[UNRECORDED])
    *parents, leaf = where.split(".")
    node = document
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[leaf] = "\ud800" if leaf == "host" else {"\ud800": 1} if leaf == "labels" else {"reason": "\udfff"}
    (spec.serving_base / releases.STATE_FILE).write_text(json.dumps(document))  # valid JSON: "\\ud800"
    refused(status, spec, None, NO_SERVER, say=lambda line: None,
            match=rf"{releases.STATE_FILE}: unexpected content: a string holds an unpaired surrogate")


def test_a_well_formed_unrecorded_change_still_reads(spec):
    document = _state_with(spec, unrecorded=[UNRECORDED])
    (spec.serving_base / releases.STATE_FILE).write_text(json.dumps(document))
    [change] = releases.read_state(spec.serving_base).unrecorded
    assert change.pid == 4194000 and change.rows[0]["version"] == 1


MODEL_ENTRY = {"labels": {"stable": 1}, "weights": {"stable": 100}, "history": [1]}
GARBLED_MODELS = {
    "a name that climbs out": {"../../escape": MODEL_ENTRY},
    "an absolute name": {"/tmp/abs": MODEL_ENTRY},
    "a name with a slash": {"a/b": MODEL_ENTRY},
    "a dot name": {"..": MODEL_ENTRY},
    "an analysis pid too big": {"mnist": {**MODEL_ENTRY, "analysis": {"version": 1, "pid": 10 ** 30}}},
    "an analysis pid a string": {"mnist": {**MODEL_ENTRY, "analysis": {"version": 1, "pid": "1"}}},
    "an analysis key unknown": {"mnist": {**MODEL_ENTRY, "analysis": {"version": 1, "path": "/x"}}},
    "a label too big for a proto": {"mnist": {**MODEL_ENTRY, "labels": {"stable": 10 ** 20}}},
    "a weight over 100": {"mnist": {**MODEL_ENTRY, "weights": {"stable": 1000}}},
    "a history of strings": {"mnist": {**MODEL_ENTRY, "history": ["1"]}},
    "models a list": [],
}


@pytest.mark.parametrize("models", GARBLED_MODELS.values(), ids=GARBLED_MODELS.keys())
def test_a_garbled_model_entry_is_unexpected_content(spec, tmp_path, models):
    (spec.serving_base / releases.STATE_FILE).write_text(json.dumps(_state_with(spec, models=models)))
    before = on_disk(spec.serving_base)
    refused(releases.read_state, spec.serving_base,
            match=rf"{releases.STATE_FILE}: unexpected content: .*restore it")
    refused(releases.known_models, spec.serving_base, match="unexpected content")  # what deploy render lists
    refused(status, spec, None, NO_SERVER, say=lambda line: None, match="unexpected content")
    assert on_disk(spec.serving_base) == before  # models.config still names the model's own directory
    assert sorted(path.name for path in tmp_path.iterdir()) == ["spec.yaml", "src", "variants", "workspace"]


def test_a_model_name_in_an_older_models_config_is_checked_too(spec):
    base = spec.serving_base
    (base / releases.STATE_FILE).unlink()
    (base / serving_config.MODELS_CONFIG).write_text(
        'model_config_list { config { name: "../../escape" base_path: "/x" model_platform: "tensorflow" } }')
    refused(releases.read_state, base,
            match=rf"{serving_config.MODELS_CONFIG}: model name '../../escape' is not")


@pytest.mark.parametrize("content", [
    b"\xff\xfe", b"[" * 100_000, b'{"format": 1, "models": {}, "unrecorded": ' + b"[" * 100_000, "directory"])
def test_a_state_file_that_cannot_be_read_is_one_line(spec, content):
    path = spec.serving_base / releases.STATE_FILE
    path.unlink()
    if content == "directory":
        path.mkdir()
    else:
        path.write_bytes(content)
    refused(releases.read_state, spec.serving_base,
            match=rf"{releases.STATE_FILE}: .*restore it from a backup")


# -- 5. the served files: garbage is rewritten from the state, a directory is refused ------------------------
@pytest.mark.parametrize("content", [b"\xff\xfe", b"[" * 100_000, b"1" * 5000])
def test_a_garbage_traffic_file_is_rewritten_from_the_state(spec, content):
    traffic = spec.serving_base / serving_config.TRAFFIC_FILE
    traffic.write_bytes(content)
    refused(serving_config.read_traffic, traffic, match=rf"^{traffic}: .*restore it from a backup")
    lines: list[str] = []
    status(spec, "mnist", NO_SERVER, say=lines.append)
    assert any("rewrote models.config and traffic.json" in line for line in lines)
    assert serving_config.read_traffic(traffic).for_model("mnist") == {"stable": 100}


@pytest.mark.parametrize("name", [serving_config.TRAFFIC_FILE, serving_config.MODELS_CONFIG])
def test_a_served_file_that_is_a_directory_is_refused_before_any_change(spec, name):
    release_variant_canary(spec, "mnist", "int8", say=lambda line: None)
    served = spec.serving_base / name
    served.unlink()
    served.mkdir()
    before = on_disk(spec.serving_base)
    for command in (lambda: status(spec, None, NO_SERVER, say=lambda line: None),
                    lambda: change_release(spec, "mnist", PROMOTE, say=lambda line: None),
                    lambda: change_release(spec, "mnist", ROLLBACK, say=lambda line: None)):
        refused(command, match=rf"^{served}: a directory, where Conveyor writes a file; move it away")
    assert on_disk(spec.serving_base) == before
    assert recorded(spec) == ["conveyor.Push", "conveyor.VariantCanary"]
    read = serving_config.read_traffic if name == serving_config.TRAFFIC_FILE else \
        serving_config.read_model_server_config
    refused(read, served, match=rf"^{served}: cannot read .*Is a directory")


# -- 6. a rollback that would change nothing -----------------------------------------------------------------
def test_a_rollback_to_the_stable_version_without_a_canary_changes_and_records_nothing(spec):
    before = on_disk(spec.serving_base)
    refused(change_release, spec, "mnist", ROLLBACK, to_version=1, say=lambda line: None,
            match=r"version 1 is stable already and there is no canary: nothing to roll back")
    assert on_disk(spec.serving_base) == before
    assert recorded(spec) == ["conveyor.Push"]


def test_a_rollback_to_the_stable_version_with_a_canary_removes_the_canary(spec):
    release_variant_canary(spec, "mnist", "int8", say=lambda line: None)
    release = change_release(spec, "mnist", ROLLBACK, to_version=1, say=lambda line: None)
    assert release.labels == {"stable": 1} and release.weights == {"stable": 100}
    assert recorded(spec) == ["conveyor.Push", "conveyor.VariantCanary", "conveyor.Rollback"]


def test_a_canary_started_with_an_analysis_claim_counts_as_analysed_and_refuses_another(spec):
    """The claim an analysed canary writes must name its version: without it, analysis_running() was never
    true, so neither a second analysis nor a pipeline push was held off while one ran."""
    import os
    import socket

    from conveyor_ml.operations.release_commands import CanarySource, start_canary

    claim = {"pid": os.getpid(), "host": socket.gethostname(), "started": releases.process_start(os.getpid())}
    start_canary(spec, "mnist", CanarySource(variant="int8"), 10, claim=claim, say=lambda line: None)
    release = releases.read_state(spec.serving_base).release("mnist")
    assert release.analysis["version"] == release.labels["canary"] == 2
    assert release.analysis_running()
    refused(start_canary, spec, "mnist", CanarySource(variant="float16"), 10, claim=claim, say=lambda line: None,
            match="a canary analysis of version 2 is in progress")


def test_a_command_waiting_for_the_release_lock_says_so_once(spec):
    import fcntl
    import threading
    import time

    lines: list[str] = []
    lock = spec.serving_base / releases.LOCK_FILE
    with open(lock, "a+") as held:  # another process's command or push, as flock sees it
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: status(spec, None, NO_SERVER, say=lines.append))
        waiter.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiter.is_alive(), "status finished while the lock was held"
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert lines == [f"conveyor: waiting for {lock}: another conveyor command or a pipeline push is changing "
                     "releases there"]
