"""Shared fixtures: environment, spec writing, running the CLI, and the session's trained pipeline."""
from __future__ import annotations

import os
import signal

# Before anything imports TensorFlow (Keras 3 cannot write the SavedModel TFX 1.16 needs).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = ROOT / "pipelines" / "mnist.yaml"

# A shell without job control starts a background command (`make test &`, nohup) with SIGINT ignored, and
# every process it starts inherits that: the tests that send Ctrl-C to a run, a release command or the
# scheduler would see it ignored. Handled here, children start with the default again (exec resets handlers).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_conveyor(*args: str, cwd: Path | None = None, env: dict | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs the real CLI in a child process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "conveyor_ml.cli", *map(str, args)],
        cwd=cwd or ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        capture_output=True, text=True, timeout=timeout)


def write_spec(directory: Path, *, base: Path = DEFAULT_SPEC, name: str = "spec.yaml", **changes) -> Path:
    """Copies a spec into `directory` with its workspace there and absolute paths; `changes` are
    dotted keys (e.g. {"components.trainer.train_steps": 50}); a value of None removes the key."""
    document = yaml.safe_load(base.read_text())
    document["workspace"] = str(directory / "workspace")
    document["metadata"] = {"sqlite": str(directory / "workspace" / "metadata.sqlite")}
    document["data"]["schema"] = str((ROOT / document["data"]["schema"]).resolve())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = document
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    path = directory / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    return tmp_path


# The test files that take longest, longest first: `make test` runs files on two xdist workers in collection
# order, so starting these first keeps one worker from finishing long before the other (the unit tests fill
# in at the end). Measured in a full run; a file not listed keeps its place after these.
LONGEST_FILES = ["test_continuous_training.py", "test_lineage.py", "test_pipeline_run.py", "test_gcp_pipeline.py",
                 "test_trainer.py", "test_scale_data.py", "test_tf_serving_parity.py", "test_release_crashes.py",
                 "test_progressive_delivery.py", "test_server_reliability.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
