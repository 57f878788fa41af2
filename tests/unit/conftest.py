"""Fixtures the unit tests share."""
from __future__ import annotations

import pytest
from tfx.types import standard_artifacts

from tests.artifacts import output
from tests.fakes.gcs_emulator import StorageEmulator
from tests.tiny_models import write_tiny_model

GCS_BUCKET = "conveyor-models"  # the bucket the Cloud Storage emulator holds for the GcpPusher's tests


@pytest.fixture(scope="module")
def tiny_model_artifact(tmp_path_factory):
    """A Model artifact holding a tiny SavedModel (Format-Serving), for the pushers' executors."""
    root = tmp_path_factory.mktemp("model")
    model = output(standard_artifacts.Model, root / "model")
    write_tiny_model(root / "model" / "Format-Serving")
    return model


@pytest.fixture(scope="module")
def emulator():
    """A Cloud Storage emulator on 127.0.0.1 holding GCS_BUCKET."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with StorageEmulator() as running:
        client = storage.Client(project="test-project", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": running.url})
        client.create_bucket(GCS_BUCKET)
        yield running
