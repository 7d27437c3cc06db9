"""A gRPC echo with raw-bytes methods (no generated code), for the real-client tests.

    grpc_echo.py serve PORT          unary /shoal.test.Echo/Unary and bidi /shoal.test.Echo/Chat
    grpc_echo.py call TARGET         one unary call and a 3-message bidi stream with a default
                                     channel (grpcio's defaults: its own resolver, AF_INET6
                                     sockets); prints a JSON summary
"""
from __future__ import annotations

import json
import sys
from concurrent import futures

import grpc

UNARY, CHAT = "/shoal.test.Echo/Unary", "/shoal.test.Echo/Chat"


def serve(port: int) -> None:
    def unary(request: bytes, context) -> bytes:
        return b"echo " + request + b" peer " + context.peer().encode()

    def chat(requests, context):
        for request in requests:
            yield b"echo " + request

    handler = grpc.method_handlers_generic_handler("shoal.test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    print(f"serving on {port}", flush=True)
    server.wait_for_termination()


def call(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        unary = channel.unary_unary(UNARY)(b"hello", timeout=10)
        chat = [r.decode() for r in channel.stream_stream(CHAT)(iter([b"1", b"2", b"3"]), timeout=10)]
    print(json.dumps({"unary": unary.decode(), "chat": chat}))


if __name__ == "__main__":
    serve(int(sys.argv[2])) if sys.argv[1] == "serve" else call(sys.argv[2])
