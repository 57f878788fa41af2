"""The Trainer executor, called directly: multi-replica and multi-worker training, and the exported model."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tfx.types import standard_artifacts

from conveyor_ml.base.spec import TrainerSettings
from conveyor_ml.components.parameters import parameter_values
from conveyor_ml.components.trainer import executor
from conveyor_ml.components.trainer.model import OUTPUT_KEYS, SIGNATURES
from conveyor_ml.components.trainer.parameters import PARAMETER_NAMES
from conveyor_ml.data.datasets import init_data
from conveyor_ml.formats.examples import read_tfrecords, serialize_example
from tests.artifacts import examples_from_span, output, schema_from_file
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def custom(artifact, key):
    value = artifact.mlmd_artifact.custom_properties[key]
    return getattr(value, value.WhichOneof("value"))


def train(tmp: Path, data_root: Path, **changes):
    inputs = {
        "examples": [examples_from_span(data_root, 1, tmp / "examples")],
        "schema": [schema_from_file(ROOT / "schemas/mnist/schema.pbtxt", tmp / "schema")],
    }
    outputs = {"model": [output(standard_artifacts.Model, tmp / "model")],
               "model_run": [output(standard_artifacts.ModelRun, tmp / "model_run")]}
    properties = {"image_shape": [8, 8], **parameter_values(TrainerSettings(train_steps=400), PARAMETER_NAMES),
                  **changes}
    executor.Executor().Do(inputs, outputs, properties)
    return outputs["model"][0], outputs["model_run"][0]


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "data"
    init_data("sklearn-digits", None, (8, 8), root, 0.2)
    return root


@pytest.fixture(scope="session")
def two_replica_model(tmp_path_factory, digits_data):
    return train(tmp_path_factory.mktemp("mirrored"), digits_data, cpu_replicas=2)


@pytest.fixture(scope="session")
def eval_split(digits_data):
    files = [str(p) for p in sorted((digits_data / "span-1" / "eval").iterdir())]
    return read_tfrecords(files, (8, 8))


@pytest.fixture(scope="session")
def loaded_model(two_replica_model):
    model, _ = two_replica_model
    return tf.saved_model.load(str(Path(model.uri) / "Format-Serving"))


def test_two_replicas_on_logical_cpus(two_replica_model):
    model, model_run = two_replica_model
    assert custom(model, "strategy") == "mirrored"
    assert custom(model, "replicas") == 2
    assert custom(model, "global_batch_size") == 64  # per-replica batch x replicas
    assert custom(model, "device_kinds") == "CPU"
    assert custom(model, "steps") == 400
    assert custom(model, "examples_per_second") > 100
    assert custom(model, "eval_accuracy") >= 0.93  # span 1: about 400 training digits, 100 eval digits
    assert list(Path(model_run.uri).rglob("events.out.tfevents.*")), "no TensorBoard logs"
    assert custom(model_run, "tensorboard_logdir") == model_run.uri


def test_the_model_has_three_signatures_with_the_same_outputs(loaded_model):
    assert set(SIGNATURES) <= set(loaded_model.signatures)
    for name in SIGNATURES:
        assert set(loaded_model.signatures[name].structured_outputs) == set(OUTPUT_KEYS)


def test_signatures_agree_on_the_eval_set(loaded_model, eval_split):
    # PNG holds 8-bit pixels, so every signature gets the same rounded pixels.
    images = np.round(eval_split.images).astype(np.uint8)
    as_float = loaded_model.signatures["serving_default"](images=tf.constant(images, tf.float32))
    encoded = [tf.io.encode_png(image[..., None]).numpy() for image in images]
    as_bytes = loaded_model.signatures["bytes_predictor"](image_bytes=tf.constant(encoded))
    serialized = [serialize_example(image.astype(np.float32), int(label))
                  for image, label in zip(images, eval_split.labels)]
    as_examples = loaded_model.signatures["serving_examples"](examples=tf.constant(serialized))
    for other in (as_bytes, as_examples):
        np.testing.assert_allclose(other["probabilities"].numpy(), as_float["probabilities"].numpy(), atol=1e-5)
        np.testing.assert_allclose(other["logits"].numpy(), as_float["logits"].numpy(), atol=1e-5)
        np.testing.assert_array_equal(other["class_ids"].numpy(), as_float["class_ids"].numpy())


def test_preprocessing_lives_inside_the_model(loaded_model, eval_split, two_replica_model):
    model, _ = two_replica_model
    predict = loaded_model.signatures["serving_default"]
    raw = predict(images=tf.constant(eval_split.images))["class_ids"].numpy()
    raw_accuracy = float(np.mean(raw == eval_split.labels))
    assert raw_accuracy == pytest.approx(custom(model, "eval_accuracy"), abs=1e-6)
    # A client that normalised the pixels itself would get nonsense: the model does it.
    normalised = predict(images=tf.constant((eval_split.images - 127.5) / 127.5))["class_ids"].numpy()
    assert float(np.mean(normalised == eval_split.labels)) < raw_accuracy - 0.3


def test_non_image_bytes_fail_that_call_only(loaded_model, eval_split):
    predict_bytes = loaded_model.signatures["bytes_predictor"]
    with pytest.raises(tf.errors.InvalidArgumentError):
        predict_bytes(image_bytes=tf.constant([b"definitely not a png"]))
    buffer = io.BytesIO(tf.io.encode_png(np.uint8(eval_split.images[0])[..., None]).numpy())
    result = predict_bytes(image_bytes=tf.constant([buffer.getvalue()]))
    assert result["class_ids"].shape == (1,)


def test_two_workers_on_localhost_train_the_same_steps(tmp_path, digits_data):
    model, _ = train(tmp_path, digits_data, strategy="multi_worker", num_workers=2, train_steps=30)
    assert custom(model, "workers") == 2
    assert custom(model, "worker_steps") == "30,30"
    assert custom(model, "replicas") == 2  # one CPU replica per worker
    loaded = tf.saved_model.load(str(Path(model.uri) / "Format-Serving"))
    out = loaded.signatures["serving_default"](images=tf.zeros((2, 8, 8)))
    assert out["probabilities"].shape == (2, 10)
    assert custom(model, "strategy") == "multi_worker"


def test_warm_start_copies_the_base_model_weights(two_replica_model):
    from conveyor_ml.base.spec import ModelArchitecture
    from conveyor_ml.components.trainer.model import build_model
    from conveyor_ml.components.trainer.training import _warm_start

    base_dir = str(Path(two_replica_model[0].uri) / "Format-Serving")
    fresh = build_model((8, 8), ModelArchitecture())
    _warm_start(tf, fresh, base_dir)
    base = tf.keras.models.load_model(base_dir, compile=False)
    for mine, theirs in zip(fresh.get_weights(), base.get_weights()):
        np.testing.assert_array_equal(mine, theirs)

    other_shape = build_model((8, 8), ModelArchitecture(dense_units=16))
    before = [w.copy() for w in other_shape.get_weights()]
    _warm_start(tf, other_shape, base_dir)  # does not fit: logged, weights untouched
    for mine, original in zip(other_shape.get_weights(), before):
        np.testing.assert_array_equal(mine, original)
