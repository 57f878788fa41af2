"""TF Serving's REST JSON mapping: request bodies to input arrays, output arrays to response bodies.

Follows tensorflow_serving/util/json_tensor.cc: row ("instances") and columnar ("inputs") formats,
{"b64": ...} for binary strings, NaN/Infinity tokens, "predictions"/"outputs" shaped as TF Serving shapes
them, and its error messages where a client might match on them.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import functools
import json
import math
import re
from typing import Any

import grpc
import numpy as np
import orjson
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from conveyor_ml.serving.errors import ServingError, invalid_argument
from conveyor_ml.serving.tensors import MAX_RANK

ROW, COLUMNAR = "row", "columnar"
BYTES_SUFFIX = "_bytes"
INT64_MIN, INT64_MAX, UINT64_MAX = -2**63, 2**63 - 1, 2**64 - 1


def parse_body(body: bytes, keep_undecodable: bool = True) -> dict:
    """The request object; orjson for speed, the json module for what orjson refuses and TF Serving's parser
    (rapidjson, util/json_tensor.cc ParseJson) reads: the NaN/Infinity tokens, a leading byte order mark and,
    with `keep_undecodable`, bytes inside a string that are not UTF-8 (ParseJson does not ask rapidjson to
    validate the encoding, so they reach a string tensor as they are; see _RawString)."""
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        document = _parse_slowly(body, exc, keep_undecodable)
    if not isinstance(document, dict):
        raise invalid_argument(f"JSON Value: {_short(document)} Is not object")
    return document


NUMBER_TOO_BIG = "Number too big to be stored in double."  # rapidjson's kParseErrorNumberTooBig
_NUMBER_OR_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?')


def _parse_slowly(body: bytes, refusal: orjson.JSONDecodeError, keep_undecodable: bool) -> Any:
    """The document orjson refused, or rapidjson's error for it ("JSON Parse error: <GetParseError_En> at
    offset: <byte>")."""
    bom = 3 if body.startswith(codecs.BOM_UTF8) else 0  # rapidjson skips it; its offsets count it
    try:
        text = body[bom:].decode("utf-8", "surrogateescape" if keep_undecodable else "strict")
    except UnicodeDecodeError as exc:
        reason = str(exc).split(";")[0]
        raise invalid_argument(f"JSON Parse error: {reason} at offset: {bom + exc.start}") from None
    if refusal.msg.startswith("number is infinity"):  # orjson read all before it (no BOM), as rapidjson would
        raise _too_big(_byte_offset(text, refusal.pos)) from None
    try:
        return json.loads(text, parse_float=_finite_float)
    except RecursionError:  # orjson stops at 1024 levels, so does the json module, by running out of stack
        raise invalid_argument("JSON Parse error: the document is nested too deeply") from None
    except json.JSONDecodeError as exc:
        reason, position = _rapidjson_reason(exc)
        raise invalid_argument(f"JSON Parse error: {reason} at offset: {bom + position}") from None
    except ValueError:  # a number no double holds (1e999, an integer of 400 digits): rapidjson says where
        raise _too_big(bom + _first_too_big(text)) from None


def _too_big(offset: int) -> ServingError:
    """reader.h ParseNumber: kParseErrorNumberTooBig at the number's first character (its sign included)."""
    return invalid_argument(f"JSON Parse error: {NUMBER_TOO_BIG} at offset: {offset}")


def _first_too_big(text: str) -> int:
    """The byte offset of the first number outside strings that no double holds."""
    for match in _NUMBER_OR_STRING.finditer(text):
        token = match.group()
        if token[0] != '"' and math.isinf(float(token)):
            return _byte_offset(text, match.start())
    return 0


def _byte_offset(text: str, position: int) -> int:
    return len(text[:position].encode("utf-8", "surrogateescape"))


# What rapidjson's GetParseError_En says (TF Serving's JSON parser, util/json_tensor.cc ParseJson) for what
# the json module calls the same mistake; "Expecting ',' delimiter" is told apart by the container it is in.
# A control character in a string is kParseErrorStringEscapeInvalid there, a NUL one
# kParseErrorStringMissQuotationMark (rapidjson 1.1.0 reader.h ParseStringToStream).
_RAPIDJSON_REASONS = {
    "Expecting value": "Invalid value.",
    "Extra data": "The document root must not be followed by other values.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Invalid control character '\\x00' at": "Missing a closing quotation mark in string.",
    "Invalid control character at": "Invalid escape character in string.",
    "Invalid \\escape": "Invalid escape character in string.",
}


