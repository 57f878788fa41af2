"""TF Serving's REST JSON mapping, both directions, and its error messages."""
import base64
import json

import numpy as np
import pytest
import tensorflow as tf

from conveyor_ml.serving import json_codec
from conveyor_ml.serving.errors import ServingError

ONE_INPUT = {"x": tf.float32}
TWO_INPUTS = {"a": tf.float32, "b": tf.float32}


def decode(body, dtypes):
    return json_codec.decode_predict(json_codec.parse_body(json.dumps(body).encode()), dtypes)


def test_row_format_single_input():
    inputs, fmt = decode({"instances": [[1, 2, 3], [4, 5, 6]]}, ONE_INPUT)
    assert fmt == json_codec.ROW
    np.testing.assert_array_equal(inputs["x"], np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    assert inputs["x"].dtype == np.float32


def test_row_format_named_inputs_and_columnar():
    rows, _ = decode({"instances": [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0}]}, TWO_INPUTS)
    columns, fmt = decode({"inputs": {"a": [1.0, 3.0], "b": [2.0, 4.0]}}, TWO_INPUTS)
    assert fmt == json_codec.COLUMNAR
    for name in TWO_INPUTS:
        np.testing.assert_array_equal(rows[name], columns[name])


def test_b64_strings_become_bytes():
    raw = b"\x89PNG\x00binary"
    inputs, _ = decode({"instances": [{"b64": base64.b64encode(raw).decode()}, "plain"]}, {"s": tf.string})
    assert inputs["s"].tolist() == [raw, b"plain"]


def test_nan_and_infinity_tokens_are_accepted():
    document = json_codec.parse_body(b'{"instances": [[NaN, Infinity, -Infinity]]}')
    inputs, _ = json_codec.decode_predict(document, ONE_INPUT)
    assert np.isnan(inputs["x"][0, 0]) and np.isinf(inputs["x"][0, 1])


@pytest.mark.parametrize("body, message", [
    (b"", "JSON Parse error: The document is empty"),
    (b"{not json", "JSON Parse error"),
    (b"[1, 2]", "Is not object"),
    (b'{"instances": [[1, 2, 3]], "inputs": [[1, 2, 3]]}', "expecting only one of 'inputs' or 'instances'"),
    (b'{"signature_name": 7, "instances": [[1, 2, 3]]}', "'signature_name' key must be a string value."),
    (b'{"nothing": 1}', "Missing 'inputs' or 'instances' key"),
    (b'{"instances": []}', "No values in 'instances' array"),
    (b'{"instances": [[1, 2, 3], [4, 5]]}', "lists of unequal length"),
    (b'{"instances": [["a", "b", "c"]]}', 'JSON Value: "a" Type: String is not of expected type: float'),
    (b'{"instances": [[true, false, true]]}', "Type: True is not of expected type: float"),
])
def test_malformed_requests_are_invalid_arguments(body, message):
    with pytest.raises(ServingError) as error:
        document = json_codec.parse_body(body)
        json_codec.signature_name(document)
        json_codec.decode_predict(document, ONE_INPUT)
    assert error.value.http_status == 400
    assert message in error.value.message


def test_invalid_base64_and_missing_named_input():
    with pytest.raises(ServingError, match="Unable to base64 decode"):
        decode({"instances": [{"b64": "***"}]}, {"s": tf.string})
    with pytest.raises(ServingError, match="Missing named input: b in 'inputs' object."):
        decode({"inputs": {"a": [1.0]}}, TWO_INPUTS)
    with pytest.raises(ServingError, match="keys must be equal to: a,b"):
        decode({"instances": [{"a": 1.0}]}, TWO_INPUTS)


def test_predictions_are_shaped_like_tf_serving():
    outputs = {"class_ids": np.array([3, 1]), "probabilities": np.array([[0.2, 0.8], [0.6, 0.4]], np.float32)}
    rows = json.loads(json_codec.encode_predict(outputs, json_codec.ROW))
    assert rows == {"predictions": [{"class_ids": 3, "probabilities": [0.2, 0.8]},
                                    {"class_ids": 1, "probabilities": [0.6, 0.4]}]}
    columns = json.loads(json_codec.encode_predict(outputs, json_codec.COLUMNAR))
    assert columns == {"outputs": {"class_ids": [3, 1], "probabilities": [[0.2, 0.8], [0.6, 0.4]]}}
    single = json.loads(json_codec.encode_predict({"y": np.array([1.5, 2.5], np.float32)}, json_codec.ROW))
    assert single == {"predictions": [1.5, 2.5]}


def test_bytes_outputs_are_base64_and_nan_is_a_token():
    body = json_codec.encode_predict({"echo_bytes": np.array([b"\x00\x01"], dtype=object)}, json_codec.ROW)
    assert json.loads(body) == {"predictions": [{"b64": "AAE="}]}
    body = json_codec.encode_predict({"y": np.array([np.nan], np.float32)}, json_codec.ROW)
    assert b"NaN" in body


