"""Error messages carry what the client sent back to it: bounded, and always encodable."""
import grpc
import orjson

from conveyor_ml.serving.errors import MAX_MESSAGE_BYTES, ServingError, bounded_message, invalid_argument


def test_a_long_message_is_cut_and_says_how_much_was_left_out():
    message = bounded_message("x" * (MAX_MESSAGE_BYTES + 12345))
    assert message == "x" * MAX_MESSAGE_BYTES + "... (12,345 more bytes)"
    assert bounded_message("short") == "short"


def test_the_bound_counts_utf8_bytes_and_cuts_on_a_character():
    message = bounded_message("€" * 5000)  # 3 bytes each: gRPC writes each byte as %XX on the wire
    kept = message.split("...")[0]
    assert kept == "€" * (MAX_MESSAGE_BYTES // 3)
    assert message.endswith(f"({15000 - len(kept.encode()):,} more bytes)")


def test_a_lone_surrogate_is_written_as_its_escape():
    message = invalid_argument('Serving signature key "\ud800" not found.').message
    assert message == 'Serving signature key "\\ud800" not found.'
    assert orjson.loads(orjson.dumps({"error": message}))["error"] == message  # encodable as JSON


def test_every_serving_error_is_bounded():
    error = ServingError(grpc.StatusCode.NOT_FOUND, "m" * (8 << 20))
    assert len(error.message.encode()) < MAX_MESSAGE_BYTES + 100 and str(error) == error.message