def _rapidjson_reason(exc: json.JSONDecodeError) -> tuple[str, int]:
    """(rapidjson's words, its byte offset) for a json module error; the json module's words where rapidjson
    has none for it."""
    text, position = exc.doc, exc.pos
    message = exc.msg
    if message.startswith("Invalid control character") and text[position:position + 1] == "\x00":
        message = "Invalid control character '\\x00' at"
    reason = next((words for msg, words in _RAPIDJSON_REASONS.items() if message.startswith(msg)), exc.msg)
    if exc.msg.startswith("Expecting value") and not text[position:].strip():
        reason = "The document is empty." if not text.strip() else reason
        position = len(text)
    elif exc.msg.startswith("Unterminated string"):
        reason, position = "Missing a closing quotation mark in string.", len(text)
    elif exc.msg == "Expecting ',' delimiter":
        reason = ("Missing a comma or '}' after an object member." if _innermost(text, position) == "{"
                  else "Missing a comma or ']' after an array element.")
    return reason, _byte_offset(text, position)


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
    """`value` as TF Serving quotes it in an error message (json_tensor.cc JsonValueToString: rapidjson's
    PrettyWriter), cut after `limit` characters: written only as far as it is shown (a client's value may be
    megabytes long, nested a thousand levels deep, or hold an integer of thousands of digits)."""
    pieces, size = [], 0
    for piece in _pretty(value, limit):  # a generator: stops where we stop
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            break
    text = "".join(pieces)
    return text if len(text) <= limit else text[:limit] + "..."


# rapidjson's Writer::WriteString escapes: '"', '\\', \b \t \n \f \r, other control characters as \u00XX
# (upper-case hex); everything else, non-ASCII included, as it is.
_STRING_ESCAPES = {code: f"\\u{code:04X}" for code in range(0x20)}
_STRING_ESCAPES.update({0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r", 0x22: '\\"',
                        0x5C: "\\\\"})
_END = object()


def rapidjson_string(text: str, limit: int | None = None) -> str:
    """`text` as a JSON string the way rapidjson writes it; past `limit` characters cut, unclosed."""
    if limit is not None and len(text) > limit:
        return '"' + text[:limit].translate(_STRING_ESCAPES)
    return '"' + text.translate(_STRING_ESCAPES) + '"'


def _pretty(value: Any, limit: int):
    """JsonValueToString's text in pieces: PrettyWriter's layout (4-space indent, one member or element per
    line, "key": value), a lone double written by WriteDecimal; iterative, so any depth is written."""
    if not isinstance(value, (list, dict)):
        yield _scalar_text(value, limit, alone=True)
        return
    stack = [[iter(value.items()) if isinstance(value, dict) else iter(value), isinstance(value, dict), 0]]
    yield "{" if isinstance(value, dict) else "["
    while stack:
        frame = stack[-1]
        item = next(frame[0], _END)
        if item is _END:
            stack.pop()
            yield ("\n" + "    " * len(stack) if frame[2] else "") + ("}" if frame[1] else "]")
            continue
        prefix = ("," if frame[2] else "") + "\n" + "    " * len(stack)
        frame[2] += 1
        if frame[1]:
            key, item = item
            prefix += rapidjson_string(str(key), limit) + ": "
        if isinstance(item, dict):
            yield prefix + "{"
            stack.append([iter(item.items()), True, 0])
            continue
        if isinstance(item, list):
            yield prefix + "["
            stack.append([iter(item), False, 0])
            continue
        yield prefix
        text = _scalar_text(item, limit, alone=False)
        if text is None:  # Writer::WriteDouble refuses NaN and infinities (no kWriteNanAndInfFlag): it stops
            return
        yield text


