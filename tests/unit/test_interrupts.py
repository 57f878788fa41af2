"""Ctrl-C ends a command with one line: the Trainer's children ignore the terminal's SIGINT (their parent,
interrupted too, kills them) and an interrupt Beam re-raises as a RuntimeError is still an interrupt. SIGTERM
is an interrupt of its own kind, and a child that must not outlive its parent dies with it, even when the
parent is killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conveyor_ml import cli
from conveyor_ml.base.process_lifetime import Terminated, owned_scratch_prefix, remove_orphaned_scratch
from conveyor_ml.components.trainer import executor

SLEEPER = """import sys, time
print(repr(sys.argv[1:]), flush=True)
time.sleep(30)
"""


def _started(argv: list[str], tmp_path) -> subprocess.Popen:
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    child = subprocess.Popen(argv, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "['job.json']"  # its module code runs, with its arguments
    return child


def test_a_trainer_child_outlives_ctrl_c_which_stops_a_plain_python(tmp_path):
    plain = _started([sys.executable, "-m", "sleeper", "job.json"], tmp_path)
    trainer = _started([sys.executable, "-c", executor._RUN_IGNORING_CTRL_C, "sleeper", "job.json"], tmp_path)
    try:
        for child in (plain, trainer):
            child.send_signal(signal.SIGINT)
        assert plain.wait(timeout=10) != 0
        assert "KeyboardInterrupt" in plain.stderr.read()
        time.sleep(0.5)
        assert trainer.poll() is None, trainer.stderr.read()
    finally:
        for child in (plain, trainer):
            child.kill()
            child.wait()


def test_an_interrupt_beam_wrapped_in_a_runtime_error_is_an_interrupt():
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:  # Beam's _reraise_augmented: a new exception, the interrupt its context
            raise RuntimeError(f"{exc!r} [while running 'Run[Trainer]']") from None
    except RuntimeError as wrapped:
        assert wrapped.__cause__ is None and isinstance(cli._interruption(wrapped), KeyboardInterrupt)
    caused = RuntimeError("step failed")
    caused.__cause__ = Terminated()
    assert isinstance(cli._interruption(caused), Terminated)  # a SIGTERM stays one, however wrapped
    assert cli._interruption(RuntimeError("the step failed")) is None
    looped = ValueError("a")
    looped.__context__ = TypeError("b")
    looped.__context__.__context__ = looped  # contexts can form a cycle
    assert cli._interruption(looped) is None


def test_a_stop_by_signal_is_one_line_with_the_shells_status(capsys):
    assert cli._stopped(KeyboardInterrupt()) == 130
    assert cli._stopped(Terminated()) == 143
    assert capsys.readouterr().err.splitlines() == ["conveyor: interrupted", "conveyor: terminated (SIGTERM)"]


# Starts its arguments as a child, with child_environment() when the first is "--as-child", prints the
# child's pid, and waits to be killed.
PARENT = """import os, subprocess, sys, time
from conveyor_ml.base.process_lifetime import child_environment
extra = child_environment() if sys.argv[1] == "--as-child" else {}
child = subprocess.Popen(sys.argv[2:], env={**os.environ, **extra})
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    """Running, not a zombie nobody reaped (a container's init may not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("as_child", [True, False], ids=["with-child-environment", "plain"])
def test_a_trainer_child_dies_when_its_parent_is_killed(tmp_path, as_child):
    """A SIGKILLed `conveyor run` runs no clean-up: its trainers trained on as orphans. The kernel now kills
    them (die_with_parent); a child started without child_environment() shows what it was before."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, "--as-child" if as_child else "--plain",
                               sys.executable, "-c", executor._RUN_IGNORING_CTRL_C, "sleeper", "job.json"],
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        lines = {parent.stdout.readline().strip() for _ in range(2)}  # the child's pid; the child running
        assert "['job.json']" in lines
        child = int(next(line for line in lines if line.isdigit()))
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(child) is not as_child
    finally:
        parent.kill()
        parent.wait()
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_scratch_of_a_process_that_no_longer_runs_is_removed_and_nothing_else(tmp_path):
    """A process killed outright cannot remove its temporary files; the next one that makes them does."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # its pid is free now
    (tmp_path / f"conveyor-train-{ended.pid}-abc").mkdir()
    (tmp_path / f"conveyor-train-{ended.pid}-abc" / "job-0.json").write_text("{}")
    (tmp_path / f"conveyor-train-{ended.pid}-def.log").write_text("log")
    kept = [tmp_path / f"conveyor-train-{os.getpid()}-ghi",  # its process runs: this one
            tmp_path / "conveyor-train-xyz12345",  # no pid in its name (tempfile's random part only)
            tmp_path / f"conveyor-trainer-{ended.pid}-jkl",  # another prefix
            tmp_path / f"conveyor-train-{ended.pid}"]  # no separator after the number: not one of ours
    for path in kept:
        path.mkdir()
    removed = remove_orphaned_scratch("conveyor-train-", tmp_path)
    assert sorted(path.name for path in removed) == [f"conveyor-train-{ended.pid}-abc",
                                                     f"conveyor-train-{ended.pid}-def.log"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in kept)


def test_scratch_names_carry_the_owners_pid():
    assert owned_scratch_prefix("conveyor-train-") == f"conveyor-train-{os.getpid()}-"


def test_a_process_runs_unless_it_ended_is_a_zombie_or_cannot_be_a_pid():
    """The one check release state, the run lock and the scratch sweep share."""
    from conveyor_ml.base.process_lifetime import process_running

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while _alive(zombie.pid) and time.monotonic() < deadline:  # ended, not yet waited for
        time.sleep(0.05)
    try:
        assert process_running(os.getpid())
        assert not process_running(zombie.pid)
        assert not process_running(10 ** 30)  # a number in a file name or a hand-edited note: no OverflowError
    finally:
        zombie.wait()
    assert not process_running(zombie.pid)
