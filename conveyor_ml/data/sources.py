"""Data sources, read in chunks: each source splits itself into small picklable chunk descriptions up front
(checking what can be checked without reading the data), and reads one chunk at a time as uint8 image blocks.

The ingestion pipeline (data/ingestion.py) hands the chunks to Beam workers, so a source of any size is read
in parallel with memory bounded by one block per worker. Paths go through Beam's FileSystems, so the same
source reads local files here and gs:// objects on Dataflow.

Sources: `mnist-idx` (a directory of MNIST IDX files), `csv` (a `label` column and one column per pixel),
`tfrecord` (tf.Examples with `image_raw` bytes or an `image` number list, and `label`), `image-folder`
(`<dir>/<class>/*.png|jpg`) and in-memory image sets (the embedded digits, shifted data).
"""
from __future__ import annotations

import gzip
import io
import math
import os
import posixpath
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import LABEL_KEY, NUM_CLASSES
from conveyor_ml.formats.examples import ImageSet, decode_example, to_pixels
from conveyor_ml.formats.tfrecords import CorruptRecordError, read_records

SOURCES = ("sklearn-digits", "tfrecord", "csv", "mnist-idx", "image-folder")
# Pixels per chunk: a chunk becomes one shard per split, so 28x28 images give shards of 20,000 examples.
CHUNK_PIXELS = 16_000_000
# Examples per block a worker holds at once.
BLOCK_EXAMPLES = 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The longest CSV header row read: 14 bytes a column for 1024x1024 images.
MAX_HEADER_BYTES = 16 * 2**20

Block = tuple[np.ndarray, np.ndarray]  # uint8 images [n, H, W], int64 labels [n]


def _filesystems():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def _open(path: str) -> BinaryIO:
    from apache_beam.io.filesystem import CompressionTypes

    return _filesystems().open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _open_maybe_gzipped(path: str) -> BinaryIO:
    stream = _open(path)
    return gzip.GzipFile(fileobj=stream, mode="rb") if path.endswith(".gz") else stream


def _listing(pattern: str) -> list[tuple[str, int]]:
    """(path, size) of the files matching a glob, sorted."""
    [result] = _filesystems().match([pattern])
    return sorted((m.path, m.size_in_bytes) for m in result.metadata_list)


def _is_directory(path: str) -> bool:
    """A local directory, or an object-store prefix with objects under it."""
    if "://" not in path:
        return os.path.isdir(path)
    return bool(_listing(posixpath.join(path.rstrip("/"), "**")))


def _exists(path: str) -> bool:
    return _filesystems().exists(path)


def _check_regular_file(path: str, kind: str, wanted: str) -> None:
    """Refuses a local directory, device or pipe where a source reads a file (object stores hold files)."""
    if "://" in path or os.path.isfile(path):
        return
    what = "a directory" if os.path.isdir(path) else "not a regular file (a device, a pipe or a socket)"
    raise ConveyorError(f"data.path: {path} is {what}; the {kind} source reads {wanted}")


def check_labels(labels: np.ndarray, where: str) -> None:
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if len(bad):
        raise ConveyorError(f"data: {where} has labels outside 0..{NUM_CLASSES - 1} (e.g. {int(bad[0])})")


def chunk_examples(image_shape: tuple[int, int], total: int | None = None) -> int:
    """Examples per chunk: ~16 M pixels, and at least four chunks of a known total, so two workers share it."""
    per_chunk = max(1000, CHUNK_PIXELS // (image_shape[0] * image_shape[1]))
    return per_chunk if total is None else max(1, min(per_chunk, math.ceil(total / 4)))


class Source:
    """A data source: `chunks()` describes the work, `read(chunk)` yields its blocks; both raise ConveyorError
    for data a user must fix."""

    kind: str
    image_shape: tuple[int, int]

    def chunks(self) -> list:
        raise NotImplementedError

    def read(self, chunk) -> Iterator[Block]:
        raise NotImplementedError

    def read_all(self) -> ImageSet:
        """The whole source in memory: for small sources (the embedded digits, shifted demo spans, tests)."""
        blocks = [block for chunk in self.chunks() for block in self.read(chunk)]
        if not blocks:
            return ImageSet(np.empty((0, *self.image_shape), np.uint8), np.empty(0, np.int64))
        return ImageSet(np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks]))


