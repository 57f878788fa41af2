"""Continuous training with real processes: the loop under `conveyor schedule` (new spans become better
pushed versions, spans that land while it is down are not lost, a shifted span is blocked, SIGTERM and
SIGKILL), the run lock with a live and a dead holder; retries with backoff."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conveyor_ml.data import datasets
from conveyor_ml.formats import release_state as releases
from conveyor_ml.pipelines.run_lock import RunLock
from tests.conftest import ROOT, run_conveyor, write_spec

pytestmark = pytest.mark.slow


def small_spec(directory, **changes):
    return write_spec(directory, **{"components.trainer.train_steps": 150, "components.quantizer": None,
                                    "components.infra_validator": None, "components.serving_pusher.release": "canary",
                                    "data.window_spans": 2, "data.drift": {"policy": "block"}, **changes})


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "conveyor_ml.cli", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"})


def wait_until(condition, timeout: float, what: str):
    """Polls `condition` until it returns something true, which is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_line(process: subprocess.Popen, text: str, timeout: float, seen: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line.rstrip())
        if text in line:
            return
    raise AssertionError(f"no line with {text!r} in {timeout}s:\n" + "\n".join(seen[-20:]))


def add_span(spec, *shift: str) -> None:
    result = run_conveyor("data", "add-span", "--spec", spec, *shift)
    assert result.returncode == 0, result.stderr


