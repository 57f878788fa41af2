"""TensorFlow Serving's own test models, rebuilt by our own generator at test time.

TF Serving's model-server tests (`tensorflow_serving/model_servers/tensorflow_model_server_test.py`) run
against models in `tensorflow_serving/servables/tensorflow/testdata/`, made by its script
`saved_model_half_plus_two.py` and by code inside the test itself. This module is NOT a copy of that
script: it is our own code that builds models with the same graph semantics, tensor names, signature keys,
method names and values, so the ported tests can use upstream's requests and expected values unchanged.

Semantics: y = a*x + b, y2 = a*x + c, y3 = a*x2 + c with a = 0.5, b = 2.0, c = 3.0 (half_plus_three:
b = 3.0); tf.Examples carry `x` (required float [1]) and `x2` (float [1], default 0.0).

| directory (version 00000123) | how | as upstream |
| --- | --- | --- |
| saved_model_half_plus_two_cpu | TF1 graph, SavedModelBuilder | `x` is an Identity of the parsed example whose real shape is looser than its [-1,1] TensorInfo; 5 signatures (predict, classify, 3 regress); assets/foo.txt |
| saved_model_half_plus_three | TF1 graph | 2 signatures, TensorInfos without shapes; the regress signature declares its string input DT_FLOAT (upstream's quirk) |
| saved_model_half_plus_two_tf2_cpu | tf.saved_model.save of a tf.Module | 6 signatures, all with the predict method name |
| saved_model_half_plus_two_tflite | TF1 session -> TFLite | input `x` [1,1], output `y` [1,1], no SignatureDefs |
| saved_model_half_plus_two_tflite_with_sigdef | same, input tensor `tflite_input` | a `signature_defs_metadata` buffer mapping serving_default {x -> tflite_input:0, y -> y:0} |
| tf_saved_model_save | tf.saved_model.save of a tf.train.Checkpoint | y = 3 * 2 * x, input of unknown rank |
| tf_saved_model_save_multiple_signatures | same | serving_default -> y = 1.0, custom_signature_key -> y = 2.0 |
| keras_sequential_saved_model_save | Keras Sequential: Input `x` (1,), Lambda identity `y` | |
| keras_mirrored_saved_model_save | the same with a Dense(1, ones) under MirroredStrategy over 2 virtual CPUs | |

`python -m tests.tf_serving_models DIR` writes them all under DIR (the 2 virtual CPUs must be configured
before TensorFlow starts, so the test session runs this in a child process).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

VERSION = "00000123"
HALF_PLUS_TWO = "saved_model_half_plus_two_cpu"
HALF_PLUS_THREE = "saved_model_half_plus_three"
HALF_PLUS_TWO_TF2 = "saved_model_half_plus_two_tf2_cpu"
HALF_PLUS_TWO_TFLITE = "saved_model_half_plus_two_tflite"
HALF_PLUS_TWO_TFLITE_WITH_SIGDEF = "saved_model_half_plus_two_tflite_with_sigdef"
TF_SAVED_MODEL_SAVE = "tf_saved_model_save"
TF_SAVED_MODEL_SAVE_MULTIPLE_SIGNATURES = "tf_saved_model_save_multiple_signatures"
KERAS_SEQUENTIAL = "keras_sequential_saved_model_save"
KERAS_MIRRORED = "keras_mirrored_saved_model_save"

ASSET_NAME = "foo.txt"
ASSET_CONTENT = "asset-file-contents"
SIGNATURE_DEFS_METADATA = "signature_defs_metadata"  # the TFLite metadata entry TF Serving reads

v1 = tf.compat.v1
PREDICT, CLASSIFY, REGRESS = (v1.saved_model.PREDICT_METHOD_NAME, v1.saved_model.CLASSIFY_METHOD_NAME,
                              v1.saved_model.REGRESS_METHOD_NAME)


def _tensor_info(tensor: tf.Tensor, with_shape: bool = True):
    info = v1.saved_model.build_tensor_info(tensor)
    if not with_shape:
        info.ClearField("tensor_shape")
    return info


def _signature(inputs: dict, outputs: dict, method: str, with_shapes: bool = True):
    signature = meta_graph_pb2.SignatureDef()
    for key, tensor in inputs.items():
        signature.inputs[key].CopyFrom(_tensor_info(tensor, with_shapes))
    for key, tensor in outputs.items():
        signature.outputs[key].CopyFrom(_tensor_info(tensor, with_shapes))
    signature.method_name = method
    return signature


def _asset(scratch: Path) -> tf.Tensor:
    """A string constant naming the asset file, registered as an asset of the graph being built."""
    original = scratch / ASSET_NAME
    original.parent.mkdir(parents=True, exist_ok=True)
    original.write_text(ASSET_CONTENT)
    path = tf.constant(str(original), name="Const")
    v1.add_to_collection(v1.GraphKeys.ASSET_FILEPATHS, path)
    return path


def _save_tf1(session, export_dir: Path, signatures: dict, init_op) -> None:
    builder = v1.saved_model.Builder(str(export_dir))
    builder.add_meta_graph_and_variables(
        session, [v1.saved_model.SERVING], signature_def_map=signatures,
        assets_collection=v1.get_collection(v1.GraphKeys.ASSET_FILEPATHS), main_op=init_op, strip_default_attrs=True)
    builder.save()


def _parse_examples(serialized: tf.Tensor, with_x2: bool = True) -> dict:
    features = {"x": v1.FixedLenFeature([1], tf.float32)}  # no default: required
    if with_x2:
        features["x2"] = v1.FixedLenFeature([1], tf.float32, default_value=[0.0])
    parsed = v1.parse_example(serialized, features)
    for value in parsed.values():
        value.set_shape([None, 1])  # static shape only, as upstream's graph records it
    return parsed


def write_half_plus_two_tf1(export_dir: Path, scratch: Path) -> Path:
    """saved_model_half_plus_two_cpu: TF1 graph; `x` is an Identity, so a client may feed any shape."""
    with tf.Graph().as_default():
        a, b, c = (v1.Variable(value, name=name, use_resource=False)
                   for value, name in ((0.5, "a"), (2.0, "b"), (3.0, "c")))
        # Copies of a and c for y3, as upstream has them (so no optimizer fuses the three paths).
        a2, c2 = (v1.Variable(value, name=name, use_resource=False) for value, name in ((0.5, "a2"), (3.0, "c2")))
        serialized = v1.placeholder(tf.string, name="tf_example")  # unknown rank, as upstream's
        parsed = _parse_examples(serialized)
        x = tf.identity(parsed["x"], name="x")
        x2 = tf.identity(parsed["x2"], name="x2")
        y = tf.identity(a * x + b, name="y")
        y2 = tf.identity(a * x + c, name="y2")
        y3 = tf.identity(a2 * x2 + c2, name="y3")
        _asset(scratch / "half_plus_two")
        filename = v1.Variable("", name="filename_tensor", trainable=False, collections=[], use_resource=False)
        init_op = tf.group(filename.assign(ASSET_NAME))
        signatures = {
            "serving_default": _signature({"x": x}, {"y": y}, PREDICT),
            "classify_x_to_y": _signature({"inputs": serialized}, {"scores": y}, CLASSIFY),
            "regress_x_to_y": _signature({"inputs": serialized}, {"outputs": y}, REGRESS),
            "regress_x_to_y2": _signature({"inputs": serialized}, {"outputs": y2}, REGRESS),
            "regress_x2_to_y3": _signature({"inputs": x2}, {"outputs": y3}, REGRESS),
        }
        with v1.Session() as session:
            session.run(v1.variables_initializer([a, b, c, a2, c2]))
            _save_tf1(session, export_dir, signatures, init_op)
    return export_dir


def write_half_plus_three_tf1(export_dir: Path, scratch: Path) -> Path:
    """saved_model_half_plus_three: y = 0.5 * x + 3; TensorInfos carry no shapes."""
    with tf.Graph().as_default():
        a, b, c = (v1.Variable(value, name=name, use_resource=False)
                   for value, name in ((0.5, "a"), (3.0, "b"), (3.0, "c")))
        serialized = v1.placeholder(tf.string, name="tf_example")
        x = tf.identity(_parse_examples(serialized, with_x2=False)["x"], name="x")
        y = tf.add(a * x, b, name="y")
        regressed = tf.identity(y, name="Identity")
        x2 = v1.placeholder(tf.float32, shape=[], name="x2")
        tf.add(a * x2, c, name="y2")
        _asset(scratch / "half_plus_three")
        filename = v1.Variable("", name="filename_tensor", trainable=False, collections=[], use_resource=False)
        init_op = tf.group(filename.assign(ASSET_NAME))
        regress = _signature({"inputs": serialized}, {"outputs": regressed}, REGRESS, with_shapes=False)
        regress.inputs["inputs"].dtype = tf.float32.as_datatype_enum  # upstream's file declares it so
        signatures = {
            "serving_default": _signature({"x": x}, {"y": y}, PREDICT, with_shapes=False),
            REGRESS: regress,
        }
        with v1.Session() as session:
            session.run(v1.variables_initializer([a, b, c]))
            _save_tf1(session, export_dir, signatures, init_op)
    return export_dir


class _HalfPlusTwo(tf.Module):
    """The TF2 model: every signature is a tf.function, so all carry the predict method name."""

    def __init__(self, asset_file: Path):
        super().__init__()
        self.a = tf.Variable(0.5, name="a")
        self.b = tf.Variable(2.0, name="b")
        self.c = tf.Variable(3.0, name="c")
        self.asset = tf.saved_model.Asset(str(asset_file))

    def _parse(self, serialized):
        features = {"x": tf.io.FixedLenFeature([1], tf.float32),
                    "x2": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0])}
        return tf.io.parse_example(serialized, features)

    @tf.function(input_signature=[tf.TensorSpec([1], tf.float32, name="x")])
    def predict(self, x):
        return {"y": self.a * x + self.b}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress_x_to_y(self, inputs):
        return {"outputs": self.a * self._parse(inputs)["x"] + self.b}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress_x_to_y2(self, inputs):
        return {"outputs": self.a * self._parse(inputs)["x"] + self.c}

    @tf.function(input_signature=[tf.TensorSpec([1], tf.float32, name="inputs")])
    def regress_x2_to_y3(self, inputs):
        return {"outputs": self.a * inputs + self.c}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify_x_to_y(self, inputs):
        return {"scores": self.a * self._parse(inputs)["x"] + self.b}

    @tf.function(input_signature=[tf.TensorSpec([1], tf.float32, name="inputs")])
    def classify_x2_to_y3(self, inputs):
        return {"scores": self.a * inputs + self.c}


def write_half_plus_two_tf2(export_dir: Path, scratch: Path) -> Path:
    original = scratch / "half_plus_two_tf2" / ASSET_NAME
    original.parent.mkdir(parents=True, exist_ok=True)
    original.write_text(ASSET_CONTENT)
    module = _HalfPlusTwo(original)
    tf.saved_model.save(module, str(export_dir), signatures={
        "serving_default": module.predict.get_concrete_function(),
        "regress_x_to_y": module.regress_x_to_y.get_concrete_function(),
        "regress_x_to_y2": module.regress_x_to_y2.get_concrete_function(),
        "regress_x2_to_y3": module.regress_x2_to_y3.get_concrete_function(),
        "classify_x_to_y": module.classify_x_to_y.get_concrete_function(),
        "classify_x2_to_y3": module.classify_x2_to_y3.get_concrete_function(),
    })
    # Upstream's serving_default has SignatureDef.defaults {x: [0.0]} (a Python default argument, which
    # the TF that wrote it recorded and TF 2.16 does not): written into saved_model.pb directly.
    path = export_dir / "saved_model.pb"
    saved_model = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    for meta_graph in saved_model.meta_graphs:
        meta_graph.signature_def["serving_default"].defaults["x"].CopyFrom(
            tf.make_tensor_proto([0.0], dtype=tf.float32, shape=[1]))
    path.write_bytes(saved_model.SerializeToString())
    return export_dir


def _half_plus_two_tflite(input_name: str) -> tuple[bytes, object]:
    """The TF1 half_plus_two graph with a static [1,1] input, converted from its session; also returns
    the predict SignatureDef written against the TF tensors (for the metadata variant)."""
    with tf.Graph().as_default():
        a, b = (v1.Variable(value, name=name, use_resource=False) for value, name in ((0.5, "a"), (2.0, "b")))
        serialized = v1.placeholder(tf.string, name="tf_example")
        # The TF1 converter needs static shapes, hence ensure_shape on the parsed value.
        x = tf.ensure_shape(_parse_examples(serialized, with_x2=False)["x"], (1, 1), name=input_name)
        y = tf.identity(a * x + b, name="y")
        signature = _signature({"x": x}, {"y": y}, PREDICT)
        with v1.Session() as session:
            session.run(v1.variables_initializer([a, b]))
            converter = v1.lite.TFLiteConverter.from_session(session, [x], [y])
            return converter.convert(), signature


def _with_signature_defs_metadata(model: bytes, signature_defs: dict) -> bytes:
    """`model` plus a `signature_defs_metadata` buffer: a FlexBuffer map of key -> serialized SignatureDef,
    the layout TFLite's signature_def_util writes and TF Serving's TfLiteSession reads."""
    from flatbuffers import flexbuffers
    from tensorflow.lite.tools import flatbuffer_utils

    builder = flexbuffers.Builder()
    with builder.Map():
        for key, signature in sorted(signature_defs.items()):
            builder.Key(key)
            # A FlexBuffer string holding the raw proto bytes (they need not be UTF-8).
            builder._WriteBlob(signature.SerializeToString(), append_zero=True, type_=flexbuffers.Type.STRING)
    data = bytes(builder.Finish())
    schema = flatbuffer_utils.schema_fb
    parsed = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    buffer = schema.BufferT()
    buffer.data = list(data)
    parsed.buffers.append(buffer)
    metadata = schema.MetadataT()
    metadata.name = SIGNATURE_DEFS_METADATA
    metadata.buffer = len(parsed.buffers) - 1
    parsed.metadata = (parsed.metadata or []) + [metadata]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(parsed))


def write_half_plus_two_tflite(export_dir: Path, with_signature_defs: bool) -> Path:
    model, signature = _half_plus_two_tflite("tflite_input" if with_signature_defs else "x")
    if with_signature_defs:
        model = _with_signature_defs_metadata(model, {"serving_default": signature})
    export_dir.mkdir(parents=True, exist_ok=True)
    (export_dir / "model.tflite").write_bytes(model)
    return export_dir


def write_tf_saved_model_save(export_dir: Path) -> Path:
    """upstream's test_tf_saved_model_save model: y = v1 * v2 * x = 6x, any input shape."""
    root = tf.train.Checkpoint()
    root.v1 = tf.Variable(3.0)
    root.v2 = tf.Variable(2.0)
    root.f = tf.function(lambda x: {"y": root.v1 * root.v2 * x})
    tf.saved_model.save(root, str(export_dir), root.f.get_concrete_function(tf.TensorSpec(None, tf.float32)))
    return export_dir


