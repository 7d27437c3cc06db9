"""TLS on the flow APIs: agents (4244) and the relay (4245) require a client certificate
from the Hubble CA; the relay dials agents with mTLS; no plaintext TCP unless asked for."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shoal.agent.hubble import HubbleConfig, HubbleServer
from shoal.api.observer import observer_pb2 as O
from shoal.api.observer import observer_pb2_grpc
from shoal.cli.observe.client import Connection
from shoal.controller.relay import NodeTarget, Relay
from shoal.hubbletls import (
    CLI_CLIENT,
    RELAY_CLIENT,
    RELAY_SERVER,
    RELAY_SERVER_NAME,
    HubbleCertificates,
    node_server_name,
)
from tests.shoal.flows.flowbed import demo_state, kernel_event

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def secured(tmp_path):
    """One agent on TCP with mTLS, a relay on TCP with mTLS dialling it over TCP."""
    certificates = HubbleCertificates(tmp_path / "hubble-tls")
    certificates.ensure("test", {"node-1": "127.0.0.1"}, [])
    node = HubbleServer(HubbleConfig(node_name="node-1", tcp_address="127.0.0.1:0",
                                     tls=certificates.node("node-1")), demo_state())
    await node.start()
    node.kernel_sink(kernel_event())
    relay = Relay([NodeTarget("node-1", f"127.0.0.1:{node.tcp_port}", node_server_name("node-1", "test"))],
                  tcp_address="127.0.0.1:0", tls=certificates.files(RELAY_SERVER),
                  client_tls=certificates.files(RELAY_CLIENT), node_timeout_s=3)
    await relay.start()
    yield certificates, node, relay
    await relay.stop(grace=0)
    await node.stop(grace=0)


async def flows_via(channel) -> int:
    stub = observer_pb2_grpc.ObserverStub(channel)
    return len([r async for r in stub.GetFlows(O.GetFlowsRequest(), timeout=5) if r.HasField("flow")])


async def test_cli_certificate_reads_flows_through_the_relay_over_mtls(secured):
    certificates, _, relay = secured
    target = Connection(f"127.0.0.1:{relay.tcp_port}", certificates.files(CLI_CLIENT), RELAY_SERVER_NAME)
    async with target.channel(aio=True) as channel:
        assert await flows_via(channel) == 1            # relay -> agent over mTLS worked
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="hubble.server.Observer"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        status = await observer_pb2_grpc.ObserverStub(channel).ServerStatus(O.ServerStatusRequest(), timeout=5)
        assert status.num_connected_nodes.value == 1 and status.seen_flows == 1


async def test_no_certificate_wrong_ca_or_plaintext_is_refused(secured, tmp_path):
    certificates, node, relay = secured
    stranger = HubbleCertificates(tmp_path / "another-ca")          # e.g. any pod's own CA
    stranger.ensure("test", {}, [])
    ca = certificates.files(CLI_CLIENT).ca
    no_cert = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    wrong_ca_cert = stranger.files(CLI_CLIENT)
    wrong = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(),
                                         private_key=wrong_ca_cert.key.read_bytes(),
                                         certificate_chain=wrong_ca_cert.cert.read_bytes())
    for port, name in ((relay.tcp_port, RELAY_SERVER_NAME), (node.tcp_port, node_server_name("node-1", "test"))):
        override = [("grpc.ssl_target_name_override", name)]
        for channel in (grpc.aio.secure_channel(f"127.0.0.1:{port}", no_cert, override),
                        grpc.aio.secure_channel(f"127.0.0.1:{port}", wrong, override),
                        grpc.aio.insecure_channel(f"127.0.0.1:{port}")):
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await flows_via(channel)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tcp_is_not_served_without_certificates_unless_plaintext_is_asked_for():
    quiet = HubbleServer(HubbleConfig(node_name="n", tcp_address="127.0.0.1:0"), demo_state())
    await quiet.start()
    assert quiet.tcp_port is None
    await quiet.stop(grace=0)
    local = HubbleServer(HubbleConfig(node_name="n", tcp_address="127.0.0.1:0", insecure_tcp=True), demo_state())
    await local.start()
    assert local.tcp_port
    await local.stop(grace=0)


def test_certificates_are_private_and_issued_once(tmp_path):
    certificates = HubbleCertificates(tmp_path / "tls")
    certificates.ensure("c", {"node-1": "172.18.0.11"}, ["172.18.0.1"])
    first = certificates.node("node-1").cert.read_bytes()
    certificates.ensure("c", {"node-1": "172.18.0.11", "node-2": "172.18.0.12"}, ["172.18.0.1"])
    assert certificates.node("node-1").cert.read_bytes() == first and certificates.node("node-2").exists()
    for key in (tmp_path / "tls").glob("*key.pem"):
        assert key.stat().st_mode & 0o077 == 0, key
    assert (tmp_path / "tls").stat().st_mode & 0o077 == 0


def test_kubernetes_set_shares_one_wildcard_node_certificate(tmp_path):
    from cryptography import x509

    from shoal.hubbletls import main

    assert main(["--out", str(tmp_path / "k8s"), "--cluster", "prod"]) == 0
    certificates = HubbleCertificates(tmp_path / "k8s")
    files = certificates.node("any-node")
    assert files.exists() and files.cert.name == "server.pem"
    sans = x509.load_pem_x509_certificate(files.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert sans == ["*.prod.hubble-grpc.cilium.io"]
    assert "any-node.prod.hubble-grpc.cilium.io".endswith(sans[0][1:])
