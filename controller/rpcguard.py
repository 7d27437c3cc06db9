"""What every gRPC call to the controller passes before any handler runs.

* Authentication on the call's metadata, in a server interceptor, BEFORE gRPC reads the
  request body: a refused unary call is answered with a handler that never reads a message,
  so an unauthenticated sender's body stays in the kernel/HTTP/2 window (a few hundred KB at
  most), never in our heap; a refused stream reads its first message (bounded, never
  decoded) so the client's write is done before the status comes (``_refusal``). (Four 200 MiB SignCertificate requests without a token used to
  take the controller from 76 MB to 1.65 GB: the body was decoded, then the token checked.)
* Size limits per method: gRPC's receive limit is one number for the whole server
  (``MAX_REQUEST_BYTES``, what the config stream's resume hello needs); each method's own,
  smaller limit is checked on the raw bytes before protobuf decodes them (a CSR is 16 KiB).

The authenticated node is handed to the handler as a third argument, so handlers never
look at caller-declared metadata.

Every refusal is counted (``shoal_controller_auth_failures_total``,
``shoal_controller_bad_requests_total``); its warning is logged at most once a second
per method and reason, saying how many were held back (a flood of refused calls used to
be a flood of log lines).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import grpc

from shoal.controller.auth import Authenticator, AuthError, AuthUnavailable
from shoal.controller.metrics import ControllerMetrics
from shoal.ratelog import LogLimiter, held_note

log = logging.getLogger(__name__)

# The largest message any method takes: the config stream's hello lists every resource the
# node already holds (name + version, ~60 bytes each: 20k pods and services fit in ~2 MB).
MAX_REQUEST_BYTES = 8 * 1024 * 1024


class TooLarge:
    """What the decoder hands the handler instead of a message past the method's limit."""

    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit

    def __str__(self) -> str:
        return f"request of {self.size} bytes exceeds this method's limit of {self.limit} bytes"


def decoder(message_type, rpc: str, limit: int, metrics: ControllerMetrics) -> Callable[[bytes], Any]:
    """A request deserializer that refuses (counts, and returns TooLarge for) anything past
    ``limit`` before protobuf allocates a thing, and counts undecodable messages."""
    limiter = LogLimiter()

    def decode(data: bytes):
        if len(data) > limit:
            metrics.bad_requests.labels(rpc).inc()
            if (held := limiter.allow("too_large")) is not None:
                log.warning("refused a %d-byte %s request (limit %d)%s", len(data), rpc, limit, held_note(held))
            return TooLarge(len(data), limit)
        try:
            return message_type.FromString(data)
        except Exception:  # protobuf's DecodeError and friends, depending on the backend
            metrics.bad_requests.labels(rpc).inc()
            if (held := limiter.allow("undecodable")) is not None:
                log.warning("refused an undecodable %s request (%d bytes)%s", rpc, len(data), held_note(held))
            raise
    return decode


# How long a refused streaming call waits for the client's first message (see _refusal).
FIRST_MESSAGE_WAIT = 2.0


def _refusal(code: grpc.StatusCode, message: str, rpc: str, client_streaming: bool,
             limiter: LogLimiter) -> grpc.RpcMethodHandler:
    """A handler that answers ``code``. A stream-stream handler's behaviour runs before any
    message is received, whatever the client sent, so a unary request is never read.

    A client-streaming call (the config stream) is refused after its first message (or
    after ``FIRST_MESSAGE_WAIT`` without one): a status that arrives while the client's
    first ``write`` is still in flight fails that write, and grpc's client then reports
    INTERNAL ("Internal error from Core") instead of our code (about 1 call in 60 under
    load). That message is bounded by the server's receive limit, and never decoded."""
    async def refuse(requests, context):
        if (held := limiter.allow((rpc, code))) is not None:
            log.warning("%s from %s refused: %s%s", rpc, context.peer(), message, held_note(held))
        if client_streaming:
            try:
                await asyncio.wait_for(anext(aiter(requests), None), FIRST_MESSAGE_WAIT)
            except asyncio.TimeoutError:
                pass   # it sent nothing: no write of its can be in flight
        await context.abort(code, message)
    return grpc.stream_stream_rpc_method_handler(refuse)


def _with_node(handler: grpc.RpcMethodHandler, node: str) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour called as ``behaviour(request, context, node)``."""
    if handler.unary_unary is not None:
        behaviour = handler.unary_unary

        async def unary(request, context):
            return await behaviour(request, context, node)
        return handler._replace(unary_unary=unary)
    if handler.stream_stream is not None:
        streaming = handler.stream_stream

        async def stream(requests, context):
            async for item in streaming(requests, context, node):
                yield item
        return handler._replace(stream_stream=stream)
    raise TypeError("only unary-unary and stream-stream methods are authenticated")


class NodeAuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call of ``services`` on its metadata; counts refusals."""

    def __init__(self, authenticator: Authenticator, metrics: ControllerMetrics,
                 services: tuple[str, ...]) -> None:
        self.authenticator = authenticator
        self.metrics = metrics
        self._prefixes = tuple(f"/{s}/" for s in services)
        self._log_limiter = LogLimiter()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefixes):
            return handler
        rpc = details.method.rsplit("/", 1)[-1]
        try:
            node = await self.authenticator.authenticate(details.invocation_metadata)
        except AuthUnavailable as err:
            self.metrics.auth_failures.labels(rpc, err.reason).inc()
            return _refusal(grpc.StatusCode.UNAVAILABLE, str(err), rpc, handler.request_streaming,
                            self._log_limiter)
        except AuthError as err:
            self.metrics.auth_failures.labels(rpc, err.reason).inc()
            return _refusal(grpc.StatusCode.UNAUTHENTICATED, str(err), rpc, handler.request_streaming,
                            self._log_limiter)
        return _with_node(handler, node)
