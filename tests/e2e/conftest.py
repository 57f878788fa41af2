"""The session's pipeline runs and models: built once, shared by every end-to-end test that only reads them.

`make test` runs the suite on several pytest-xdist workers; each expensive session fixture is built by the
first worker that needs it, under a file lock, and read by the others from the directory it was built in
(`shared_once`). A test that changes a shared workspace works on a copy of it.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

from tests.conftest import ROOT, run_conveyor, write_spec


@dataclass
class PipelineRun:
    spec: Path
    workspace: Path
    stdout: str
    stderr: str

    def store(self) -> metadata_store.MetadataStore:
        config = metadata_store_pb2.ConnectionConfig()
        config.sqlite.filename_uri = str(self.workspace / "metadata.sqlite")
        config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
        return metadata_store.MetadataStore(config)

    def copy_to(self, directory: Path) -> PipelineRun:
        """The same run in `directory` (workspace and a spec pointing at it), for a test that changes it;
        the served files (models.config names absolute version paths) are rewritten for the copy."""
        from conveyor_ml.formats import release_state as releases

        shutil.copytree(self.workspace, directory / "workspace")
        document = self.spec.read_text().replace(str(self.workspace.parent), str(directory))
        (directory / self.spec.name).write_text(document)
        serving = directory / "workspace" / "serving"
        if (serving / releases.STATE_FILE).is_file():
            releases.sync_served_files(releases.read_state(serving))
        return PipelineRun(directory / self.spec.name, directory / "workspace", self.stdout, self.stderr)


def shared_once(tmp_path_factory, name: str, build: Callable[[Path], dict]) -> dict:
    """`build(directory)`'s JSON result, built once per test session however many xdist workers ask: the
    first builds it in a directory all workers see, the others wait on the lock and read the result."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent  # the session's base directory, above each worker's
    directory, result = root / f"shared-{name}", root / f"shared-{name}.json"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.is_file():
            shutil.rmtree(directory, ignore_errors=True)  # a worker that failed building it left this
            directory.mkdir()
            result.write_text(json.dumps(build(directory)))
    return json.loads(result.read_text())


def _pipeline_run(document: dict) -> PipelineRun:
    return PipelineRun(Path(document["spec"]), Path(document["workspace"]), document["stdout"], document["stderr"])


def _run_default_pipeline(directory: Path) -> dict:
    spec = write_spec(directory)
    result = run_conveyor("run", spec)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {k: str(v) for k, v in asdict(PipelineRun(spec, directory / "workspace", result.stdout,
                                                     result.stderr)).items()}


@pytest.fixture(scope="session")
def default_pipeline_run(tmp_path_factory) -> PipelineRun:
    """`conveyor run` of the default spec, in a fresh workspace, exactly as `make pipeline` does it."""
    return _pipeline_run(shared_once(tmp_path_factory, "default-pipeline", _run_default_pipeline))


@pytest.fixture(scope="session")
def trained_export(default_pipeline_run) -> Path:
    """The SavedModel the default pipeline pushed as version 1 (do not modify: copy it)."""
    export = default_pipeline_run.workspace / "serving" / "mnist" / "1"
    assert (export / "saved_model.pb").is_file()
    return export


@pytest.fixture(scope="session")
def digits_eval():
    """The embedded digits' last 64 images: not in span 1, a fair sample for serving checks."""
    from conveyor_ml.data.datasets import embedded_digits

    digits = embedded_digits()
    return digits.take(list(range(len(digits) - 64, len(digits))))


def _run_canary_pipelines(directory: Path) -> dict:
    spec = write_spec(directory, **{"components.serving_pusher.release": "canary",
                                    "components.serving_pusher.canary_weight": 10,
                                    "components.trainer.train_steps": 500})
    outputs = []
    for steps in (500, 550):
        text = spec.read_text().replace("train_steps: 500", f"train_steps: {steps}")
        spec.write_text(text)
        result = run_conveyor("run", spec)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        outputs.append(result.stdout)
    return {"spec": str(spec), "workspace": str(directory / "workspace"), "stdout": "\n".join(outputs), "stderr": ""}


@pytest.fixture(scope="session")
def canary_pipeline(tmp_path_factory) -> PipelineRun:
    """Two pipeline runs in canary mode, the second with changed training parameters:
    version 1 is stable, version 2 the canary at 10%."""
    return _pipeline_run(shared_once(tmp_path_factory, "canary-pipeline", _run_canary_pipelines))


@pytest.fixture(scope="session")
def tf_serving_models(tmp_path_factory) -> dict[str, Path]:
    """TF Serving's test models, written by our generator in a child process (the Keras model built under
    MirroredStrategy needs two virtual CPUs configured before TensorFlow starts)."""
    def generate(root: Path) -> dict:
        result = subprocess.run([sys.executable, "-m", "tests.tf_serving_models", str(root)], cwd=ROOT,
                                capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert result.returncode == 0, result.stderr[-3000:]
        return {path.name: str(path) for path in root.iterdir() if not path.name.startswith(".")}

    return {name: Path(path) for name, path in shared_once(tmp_path_factory, "tf-serving-models", generate).items()}
