"""Issue 11: a flows query built to backtrack (ReDoS) cannot delay policy reaching the kernel.

node-1's flow store is filled with HTTP flows whose path makes ``^/(a+)+$`` backtrack
exponentially under a backtracking engine (2^40 steps per flow); clients hammer node-1's
Observer with that filter while a DENY is applied, and the test measures how long the
DENY takes from the API call to node-1's kernel map."""
from __future__ import annotations

import socket
import threading
import time
import zlib

import grpc
import pytest

from shoal.api.observer import observer_pb2, observer_pb2_grpc
from shoal.flows.emitter import encode_flow
from shoal.flows.records import http_flow
from shoal.local.apiclient import ApiClient
from tests.conftest import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

NODE = "node-1"
EVIL_PATH = "/" + "a" * 40 + "!"
REDOS_FILTER = "^/(a+)+$"
POLICY = {"apiVersion": "security.shoal.io/v1", "kind": "AuthorizationPolicy",
          "metadata": {"name": "redos-deny-client-db", "namespace": "demo"},
          "spec": {"selector": {"matchLabels": {"app": "db"}}, "action": "DENY",
                   "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}],
                              "to": [{"operation": {"ports": ["7001"]}}]}]}}
RULE_ID = zlib.crc32(b"demo/redos-deny-client-db") or 1


def fill_store_with_evil_paths(path, count: int = 1500) -> None:
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for index in range(count):
            flow = http_flow("10.244.1.2", 40000 + index % 20000, "10.244.2.3", 8080, kind="request",
                             method="GET", url=EVIL_PATH)
            sender.sendto(encode_flow(flow), str(path))
            if index % 100 == 99:
                time.sleep(0.01)          # let the agent drain its socket
    finally:
        sender.close()


def redos_query(address: str) -> float:
    request = observer_pb2.GetFlowsRequest(number=2**64 - 1)
    request.whitelist.add(http_path=[REDOS_FILTER])
    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        for _ in observer_pb2_grpc.ObserverStub(channel).GetFlows(request, timeout=60):
            pass
    return time.monotonic() - started


def kernel_rule_present(pin_dir) -> bool:
    from shoal.agent.mapsync import DatapathMaps

    maps = DatapathMaps(pin_dir)
    try:
        return RULE_ID in maps.policies().values()
    finally:
        maps.close()


def test_redos_filter_cannot_delay_a_deny(demo_cluster):
    layout = demo_cluster.layout
    fill_store_with_evil_paths(layout.flows_socket(NODE))
    address = f"unix:{layout.hubble_socket(NODE)}"

    def stored():
        request = observer_pb2.GetFlowsRequest(number=2**64 - 1)
        request.whitelist.add(http_path=["^/a+!$"])
        with grpc.insecure_channel(address) as channel:
            return sum(1 for r in observer_pb2_grpc.ObserverStub(channel).GetFlows(request, timeout=30)
                       if r.HasField("flow") and r.flow.l7.http.url == EVIL_PATH) >= 500
    eventually(stored, "the evil paths in node-1's flow store")

    durations: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                durations.append(redos_query(address))
            except grpc.RpcError as error:
                errors.append(error)
                return

    workers = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    api = ApiClient(layout.api_socket)
    pin_dir = layout.bpf_pin_dir(NODE)
    try:
        time.sleep(1.0)                               # queries in flight
        applied = time.monotonic()
        api.apply([POLICY])
        eventually(lambda: kernel_rule_present(pin_dir), "the DENY in node-1's kernel map",
                   timeout=30, interval=0.02)
        latency = time.monotonic() - applied
        print(f"policy-to-kernel latency under ReDoS query load: {latency * 1000:.0f} ms; "
              f"{len(durations)} queries done, slowest {max(durations, default=0) * 1000:.0f} ms")
        assert latency <= 1.0, f"DENY took {latency:.2f}s to reach the kernel under query load"
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
        api.delete([POLICY])
    assert not errors, errors
    assert durations, "no query completed"
    assert max(durations) < 10, f"a ReDoS query ran {max(durations):.1f}s"
    eventually(lambda: not kernel_rule_present(pin_dir), "the DENY removed from the kernel")
