"""One loaded model version (a "servable" in TF Serving's words): its signatures and how to run them."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from conveyor_ml.serving.errors import ServingError, invalid_argument

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
DEFAULT_SIGNATURE = "serving_default"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"


class IncompleteModelError(Exception):
    """A version directory that is not (yet) a complete SavedModel."""


def read_signature_defs(export_dir: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The `serve` MetaGraph's SignatureDefs, read from saved_model.pb without loading the model."""
    path = Path(export_dir) / "saved_model.pb"
    if not path.is_file():
        raise IncompleteModelError(f"{export_dir} has no saved_model.pb (not a complete SavedModel)")
    saved_model = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise IncompleteModelError(f"{export_dir} has no MetaGraph tagged 'serve'")


def _expected_shape(tensor_info) -> list[int] | None:
    if tensor_info.tensor_shape.unknown_rank:
        return None
    return [dim.size for dim in tensor_info.tensor_shape.dim]


def _shape_text(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class Servable:
    """A SavedModel version loaded with tf.saved_model.load; thread-safe to call."""

    def __init__(self, model_name: str, version: int, export_dir: Path):
        self.model_name = model_name
        self.version = version
        self.export_dir = Path(export_dir)
        self.signature_defs = read_signature_defs(self.export_dir)
        started = time.perf_counter()
        self._loaded = tf.saved_model.load(str(self.export_dir), tags=["serve"])
        self._functions = dict(self._loaded.signatures)
        self.load_seconds = time.perf_counter() - started

    def signature(self, name: str) -> tuple[str, meta_graph_pb2.SignatureDef]:
        name = name or DEFAULT_SIGNATURE
        if name not in self.signature_defs or name not in self._functions:
            raise invalid_argument(f'Serving signature name: "{name}" not found in signature def')
        return name, self.signature_defs[name]

    def input_dtypes(self, signature_name: str) -> dict[str, tf.DType]:
        _, signature = self.signature(signature_name)
        return {key: tf.dtypes.as_dtype(info.dtype) for key, info in signature.inputs.items()}

    def validate_inputs(self, signature_name: str, inputs: dict[str, np.ndarray]) -> str:
        """Checks input names and shapes against the signature; returns the signature's resolved name."""
        name, signature = self.signature(signature_name)
        self._check_inputs(signature, inputs)
        return name

    def predict(self, signature_name: str, inputs: dict[str, np.ndarray],
                output_filter: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        name, signature = self.signature(signature_name)
        self._check_inputs(signature, inputs)
        outputs = self._run(name, signature, inputs)
        if output_filter:
            unknown = [key for key in output_filter if key not in outputs]
            if unknown:
                raise invalid_argument(
                    f"output tensor alias not found in signature: {unknown[0]} Outputs expected to be in the "
                    f"set {{{','.join(sorted(signature.outputs))}}}.")
            outputs = {key: outputs[key] for key in output_filter}
        return outputs

    def classify(self, signature_name: str, examples: list[bytes]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(classes [N, K] bytes or None, scores [N, K] float or None), TF Serving's classification contract."""
        name, signature = self._method_signature(signature_name, CLASSIFY_METHOD, "classification")
        outputs = self._run(name, signature, {"inputs": np.array(examples, dtype=object)})
        return outputs.get("classes"), outputs.get("scores")

    def regress(self, signature_name: str, examples: list[bytes]) -> np.ndarray:
        name, signature = self._method_signature(signature_name, REGRESS_METHOD, "regression")
        outputs = self._run(name, signature, {"inputs": np.array(examples, dtype=object)})
        return np.asarray(outputs["outputs"]).reshape(len(examples))

    def _method_signature(self, signature_name: str, method: str, what: str):
        name, signature = self.signature(signature_name)
        if signature.method_name != method:
            raise invalid_argument(f"Expected {what} signature method_name to be {method}. "
                                   f"Was: {signature.method_name}")
        return name, signature

    @staticmethod
    def _check_inputs(signature, inputs: dict[str, np.ndarray]) -> None:
        expected, sent = set(signature.inputs), set(inputs)
        if expected != sent:
            raise invalid_argument(
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}.")
        for key, array in inputs.items():
            shape = _expected_shape(signature.inputs[key])
            if shape is None:
                continue
            if len(array.shape) != len(shape) or any(want not in (-1, got) for want, got in zip(shape, array.shape)):
                raise invalid_argument(
                    f"input '{key}' has shape {_shape_text(array.shape)} but the signature expects "
                    f"{_shape_text(shape)} (-1: any size)")

    def _run(self, name: str, signature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        function = self._functions[name]
        try:
            tensors = {key: tf.constant(value, dtype=tf.dtypes.as_dtype(signature.inputs[key].dtype))
                       for key, value in inputs.items()}
        except (TypeError, ValueError) as exc:
            raise invalid_argument(f"inputs do not match the signature's types: {exc}") from None
        try:
            outputs = function(**tensors)
        except tf.errors.InvalidArgumentError as exc:
            raise invalid_argument(exc.message.strip().splitlines()[0]) from None
        except tf.errors.OpError as exc:
            raise ServingError(_grpc_code(exc), exc.message.strip().splitlines()[0]) from None
        return {key: value.numpy() for key, value in outputs.items()}

    def warm_up(self) -> int:
        """Replays the SavedModel's warmup requests (assets.extra/tf_serving_warmup_requests); returns the count."""
        path = self.export_dir / WARMUP_FILE
        if not path.is_file():
            return 0
        from tensorflow_serving.apis import prediction_log_pb2

        count = 0
        for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            log = prediction_log_pb2.PredictionLog.FromString(record)
            if log.WhichOneof("log_type") == "predict_log":
                request = log.predict_log.request
                inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
                self.predict(request.model_spec.signature_name, inputs)
                count += 1
        return count


def _grpc_code(exc: tf.errors.OpError):
    import grpc

    for code in grpc.StatusCode:
        if code.value[0] == exc.error_code:
            return code
    return grpc.StatusCode.INTERNAL