def write_tf_saved_model_save_multiple_signatures(export_dir: Path) -> Path:
    """upstream's test_tf_saved_model_save_multiple_signatures model: constant outputs per signature."""
    root = tf.train.Checkpoint()
    root.f = tf.function(lambda x: {"y": 1.0}, input_signature=[tf.TensorSpec(None, tf.float32)])
    root.g = tf.function(lambda x: {"y": 2.0}, input_signature=[tf.TensorSpec(None, tf.float32)])
    tf.saved_model.save(root, str(export_dir), signatures={"serving_default": root.f, "custom_signature_key": root.g})
    return export_dir


def write_keras_sequential(export_dir: Path) -> Path:
    """upstream's test_sequential_keras_saved_model_save model: input `x` (1,), identity output `y`."""
    model = tf.keras.models.Sequential([
        tf.keras.layers.InputLayer(dtype="float32", input_shape=(1,), name="x"),
        tf.keras.layers.Lambda(lambda x: x, name="y"),
    ])
    tf.saved_model.save(model, str(export_dir))
    return export_dir


def write_keras_mirrored(export_dir: Path) -> Path:
    """upstream's test_distrat_sequential_keras_saved_model_save model, built under MirroredStrategy over
    two virtual CPUs (configured by `main` before TensorFlow starts): Dense(1, ones, zeros) then identity."""
    strategy = tf.distribute.MirroredStrategy(devices=("/cpu:0", "/cpu:1"))
    with strategy.scope():
        model = tf.keras.models.Sequential([
            tf.keras.layers.InputLayer(dtype="float32", input_shape=(1,), name="x"),
            tf.keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros"),
            tf.keras.layers.Lambda(lambda x: x, name="y"),
        ])
    tf.saved_model.save(model, str(export_dir))
    return export_dir


