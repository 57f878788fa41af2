"""The JSON contract of `--format json`: typed records, documented in the README from the records themselves."""
from __future__ import annotations

from conveyor_ml.operations import json_reference
from conveyor_ml.operations.records import ModelLineage, Placement, Push, VersionStatus
from tests.conftest import ROOT


def test_readme_json_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert json_reference.readme_with_table(readme) == readme, "run `make reference`"


def test_unknown_values_are_left_out_but_lists_stay():
    record = ModelLineage(model_id=7, model="mnist", deployed=[Placement(target="local", label="stable")],
                          pushes=[Push(target="local", execution_id=3, skipped="not blessed")])
    document = record.to_json()
    assert list(document)[:2] == ["model", "model_id"]
    assert document["deployed"] == [{"target": "local", "label": "stable"}]
    assert document["pushes"] == [{"target": "local", "execution_id": 3, "skipped": "not blessed"}]
    assert document["data"] == [] and "training" not in document and "version" not in document
    assert document["state"] == "trained" and document["traffic_percent_now"] == 0


def test_status_records_keep_unknown_values_as_null():
    assert VersionStatus(version=2, on_disk=True).to_json() == {
        "version": 2, "on_disk": True, "labels": [], "traffic_percent": 0, "server_state": None,
        "pushed_by_run": None}
