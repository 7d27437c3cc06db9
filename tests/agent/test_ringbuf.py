"""The mmap ring reader on a real BPF ring buffer, records written by the kernel."""
import os

import pytest

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture
def producer():
    if os.geteuid() != 0:
        pytest.skip("needs root: loads a BPF program")
    from shoal.perf.scenarios.flows import KernelProducer

    kernel = KernelProducer()
    yield kernel
    kernel.close()


def test_reader_delivers_every_record_across_wraparound_and_store_decodes_them(producer):
    from shoal.agent.hubble import HubbleConfig, HubbleServer
    from shoal.agent.ringbuf import RingReader
    from shoal.api.flow import flow_pb2 as F
    from shoal.datapath.structs import RINGBUF_BYTES

    server = HubbleServer(HubbleConfig(node_name="node-1", tcp_address=None, capacity=64), None)
    reader = RingReader(producer.ring_fd, RINGBUF_BYTES, server.kernel_records)
    try:
        total = 0
        for _ in range(12):                   # 12 x 3000 records of 48 bytes: the 256 KiB ring wraps
            producer.run(3000)
            total += reader.consume()
        assert total == 36000 and producer.lost() == 0
        assert server.store.head == 36000 and len(server.store) == 64
        ts, raw = server.store.get(server.store.head - 1)
        flow = server.enricher.kernel_flow(raw)
        assert (flow.IP.source, flow.l4.TCP.destination_port, flow.verdict) == ("10.244.1.2", 8080, F.FORWARDED)
        assert flow.source.identity == 1001 and abs(flow.time.ToNanoseconds() - ts) == 0
        processed, _ = server.metrics._fold_raw()
        assert processed[("L3_L4", "tc", "FORWARDED")] == 36000
    finally:
        reader.stop()


def test_bad_ring_size_is_rejected():
    from shoal.agent.ringbuf import RingReader

    with pytest.raises(ValueError, match="power of two"):
        RingReader(0, 1000, lambda batch: None)
