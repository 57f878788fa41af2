"""A command whose output has no reader any more (`| head`, a killed `conveyor schedule`) carries on: its
writes go to /dev/null instead of ending it with a BrokenPipeError."""
from __future__ import annotations

import os
import subprocess
import sys

from conveyor_ml.base.closed_output import _ReaderlessStream
from tests.conftest import ROOT


def test_a_write_to_a_closed_pipe_turns_the_descriptor_into_dev_null():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone
    stream = _ReaderlessStream(os.fdopen(write_end, "w", buffering=1))
    try:
        for _ in range(3):
            assert stream.write("a line nobody reads\n") == len("a line nobody reads\n")
        stream.flush()
        assert os.fstat(stream.fileno()).st_rdev == os.stat(os.devnull).st_rdev
    finally:
        stream.close()


def test_a_command_whose_reader_left_ends_as_it_would_have():
    """`conveyor validate` printing into a pipe already closed: before, a BrokenPipeError traceback, exit 1."""
    child = subprocess.Popen([sys.executable, "-m", "conveyor_ml.cli", "validate", "pipelines/mnist.yaml"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    error = child.stderr.read().decode()
    assert child.wait(timeout=120) == 0, error
    assert "BrokenPipe" not in error and "Traceback" not in error, error
