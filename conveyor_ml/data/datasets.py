"""Data for the pipeline: the embedded digits, and spans written from any source.

A span is `<data_root>/span-N/` with `train/` and `eval/` shards of gzipped TFRecords of tf.Examples
(`image_raw`: the H*W pixels as uint8 bytes, `label`: int64 class) and a `span.json` manifest, written by the
ingestion pipeline (data/ingestion.py) on the spec's Beam runner. The pipeline's ExampleGen imports the
newest one (`span-{SPAN}` pattern).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.data.ingestion import check_data_root, ingest_span, say_waiting, writing_spans
from conveyor_ml.data.sources import ArraySource, Source, open_source, source_of_files
from conveyor_ml.formats.examples import ImageSet
from conveyor_ml.formats.spans import occupied_slot, read_manifest, span_dir, span_numbers

# The embedded default keeps most of the 1,797 digits back, so `data add-span --embedded` has genuinely unseen
# examples to offer as new data, and span 1 is small enough that more data visibly helps: the 8x8 CNN's
# accuracy on held-out digits climbs from about 0.967 on span 1's 400 training examples to 0.98 on 600 and
# 0.987 on 1,000 (600 steps). Spans 2-5 hold 250 digits each, span 6 the last 297; then they are used up.
EMBEDDED_INITIAL_EXAMPLES = 500
EMBEDDED_CHUNK = 250
# The in-process runner for file sources when no spec names one.
IN_PROCESS = ("--direct_running_mode=in_memory", "--direct_num_workers=1")


def _runner_args(reader, beam_args: tuple[str, ...]) -> tuple[str, ...] | None:
    """Small in-memory sets (the embedded digits, demo shifts, tests) are written in this process without a
    pipeline, whatever runner the spec names: nothing to parallelise, nothing remote workers could read."""
    return None if isinstance(reader, ArraySource) else tuple(beam_args)


def embedded_digits() -> ImageSet:
    """scikit-learn's 1,797 8x8 digits, shuffled once with a fixed seed, pixels scaled 0..16 -> 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(20240601).permutation(len(digits.target))
    images = (digits.images[order] * (255.0 / 16.0)).astype(np.float32)
    return ImageSet(images, digits.target[order].astype(np.int64))


def read_source(source: str, path: str | None, image_shape: tuple[int, int]) -> ImageSet:
    """A whole source in memory (small sources only: the embedded digits, demo shifts, tests); pipelines
    stream sources through `init_data`/`add_span` instead."""
    if source == "sklearn-digits":
        data = embedded_digits()
        if tuple(image_shape) != (8, 8):
            raise ConveyorError(f"data.image_shape: the sklearn-digits images are 8x8, the spec says "
                                f"{image_shape[0]}x{image_shape[1]}; set data.image_shape: [8, 8]")
        return data
    data = open_source(source, path, image_shape).read_all()
    if len(data) == 0:
        raise ConveyorError(f"data: the {source} source holds no examples")
    return data


def write_span(data_root: Path, span: int, data: ImageSet, eval_fraction: float, provenance: dict) -> Path:
    """Writes span-N from images in memory (atomically, refusing to overwrite)."""
    ingest_span(ArraySource(data, provenance.get("source", "sklearn-digits")), data_root, span, eval_fraction,
                provenance)
    return span_dir(data_root, span)


def init_data(source: str, path: str | None, image_shape: tuple[int, int], data_root: Path,
              eval_fraction: float, beam_args: tuple[str, ...] = IN_PROCESS,
              waiting: Callable[[Path], None] | None = say_waiting) -> tuple[int, bool]:
    """Writes span-1 from the spec's source unless a span exists. Returns (latest span, written now?).
    Staging directories of writers that died are removed either way."""
    check_data_root(data_root)
    opened = None
    existing = span_numbers(data_root)
    if existing and not os.access(data_root, os.W_OK):  # spans shared read-only: nothing to write or clean
        return existing[-1], False
    if not existing:  # the source and the name are checked before anything is written
        opened = _initial_source(source, path, image_shape)
        _check_free(data_root, 1)
    with writing_spans(data_root, waiting):
        existing = span_numbers(data_root)  # another writer may have written span 1 meanwhile
        if existing:
            return existing[-1], False
        reader, provenance = opened or _initial_source(source, path, image_shape)
        ingest_span(reader, data_root, 1, eval_fraction, provenance, _runner_args(reader, beam_args))
    return 1, True


def _initial_source(source: str, path: str | None, image_shape: tuple[int, int]) -> tuple[Source, dict]:
    """The source of span 1, and its provenance."""
    provenance = {"source": source, "path": path}
    if source != "sklearn-digits":
        return open_source(source, path, image_shape), provenance
    data = read_source(source, path, image_shape).take(np.arange(EMBEDDED_INITIAL_EXAMPLES))
    return ArraySource(data), {**provenance, "embedded_range": [0, EMBEDDED_INITIAL_EXAMPLES]}