def _checked_shape(kind: str, height: int, width: int, image_shape: tuple[int, int]) -> None:
    if (height, width) != tuple(image_shape):
        raise ConveyorError(
            f"data.image_shape: the {kind} images are {height}x{width}, the spec says "
            f"{image_shape[0]}x{image_shape[1]}; set data.image_shape: [{height}, {width}]")


# -- in memory -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Range:
    index: int
    start: int
    stop: int


class ArraySource(Source):
    """Images already in memory (float 0..255 or uint8)."""

    def __init__(self, data: ImageSet, kind: str = "sklearn-digits"):
        self.kind = kind
        self.image_shape = tuple(data.images.shape[1:3])
        try:
            self.images = to_pixels(data.images)
        except ValueError as exc:
            raise ConveyorError(f"data: the {kind} images: {exc}") from None
        self.labels = np.asarray(data.labels, np.int64)
        check_labels(self.labels, f"the {kind} source")

    def chunks(self) -> list[_Range]:
        size = chunk_examples(self.image_shape, len(self.labels))
        return [_Range(i, start, min(start + size, len(self.labels)))
                for i, start in enumerate(range(0, len(self.labels), size))]

    def read(self, chunk: _Range) -> Iterator[Block]:
        yield self.images[chunk.start:chunk.stop], self.labels[chunk.start:chunk.stop]


# -- MNIST IDX -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _IdxRange:
    index: int
    images: str
    labels: str
    header: tuple[int, int]  # header bytes of the image and the label file
    start: int
    stop: int


def _idx_header(path: str) -> tuple[tuple[int, ...], int]:
    """(dims, header length) of an unsigned-byte IDX file."""
    with _open_maybe_gzipped(path) as handle:
        head = handle.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
            raise ConveyorError(f"data.path: {path} is not an unsigned-byte IDX file")
        ndim = head[3]
        raw_dims = handle.read(4 * ndim)
        if len(raw_dims) < 4 * ndim:
            raise ConveyorError(f"data.path: {path} is truncated (in its header)")
    return struct.unpack(f">{ndim}I", raw_dims), 4 + 4 * ndim


class IdxSource(Source):
    """MNIST's IDX files (train-* and t10k-*, optionally gzipped) from one directory."""

    kind = "mnist-idx"

    def __init__(self, directory: str, image_shape: tuple[int, int]):
        self.directory, self.image_shape = directory.rstrip("/"), tuple(image_shape)
        files = [path for path, _ in _listing(posixpath.join(self.directory, "*"))]
        self.pairs: list[tuple[str, str, tuple[int, int], int, dict[str, int]]] = []
        for prefix in ("train", "t10k"):
            images = sorted(p for p in files if posixpath.basename(p).startswith(f"{prefix}-images")
                            and "idx3-ubyte" in p)
            labels = sorted(p for p in files if posixpath.basename(p).startswith(f"{prefix}-labels")
                            and "idx1-ubyte" in p)
            if not (images and labels):
                continue
            sizes = dict(_listing(images[0]) + _listing(labels[0]))
            (count, height, width), image_header = self._dims(images[0], 3)
            (label_count,), label_header = self._dims(labels[0], 1)
            if count != label_count:
                raise ConveyorError(f"data.path: {posixpath.basename(images[0])} and "
                                    f"{posixpath.basename(labels[0])} differ in length")
            _checked_shape(self.kind, height, width, self.image_shape)
            for path, header, body in ((images[0], image_header, count * height * width),
                                       (labels[0], label_header, count)):
                if not path.endswith(".gz") and sizes[path] < header + body:
                    raise ConveyorError(f"data.path: {path} is truncated ({sizes[path] - header} of {body} values)")
            self.pairs.append((images[0], labels[0], (image_header, label_header), count, sizes))
        if not self.pairs:
            raise ConveyorError(
                f"data.path: {directory} holds no MNIST IDX pair (train-images-idx3-ubyte[.gz] + "
                "train-labels-idx1-ubyte[.gz])")

    @staticmethod
    def _dims(path: str, ndim: int) -> tuple[tuple[int, ...], int]:
        dims, header = _idx_header(path)
        if len(dims) != ndim:
            raise ConveyorError(f"data.path: {path} has {len(dims)} dimensions, an IDX "
                                f"{'image' if ndim == 3 else 'label'} file has {ndim}")
        return dims, header

    @property
    def total(self) -> int:
        return sum(pair[3] for pair in self.pairs)

    def chunks(self) -> list[_IdxRange]:
        size = chunk_examples(self.image_shape, self.total)
        chunks = []
        for images, labels, header, count, _ in self.pairs:
            for start in range(0, count, size):
                chunks.append(_IdxRange(len(chunks), images, labels, header, start, min(start + size, count)))
        return chunks

    def read(self, chunk: _IdxRange) -> Iterator[Block]:
        pixels = self.image_shape[0] * self.image_shape[1]
        with _open_maybe_gzipped(chunk.images) as images, _open_maybe_gzipped(chunk.labels) as labels:
            # A gzipped file seeks by decompressing up to the offset; plain files seek directly.
            images.seek(chunk.header[0] + chunk.start * pixels)
            labels.seek(chunk.header[1] + chunk.start)
            for start in range(chunk.start, chunk.stop, BLOCK_EXAMPLES):
                count = min(BLOCK_EXAMPLES, chunk.stop - start)
                image_bytes, label_bytes = images.read(count * pixels), labels.read(count)
                if len(image_bytes) < count * pixels or len(label_bytes) < count:
                    raise ConveyorError(f"data.path: {chunk.images} is truncated (at example {start})")
                block_labels = np.frombuffer(label_bytes, np.uint8).astype(np.int64)
                check_labels(block_labels, chunk.labels)
                yield np.frombuffer(image_bytes, np.uint8).reshape(count, *self.image_shape), block_labels


