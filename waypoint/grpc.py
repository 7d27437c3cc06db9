"""gRPC over the waypoint's HTTP/2: message-size limit and gRPC-shaped local replies (pure).

A gRPC client reads errors from ``grpc-status``, not from the HTTP status: a local reply
(no route, denied, rate limited, a message too large) to a gRPC request is a
"trailers-only" response, HTTP 200 with ``grpc-status``/``grpc-message`` in one HEADERS
frame that ends the stream, as Envoy answers. HTTP statuses map to gRPC codes as in
Envoy and gRPC's "HTTP to gRPC status code mapping".
"""
from __future__ import annotations

from urllib.parse import quote

from shoal.framescan import FrameScanner

OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, PERMISSION_DENIED, RESOURCE_EXHAUSTED = 0, 1, 2, 4, 7, 8
UNIMPLEMENTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = 12, 13, 14, 16

# TrafficPolicy ``retries.retryOn`` names for gRPC codes (Istio's / Envoy's retry_on).
RETRY_ON_CODES = {"cancelled": CANCELLED, "deadline-exceeded": DEADLINE_EXCEEDED,
                  "resource-exhausted": RESOURCE_EXHAUSTED, "unavailable": UNAVAILABLE, "internal": INTERNAL}

_FROM_HTTP = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED,
              429: UNAVAILABLE, 502: UNAVAILABLE, 503: UNAVAILABLE, 504: UNAVAILABLE}
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024    # gRPC's default receive limit


def is_grpc(content_type: str) -> bool:
    return content_type.startswith("application/grpc")


def status_of(headers: list[tuple[str, str]] | None) -> int | None:
    """The ``grpc-status`` in a header list (trailers, or a trailers-only head), if any."""
    for name, value in headers or ():
        if name == "grpc-status":
            return int(value) if value.isdigit() else UNKNOWN
    return None


def status_for_http(status: int) -> int:
    return _FROM_HTTP.get(status, UNKNOWN)


def trailers_only(grpc_status: int, message: str) -> list[tuple[str, str]]:
    """Headers of a trailers-only response (sent with HTTP status 200 and END_STREAM)."""
    return [("content-type", "application/grpc"), ("grpc-status", str(grpc_status)),
            ("grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"))]


class MessageTooLarge(ValueError):
    pass


class MessageSizeLimit:
    """Reads the 5-byte prefixes of a gRPC message stream (flag, 4-byte length) across
    arbitrary chunks and refuses a message longer than ``limit`` as soon as its prefix
    arrives, before its bytes are buffered or forwarded."""

    def __init__(self, limit: int = DEFAULT_MAX_MESSAGE) -> None:
        self.limit = limit
        self._messages = FrameScanner(5, lambda prefix: int.from_bytes(prefix[1:5], "big"))

    def feed(self, chunk: bytes) -> None:
        for prefix in self._messages.feed(chunk):
            length = int.from_bytes(prefix[1:5], "big")
            if length > self.limit:
                raise MessageTooLarge(f"gRPC message of {length} bytes (limit {self.limit})")
