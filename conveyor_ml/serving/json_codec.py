"""TF Serving's REST JSON mapping: request bodies to input arrays, output arrays to response bodies.

Follows tensorflow_serving/util/json_tensor.cc: row ("instances") and columnar ("inputs") formats,
{"b64": ...} for binary strings, NaN/Infinity tokens, "predictions"/"outputs" shaped as TF Serving shapes
them, and its error messages where a client might match on them.
"""
from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
from typing import Any

import numpy as np
import orjson
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from conveyor_ml.serving.errors import invalid_argument
from conveyor_ml.serving.tensors import MAX_RANK

ROW, COLUMNAR = "row", "columnar"
BYTES_SUFFIX = "_bytes"


def parse_body(body: bytes) -> dict:
    """The request object; orjson for speed, the json module for the NaN/Infinity tokens TF Serving accepts."""
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            document = json.loads(body, parse_float=_finite_float)
        except RecursionError:  # orjson stops at 1024 levels, so does the json module, by running out of stack
            raise invalid_argument("JSON Parse error: the document is nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            position = getattr(exc, "pos", getattr(exc, "start", None))
            reason = getattr(exc, "msg", str(exc).split(";")[0])
            if isinstance(exc, json.JSONDecodeError):
                reason, position = _rapidjson_reason(exc)
            # A number refused by its converter (1e999, 4,301 digits) comes without a position: none is made up.
            where = f" at offset: {position}" if position is not None else ""
            raise invalid_argument(f"JSON Parse error: {reason}{where}") from None
    if not isinstance(document, dict):
        raise invalid_argument(f"JSON Value: {_short(document)} Is not object")
    return document


# What rapidjson's GetParseError_En says (TF Serving's JSON parser, util/json_tensor.cc ParseJson) for what
# the json module calls the same mistake; "Expecting ',' delimiter" is told apart by the container it is in.
_RAPIDJSON_REASONS = {
    "Expecting value": "Invalid value.",
    "Extra data": "The document root must not be followed by other values.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Invalid control character at": "Invalid encoding in string.",
    "Invalid \\escape": "Invalid escape character in string.",
}


def _rapidjson_reason(exc: json.JSONDecodeError) -> tuple[str, int]:
    """(rapidjson's words, its byte offset) for a json module error; the json module's words where rapidjson
    has none for it."""
    text, position = exc.doc, exc.pos
    reason = next((words for msg, words in _RAPIDJSON_REASONS.items() if exc.msg.startswith(msg)), exc.msg)
    if exc.msg.startswith("Expecting value") and not text[position:].strip():
        reason = "The document is empty." if not text.strip() else reason
        position = len(text)
    elif exc.msg.startswith("Unterminated string"):
        reason, position = "Missing a closing quotation mark in string.", len(text)
    elif exc.msg == "Expecting ',' delimiter":
        reason = ("Missing a comma or '}' after an object member." if _innermost(text, position) == "{"
                  else "Missing a comma or ']' after an array element.")
    return reason, len(text[:position].encode("utf-8", "surrogatepass"))


def _innermost(text: str, position: int) -> str:
    """The bracket of the container open at `position` ("{" or "[")."""
    stack = []
    for match in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text[:position]):
        token = match.group()
        if token in "[{":
            stack.append(token)
        elif token in "]}" and stack:
            stack.pop()
    return stack[-1] if stack else "["


def _finite_float(text: str) -> float:
    """A JSON number as a double; one too large for a double (1e999) is refused, as TF Serving's parser does,
    rather than read as infinity (only the Infinity token means that)."""
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError("Number too big to be stored in double.")
    return value


def signature_name(document: dict) -> str:
    name = document.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid_argument(f"JSON Value: {_short(document)} not formatted correctly. "
                               "'signature_name' key must be a string value.")
    return name


def _short(value: Any, limit: int = 200) -> str:
    """The start of `value` as JSON, for an error message: encoded only as far as it is shown (a client's
    value may be megabytes long, nested a thousand levels deep, or hold an integer of thousands of digits)."""
    pieces, size = [], 0
    try:
        for piece in json.JSONEncoder(default=str).iterencode(value):  # a generator: stops where we stop
            pieces.append(piece)
            size += len(piece)
            if size > limit:
                break
    except (RecursionError, ValueError):
        pieces.append("...")
    text = "".join(pieces)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _decode_strings(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_strings(item) for item in value]
    if _is_b64(value):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise invalid_argument("Unable to base64 decode") from None
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict):
        raise invalid_argument(f"JSON Value: {_short(value)} not formatted correctly for base64 data")
    raise invalid_argument(f"JSON Value: {_short(value)} Type: {_json_type(value)} is not of expected type: string")


