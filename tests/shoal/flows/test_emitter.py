"""Flow records in batches (issue 18): one datagram carries many, and none is lost."""
from __future__ import annotations

import socket

import pytest

from shoal.api.flow import flow_pb2
from shoal.flows.emitter import (
    KIND_BATCH,
    KIND_FLOW,
    MAX_BATCH_BYTES,
    FlowEmitter,
    decode_batch,
    encode_batches,
    encode_flow,
)
from shoal.flows.records import l4_flow


def _flows(count: int) -> list[flow_pb2.Flow]:
    return [l4_flow("10.244.1.2", 10000 + i, "10.244.2.3", 8080, event="close", mtls=True,
                    src_spiffe="spiffe://cluster.local/ns/a/sa/client", dst_spiffe="spiffe://cluster.local/ns/b/sa/db",
                    bytes_sent=i, bytes_received=2 * i) for i in range(count)]


def test_batches_keep_every_record_in_order_within_the_size_limit():
    records = [encode_flow(flow) for flow in _flows(1000)]
    batches = encode_batches(records)
    assert 1 < len(batches) <= 1000 * len(records[0]) // MAX_BATCH_BYTES + 2
    assert all(len(datagram) <= MAX_BATCH_BYTES for datagram, _ in batches)
    assert sum(count for _, count in batches) == 1000
    unpacked = [inner for datagram, _ in batches for inner in decode_batch(datagram[1:])]
    assert unpacked == records


def test_a_single_record_goes_as_itself():
    [(datagram, count)] = encode_batches([encode_flow(_flows(1)[0])])
    assert datagram[:1] == KIND_FLOW and count == 1


@pytest.mark.parametrize("body", [b"\x05\x00", b"\x05\x00\x00\x00Fabc", b"\x00\x00\x00\x00"])
def test_a_cut_or_lying_batch_is_refused(body):
    with pytest.raises(ValueError):
        decode_batch(body)


def test_emit_many_sends_few_datagrams_and_the_receiver_gets_every_flow(tmp_path):
    path = tmp_path / "flows.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    receiver.bind(str(path))
    receiver.setblocking(False)
    flows = _flows(600)
    with FlowEmitter(path) as emitter:
        assert emitter.emit_many(flows) == 600
        assert emitter.sent == 600 and emitter.dropped == 0
    datagrams = []
    while True:
        try:
            datagrams.append(receiver.recv(65536))
        except BlockingIOError:
            break
    receiver.close()
    assert len(datagrams) <= 600 * len(encode_flow(flows[0])) // MAX_BATCH_BYTES + 2
    assert all(d[:1] == KIND_BATCH for d in datagrams)
    got = [flow_pb2.Flow.FromString(r[1:]) for d in datagrams for r in decode_batch(d[1:])]
    assert [f.l4.TCP.source_port for f in got] == [f.l4.TCP.source_port for f in flows]


def test_a_batch_the_agent_cannot_take_counts_every_record_it_carried(tmp_path):
    with FlowEmitter(tmp_path / "nobody.sock") as emitter:
        assert emitter.emit_many(_flows(300)) == 0
        assert emitter.dropped == 300 and emitter.sent == 0
