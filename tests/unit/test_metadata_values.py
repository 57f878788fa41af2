"""Release records whose values have an unexpected type, as a store edited by hand or written by another
tool may hold them (traffic_percent "50" or "abc", a version recorded as a number): `conveyor lineage |
models | runs` read what says one value unambiguously, take the rest for unknown with one warning line naming
the record and its property, and carry on; never a traceback. The store is a real MLMD SQLite store, written
here with ml_metadata's own API."""
from __future__ import annotations

import itertools
import json

import pytest
from google.protobuf import struct_pb2
from ml_metadata.proto import metadata_store_pb2 as pb

from conveyor_ml.base.names import DEPLOYMENT_TYPE
from conveyor_ml.metadata.values import props
from tests.conftest import run_conveyor, write_spec
from tests.unit.test_span_progress import COMPLETE, Store


def odd_store(directory):
    """Run r1 pushed model A as version 1 (stable); run r2 pushed model B as version 2 (canary at 50%). In the
    Deployments r2 left, as another tool wrote them, version 1's traffic_percent is "abc", version 2's is "50"
    and its version the number 2; span 2 is the text "2"."""
    spec = write_spec(directory)
    (directory / "workspace").mkdir()
    store = Store(directory / "workspace" / "metadata.sqlite")
    ids = {}
    odd = [("1", "stable", "abc", "live"), (2, "canary", "50", "live")]
    for run, span, version, rows in (("r1", 1, "1", [("1", "stable", 100, "live")]), ("r2", "2", "2", odd)):
        examples = store.artifact("Examples", span=span)
        model = store.artifact("Model", spans=str(span))
        pushed = store.artifact("PushedModel", pushed=1, pushed_version=version,
                                pushed_destination=f"/x/{version}")
        deployments = [store.artifact(DEPLOYMENT_TYPE, model_name="mnist", target="local", version=v,
                                      label=label, traffic_percent=percent, release_state=state)
                       for v, label, percent, state in rows]
        store.run(run, ("ImportExampleGen", COMPLETE, {}, {"examples": [examples]}),
                  ("Trainer", COMPLETE, {"examples": [examples]}, {"model": [model]}),
                  ("ServingPusher", COMPLETE, {"model": [model]},
                   {"pushed_model": [pushed], "deployment": deployments}))
        ids[run] = (model, deployments)
    return spec, ids


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("conveyor: warning:")]


def test_lineage_reads_what_it_can_of_odd_release_values_and_warns_once_about_the_rest(tmp_path):
    spec, ids = odd_store(tmp_path)
    model_b, (unreadable, _) = ids["r2"]

    done = run_conveyor("lineage", "--spec", spec, "--version", "2", "--format", "json")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    chain = json.loads(done.stdout)
    assert chain["model_id"] == model_b and chain["spans"] == [2]  # span "2" read as 2
    assert chain["deployed"] == [{"target": "local", "version": "2", "label": "canary",
                                  "traffic_percent": 50}]
    assert chain["traffic_percent_now"] == 50
    assert warnings_in(done.stderr) == [
        f"conveyor: warning: ML Metadata artifact #{unreadable} ({DEPLOYMENT_TYPE}): property "
        "traffic_percent is 'abc', not a whole number; read as unknown"]

    done = run_conveyor("lineage", "--spec", spec, "--version", "1")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "  now: local stable ?%" in done.stdout.splitlines()  # unknown, neither 0% nor None%
    assert "v1 stable ?%" in done.stdout
    assert len(warnings_in(done.stderr)) == 1 and f"artifact #{unreadable} " in done.stderr

    for command in (("models",), ("models", "--format", "dot"), ("runs",)):
        done = run_conveyor(*command, "--spec", spec)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (command, done.stderr)
        assert command == ("runs",) or "stable ?%" in done.stdout, done.stdout
    versions = {row["version"]: row for row in json.loads(run_conveyor("models", "--spec", spec, "--format",
                                                                       "json").stdout)["versions"]}
    assert versions["2"]["deployed"][0]["traffic_percent"] == 50 and versions["2"]["state"] == "canary"
    assert "traffic_percent" not in versions["1"]["deployed"][0]


IDS = itertools.count(100)  # a warning is said once per record and property: one record each


def deployment(value) -> pb.Artifact:
    """A Deployment as MLMD returns it (with its type's name), one property set to `value`."""
    artifact = pb.Artifact(id=next(IDS), type=DEPLOYMENT_TYPE)
    if isinstance(value, bool):
        artifact.custom_properties["traffic_percent"].bool_value = value
    elif isinstance(value, int):
        artifact.custom_properties["traffic_percent"].int_value = value
    elif isinstance(value, float):
        artifact.custom_properties["traffic_percent"].double_value = value
    elif isinstance(value, str):
        artifact.custom_properties["traffic_percent"].string_value = value
    else:
        artifact.custom_properties["traffic_percent"].struct_value.CopyFrom(value)
    return artifact


@pytest.mark.parametrize(("stored", "read"), [
    (50, 50), ("50", 50), (" 50 ", 50), ("+50", 50), ("50.0", 50), (50.0, 50), (True, 1),
    ("abc", None), ("50.5", None), (50.5, None), ("nan", None), ("inf", None), ("1_0", None), ("", None),
    ("9" * 5000, None), (struct_pb2.Struct(fields={"a": struct_pb2.Value(number_value=1)}), None)])
def test_a_whole_number_is_read_where_one_value_is_meant_and_nothing_else(stored, read, capsys):
    assert props(deployment(stored))["traffic_percent"] == read
    warned = [line for line in capsys.readouterr().err.splitlines() if "traffic_percent" in line]
    assert len(warned) == (read is None)


def test_a_version_recorded_as_a_number_is_read_as_the_text_the_readers_compare():
    artifact = pb.Artifact(id=next(IDS), type=DEPLOYMENT_TYPE)
    artifact.custom_properties["version"].int_value = 2
    artifact.custom_properties["label"].string_value = "stable"
    artifact.custom_properties["notes"].int_value = 5  # a property no reader types: left as it is
    assert props(artifact) == {"version": "2", "label": "stable", "notes": 5}
    artifact.custom_properties["version"].double_value = 2.0
    assert props(artifact)["version"] == "2"
