"""Data sources and spans: counts, the deterministic split, file formats and their errors."""
import gzip
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

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


# -- robustness: killed and concurrent writers, damaged data roots ---------------------------------------

# A child that starts writing span 2 from a source that never ends, so it can be killed mid-write.
ENDLESS_WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from conveyor_ml.data import datasets
from conveyor_ml.data.ingestion import ingest_span
from conveyor_ml.data.sources import ArraySource

class Endless(ArraySource):
    def read(self, chunk):
        yield from super().read(chunk)
        time.sleep(600)

ingest_span(Endless(datasets.embedded_digits().take(np.arange(40))), Path(sys.argv[1]), 2, 0.2, {})
"""

# A child that adds a span from a CSV once the file sys.argv[3] exists, its reading slowed down so two such
# children overlap.
SLOW_ADD_SPAN = """
import sys, time
from pathlib import Path
from conveyor_ml.data import datasets, sources

read = sources.CsvSource.read
def slow(self, chunk):
    time.sleep(1.5)
    yield from read(self, chunk)
sources.CsvSource.read = slow
Path(sys.argv[3] + ".ready-" + sys.argv[4]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.01)
span, manifest = datasets.add_span(Path(sys.argv[1]), image_shape=(6, 6), eval_fraction=0.25, files=[sys.argv[2]])
print(span, manifest["span"])
"""


def _child(script: str, *args) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment)


def _wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("command", ["add_span", "init_data"])
def test_the_staging_of_a_killed_writer_is_removed_by_the_next_command(tmp_path, command):
    datasets.init_data("sklearn-digits", None, (8, 8), tmp_path, 0.2)
    writer = _child(ENDLESS_WRITER, tmp_path)
    staging = tmp_path / f".span-2.tmp-{writer.pid}"
    _wait_for(lambda: (staging / "train").is_dir() and any((staging / "train").iterdir()))
    writer.kill()  # SIGKILL: no clean-up runs
    writer.wait()
    assert staging.is_dir()
    alive = _child("import time; time.sleep(600)")
    try:
        running = tmp_path / f".span-5.tmp-{alive.pid}"  # a writer that still runs keeps its staging
        running.mkdir()
        kept = [tmp_path / ".span-2.tmp-x1", tmp_path / ".span-notes"]  # no pid: not staging
        for path in kept:
            path.mkdir()
        if command == "add_span":
            assert datasets.add_span(tmp_path, image_shape=(8, 8), eval_fraction=0.2)[0] == 2
        else:
            assert datasets.init_data("sklearn-digits", None, (8, 8), tmp_path, 0.2) == (1, False)
        assert not staging.exists()
        assert running.is_dir() and all(path.is_dir() for path in kept)
    finally:
        alive.kill()
        alive.wait()


def test_concurrent_add_spans_take_consecutive_numbers(tmp_path):
    data_root = tmp_path / "data"
    datasets.init_data("csv", str(ROOT / "tests/fixtures/digits_6x6.csv"), (6, 6), data_root, 0.25)
    go = tmp_path / "go"
    children = [_child(SLOW_ADD_SPAN, data_root, ROOT / "tests/fixtures/digits_6x6.csv", go, i) for i in range(2)]
    _wait_for(lambda: all(Path(f"{go}.ready-{i}").exists() for i in range(2)))
    go.touch()
    results = [child.communicate(timeout=120) for child in children]
    assert [child.returncode for child in children] == [0, 0], [err[-2000:] for _, err in results]
    assert sorted(out.strip() for out, _ in results) == ["2 2", "3 3"]
    waited = [err for _, err in results if "conveyor: waiting for" in err]
    assert len(waited) == 1 and waited[0].count("conveyor: waiting for") == 1, [err for _, err in results]
    assert f"{data_root}/.conveyor.lock: another conveyor command is writing a span there" in waited[0]
    assert datasets.span_numbers(data_root) == [1, 2, 3]
    assert sorted(p.name for p in data_root.iterdir()) == [".conveyor.lock", "span-1", "span-2", "span-3"]
    for span in (2, 3):
        assert sum(datasets.read_manifest(data_root, span)["examples"].values()) == 400


def test_an_incomplete_span_is_named_with_how_to_fix_it(tmp_path):
    datasets.init_data("sklearn-digits", None, (8, 8), tmp_path / "a", 0.2)
    (tmp_path / "a" / "span-2" / "train").mkdir(parents=True)  # a copy interrupted before its span.json
    with pytest.raises(ConveyorError) as raised:
        datasets.add_span(tmp_path / "a", image_shape=(8, 8), eval_fraction=0.2)
    assert str(raised.value) == (
        f"data: {tmp_path}/a/span-2 is an incomplete span (no span.json: an interrupted copy, or made by hand); "
        "remove it, or complete it (train/, eval/ and span.json as `conveyor data` writes them), then run the "
        "command again")
    (tmp_path / "b" / "span-1").mkdir(parents=True)
    with pytest.raises(ConveyorError, match=r"b/span-1 is an incomplete span \(no span.json"):
        datasets.init_data("sklearn-digits", None, (8, 8), tmp_path / "b", 0.2)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["span-1"]  # nothing written


def test_what_blocks_the_next_span_is_named(tmp_path):
    datasets.init_data("sklearn-digits", None, (8, 8), tmp_path, 0.2)
    (tmp_path / "span-2").symlink_to(tmp_path / "gone")
    with pytest.raises(ConveyorError, match=r"span-2 is a dangling symbolic link \(to .*gone\); remove it"):
        datasets.add_span(tmp_path, image_shape=(8, 8), eval_fraction=0.2)
    (tmp_path / "span-2").unlink()
    (tmp_path / "span-2").write_text("notes")
    with pytest.raises(ConveyorError, match="span-2 is a file, not a span; move or remove it"):
        datasets.add_span(tmp_path, image_shape=(8, 8), eval_fraction=0.2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".conveyor.lock", "span-1", "span-2"]


def test_a_span_name_with_leading_zeros_is_refused_by_its_real_name(tmp_path):
    datasets.init_data("sklearn-digits", None, (8, 8), tmp_path, 0.2)
    datasets.add_span(tmp_path, image_shape=(8, 8), eval_fraction=0.2)
    (tmp_path / "span-2").rename(tmp_path / "span-03")
    message = (f"data: {tmp_path}/span-03 is not a span name Conveyor reads (span-N, N without leading zeros); "
               "rename it to span-3 (if that name is free) or remove it")
    with pytest.raises(ConveyorError) as raised:
        datasets.add_span(tmp_path, image_shape=(8, 8), eval_fraction=0.2)
    assert str(raised.value) == message
    with pytest.raises(ConveyorError) as raised:
        datasets.init_data("sklearn-digits", None, (8, 8), tmp_path, 0.2)
    assert str(raised.value) == message


def test_a_data_root_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises(ConveyorError, match=r"data: .*/data is a file, but spans are written into a directory"):
        datasets.init_data("sklearn-digits", None, (8, 8), tmp_path / "data", 0.2)


def test_a_csv_source_that_is_a_directory_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "csvs").mkdir()
    with pytest.raises(ConveyorError, match="csvs is a directory; the csv source reads one .csv file"):
        datasets.init_data("csv", str(tmp_path / "csvs"), (6, 6), tmp_path / "data", 0.2)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("content, problem", [
    ('{"span": 2, "examples": {"tra', "not valid JSON"),
    ("[2]", "not a span manifest (a JSON list, not an object)"),
])
def test_a_damaged_manifest_names_its_file(tmp_path, content, problem):
    datasets.init_data("sklearn-digits", None, (8, 8), tmp_path, 0.2)
    (tmp_path / "span-1" / "span.json").write_text(content)
    with pytest.raises(ConveyorError) as raised:
        datasets.read_manifest(tmp_path, 1)
    assert str(raised.value).startswith(f"{tmp_path}/span-1/span.json: {problem}")
    assert str(raised.value).endswith("the span is damaged: restore its directory from a backup, or remove the "
                                      "directory (and add the data again with `conveyor data add-span`)")
