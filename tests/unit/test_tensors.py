"""Decoding a request's TensorProtos: TensorFlow's meaning for what is well formed (checked against TensorFlow's
own make_ndarray), and a refusal before any allocation for what declares more than the request may hold."""
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from conveyor_ml.serving.errors import ServingError
from conveyor_ml.serving.tensors import DecodeBudget, decode_tensor

BUDGET = 64 * 1024 * 1024


@pytest.mark.parametrize("value", [
    np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, -2, 3], np.int64), np.array([[1, 2]], np.int8),
    np.array([True, False]), np.array([b"a", b"bc"], dtype=object), np.array(4.5, np.float64),
    np.array([1.5, 2.0], np.float16), np.array([1 + 2j], np.complex64), np.zeros((0, 8, 8), np.float32),
])
def test_well_formed_tensors_decode_as_tensorflow_decodes_them(value):
    for proto in (tf.make_tensor_proto(value), tf.make_tensor_proto(value, shape=value.shape)):
        decoded = decode_tensor("x", proto, DecodeBudget(BUDGET))
        expected = tf.make_ndarray(proto)
        assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
        np.testing.assert_array_equal(decoded, expected)


def test_a_fill_repeats_the_last_value_as_tensorflow_does():
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0, 7.0])
    proto.tensor_shape.dim.add(size=2)
    proto.tensor_shape.dim.add(size=3)
    np.testing.assert_array_equal(decode_tensor("x", proto, DecodeBudget(BUDGET)), tf.make_ndarray(proto))


def declared(shape, **fields) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=fields.pop("dtype", types_pb2.DT_FLOAT), **fields)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


@pytest.mark.parametrize("proto, message", [
    (declared([500000, 8, 8], float_val=[1.0]), "declares shape \\[500000,8,8\\] of DT_FLOAT: 128,000,000 bytes"),
    (declared([2**40, 2**40], float_val=[1.0]), "declares shape"),
    (declared([10**8], dtype=types_pb2.DT_STRING, string_val=[b"x"]), "declares shape \\[100000000\\] of DT_STRING"),
    (declared([-1, 8], float_val=[1.0]), "must be known and non-negative"),
    (declared([2], float_val=[1.0, 2.0, 3.0]), "3 values for shape \\[2\\]"),
    (declared([4], tensor_content=b"\0" * 12), "tensor_content holds 12 bytes.*needs 16"),
    (declared([1], dtype=types_pb2.DT_RESOURCE), "tensor type DT_RESOURCE cannot be sent"),
    (declared([1], dtype=types_pb2.DT_STRING, tensor_content=b"abcd"), "cannot be sent as tensor_content"),
])
def test_malformed_or_oversized_declarations_are_refused_before_allocating(proto, message):
    with pytest.raises(ServingError, match=message) as refused:
        decode_tensor("images", proto, DecodeBudget(BUDGET))
    assert refused.value.code.name == "INVALID_ARGUMENT" and "input 'images'" in refused.value.message


def test_the_budget_is_shared_by_a_requests_tensors():
    budget = DecodeBudget(1000)
    decode_tensor("a", declared([200], float_val=[1.0]), budget)  # 800 bytes
    with pytest.raises(ServingError, match="input 'b'"):
        decode_tensor("b", declared([100], float_val=[1.0]), budget)  # 400 more


def test_no_values_means_zeros_as_tensorflow_reads_it():
    proto = declared([2, 3])
    np.testing.assert_array_equal(decode_tensor("x", proto, DecodeBudget(BUDGET)), tf.make_ndarray(proto))


def test_a_tensor_of_unknown_rank_is_refused():
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
    proto.tensor_shape.unknown_rank = True
    with pytest.raises(ServingError, match="a tensor must have a known shape"):
        decode_tensor("x", proto, DecodeBudget(BUDGET))


