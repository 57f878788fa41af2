"""Pixel statistics from raw image bytes: the numbers match a direct computation, the schema checks and the
drift gate work on them as they did on float pixel lists."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow_data_validation as tfdv
from tensorflow_data_validation.statistics import stats_impl
from tfx_bsl.coders import example_coder

from conveyor_ml.components.drift_gate.executor import STATISTICS_FILE, drift_figures
from conveyor_ml.components.statistics_gen.pixel_statistics import PixelStatistics
from conveyor_ml.formats.examples import encode_examples
from tests.conftest import ROOT

SCHEMA = ROOT / "schemas" / "mnist" / "schema.pbtxt"


def record_batch(images: np.ndarray, labels: np.ndarray):
    """The Arrow batch TFX's readers build from serialized examples."""
    return example_coder.ExamplesToRecordBatchDecoder().DecodeBatch(encode_examples(images, labels))


def digits(count: int, seed: int, brightness: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ink = rng.random((count, 8, 8)) < 0.4
    images = np.where(ink, rng.integers(80, 256, (count, 8, 8)), 0) * brightness
    return images.astype(np.uint8), rng.integers(0, 10, count)


def test_pixel_statistics_equal_a_direct_computation():
    images, labels = digits(500, 1)
    generator = PixelStatistics()
    halves = [generator.add_input(generator.create_accumulator(), record_batch(images[s], labels[s]))
              for s in (slice(0, 200), slice(200, 500))]
    [feature] = generator.extract_output(generator.merge_accumulators(halves)).features
    assert list(feature.path.step) == ["image"]
    stats, pixels = feature.num_stats, images.reshape(-1).astype(np.float64)
    assert stats.common_stats.num_non_missing == 500 and stats.common_stats.num_missing == 0
    assert stats.common_stats.min_num_values == stats.common_stats.max_num_values == 64
    assert stats.mean == pytest.approx(pixels.mean()) and stats.std_dev == pytest.approx(pixels.std())
    assert (stats.min, stats.max, stats.num_zeros) == (pixels.min(), pixels.max(), np.sum(pixels == 0))
    assert stats.median == np.median(pixels)
    counts, edges = np.histogram(pixels, bins=10, range=(pixels.min(), pixels.max()))
    standard = stats.histograms[0]
    assert [b.sample_count for b in standard.buckets] == counts.tolist()
    assert [b.low_value for b in standard.buckets] == pytest.approx(edges[:-1].tolist())


def test_examples_without_raw_images_are_counted_missing_and_add_no_feature():
    import tensorflow as tf

    images, labels = digits(10, 2)
    label_only = tf.train.Example(features=tf.train.Features(feature={
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[3]))})).SerializeToString()
    decoder = example_coder.ExamplesToRecordBatchDecoder()
    mixed = decoder.DecodeBatch([*encode_examples(images, labels), label_only])  # a null row in image_raw
    generator = PixelStatistics()
    [feature] = generator.extract_output(generator.add_input(generator.create_accumulator(), mixed)).features
    assert feature.num_stats.common_stats.num_non_missing == 10
    assert feature.num_stats.common_stats.num_missing == 1
    assert feature.num_stats.common_stats.tot_num_values == 640
    no_column = decoder.DecodeBatch([label_only])
    assert not generator.extract_output(generator.add_input(generator.create_accumulator(), no_column)).features


def statistics_of(directory, images, labels):
    """TFDV statistics of a split with TFDV's generators and ours (TFDV's in-memory path: the same generators
    StatisticsGen runs on Beam), saved where StatisticsGen saves them."""
    options = tfdv.StatsOptions(schema=tfdv.load_schema_text(str(SCHEMA)), generators=[PixelStatistics()])
    statistics = stats_impl.generate_statistics_in_memory(record_batch(images, labels), options)
    target = directory / STATISTICS_FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(statistics.SerializeToString())
    return statistics


def test_schema_checks_and_pixel_drift_work_on_raw_images(tmp_path):
    schema = tfdv.load_schema_text(str(SCHEMA))
    baseline = statistics_of(tmp_path / "a", *digits(400, 3))
    assert not tfdv.validate_statistics(baseline, schema).anomaly_info
    same = statistics_of(tmp_path / "b", *digits(400, 4))
    darker = statistics_of(tmp_path / "c", *digits(400, 5, brightness=0.4))
    assert darker is not None and same is not None
    figures = drift_figures(str(tmp_path / "b"), str(tmp_path / "a"), str(SCHEMA), 0.1, 0.1)
    assert figures["pixel_js"] < 0.05
    shifted = drift_figures(str(tmp_path / "c"), str(tmp_path / "a"), str(SCHEMA), 0.1, 0.1)
    assert shifted["pixel_js"] > 0.1

    small = statistics_of(tmp_path / "d", digits(50, 6)[0][:, :6, :6].copy(), digits(50, 6)[1])
    anomalies = tfdv.validate_statistics(small, schema).anomaly_info
    assert "image" in anomalies  # 36 pixels where the schema says 64
