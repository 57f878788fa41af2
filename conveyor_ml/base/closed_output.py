"""Output whose reader has gone: `conveyor runs | head` closes the pipe after ten lines, and a `conveyor
schedule` killed outright leaves the run it started writing into a pipe nobody reads. Python then raises
BrokenPipeError from whichever print came next: a traceback for `| head`, and a run that failed between two
steps for the scheduler's (its README says such a run goes on).

`survive_closed_output()` wraps stdout and stderr so that the first write to a closed pipe turns the
descriptor into /dev/null (for every later write, TensorFlow's and child processes' included) and the
command carries on, as a command run with `nohup` would.
"""
from __future__ import annotations

import os
import sys


class _ReaderlessStream:
    """A text stream that, once its reader has gone, writes to /dev/null instead of raising."""

    def __init__(self, stream):
        self._stream = stream

    def _retrying(self, action, *args):
        try:
            return action(*args)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
            return action(*args)  # what was buffered goes to /dev/null with the rest

    def write(self, text: str) -> int:
        return self._retrying(self._stream.write, text)

    def flush(self) -> None:
        self._retrying(self._stream.flush)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def survive_closed_output() -> None:
    """Wraps sys.stdout and sys.stderr (once): see the module's text."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _ReaderlessStream):
            try:
                stream.fileno()
            except (AttributeError, OSError, ValueError):  # not a file (a test's capture): left as it is
                continue
            setattr(sys, name, _ReaderlessStream(stream))
