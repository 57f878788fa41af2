"""Fixtures the unit tests share."""
from __future__ import annotations

import pytest
from tfx.types import standard_artifacts

from tests.artifacts import output
from tests.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny_model_artifact(tmp_path_factory):
    """A Model artifact holding a tiny SavedModel (Format-Serving), for the pushers' executors."""
    root = tmp_path_factory.mktemp("model")
    model = output(standard_artifacts.Model, root / "model")
    write_tiny_model(root / "model" / "Format-Serving")
    return model