def test_examples_for_classify_merge_context():
    serialized = json_codec.decode_examples({"context": {"city": "Paris"},
                                             "examples": [{"age": 3, "score": 0.5, "tag": ["a", "b"]}]})
    example = tf.train.Example.FromString(serialized[0])
    features = example.features.feature
    assert features["city"].bytes_list.value == [b"Paris"]
    assert features["age"].int64_list.value == [3]
    assert features["tag"].bytes_list.value == [b"a", b"b"]
    with pytest.raises(ServingError, match="key 'examples' is expected"):
        json_codec.decode_examples({"instances": []})


# -- hostile bodies: a client's mistake, answered INVALID_ARGUMENT in one bounded line ----------------------
def refusal(body: bytes, dtypes=ONE_INPUT) -> str:
    with pytest.raises(ServingError) as raised:
        json_codec.decode_predict(json_codec.parse_body(body), dtypes)
    assert raised.value.code.name == "INVALID_ARGUMENT"
    return raised.value.message


def test_json_nested_past_the_parsers_depth_is_refused():
    assert "nested too deeply" in refusal(b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert "nested too deeply" in refusal(b'{"instances": ' + b"[" * 5000)  # unclosed as well


def test_a_value_too_deep_to_print_back_is_still_named():
    document = json_codec.parse_body(b'{"signature_name": ' + b"[" * 1000 + b"]" * 1000 + b', "instances": [1]}')
    with pytest.raises(ServingError) as raised:
        json_codec.signature_name(document)
    assert "'signature_name' key must be a string value" in raised.value.message
    assert len(raised.value.message) < 500


def test_numbers_no_double_or_integer_conversion_holds_are_refused():
    too_big, too_long = refusal(b'{"instances": [[1e999]]}'), refusal(b'{"instances": [[' + b"9" * 5000 + b"]]}")
    assert "too big to be stored in double" in too_big and "integer string conversion" in too_long
    assert "offset" not in too_big + too_long  # the converters do not say where: no position made up
    assert refusal(b'{"instances": [1,]}').endswith("at offset: 17")  # the parser does
    inputs, _ = json_codec.decode_predict(json_codec.parse_body(b'{"instances": [[Infinity, -Infinity]]}'), ONE_INPUT)
    assert np.isinf(inputs["x"]).all()  # the tokens that mean infinity still do


def test_null_in_a_numeric_tensor_is_named_as_null():
    assert refusal(b'{"instances": [[1.0, null]]}') == "JSON Value: null Type: Null is not of expected type: float"


def test_string_inputs_of_too_many_dimensions_or_too_deep_are_refused():
    strings = {"s": tf.string}
    assert "more than 32 dimensions" in refusal(b'{"instances": ' + b"[" * 40 + b'"a"' + b"]" * 40 + b"}", strings)
    ragged_deep = b'{"instances": [["a"], ' + b"[" * 900 + b'"b"' + b"]" * 900 + b"]}"  # deep past the first row
    assert "nested too deeply" in refusal(ragged_deep, strings)


def test_texts_as_tf_servings_json_tensor_cc_words_them():
    """util/json_tensor.cc (2.16.1): FormatError prefixes "JSON Value: <document> "; DataTypeString names
    types (float, not float32); JsonTypeString calls booleans True/False; the item and tensor are named."""
    assert refusal(b'{"instances": 1}').startswith("JSON Value: ")
    assert refusal(b'{"instances": 1}').endswith(" Expecting 'instances' to be an list/array")
    assert refusal(b'{"instances": []}').endswith(" No values in 'instances' array")
    assert refusal(b'{"instances": [[1.0], {"x": 1}]}') == (
        "Expecting value/list but got object at item 1 of input list")
    assert refusal(b'{"instances": [["a"]]}') == 'JSON Value: "a" Type: String is not of expected type: float'
    assert refusal(b'{"instances": [true]}') == "JSON Value: true Type: True is not of expected type: float"
    with pytest.raises(ServingError) as raised:
        json_codec.encode_predict({"y": np.ones(1), "z": np.ones(2)}, json_codec.ROW)
    assert raised.value.message == "Tensor name: z has inconsistent batch size: 2 expecting: 1"
    with pytest.raises(ServingError) as raised:
        json_codec.encode_predict({"y": np.float32(1.0)}, json_codec.ROW)
    assert raised.value.message == "Tensor name: y has no shape information "
    with pytest.raises(ServingError) as raised:
        json_codec.decode_examples({"examples": [{"names": [1, "a"]}]})
    assert raised.value.message == "Unexpected element type in feature: names expecting type: int64"
    with pytest.raises(ServingError) as raised:
        json_codec.decode_examples({"instances": []})
    assert raised.value.message.endswith(
        " When method is classify, key 'examples' is expected and was not found")


def test_numbers_no_64_bits_hold_are_float_features_as_rapidjson_reads_them():
    example = tf.train.Example.FromString(json_codec.decode_examples({"examples": [{"x": 2**64}]})[0])
    assert list(example.features.feature["x"].float_list.value) == [float(2**64)]


def test_classification_scores_write_nan_as_a_token():
    body = json_codec.encode_classification(np.array([[b"a"]], dtype=object),
                                            np.array([[np.nan]], np.float32), 1)
    assert body.replace(b" ", b"") == b'{"results":[[["a",NaN]]]}'