# -- CSV -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _ByteRange:
    index: int
    start: int
    stop: int


class CsvSource(Source):
    """A header row with a `label` column; every other column is one pixel (0..255), row-major. Chunks are
    byte ranges: a row belongs to the chunk it starts in."""

    kind = "csv"
    CHUNK_BYTES, MIN_CHUNK_BYTES = 32 * 2**20, 2**20

    def __init__(self, path: str, image_shape: tuple[int, int]):
        self.path, self.image_shape = path, tuple(image_shape)
        _check_regular_file(path, self.kind, "one .csv file (mnist-idx and image-folder read directories)")
        with _open(path) as handle:
            # Bounded: a file without a line break (or /dev/zero behind a link) must not fill the memory.
            first = handle.readline(MAX_HEADER_BYTES + 1)
        if len(first) > MAX_HEADER_BYTES:
            raise ConveyorError(f"data.path: {path}: its first line runs past {MAX_HEADER_BYTES:,} bytes "
                                "without a line break; a CSV source starts with a header row (label, then one "
                                "column per pixel) ending in a line break")
        if not first.strip():
            raise ConveyorError(f"data.path: {path} is empty")
        self.header_bytes = len(first)
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name.
        header = [name.strip() for name in first.decode("utf-8-sig", errors="replace").split(",")]
        if LABEL_KEY not in header:
            raise ConveyorError(f"data.path: {path} has no 'label' column in its header row")
        self.label_column = header.index(LABEL_KEY)
        self.pixel_columns = [i for i in range(len(header)) if i != self.label_column]
        expected = self.image_shape[0] * self.image_shape[1]
        if len(self.pixel_columns) != expected:
            raise ConveyorError(
                f"data.path: {path} has {len(self.pixel_columns)} pixel columns, data.image_shape "
                f"{self.image_shape[0]}x{self.image_shape[1]} needs {expected}")
        [(_, self.size)] = _listing(path)

    def chunks(self) -> list[_ByteRange]:
        body = self.size - self.header_bytes
        size = max(self.MIN_CHUNK_BYTES, min(self.CHUNK_BYTES, math.ceil(body / 4)))
        return [_ByteRange(i, start, min(start + size, self.size))
                for i, start in enumerate(range(self.header_bytes, self.size, size))]

    def _rows(self, chunk: _ByteRange) -> Iterator[tuple[int, bytes]]:
        with _open(self.path) as handle:
            position = chunk.start
            handle.seek(position)
            if position > self.header_bytes:
                handle.seek(position - 1)  # a row starts here only if the byte before ends one
                position += len(handle.readline()) - 1
            while position < chunk.stop:
                line = handle.readline()
                if not line:
                    return
                yield position, line
                position += len(line)

    def read(self, chunk: _ByteRange) -> Iterator[Block]:
        rows: list[tuple[int, bytes]] = []
        for row in self._rows(chunk):
            if row[1].strip():
                rows.append(row)
            if len(rows) == BLOCK_EXAMPLES:
                yield self._parse(rows)
                rows = []
        if rows:
            yield self._parse(rows)

    def _parse(self, rows: list[tuple[int, bytes]]) -> Block:
        try:
            values = np.loadtxt([line.decode() for _, line in rows], delimiter=",", dtype=np.float64, ndmin=2)
        except (ValueError, UnicodeDecodeError):
            offset = next((o for o, line in rows if not _is_number_row(line)), rows[0][0])
            raise ConveyorError(f"data.path: {self.path}: the row at byte {offset} is not a row of numbers") from None
        if values.shape[1] != len(self.pixel_columns) + 1:
            raise ConveyorError(f"data.path: {self.path}: rows near byte {rows[0][0]} have {values.shape[1]} "
                                f"columns, the header has {len(self.pixel_columns) + 1}")
        labels = values[:, self.label_column]
        if (labels != np.round(labels)).any():
            raise ConveyorError(f"data.path: {self.path}: labels must be integers (near byte {rows[0][0]})")
        labels = labels.astype(np.int64)
        check_labels(labels, self.path)
        try:
            images = to_pixels(values[:, self.pixel_columns])
        except ValueError:
            raise ConveyorError(f"data.path: {self.path}: pixel values must lie in 0..255 "
                                f"(rows near byte {rows[0][0]})") from None
        return images.reshape(len(rows), *self.image_shape), labels


