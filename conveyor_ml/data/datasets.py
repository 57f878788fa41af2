"""Data sources and spans: reads images from the embedded digits or files, writes immutable TFRecord spans.

A span is `<data_root>/span-N/` with `train/` and `eval/` TFRecord files of tf.Examples
(`image`: H*W float pixels in 0..255, `label`: int64 class) and a `span.json` manifest.
ImportExampleGen reads them with the `span-{SPAN}` pattern.
"""
from __future__ import annotations

import csv
import glob
import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from conveyor_ml.base.clock import utc_now
from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import LABEL_KEY, NUM_CLASSES
from conveyor_ml.formats.examples import ImageSet, read_tfrecords, serialize_example
from conveyor_ml.formats.spans import MANIFEST, read_manifest, span_dir, span_numbers

# The embedded default keeps most of the 1,797 digits back, so `data add-span --embedded` has genuinely unseen
# examples to offer as new data, and span 1 is small enough that more data visibly helps: the 8x8 CNN's
# accuracy on held-out digits climbs from about 0.967 on span 1's 400 training examples to 0.98 on 600 and
# 0.987 on 1,000 (600 steps). Spans 2-5 hold 250 digits each, span 6 the last 297; then they are used up.
EMBEDDED_INITIAL_EXAMPLES = 500
EMBEDDED_CHUNK = 250


def embedded_digits() -> ImageSet:
    """scikit-learn's 1,797 8x8 digits, shuffled once with a fixed seed, pixels scaled 0..16 -> 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(20240601).permutation(len(digits.target))
    images = (digits.images[order] * (255.0 / 16.0)).astype(np.float32)
    return ImageSet(images, digits.target[order].astype(np.int64))


def read_source(source: str, path: str | None, image_shape: tuple[int, int]) -> ImageSet:
    """Reads a whole data source; the shape must match the spec's image_shape."""
    if source == "sklearn-digits":
        data = embedded_digits()
    elif source == "csv":
        data = _read_csv(_existing(path), image_shape)
    elif source == "mnist-idx":
        data = _read_idx_dir(_existing(path))
    elif source == "tfrecord":
        data = read_tfrecords(_matching_files(path), image_shape)
    else:
        raise ConveyorError(f"data.source: unknown source {source!r} (use sklearn-digits, tfrecord, csv or mnist-idx)")
    if tuple(data.images.shape[1:]) != tuple(image_shape):
        h, w = data.images.shape[1:]
        raise ConveyorError(
            f"data.image_shape: the {source} images are {h}x{w}, the spec says "
            f"{image_shape[0]}x{image_shape[1]}; set data.image_shape: [{h}, {w}]")
    _check_labels(data.labels, source)
    return data


def _existing(path: str | None) -> Path:
    if not path:
        raise ConveyorError("data.path: required for file sources (a file or directory to read)")
    resolved = Path(path)
    if not resolved.exists():
        raise ConveyorError(f"data.path: no such file or directory: {path}")
    return resolved


def _matching_files(pattern: str | None) -> list[str]:
    if not pattern:
        raise ConveyorError("data.path: required for the tfrecord source (a file or glob)")
    files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise ConveyorError(f"data.path: no TFRecord file matches {pattern}")
    return files


def _check_labels(labels: np.ndarray, source: str) -> None:
    if len(labels) == 0:
        raise ConveyorError(f"data: the {source} source holds no examples")
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if len(bad):
        raise ConveyorError(f"data: the {source} source has labels outside 0..9 (e.g. {int(bad[0])})")


def _read_csv(path: Path, image_shape: tuple[int, int]) -> ImageSet:
    """A header row with a `label` column; every other column is one pixel, row-major."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise ConveyorError(f"data.path: {path} is empty") from None
        if LABEL_KEY not in header:
            raise ConveyorError(f"data.path: {path} has no 'label' column in its header row")
        label_col = header.index(LABEL_KEY)
        pixel_cols = [i for i in range(len(header)) if i != label_col]
        expected = image_shape[0] * image_shape[1]
        if len(pixel_cols) != expected:
            raise ConveyorError(
                f"data.path: {path} has {len(pixel_cols)} pixel columns, data.image_shape "
                f"{image_shape[0]}x{image_shape[1]} needs {expected}")
        labels, pixels = [], []
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                labels.append(int(row[label_col]))
                pixels.append([float(row[i]) for i in pixel_cols])
            except (ValueError, IndexError):
                raise ConveyorError(f"data.path: {path}:{line_number}: not a row of numbers") from None
    images = np.asarray(pixels, dtype=np.float32).reshape((-1, *image_shape))
    return ImageSet(images, np.asarray(labels, dtype=np.int64))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConveyorError(f"data.path: {path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ConveyorError(f"data.path: {path} is truncated ({body.size} of {int(np.prod(dims))} values)")
    return body.reshape(dims)


def _read_idx_dir(directory: Path) -> ImageSet:
    """MNIST's IDX files (train-* and t10k-*, optionally gzipped) from one directory."""
    image_sets = []
    for prefix in ("train", "t10k"):
        images = sorted(directory.glob(f"{prefix}-images*idx3-ubyte*"))
        labels = sorted(directory.glob(f"{prefix}-labels*idx1-ubyte*"))
        if images and labels:
            pixels, classes = _read_idx(images[0]), _read_idx(labels[0])
            if len(pixels) != len(classes):
                raise ConveyorError(f"data.path: {images[0].name} and {labels[0].name} differ in length")
            image_sets.append(ImageSet(pixels.astype(np.float32), classes.astype(np.int64)))
    if not image_sets:
        raise ConveyorError(
            f"data.path: {directory} holds no MNIST IDX pair (train-images-idx3-ubyte[.gz] + "
            "train-labels-idx1-ubyte[.gz])")
    return ImageSet(np.concatenate([s.images for s in image_sets]),
                    np.concatenate([s.labels for s in image_sets]))


