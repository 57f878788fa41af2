"""The digit classifier: a small CNN with its preprocessing inside, and the signatures it is served with.

Every signature returns the same named outputs, computed by the same Keras model, so a client gets the same
numbers whether it sends float pixels, encoded PNG/JPEG bytes or serialized tf.Examples.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from conveyor_ml.base.names import IMAGE_KEY, IMAGE_RAW_KEY, LABEL_KEY, NUM_CLASSES
from conveyor_ml.base.spec import ModelArchitecture

PIXEL_CENTER = 127.5
OUTPUT_KEYS = ("logits", "probabilities", "class_ids")
SIGNATURES = ("serving_default", "bytes_predictor", "serving_examples")
# TF Serving's Classify API: `inputs` (serialized tf.Examples) -> `classes`, `scores`.
CLASSIFICATION_SIGNATURE = "classification"
CLASSIFY_METHOD = "tensorflow/serving/classify"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"


def build_model(image_shape: tuple[int, int], arch: ModelArchitecture) -> tf.keras.Model:
    """Raw pixels in (0..255, [None, H, W]); logits out. Call inside strategy.scope() when distributing."""
    height, width = image_shape
    inputs = tf.keras.Input(shape=(height, width), name="images", dtype=tf.float32)
    x = tf.keras.layers.Rescaling(1.0 / PIXEL_CENTER, offset=-1.0, name="pixels_to_unit_range")(inputs)
    x = tf.keras.layers.Reshape((height, width, 1))(x)
    size = min(height, width)
    for index, filters in enumerate(arch.conv_filters):
        x = tf.keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{index}")(x)
        # Pool only while the feature map is large enough to keep a 2x2 map afterwards.
        if size >= 4:
            x = tf.keras.layers.MaxPooling2D(2, name=f"pool{index}")(x)
            size //= 2
    x = tf.keras.layers.Flatten()(x)
    x = tf.keras.layers.Dense(arch.dense_units, activation="relu")(x)
    if arch.dropout:
        x = tf.keras.layers.Dropout(arch.dropout)(x)
    logits = tf.keras.layers.Dense(NUM_CLASSES, name="logits")(x)
    return tf.keras.Model(inputs, logits, name="digit_cnn")


# The `image` default when an example has none: no pixel is negative, so it marks "absent".
NO_PIXELS = -1.0


def feature_spec(image_shape: tuple[int, int]) -> dict:
    """The stored examples' features: `image_raw` (H*W uint8 bytes) or, in spans written before it and from
    clients that send numbers, `image` (H*W numbers); `label`."""
    pixels = image_shape[0] * image_shape[1]
    return {
        IMAGE_RAW_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
        IMAGE_KEY: tf.io.FixedLenFeature([pixels], tf.float32, default_value=[NO_PIXELS] * pixels),
        LABEL_KEY: tf.io.FixedLenFeature([1], tf.int64),
    }


def parse_examples(serialized: tf.Tensor, image_shape: tuple[int, int], with_labels: bool):
    """Serialized tf.Examples -> float pixels [N, H, W] (0..255) and, when asked, labels [N]. Each example
    carries its pixels as `image_raw` bytes or as an `image` number list; one with neither, or with the
    wrong number of pixels, fails the call with an InvalidArgumentError saying so."""
    pixels = image_shape[0] * image_shape[1]
    spec = feature_spec(image_shape)
    if not with_labels:
        spec.pop(LABEL_KEY)
    parsed = tf.io.parse_example(serialized, spec)
    raw, numbers = parsed[IMAGE_RAW_KEY], parsed[IMAGE_KEY]
    has_raw = tf.strings.length(raw) > 0
    valid = tf.where(has_raw, tf.strings.length(raw) == pixels, numbers[:, 0] != NO_PIXELS)
    checked = tf.debugging.Assert(
        tf.reduce_all(valid), [f"each example needs {IMAGE_RAW_KEY!r} ({pixels} uint8 bytes) or {IMAGE_KEY!r} "
                               f"({pixels} numbers), image shape {image_shape[0]}x{image_shape[1]}"])
    with tf.control_dependencies([checked]):
        filler = tf.fill(tf.shape(raw), tf.constant(bytes(pixels)))
        decoded = tf.cast(tf.io.decode_raw(tf.where(has_raw, raw, filler), tf.uint8), tf.float32)
        images = tf.reshape(tf.where(has_raw[:, None], decoded, numbers), (-1, *image_shape))
    if with_labels:
        return images, tf.squeeze(parsed[LABEL_KEY], axis=1)
    return images


def _outputs(logits: tf.Tensor) -> dict:
    return {
        "logits": logits,
        "probabilities": tf.nn.softmax(logits),
        "class_ids": tf.argmax(logits, axis=1),
    }


def serving_signatures(model: tf.keras.Model, image_shape: tuple[int, int]) -> dict:
    """The concrete functions exported as `serving_default`, `bytes_predictor` and `serving_examples`."""
    height, width = image_shape

    @tf.function(input_signature=[tf.TensorSpec([None, height, width], tf.float32, name="images")])
    def serve_images(images):
        return _outputs(model(images, training=False))

    def decode(encoded):
        image = tf.io.decode_image(encoded, channels=1, expand_animations=False)
        image = tf.image.resize(tf.cast(image, tf.float32), (height, width))
        return tf.squeeze(image, axis=-1)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_image_bytes(image_bytes):
        images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec((height, width), tf.float32))
        return _outputs(model(images, training=False))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(examples):
        return _outputs(model(parse_examples(examples, image_shape, with_labels=False), training=False))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify_examples(inputs):
        probabilities = tf.nn.softmax(model(parse_examples(inputs, image_shape, with_labels=False), training=False))
        names = tf.constant([[str(i) for i in range(NUM_CLASSES)]])
        return {"classes": tf.tile(names, [tf.shape(probabilities)[0], 1]), "scores": probabilities}

    return {
        "serving_default": serve_images.get_concrete_function(),
        "bytes_predictor": serve_image_bytes.get_concrete_function(),
        "serving_examples": serve_examples.get_concrete_function(),
        CLASSIFICATION_SIGNATURE: classify_examples.get_concrete_function(),
    }


def finish_export(export_dir: str, warmup_images: np.ndarray) -> None:
    """Marks the classification signature as TF Serving's classify method (TF2 saves every signature as
    predict) and writes warmup requests, which TF Serving replays before a version serves."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    path = Path(export_dir) / "saved_model.pb"
    saved_model = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    for meta_graph in saved_model.meta_graphs:
        if CLASSIFICATION_SIGNATURE in meta_graph.signature_def:
            meta_graph.signature_def[CLASSIFICATION_SIGNATURE].method_name = CLASSIFY_METHOD
    path.write_bytes(saved_model.SerializeToString())

    warmup = Path(export_dir) / WARMUP_FILE
    warmup.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(warmup)) as writer:
        for batch in (warmup_images[:1], warmup_images):
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = "serving_default"
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(batch.astype(np.float32)))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
