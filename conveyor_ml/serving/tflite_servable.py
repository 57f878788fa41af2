"""A TFLite model served like TF Serving's TfLiteSession (--prefer_tflite_model), run by LiteRT.

Signatures, in TF Serving's order of preference:
1. SignatureDefs stored in the model's `signature_defs_metadata` buffer (a FlexBuffer map of key ->
   serialized SignatureDef, what TFLite's signature_def_util writes), used as they are; a TensorInfo name
   that is not a tensor's is retried without its `:N` suffix (`tflite_input:0` -> `tflite_input`);
2. beyond TF Serving: the model's own TFLite signatures (what converting a SavedModel records, e.g. the
   Quantizer's variants), each with the predict method name, keys as the SavedModel had them;
3. otherwise one `serving_default` made from the input and output tensors (keys: their names without a
   `:N` suffix), as TF Serving generates it.
An input whose shape differs from the tensor's is resized to the request's (TF Serving does the same), so
the [1,1] half_plus_two model answers a [1] request with a [1] result.

`tflite_float_io` (our extension, --tflite_float_io): a quantized int8/uint8/int16 input takes float values,
quantized with the tensor's scale and zero point, and quantized outputs come back dequantized, so an int8
variant answers the float SavedModel's requests — what a quantized canary needs. Off (TF Serving), the
integer tensors are exposed as they are.
"""
from __future__ import annotations

import logging
import queue
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from conveyor_ml.serving.errors import ModelRunError, ServingError, invalid_argument
from conveyor_ml.serving.servable import (
    DEFAULT_SIGNATURE,
    PREDICT_METHOD,
    TFLITE_MODEL_FILE,
    LoadOptions,
    Servable,
    empty_batch_outputs,
    model_error_message,
)

log = logging.getLogger("conveyor.serving")
SIGNATURE_DEFS_METADATA = "signature_defs_metadata"
QUANTIZED_TYPES = (np.int8, np.uint8, np.int16)


def read_signature_defs_metadata(content: bytes) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The SignatureDefs in a .tflite file's `signature_defs_metadata` buffer ({} when it has none)."""
    from ai_edge_litert import schema_py_generated as schema
    from flatbuffers import flexbuffers

    model = schema.Model.GetRootAs(content, 0)
    for index in range(model.MetadataLength()):
        metadata = model.Metadata(index)
        if metadata.Name() is None or metadata.Name().decode() != SIGNATURE_DEFS_METADATA:
            continue
        data = model.Buffers(metadata.Buffer()).DataAsNumpy()
        if isinstance(data, int):  # an empty buffer
            return {}
        entries = flexbuffers.GetRoot(bytes(data)).AsMap
        signatures = {}
        for key, value in zip(entries.Keys, entries.Values):
            # A FlexBuffer string of the serialized proto's raw bytes (not UTF-8 text: AsString would fail).
            raw = value.AsStringBytes if value.IsString else value.AsBlob
            signatures[key.AsKey] = meta_graph_pb2.SignatureDef.FromString(bytes(raw))
        return signatures
    return {}


def _strip_index(name: str) -> str:
    return name.split(":", 1)[0]


def _datatype(dtype: np.dtype) -> int:
    return tf.dtypes.as_dtype(np.dtype(dtype)).as_datatype_enum


def _dtype_name(dtype: np.dtype) -> str:
    """TF Serving's spelling (DT_FLOAT...), or numpy's for what TensorFlow has no type for."""
    try:
        return types_pb2.DataType.Name(_datatype(dtype))
    except TypeError:
        return str(dtype)


