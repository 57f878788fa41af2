"""The examples every span holds: tf.Examples with `image_raw` (the H*W pixels as raw uint8 bytes, row-major)
and `label` (int64 class). The model decodes `image_raw` inside its input pipeline and its serving signatures.

One byte a pixel instead of the four bytes (and one Python float) a `float_list` took: a 28x28 example is
~830 bytes before gzip instead of ~3.2 KB. Spans written before this format hold `image` as a float (or int64)
list; every reader here and the model's parser accept both.

Encoding and decoding are written against the protobuf wire format directly, so the ingestion workers and
small readers need neither TensorFlow nor a per-example protobuf object; tests check both against
TensorFlow's own tf.train.Example.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import IMAGE_KEY, IMAGE_RAW_KEY, LABEL_KEY
from conveyor_ml.formats.tfrecords import CorruptRecordError, open_records


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # [N, H, W], pixels 0..255 (float32 or uint8)
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s are ten-byte varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@lru_cache(maxsize=4096)
def _frame_parts(pixels: int, label: int) -> tuple[bytes, bytes]:
    """The bytes before and after the pixels of an example with `pixels` bytes of image and this label.
    Example{features(1): Features{feature(1): {key(1), value(2): Feature{bytes_list(1)|int64_list(3)}}}}."""
    label_feature = _field(3, _field(1, _varint(label)))  # Int64List, packed
    label_entry = _field(1, _field(1, LABEL_KEY.encode()) + _field(2, label_feature))
    image_value_head = _varint(1 << 3 | 2) + _varint(pixels)  # BytesList.value, then the pixels
    image_list_len = len(image_value_head) + pixels
    image_feature_head = _varint(1 << 3 | 2) + _varint(image_list_len)  # Feature.bytes_list
    image_feature_len = len(image_feature_head) + image_list_len
    key = _field(1, IMAGE_RAW_KEY.encode())
    value_head = _varint(2 << 3 | 2) + _varint(image_feature_len)
    image_entry_len = len(key) + len(value_head) + image_feature_len
    image_entry_head = _varint(1 << 3 | 2) + _varint(image_entry_len)
    features_len = len(image_entry_head) + image_entry_len + len(label_entry)
    head = (_varint(1 << 3 | 2) + _varint(features_len) + image_entry_head + key + value_head
            + image_feature_head + image_value_head)
    return head, label_entry


def encode_examples(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """Serialized tf.Examples for uint8 images [N, H, W] (or [N, H*W]) and their labels."""
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, not {images.dtype}")
    flat = images.reshape(len(images), -1)
    pixels = flat.shape[1]
    records = []
    for row, label in zip(flat, labels.tolist()):
        head, tail = _frame_parts(pixels, label)
        records.append(head + row.tobytes() + tail)
    return records


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Float pixels 0..255 as the uint8 the examples store (rounded); raises on values outside 0..255."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if images.size and (np.isnan(images).any() or images.min() < -0.5 or images.max() >= 255.5):
        raise ValueError("pixel values must lie in 0..255")
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def serialize_example(image: np.ndarray, label: int) -> bytes:
    """One example as the spans store it (float pixels are rounded to 8 bits)."""
    return encode_examples(to_pixels(image)[None], np.asarray([label]))[0]


# -- decoding -------------------------------------------------------------------------------------------

def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise ValueError("truncated varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of a serialized message: bytes for wire type 2, ints otherwise."""
    position = 0
    while position < len(data):
        key, position = _read_varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _read_varint(data, position)
        elif wire == 2:
            length, position = _read_varint(data, position)
            value = data[position:position + length]
            if len(value) < length:
                raise ValueError("truncated field")
            position += length
        elif wire == 5:
            value = data[position:position + 4]
            position += 4
        elif wire == 1:
            value = data[position:position + 8]
            position += 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _list_values(kind: int, payload: bytes) -> list | np.ndarray:
    """The values of a BytesList (1), FloatList (2) or Int64List (3), packed or not."""
    if kind == 1:
        return [value for number, wire, value in _fields(payload) if number == 1 and wire == 2]
    chunks = []
    for number, wire, value in _fields(payload):
        if number != 1:
            continue
        if kind == 2:
            chunks.append(np.frombuffer(value, "<f4") if wire in (2, 5) else np.empty(0, np.float32))
        elif wire == 2:
            values, position = [], 0
            while position < len(value):
                item, position = _read_varint(value, position)
                values.append(item - (1 << 64) if item >= 1 << 63 else item)
            chunks.append(np.asarray(values, np.int64))
        else:
            chunks.append(np.asarray([value - (1 << 64) if value >= 1 << 63 else value], np.int64))
    return np.concatenate(chunks) if chunks else np.empty(0, np.float32 if kind == 2 else np.int64)


def parse_example(record: bytes) -> dict[str, list | np.ndarray]:
    """{feature name: values} of a serialized tf.Example (bytes features as a list of bytes)."""
    features: dict[str, list | np.ndarray] = {}
    for number, _, features_message in _fields(record):
        if number != 1:
            continue
        for entry_number, _, entry in _fields(features_message):
            if entry_number != 1:
                continue
            name, feature = "", b""
            for field_number, _, value in _fields(entry):
                if field_number == 1:
                    name = value.decode()
                elif field_number == 2:
                    feature = value
            for kind, _, payload in _fields(feature):
                features[name] = _list_values(kind, payload)
    return features


def decode_example(record: bytes, pixels: int) -> tuple[np.ndarray, int]:
    """(uint8 pixels [pixels], label) of a stored example, in this format or the float `image` one before it;
    ValueError says what is wrong with it."""
    try:
        features = parse_example(record)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a tf.Example ({exc})") from None
    label = features.get(LABEL_KEY)
    if label is None or len(label) != 1 or not isinstance(label, np.ndarray) or label.dtype != np.int64:
        raise ValueError(f"needs one int64 '{LABEL_KEY}'")
    raw = features.get(IMAGE_RAW_KEY)
    if isinstance(raw, list) and len(raw) == 1:
        image = np.frombuffer(raw[0], np.uint8)
    elif isinstance(features.get(IMAGE_KEY), np.ndarray):
        image = to_pixels(features[IMAGE_KEY])
    else:
        raise ValueError(f"needs '{IMAGE_RAW_KEY}' (uint8 bytes) or '{IMAGE_KEY}' (a number list)")
    if image.size != pixels:
        raise ValueError(f"has {image.size} pixels, the image shape needs {pixels}")
    return image, int(label[0])


def iter_examples(files: Iterable[str], image_shape: tuple[int, int]) -> Iterator[tuple[np.ndarray, int]]:
    """(uint8 image [H, W], label) of every example in the files, streamed."""
    pixels = image_shape[0] * image_shape[1]
    for name in files:
        try:
            for record in open_records(name):
                try:
                    image, label = decode_example(record, pixels)
                except ValueError as exc:
                    raise ConveyorError(f"{name}: an example {exc}") from None
                yield image.reshape(image_shape), label
        except CorruptRecordError as exc:
            raise ConveyorError(f"{exc}") from None


def read_tfrecords(files: list[str], image_shape: tuple[int, int], limit: int | None = None) -> ImageSet:
    """The first `limit` (default: all) examples of the files as float32 pixels 0..255, for small sets:
    tests, samples. Components stream splits instead."""
    images, labels = [], []
    for image, label in iter_examples(files, image_shape):
        if limit is not None and len(labels) >= limit:
            break
        images.append(image)
        labels.append(label)
    stacked = np.stack(images).astype(np.float32) if images else np.empty((0, *image_shape), np.float32)
    return ImageSet(stacked, np.asarray(labels, np.int64))

