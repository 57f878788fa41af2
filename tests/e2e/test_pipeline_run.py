"""`conveyor run` end to end: real TFX components on Beam, everything recorded and linked in MLMD."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from ml_metadata.proto import metadata_store_pb2

from conveyor_ml.base.spec import load_spec
from conveyor_ml.data.datasets import embedded_digits, write_span
from conveyor_ml.metadata import store as metadata
from tests.conftest import ROOT, run_conveyor, write_spec

pytestmark = pytest.mark.slow


def node_events(store, pipeline: str, node: str) -> dict[str, dict[str, list]]:
    """The latest execution of a node: {'inputs'|'outputs': {type name: [artifact, ...]}}."""
    context = store.get_context_by_type_and_name("node", f"{pipeline}.{node}")
    assert context is not None, f"no executions of {node}"
    execution = max(store.get_executions_by_context(context.id), key=lambda e: e.id)
    events = store.get_events_by_execution_ids([execution.id])
    artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
    types = {t.id: t.name for t in store.get_artifact_types()}
    found: dict[str, dict[str, list]] = {"inputs": {}, "outputs": {}}
    for event in events:
        side = "inputs" if event.type == metadata_store_pb2.Event.INPUT else "outputs"
        artifact = artifacts[event.artifact_id]
        found[side].setdefault(types[artifact.type_id], []).append(artifact)
    return found


def test_run_prints_progress_and_a_summary(default_pipeline_run):
    out = default_pipeline_run.stdout
    for node in ("ImportExampleGen", "StatisticsGen", "ExampleValidator", "Trainer", "Evaluator",
                 "InfraValidator", "ServingPusher"):
        assert f"✓ {node}  complete in" in out
    eval_examples = json.loads((default_pipeline_run.workspace / "data" / "span-1" / "span.json").read_text())[
        "examples"]["eval"]
    assert "evaluated: blessed — accuracy 0." in out and f"on {eval_examples} eval examples" in out
    assert "reaches min_accuracy 0.9; no baseline to compare with" in out
    assert "pushed:    version 1 ->" in out
    assert "tensorboard --logdir" in out


def test_the_run_is_marked_finished_on_its_context_under_the_pipelines(default_pipeline_run):
    """The runner makes the run's context before the first step (TFX's nodes then use it) and marks it
    finished once the DAG ran: `conveyor schedule` counts only such a run's spans as consumed."""
    store = default_pipeline_run.store()
    [run] = store.get_contexts_by_type("pipeline_run")
    assert run.custom_properties["conveyor_run_finished"].int_value == 1
    pipeline = store.get_context_by_type_and_name("pipeline", "mnist")
    assert [parent.id for parent in store.get_parent_contexts_by_context(run.id)] == [pipeline.id]
    executions = store.get_executions_by_context(run.id)
    assert {e.id for e in executions} == {e.id for e in store.get_executions()}  # every step ran in that run
    assert len(executions) == 13


