"""TensorProtos to and from numpy arrays, for the gRPC API, with the sizes a request declares checked first.

A TensorProto declares its shape apart from its values, and TensorFlow fills a tensor given fewer values than
its shape holds with the last one (no value: zeros). TF Serving decodes such a tensor in full before anything
looks at it, so a 45-byte request declaring [500000, 8, 8] made the server allocate gigabytes. Here the
declared shape is checked first: dimensions must be known and non-negative, the values given must fit the
shape, and what the request's tensors decode to may not exceed a byte budget (`DecodeBudget`, set from
--max_request_body_bytes); only then is anything allocated. Every refusal is INVALID_ARGUMENT naming the input.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from conveyor_ml.serving.errors import invalid_argument

# A request may decode to at most this many times --max_request_body_bytes: JSON numbers and varint-packed
# integers take fewer bytes on the wire than in memory (a float32 sent as "1," takes 2 bytes, 4 decoded).
DECODED_BYTES_PER_REQUEST_BYTE = 4

# Which repeated field holds the values of each dtype (TensorFlow's AsProtoField), and the numpy type.
_FIELDS = {
    types_pb2.DT_FLOAT: ("float_val", np.float32), types_pb2.DT_DOUBLE: ("double_val", np.float64),
    types_pb2.DT_INT32: ("int_val", np.int32), types_pb2.DT_INT16: ("int_val", np.int16),
    types_pb2.DT_INT8: ("int_val", np.int8), types_pb2.DT_UINT8: ("int_val", np.uint8),
    types_pb2.DT_UINT16: ("int_val", np.uint16), types_pb2.DT_INT64: ("int64_val", np.int64),
    types_pb2.DT_UINT32: ("uint32_val", np.uint32), types_pb2.DT_UINT64: ("uint64_val", np.uint64),
    types_pb2.DT_BOOL: ("bool_val", np.bool_), types_pb2.DT_HALF: ("half_val", np.float16),
    types_pb2.DT_BFLOAT16: ("half_val", tf.bfloat16.as_numpy_dtype),
    types_pb2.DT_COMPLEX64: ("scomplex_val", np.complex64), types_pb2.DT_COMPLEX128: ("dcomplex_val", np.complex128),
    types_pb2.DT_STRING: ("string_val", object),
}
_DTYPE_NAMES = {datatype: types_pb2.DataType.Name(datatype) for datatype in _FIELDS}
_LITTLE_ENDIAN = {datatype: np.dtype(numpy_type).newbyteorder("<")  # tensor_content's byte order
                  for datatype, (_, numpy_type) in _FIELDS.items() if numpy_type is not object}
_STRING_ELEMENT_BYTES = 8  # a pointer per element of an object array, before the strings themselves


class DecodeBudget:
    """The bytes a request's tensors may still decode to."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.left = max_bytes

    def take(self, alias: str, shape: list[int], dtype_name: str, nbytes: int) -> None:
        if nbytes > self.left:
            raise invalid_argument(
                f"input '{alias}' declares shape [{','.join(map(str, shape))}] of {dtype_name}: {nbytes:,} bytes "
                f"decoded, more than the {self.max_bytes:,} a request may decode to "
                f"({DECODED_BYTES_PER_REQUEST_BYTE} x --max_request_body_bytes)")
        self.left -= nbytes


MAX_RANK = 32  # numpy's limit on an array's dimensions


def decode_tensor(alias: str, proto: tensor_pb2.TensorProto, budget: DecodeBudget) -> np.ndarray:
    """The array a TensorProto holds (TensorFlow's meaning, fill included), or INVALID_ARGUMENT before
    allocating when its declared shape is malformed, disagrees with its values or exceeds the budget."""
    if proto.dtype not in _FIELDS:
        name = types_pb2.DataType.Name(proto.dtype) if proto.dtype in types_pb2.DataType.values() else proto.dtype
        raise invalid_argument(f"input '{alias}': tensor type {name} cannot be sent in a request")
    dtype_name = _DTYPE_NAMES[proto.dtype]
    if proto.tensor_shape.unknown_rank:
        raise invalid_argument(f"input '{alias}': a tensor must have a known shape")
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if len(shape) > MAX_RANK:
        raise invalid_argument(f"input '{alias}': a tensor of rank {len(shape)}; at most {MAX_RANK} dimensions "
                               "are supported")
    if any(size < 0 for size in shape):
        raise invalid_argument(f"input '{alias}': dimension sizes must be known and non-negative, got "
                               f"[{','.join(map(str, shape))}]")
    elements = math.prod(shape)  # Python ints: a product that would overflow int64 is just large
    if not elements and shape:  # numpy sizes an empty array by its other dimensions (not TensorFlow's rule)
        _check_empty_shape(alias, shape, dtype_name, proto.dtype)
    field, numpy_type = _FIELDS[proto.dtype]
    item_bytes = _STRING_ELEMENT_BYTES if numpy_type is object else np.dtype(numpy_type).itemsize
    content = proto.tensor_content  # read once: each read copies the bytes out of the message
    if content:
        if numpy_type is object:
            raise invalid_argument(f"input '{alias}': DT_STRING values cannot be sent as tensor_content")
        if len(content) != elements * item_bytes:
            raise invalid_argument(f"input '{alias}': tensor_content holds {len(content):,} bytes, the "
                                   f"shape [{','.join(map(str, shape))}] of {dtype_name} needs "
                                   f"{elements * item_bytes:,}")
        budget.take(alias, shape, dtype_name, elements * item_bytes)
        return np.frombuffer(content, dtype=_LITTLE_ENDIAN[proto.dtype]).astype(numpy_type).reshape(shape)
    values = getattr(proto, field)
    given = len(values) // 2 if field in ("scomplex_val", "dcomplex_val") else len(values)
    if given > elements:
        raise invalid_argument(f"input '{alias}': {given:,} values for shape [{','.join(map(str, shape))}] "
                               f"({elements:,} elements)")
    string_bytes = sum(len(v) for v in values) if numpy_type is object else 0
    budget.take(alias, shape, dtype_name, elements * item_bytes + string_bytes)
    if numpy_type is object:
        flat = np.empty(elements, dtype=object)
        flat[:given] = list(values)
        if given < elements:
            flat[given:] = values[-1] if given else b""
        return flat.reshape(shape)
    if field == "half_val":  # the bits in the low 16 of each int32, as TensorFlow truncates them
        flat = np.array(values, dtype=np.int32).astype(np.uint16).view(numpy_type)
    elif field in ("scomplex_val", "dcomplex_val"):  # (real, imag) pairs; an odd last value is ignored, as there
        pairs = np.array(values[:2 * given], dtype=np.float32 if numpy_type is np.complex64 else np.float64)
        flat = pairs.view(numpy_type)
    elif field == "int_val" and numpy_type is not np.int32:  # int8...uint16 wrap, as TensorFlow's static_cast
        flat = np.array(values, dtype=np.int32).astype(numpy_type)  # (numpy refuses out-of-range ints)
    else:
        flat = np.array(values, dtype=numpy_type)
    if given < elements:  # TensorFlow's fill: the last value repeated (zeros when none is given)
        flat = np.concatenate([flat, np.full(elements - given, flat[-1] if given else 0, dtype=numpy_type)])
    return flat.reshape(shape)