def held_out_accuracy(workspace, version: str, held_out) -> float:
    """A pushed version's accuracy on digits no span holds, computed here with the SavedModel's own signature."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(workspace / "serving" / "mnist" / version)).signatures["serving_default"]
    predicted = serve(images=tf.constant(held_out.images))["class_ids"].numpy()
    return float(np.mean(predicted == held_out.labels))


# Kept lean for CI (the whole suite must stay under 20 minutes on 2 cores): two trainings of 300 steps (half the
# default; enough for more data to help), the import of a span that arrived with a newer one, and a run the drift
# gate stops before training. Each criterion of the loop is still checked: spans pending at start, spans that land
# while the scheduler is down consumed by one run, a span that lands while it runs, the drift gate, the evidence.
@pytest.mark.timeout(1800)
def test_continuous_training_loop_under_the_scheduler(tmp_path):
    """Spans become pushed, blessed versions under `conveyor schedule`, each at least as accurate on held-out
    digits as the one before; spans that land while it is down are consumed by one run when it restarts; a
    shifted span that lands while it runs is blocked by the drift gate and not retried; nothing is left pending."""
    spec = write_spec(tmp_path, **{"components.quantizer": None, "components.infra_validator": None,
                                   "components.example_validator": None, "components.trainer.train_steps": 300,
                                   "data.drift": {"policy": "block"}})
    workspace = tmp_path / "workspace"
    assert run_conveyor("data", "init", "--spec", spec).returncode == 0
    arguments = ("schedule", spec, "--on-new-data", "--poll", "1s", "--retries", "1", "--retry-backoff", "1s")
    lines: list[str] = []

    scheduler = start(*arguments)
    lock = RunLock(workspace)
    try:
        # Span 1 landed before the scheduler started: it is new until a successful run consumes it.
        wait_for_line(scheduler, "not yet consumed by a successful run: span 1", 60, lines)
        wait_for_line(scheduler, "trigger 1: new span 1", 30, lines)
        run = wait_until(lock.live_holder, 120, "the scheduler's run to take the run lock")
    finally:
        scheduler.kill()  # a crash, with its run under way: no SIGTERM, no goodbye
        scheduler.wait()
    # The run goes on without it (its output pipe has no reader now: before, its next line ended it with a
    # BrokenPipeError between two steps), and its span counts as consumed.
    wait_until(lambda: lock.live_holder() is None, 900, f"the orphaned run (pid {run['pid']}) to finish")
    [orphaned] = json.loads(run_conveyor("runs", "--spec", spec, "--format", "json").stdout)["runs"]
    assert orphaned["status"] == "complete" and "ServingPusher" in orphaned["complete"], orphaned
    assert releases.read_release(workspace / "serving", "mnist").labels == {"stable": 1}

    add_span(spec)  # spans 2 and 3 land while no scheduler runs
    add_span(spec)
    scheduler = start(*arguments)
    try:
        wait_for_line(scheduler, "not yet consumed by a successful run: spans 2, 3", 60, lines)
        wait_for_line(scheduler, "trigger 1: new spans 2, 3", 30, lines)
        wait_for_line(scheduler, "run succeeded", 900, lines)
        add_span(spec, "--brightness", "0.4", "--imbalance", "1:0.5")  # lands while the scheduler runs
        wait_for_line(scheduler, "trigger 2: new span 4", 30, lines)
        wait_for_line(scheduler, "span 4 was blocked by the drift gate (data.drift.policy block): not retried", 600,
                      lines)
        time.sleep(3)  # several polls with nothing pending: nothing may start
        scheduler.send_signal(signal.SIGTERM)
        wait_for_line(scheduler, "stopped after 2 runs", 30, lines)
        assert scheduler.wait(timeout=30) == 0
    finally:
        if scheduler.poll() is None:
            scheduler.kill()
    assert not any("trigger 3" in line or "retry" in line for line in lines)

    # A third start finds nothing pending: spans 1-3 consumed, span 4 settled by the drift gate.
    scheduler = start(*arguments)
    try:
        wait_for_line(scheduler, "latest span 4; every span consumed", 60, lines)
    finally:
        scheduler.send_signal(signal.SIGTERM)
        scheduler.wait(timeout=30)

    versions = json.loads(run_conveyor("models", "--spec", spec, "--format", "json").stdout)["versions"]
    assert [(row.get("version"), row["spans"], row["blessed"]) for row in versions] == [
        ("1", [1], True), ("2", [1, 2, 3], True)]
    assert [row["state"] for row in versions] == ["retired", "live"]
    assert releases.read_release(workspace / "serving", "mnist").labels == {"stable": 2}

    # Each evaluation scored the eval splits of its whole window, candidate and baseline on the same examples.
    manifests = {span: datasets.read_manifest(workspace / "data", span) for span in range(1, 5)}
    for row, baseline in zip(versions, [None, *versions]):
        evaluation = json.loads(run_conveyor("lineage", "--spec", spec, "--version", row["version"],
                                             "--format", "json").stdout)["evaluation"]
        assert evaluation["eval_examples"] == sum(manifests[s]["examples"]["eval"] for s in row["spans"])
        assert evaluation["eval_spans"] == ",".join(map(str, row["spans"]))
        # Our per-example scoring and TFMA measured the same accuracy on the same examples.
        assert evaluation["candidate_accuracy"] == pytest.approx(evaluation["accuracy"], abs=1e-6)
        if baseline is None:
            assert "p_value" not in evaluation and "no baseline to compare with" in evaluation["reason"]
            continue
        assert evaluation["baseline_model_id"] == baseline["model_id"]
        assert evaluation["comparison_test"] == "McNemar exact, one-sided"
        assert 0 <= evaluation["p_value"] <= 1
        assert evaluation["difference_interval_low"] <= evaluation["accuracy_difference"] \
            <= evaluation["difference_interval_high"]
        assert f"on the same {evaluation['eval_examples']} examples" in evaluation["reason"]

    # More data made a model no worse: on the digits no span holds, no version is less accurate than the last.
    used = [range(*manifest["embedded_range"]) for manifest in manifests.values()]
    digits = datasets.embedded_digits()
    held_out = digits.take([i for i in range(len(digits)) if not any(i in r for r in used)])
    assert len(held_out) == 547
    accuracies = [held_out_accuracy(workspace, row["version"], held_out) for row in versions]
    assert accuracies == sorted(accuracies), accuracies

    from conveyor_ml.metadata.index import MetadataIndex
    from tests.e2e.conftest import PipelineRun

    index = MetadataIndex(PipelineRun(spec, workspace, "", "").store())
    assert (index.consumed_through(), index.blocked_spans()) == (3, {4})
    assert index.model_with_label("mnist", "stable") == versions[-1]["model_id"]  # what warm start starts from

    runs = json.loads(run_conveyor("runs", "--spec", spec, "--format", "json").stdout)["runs"]
    imported = [r for r in runs if r["run_id"].endswith("-span-2")]
    assert len(imported) == 1 and imported[0]["status"] == "complete"  # span 2, imported by span 3's run
    blocked = [r for r in runs if r["status"] == "failed at Trainer"]
    assert len(blocked) == 1 and blocked[0]["drift"][0]["verdict"] == "blocked"
    log = (workspace / ".conveyor" / "schedule.log").read_text()
    # The first run's outcome went unlogged: its scheduler was killed while it ran.
    assert log.count("run succeeded") == 1 and "evaluated: blessed" in log and "pushed: version 2 ->" in log


HOLD_LOCK = """
import sys, time
from pathlib import Path
from conveyor_ml.pipelines.run_lock import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("holding", flush=True)
time.sleep(600)
"""


def test_run_lock_refuses_a_second_run_and_takes_over_a_dead_holders_lock(tmp_path):
    spec = small_spec(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "workspace")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        refused = run_conveyor("run", spec)
        assert refused.returncode == 2
        assert f"another run of this pipeline is in progress (pid {holder.pid}" in refused.stderr
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind with a dead PID in it
        holder.wait()
    from conveyor_ml.pipelines.run_lock import RunLock

    lock = RunLock(tmp_path / "workspace")
    note = lock.acquire()
    lock.release()
    assert note == f"took over the run lock of pid {holder.pid}, which died without releasing it"


def test_failed_runs_are_retried_with_doubling_backoff_then_given_up(tmp_path):
    spec = write_spec(tmp_path, **{"data.source": "csv", "data.path": str(tmp_path / "missing.csv")})
    scheduler = start("schedule", spec, "--every", "1s", "--max-runs", "1", "--retries", "2", "--retry-backoff", "1s")
    output, _ = scheduler.communicate(timeout=300)
    assert scheduler.returncode == 0
    assert output.count("run failed (exit 2)") == 3
    assert "retry 1/2 in 1s" in output and "retry 2/2 in 2s" in output
    assert "missing.csv" in output and "giving up on this trigger" in output
