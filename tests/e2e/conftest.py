"""The session's pipeline run: trained once, shared by every end-to-end test that only reads from it."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
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


@pytest.fixture(scope="session")
def default_pipeline_run(tmp_path_factory) -> PipelineRun:
    """`conveyor run` of the default spec, in a fresh workspace, exactly as `make pipeline` does it."""
    directory = tmp_path_factory.mktemp("default-pipeline")
    spec = write_spec(directory)
    result = run_conveyor("run", spec)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return PipelineRun(spec, directory / "workspace", result.stdout, result.stderr)


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


@pytest.fixture(scope="session")
def canary_pipeline(tmp_path_factory) -> PipelineRun:
    """Two pipeline runs in canary mode, the second with changed training parameters:
    version 1 is stable, version 2 the canary at 10%. Both runs see span 1 alone, so version 2 is compared with
    version 1 on span 1's 91 eval examples: fewer than the default 100 a comparison needs, hence the lower floor."""
    directory = tmp_path_factory.mktemp("canary-pipeline")
    spec = write_spec(directory, **{"components.serving_pusher.release": "canary",
                                    "components.serving_pusher.canary_weight": 10,
                                    "components.trainer.train_steps": 500,
                                    "components.evaluator.min_eval_examples": 50})
    outputs = []
    for steps in (500, 550):
        text = spec.read_text().replace("train_steps: 500", f"train_steps: {steps}")
        spec.write_text(text)
        result = run_conveyor("run", spec)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        outputs.append(result.stdout)
    return PipelineRun(spec, directory / "workspace", "\n".join(outputs), "")


@pytest.fixture(scope="session")
def tf_serving_models(tmp_path_factory) -> dict[str, Path]:
    """TF Serving's test models, written by our generator in a child process (the Keras model built under
    MirroredStrategy needs two virtual CPUs configured before TensorFlow starts)."""
    root = tmp_path_factory.mktemp("tf-serving-models")
    result = subprocess.run([sys.executable, "-m", "tests.tf_serving_models", str(root)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    return {path.name: path for path in root.iterdir() if not path.name.startswith(".")}
