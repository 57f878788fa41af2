"""The InfraValidator executor, called directly: a real server, real requests, bless or not."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tfx.types import standard_artifacts

from conveyor_ml.components.infra_validator import executor
from conveyor_ml.data.datasets import init_data
from tests import tf_serving_models as models
from tests.artifacts import examples_from_span, output

pytestmark = pytest.mark.slow


def validate(tmp_path: Path, export: Path) -> standard_artifacts.InfraBlessing:
    init_data("sklearn-digits", None, (8, 8), tmp_path / "data", 0.2)
    model = output(standard_artifacts.Model, tmp_path / "model")
    shutil.copytree(export, Path(model.uri) / "Format-Serving")
    inputs = {"model": [model], "examples": [examples_from_span(tmp_path / "data", 1, tmp_path / "examples")]}
    blessing = output(standard_artifacts.InfraBlessing, tmp_path / "blessing")
    executor.Executor().Do(inputs, {"blessing": [blessing]},
                           {"image_shape": "[8, 8]", "num_examples": 5, "timeout_seconds": 60.0})
    return blessing


def test_a_good_model_is_blessed(tmp_path, trained_export):
    blessing = validate(tmp_path, trained_export)
    assert blessing.get_int_custom_property("blessed") == 1
    assert (Path(blessing.uri) / executor.BLESSED_FILE).exists()
    assert blessing.get_int_custom_property("requests") == 3
    assert blessing.get_string_custom_property("mode") == executor.PREDICT


@pytest.mark.parametrize("name", [models.HALF_PLUS_TWO, models.KERAS_SEQUENTIAL])
def test_a_model_tf_serving_would_serve_is_blessed(tmp_path, tf_serving_models, name):
    """TF Serving's own test models: a TF1 graph whose input is looser than its signature, a Keras model.
    Not image classifiers, so validated as TFX does without requests: loaded, metadata over REST and gRPC."""
    blessing = validate(tmp_path, tf_serving_models[name] / models.VERSION)
    assert blessing.get_int_custom_property("blessed") == 1, blessing.get_string_custom_property("reason")
    assert blessing.get_string_custom_property("mode") == executor.LOAD_ONLY
    assert blessing.get_int_custom_property("requests") == 0


def test_a_model_the_server_cannot_load_is_not_blessed(tmp_path, trained_export):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained_export, corrupt)
    shutil.rmtree(corrupt / "variables")
    blessing = validate(tmp_path, corrupt)
    assert blessing.get_int_custom_property("blessed") == 0
    assert (Path(blessing.uri) / executor.NOT_BLESSED_FILE).exists()
    assert "failed to load" in blessing.get_string_custom_property("reason")