def _check_empty_shape(alias: str, shape: list[int], dtype_name: str, datatype: int) -> None:
    """A shape with a zero dimension holds nothing, but TensorFlow refuses one whose dimensions overflow int64
    before the zero (TensorShape::IsValid) and numpy one whose other dimensions (times the item size) do."""
    item_bytes = _STRING_ELEMENT_BYTES if _FIELDS[datatype][1] is object else _LITTLE_ENDIAN[datatype].itemsize
    before_zero, others = 1, item_bytes
    for size in shape:
        if before_zero:
            before_zero *= size
        others *= size or 1
        if before_zero > _INT64_MAX or others > _INT64_MAX:
            raise invalid_argument(f"input '{alias}': the dimensions of shape [{','.join(map(str, shape))}] of "
                                   f"{dtype_name} multiply past what an int64 holds")


_INT64_MAX = 2**63 - 1


# TensorFlow's AsProtoField: which typed field holds the values of each dtype (TF Serving's default answer;
# --enable_serialization_as_tensor_content packs numbers into tensor_content instead).
_TYPED_FIELD = {dtype: field for dtype, (field, _) in _FIELDS.items()}


def tensor_proto(value: np.ndarray, as_tensor_content: bool = False) -> tensor_pb2.TensorProto:
    """A TensorProto as TF Serving answers it: values in the dtype's typed field (float_val...), or raw
    bytes in tensor_content when asked (strings always go to string_val)."""
    proto = tensor_pb2.TensorProto()
    fill_tensor_proto(proto, value, as_tensor_content)
    return proto


@dataclass(frozen=True)
class _Encoding:
    """How arrays of one numpy dtype go into a TensorProto, worked out once per dtype (tf.DType's comparisons
    are Python calls: asked for every answer, they took half of a small gRPC answer's encoding time)."""

    datatype: int  # types_pb2 enum
    field: str  # the typed field (TensorFlow's AsProtoField)
    kind: str  # "string", "half" (bits as uint16), "complex" (real, imag pairs) or "number"


@functools.cache
def _encoding(dtype: np.dtype) -> _Encoding:
    string = dtype.kind in "OSU"  # bytes, str or Python objects (strings)
    datatype = types_pb2.DT_STRING if string else tf.dtypes.as_dtype(dtype).as_datatype_enum
    field = _TYPED_FIELD[datatype]
    kind = ("string" if string else "half" if field == "half_val"
            else "complex" if field in ("scomplex_val", "dcomplex_val") else "number")
    return _Encoding(datatype, field, kind)


def fill_tensor_proto(proto: tensor_pb2.TensorProto, value: np.ndarray, as_tensor_content: bool = False) -> None:
    """tensor_proto() written into an existing message (e.g. a response's map entry: no copy)."""
    array = np.asarray(value)
    encoding = _encoding(array.dtype)
    proto.dtype = encoding.datatype
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add().size = size
    if encoding.kind == "string":
        proto.string_val.extend(item if isinstance(item, bytes) else str(item).encode() for item in array.reshape(-1))
        return
    if as_tensor_content:
        proto.tensor_content = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        return
    flat = array.reshape(-1)
    if encoding.kind == "half":
        flat = flat.view(np.uint16)
    elif encoding.kind == "complex":
        flat = np.stack([flat.real, flat.imag], axis=-1).reshape(-1)
    getattr(proto, encoding.field).extend(flat.tolist())
