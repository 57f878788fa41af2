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
    # json_tensor.cc AddInstanceItem (409): every element the size of the first
    (b'{"instances": [[1, 2, 3], [4, 5]]}', "Failed to process element: 1 of 'instances' list. Error: "
                                           "INVALID_ARGUMENT: Expecting tensor size: 3 but got: 2"),
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


def test_numbers_no_double_holds_are_rapidjsons_parse_error_at_their_first_character():
    """rapidjson 1.1.0 reader.h ParseNumber: kParseErrorNumberTooBig at startOffset (1142, 1235, 1318), the
    number's first character, its sign included; en.h:57 "Number too big to be stored in double."."""
    too_big = "JSON Parse error: Number too big to be stored in double. at offset: "
    assert refusal(b'{"instances": [[1e999]]}') == too_big + "16"
    assert refusal(b'{"instances": [-1e400]}') == too_big + "15"
    assert refusal(b'{"instances": [[' + b"9" * 5000 + b"]]}") == too_big + "16"
    assert refusal(b'{"instances": [' + b"9" * 400 + b"]}") == too_big + "15"  # an integer no double holds
    assert refusal(b'{"instances": [NaN, 1e400]}') == too_big + "20"  # read by the json module (NaN)
    assert refusal(b'{"\xc3\xa9": 1, "instances": [1e400]}') == too_big + "24"  # offsets count bytes
    assert refusal(b'{"instances": [1,]}').endswith("at offset: 17")
    inputs, _ = json_codec.decode_predict(json_codec.parse_body(b'{"instances": [[Infinity, -Infinity]]}'), ONE_INPUT)
    assert np.isinf(inputs["x"]).all()  # the tokens that mean infinity still do


def test_null_in_a_numeric_tensor_is_named_as_null():
    assert refusal(b'{"instances": [[1.0, null]]}') == (
        "Failed to process element: 0 of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: null Type: "
        "Null is not of expected type: float")
    assert refusal(b'{"inputs": [[1.0, null]]}') == (
        "JSON Value: null Type: Null is not of expected type: float")


def test_string_inputs_of_too_many_dimensions_or_too_deep_are_refused():
    strings = {"s": tf.string}
    assert "more than 32 dimensions" in refusal(b'{"instances": ' + b"[" * 40 + b'"a"' + b"]" * 40 + b"}", strings)
    ragged_deep = b'{"instances": [["a"], ' + b"[" * 900 + b'"b"' + b"]" * 900 + b"]}"  # deep past the first row
    # json_tensor.cc AddInstanceItem (411-414): one value, as the first element, in another shape
    assert refusal(ragged_deep, strings) == (
        "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting shape [1] but "
        "got: [" + ",".join(["1"] * 900) + "]")
    # FillTensorProto (363-366): a list below the rank the first elements give
    assert refusal(b'{"inputs": [["a"], ' + b"[" * 900 + b'"b"' + b"]" * 900 + b"]}", strings) == (
        "Encountered list at unexpected level: 2 expected < 2")


def test_texts_as_tf_servings_json_tensor_cc_words_them():
    """util/json_tensor.cc (2.16.1): FormatError prefixes "JSON Value: <document> "; DataTypeString names
    types (float, not float32); JsonTypeString calls booleans True/False; the item and tensor are named; a row
    format element's error is wrapped (531: "Failed to process element: <i> of 'instances' list. Error: "
    and the status, absl::Status::ToString "INVALID_ARGUMENT: <message>")."""
    assert refusal(b'{"instances": 1}').startswith("JSON Value: ")
    assert refusal(b'{"instances": 1}').endswith(" Expecting 'instances' to be an list/array")
    assert refusal(b'{"instances": []}').endswith(" No values in 'instances' array")
    assert refusal(b'{"instances": [[1.0], {"x": 1}]}') == (
        "Expecting value/list but got object at item 1 of input list")
    element = "Failed to process element: 0 of 'instances' list. Error: INVALID_ARGUMENT: "
    assert refusal(b'{"instances": [["a"]]}') == (
        element + 'JSON Value: "a" Type: String is not of expected type: float')
    assert refusal(b'{"instances": [true]}') == (
        element + "JSON Value: true Type: True is not of expected type: float")
    assert refusal(b'{"inputs": [true]}') == "JSON Value: true Type: True is not of expected type: float"
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


# -- TF Serving 2.16.1's texts where ours differed. Sources: tensorflow_serving/util/json_tensor.cc and
# rapidjson 1.1.0 (TF Serving's workspace.bzl pins it), include/rapidjson/{reader,prettywriter,writer,
# encodings}.h and internal/dtoa.h.
INT32 = {"x": tf.int32}
TWO_INTS = {"a": tf.int64, "b": tf.int64}
ELEMENT_0 = "Failed to process element: 0 of 'instances' list. Error: "


