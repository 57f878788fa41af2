"""Ctrl-C during `conveyor canary | promote | rollback`: the real command in a child process, interrupted (a
real SIGINT) once its change is committed to release_state.json and before ML Metadata holds its record (a
fresh process spends seconds importing TFX's artifact classes to write it). The command says "interrupted"
and exits 130, so its change must not stay live: the files are put back, nothing is recorded, nothing is left
to repair."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conveyor_ml.formats import release_state as releases
from conveyor_ml.operations.release_commands import release_variant_canary
from tests.conftest import ROOT
from tests.unit.test_release_hostile_state import on_disk, pushed_spec, recorded

pytestmark = pytest.mark.slow


def interrupted_once_committed(spec, *args: str, signum: int = signal.SIGINT) -> subprocess.CompletedProcess:
    """Runs `conveyor ARGS --spec SPEC`, sending it `signum` as soon as release_state.json holds its change."""
    state_file = spec.serving_base / releases.STATE_FILE
    argv = [sys.executable, "-m", "conveyor_ml.cli", *args, "--spec", str(spec.source_file)]
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = False
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        try:
            committed = bool(json.loads(state_file.read_text())["unrecorded"])
        except (OSError, ValueError, KeyError):
            committed = False
        if committed:
            child.send_signal(signum)
            sent = True
            break
        time.sleep(0.002)
    stdout, stderr = child.communicate(timeout=120)
    assert sent, f"the command ended before its change was seen committed: {stdout} {stderr}"
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


@pytest.mark.parametrize("command", [("canary", "mnist", "--variant", "int8"), ("promote", "mnist"),
                                     ("promote", "mnist", "--weight", "50"), ("rollback", "mnist")])
def test_ctrl_c_before_the_record_puts_the_change_back(tmp_path, command):
    spec = pushed_spec(tmp_path)
    if command[0] != "canary":
        release_variant_canary(spec, "mnist", "int8", say=lambda line: None)  # to promote or roll back
    before, records = on_disk(spec.serving_base), recorded(spec)
    result = interrupted_once_committed(spec, *command)
    assert result.returncode == 130 and result.stderr.strip().splitlines()[-1] == "conveyor: interrupted", \
        result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert on_disk(spec.serving_base) == before  # labels, weights, served files; no new version directory
    assert recorded(spec) == records
    assert releases.read_state(spec.serving_base).unrecorded == []  # nothing for the next command to record


def test_sigterm_before_the_record_puts_the_change_back(tmp_path):
    """SIGTERM (systemd, Kubernetes) killed the command at once: its change stayed live, unrecorded, until the
    next command repaired it. It is now undone as a Ctrl-C's is."""
    spec = pushed_spec(tmp_path)
    release_variant_canary(spec, "mnist", "int8", say=lambda line: None)
    before, records = on_disk(spec.serving_base), recorded(spec)
    result = interrupted_once_committed(spec, "promote", "mnist", signum=signal.SIGTERM)
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "conveyor: terminated (SIGTERM)", result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert on_disk(spec.serving_base) == before
    assert recorded(spec) == records
    assert releases.read_state(spec.serving_base).unrecorded == []