def _check_free(data_root: Path, span: int) -> None:
    """Refuses early, before anything is written, when span-N's name is taken."""
    occupied = occupied_slot(data_root, span)
    if occupied:
        raise ConveyorError(occupied)


def embedded_range(span: int, total: int) -> tuple[int, int] | None:
    """The [start, end) slice of the shuffled embedded digits that span N >= 2 holds: the next EMBEDDED_CHUNK
    after span 1's, the last chunk taking the remainder when less than half a chunk would be left; None once
    they are used up."""
    start = EMBEDDED_INITIAL_EXAMPLES + (span - 2) * EMBEDDED_CHUNK
    if start + EMBEDDED_CHUNK // 2 > total:
        return None
    end = start + EMBEDDED_CHUNK
    return start, (total if total - end < EMBEDDED_CHUNK // 2 else end)


def embedded_held_back(span: int) -> tuple[ImageSet, dict]:
    """Span N >= 2 of the embedded digits: the next part nothing has seen. Never a resample: a digit that was in
    an earlier span's eval split must not come back as training data (the evaluation would be optimistic)."""
    digits = embedded_digits()
    carved = embedded_range(span, len(digits))
    if carved is None:
        raise ConveyorError(f"the embedded digits are used up: spans 1-{span - 1} hold all {len(digits):,} of them; "
                            "add your own data with `conveyor data add-span --from FILES`")
    start, end = carved
    return digits.take(np.arange(start, end)), {"embedded_range": [start, end]}


def shifted(data: ImageSet, *, brightness: float | None = None, imbalance: tuple[int, float] | None = None,
            seed: int = 0) -> ImageSet:
    """A controlled shift, so drift can be shown: pixels scaled by `brightness` (clipped to 0..255), and/or
    the data resampled so class `imbalance[0]` makes up `imbalance[1]` of it."""
    images, labels = data.images, data.labels
    if brightness is not None:
        images = np.clip(images * brightness, 0, 255).astype(np.float32)
    result = ImageSet(images, labels)
    if imbalance is not None:
        label, fraction = imbalance
        if not 0 < fraction < 1:
            raise ConveyorError(f"--imbalance: the fraction must be between 0 and 1 (exclusive), not {fraction}")
        rng = np.random.default_rng(seed)
        chosen = np.flatnonzero(labels == label)
        others = np.flatnonzero(labels != label)
        if len(chosen) == 0:
            raise ConveyorError(f"--imbalance: class {label} does not occur in the new data")
        if len(others) == 0:
            raise ConveyorError(f"--imbalance: the new data holds only class {label}, so it cannot be "
                                f"{fraction:g} of it")
        # The other classes are drawn without repeats, so a small share for the class (fewer of the others
        # to add) shrinks the span instead of failing; the class itself repeats only when it must.
        total = min(len(labels), int(len(others) / (1 - fraction)))
        wanted = int(round(total * fraction))
        index = np.concatenate([rng.choice(chosen, wanted, replace=wanted > len(chosen)),
                                rng.choice(others, total - wanted, replace=False)])
        result = result.take(rng.permutation(index))
    return result


def add_span(data_root: Path, *, image_shape: tuple[int, int], eval_fraction: float, files: list[str] | None = None,
             brightness: float | None = None, imbalance: tuple[int, float] | None = None,
             beam_args: tuple[str, ...] = IN_PROCESS,
             waiting: Callable[[Path], None] | None = say_waiting) -> tuple[int, dict]:
    """Writes the next span (from files, or from the embedded digits' held-back part); returns (span, manifest).
    Files are streamed through the ingestion pipeline; a demo shift (brightness, imbalance) needs the data in
    memory, so it is meant for small data."""
    check_data_root(data_root)
    existing = span_numbers(data_root)
    if not existing:
        raise ConveyorError(f"no span-1 under {data_root} yet; run `make pipeline` (or `conveyor data init`) first")
    reader = None
    if files:  # checked before anything is written
        kind, path = source_of_files(files)
        reader = open_source(kind, path, image_shape)
        provenance = {"source": kind, "path": ",".join(files)}
    _check_free(data_root, existing[-1] + 1)
    with writing_spans(data_root, waiting):
        # The number is chosen under the lock: a concurrent add-span takes the next one.
        existing = span_numbers(data_root)
        if not existing:  # removed meanwhile
            raise ConveyorError(f"no span-1 under {data_root} any more; run `conveyor data init` first")
        span = existing[-1] + 1
        if reader is None:
            data, provenance = embedded_held_back(span)
            provenance = {"source": "sklearn-digits", **provenance}
            reader = ArraySource(data)
        if brightness is not None or imbalance is not None:
            data = shifted(reader.read_all(), brightness=brightness, imbalance=imbalance, seed=span)
            reader = ArraySource(data, provenance["source"])
            provenance["shift"] = {k: v for k, v in (("brightness", brightness), ("imbalance", imbalance))
                                   if v is not None}
        ingest_span(reader, data_root, span, eval_fraction, provenance, _runner_args(reader, beam_args))
    return span, read_manifest(data_root, span)