def test_a_row_object_with_a_key_the_signature_has_not():
    """FillTensorMapFromInstancesList (503-512) hands each member to AddInstanceItem in the order sent, which
    refuses a name not in the signature (394-396); the failure is wrapped with the element and the key."""
    assert refusal(b'{"instances": [{"x": 1, "z": 2}]}', INT32) == (
        "Failed to process element: 0 key: z of 'instances' list. Error: INVALID_ARGUMENT: JSON object: "
        "does not have named input: z")
    # a member missing instead: the keys are compared after the members (514-519), the object pretty-printed
    assert refusal(b'{"instances": [{"a": 1}, {"b": 2}]}', TWO_INTS) == (
        "Failed to process element: 0 of 'instances' list. JSON object: {\n    \"a\": 1\n} keys must be "
        "equal to: a,b")


def test_an_integer_input_given_a_decimal():
    """AddValueToTensor (249-265): an int32 takes rapidjson's IsInt(), an int64 IsInt64(), which a JSON
    number written with a point or an exponent is not; TypeError (209-213) quotes it through
    JsonValueToString, which writes a lone double with WriteDecimal (121-166: "1.0", not "1"). Row format
    wraps it (509-511, 529-532); columnar returns it as it is (590)."""
    assert refusal(b'{"instances": [1.0]}', INT32) == (
        ELEMENT_0 + "INVALID_ARGUMENT: JSON Value: 1.0 Type: Number is not of expected type: int32")
    assert refusal(b'{"instances": [{"a": [1, 2.5], "b": 1}]}', TWO_INTS) == (
        "Failed to process element: 0 key: a of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: 2.5 "
        "Type: Number is not of expected type: int64")
    assert refusal(b'{"inputs": {"x": [[1, 2], [3, 1e2]]}}', INT32) == (
        "JSON Value: 100.0 Type: Number is not of expected type: int32")
    # IsInt() is also false past int32, IsUint() for a negative number, IsBool() for a number
    assert refusal(b'{"inputs": [2147483648]}', INT32) == (
        "JSON Value: 2147483648 Type: Number is not of expected type: int32")
    assert refusal(b'{"inputs": [-1]}', {"u": tf.uint32}) == (
        "JSON Value: -1 Type: Number is not of expected type: uint32")
    assert refusal(b'{"inputs": [1, 0]}', {"b": tf.bool}) == (
        "JSON Value: 1 Type: Number is not of expected type: bool")


def test_instances_of_other_sizes_or_shapes():
    """AddInstanceItem (405-415), as json_tensor_test.cc SingleUnnamedTensorErrors (637-659) sends them."""
    assert refusal(b'{"instances": [[1,2],[3,4],[5,6,7]]}', INT32) == (
        "Failed to process element: 2 of 'instances' list. Error: INVALID_ARGUMENT: Expecting tensor size: 2 "
        "but got: 3")
    assert refusal(b'{"instances": [[1,2],[3,4],[[5,6]]]}', INT32) == (
        "Failed to process element: 2 of 'instances' list. Error: INVALID_ARGUMENT: Expecting shape [2] but "
        "got: [1,2]")
    assert refusal(b'{"instances": [1, [1]]}', INT32) == (
        "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting shape [] but "
        "got: [1]")
    # FillTensorProto (341-374) within one element
    assert refusal(b'{"inputs": [[1, 2], [3]]}', INT32) == (
        "Encountered list at unexpected size: 1 at level: 1 expected size: 2")
    assert refusal(b'{"inputs": [[1, 2], 3]}', INT32) == (
        "JSON Value: 3 found at incorrect level: 2 in the JSON DOM. Expected at level: 2")


@pytest.mark.parametrize("dtype, name", [(tf.float16, "half"), (tf.bfloat16, "bfloat16"),
                                         (tf.uint16, "uint16")])
