"""MNIST-shaped data on the multi-processing runner, end to end: 3,000 synthetic 28x28 images in IDX files
ingested by two Beam worker processes, then the default pipeline on them with the same runner. The size is
kept small for CI: the chunking is the same as at 1M (benchmarks/scale.py runs 10k, 100k and 1M)."""
from __future__ import annotations

import json

import pytest

from benchmarks.synthetic_mnist import write_dataset
from tests.conftest import ROOT, run_conveyor, write_spec
from tests.e2e.test_pipeline_run import node_events

pytestmark = pytest.mark.slow
MULTI_PROCESSING = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def test_three_thousand_images_on_two_worker_processes(tmp_path):
    data = write_dataset(tmp_path / "idx", train=2_500, test=500)
    spec = write_spec(tmp_path, **{
        "data.source": "mnist-idx", "data.path": str(data), "data.image_shape": [28, 28],
        "data.schema": str(ROOT / "schemas" / "mnist28" / "schema.pbtxt"), "beam.args": MULTI_PROCESSING,
        # The streaming Quantizer and InfraValidator have their own tests; here the Beam-run components.
        "components.trainer.train_steps": 100, "components.quantizer": None, "components.infra_validator": None,
        "components.serving_pusher": None})

    init = run_conveyor("data", "init", "--spec", spec)
    assert init.returncode == 0, init.stdout[-2000:] + init.stderr[-2000:]
    span = tmp_path / "workspace" / "data" / "span-1"
    manifest = json.loads((span / "span.json").read_text())
    assert sum(manifest["examples"].values()) == 3_000 and manifest["image_shape"] == [28, 28]
    assert manifest["shards"] == {"train": 5, "eval": 5}  # 2,500 train images in 4 chunks, 500 t10k in 1
    assert manifest["workers"] == 2  # the chunks were written by both worker processes
    # One byte a pixel: the whole span is far smaller than 3,000 x 784 float32 pixels (9 MB).
    assert sum(p.stat().st_size for p in span.rglob("*.tfrecord.gz")) < 3_000 * 784

    result = run_conveyor("run", spec)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for node in ("ImportExampleGen", "StatisticsGen", "ExampleValidator", "DriftGate", "Trainer", "Evaluator"):
        assert f"✓ {node}  complete in" in result.stdout
    assert "  evaluated: " in result.stdout  # the Evaluator ran and the summary says its verdict
    store = node_events_store(tmp_path)
    [examples] = node_events(store, "mnist", "ImportExampleGen")["outputs"]["Examples"]
    assert examples.custom_properties["examples_eval"].int_value == manifest["examples"]["eval"]
    assert examples.custom_properties["span"].int_value == 1
    [model] = node_events(store, "mnist", "Trainer")["outputs"]["Model"]
    assert model.custom_properties["eval_accuracy"].double_value > 0.7


def node_events_store(directory):
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = str(directory / "workspace" / "metadata.sqlite")
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return metadata_store.MetadataStore(config)
