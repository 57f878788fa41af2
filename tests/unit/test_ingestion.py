"""Ingestion: a source becomes a published span, whatever the chunking and the runner; a failure publishes
nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.data import ingestion, sources
from conveyor_ml.data.datasets import IN_PROCESS
from conveyor_ml.formats.examples import ImageSet, read_tfrecords
from tests.conftest import ROOT


def synthetic(count: int, shape=(8, 8), seed=0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (count, *shape)).astype(np.uint8), rng.integers(0, 10, count))


def span_contents(span_dir, shape=(8, 8)) -> dict[str, set[tuple[bytes, int]]]:
    contents = {}
    for split in ("train", "eval"):
        data = read_tfrecords([str(p) for p in sorted((span_dir / split).iterdir())], shape)
        contents[split] = {(image.astype(np.uint8).tobytes(), int(label)) for image, label in zip(data.images, data.labels)}
    return contents


def test_the_split_does_not_depend_on_the_chunking(tmp_path, monkeypatch):
    data = synthetic(3000)
    ingestion.ingest_span(sources.ArraySource(data), tmp_path / "a", 1, 0.25, {})
    monkeypatch.setattr(sources, "chunk_examples", lambda shape, total=None: 700)  # 5 chunks instead of 4
    monkeypatch.setattr(sources, "BLOCK_EXAMPLES", 128)
    manifest = ingestion.ingest_span(sources.ArraySource(data), tmp_path / "b", 1, 0.25, {})
    first, second = span_contents(tmp_path / "a" / "span-1"), span_contents(tmp_path / "b" / "span-1")
    assert first == second
    assert len(first["train"]) + len(first["eval"]) == 3000
    assert 0.22 < len(first["eval"]) / 3000 < 0.28
    assert manifest["shards"] == {"train": 5, "eval": 5}
    assert manifest["label_counts"] == np.bincount(data.labels, minlength=10).tolist()
    train_labels = [label for _, label in first["train"]]
    assert manifest["label_counts_by_split"]["train"] == np.bincount(train_labels, minlength=10).tolist()


def test_identical_examples_never_straddle_the_split():
    data = synthetic(200)
    images, labels = np.concatenate([data.images] * 3), np.concatenate([data.labels] * 3)
    mask = ingestion.eval_mask(images, labels, 0.3)
    np.testing.assert_array_equal(mask[:200], mask[200:400])
    np.testing.assert_array_equal(mask[:200], mask[400:])


def test_beam_pipeline_and_in_process_writing_give_the_same_span(tmp_path):
    csv = str(ROOT / "tests/fixtures/digits_6x6.csv")
    ingestion.ingest_span(sources.open_source("csv", csv, (6, 6)), tmp_path / "beam", 1, 0.25, {}, IN_PROCESS)
    ingestion.ingest_span(sources.open_source("csv", csv, (6, 6)), tmp_path / "local", 1, 0.25, {})
    assert span_contents(tmp_path / "beam" / "span-1", (6, 6)) == span_contents(tmp_path / "local" / "span-1", (6, 6))


class FailingSource(sources.ArraySource):
    """Fails on its third chunk, after two chunks' shards were written."""

    def read(self, chunk):
        if chunk.index == 2:
            raise ConveyorError("data: the third chunk is broken")
        yield from super().read(chunk)


@pytest.mark.parametrize("runner", [None, IN_PROCESS], ids=["in process", "beam"])
def test_a_failure_half_way_publishes_nothing(tmp_path, runner):
    with pytest.raises(ConveyorError, match="the third chunk is broken"):
        ingestion.ingest_span(FailingSource(synthetic(4000)), tmp_path, 1, 0.2, {}, runner)
    assert list(tmp_path.iterdir()) == []  # no span-1, no staging directory


def test_published_span_has_manifest_and_shards_and_no_leftovers(tmp_path):
    ingestion.ingest_span(sources.ArraySource(synthetic(500)), tmp_path, 4, 0.2, {"source": "test", "path": "x"})
    span = tmp_path / "span-4"
    assert sorted(p.name for p in span.iterdir()) == ["eval", "span.json", "train"]
    manifest = json.loads((span / "span.json").read_text())
    assert manifest["span"] == 4 and manifest["source"] == "test" and manifest["image_shape"] == [8, 8]
    assert sum(manifest["examples"].values()) == 500
    assert all(name.endswith(".tfrecord.gz") for name in sorted(p.name for p in (span / "train").iterdir()))


def test_too_few_examples_for_both_splits_is_refused(tmp_path):
    with pytest.raises(ConveyorError, match="needs at least 2 examples"):
        ingestion.ingest_span(sources.ArraySource(synthetic(1)), tmp_path, 1, 0.2, {})
    with pytest.raises(ConveyorError, match="fell in the eval split"):
        ingestion.ingest_span(sources.ArraySource(synthetic(3, seed=5)), tmp_path, 1, 0.01, {})
    assert list(tmp_path.iterdir()) == []