def test_a_dtype_json_values_do_not_convert_to_is_unimplemented(dtype, name):
    """AddValueToTensor's default case (282-285): UNIMPLEMENTED "Conversion of JSON Value: <v> to type: <d>"
    (DataTypeString: half) for any dtype but float, double, int8/16/32/64, uint8/32/64, string, bool.
    Columnar returns it as it is (REST 501, http_server.cc:74-75); row format wraps it in INVALID_ARGUMENT
    (529-532)."""
    with pytest.raises(ServingError) as raised:
        json_codec.decode_predict(json_codec.parse_body(b'{"inputs": [[1.5, 2]]}'), {"h": dtype})
    assert (raised.value.code.name, raised.value.http_status, raised.value.message) == (
        "UNIMPLEMENTED", 501, f"Conversion of JSON Value: 1.5 to type: {name}")
    assert refusal(b'{"instances": ["a"]}', {"h": dtype}) == (
        ELEMENT_0 + f'UNIMPLEMENTED: Conversion of JSON Value: "a" to type: {name}')
    # an object is FillTensorProto's TypeError before any conversion (351-354)
    assert refusal(b'{"inputs": [{"k": 1}]}', {"h": dtype}) == (
        f'JSON Value: {{\n    "k": 1\n}} Type: Object is not of expected type: {name}')


def decoded(body: bytes, dtypes) -> dict:
    return {name: array.tolist() for name, array in
            json_codec.decode_predict(json_codec.parse_body(body), dtypes)[0].items()}


def test_bytes_that_are_not_utf8_in_a_string_reach_the_tensor_as_they_are():
    """ParseJson (431) parses with kParseNanAndInfFlag only, not kParseValidateEncodingFlag: rapidjson's
    ParseStringToStream (reader.h:897-902) then copies a string's bytes with Transcoder<UTF8, UTF8>::Transcode
    (encodings.h:691-696, "Just copy one code unit"); outside a string such a byte is an invalid value."""
    strings = {"s": tf.string}
    assert decoded(b'{"instances": ["a\xffb", "\xc3\xa9", "\xed\xa0\x80"]}', strings) == {
        "s": [b"a\xffb", b"\xc3\xa9", b"\xed\xa0\x80"]}
    assert decoded(b'{"inputs": {"s": [["\xfe"]]}}', strings) == {"s": [[b"\xfe"]]}
    example = tf.train.Example.FromString(json_codec.decode_examples(
        json_codec.parse_body(b'{"examples": [{"name": ["\xff", "ok"]}]}'))[0])
    assert list(example.features.feature["name"].bytes_list.value) == [b"\xff", b"ok"]
    assert refusal(b'{"instances": [\xff]}', strings) == "JSON Parse error: Invalid value. at offset: 15"
    with pytest.raises(ServingError, match="Unable to base64 decode"):  # absl::Base64Unescape refuses it
        decoded(b'{"instances": [{"b64": "\xff"}]}', strings)


def test_control_characters_in_a_string_are_rapidjsons_parse_errors():
    """reader.h ParseStringToStream (891-895): a NUL is kParseErrorStringMissQuotationMark, another control
    character kParseErrorStringEscapeInvalid, at its offset (en.h:53-54)."""
    assert refusal(b'{"instances": ["a\x01"]}') == (
        "JSON Parse error: Invalid escape character in string. at offset: 17")
    assert refusal(b'{"instances": ["a\x00"]}') == (
        "JSON Parse error: Missing a closing quotation mark in string. at offset: 17")


def test_quoted_json_is_pretty_printed_as_rapidjson_writes_it():
    """JsonValueToString (169-183) writes with RapidJsonWriter = rapidjson::PrettyWriter (89): 4-space
    indent, one member or element a line, "key": value (prettywriter.h PrettyPrefix); doubles by
    Writer::Double (internal/dtoa.h Prettify: 1e21, 1e-7, 0.001); a lone double by WriteDecimal (121-166);
    strings escaped by Writer::WriteString (\\u001F upper-case, other characters as they are)."""
    document = (b'{"instances": [[1.5, 1e21, 0.001, 1e-7, 100.0]], "inputs": {"s": "\xc3\xa9\\u001f"}, '
                b'"e": {}}')
    assert refusal(document) == (  # (cut, as all quoted JSON here, after 200 characters: none is cut here)
        'JSON Value: {\n    "instances": [\n        [\n            1.5,\n            1e21,\n'
        '            0.001,\n            1e-7,\n            100.0\n        ]\n    ],\n    "inputs": {\n'
        '        "s": "\xe9\\u001F"\n    },\n    "e": {}\n} Not formatted correctly expecting only one of '
        "'inputs' or 'instances' keys to exist ")
    # WriteDecimal: absl::StrCat's six digits when they read back as the float, else max_digits10 (9)
    assert refusal(b'{"inputs": [0.123456789]}', INT32) == (
        "JSON Value: 0.123456791 Type: Number is not of expected type: int32")
    assert refusal(b'{"inputs": [2.5e10]}', INT32) == (
        "JSON Value: 2.5e+10 Type: Number is not of expected type: int32")
    assert refusal(b'[1, 2]') == "JSON Value: [\n    1,\n    2\n] Is not object"