def _scalar_text(value: Any, limit: int, alone: bool) -> str | None:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return rapidjson_string(value, limit)
    if isinstance(value, int) and INT64_MIN <= value <= UINT64_MAX:
        return str(value)
    if isinstance(value, (int, float)):  # rapidjson reads an integer no 64 bits hold as a double
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        return _write_decimal(number) if alone else _rapidjson_double(number)
    return rapidjson_string(str(value), limit)


def _write_decimal(number: float) -> str:
    """json_tensor.cc WriteDecimal, as JsonValueToString calls it for a lone double: as a float when
    rapidjson's IsFloat() (in float range), else a double; absl::StrCat's six digits, all needed digits when
    those do not read back, ".0" after a whole number; NaN, Infinity, -Infinity."""
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "-Infinity" if number < 0 else "Infinity"
    single = -3.4028234e38 <= number <= 3.4028234e38
    if single:
        number = float(np.float32(number))
    text = f"{number:g}"  # printf's %g, as absl's SixDigitsToBuffer
    if (float(np.float32(text)) if single else float(text)) != number:
        text = f"{number:.{9 if single else 17}g}"  # max_digits10
    return text if "." in text or "e" in text else text + ".0"


def _rapidjson_double(number: float) -> str | None:
    """rapidjson's Writer::Double (internal/dtoa.h: shortest digits, Prettify's layout: 1.0, 1e21, 1e-7,
    0.000001, 1.5e300); None for NaN and infinities, which it does not write."""
    if math.isnan(number) or math.isinf(number):
        return None
    if number == 0:
        return "-0.0" if math.copysign(1.0, number) < 0 else "0.0"
    sign = "-" if number < 0 else ""
    mantissa, _, exponent = repr(abs(number)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    k = int(exponent or 0) - len(fraction)
    stripped = digits.rstrip("0")
    k += len(digits) - len(stripped)
    digits, length = stripped, len(stripped)
    kk = length + k  # 10^(kk-1) <= number < 10^kk
    if 0 <= k and kk <= 21:
        return f"{sign}{digits}{'0' * k}.0"
    if 0 < kk <= 21:
        return f"{sign}{digits[:kk]}.{digits[kk:]}"
    if -6 < kk <= 0:
        return f"{sign}0.{'0' * -kk}{digits}"
    if length == 1:
        return f"{sign}{digits}e{kk - 1}"
    return f"{sign}{digits[0]}.{digits[1:]}e{kk - 1}"


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _kept_bytes(error: UnicodeError) -> tuple[bytes, int]:
    """Codec error handler: the characters of a JSON string that UTF-8 cannot encode, as the bytes rapidjson
    holds for them: a byte that was not UTF-8 (parse_body reads it as U+DC80-U+DCFF) as itself, a lone
    surrogate a \\u escape wrote as its three-byte form (rapidjson's UTF8::Encode)."""
    kept = bytearray()
    for char in error.object[error.start:error.end]:
        point = ord(char)
        if 0xDC80 <= point <= 0xDCFF:
            kept.append(point - 0xDC00)
        else:
            kept += char.encode("utf-8", "surrogatepass")
    return bytes(kept), error.end


KEPT_BYTES = "conveyor.json_kept_bytes"
codecs.register_error(KEPT_BYTES, _kept_bytes)


class _RawString(str):
    """A JSON string UTF-8 cannot encode as it is (bytes that were not UTF-8, a lone surrogate escape):
    encode() gives the bytes TF Serving's tensor or feature would hold."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return str.encode(self, encoding, KEPT_BYTES)


def _as_raw(value: Any) -> Any:
    """`value` with every string a _RawString, for the second try after a UnicodeEncodeError."""
    if isinstance(value, list):
        return [_as_raw(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_raw(item) for key, item in value.items()}
    return _RawString(value) if isinstance(value, str) else value


def _raw_features(value: dict) -> dict:
    """An example's features with their strings _RawStrings and their names encodable (a proto map key must
    be UTF-8: a character it cannot hold becomes U+FFFD); values nested deeper are refused as they are."""
    def raw(item: Any) -> Any:
        return _RawString(item) if isinstance(item, str) else item

    return {name.encode("utf-8", KEPT_BYTES).decode("utf-8", "replace"):
            [raw(item) for item in content] if isinstance(content, list) else raw(content)
            for name, content in value.items()}


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
    raise _type_error(value, tf.string)


def _type_error(value: Any, dtype: tf.DType) -> ServingError:
    """json_tensor.cc TypeError."""
    return invalid_argument(f"JSON Value: {_short(value)} Type: {_json_type(value)} is not of expected type: "
                            f"{dtype_string(dtype)}")


def _json_type(value: Any) -> str:
    if isinstance(value, bool):  # rapidjson's JsonTypeString: kTrueType, kFalseType
        return "True" if value else "False"
    if isinstance(value, str):
        return "String"
    return {int: "Number", float: "Number", list: "Array",
            dict: "Object", type(None): "Null"}.get(type(value), type(value).__name__)


@functools.cache
def dtype_string(dtype: tf.DType) -> str:
    """TensorFlow's DataTypeString, which TF Serving's messages use: float, double, int32, string..."""
    return types_pb2.DataType.Name(dtype.as_datatype_enum)[len("DT_"):].lower()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer_within(low: int, high: int):
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


# AddValueToTensor (json_tensor.cc:236-286): the dtypes a JSON value converts to, each with the test a value
# must pass (rapidjson's IsNumber, IsInt, IsString, IsInt64, IsBool, IsUint, IsUint64); any other dtype
# (half, bfloat16, uint16, complex...) is UNIMPLEMENTED "Conversion of JSON Value: <v> to type: <dtype>".
_VALUE_TESTS = {
    tf.float32: _is_number, tf.float64: _is_number,
    tf.int32: _integer_within(-2**31, 2**31 - 1), tf.int16: _integer_within(-2**31, 2**31 - 1),
    tf.int8: _integer_within(-2**31, 2**31 - 1), tf.uint8: _integer_within(-2**31, 2**31 - 1),
    tf.string: lambda value: isinstance(value, str),
    tf.int64: _integer_within(INT64_MIN, INT64_MAX),
    tf.bool: lambda value: isinstance(value, bool),
    tf.uint32: _integer_within(0, 2**32 - 1), tf.uint64: _integer_within(0, UINT64_MAX),
}
_NOT_CONVERTED = "a dtype no JSON value converts to"  # numpy refuses it as a dtype: to_array's error branch


@functools.cache
def _dtype_facts(dtype: tf.DType) -> tuple[bool, bool, bool, np.dtype | str]:
    """(is string, is bool, is integer, numpy dtype): tf.DType's comparisons and properties are Python calls,
    and every request asks them."""
    if dtype not in _VALUE_TESTS:
        return False, False, False, _NOT_CONVERTED
    return dtype == tf.string, dtype == tf.bool, dtype.is_integer, np.dtype(dtype.as_numpy_dtype)


def _not_converted(value: Any, dtype: tf.DType) -> ServingError:
    return ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Conversion of JSON Value: {_short(value)} to type: "
                        f"{dtype_string(dtype)}")


def to_array(value: Any, dtype: tf.DType, name: str) -> np.ndarray:
    """One JSON value (scalar or nested lists) as an array of the signature's dtype, strictly typed. Its
    refusals are refined by _upstream_error, which words them as TF Serving does."""
    is_string, is_bool, is_integer, numpy_dtype = _dtype_facts(dtype)
    if is_string:
        try:
            decoded = _decode_strings(value)
            shape = _nested_shape(decoded, name)
        except RecursionError:  # nested deeper in a later element than in the first
            raise invalid_argument(f"input '{name}': lists nested too deeply") from None
        except UnicodeEncodeError:  # bytes that are not UTF-8, or a lone surrogate escape: kept as bytes
            try:
                raw = _as_raw(value)
            except RecursionError:
                raise invalid_argument(f"input '{name}': lists nested too deeply") from None
            return to_array(raw, dtype, name)
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
        if bad is not _NUMBERS_ONLY:
            raise _type_error(bad, dtype)
        if isinstance(numpy_dtype, np.dtype) and numpy_dtype.kind == "f":  # integers past 64 bits: doubles
            try:  # to rapidjson, so numbers to a float input
                return np.array(value, dtype=object).astype(numpy_dtype)
            except OverflowError:  # past a double (the json module read it: the body has a NaN token)
                pass
        raise invalid_argument(f"input '{name}': a value is outside the range of {dtype.name}")
    if (array.dtype.kind == "b") != is_bool and array.size:
        raise _type_error(_first_leaf(value), dtype)
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
        if numpy_dtype is _NOT_CONVERTED:
            if not array.size:  # FillTensorProto meets no value to convert
                return np.zeros(array.shape, dtype.as_numpy_dtype)
            raise _not_converted(_first_leaf(value), dtype) from None
        raise invalid_argument(f"input '{name}': cannot convert to {dtype.name}: {exc}") from None


def _first_leaf(value: Any) -> Any:
    while isinstance(value, list) and value:
        value = value[0]
    return value


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
        instances = document["instances"]
        if not isinstance(instances, list):
            raise invalid_argument(f"JSON Value: {_short(document)} Expecting 'instances' to be an "
                                   "list/array")
        if not instances:
            raise invalid_argument(f"JSON Value: {_short(document)} No values in 'instances' array")
        try:
            return _decode_rows(instances, input_dtypes), ROW
        except ServingError as exc:
            raise _upstream_error(_rows_error, instances, input_dtypes) or exc from None
    if has_inputs:
        inputs = document["inputs"]
        try:
            return _decode_columns(inputs, input_dtypes), COLUMNAR
        except ServingError as exc:
            raise _upstream_error(_columns_error, inputs, input_dtypes) or exc from None
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def _decode_rows(instances: list, input_dtypes: dict[str, tf.DType]) -> dict[str, np.ndarray]:
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
            raise _keys_error(position, item, input_dtypes)
        for name in input_dtypes:
            columns[name].append(item[name])
    return {name: to_array(values, input_dtypes[name], name) for name, values in columns.items()}


def _keys_error(position: int, item: dict, input_dtypes: dict[str, tf.DType]) -> ServingError:
    return invalid_argument(f"Failed to process element: {position} of 'instances' list. JSON object: "
                            f"{_short(item)} keys must be equal to: {','.join(sorted(input_dtypes))}")


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


# -- TF Serving's refusal of a request we refused: its checks in its order, on the error path only -----------
# The decoders above check a whole tensor at once (numpy); TF Serving (json_tensor.cc) walks the JSON value by
# value and stops at the first it cannot take. When ours refuse, the walk below finds what TF Serving would
# have said; when it finds nothing (a check TF Serving does not make: an int8 out of range, which it would
# wrap; more than 32 dimensions), our refusal stands.
def _upstream_error(walk, value: Any, input_dtypes: dict[str, tf.DType]) -> ServingError | None:
    try:
        return walk(value, input_dtypes)
    except RecursionError:  # a b64 object's check, nested past the stack: our refusal stands
        return None


def _rows_error(instances: list, input_dtypes: dict[str, tf.DType]) -> ServingError | None:
    """FillTensorMapFromInstancesList (json_tensor.cc:465-553): elements in order, an object's members in
    the order sent; an element's error wrapped in "Failed to process element: ..." with its status
    (absl::Status::ToString: "INVALID_ARGUMENT: <message>")."""
    if not isinstance(instances[0], dict) and len(input_dtypes) > 1:
        return invalid_argument("instances is a plain list, but expecting list of objects as multiple input "
                                "tensors required as per tensorinfo_map")
    objects = isinstance(instances[0], dict) and not _is_b64(instances[0])
    sizes: dict[str, tuple[int, tuple[int, ...]]] = {}
    for position, element in enumerate(instances):
        is_object = isinstance(element, dict) and not _is_b64(element)
        if objects:
            if not is_object:
                return invalid_argument(f"Expecting object but got list at item {position} of input list")
            for name, item in element.items():
                error = _instance_item_error(item, name, input_dtypes, sizes)
                if error is not None:
                    return invalid_argument(f"Failed to process element: {position} key: {name} of "
                                            f"'instances' list. Error: {_status_text(error)}")
            if set(element) != set(input_dtypes):
                return _keys_error(position, element, input_dtypes)
        else:
            if is_object:
                return invalid_argument(f"Expecting value/list but got object at item {position} of input "
                                        "list")
            error = _instance_item_error(element, next(iter(input_dtypes)), input_dtypes, sizes)
            if error is not None:
                return invalid_argument(f"Failed to process element: {position} of 'instances' list. Error: "
                                        f"{_status_text(error)}")
    return None


def _status_text(error: ServingError) -> str:
    return f"{error.code.name}: {error.message}"


def _instance_item_error(item: Any, name: str, input_dtypes: dict[str, tf.DType],
                         sizes: dict[str, tuple[int, tuple[int, ...]]]) -> ServingError | None:
    """AddInstanceItem (json_tensor.cc:389-417): each element's tensor of the size and shape of the first."""
    if name not in input_dtypes:
        return invalid_argument(f"JSON object: does not have named input: {name}")
    error, count, shape = _fill_error(item, input_dtypes[name])
    if error is not None:
        return error
    if name not in sizes:
        sizes[name] = (count, shape)
    elif sizes[name][0] != count:
        return invalid_argument(f"Expecting tensor size: {sizes[name][0]} but got: {count}")
    elif sizes[name][1] != shape:
        return invalid_argument(f"Expecting shape {_shape_text(sizes[name][1])} but got: "
                                f"{_shape_text(shape)}")
    return None


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"  # json_tensor.cc ShapeToString


