"""Pixel statistics from the raw image bytes: a TFDV statistics generator that reports the pixels of
`image_raw` as the numeric feature `image`, exactly as TFDV reported the float pixel list spans held before.

So the schema's `image` feature (float domain 0..255, H*W values), ExampleValidator's checks, the drift gate's
Jensen-Shannon divergence of pixel values and `conveyor monitor` keep working on compact examples; TFDV
itself would only see opaque bytes (their lengths). Each batch is one `np.bincount` over its bytes, and the
accumulator is 256 counters, so it costs little and its memory does not grow with the data.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tensorflow_data_validation.statistics.generators import stats_generator
from tensorflow_metadata.proto.v0 import path_pb2, statistics_pb2

from conveyor_ml.base.names import IMAGE_KEY, IMAGE_RAW_KEY

HISTOGRAM_BUCKETS = 10  # TFDV's default num_histogram_buckets and num_quantiles_histogram_buckets


@dataclass
class PixelCounts:
    values: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))  # pixels of each value 0..255
    present: int = 0  # examples with image_raw
    missing: int = 0
    min_count: int = -1  # fewest and most pixels in one example
    max_count: int = 0


def _example_bytes(column: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(present mask, byte count per present example, all those bytes) of a list<binary> column."""
    present = column.is_valid().to_numpy(zero_copy_only=False)
    offsets = np.asarray(column.offsets, dtype=np.int64)  # positions of each example's values
    values = column.values
    value_lengths = pc.binary_length(values).to_numpy(zero_copy_only=False).astype(np.int64) if len(values) else \
        np.zeros(0, np.int64)
    cumulative = np.concatenate([[0], np.cumsum(value_lengths)])
    per_example = cumulative[offsets[1:]] - cumulative[offsets[:-1]]
    offset_type = np.int64 if pa.types.is_large_binary(values.type) else np.int32
    byte_offsets = np.frombuffer(values.buffers()[1], offset_type)[values.offset:values.offset + len(values) + 1]
    data = np.frombuffer(values.buffers()[2], np.uint8) if values.buffers()[2] is not None else np.zeros(0, np.uint8)
    first, last = offsets[0], offsets[-1]
    pixels = data[byte_offsets[first]:byte_offsets[last]] if last > first else np.zeros(0, np.uint8)
    return present, per_example[present], pixels


class PixelStatistics(stats_generator.CombinerStatsGenerator):
    def __init__(self, name: str = "conveyor.PixelStatistics"):
        super().__init__(name)

    def create_accumulator(self) -> PixelCounts:
        return PixelCounts()

    def add_input(self, accumulator: PixelCounts, examples: pa.RecordBatch) -> PixelCounts:
        index = examples.schema.get_field_index(IMAGE_RAW_KEY)
        if index < 0:
            accumulator.missing += examples.num_rows
            return accumulator
        present, counts, pixels = _example_bytes(examples.column(index))
        accumulator.values += np.bincount(pixels, minlength=256)
        accumulator.present += int(present.sum())
        accumulator.missing += int((~present).sum())
        if len(counts):
            low, high = int(counts.min()), int(counts.max())
            accumulator.min_count = low if accumulator.min_count < 0 else min(accumulator.min_count, low)
            accumulator.max_count = max(accumulator.max_count, high)
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[PixelCounts]) -> PixelCounts:
        merged = PixelCounts()
        for accumulator in accumulators:
            merged.values += accumulator.values
            merged.present += accumulator.present
            merged.missing += accumulator.missing
            if accumulator.min_count >= 0:
                merged.min_count = accumulator.min_count if merged.min_count < 0 else \
                    min(merged.min_count, accumulator.min_count)
            merged.max_count = max(merged.max_count, accumulator.max_count)
        return merged

    def extract_output(self, accumulator: PixelCounts) -> statistics_pb2.DatasetFeatureStatistics:
        result = statistics_pb2.DatasetFeatureStatistics()
        if not accumulator.present:
            return result  # no raw images (a span of float pixel lists): TFDV's own `image` statistics stand
        feature = result.features.add(path=path_pb2.Path(step=[IMAGE_KEY]),
                                      type=statistics_pb2.FeatureNameStatistics.FLOAT)
        feature.num_stats.CopyFrom(numeric_statistics(accumulator))
        return result


def numeric_statistics(counts: PixelCounts) -> statistics_pb2.NumericStatistics:
    """TFDV's NumericStatistics of the pixel values, computed exactly from the 256 counters."""
    values = counts.values
    total = int(values.sum())
    levels = np.arange(256, dtype=np.float64)
    stats = statistics_pb2.NumericStatistics()
    common = stats.common_stats
    common.num_non_missing, common.num_missing = counts.present, counts.missing
    common.min_num_values, common.max_num_values = max(counts.min_count, 0), counts.max_count
    common.tot_num_values = total
    common.avg_num_values = total / counts.present
    if not total:
        return stats
    occurring = np.flatnonzero(values)
    low, high = int(occurring[0]), int(occurring[-1])
    mean = float((values * levels).sum() / total)
    stats.mean = mean
    stats.std_dev = float(np.sqrt(max((values * (levels - mean) ** 2).sum() / total, 0.0)))
    stats.num_zeros = int(values[0])
    stats.min, stats.max = low, high
    cumulative = np.cumsum(values)
    stats.median = float(np.searchsorted(cumulative, (total + 1) / 2))

    standard = stats.histograms.add(type=statistics_pb2.Histogram.STANDARD)
    edges = np.linspace(low, high, HISTOGRAM_BUCKETS + 1)
    # A value on an inner edge counts in the bucket above it; the maximum in the last bucket.
    bucket_of = np.minimum(np.searchsorted(edges, levels, side="right") - 1, HISTOGRAM_BUCKETS - 1)
    for bucket in range(HISTOGRAM_BUCKETS):
        in_bucket = values[(bucket_of == bucket) & (levels >= low) & (levels <= high)].sum()
        standard.buckets.add(low_value=float(edges[bucket]), high_value=float(edges[bucket + 1]),
                             sample_count=float(in_bucket))

    quantiles = stats.histograms.add(type=statistics_pb2.Histogram.QUANTILES)
    boundaries = [float(np.searchsorted(cumulative, total * q / HISTOGRAM_BUCKETS))
                  for q in range(HISTOGRAM_BUCKETS + 1)]
    boundaries[0] = float(low)
    for bucket in range(HISTOGRAM_BUCKETS):
        quantiles.buckets.add(low_value=boundaries[bucket], high_value=boundaries[bucket + 1],
                              sample_count=total / HISTOGRAM_BUCKETS)
    return stats
