"""Ctrl-C ends a command with one line: the Trainer's children ignore the terminal's SIGINT (their parent,
interrupted too, kills them) and an interrupt Beam re-raises as a RuntimeError is still an interrupt."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conveyor_ml import cli
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
        assert wrapped.__cause__ is None and cli._interrupted(wrapped)
    caused = RuntimeError("step failed")
    caused.__cause__ = KeyboardInterrupt()
    assert cli._interrupted(caused)
    assert not cli._interrupted(RuntimeError("the step failed"))
    looped = ValueError("a")
    looped.__context__ = TypeError("b")
    looped.__context__.__context__ = looped  # contexts can form a cycle
    assert not cli._interrupted(looped)
