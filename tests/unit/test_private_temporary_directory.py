"""A command's temporary directory of its own (process_lifetime.private_temporary_directory): what a library
names there without an owner (Apache Beam's `beam-pipeline-temp…`, removed only when a pipeline returns) goes
with it, and the next such command removes the directory of one that was killed, never of one that runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

PREFIX = "conveyor-test-run-"
HOLDER = f"""
import time
from conveyor_ml.base.process_lifetime import private_temporary_directory
with private_temporary_directory({PREFIX!r}) as directory:
    import apache_beam as beam
    pipeline = beam.Pipeline()  # Beam makes its temporary directory here
    print(directory, pipeline.local_tempdir, flush=True)
    time.sleep(120)
"""
NEXT = f"""
import os, tempfile
from conveyor_ml.base.process_lifetime import private_temporary_directory
before = tempfile.gettempdir()
with private_temporary_directory({PREFIX!r}) as directory:
    print(directory, os.environ["TMPDIR"], tempfile.gettempdir())
print(tempfile.gettempdir() == before, os.environ["TMPDIR"] == before, directory.exists())
"""


def _holder(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    child = subprocess.Popen([sys.executable, "-c", HOLDER], env={**os.environ, "TMPDIR": str(tmp_path)},
                             stdout=subprocess.PIPE, text=True)
    directory, beam_directory = map(Path, child.stdout.readline().split())
    return child, directory, beam_directory


def test_a_killed_command_temporary_directory_is_removed_by_the_next(tmp_path):
    killed, killed_directory, beam_directory = _holder(tmp_path)
    running, running_directory, _ = _holder(tmp_path)
    try:
        assert killed_directory.parent == tmp_path
        assert killed_directory.name.startswith(f"{PREFIX}{killed.pid}-")
        assert beam_directory.parent == killed_directory  # Beam's directory is under the command's own
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert beam_directory.is_dir()  # a kill removes nothing

        result = subprocess.run([sys.executable, "-c", NEXT], env={**os.environ, "TMPDIR": str(tmp_path)},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        inside, after = result.stdout.splitlines()
        directory, environment, tempdir = inside.split()
        assert Path(directory).parent == tmp_path and environment == tempdir == directory  # children's too
        assert after == "True True False"  # put back, and removed after the block
        assert not killed_directory.exists()  # the killed command's, with what Beam left in it
        assert running_directory.is_dir()  # a running command's is its own
    finally:
        for child in (killed, running):
            child.kill()
            child.wait()