def test_mlmd_links_data_to_the_pushed_model(default_pipeline_run):
    store = default_pipeline_run.store()
    example_gen = node_events(store, "mnist", "ImportExampleGen")
    [examples] = example_gen["outputs"]["Examples"]
    statistics = node_events(store, "mnist", "StatisticsGen")
    assert [a.id for a in statistics["inputs"]["Examples"]] == [examples.id]
    [stats] = statistics["outputs"]["ExampleStatistics"]
    [schema] = node_events(store, "mnist", "ImportSchemaGen")["outputs"]["Schema"]
    validator = node_events(store, "mnist", "ExampleValidator")
    assert {a.id for a in validator["inputs"]["ExampleStatistics"]} == {stats.id}
    [anomalies] = validator["outputs"]["ExampleAnomalies"]

    trainer = node_events(store, "mnist", "Trainer")
    assert [a.id for a in trainer["inputs"]["Examples"]] == [examples.id]
    assert [a.id for a in trainer["inputs"]["Schema"]] == [schema.id]
    assert [a.id for a in trainer["inputs"]["ExampleAnomalies"]] == [anomalies.id]
    [model] = trainer["outputs"]["Model"]
    assert "ModelRun" in trainer["outputs"]

    evaluator = node_events(store, "mnist", "Evaluator")
    assert [a.id for a in evaluator["inputs"]["Model"]] == [model.id]
    assert "ModelEvaluation" in evaluator["outputs"]
    [blessing] = evaluator["outputs"]["ModelBlessing"]
    assert blessing.custom_properties["blessed"].int_value == 1

    infra = node_events(store, "mnist", "InfraValidator")
    assert [a.id for a in infra["inputs"]["Model"]] == [model.id]
    [infra_blessing] = infra["outputs"]["InfraBlessing"]
    assert infra_blessing.custom_properties["blessed"].int_value == 1

    pusher = node_events(store, "mnist", "ServingPusher")
    assert [a.id for a in pusher["inputs"]["Model"]] == [model.id]
    assert [a.id for a in pusher["inputs"]["ModelBlessing"]] == [blessing.id]
    assert [a.id for a in pusher["inputs"]["InfraBlessing"]] == [infra_blessing.id]
    [pushed] = pusher["outputs"]["PushedModel"]
    assert pushed.custom_properties["pushed"].int_value == 1
    assert pushed.custom_properties["pushed_version"].string_value == "1"
    version_dir = Path(pushed.custom_properties["pushed_destination"].string_value)
    assert version_dir == default_pipeline_run.workspace / "serving" / "mnist" / "1"
    assert (version_dir / "saved_model.pb").is_file()
    [deployment] = pusher["outputs"]["conveyor.Deployment"]
    assert deployment.custom_properties["label"].string_value == "stable"
    assert deployment.custom_properties["traffic_percent"].int_value == 100


def test_trainer_facts_are_recorded_on_the_model(default_pipeline_run):
    store = default_pipeline_run.store()
    [model] = node_events(store, "mnist", "Trainer")["outputs"]["Model"]
    facts = {key: getattr(value, value.WhichOneof("value")) for key, value in model.custom_properties.items()}
    assert facts["strategy"] == "mirrored" and facts["replicas"] == 1
    assert facts["device_kinds"] == "CPU"
    assert facts["steps"] == 600 and facts["global_batch_size"] == 32
    assert facts["examples_per_second"] > 100
    assert 0 < facts["wall_time_s"] < 600
    # Span 1 holds about 400 training digits (the rest arrive as later spans): about 0.95-0.97 on its ~100 eval digits.
    assert facts["eval_accuracy"] >= 0.93, "the default pipeline must reach 0.93 on span 1's digits"
    assert facts["train_loss"] < 1.0


def test_anomalous_span_stops_the_run_before_training(tmp_path):
    # 8-bit pixels cannot leave 0..255, so a schema that allows only 0..200 makes the digits anomalous.
    strict = tmp_path / "schema.pbtxt"
    strict.write_text((ROOT / "schemas" / "mnist" / "schema.pbtxt").read_text().replace("max: 255.0", "max: 200.0"))
    spec = write_spec(tmp_path, **{"data.schema": str(strict), "components.evaluator": None,
                                   "components.serving_pusher": None, "components.quantizer": None,
                                   "components.infra_validator": None})
    write_span(tmp_path / "workspace" / "data", 1, embedded_digits().take(list(range(200))), 0.2, {"source": "test"})

    result = run_conveyor("run", spec)
    assert result.returncode == 2
    assert "failed at Trainer: data anomalies in span 1" in result.stderr
    assert "image: Unexpectedly high value: 255>200" in result.stderr
    assert "Traceback" not in result.stderr
    assert "training:" not in result.stdout  # no training process was started
    assert not list((tmp_path / "workspace" / "pipeline_root").glob("Trainer/model/*/Format-Serving"))


@pytest.mark.parametrize("case", ["missing spec", "yaml syntax", "unknown source", "missing data file",
                                  "unwritable workspace"])
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, case):
    spec = write_spec(tmp_path)
    document = yaml.safe_load(spec.read_text())
    if case == "missing spec":
        spec = tmp_path / "missing.yaml"
    elif case == "yaml syntax":
        spec.write_text(spec.read_text().replace("components:", "components: [", 1))
    elif case == "unknown source":
        document["data"]["source"] = "bigquery"
    elif case == "missing data file":
        document["data"].update(source="csv", path=str(tmp_path / "nope.csv"))
    elif case == "unwritable workspace":
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        document["workspace"] = str(blocker / "workspace")
    if case in ("unknown source", "missing data file", "unwritable workspace"):
        spec.write_text(yaml.safe_dump(document))

    result = run_conveyor("run", spec)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("conveyor: error:")]
    assert len(error_lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "workspace" / "metadata.sqlite").exists()
    assert not (tmp_path / "workspace" / "serving").exists()
    assert not (tmp_path / "workspace" / "pipeline_root").exists()