def _is_number_row(line: bytes) -> bool:
    try:
        [float(value) for value in line.split(b",")]
        return True
    except ValueError:
        return False


# -- TFRecord --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _File:
    index: int
    path: str


class TfrecordSource(Source):
    """TFRecord files of tf.Examples (`image_raw` uint8 bytes or an `image` number list, and an int64
    `label`); gzip is detected by its magic bytes. One chunk per file."""

    kind = "tfrecord"

    def __init__(self, files: list[str], image_shape: tuple[int, int]):
        self.files, self.image_shape = list(files), tuple(image_shape)

    def chunks(self) -> list[_File]:
        return [_File(i, path) for i, path in enumerate(self.files)]

    def read(self, chunk: _File) -> Iterator[Block]:
        pixels = self.image_shape[0] * self.image_shape[1]
        with _open(chunk.path) as raw:
            magic = raw.read(2)
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw
            images, labels = [], []
            try:
                for number, record in enumerate(read_records(stream, chunk.path)):
                    try:
                        image, label = decode_example(record, pixels)
                    except ValueError as exc:
                        raise ConveyorError(
                            f"data.path: {chunk.path}: example {number} {exc} (image_shape "
                            f"{self.image_shape[0]}x{self.image_shape[1]})") from None
                    images.append(image)
                    labels.append(label)
                    if len(labels) == BLOCK_EXAMPLES:
                        yield self._block(images, labels, chunk.path)
                        images, labels = [], []
            except (CorruptRecordError, OSError, EOFError) as exc:
                raise ConveyorError(f"data.path: {chunk.path} is not a readable TFRecord file ({exc})") from None
            if labels:
                yield self._block(images, labels, chunk.path)

    def _block(self, images: list, labels: list, path: str) -> Block:
        block_labels = np.asarray(labels, np.int64)
        check_labels(block_labels, path)
        return np.stack(images).reshape(len(labels), *self.image_shape), block_labels


# -- image folders ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Files:
    index: int
    paths: tuple[str, ...]
    labels: tuple[int, ...]


