"""The stored example format and the TFRecord framing, checked against TensorFlow's own implementations."""
from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
import tensorflow as tf

from conveyor_ml.formats import examples, tfrecords


def tf_example(**features) -> bytes:
    def feature(values):
        if isinstance(values, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[values]))
        values = np.asarray(values)
        if values.dtype.kind == "f":
            return tf.train.Feature(float_list=tf.train.FloatList(value=values.reshape(-1).tolist()))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values.reshape(-1).tolist()))

    return tf.train.Example(features=tf.train.Features(
        feature={name: feature(values) for name, values in features.items()})).SerializeToString()


def test_encoded_examples_are_the_tf_examples_tensorflow_reads():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 9, 127, 128, 300])  # one- and two-byte varints
    for record, image, label in zip(examples.encode_examples(images, labels), images, labels):
        parsed = tf.train.Example.FromString(record).features.feature
        assert set(parsed) == {"image_raw", "label"}
        assert parsed["image_raw"].bytes_list.value == [image.tobytes()]
        assert parsed["label"].int64_list.value == [label]


def test_decoding_reads_the_new_and_the_float_list_format():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    for record in (examples.serialize_example(image, 4),
                   tf_example(image=image.astype(np.float32), label=[4]),
                   tf_example(image=image.astype(np.int64), label=[4])):
        pixels, label = examples.decode_example(record, 64)
        np.testing.assert_array_equal(pixels, image.reshape(-1))
        assert label == 4


@pytest.mark.parametrize("record, message", [
    (tf_example(image=np.zeros(10, np.float32), label=[1]), "has 10 pixels, the image shape needs 64"),
    (tf_example(image_raw=bytes(64)), "needs one int64 'label'"),
    (tf_example(label=[3]), "needs 'image_raw'"),
    (b"\x0a\x05abc", "not a tf.Example"),
], ids=["float pixels, wrong count", "no label", "no image_raw", "not a proto"])  # serialized maps vary in order
def test_malformed_examples_say_what_is_wrong(record, message):
    with pytest.raises(ValueError, match=message):
        examples.decode_example(record, 64)


def test_float_pixels_are_rounded_and_out_of_range_ones_refused():
    np.testing.assert_array_equal(examples.to_pixels(np.array([0.4, 15.94, 254.6])), [0, 16, 255])
    with pytest.raises(ValueError, match="0..255"):
        examples.to_pixels(np.array([1.0, 300.0]))
    with pytest.raises(ValueError, match="0..255"):
        examples.to_pixels(np.array([np.nan]))


def test_tfrecord_files_round_trip_with_tensorflow(tmp_path):
    records = [bytes([i]) * i for i in range(1, 40)]
    ours = tmp_path / "ours.tfrecord.gz"
    with tfrecords.TFRecordWriter(open(ours, "wb")) as writer:
        writer.write_all(records[:20])
        for record in records[20:]:
            writer.write(record)
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(ours), compression_type="GZIP")] == records
    theirs = tmp_path / "theirs.tfrecord"
    with tf.io.TFRecordWriter(str(theirs)) as writer:
        for record in records:
            writer.write(record)
    assert list(tfrecords.open_records(str(theirs))) == records
    assert list(tfrecords.open_records(str(ours))) == records


def test_corrupt_and_truncated_records_are_detected(tmp_path):
    framed = tfrecords.frame(b"hello world")
    flipped = framed[:14] + bytes([framed[14] ^ 1]) + framed[15:]
    with pytest.raises(tfrecords.CorruptRecordError, match="bad data checksum"):
        list(tfrecords.read_records(io.BytesIO(flipped)))
    with pytest.raises(tfrecords.CorruptRecordError, match="truncated"):
        list(tfrecords.read_records(io.BytesIO(framed[:-2])))
    not_records = tmp_path / "notes.txt.gz"
    not_records.write_bytes(gzip.compress(b"just some text, long enough for a header"))
    with pytest.raises(tfrecords.CorruptRecordError, match="not a TFRecord file"):
        list(tfrecords.open_records(str(not_records)))
