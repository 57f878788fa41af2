"""Data sources read in chunks: every example exactly once whatever the chunking, and one-line errors for
data a user must fix."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.data import sources
from conveyor_ml.formats import tfrecords
from conveyor_ml.formats.examples import encode_examples
from tests.conftest import ROOT


def write_idx(path, array, compress=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def idx_dir(directory, count=30, compress=True, shape=(28, 28)):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, *shape))
    labels = np.arange(count) % 10
    suffix = ".gz" if compress else ""
    write_idx(directory / f"train-images-idx3-ubyte{suffix}", images, compress)
    write_idx(directory / f"train-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


def read_in_chunks(source):
    blocks = [block for chunk in source.chunks() for block in source.read(chunk)]
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


@pytest.mark.parametrize("compress", [True, False])
def test_idx_chunks_cover_every_example_once(tmp_path, monkeypatch, compress):
    images, labels = idx_dir(tmp_path, count=2500, compress=compress)
    monkeypatch.setattr(sources, "BLOCK_EXAMPLES", 300)
    source = sources.open_source("mnist-idx", str(tmp_path), (28, 28))
    assert len(source.chunks()) == 4  # at least four chunks, so two workers share the work
    got_images, got_labels = read_in_chunks(source)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_idx_errors_name_the_problem(tmp_path):
    idx_dir(tmp_path, compress=False)
    with pytest.raises(ConveyorError, match=r"the mnist-idx images are 28x28, the spec says 8x8; set data.image_shape: \[28, 28\]"):
        sources.open_source("mnist-idx", str(tmp_path), (8, 8))
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-100])
    with pytest.raises(ConveyorError, match="is truncated"):
        sources.open_source("mnist-idx", str(tmp_path), (28, 28))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + raw[4:])
    with pytest.raises(ConveyorError, match="not an unsigned-byte IDX file"):
        sources.open_source("mnist-idx", str(tmp_path), (28, 28))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConveyorError, match="holds no MNIST IDX pair"):
        sources.open_source("mnist-idx", str(empty), (28, 28))


def test_idx_labels_outside_the_classes_are_refused_while_reading(tmp_path):
    idx_dir(tmp_path, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(30, 12), compress=False)
    source = sources.open_source("mnist-idx", str(tmp_path), (28, 28))
    with pytest.raises(ConveyorError, match=r"labels outside 0..9 \(e.g. 12\)"):
        read_in_chunks(source)


def test_csv_byte_range_chunks_read_every_row_once(monkeypatch):
    path = ROOT / "tests/fixtures/digits_6x6.csv"
    monkeypatch.setattr(sources.CsvSource, "CHUNK_BYTES", 1000)  # ~40 chunks whose edges fall mid-row
    monkeypatch.setattr(sources.CsvSource, "MIN_CHUNK_BYTES", 1000)
    monkeypatch.setattr(sources, "BLOCK_EXAMPLES", 7)
    source = sources.open_source("csv", str(path), (6, 6))
    assert len(source.chunks()) > 20
    images, labels = read_in_chunks(source)
    rows = np.loadtxt(path, delimiter=",", skiprows=1)
    np.testing.assert_array_equal(labels, rows[:, 0])
    np.testing.assert_array_equal(images.reshape(len(rows), -1), rows[:, 1:])


@pytest.mark.parametrize("body, message", [
    ("label,a,b\n1,2,3\n", "has 2 pixel columns, data.image_shape 6x6 needs 36"),
    ("pixel," * 36 + "x\n", "has no 'label' column"),
])
def test_csv_header_problems(tmp_path, body, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(body)
    with pytest.raises(ConveyorError, match=message):
        sources.open_source("csv", str(bad), (6, 6))


def test_csv_header_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a byte-order mark: the first column is still `label`."""
    path = tmp_path / "excel.csv"
    header = "label," + ",".join(f"p{i}" for i in range(36))
    path.write_bytes(b"\xef\xbb\xbf" + (header + "\n7," + ",".join(["200"] * 36) + "\n3," + ",".join(["0"] * 36)
                                          + "\n").encode())
    images, labels = read_in_chunks(sources.open_source("csv", str(path), (6, 6)))
    assert labels.tolist() == [7, 3]
    assert images.shape == (2, 6, 6) and images[0].min() == 200 and images[1].max() == 0


def test_csv_path_that_is_a_directory_or_a_device_is_one_line(tmp_path):
    (tmp_path / "digits").mkdir()
    with pytest.raises(ConveyorError, match=r"digits is a directory; the csv source reads one \.csv file"):
        sources.open_source("csv", str(tmp_path / "digits"), (6, 6))
    (tmp_path / "zero.csv").symlink_to("/dev/zero")  # endless, and no line break
    with pytest.raises(ConveyorError, match="zero.csv is not a regular file"):
        sources.open_source("csv", str(tmp_path / "zero.csv"), (6, 6))