def _json_type(value: Any) -> str:
    if isinstance(value, bool):  # rapidjson's JsonTypeString: kTrueType, kFalseType
        return "True" if value else "False"
    return {int: "Number", float: "Number", str: "String", list: "Array",
            dict: "Object", type(None): "Null"}.get(type(value), type(value).__name__)


@functools.cache
def dtype_string(dtype: tf.DType) -> str:
    """TensorFlow's DataTypeString, which TF Serving's messages use: float, double, int32, string..."""
    return types_pb2.DataType.Name(dtype.as_datatype_enum)[len("DT_"):].lower()


@functools.cache
def _dtype_facts(dtype: tf.DType) -> tuple[bool, bool, bool, np.dtype]:
    """(is string, is bool, is integer, numpy dtype): tf.DType's comparisons and properties are Python calls,
    and every request asks them."""
    return dtype == tf.string, dtype == tf.bool, dtype.is_integer, np.dtype(dtype.as_numpy_dtype)


def to_array(value: Any, dtype: tf.DType, name: str) -> np.ndarray:
    """One JSON value (scalar or nested lists) as an array of the signature's dtype, strictly typed."""
    is_string, is_bool, is_integer, numpy_dtype = _dtype_facts(dtype)
    if is_string:
        try:
            decoded = _decode_strings(value)
            shape = _nested_shape(decoded, name)
        except RecursionError:  # nested deeper in a later element than in the first
            raise invalid_argument(f"input '{name}': lists nested too deeply") from None
        if len(shape) > MAX_RANK:
            raise _too_many_dimensions(name)
        array = np.empty(shape, dtype=object)
        _fill(array, decoded)
        return array
    try:
        array = np.asarray(value)
    except (ValueError, RecursionError):  # the rank is looked at only here, off the path of a good request
        if len(_nested_shape(value, name)) > MAX_RANK:
            raise _too_many_dimensions(name) from None
        raise invalid_argument(f"input '{name}': lists of unequal length (a tensor must be rectangular)") from None
    if array.dtype == object or array.dtype.kind in "OUS":
        bad = _first_non_number(value)
        if bad is _NUMBERS_ONLY:  # integers beyond 64 bits
            raise invalid_argument(f"input '{name}': a value is outside the range of {dtype.name}")
        raise invalid_argument(f"JSON Value: {_short(bad)} Type: {_json_type(bad)} is not of expected type: "
                               f"{dtype_string(dtype)}")
    if array.dtype.kind == "b" and not is_bool:
        first = bool(array.flat[0]) if array.size else False
        word = "true" if first else "false"
        raise invalid_argument(f"JSON Value: {word} Type: {word.title()} is not of expected type: "
                               f"{dtype_string(dtype)}")
    if is_integer and array.dtype.kind == "f":
        raise invalid_argument(f"input '{name}': expected integers of type {dtype.name}, got decimals")
    if is_integer and array.dtype.kind in "iu" and array.size:
        limits = np.iinfo(numpy_dtype)  # a cast would wrap out-of-range values silently
        if array.min() < limits.min or array.max() > limits.max:
            raise invalid_argument(f"input '{name}': a value is outside the range of {dtype.name} "
                                   f"[{limits.min}, {limits.max}]")
    try:
        return array.astype(numpy_dtype, copy=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise invalid_argument(f"input '{name}': cannot convert to {dtype.name}: {exc}") from None


def _too_many_dimensions(name: str):
    return invalid_argument(f"input '{name}': a tensor of more than {MAX_RANK} dimensions")


_NUMBERS_ONLY = object()  # what _first_non_number finds in nested lists of numbers (a JSON null is None)


def _first_non_number(value: Any) -> Any:
    if isinstance(value, list):
        for item in value:
            found = _first_non_number(item)
            if found is not _NUMBERS_ONLY:
                return found
        return _NUMBERS_ONLY
    return _NUMBERS_ONLY if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _nested_shape(value: Any, name: str) -> tuple[int, ...]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def _fill(array: np.ndarray, value: Any, index: tuple = ()) -> None:
    if isinstance(value, list):
        if len(value) != array.shape[len(index)]:
            raise invalid_argument(f"Encountered list at unexpected size: {len(value)} at level: {len(index)} "
                                   f"expected size: {array.shape[len(index)]}")
        for position, item in enumerate(value):
            _fill(array, item, index + (position,))
    elif len(index) != array.ndim:
        raise invalid_argument(f"JSON Value: {_short(value)} found at incorrect level: {len(index) + 1} in the "
                               f"JSON DOM. Expected at level: {array.ndim}")
    else:
        array[index] = value


def decode_predict(document: dict, input_dtypes: dict[str, tf.DType],
                   signature: str = "") -> tuple[dict[str, np.ndarray], str]:
    """The input arrays and the request format ('row' or 'columnar')."""
    if not input_dtypes:  # a signature of no inputs (FillPredictRequestFromJson)
        raise invalid_argument(f"Failed to get input map for signature: {signature or 'DEFAULT'}")
    has_instances, has_inputs = "instances" in document, "inputs" in document
    if has_instances and has_inputs:
        raise invalid_argument(f"JSON Value: {_short(document)} Not formatted correctly expecting only one of "
                               "'inputs' or 'instances' keys to exist ")
    if has_instances:
        return _decode_rows(document, input_dtypes), ROW
    if has_inputs:
        return _decode_columns(document["inputs"], input_dtypes), COLUMNAR
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def _decode_rows(document: dict, input_dtypes: dict[str, tf.DType]) -> dict[str, np.ndarray]:
    instances = document["instances"]
    if not isinstance(instances, list):
        raise invalid_argument(f"JSON Value: {_short(document)} Expecting 'instances' to be an list/array")
    if not instances:
        raise invalid_argument(f"JSON Value: {_short(document)} No values in 'instances' array")
    named = isinstance(instances[0], dict) and not _is_b64(instances[0])
    if not named:
        if len(input_dtypes) > 1:
            raise invalid_argument("instances is a plain list, but expecting list of objects as multiple input "
                                   "tensors required as per tensorinfo_map")
        [(name, dtype)] = input_dtypes.items()
        for position, item in enumerate(instances):
            if isinstance(item, dict) and not _is_b64(item):
                raise invalid_argument(f"Expecting value/list but got object at item {position} of input "
                                       "list")
        return {name: to_array(instances, dtype, name)}
    columns: dict[str, list] = {name: [] for name in input_dtypes}
    for position, item in enumerate(instances):
        if not isinstance(item, dict) or _is_b64(item):
            raise invalid_argument(f"Expecting object but got list at item {position} of input list")
        if set(item) != set(input_dtypes):
            raise invalid_argument(
                f"Failed to process element: {position} of 'instances' list. JSON object: {_short(item)} "
                f"keys must be equal to: {','.join(sorted(input_dtypes))}")
        for name in input_dtypes:
            columns[name].append(item[name])
    return {name: to_array(values, input_dtypes[name], name) for name, values in columns.items()}


def _decode_columns(inputs: Any, input_dtypes: dict[str, tf.DType]) -> dict[str, np.ndarray]:
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(input_dtypes) > 1:
            raise invalid_argument("inputs is a plain value/list, but expecting an object as multiple input "
                                   "tensors required as per tensorinfo_map")
        [(name, dtype)] = input_dtypes.items()
        return {name: to_array(inputs, dtype, name)}
    arrays = {}
    for name, dtype in input_dtypes.items():
        if name not in inputs:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = to_array(inputs[name], dtype, name)
    return arrays  # keys the signature does not name are ignored, as FillTensorMapFromInputsMap ignores them


def _jsonable(name: str, array: np.ndarray) -> Any:
    if array.dtype == object or array.dtype.kind == "S":
        as_b64 = name.endswith(BYTES_SUFFIX)
        flat = [({"b64": base64.b64encode(v).decode()} if as_b64 else v.decode("utf-8", "replace"))
                if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
        return np.array(flat, dtype=object).reshape(array.shape).tolist() if array.ndim else flat[0]
    return array if array.ndim else array[()]  # a scalar: orjson writes no 0-d array


def _dumps(document: dict) -> bytes:
    body = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if b"null" not in body:  # outputs hold no None: a null here is a NaN or infinity orjson wrote so
        return body
    # TF Serving writes the NaN/Infinity tokens (and a string output holding "null" just takes this path).
    return json.dumps(document, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else o.item()).encode()


def encode_predict(outputs: dict[str, np.ndarray], request_format: str) -> bytes:
    values = {name: _jsonable(name, np.asarray(array)) for name, array in outputs.items()}
    single = len(values) == 1
    if request_format == COLUMNAR:
        body = {"outputs": next(iter(values.values())) if single else values}
        return _dumps(body)
    rows = None
    for name, value in outputs.items():  # MakeRowFormatJsonFromTensors' checks, in its words
        if not np.ndim(value):
            raise invalid_argument(f"Tensor name: {name} has no shape information ")
        if rows is not None and np.shape(value)[0] != rows:
            raise invalid_argument(f"Tensor name: {name} has inconsistent batch size: {np.shape(value)[0]} "
                                   f"expecting: {rows}")
        rows = np.shape(value)[0]
    if single:
        [value] = values.values()
        predictions = value if isinstance(value, list) else list(value)
    else:
        predictions = [{name: value[i] for name, value in values.items()} for i in range(rows)]
    return _dumps({"predictions": predictions})


INT64_MIN, INT64_MAX, UINT64_MAX = -2**63, 2**63 - 1, 2**64 - 1
_KINDS = {"int64_list": "int64", "float_list": "float", "bytes_list": "bytes"}


def example_from_json(value: Any) -> tf.train.Example:
    """A JSON object of features as a tf.Example (TF Serving's MakeExampleFromJsonObject and
    AddValueToFeature, with their messages)."""
    if not isinstance(value, dict):
        raise invalid_argument(f"Example must be JSON object but got JSON {_json_type(value)}")
    example = tf.train.Example()
    for name, content in value.items():
        feature = example.features.feature[name]
        for item in content if isinstance(content, list) else [content]:
            if isinstance(item, bool):
                kind, item = "int64_list", int(item)
            elif isinstance(item, int) and INT64_MIN <= item <= UINT64_MAX:
                if item > INT64_MAX:
                    raise invalid_argument(f"Feature: {name} has uint64_t element. Only int64_t is "
                                           "supported.")
                kind = "int64_list"
            elif isinstance(item, (int, float)):  # rapidjson reads an integer no 64 bits hold as a double
                kind, item = "float_list", float(item)
            elif isinstance(item, str):
                kind, item = "bytes_list", item.encode()
            elif _is_b64(item):
                kind = "bytes_list"
            else:
                raise invalid_argument(f"Feature: {name} has element with unexpected JSON type: {_json_type(item)}")
            current = feature.WhichOneof("kind")
            if current is not None and current != kind:
                raise invalid_argument(f"Unexpected element type in feature: {name} expecting type: "
                                       f"{_KINDS[current]}")
            if kind == "bytes_list" and _is_b64(item):
                item = _decode_strings(item)
            getattr(feature, kind).value.append(item)
    return example


def decode_examples(document: dict) -> list[bytes]:
    """Serialized tf.Examples from a classify/regress body ({"examples": [...], "context": {...}})."""
    # The context first, as TF Serving reads it.
    context = example_from_json(document["context"]) if "context" in document else None
    if "examples" not in document:
        raise invalid_argument(f"JSON Value: {_short(document)} When method is classify, key 'examples' is "
                               "expected and was not found")
    examples = document["examples"]
    if not isinstance(examples, list):
        raise invalid_argument(f"JSON Value: {_short(document)} Expecting 'examples' value to be an "
                               "list/array")
    if not examples:
        raise invalid_argument(f"JSON Value: {_short(document)} 'examples' value is an empty array")
    serialized = []
    for item in examples:
        example = example_from_json(item)
        if context is not None:
            merged = tf.train.Example()
            merged.CopyFrom(context)
            merged.MergeFrom(example)
            example = merged
        serialized.append(example.SerializeToString())
    return serialized


def encode_classification(classes: np.ndarray | None, scores: np.ndarray | None, count: int) -> bytes:
    results = []
    for row in range(count):
        labels = ([c.decode() if isinstance(c, bytes) else str(c) for c in classes[row]]
                  if classes is not None else [""] * (scores.shape[1] if scores is not None else 0))
        row_scores = list(scores[row]) if scores is not None else [0.0] * len(labels)
        results.append([[label, score] for label, score in zip(labels, row_scores)])
    return _dumps({"results": results})


def encode_regression(values: np.ndarray) -> bytes:
    return _dumps({"results": np.asarray(values, dtype=np.float64).tolist()})  # NaN as TF Serving's token