def _columns_error(inputs: Any, input_dtypes: dict[str, tf.DType]) -> ServingError | None:
    """FillTensorMapFromInputsMap (json_tensor.cc:555-595): its errors as they are, UNIMPLEMENTED included."""
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(input_dtypes) > 1:
            return invalid_argument("inputs is a plain value/list, but expecting an object as multiple input "
                                    "tensors required as per tensorinfo_map")
        return _fill_error(inputs, next(iter(input_dtypes.values())))[0]
    for name, dtype in input_dtypes.items():
        if name not in inputs:
            return invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        error = _fill_error(inputs[name], dtype)[0]
        if error is not None:
            return error
    return None


def _fill_error(value: Any, dtype: tf.DType) -> tuple[ServingError | None, int, tuple[int, ...]]:
    """GetDenseTensorShape and FillTensorProto (json_tensor.cc:295-382) over one JSON value, depth first:
    (the first error they meet, the number of values, the shape the first elements give)."""
    shape = _nested_shape(value, "")
    rank, test, count = len(shape), _VALUE_TESTS.get(dtype), 0
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, list):
            if level >= rank:
                return invalid_argument(f"Encountered list at unexpected level: {level} expected < "
                                        f"{rank}"), 0, ()
            if len(item) != shape[level]:
                return invalid_argument(f"Encountered list at unexpected size: {len(item)} at level: {level} "
                                        f"expected size: {shape[level]}"), 0, ()
            stack.extend((member, level + 1) for member in reversed(item))
            continue
        if level != rank:
            return invalid_argument(f"JSON Value: {_short(item)} found at incorrect level: {level + 1} in "
                                    f"the JSON DOM. Expected at level: {rank}"), 0, ()
        if isinstance(item, dict):
            if dtype != tf.string:
                return _type_error(item, dtype), 0, ()
            try:
                _decode_strings(item)  # JsonDecodeBase64Object
            except ServingError as exc:
                return exc, 0, ()
        elif test is None:
            return _not_converted(item, dtype), 0, ()
        elif not test(item):
            return _type_error(item, dtype), 0, ()
        count += 1
    return None, count, shape


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


_KINDS = {"int64_list": "int64", "float_list": "float", "bytes_list": "bytes"}


def example_from_json(value: Any) -> tf.train.Example:
    """A JSON object of features as a tf.Example (TF Serving's MakeExampleFromJsonObject and
    AddValueToFeature, with their messages)."""
    if not isinstance(value, dict):
        raise invalid_argument(f"Example must be JSON object but got JSON {_json_type(value)}")
    try:
        return _example(value)
    except UnicodeEncodeError:  # bytes that are not UTF-8 (or a lone surrogate escape) in a name or a string:
        return _example(_raw_features(value))  # the string keeps them, the name (a proto key) cannot


def _example(value: dict) -> tf.train.Example:
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
