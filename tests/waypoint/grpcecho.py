"""A raw-bytes gRPC service ``demo.Echo`` (no generated code) that names its backend, for
the loopback tests (``handler``) and for pods (as a script):

    python3 grpcecho.py serve NAME PORT          a grpcio server on [::]:PORT
    python3 grpcecho.py call TARGET N            N unary Say calls on one default channel, then
                                                 the error cases; prints one JSON summary line

Methods: Say (unary) answers ``<name>:<request>`` and notes the request's metadata; Fail
(unary) takes ``CODE[:N]``: the first N calls (all, without N) end with that status and a
trailing ``x-failed-by``, then OK; Count (server streaming) sends that many messages;
Chat (bidi) echoes each message.
"""
from __future__ import annotations

import collections
import json
import sys
import threading
from concurrent import futures

import grpc

SAY, FAIL, COUNT, CHAT = "/demo.Echo/Say", "/demo.Echo/Fail", "/demo.Echo/Count", "/demo.Echo/Chat"


def handler(name: str, seen: list):
    failures: dict[bytes, int] = {}
    lock = threading.Lock()

    def say(request: bytes, context) -> bytes:
        seen.append(("Say", dict(context.invocation_metadata())))
        return f"{name}:".encode() + request

    def fail(request: bytes, context) -> bytes:
        code, _, times = request.partition(b":")
        with lock:
            failures[request] = failures.get(request, 0) + 1
            calls = failures[request]
        seen.append(("Fail", calls))
        if not times or calls <= int(times):
            context.set_trailing_metadata((("x-failed-by", name),))
            context.abort(next(c for c in grpc.StatusCode if c.value[0] == int(code)), f"failed by {name}")
        return f"{name}:recovered".encode()

    def count(request: bytes, context):
        for i in range(int(request)):
            yield f"{name}:{i}".encode()

    def chat(requests, context):
        for request in requests:
            yield f"{name}:".encode() + request

    return grpc.method_handlers_generic_handler("demo.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })


def serve(name: str, port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler(name, []),))
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    print(f"serving {name} on {port}", flush=True)
    server.wait_for_termination()


def _error(call) -> dict:
    try:
        call()
    except grpc.RpcError as err:
        return {"code": err.code().name, "details": err.details(),
                "trailers": dict(err.trailing_metadata() or ())}
    return {"code": "OK"}


def call(target: str, count: int) -> None:
    """grpcio's defaults throughout (its resolver, its channel settings)."""
    backends: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    with grpc.insecure_channel(target) as channel:
        say = channel.unary_unary(SAY)
        for i in range(count):
            try:
                backends[say(str(i).encode(), timeout=10).decode().partition(":")[0]] += 1
            except grpc.RpcError as err:
                errors[err.code().name] += 1
        summary = {
            "backends": backends, "errors": errors,
            "stream": [m.decode() for m in channel.unary_stream(COUNT)(b"3", timeout=10)],
            "server_error": _error(lambda: channel.unary_unary(FAIL)(b"5", timeout=10)),   # NOT_FOUND
            "no_route": _error(lambda: channel.unary_unary("/demo.Other/Nothing")(b"", timeout=10)),
            "too_large": _error(lambda: say(b"x" * (5 << 20), timeout=20)),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        call(sys.argv[2], int(sys.argv[3]))