class _Tensor:
    """One model input or output: where it is and how its values convert."""

    def __init__(self, detail: dict, float_io: bool):
        self.name = detail["name"]
        self.index = detail["index"]
        self.dtype = np.dtype(detail["dtype"])
        self.shape = list(detail["shape_signature"]) if len(detail.get("shape_signature", [])) else list(detail["shape"])
        scale, zero_point = detail["quantization"]
        self.quantized = float_io and self.dtype.type in QUANTIZED_TYPES and scale != 0.0
        self.scale, self.zero_point = float(scale), int(zero_point)

    def tensor_info(self) -> meta_graph_pb2.TensorInfo:
        info = meta_graph_pb2.TensorInfo(name=self.name,
                                         dtype=_datatype(np.float32 if self.quantized else self.dtype))
        for size in self.shape:
            info.tensor_shape.dim.add(size=int(size))
        return info

    def to_model(self, alias: str, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value)
        if self.quantized:
            if value.dtype.kind not in "fiu":
                raise invalid_argument(f"input '{alias}' must be numbers")
            limits = np.iinfo(self.dtype)
            quantized = np.round(value.astype(np.float64) / self.scale) + self.zero_point
            return np.clip(quantized, limits.min, limits.max).astype(self.dtype)
        if value.dtype != self.dtype:  # as a SavedModel's graph does: no silent cast (float64 to float32...)
            raise invalid_argument(f"input '{alias}' is {_dtype_name(value.dtype)} but the TFLite tensor "
                                   f"{self.name} takes {_dtype_name(self.dtype)}")
        return value

    def from_model(self, value: np.ndarray) -> np.ndarray:
        if self.quantized:
            return ((value.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32)
        return np.array(value, copy=True)


class TfliteServable(Servable):
    """`model.tflite` in a version directory, on a pool of LiteRT interpreters (one request each at a time)."""

    platform = "tflite"

    def __init__(self, model_name: str, version: int, export_dir: Path, options: LoadOptions | None = None,
                 model_file: Path | None = None):
        super().__init__(model_name, version, export_dir, options or LoadOptions())
        started = time.perf_counter()
        content = Path(model_file or self.export_dir / TFLITE_MODEL_FILE).read_bytes()
        self._pool: queue.Queue[Interpreter] = queue.Queue()
        for _ in range(max(1, self.options.tflite_interpreters)):
            interpreter = Interpreter(model_content=content, num_threads=1)
            interpreter.allocate_tensors()
            self._pool.put(interpreter)
        probe = self._pool.queue[0]
        float_io = self.options.tflite_float_io
        self._tensors = {detail["name"]: _Tensor(detail, float_io)
                         for detail in probe.get_input_details() + probe.get_output_details()}
        self._runners: dict[str, tuple[dict[str, _Tensor], dict[str, _Tensor]]] = {}
        self._runner_cache: dict[tuple[int, str], object] = {}  # (interpreter, signature) -> its runner
        metadata = read_signature_defs_metadata(content)
        if metadata:
            self.signature_defs = self._resolve_metadata_signatures(metadata)
        elif probe.get_signature_list():
            self.signature_defs = self._native_signatures(probe, float_io)
        else:
            log.warning("No signature def found in TFLite model %s. Generating one.", self.export_dir)
            self.signature_defs = {DEFAULT_SIGNATURE: self._generated_signature(probe)}
        self.load_seconds = time.perf_counter() - started

    def _resolve_metadata_signatures(self, signatures: dict) -> dict[str, meta_graph_pb2.SignatureDef]:
        for key, signature in signatures.items():
            for what, infos in (("input", signature.inputs), ("output", signature.outputs)):
                for alias, info in infos.items():
                    if info.name not in self._tensors and _strip_index(info.name) not in self._tensors:
                        raise ValueError(f"Signature {what} {alias} of {key} references an unknown tensor: "
                                         f"Unknown tensor '{info.name}'.")
        return signatures

    def _native_signatures(self, probe: Interpreter, float_io: bool) -> dict[str, meta_graph_pb2.SignatureDef]:
        signatures = {}
        for key in probe.get_signature_list():
            runner = probe.get_signature_runner(key)
            inputs = {alias: _Tensor(detail, float_io) for alias, detail in runner.get_input_details().items()}
            outputs = {alias: _Tensor(detail, float_io) for alias, detail in runner.get_output_details().items()}
            self._runners[key] = (inputs, outputs)
            signature = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
            for alias, tensor in inputs.items():
                signature.inputs[alias].CopyFrom(tensor.tensor_info())
            for alias, tensor in outputs.items():
                signature.outputs[alias].CopyFrom(tensor.tensor_info())
            signatures[key] = signature
        return signatures

    def _generated_signature(self, probe: Interpreter) -> meta_graph_pb2.SignatureDef:
        signature = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
        for details, infos in ((probe.get_input_details(), signature.inputs),
                               (probe.get_output_details(), signature.outputs)):
            for detail in details:
                infos[_strip_index(detail["name"])].CopyFrom(self._tensors[detail["name"]].tensor_info())
        return signature

    def _tensor(self, tensor_name: str) -> _Tensor:
        return self._tensors.get(tensor_name) or self._tensors[_strip_index(tensor_name)]

    @contextmanager
    def _interpreter(self):
        interpreter = self._pool.get()
        try:
            yield interpreter
        finally:
            self._pool.put(interpreter)

    def predict(self, signature_name: str, inputs: dict[str, np.ndarray], output_filter: tuple[str, ...] = (),
                timeout_ms: int | None = None) -> dict[str, np.ndarray]:
        """Runs one request on a free interpreter; `timeout_ms` is not enforced (TF Serving's TFLite
        sessions ignore RunOptions too)."""
        name, signature = self.signature(signature_name)
        self._verify_predict_method(signature)
        self._check_input_names(signature, inputs)
        aliases = self._output_aliases(signature, tuple(output_filter))
        try:
            if name in self._runners:
                outputs = self._run_signature(name, inputs)
            else:
                outputs = self._run_tensors_by_name(signature, inputs)
        except (ValueError, RuntimeError) as exc:  # LiteRT's refusal of a shape or value; a failed run
            empty = empty_batch_outputs(signature, aliases, inputs)
            if empty is not None:
                return empty
            message = f"TFLite: {model_error_message(str(exc))}"
            if isinstance(exc, ValueError):
                raise ModelRunError(grpc.StatusCode.INVALID_ARGUMENT, message) from None
            raise ServingError(grpc.StatusCode.INTERNAL, message) from None
        return {alias: outputs[alias] for alias in aliases}

    def _run_signature(self, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors_in, tensors_out = self._runners[name]
        converted = {alias: tensors_in[alias].to_model(alias, value) for alias, value in inputs.items()}
        with self._interpreter() as interpreter:
            key = (id(interpreter), name)
            runner = self._runner_cache.get(key)
            if runner is None:
                runner = self._runner_cache[key] = interpreter.get_signature_runner(name)
            raw = runner(**converted)
        return {alias: tensors_out[alias].from_model(value) for alias, value in raw.items()}

    def _run_tensors_by_name(self, signature: meta_graph_pb2.SignatureDef,
                             inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        converted = {}
        for alias, value in inputs.items():
            tensor = self._tensor(signature.inputs[alias].name)
            converted[tensor.index] = tensor.to_model(alias, value)
        with self._interpreter() as interpreter:
            current = {detail["index"]: list(detail["shape"]) for detail in interpreter.get_input_details()}
            resized = False
            for index, value in converted.items():
                if current.get(index) != list(value.shape):
                    interpreter.resize_tensor_input(index, list(value.shape))
                    resized = True
            if resized:
                interpreter.allocate_tensors()
            for index, value in converted.items():
                interpreter.set_tensor(index, value)
            interpreter.invoke()
            outputs = {}
            for alias, info in signature.outputs.items():
                tensor = self._tensor(info.name)
                outputs[alias] = tensor.from_model(interpreter.get_tensor(tensor.index))
        return outputs