def test_csv_header_without_a_line_break_is_read_only_so_far(tmp_path, monkeypatch):
    """A file of one endless line is refused after a bounded read, not read whole into memory."""
    monkeypatch.setattr(sources, "MAX_HEADER_BYTES", 1000)
    path = tmp_path / "one-line.csv"
    path.write_bytes(b"label" + b",p" * 100_000)  # 200 KB, no line break
    read = []
    opened = sources._open

    def counting_open(name):
        handle = opened(name)
        original = handle.readline
        handle.readline = lambda *limit: read.append(len(line := original(*limit))) or line
        return handle

    monkeypatch.setattr(sources, "_open", counting_open)
    with pytest.raises(ConveyorError, match="its first line runs past 1,000 bytes without a line break"):
        sources.open_source("csv", str(path), (6, 6))
    assert read == [1001]


@pytest.mark.parametrize("row, message", [
    ("3," + ",".join(["1"] * 35) + ",oops", "is not a row of numbers"),
    ("3," + ",".join(["1"] * 35) + ",300", "pixel values must lie in 0..255"),
    ("11," + ",".join(["1"] * 36), "labels outside 0..9"),
])
def test_csv_rows_are_checked(tmp_path, row, message):
    bad = tmp_path / "bad.csv"
    bad.write_text("label," + ",".join(f"p{i}" for i in range(36)) + "\n" + "1," + ",".join(["0"] * 36) + "\n"
                   + row + "\n")
    source = sources.open_source("csv", str(bad), (6, 6))
    with pytest.raises(ConveyorError, match=message):
        read_in_chunks(source)


def test_tfrecord_source_reads_both_formats_and_refuses_corrupt_files(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 6, 6), dtype=np.uint8)
    new = tmp_path / "new.tfrecord.gz"
    with tfrecords.TFRecordWriter(open(new, "wb")) as writer:
        writer.write_all(encode_examples(images, np.arange(5)))
    old = tmp_path / "old.tfrecord"
    with tf.io.TFRecordWriter(str(old)) as writer:
        for image, label in zip(images, range(5)):
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                "image": tf.train.Feature(float_list=tf.train.FloatList(value=image.reshape(-1).tolist())),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))})).SerializeToString())
    source = sources.open_source("tfrecord", str(tmp_path / "*.tfrecord*"), (6, 6))
    got, labels = read_in_chunks(source)
    np.testing.assert_array_equal(got, np.concatenate([images, images]))
    np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4] * 2)

    with pytest.raises(ConveyorError, match="example 0 has 36 pixels, the image shape needs 64"):
        read_in_chunks(sources.open_source("tfrecord", str(new), (8, 8)))
    (tmp_path / "broken.tfrecord").write_bytes(b"\x00" * 40)
    with pytest.raises(ConveyorError, match="broken.tfrecord is not a readable TFRecord file"):
        read_in_chunks(sources.open_source("tfrecord", str(tmp_path / "broken.tfrecord"), (6, 6)))
    with pytest.raises(ConveyorError, match="no TFRecord file matches"):
        sources.open_source("tfrecord", str(tmp_path / "*.nothing"), (6, 6))


def image_folders(root, count_per_class=3, size=(8, 8)):
    rng = np.random.default_rng(2)
    expected = {}
    for label in (0, 3, 7):
        (root / str(label)).mkdir(parents=True)
        for index in range(count_per_class):
            pixels = rng.integers(0, 256, size, dtype=np.uint8)
            name = root / str(label) / f"img{index}.png"
            Image.fromarray(pixels, mode="L").save(name)
            expected[pixels.tobytes()] = label
    return expected


def test_image_folders_by_class(tmp_path):
    expected = image_folders(tmp_path)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8), mode="RGB").save(tmp_path / "7" / "big.jpg", quality=95)
    (tmp_path / "7" / "notes.txt").write_text("not an image, ignored")
    source = sources.open_source("image-folder", str(tmp_path), (8, 8))
    images, labels = read_in_chunks(source)
    assert len(labels) == 10
    found = {image.tobytes(): label for image, label in zip(images, labels)}
    for pixels, label in expected.items():
        assert found[pixels] == label
    [big] = [image for image, label in zip(images, labels) if image.tobytes() not in expected]
    assert big.shape == (8, 8) and abs(int(big.mean()) - 200) <= 2  # colour JPEG: grayscale, resized
    assert sorted(labels.tolist()) != labels.tolist()  # shuffled, not in class order


def test_image_folder_problems(tmp_path):
    image_folders(tmp_path)
    (tmp_path / "3" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConveyorError, match="broken.png is not a PNG or JPEG image"):
        read_in_chunks(sources.open_source("image-folder", str(tmp_path), (8, 8)))
    (tmp_path / "cat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "cat" / "a.png")
    with pytest.raises(ConveyorError, match="folder named 'cat'"):
        sources.open_source("image-folder", str(tmp_path), (8, 8))


def test_add_span_from_tells_the_format(tmp_path):
    (tmp_path / "idx").mkdir()
    idx_dir(tmp_path / "idx")
    image_folders(tmp_path / "folders")
    assert sources.source_of_files([str(tmp_path / "idx")]) == ("mnist-idx", str(tmp_path / "idx"))
    assert sources.source_of_files([str(tmp_path / "folders")]) == ("image-folder", str(tmp_path / "folders"))
    assert sources.source_of_files(["a.csv"]) == ("csv", "a.csv")
    with pytest.raises(ConveyorError, match="cannot tell the format"):
        sources.source_of_files(["a.parquet"])
