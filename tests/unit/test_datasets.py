"""Data sources and spans: counts, the deterministic split, file formats and their errors."""
import gzip
import json
import struct

import numpy as np
import pytest

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.data import datasets
from conveyor_ml.formats.examples import read_tfrecords
from tests.conftest import ROOT


def read_split(span_path, split):
    return read_tfrecords([str(p) for p in sorted((span_path / split).iterdir())], (8, 8))


def test_embedded_digits_are_real_scaled_digits():
    digits = datasets.embedded_digits()
    assert digits.images.shape == (1797, 8, 8)
    assert digits.images.min() == 0 and digits.images.max() == pytest.approx(255.0)
    assert sorted(set(digits.labels.tolist())) == list(range(10))


def test_init_writes_span_one_with_a_deterministic_split(tmp_path):
    latest, written = datasets.init_data("sklearn-digits", None, (8, 8), tmp_path / "a", 0.2)
    assert (latest, written) == (1, True)
    manifest = datasets.read_manifest(tmp_path / "a", 1)
    assert sum(manifest["examples"].values()) == datasets.EMBEDDED_INITIAL_EXAMPLES == 500
    assert 0.17 < manifest["examples"]["eval"] / datasets.EMBEDDED_INITIAL_EXAMPLES < 0.23  # eval_fraction 0.2
    assert sum(manifest["label_counts"]) == datasets.EMBEDDED_INITIAL_EXAMPLES
    assert manifest["encoding"]["feature"] == "image_raw"

    train = read_split(tmp_path / "a" / "span-1", "train")
    evaluation = read_split(tmp_path / "a" / "span-1", "eval")
    assert (len(train), len(evaluation)) == (manifest["examples"]["train"], manifest["examples"]["eval"])
    assert train.images.max() <= 255.0 and train.images.shape[1:] == (8, 8)
    # Every example is one of the first EMBEDDED_INITIAL_EXAMPLES digits, with its label, pixels rounded to 8 bits.
    digits = datasets.embedded_digits().take(np.arange(datasets.EMBEDDED_INITIAL_EXAMPLES))
    originals = {np.rint(image).astype(np.uint8).tobytes(): label for image, label in zip(digits.images, digits.labels)}
    for image, label in zip(np.concatenate([train.images, evaluation.images]),
                            np.concatenate([train.labels, evaluation.labels])):
        assert originals[image.astype(np.uint8).tobytes()] == label

    datasets.init_data("sklearn-digits", None, (8, 8), tmp_path / "b", 0.2)
    again = read_split(tmp_path / "b" / "span-1", "eval")
    np.testing.assert_array_equal(evaluation.images, again.images)
    np.testing.assert_array_equal(evaluation.labels, again.labels)


def test_embedded_spans_carve_every_digit_once_then_refuse(tmp_path):
    datasets.init_data("sklearn-digits", None, (8, 8), tmp_path, 0.2)
    for _ in range(5):
        datasets.add_span(tmp_path, image_shape=(8, 8), eval_fraction=0.2)
    ranges = [datasets.read_manifest(tmp_path, span)["embedded_range"] for span in range(1, 7)]
    assert ranges == [[0, 500], [500, 750], [750, 1000], [1000, 1250], [1250, 1500], [1500, 1797]]
    counts = [datasets.read_manifest(tmp_path, span)["examples"] for span in range(1, 7)]
    assert [c["train"] + c["eval"] for c in counts] == [500, 250, 250, 250, 250, 297]
    assert all(0.1 < c["eval"] / (c["train"] + c["eval"]) < 0.3 for c in counts)  # eval_fraction 0.2, by hash
    with pytest.raises(ConveyorError, match="the embedded digits are used up: spans 1-6 hold all 1,797"):
        datasets.add_span(tmp_path, image_shape=(8, 8), eval_fraction=0.2)
    assert datasets.span_numbers(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_init_is_a_no_op_when_spans_exist(tmp_path):
    datasets.init_data("sklearn-digits", None, (8, 8), tmp_path, 0.2)
    assert datasets.init_data("sklearn-digits", None, (8, 8), tmp_path, 0.2) == (1, False)


def test_spans_are_immutable_and_temp_dirs_are_not_spans(tmp_path):
    data = datasets.embedded_digits().take(np.arange(20))
    datasets.write_span(tmp_path, 1, data, 0.2, {})
    with pytest.raises(ConveyorError, match="spans are immutable"):
        datasets.write_span(tmp_path, 1, data, 0.2, {})
    (tmp_path / ".span-2.tmp-123").mkdir()
    (tmp_path / "span-3").mkdir()  # no manifest: an interrupted copy, not a span
    assert datasets.span_numbers(tmp_path) == [1]


def test_csv_source_reads_the_fixture():
    data = datasets.read_source("csv", str(ROOT / "tests/fixtures/digits_6x6.csv"), (6, 6))
    assert data.images.shape == (400, 6, 6)
    assert data.labels.dtype == np.int64


def test_csv_with_wrong_column_count_names_the_shape(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("label,a,b\n1,2,3\n")
    with pytest.raises(ConveyorError, match="has 2 pixel columns, data.image_shape 6x6 needs 36"):
        datasets.read_source("csv", str(bad), (6, 6))


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_source(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(30, 28, 28))
    labels = np.arange(30) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    data = datasets.read_source("mnist-idx", str(tmp_path), (28, 28))
    np.testing.assert_array_equal(data.images, images.astype(np.float32))
    np.testing.assert_array_equal(data.labels, labels)
    with pytest.raises(ConveyorError, match="the mnist-idx images are 28x28, the spec says 8x8"):
        datasets.read_source("mnist-idx", str(tmp_path), (8, 8))


def test_tfrecord_source_round_trips_a_span(tmp_path):
    data = datasets.embedded_digits().take(np.arange(50))
    datasets.write_span(tmp_path, 1, data, 0.2, {})
    again = datasets.read_source("tfrecord", str(tmp_path / "span-1" / "*" / "*.gz"), (8, 8))
    assert len(again) == 50
    assert sorted(again.labels.tolist()) == sorted(data.labels.tolist())


@pytest.mark.parametrize("source, path, message", [
    ("csv", "/nonexistent/file.csv", "data.path: no such file or directory"),
    ("tfrecord", "/nonexistent/*.tfrecord", "no TFRecord file matches"),
    ("mnist-idx", None, "data.path: required"),
])
def test_missing_files_are_user_errors(source, path, message):
    with pytest.raises(ConveyorError, match=message):
        datasets.read_source(source, path, (8, 8))


def test_manifest_records_provenance(tmp_path):
    datasets.init_data("csv", str(ROOT / "tests/fixtures/digits_6x6.csv"), (6, 6), tmp_path, 0.25)
    manifest = json.loads((tmp_path / "span-1" / "span.json").read_text())
    assert manifest["source"] == "csv" and manifest["path"].endswith("digits_6x6.csv")
    assert sum(manifest["examples"].values()) == 400 and manifest["image_shape"] == [6, 6]


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
def test_imbalance_makes_the_class_that_share_at_any_fraction(fraction):
    from conveyor_ml.data.datasets import embedded_digits, shifted

    data = embedded_digits().take(np.arange(1200, 1500))  # 300 of the digits, class 3 about 10%
    result = shifted(data, imbalance=(3, fraction), seed=2)
    share = float(np.mean(result.labels == 3))
    assert abs(share - fraction) < 0.01, share
    assert 250 <= len(result) <= len(data)  # a small share drops some of the others instead of failing
    others = result.images[result.labels != 3].reshape(-1, 64)
    assert len(np.unique(others, axis=0)) == len(others)  # the other classes are never repeated