@pytest.mark.parametrize("as_tensor_content", [False, True], ids=["typed fields", "tensor_content"])
@pytest.mark.parametrize("value", [
    np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[1.5, -2.0]], np.float16), np.array([7, -8], np.int64),
    np.array([1 + 2j, 3 - 4j], np.complex128), np.array([True, False]), np.array([b"a", b"bc"], dtype=object),
    np.zeros((0, 4), np.float32),
])
def test_answers_encode_what_tensorflow_decodes_back(value, as_tensor_content):
    """Response tensors (tensor_proto) read back by TensorFlow's own make_ndarray as the value they encode."""
    from conveyor_ml.serving.tensors import tensor_proto

    decoded = tf.make_ndarray(tensor_proto(value, as_tensor_content))
    assert decoded.shape == value.shape
    np.testing.assert_array_equal(decoded, value)


@pytest.mark.parametrize("shape", [[2**62, 2**62, 0], [0, 2**63 - 1], [2**40, 0, 2**40], [0] + [2**40] * 5])
def test_an_empty_shape_whose_other_dimensions_overflow_is_refused(shape):
    """TensorShape::IsValid refuses dimensions whose product overflows int64 before a zero; numpy cannot make
    an empty array whose other dimensions overflow either (was INTERNAL: numpy's reshape ValueError)."""
    with pytest.raises(ServingError) as refused:
        decode_tensor("x", declared(shape), DecodeBudget(BUDGET))
    assert refused.value.code.name == "INVALID_ARGUMENT"
    assert refused.value.message == (f"input 'x': the dimensions of shape [{','.join(map(str, shape))}] of DT_FLOAT "
                                     "multiply past what an int64 holds")


@pytest.mark.parametrize("shape", [[0], [3, 0], [0, 2**20, 2**20], [2**30, 0]])
def test_an_empty_shape_that_fits_decodes_empty(shape):
    decoded = decode_tensor("x", declared(shape), DecodeBudget(BUDGET))
    assert decoded.shape == tuple(shape) and decoded.size == 0


@pytest.mark.parametrize("dtype, values, expected", [
    (types_pb2.DT_COMPLEX64, [1.0], np.zeros((), np.complex64)),  # no whole pair: zeros (C++ Tensor::FromProto)
    (types_pb2.DT_COMPLEX64, [1.0, 2.0, 3.0], np.array(1 + 2j, np.complex64)),
    (types_pb2.DT_COMPLEX128, [5.0], np.zeros((), np.complex128)),
])
def test_an_odd_number_of_complex_parts_ignores_the_last_as_tensorflow_does(dtype, values, expected):
    """ProtoHelper<complex64>::NumElements is scomplex_val().size() / 2 (was INTERNAL: numpy's view)."""
    field = "scomplex_val" if dtype == types_pb2.DT_COMPLEX64 else "dcomplex_val"
    decoded = decode_tensor("x", declared([], dtype=dtype, **{field: values}), DecodeBudget(BUDGET))
    assert decoded.dtype == expected.dtype
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("dtype, field, values, expected", [
    (types_pb2.DT_INT8, "int_val", [1000, -129], np.array([-24, 127], np.int8)),
    (types_pb2.DT_UINT8, "int_val", [-5, 300], np.array([251, 44], np.uint8)),
    (types_pb2.DT_INT16, "int_val", [70000], np.array([4464], np.int16)),
    (types_pb2.DT_UINT16, "int_val", [-1], np.array([65535], np.uint16)),
    (types_pb2.DT_HALF, "half_val", [15360 + 65536], np.array([1.0], np.float16)),
])
def test_out_of_range_narrow_ints_wrap_as_tensorflow_casts_them(dtype, field, values, expected):
    """int_val and half_val are int32s that TensorFlow static_casts; numpy refuses out-of-range Python ints
    (a DeprecationWarning now, OverflowError in numpy 2: INTERNAL)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_tensor("x", declared([len(values)], dtype=dtype, **{field: values}), DecodeBudget(BUDGET))
    assert decoded.dtype == expected.dtype
    np.testing.assert_array_equal(decoded, expected)