def write_span(data_root: Path, span: int, data: ImageSet, eval_fraction: float, provenance: dict) -> Path:
    """Writes span-N atomically (temp dir + rename) with a deterministic train/eval split; refuses to overwrite."""
    import tensorflow as tf

    target = span_dir(data_root, span)
    if target.exists():
        raise ConveyorError(f"span {span} already exists at {target}; spans are immutable, add a new one")
    if len(data) < 2:
        raise ConveyorError(f"span {span}: needs at least 2 examples, got {len(data)}")
    data_root.mkdir(parents=True, exist_ok=True)
    staging = data_root / f".span-{span}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    order = np.random.default_rng(span).permutation(len(data))
    n_eval = max(1, int(round(len(data) * eval_fraction)))
    splits = {"eval": data.take(order[:n_eval]), "train": data.take(order[n_eval:])}
    try:
        for split, subset in splits.items():
            (staging / split).mkdir(parents=True)
            options = tf.io.TFRecordOptions(compression_type="GZIP")
            with tf.io.TFRecordWriter(str(staging / split / "data.tfrecord.gz"), options) as writer:
                for image, label in zip(subset.images, subset.labels):
                    writer.write(serialize_example(image, int(label)))
        manifest = {
            "span": span,
            "created": utc_now(),
            "examples": {split: len(subset) for split, subset in splits.items()},
            "image_shape": list(data.images.shape[1:]),
            "label_counts": np.bincount(data.labels, minlength=NUM_CLASSES).tolist(),
            **provenance,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def init_data(source: str, path: str | None, image_shape: tuple[int, int], data_root: Path,
              eval_fraction: float) -> tuple[int, bool]:
    """Writes span-1 from the spec's source unless a span exists. Returns (latest span, written now?)."""
    existing = span_numbers(data_root)
    if existing:
        return existing[-1], False
    data = read_source(source, path, image_shape)
    provenance = {"source": source, "path": path}
    if source == "sklearn-digits":
        data = data.take(np.arange(EMBEDDED_INITIAL_EXAMPLES))
        provenance["embedded_range"] = [0, EMBEDDED_INITIAL_EXAMPLES]
    write_span(data_root, 1, data, eval_fraction, provenance)
    return 1, True


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
        rng = np.random.default_rng(seed)
        chosen = np.flatnonzero(labels == label)
        others = np.flatnonzero(labels != label)
        if len(chosen) == 0:
            raise ConveyorError(f"--imbalance: class {label} does not occur in the new data")
        wanted = int(round(len(labels) * fraction))
        index = np.concatenate([rng.choice(chosen, wanted, replace=True),
                                rng.choice(others, len(labels) - wanted, replace=False)])
        result = result.take(rng.permutation(index))
    return result


def source_of_files(paths: list[str]) -> tuple[str, str]:
    """(source kind, path or glob) for `data add-span --from`: by extension, or a directory of IDX files."""
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return "mnist-idx", paths[0]
    kinds = {"csv" if p.endswith(".csv") else "tfrecord" if ".tfrecord" in p or p.endswith(".gz") else "?" for p in paths}
    if kinds == {"csv"} and len(paths) == 1:
        return "csv", paths[0]
    if kinds == {"tfrecord"}:
        return "tfrecord", paths[0] if len(paths) == 1 else "{" + ",".join(paths) + "}"
    raise ConveyorError(f"--from: cannot tell the format of {', '.join(paths)}; give one .csv file, .tfrecord(.gz) "
                        "files, or a directory with MNIST IDX files")


def add_span(data_root: Path, *, image_shape: tuple[int, int], eval_fraction: float, files: list[str] | None = None,
             brightness: float | None = None, imbalance: tuple[int, float] | None = None) -> tuple[int, dict]:
    """Writes the next span (from files, or from the embedded digits' held-back part); returns (span, manifest)."""
    existing = span_numbers(data_root)
    if not existing:
        raise ConveyorError(f"no span-1 under {data_root} yet; run `make pipeline` (or `conveyor data init`) first")
    span = existing[-1] + 1
    if files:
        source, path = source_of_files(files)
        data = (read_tfrecords([str(_existing(f)) for f in files], image_shape) if source == "tfrecord"
                else read_source(source, path, image_shape))
        provenance = {"source": source, "path": ",".join(files)}
    else:
        data, provenance = embedded_held_back(span)
        provenance = {"source": "sklearn-digits", **provenance}
    if brightness is not None or imbalance is not None:
        data = shifted(data, brightness=brightness, imbalance=imbalance, seed=span)
        provenance["shift"] = {k: v for k, v in (("brightness", brightness), ("imbalance", imbalance)) if v is not None}
    write_span(data_root, span, data, eval_fraction, provenance)
    return span, read_manifest(data_root, span)
