"""Flow records built from node-proxy events: addresses, families and ports land in Hubble's fields."""
import pytest

from shoal.api.flow import flow_pb2
from shoal.flows import records


@pytest.mark.parametrize("src, dst, family", [
    ("10.244.1.5", "10.244.2.7", flow_pb2.IPv4),
    ("fd00:10:244:1::5", "fd00:10:244:2::7", flow_pb2.IPv6),
    ("::ffff:10.244.1.5", "::ffff:10.244.2.7", flow_pb2.IPv6),
])
def test_l4_flow_carries_the_address_family_of_its_endpoints(src, dst, family):
    flow = records.l4_flow(src, 40000, dst, 8080, event="open")
    assert (flow.IP.source, flow.IP.destination, flow.IP.ipVersion) == (src, dst, family)
    assert (flow.l4.TCP.source_port, flow.l4.TCP.destination_port) == (40000, 8080)


def test_an_unknown_l4_protocol_is_refused():
    with pytest.raises(ValueError, match="unsupported L4 protocol"):
        records.set_addresses(flow_pb2.Flow(), "10.0.0.1", "10.0.0.2", 1, 2, protocol="ICMP")