class ImageFolderSource(Source):
    """`<dir>/<class>/*.png|jpg|jpeg`, class folders named 0..9. Images are read as grayscale; one of another
    size is resized (bilinear) to data.image_shape, as the `image_bytes` serving signature resizes. The
    file list is shuffled with a fixed seed, so shards are not sorted by class."""

    kind = "image-folder"
    CHUNK_FILES = 5000

    def __init__(self, directory: str, image_shape: tuple[int, int]):
        self.directory, self.image_shape = directory.rstrip("/"), tuple(image_shape)
        paths, labels = [], []
        for path, _ in _listing(posixpath.join(self.directory, "*", "*")):
            folder = posixpath.basename(posixpath.dirname(path))
            if not path.lower().endswith(IMAGE_SUFFIXES):
                continue
            if not folder.isdigit() or not 0 <= int(folder) < NUM_CLASSES:
                raise ConveyorError(f"data.path: {directory} holds images in a folder named {folder!r}; "
                                    f"image folders are named by their class, 0..{NUM_CLASSES - 1}")
            paths.append(path)
            labels.append(int(folder))
        if not paths:
            raise ConveyorError(f"data.path: {directory} holds no class folders of images "
                                f"(<dir>/<class 0..9>/*.png|jpg)")
        order = np.random.default_rng(0).permutation(len(paths))
        self.paths = [paths[i] for i in order]
        self.labels = [labels[i] for i in order]

    def chunks(self) -> list[_Files]:
        size = max(1, min(self.CHUNK_FILES, math.ceil(len(self.paths) / 4)))
        return [_Files(i, tuple(self.paths[start:start + size]), tuple(self.labels[start:start + size]))
                for i, start in enumerate(range(0, len(self.paths), size))]

    def read(self, chunk: _Files) -> Iterator[Block]:
        from PIL import Image, UnidentifiedImageError

        height, width = self.image_shape
        for start in range(0, len(chunk.paths), BLOCK_EXAMPLES):
            paths = chunk.paths[start:start + BLOCK_EXAMPLES]
            images = np.empty((len(paths), height, width), np.uint8)
            for row, path in enumerate(paths):
                with _open(path) as handle:
                    content = handle.read()
                try:
                    image = Image.open(io.BytesIO(content))
                    image = image.convert("L")
                except (UnidentifiedImageError, OSError):
                    raise ConveyorError(f"data.path: {path} is not a PNG or JPEG image") from None
                if image.size != (width, height):
                    image = image.resize((width, height), Image.BILINEAR)
                images[row] = np.asarray(image, np.uint8)
            yield images, np.asarray(chunk.labels[start:start + BLOCK_EXAMPLES], np.int64)


# -- choosing a source -----------------------------------------------------------------------------------

def _matching_files(pattern: str | None) -> list[str]:
    if not pattern:
        raise ConveyorError("data.path: required for the tfrecord source (a file or glob)")
    patterns = pattern[1:-1].split(",") if pattern.startswith("{") and pattern.endswith("}") else [pattern]
    files = [path for p in patterns for path, _ in _listing(p) if not path.endswith("/")]
    if not files:
        raise ConveyorError(f"data.path: no TFRecord file matches {pattern}")
    return files


def _existing(path: str | None) -> str:
    if not path:
        raise ConveyorError("data.path: required for file sources (a file or directory to read)")
    if not _exists(path):
        raise ConveyorError(f"data.path: no such file or directory: {path}")
    return path


def open_source(kind: str, path: str | None, image_shape: tuple[int, int]) -> Source:
    """The source a spec (or `data add-span --from`) names, checked as far as it can be without reading it."""
    if kind == "csv":
        return CsvSource(_existing(path), image_shape)
    if kind == "mnist-idx":
        return IdxSource(_existing(path), image_shape)
    if kind == "image-folder":
        return ImageFolderSource(_existing(path), image_shape)
    if kind == "tfrecord":
        return TfrecordSource(_matching_files(path), image_shape)
    raise ConveyorError(f"data.source: unknown source {kind!r} (use {', '.join(SOURCES)})")


def source_of_files(paths: list[str]) -> tuple[str, str]:
    """(source kind, path or glob) for `data add-span --from`: by extension, or by what a directory holds."""
    if len(paths) == 1 and _exists(paths[0]) and _is_directory(paths[0]):
        names = [posixpath.basename(p) for p, _ in _listing(posixpath.join(paths[0].rstrip("/"), "*"))]
        if any("idx3-ubyte" in name for name in names):
            return "mnist-idx", paths[0]
        return "image-folder", paths[0]
    kinds = {"csv" if p.endswith(".csv") else "tfrecord" if ".tfrecord" in p or p.endswith(".gz") else "?" for p in paths}
    if kinds == {"csv"} and len(paths) == 1:
        return "csv", paths[0]
    if kinds == {"tfrecord"}:
        for path in paths:
            _existing(path)
        return "tfrecord", paths[0] if len(paths) == 1 else "{" + ",".join(paths) + "}"
    raise ConveyorError(f"--from: cannot tell the format of {', '.join(paths)}; give one .csv file, .tfrecord(.gz) "
                        "files, a directory with MNIST IDX files, or a directory of class folders of images")
