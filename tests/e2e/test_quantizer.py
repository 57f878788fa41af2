"""The Quantizer executor, called directly on the trained digits model and on a model TFLite cannot convert."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tfx.types import standard_artifacts

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.components.artifacts import QuantizationReport, QuantizedModel
from conveyor_ml.components.quantizer import executor
from conveyor_ml.components.quantizer.tflite_variants import TfliteModel, measure, saved_model_accuracy
from conveyor_ml.data.datasets import EMBEDDED_INITIAL_EXAMPLES, embedded_digits, init_data
from conveyor_ml.formats.examples import read_tfrecords
from tests.artifacts import examples_from_span, output

pytestmark = pytest.mark.slow
PROPERTIES = {"image_shape": "[8, 8]", "variants": json.dumps(["float32", "float16", "dynamic_range", "int8"]),
              "required_variants": "[]", "representative_examples": 100, "max_accuracy_drop_points": 1.0,
              "threads": 2, "latency_runs": 100, "throughput_batch_size": 32}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantizer-data")
    init_data("sklearn-digits", None, (8, 8), root / "data", 0.2)
    return root


def quantize(tmp_path: Path, data: Path, export: Path, blessed: int = 1, **changes):
    model = output(standard_artifacts.Model, tmp_path / "model")
    shutil.copytree(export, Path(model.uri) / "Format-Serving", dirs_exist_ok=True)
    blessing = output(standard_artifacts.ModelBlessing, tmp_path / "blessing")
    blessing.set_int_custom_property("blessed", blessed)
    inputs = {"model": [model], "model_blessing": [blessing],
              "examples": [examples_from_span(data / "data", 1, tmp_path / "examples")]}
    outputs = {"quantized_models": [output(QuantizedModel, tmp_path / "variants")],
               "report": [output(QuantizationReport, tmp_path / "report")]}
    result = executor.Executor().Do(inputs, outputs, {**PROPERTIES, **changes})
    variants = {}
    for proto in result.output_artifacts["quantized_models"].artifacts:
        values = {k: getattr(v, v.WhichOneof("value")) for k, v in proto.properties.items()}
        values.update({k: getattr(v, v.WhichOneof("value")) for k, v in proto.custom_properties.items()})
        variants[values["variant"]] = {**values, "uri": proto.uri}
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    return variants, report, tmp_path / "report" / "report.md"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, data, trained_export):
    return quantize(tmp_path_factory.mktemp("quantized"), data, trained_export)


@pytest.fixture(scope="module")
def eval_split(data):
    return read_tfrecords([str(p) for p in (data / "data" / "span-1" / "eval").iterdir()], (8, 8))


@pytest.fixture(scope="module")
def held_back_digits():
    """The embedded digits span 1 does not hold (1,297 of them): a 1-point tolerance is 13 images, not one."""
    digits = embedded_digits()
    return digits.take(np.arange(EMBEDDED_INITIAL_EXAMPLES, len(digits)))


def test_each_variant_converts_and_runs(quantized, eval_split):
    variants, report, table = quantized
    assert set(variants) == {"float32", "float16", "dynamic_range", "int8"}
    for values in variants.values():
        model = TfliteModel((Path(values["uri"]) / "model.tflite").read_bytes(), threads=1)
        assert model.classes(eval_split.images[:5]).shape == (5,)
        assert values["size_bytes"] == (Path(values["uri"]) / "model.tflite").stat().st_size
    sizes = {name: values["size_bytes"] for name, values in variants.items()}
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]
    assert "| int8 |" in table.read_text() and "size vs f32" in table.read_text()


def test_int8_is_integer_and_its_recorded_quantization_reproduces_the_float_model(quantized, held_back_digits,
                                                                                   trained_export):
    int8 = quantized[0]["int8"]
    interpreter = tf.lite.Interpreter(model_path=str(Path(int8["uri"]) / "model.tflite"))
    runner = interpreter.get_signature_runner("serving_default")
    assert runner.get_input_details()["images"]["dtype"] == np.int8
    assert runner.get_output_details()["probabilities"]["dtype"] == np.int8
    # A client quantizes raw pixels with the recorded scale and zero point, and dequantizes the output.
    scale, zero_point = int8["input_scale"], int8["input_zero_point"]
    out = json.loads(int8["output_quantization"])["probabilities"]
    correct = 0
    for image, label in zip(held_back_digits.images, held_back_digits.labels):
        q = np.clip(np.round(image / scale + zero_point), -128, 127).astype(np.int8)[None]
        probabilities = (runner(images=q)["probabilities"].astype(np.float32) - out["zero_point"]) * out["scale"]
        correct += int(np.argmax(probabilities) == label)
    client_accuracy = correct / len(held_back_digits)
    float_accuracy = saved_model_accuracy(str(trained_export), held_back_digits.images, held_back_digits.labels)
    assert client_accuracy >= float_accuracy - 0.01  # within the 1-point tolerance


def test_blessing_follows_the_tolerance(quantized):
    assert executor.is_blessed(-0.9, 1.0) and executor.is_blessed(0.5, 0.0)
    assert not executor.is_blessed(-1.1, 1.0)
    for row in quantized[1]["variants"]:
        assert row["blessed"] == executor.is_blessed(row["accuracy_delta_points"], 1.0)
        assert quantized[0][row["variant"]]["blessed"] == int(row["blessed"])


def test_report_matches_a_remeasurement(quantized, eval_split):
    for row in quantized[1]["variants"]:
        content = (Path(quantized[0][row["variant"]]["uri"]) / "model.tflite").read_bytes()
        again = measure(content, eval_split.images, eval_split.labels, threads=2, latency_runs=100,
                        throughput_batch=32)
        assert again.accuracy == pytest.approx(row["accuracy"], abs=1e-9)
        assert row["size_bytes"] == len(content)
        assert again.input_dtype == quantized[0][row["variant"]]["input_dtype"]
        # Timings are not compared with a second run (on a shared 2-core machine a re-run's P50 differs by
        # more than 5x; speed belongs in benchmarks/): the report must hold real, ordered measurements.
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"] and row["throughput_per_s"] > 0


def test_unblessed_models_are_not_quantized(tmp_path, data, trained_export):
    variants, report, _ = quantize(tmp_path, data, trained_export, blessed=0)
    assert variants == {} and "not blessed" in report["note"]


@pytest.fixture(scope="module")
def unconvertible_model(tmp_path_factory):
    """serving_default with an op the TFLite builtins lack (a matrix determinant)."""
    class Model(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.ones((1, 10)))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8], tf.float32, name="images")])
        def serve(self, images):
            logits = tf.linalg.det(images / 255.0)[:, None] * self.w
            return {"logits": logits, "probabilities": tf.nn.softmax(logits), "class_ids": tf.argmax(logits, 1)}

    model = Model()
    path = tmp_path_factory.mktemp("unconvertible") / "export"
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve.get_concrete_function()})
    return path


def test_failed_conversions_are_reported_and_fail_only_when_required(tmp_path, data, unconvertible_model):
    variants, report, table = quantize(tmp_path / "optional", data, unconvertible_model,
                                       variants=json.dumps(["float32", "int8"]))
    assert variants == {}
    for row in report["variants"]:
        assert row["status"] == "failed"
        assert "not supported by the native TFLite runtime" in row["error"] and "MatrixDeterminant" in row["error"]
    assert "failed:" in table.read_text()
    with pytest.raises(ConveyorError, match="required variant int8 failed: Some ops are not supported"):
        quantize(tmp_path / "required", data, unconvertible_model, variants=json.dumps(["float32", "int8"]),
                 required_variants=json.dumps(["int8"]))


@pytest.mark.parametrize("changes, message", [
    ({"variants": json.dumps(["int4"])}, "unknown variant 'int4'"),
    ({"representative_examples": 0}, "int8 needs at least 1 example"),
])
def test_bad_parameters_fail_before_conversion(tmp_path, data, trained_export, changes, message):
    with pytest.raises(ConveyorError, match=message):
        quantize(tmp_path, data, trained_export, **changes)