def test_csv_spec_runs_end_to_end_and_a_second_run_is_cached(tmp_path):
    """Another spec than mnist.yaml (CSV data, 6x6 images, one_device) runs end to end; run again with no new
    data, every component is answered from the cache and nothing new is pushed."""
    spec = write_spec(tmp_path, base=ROOT / "tests" / "specs" / "csv_6x6.yaml",
                      **{"data.path": str(ROOT / "tests" / "fixtures" / "digits_6x6.csv"),
                         "components.serving_pusher": {"model_name": "digits"}})
    result = run_conveyor("run", spec)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    manifest = json.loads((tmp_path / "workspace" / "data" / "span-1" / "span.json").read_text())
    assert manifest["image_shape"] == [6, 6]
    assert "strategy one_device" in result.stdout
    serving = tmp_path / "workspace" / "serving" / "digits"
    assert sorted(os.listdir(serving)) == ["1"]

    again = run_conveyor("run", spec)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "✓ Trainer" not in again.stdout and "↺ Trainer  cached" in again.stdout
    assert "↺ Evaluator  cached" in again.stdout
    assert "↺ ServingPusher  cached" in again.stdout
    assert sorted(os.listdir(serving)) == ["1"]


def _group_members(group: int) -> list[int]:
    """The live processes of a process group (zombies nobody reaped left out: a container's init may not)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(pgrp) == group and state not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


# How a run is stopped during training: the status it ends with and its last line (None: it prints nothing).
STOPS = {
    # The terminal's Ctrl-C reaches the whole process group: `conveyor run`, Beam and the trainer children.
    # Before, each trainer printed a KeyboardInterrupt traceback and Beam's RuntimeError ended the run with
    # another (~200 lines, exit 1).
    "ctrl-c to the group": (130, "conveyor: interrupted"),
    # systemd, Kubernetes or `conveyor schedule` stopping the run: before, it died at once and its trainer
    # trained on as an orphan, its scratch directory left behind.
    "SIGTERM to the run": (143, "conveyor: terminated (SIGTERM)"),
    # No clean-up can run; the kernel kills the trainers (die_with_parent), which trained on as orphans.
    "SIGKILL to the run": (-9, None),
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_a_run_stopped_during_training_leaves_no_trainer(tmp_path, stop):
    import signal
    import subprocess
    import sys
    import time

    spec = write_spec(tmp_path)
    scratch = tmp_path / "tmp"  # the trainers' job files are made here
    scratch.mkdir()
    run = subprocess.Popen([sys.executable, "-m", "conveyor_ml.cli", "run", str(spec)], cwd=tmp_path,
                           env={**os.environ, "PYTHONWARNINGS": "ignore", "TMPDIR": str(scratch)},
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    status, last_line = STOPS[stop]
    lines = []
    try:
        for line in run.stdout:
            lines.append(line.rstrip())
            if "[trainer]" in line:  # a training child is running
                break
        if stop == "ctrl-c to the group":
            os.killpg(run.pid, signal.SIGINT)
        else:
            run.send_signal(signal.SIGTERM if stop == "SIGTERM to the run" else signal.SIGKILL)
        lines += [line.rstrip() for line in run.stdout]
        assert run.wait(timeout=120) == status, "\n".join(lines[-30:])
        deadline = time.monotonic() + 10
        while _group_members(run.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _group_members(run.pid), "a process of the run's group is still running"
    finally:
        if _group_members(run.pid):
            os.killpg(run.pid, signal.SIGKILL)
    store = metadata.open_store(load_spec(spec).metadata, read_only=True)
    [run_context] = store.get_contexts_by_type("pipeline_run")
    assert run_context.custom_properties["conveyor_run_finished"].int_value == 0  # not a consumed span
    if last_line:
        assert lines[-1] == last_line, "\n".join(lines[-30:])
        assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines), "\n".join(lines)
        assert not list(scratch.glob("conveyor-train-*")), "the trainers' scratch directory was left behind"
