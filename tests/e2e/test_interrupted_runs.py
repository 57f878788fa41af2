"""A `conveyor run` stopped during a step, then run again: what the stopped run left is settled by the next.

A kill (or Ctrl-C / SIGTERM, which unwind past TFX's clean-up of failed steps) during the Trainer leaves its
execution RUNNING in ML Metadata for good, its unpublished output and working directories under the pipeline
root, and temporary files in $TMPDIR that no owner's name marks: Beam's `beam-pipeline-temp…` of a killed run,
TensorFlow's AutoGraph modules of the trainer process (killed by its parent on SIGTERM too). The next run
cancels the step in ML Metadata (`conveyor runs`: stopped during Trainer), removes the directories, and the
stopped run's own temporary directory (`benchmarks/pipeline_kills.py` found these at every kill in a step).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from ml_metadata.proto import metadata_store_pb2

from conveyor_ml.base.spec import load_spec
from conveyor_ml.metadata import store as metadata
from conveyor_ml.metadata.index import latest_deployments
from conveyor_ml.metadata.values import props
from tests.conftest import ROOT, run_conveyor, write_spec

pytestmark = pytest.mark.slow

RUN_LINE = re.compile(r"running pipeline '\w+' on span \d+ \(run (\S+)\)")
Execution = metadata_store_pb2.Execution
# How the run is stopped once its trainer process trains, and the status it ends with.
STOPS = {"SIGKILL to the group": -signal.SIGKILL, "SIGTERM to the run": 128 + signal.SIGTERM}


def _trainer_execution(spec) -> metadata_store_pb2.Execution:
    store = metadata.open_store(load_spec(spec).metadata, read_only=True)
    context = store.get_context_by_type_and_name("node", "mnist.Trainer")
    return min(store.get_executions_by_context(context.id), key=lambda e: e.id)


@pytest.mark.parametrize("stop", list(STOPS))
def test_the_next_run_settles_a_run_stopped_during_training(tmp_path, stop):
    spec = write_spec(tmp_path, **{"components.trainer.train_steps": 150, "components.quantizer": None,
                                   "components.infra_validator": None})
    scratch = tmp_path / "tmp"  # the runs' $TMPDIR
    scratch.mkdir()
    run = subprocess.Popen([sys.executable, "-m", "conveyor_ml.cli", "run", str(spec)], cwd=ROOT,
                           env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1",
                                "TMPDIR": str(scratch)},
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    watchdog = threading.Timer(300, os.killpg, (run.pid, signal.SIGKILL))  # bounded, even if it hangs silent
    watchdog.start()
    lines = []
    try:
        for line in run.stdout:  # the phase, from the run's own progress: its trainer process is training
            lines.append(line.rstrip())
            if "[trainer] training:" in line:
                break
        assert run.poll() is None, "\n".join(lines[-30:])
        if stop == "SIGKILL to the group":
            os.killpg(run.pid, signal.SIGKILL)
        else:
            run.send_signal(signal.SIGTERM)
        lines += [line.rstrip() for line in run.stdout]
        assert run.wait(timeout=120) == STOPS[stop], "\n".join(lines[-30:])
    finally:
        watchdog.cancel()
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    [stopped_id] = [m.group(1) for line in lines if (m := RUN_LINE.search(line))]
    pipeline_root = tmp_path / "workspace" / "pipeline_root"
    trainer = _trainer_execution(spec)
    # What TFX leaves: the step RUNNING for good, its outputs and working directories.
    assert trainer.last_known_state == Execution.RUNNING
    outputs = [pipeline_root / "Trainer" / output / str(trainer.id) for output in ("model", "model_run")]
    assert all(path.is_dir() for path in outputs)
    assert list(pipeline_root.glob("Trainer/.system/stateful_working_dir/*"))
    if stop == "SIGKILL to the group":
        assert list(scratch.iterdir()), "the killed run left nothing in $TMPDIR"  # Beam's, at least

    again = run_conveyor("run", spec, env={"TMPDIR": str(scratch)})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not list(scratch.iterdir()), "the stopped run's temporary files are still there"
    assert not list(pipeline_root.glob("*/.system/stateful_working_dir/*"))
    assert not list(pipeline_root.glob("*/.system/executor_execution/*/.temp"))
    assert not any(path.exists() for path in outputs)
    assert _trainer_execution(spec).last_known_state == Execution.CANCELED
    assert f"conveyor: settled: run {stopped_id} was stopped during Trainer" in again.stdout

    listed = run_conveyor("runs", "--spec", spec, "--format", "json")
    assert listed.returncode == 0, listed.stderr
    statuses = {row["run_id"]: row["status"] for row in json.loads(listed.stdout)["runs"]}
    [rerun_id] = [m.group(1) for line in again.stdout.splitlines() if (m := RUN_LINE.search(line))]
    assert statuses == {stopped_id: "stopped during Trainer", rerun_id: "complete"}
    assert run_conveyor("lineage", "--spec", spec, "--format", "json").returncode == 0


def test_a_run_answered_from_the_cache_leaves_the_newest_release_state_as_it_was(tmp_path):
    """A run killed after it finished (or simply run again with no new data) is followed by one answered from
    the cache, whose ServingPusher outputs the push's Deployments again. The newest release state ML Metadata
    holds is still the push's, which the next promote, rollback or canary measurement consumes: read with one
    producer per artifact, the cached re-run's won and the state was lost (here: none at all)."""
    spec = write_spec(tmp_path, **{"components.trainer.train_steps": 150, "components.quantizer": None,
                                   "components.infra_validator": None})
    for expected in ("✓ ServingPusher  complete", "↺ ServingPusher  cached"):
        result = run_conveyor("run", spec)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert expected in result.stdout
    store = metadata.open_store(load_spec(spec).metadata, read_only=True)
    state = [(props(a)["version"], props(a)["label"], props(a)["traffic_percent"])
             for a in latest_deployments(store, "mnist", "local")]
    assert state == [("1", "stable", 100)]