def write_all(root: Path) -> dict[str, Path]:
    """Every model as <root>/<name>/00000123 (upstream's version directory); returns {name: base path}."""
    scratch = root / ".originals"
    writers = {
        HALF_PLUS_TWO: lambda d: write_half_plus_two_tf1(d, scratch),
        HALF_PLUS_THREE: lambda d: write_half_plus_three_tf1(d, scratch),
        HALF_PLUS_TWO_TF2: lambda d: write_half_plus_two_tf2(d, scratch),
        HALF_PLUS_TWO_TFLITE: lambda d: write_half_plus_two_tflite(d, with_signature_defs=False),
        HALF_PLUS_TWO_TFLITE_WITH_SIGDEF: lambda d: write_half_plus_two_tflite(d, with_signature_defs=True),
        TF_SAVED_MODEL_SAVE: write_tf_saved_model_save,
        TF_SAVED_MODEL_SAVE_MULTIPLE_SIGNATURES: write_tf_saved_model_save_multiple_signatures,
        KERAS_SEQUENTIAL: write_keras_sequential,
        KERAS_MIRRORED: write_keras_mirrored,
    }
    for name, write in writers.items():
        write(root / name / VERSION)
    return {name: root / name for name in writers}


def main(argv: list[str]) -> int:
    [cpu] = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    write_all(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
