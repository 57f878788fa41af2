"""The Trainer rejects bad parameters, schemas and TF_CONFIG before any training process starts."""
import json
from pathlib import Path

import pytest
from tfx.types import standard_artifacts

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.components.trainer import executor
from conveyor_ml.components.trainer.training import is_chief, parse_tf_config
from tests.artifacts import examples_from_span, output, schema_from_file
from tests.conftest import ROOT


@pytest.fixture
def trainer_inputs(tmp_path):
    from conveyor_ml.data.datasets import embedded_digits, write_span

    write_span(tmp_path / "data", 1, embedded_digits().take(list(range(40))), 0.25, {})
    return {
        "examples": [examples_from_span(tmp_path / "data", 1, tmp_path / "examples")],
        "schema": [schema_from_file(ROOT / "schemas/mnist/schema.pbtxt", tmp_path / "schema")],
    }, {
        "model": [output(standard_artifacts.Model, tmp_path / "model")],
        "model_run": [output(standard_artifacts.ModelRun, tmp_path / "model_run")],
    }


def properties(**changes):
    base = {"image_shape": "[8, 8]", "strategy": "mirrored", "cpu_replicas": 1, "num_workers": 2,
            "train_steps": 5, "batch_size": 8, "learning_rate": 0.01, "warm_start": False}
    return {**base, **changes}


@pytest.mark.parametrize("changes, message", [
    ({"strategy": "tpu"}, "trainer.strategy: unknown strategy 'tpu'"),
    ({"cpu_replicas": 0}, "trainer.cpu_replicas: must be >= 1"),
])
def test_bad_parameters_fail_before_training(trainer_inputs, changes, message):
    inputs, outputs = trainer_inputs
    with pytest.raises(ConveyorError, match=message):
        executor.Executor().Do(inputs, outputs, properties(**changes))
    assert not list(Path(outputs["model"][0].uri).iterdir())


def test_schema_without_label_is_rejected(trainer_inputs, tmp_path):
    inputs, outputs = trainer_inputs
    no_label = tmp_path / "no_label.pbtxt"
    text = (ROOT / "schemas/mnist/schema.pbtxt").read_text()
    no_label.write_text(text[: text.index('feature {\n  name: "label"')])
    inputs["schema"] = [schema_from_file(no_label, tmp_path / "schema2")]
    with pytest.raises(ConveyorError, match="schema: no 'label' feature"):
        executor.Executor().Do(inputs, outputs, properties())


def test_corrupt_tf_config_is_rejected(trainer_inputs, monkeypatch):
    inputs, outputs = trainer_inputs
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConveyorError, match="TF_CONFIG is not valid JSON"):
        executor.Executor().Do(inputs, outputs, properties(strategy="multi_worker"))


@pytest.mark.parametrize("config, message", [
    ({"cluster": {}, "task": {"type": "worker", "index": 0}}, '"cluster" must list "worker"'),
    ({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}, '"task.type" must name a job'),
    ({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}, '"task.index" must be 0..0'),
    ({"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}, "is not host:port"),
])
def test_tf_config_shapes(config, message):
    with pytest.raises(ConveyorError, match=message):
        parse_tf_config(json.dumps(config))


def test_chief_is_worker_zero_unless_a_chief_is_named():
    workers = {"worker": ["h:1", "h:2"]}
    assert is_chief({"cluster": workers, "task": {"type": "worker", "index": 0}})
    assert not is_chief({"cluster": workers, "task": {"type": "worker", "index": 1}})
    with_chief = {**workers, "chief": ["h:0"]}
    assert not is_chief({"cluster": with_chief, "task": {"type": "worker", "index": 0}})
    assert is_chief({"cluster": with_chief, "task": {"type": "chief", "index": 0}})


def test_anomalies_marked_unblessed_stop_training(trainer_inputs, tmp_path):
    inputs, outputs = trainer_inputs
    anomalies = output(standard_artifacts.ExampleAnomalies, tmp_path / "anomalies")
    anomalies.split_names = '["train", "eval"]'
    anomalies.set_json_value_custom_property("blessed", {"train": 0, "eval": 1})
    (tmp_path / "anomalies" / "Split-train").mkdir()
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    found = anomalies_pb2.Anomalies()
    found.anomaly_info["image"].description = "Unexpectedly high value: 300>255"
    (tmp_path / "anomalies" / "Split-train" / "SchemaDiff.pb").write_bytes(found.SerializeToString())
    inputs["example_anomalies"] = [anomalies]
    with pytest.raises(ConveyorError, match=r"data anomalies in span 1 \(split train\): image: Unexpectedly high"):
        executor.Executor().Do(inputs, outputs, properties())


def test_training_leaves_no_temporary_directory_behind(monkeypatch, tmp_path):
    import tempfile

    from conveyor_ml.base.spec import TrainerSettings
    from conveyor_ml.components.trainer.training import TrainingJob

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where run_training's job files go
    job = TrainingJob(train_files=[str(tmp_path / "missing.tfrecord.gz")], eval_files=[str(tmp_path / "missing")],
                      image_shape=(8, 8), serving_model_dir=str(tmp_path / "model"), log_dir=str(tmp_path / "logs"),
                      facts_path="", settings=TrainerSettings(train_steps=1))
    with pytest.raises((ConveyorError, RuntimeError)):
        executor.run_training(job)  # the child fails on the missing data, after the job files were written
    assert list(scratch.iterdir()) == []


def test_splits_are_cached_only_within_the_memory_budget():
    from conveyor_ml.components.trainer.training import cache_plan

    # 28x28 examples take ~824 bytes each: 600,000 of them ~470 MiB, 100,000 ~79 MiB.
    assert cache_plan(600_000, 100_000, (28, 28), 512) == (True, False)  # eval does not fit what is left
    assert cache_plan(600_000, 100_000, (28, 28), 600) == (True, True)
    assert cache_plan(800_000, 100_000, (28, 28), 512) == (False, True)  # train too large, eval still fits
    assert cache_plan(None, 100, (8, 8), 512) == (False, True)  # an unknown size is streamed
    assert cache_plan(1000, 1000, (8, 8), 0) == (False, False)
