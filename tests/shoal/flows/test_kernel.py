"""Flow records from the kernel: decoded, garbage refused."""
from __future__ import annotations

import pytest

from shoal.datapath.structs import Addr, FlowRecord
from shoal.flows.kernel import MalformedRecord, decode


def test_flow_record_decodes_and_rejects_garbage():
    record = FlowRecord(ts_ns=5, src_ip=Addr.of("10.244.1.4"), dst_ip=Addr.of("fd00:10:244::2"),
                        src_port=40000, dst_port=7000, src_identity=300, dst_identity=200, protocol=6,
                        verdict=2, direction=1, kind=3, tcp_flags=2, drop_reason=181)
    event = decode(bytes(record))
    assert (event.src_ip, event.dst_ip, event.dst_port, event.verdict, event.direction, event.kind,
            event.drop_reason, event.protocol) == ("10.244.1.4", "fd00:10:244::2", 7000, "DROPPED", "INGRESS",
                                                   "tc", 181, "TCP")
    with pytest.raises(MalformedRecord):
        decode(b"\x00" * 8)
    record.verdict = 99
    with pytest.raises(MalformedRecord):
        decode(bytes(record))
