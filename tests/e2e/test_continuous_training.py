"""Continuous training with real processes: the scheduler reacting to new spans (a canary push, a drift
block, no run without new data), SIGTERM; the run lock with a live and a dead holder; retries with backoff."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conveyor_ml.formats import release_state as releases
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


def test_scheduler_runs_on_new_spans_blocks_drift_and_idles_without_data(tmp_path):
    spec = small_spec(tmp_path)
    first = run_conveyor("run", spec)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    scheduler = start("schedule", spec, "--on-new-data", "--max-runs", "3", "--poll", "1s",
                      "--retries", "1", "--retry-backoff", "1s")
    lines: list[str] = []
    try:
        wait_for_line(scheduler, "watching", 60, lines)
        assert run_conveyor("data", "add-span", "--spec", spec).returncode == 0
        wait_for_line(scheduler, "trigger 1: new span 2", 30, lines)
        wait_for_line(scheduler, "run succeeded", 300, lines)
        base = tmp_path / "workspace" / "serving"
        state = releases.read_release(base, "mnist")
        assert state.labels == {"stable": 1, "canary": 2} and state.weights == {"stable": 90, "canary": 10}

        shifted = run_conveyor("data", "add-span", "--spec", spec, "--brightness", "0.4", "--imbalance", "1:0.5")
        assert shifted.returncode == 0, shifted.stderr
        wait_for_line(scheduler, "trigger 2: new span 3", 30, lines)
        wait_for_line(scheduler, "retry 1/1 in 1s", 300, lines)
        wait_for_line(scheduler, "giving up on this trigger", 300, lines)
        assert any("data.drift.policy is block" in line for line in lines)
        assert releases.read_release(base, "mnist").labels == {"stable": 1, "canary": 2}  # nothing trained or pushed

        time.sleep(4)  # several polls with no new span: nothing may start
        scheduler.send_signal(signal.SIGTERM)
        wait_for_line(scheduler, "stopped after 2 runs", 30, lines)
        assert scheduler.wait(timeout=30) == 0
    finally:
        if scheduler.poll() is None:
            scheduler.kill()
    assert not any("trigger 3" in line for line in lines)
    runs = json.loads(run_conveyor("runs", "--spec", spec, "--format", "json").stdout)["runs"]
    blocked = [r for r in runs if r["status"] == "failed at Trainer"]
    assert len(blocked) == 2  # the first attempt and its retry
    assert blocked[0]["drift"][0]["verdict"] == "blocked" and "label_linf" in blocked[0]["drift"][0]["reason"]
    log = (tmp_path / "workspace" / ".conveyor" / "schedule.log").read_text()
    assert "trigger 1: new span 2" in log and "giving up" in log


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
