"""Errors a request can end in, with the gRPC code TF Serving uses and the HTTP status its REST API maps to."""
from __future__ import annotations

import grpc

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}


# An error message often echoes what the client sent (a name, a value): bounded whatever it sent. gRPC sends a
# status message percent-encoded (3 bytes for each non-ASCII byte) and refuses one over 16 KiB (over 8 KiB,
# at random): 2,000 bytes stay under 6 KiB on the wire, and the client reads the reason, not RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 2000


def bounded_message(message: str) -> str:
    """`message` as an answer may carry it: encodable (a lone UTF-16 surrogate, which a client can send as a
    JSON escape, is written as its escape) and at most MAX_MESSAGE_BYTES of UTF-8, cut on a character."""
    encoded = message.encode("utf-8", "backslashreplace")
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return message if len(encoded) == len(message) else encoded.decode("utf-8")
    kept = encoded[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore")
    return f"{kept}... ({len(encoded) - len(kept.encode()):,} more bytes)"


class ServingError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None):
        message = bounded_message(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self._http_status = http_status

    @property
    def http_status(self) -> int:
        return self._http_status or _HTTP_STATUS.get(self.code, 500)


def invalid_argument(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNAVAILABLE, message)


def too_large(limit: int) -> ServingError:
    """A request over --max_request_body_bytes: REST's 413, gRPC's RESOURCE_EXHAUSTED (as grpc refuses a
    message over its limit)."""
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Request body too large: the limit is {limit} bytes "
                        "(--max_request_body_bytes)", http_status=413)


class ModelRunError(ServingError):
    """TensorFlow refused to run the model on what it was fed (e.g. a shape the graph cannot take)."""

    def for_request(self, inputs: dict) -> ServingError:
        """The error as the client should see it: TensorFlow's reason and the shapes the client sent (not
        those of a merged batch)."""
        sent = ", ".join(f"{alias} [{','.join(str(d) for d in getattr(value, 'shape', ()))}]"
                         for alias, value in sorted(inputs.items()))
        return ServingError(self.code, f"{self.message} (the model refused the inputs: {sent})")
