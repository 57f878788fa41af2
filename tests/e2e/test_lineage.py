"""`conveyor models | lineage | runs` after two pipeline runs and a promotion, checked against the raw
MLMD API; the DOT and HTML outputs (the page rendered in headless Chromium); a MySQL (MariaDB) store."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pydot
import pytest
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2 as pb
from scipy import stats

from tests.conftest import run_conveyor, write_spec
from tests.fakes.mariadb import PASSWORD_ENV, MariaDB, mysql_spec
from tests.system_packages import ensure_debian_packages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def promoted(canary_pipeline, tmp_path_factory):
    """A copy of the canary workspace (v1 stable 90 %, v2 canary 10 %), with `lineage --label canary`
    answered before, then v2 promoted."""
    directory = tmp_path_factory.mktemp("lineage")
    shutil.copytree(canary_pipeline.workspace, directory / "workspace")
    spec = write_spec(directory, **{"components.serving_pusher.release": "canary",
                                    "components.serving_pusher.canary_weight": 10})
    before = run_conveyor("lineage", "mnist", "--label", "canary", "--format", "json", "--spec", spec)
    assert before.returncode == 0, before.stderr
    promote = run_conveyor("promote", "mnist", "--spec", spec, "--reason", "canary looks good")
    assert promote.returncode == 0, promote.stderr
    return spec, directory / "workspace", json.loads(before.stdout)


def raw_store(workspace) -> metadata_store.MetadataStore:
    config = pb.ConnectionConfig()
    config.sqlite.filename_uri = str(workspace / "metadata.sqlite")
    config.sqlite.connection_mode = pb.SqliteMetadataSourceConfig.READONLY
    return metadata_store.MetadataStore(config)


def raw_model_of_version(store, version: str) -> int:
    """The Model that the ServingPusher execution which pushed `version` consumed, by raw MLMD calls."""
    [pushed] = [a for a in store.get_artifacts_by_type("PushedModel")
                if a.custom_properties["pushed"].int_value == 1
                and a.custom_properties["pushed_version"].string_value == version]
    [producer] = [e.execution_id for e in store.get_events_by_artifact_ids([pushed.id]) if e.type == pb.Event.OUTPUT]
    model_type = store.get_artifact_type("Model").id
    inputs = [e.artifact_id for e in store.get_events_by_execution_ids([producer]) if e.type == pb.Event.INPUT]
    [model] = [a.id for a in store.get_artifacts_by_id(inputs) if a.type_id == model_type]
    return model


def raw_run_of(store, artifact_id: int) -> str:
    outputs = [e.execution_id for e in store.get_events_by_artifact_ids([artifact_id]) if e.type == pb.Event.OUTPUT]
    executions = [e for e in store.get_executions_by_id(outputs) if e.last_known_state == pb.Execution.COMPLETE]
    run_type = store.get_context_type("pipeline_run").id
    [run] = [c.name for c in store.get_contexts_by_execution(executions[0].id) if c.type_id == run_type]
    return run


def test_models_lists_both_versions_as_the_store_records_them(promoted):
    spec, workspace, _ = promoted
    result = run_conveyor("models", "--spec", spec, "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = {row["version"]: row for row in json.loads(result.stdout)["versions"]}
    store = raw_store(workspace)
    assert set(rows) == {"1", "2"}
    for version, row in rows.items():
        model_id = raw_model_of_version(store, version)
        assert row["model_id"] == model_id
        assert row["run_id"] == raw_run_of(store, model_id)
        [model] = store.get_artifacts_by_id([model_id])
        assert row["uri"] == model.uri
        assert row["spans"] == [1]
        assert row["blessed"] is True and row["eval_accuracy"] > 0.9
        assert {q["variant"] for q in row["quantized"]} == {"float32", "float16", "dynamic_range", "int8"}
    assert rows["2"]["state"] == "live" and rows["2"]["deployed"] == [
        {"target": "local", "version": "2", "label": "stable", "traffic_percent": 100}]
    assert rows["1"]["state"] == "retired" and rows["1"]["deployed"] == []
    table = run_conveyor("models", "--spec", spec)
    assert "local stable 100%" in table.stdout and "retired" in table.stdout
    # -o with the table format writes the table as plain text (it was printed, and no file written)
    written = Path(workspace) / "models.txt"
    to_file = run_conveyor("models", "--spec", spec, "-o", written)
    assert to_file.returncode == 0 and to_file.stdout.strip() == f"conveyor: wrote {written}", to_file.stderr
    text = written.read_text()
    assert "local stable 100%" in text and "retired" in text and "\x1b[" not in text


def test_which_data_trained_the_canary_serving_10_percent(promoted):
    spec, workspace, canary = promoted
    store = raw_store(workspace)
    assert canary["model_id"] == raw_model_of_version(store, "2")
    assert canary["deployed"] == [{"target": "local", "version": "2", "label": "canary", "traffic_percent": 10}]
    [data] = canary["data"]
    assert data["span"] == 1
    trainer_inputs = [e for e in store.get_events_by_artifact_ids([data["examples_id"]]) if e.type == pb.Event.INPUT]
    assert trainer_inputs, "the Examples the lineage names were consumed by executions in MLMD"


def test_lineage_of_the_stable_version_holds_the_whole_chain(promoted):
    spec, workspace, _ = promoted
    result = run_conveyor("lineage", "mnist", "--label", "stable", "--format", "json", "--spec", spec)
    assert result.returncode == 0, result.stderr
    chain = json.loads(result.stdout)
    store = raw_store(workspace)
    model_id = raw_model_of_version(store, "2")
    assert chain["model_id"] == model_id and chain["version"] == "2"
    [model] = store.get_artifacts_by_id([model_id])
    assert chain["training"]["facts"]["steps"] == model.custom_properties["steps"].int_value == 550
    assert chain["evaluation"]["baseline_model_id"] == raw_model_of_version(store, "1")
    evaluation = chain["evaluation"]
    assert evaluation["thresholds"] == {"min_accuracy": 0.9, "max_accuracy_drop": 0.01, "alpha": 0.05,
                                        "test": "mcnemar", "min_eval_examples": 50}
    # Candidate and baseline were scored on the same examples: span 1's eval split, as its manifest counts it.
    manifest = json.loads((workspace / "data" / "span-1" / "span.json").read_text())
    assert evaluation["eval_examples"] == manifest["examples"]["eval"] and evaluation["eval_spans"] == "1"
    [recorded] = [a for a in store.get_artifacts_by_type("ModelEvaluation")
                  if a.custom_properties["p_value"].double_value == evaluation["p_value"]]
    candidate_only = recorded.custom_properties["candidate_only_correct"].int_value
    baseline_only = recorded.custom_properties["baseline_only_correct"].int_value
    expected = stats.binomtest(baseline_only, candidate_only + baseline_only, 0.5, alternative="greater").pvalue \
        if candidate_only + baseline_only else 1.0
    # ML Metadata's SQLite store keeps doubles to 6 decimal places (-1/91 reads back as -0.010989).
    assert evaluation["p_value"] == pytest.approx(expected, abs=1e-6)
    assert evaluation["accuracy_difference"] == pytest.approx((candidate_only - baseline_only) / evaluation["eval_examples"],
                                                              abs=1e-6)
    assert evaluation["reason"].startswith(("not worse:", "no evidence it is worse:", "worse, but within"))
    kinds = [release["kind"] for release in chain["releases"]]
    assert kinds == ["ServingPusher", "conveyor.Promote"]
    promotion = chain["releases"][-1]
    assert promotion["reason"] == "canary looks good"
    assert promotion["state"] == [{"target": "local", "version": "2", "label": "stable", "traffic_percent": 100,
                                   "release_state": "live"}]
    assert chain["traffic_percent_now"] == 100
    by_version = run_conveyor("lineage", "mnist", "--version", "1", "--format", "json", "--spec", spec)
    assert json.loads(by_version.stdout)["state"] == "retired"
    text = run_conveyor("lineage", "--spec", spec, "--label", "stable")
    assert "promote at" in text.stdout and "(canary looks good)" in text.stdout
    unknown = run_conveyor("lineage", "--spec", spec, "--version", "7")
    assert unknown.returncode == 2 and unknown.stderr.strip() == \
        "conveyor: error: model mnist: no pushed version 7 (pushed versions: 1, 2)"


def test_runs_report_status_cached_components_and_outputs(promoted):
    spec, workspace, _ = promoted
    result = run_conveyor("runs", "--spec", spec, "--format", "json")
    rows = json.loads(result.stdout)["runs"]
    store = raw_store(workspace)
    assert [r["run_id"] for r in rows] == sorted(c.name for c in store.get_contexts_by_type("pipeline_run"))
    assert all(r["status"] == "complete" for r in rows)
    first, second = rows
    assert "Trainer" in first["complete"] and "ImportExampleGen" in second["cached"]
    assert any(p.startswith("Model#") for p in second["produced"])


def test_dot_parses_and_html_renders_the_graph_in_chromium(promoted, tmp_path):
    spec, _, _ = promoted
    dot = run_conveyor("lineage", "--spec", spec, "--format", "dot")
    [graph] = pydot.graph_from_dot_data(dot.stdout)
    names = {node.get_name().strip('"') for node in graph.get_nodes()}
    assert {"trainer", "evaluator", "push:local:2", "now:local"} <= names

    page = tmp_path / "lineage.html"
    written = run_conveyor("lineage", "--spec", spec, "--format", "html", "-o", page)
    assert written.returncode == 0, written.stderr
    ensure_debian_packages({"chromium": "chromium"})
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,900"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    for node in ("trainer", "evaluator", "push:local:2", "now:local", "examples:"):
        assert f'data-id="{node}' in dom.stdout
    screenshot = tmp_path / "lineage.png"
    subprocess.run(["chromium", *flags, f"--screenshot={screenshot}", page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(screenshot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # drawn boxes and text, not a blank page


def test_queries_work_while_a_writer_holds_the_store(promoted):
    spec, workspace, _ = promoted
    writer = sqlite3.connect(workspace / "metadata.sqlite", timeout=1)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE Artifact SET last_update_time_since_epoch = last_update_time_since_epoch")
        result = run_conveyor("models", "--spec", spec, "--format", "json")
    finally:
        writer.rollback()
        writer.close()
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["versions"]) == 2


def test_unknown_artifact_types_are_carried_not_crashed_on(promoted, tmp_path):
    spec, workspace, _ = promoted
    copy = tmp_path / "workspace"
    shutil.copytree(workspace, copy)
    config = pb.ConnectionConfig()
    config.sqlite.filename_uri = str(copy / "metadata.sqlite")
    store = metadata_store.MetadataStore(config)
    foreign = store.put_artifact_type(pb.ArtifactType(name="someone.ElsesArtifact"))
    execution_type = store.put_execution_type(pb.ExecutionType(name="someone.ElsesStep"))
    [artifact] = store.put_artifacts([pb.Artifact(type_id=foreign, uri="/elsewhere")])
    [execution] = store.put_executions([pb.Execution(type_id=execution_type, last_known_state=pb.Execution.COMPLETE)])
    store.put_events([pb.Event(artifact_id=artifact, execution_id=execution, type=pb.Event.OUTPUT)])
    other = write_spec(tmp_path, name="copy.yaml")
    for command in (["models"], ["lineage", "--label", "stable"], ["runs"]):
        result = run_conveyor(*command, "--spec", other)
        assert result.returncode == 0, result.stderr


def test_empty_store_says_no_runs_yet(tmp_path):
    spec = write_spec(tmp_path)
    for command in ("models", "lineage", "runs"):
        result = run_conveyor(command, "--spec", spec)
        assert result.returncode == 0 and result.stdout.strip() == "conveyor: no runs yet — run `make pipeline`"
    assert not (tmp_path / "workspace" / "metadata.sqlite").exists()  # a query creates nothing


def test_mysql_store_runs_the_pipeline_and_answers_lineage(tmp_path):
    with MariaDB(tmp_path / "mariadb") as server:
        spec = mysql_spec(tmp_path, server.port)  # the tiny CSV pipeline, its metadata in this server
        env = {**os.environ, PASSWORD_ENV: server.password}
        run = run_conveyor("run", spec, env=env)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        runs = run_conveyor("runs", "--spec", spec, "--format", "json", env=env)
        [row] = json.loads(runs.stdout)["runs"]
        assert row["status"] == "complete" and "Trainer" in row["complete"]
        models = run_conveyor("models", "--spec", spec, "--format", "json", env=env)
        [version] = json.loads(models.stdout)["versions"]
        assert version["blessed"] is True and version["state"] == "blessed"  # no pusher in this spec
        lineage = run_conveyor("lineage", "--spec", spec, "--format", "json", env=env)
        assert json.loads(lineage.stdout)["training"]["facts"]["steps"] == 200

        wrong = run_conveyor("models", "--spec", spec, env={**os.environ, "CONVEYOR_MYSQL_PASSWORD": "nope"})
        assert wrong.returncode == 2
        lines = wrong.stderr.strip().splitlines()
        assert len(lines) == 1, wrong.stderr
        line = lines[0]
        assert line.startswith("conveyor: error: cannot connect to the MySQL metadata store at 127.0.0.1:")
        assert "as user 'conveyor'" in line
