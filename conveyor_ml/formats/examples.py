"""The examples every span holds, and how they are read back: tf.Examples with `image` (H*W pixel values,
0..255) and `label` (int64 class). Written by the data layer, read by the components and the server's tools."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import IMAGE_KEY, LABEL_KEY


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # float32 [N, H, W], pixels 0..255
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])


def read_tfrecords(files: list[str], image_shape: tuple[int, int]) -> ImageSet:
    """tf.Examples with `image` (H*W floats) and `label` (int64); gzip is detected by the .gz suffix."""
    import tensorflow as tf

    images, labels = [], []
    expected = image_shape[0] * image_shape[1]
    for name in files:
        compression = "GZIP" if name.endswith(".gz") else ""
        try:
            for record in tf.data.TFRecordDataset(name, compression_type=compression).as_numpy_iterator():
                example = tf.train.Example.FromString(record)
                feature = example.features.feature
                pixels = list(feature[IMAGE_KEY].float_list.value) or list(feature[IMAGE_KEY].int64_list.value)
                if len(pixels) != expected or not feature[LABEL_KEY].int64_list.value:
                    raise ConveyorError(
                        f"data.path: {name}: each example needs '{IMAGE_KEY}' with {expected} values and "
                        f"an int64 '{LABEL_KEY}'")
                images.append(pixels)
                labels.append(feature[LABEL_KEY].int64_list.value[0])
        except tf.errors.DataLossError:
            raise ConveyorError(f"data.path: {name} is not a readable TFRecord file") from None
    return ImageSet(np.asarray(images, np.float32).reshape((-1, *image_shape)), np.asarray(labels, np.int64))


def serialize_example(image: np.ndarray, label: int) -> bytes:
    import tensorflow as tf

    feature = {
        IMAGE_KEY: tf.train.Feature(float_list=tf.train.FloatList(value=image.reshape(-1).tolist())),
        LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
