"""The pipeline's ExampleGen executor: a span's shards become the Examples artifact without re-encoding."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils, standard_artifacts
from tfx.types import standard_component_specs as keys
from tfx.utils import proto_utils

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.components.example_gen.executor import Executor
from conveyor_ml.data.datasets import write_span
from conveyor_ml.formats.examples import ImageSet
from conveyor_ml.pipelines.builder import example_gen_input_config


def import_span(data_root, span: int, destination):
    config = example_gen_input_config()
    for split in config.splits:
        split.pattern = split.pattern.replace("{SPAN}", str(span))  # what TFX's driver resolves
    examples = standard_artifacts.Examples()
    examples.uri = str(destination)
    Executor().Do({}, {"examples": [examples]}, {
        keys.INPUT_BASE_KEY: str(data_root), keys.INPUT_CONFIG_KEY: proto_utils.proto_to_json(config),
        keys.OUTPUT_CONFIG_KEY: proto_utils.proto_to_json(example_gen_pb2.Output())})
    return examples


def test_a_span_is_imported_by_hard_links_with_its_counts(tmp_path):
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (300, 8, 8)).astype(np.uint8), rng.integers(0, 10, 300))
    span = write_span(tmp_path / "data", 2, data, 0.2, {"source": "test"})
    examples = import_span(tmp_path / "data", 2, tmp_path / "artifact")
    assert artifact_utils.decode_split_names(examples.split_names) == ["train", "eval"]
    manifest = json.loads((span / "span.json").read_text())
    for split in ("train", "eval"):
        originals = sorted((span / split).iterdir())
        imported = sorted((tmp_path / "artifact" / f"Split-{split}").iterdir())
        assert [p.name for p in imported] == [p.name for p in originals]
        assert all(a.stat().st_ino == b.stat().st_ino for a, b in zip(originals, imported))  # the same files
        assert examples.get_int_custom_property(f"examples_{split}") == manifest["examples"][split]
    assert examples.get_string_custom_property("payload_format") == "FORMAT_TF_EXAMPLE"


def test_a_span_without_its_manifest_is_refused(tmp_path):
    (tmp_path / "data" / "span-1" / "train").mkdir(parents=True)
    (tmp_path / "data" / "span-1" / "eval").mkdir()
    (tmp_path / "data" / "span-1" / "train" / "data-00000-of-00001.tfrecord.gz").write_bytes(b"")
    with pytest.raises(ConveyorError, match="has no span.json: it is still being written"):
        import_span(tmp_path / "data", 1, tmp_path / "artifact")


def test_a_truncated_manifest_is_named_with_what_to_do(tmp_path):
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (50, 8, 8)).astype(np.uint8), rng.integers(0, 10, 50))
    span = write_span(tmp_path / "data", 2, data, 0.2, {"source": "test"})
    manifest = span / "span.json"
    manifest.write_bytes(manifest.read_bytes()[:40])  # a disk that filled up, a copy cut short
    with pytest.raises(ConveyorError) as raised:
        import_span(tmp_path / "data", 2, tmp_path / "artifact")
    assert str(raised.value).startswith(f"{manifest}: not valid JSON (")
    assert "restore its directory from a backup, or remove the directory" in str(raised.value)
