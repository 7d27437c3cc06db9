"""The pure HBONE layer: two HboneConnections wired back to back, no sockets."""
from __future__ import annotations

import h2.connection
import h2.config
import pytest

from shoal.agent.ztunnel import hbone
from shoal.agent.ztunnel.hbone import (
    ConnectionEnded, HboneConnection, RequestRejected, TunnelData, TunnelEnded, TunnelRequested,
    TunnelResponse, WindowOpened, parse_authority,
)


def pump(src: HboneConnection, dst: HboneConnection) -> list:
    return dst.receive(src.data_to_send())


@pytest.fixture
def pair():
    client, server = HboneConnection(client_side=True), HboneConnection(client_side=False)
    client.initiate(), server.initiate()
    pump(client, server), pump(server, client), pump(client, server)
    return client, server


def test_connect_accept_and_carry_bytes_both_ways(pair):
    client, server = pair
    sid = client.connect("10.244.2.5", 8080, forwarded_for="10.244.1.7", traceparent=hbone.new_traceparent())
    (req,) = pump(client, server)
    assert isinstance(req, TunnelRequested)
    assert (req.host, req.port, req.forwarded_for) == ("10.244.2.5", 8080, "10.244.1.7")
    assert req.traceparent.startswith("00-")
    server.respond(sid, 200)
    assert pump(server, client) == [TunnelResponse(sid, 200)]
    assert client.send(sid, memoryview(b"ping")) == 4
    client.end(sid)
    events = pump(client, server)
    assert events[0] == TunnelData(sid, b"ping", 4) and events[1] == TunnelEnded(sid)
    server.consumed(sid, 4)
    server.send(sid, memoryview(b"pong"))
    server.end(sid)
    events = pump(server, client)
    assert [type(e) for e in events][-2:] == [TunnelData, TunnelEnded]


def test_large_windows_and_frames(pair):
    client, server = pair
    sid = client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())
    pump(client, server)
    server.respond(sid, 200)
    pump(server, client)
    payload = memoryview(bytes(8 * 1024 * 1024))
    sent = client.send(sid, payload)
    assert sent == hbone.STREAM_WINDOW  # 4 MiB in flight before any credit
    data = [e for e in pump(client, server) if isinstance(e, TunnelData)]
    assert len(data) == 4  # 1 MiB frames: Python work per frame, not per byte
    assert client.send(sid, payload[sent:]) == 0  # window exhausted: backpressure
    server.consumed(sid, sum(e.flow_controlled_length for e in data))
    assert any(isinstance(e, WindowOpened) for e in pump(server, client))
    assert client.send(sid, payload[sent:]) == 4 * 1024 * 1024


@pytest.mark.parametrize("headers,reason", [
    ([(":method", "CONNECT"), (":authority", "web.demo:80")], "not"),
    ([(":method", "CONNECT"), (":authority", "10.0.0.1:99999")], "range"),
    ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "10.0.0.1:80")], "not CONNECT"),
])
def test_malformed_connect_gets_400(headers, reason):
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    server = HboneConnection(client_side=False)
    server.initiate()
    server.receive(raw.data_to_send())
    raw.send_headers(1, headers)
    (event,) = server.receive(raw.data_to_send())
    assert isinstance(event, RequestRejected) and event.status == 400 and reason in event.reason
    answer = raw.receive_data(server.data_to_send())
    assert any(getattr(e, "headers", None) and dict(e.headers)[b":status"] == b"400" for e in answer)


def test_connect_without_authority_is_rejected():
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
    raw.initiate_connection()
    server = HboneConnection(client_side=False)
    server.initiate()
    server.receive(raw.data_to_send())
    raw.send_headers(1, [(":method", "CONNECT")])
    events = server.receive(raw.data_to_send())
    assert len(events) == 1 and isinstance(events[0], (RequestRejected, ConnectionEnded))


def test_garbage_is_a_protocol_violation_with_goaway():
    server = HboneConnection(client_side=False)
    server.initiate()
    server.data_to_send()
    (event,) = server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(event, ConnectionEnded) and event.error
    assert server.closed and server.data_to_send()  # GOAWAY queued


@pytest.mark.parametrize("text,expected", [("10.0.0.1:80", ("10.0.0.1", 80)), ("[fd00::1]:8080", ("fd00::1", 8080))])
def test_parse_authority(text, expected):
    assert parse_authority(text) == expected


@pytest.mark.parametrize("header,expected", [
    ('for="10.0.0.7:40123"', ("10.0.0.7", 40123)), ("for=10.0.0.7", ("10.0.0.7", 0)),
    ('for="[fd00::7]:443";proto=https', ("fd00::7", 443)), ('by=x; For="fd00::7"', ("fd00::7", 0)),
    ("for=unknown", (None, 0)), ("for=_hidden", (None, 0)), (None, (None, 0)),
])
def test_forwarded_for_parsing(header, expected):
    assert hbone._forwarded_for(header) == expected


def test_forwarded_carries_client_ip_and_port(pair):
    client, server = pair
    client.connect("10.0.0.1", 80, "10.244.1.7", hbone.new_traceparent(), forwarded_port=40123)
    (req,) = pump(client, server)
    assert (req.forwarded_for, req.forwarded_port) == ("10.244.1.7", 40123)


def test_stream_capacity_counts_open_tunnels(pair):
    client, server = pair
    before = client.stream_capacity
    client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())
    assert client.stream_capacity == before - 1
