"""The real programs on real namespaces: outbound capture, original destination,
socket-LB, inbound steering, L4 deny, flow events."""
from __future__ import annotations

import errno
import sys
import time

import pytest

from shoal.agent.compiler import PolicyEntry
from shoal.agent.netns import netns_cookie, tc_ingress_programs
from shoal.agent.ringbuf import RingReader
from shoal.config import PORT_HBONE, PORT_INBOUND_PLAINTEXT, PROXY_MARK
from shoal.datapath.origdst import OriginalDestinations
from shoal.datapath.structs import RINGBUF_BYTES
from tests.agent.agentbed import CHECKSUM_SOURCE, ID_A, ID_B, finish, pod_programs, serve_once

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

VIP = "10.96.7.7"


def test_outbound_connect_is_captured_with_original_destination(agent_bed, datapath, meshed_a):
    client = agent_bed.a.connect(agent_bed.b.ip, 8080, hold=1.0, wait=False)
    conn, data = serve_once(meshed_a)
    with OriginalDestinations(agent_bed.pin_dir) as dests:
        assert dests.lookup(conn) == (agent_bed.b.ip, 8080)
    result = finish(client)
    conn.close()
    assert data == b"ping" and result["reply"] == "pong"
    # getpeername4: the app sees the destination it asked for, not the proxy's listener
    assert result["peer"] == [agent_bed.b.ip, 8080]
    assert result["local"][0] == "127.0.0.1"


def test_origdst_entry_is_removed_when_the_connection_closes(agent_bed, datapath, meshed_a):
    _dp, maps = datapath
    before = (maps.origdst_entries(), maps.origdst_cookie_entries())
    client = agent_bed.a.connect(agent_bed.b.ip, 9090, wait=False)
    conn, _ = serve_once(meshed_a)
    finish(client)
    conn.close()
    time.sleep(0.2)
    assert (maps.origdst_entries(), maps.origdst_cookie_entries()) == before


def test_pod_socket_with_the_proxy_mark_is_still_captured_and_denied(agent_bed, datapath, meshed_a):
    """Attack (issue 11): pods run with CAP_NET_ADMIN and set SO_MARK 0x539, the proxy's
    mark. The mark exempts nothing: capture and DENY hold."""
    _dp, maps = datapath
    from shoal.agent.compiler import Endpoint
    marked = agent_bed.a.connect(agent_bed.b.ip, 8181, mark=PROXY_MARK, wait=False)
    conn, _ = serve_once(meshed_a)                     # the proxy's 15001, not b's app
    assert finish(marked)["peer"] == [agent_bed.b.ip, 8181]
    conn.close()
    maps.sync_endpoints({agent_bed.a.ip: Endpoint(ID_A, 7, 1), agent_bed.b.ip: Endpoint(ID_B, 8, 1)})
    maps.sync_policies({PolicyEntry(ID_A, ID_B, 8181, 6): 9})
    try:
        denied = agent_bed.a.connect(agent_bed.b.ip, 8181, mark=PROXY_MARK, timeout=3)
        assert not denied["ok"] and denied["errno"] == errno.EPERM
    finally:
        maps.sync_policies({})
        maps.sync_endpoints({})


def test_node_proxy_cgroup_and_unmeshed_pods_are_not_captured(agent_bed, datapath, meshed_a):
    _dp, maps = datapath
    app = agent_bed.b.listen(8181)
    try:
        before = maps.counters()["connect_skipped_proxy"]
        # the node proxy dials from inside a meshed pod's namespace, from its own cgroup, unmarked
        proxy = agent_bed.a.connect(agent_bed.b.ip, 8181, cgroup=agent_bed.proxy_cgroup, wait=False)
        conn, _ = serve_once(app)
        assert finish(proxy)["peer"] == [agent_bed.b.ip, 8181]
        conn.close()
        assert maps.counters()["connect_skipped_proxy"] > before
        # b is not enrolled: its connects go straight out
        plain = agent_bed.b.connect(agent_bed.b.ip, 8181, wait=False)
        conn, _ = serve_once(app)
        assert finish(plain)["peer"] == [agent_bed.b.ip, 8181]
        conn.close()
    finally:
        app.close()


def test_socket_lb_rewrites_vip_for_unmeshed_pods(agent_bed, datapath):
    _dp, maps = datapath
    maps.sync_services({(VIP, 80, 6): ((agent_bed.b.ip, 8282),)})
    app = agent_bed.b.listen(8282)
    try:
        client = agent_bed.a.connect(VIP, 80, wait=False)
        conn, data = serve_once(app)
        assert data == b"ping"
        assert conn.getsockname() == (agent_bed.b.ip, 8282)
        assert finish(client)["reply"] == "pong"
        conn.close()
        assert maps.counters()["connect_balanced"] >= 1
    finally:
        app.close()
        maps.sync_services({})
    assert maps.services() == {}


def test_meshed_pod_connect_to_vip_keeps_the_vip_as_original_destination(agent_bed, datapath, meshed_a):
    _dp, maps = datapath
    maps.sync_services({(VIP, 80, 6): ((agent_bed.b.ip, 8282),)})
    try:
        client = agent_bed.a.connect(VIP, 80, wait=False)
        conn, _ = serve_once(meshed_a)
        with OriginalDestinations(agent_bed.pin_dir) as dests:
            assert dests.lookup(conn) == (VIP, 80)
        finish(client)
        conn.close()
    finally:
        maps.sync_services({})


@pytest.mark.parametrize("dport,sport,expected", [
    (8080, 0, PORT_INBOUND_PLAINTEXT),
    (8080, PORT_HBONE, PORT_INBOUND_PLAINTEXT),      # spoofed source port changes nothing
    (PORT_HBONE, 0, PORT_HBONE),
    (PORT_INBOUND_PLAINTEXT, 0, PORT_INBOUND_PLAINTEXT),
])
def test_inbound_tcp_is_steered_to_the_proxy(agent_bed, datapath, meshed_b, dport, sport, expected):
    client = agent_bed.a.connect(agent_bed.b.ip, dport, sport=sport, wait=False)
    conn, data = serve_once(meshed_b[expected])
    # like TPROXY: the accepted socket keeps the original destination as its local address
    assert conn.getsockname() == (agent_bed.b.ip, dport)
    assert finish(client)["reply"] == "pong"
    conn.close()
    meshed_b[8080].settimeout(0.2)
    with pytest.raises(TimeoutError):
        meshed_b[8080].accept()
    meshed_b[8080].settimeout(3)


def test_meshed_pod_connecting_to_its_own_ip_is_captured(agent_bed, datapath, meshed_a):
    client = agent_bed.a.connect(agent_bed.a.ip, 8080, wait=False)
    conn, _ = serve_once(meshed_a)
    with OriginalDestinations(agent_bed.pin_dir) as dests:
        assert dests.lookup(conn) == (agent_bed.a.ip, 8080)
    finish(client)
    conn.close()


def test_full_ring_buffer_loses_and_counts_events(agent_bed, datapath, meshed_b):
    """Nobody reads: the kernel drops records rather than blocking, and counts them."""
    _dp, maps = datapath
    before = maps.counters()["ringbuf_lost"]
    proc = agent_bed.a.spawn(sys.executable, "-c", (
        "import socket\n"
        "for _ in range(8000):\n"
        "    s = socket.socket(); s.setblocking(False)\n"
        f"    s.connect_ex(('{agent_bed.b.ip}', 7777)); s.close()\n"))
    proc.communicate(timeout=60)
    assert maps.counters()["ringbuf_lost"] > before
    reader = RingReader(maps.fds["flow_events"], RINGBUF_BYTES, lambda batch: None)
    reader.consume()
    reader.stop()


def test_inbound_without_proxy_listener_fails_closed(agent_bed, datapath, meshed_b):
    meshed_b.pop(PORT_INBOUND_PLAINTEXT).close()
    result = agent_bed.a.connect(agent_bed.b.ip, 8080, timeout=1.0)
    assert not result["ok"]
    meshed_b[8080].settimeout(0.2)
    with pytest.raises(TimeoutError):
        meshed_b[8080].accept()


def test_tc_and_sk_lookup_are_attached_in_the_pod(agent_bed, datapath, meshed_b):
    dp, _maps = datapath
    assert any("shoal" in name for name in tc_ingress_programs(agent_bed.b.netns_path))
    assert pod_programs(dp, agent_bed).link_pin(netns_cookie(agent_bed.b.netns_path)).exists()


def test_l4_deny_fails_connect_at_once_with_a_flow_event(agent_bed, datapath, meshed_a, events):
    _dp, maps = datapath
    reader, seen = events
    maps.sync_endpoints({})
    from shoal.agent.compiler import Endpoint
    maps.sync_endpoints({agent_bed.a.ip: Endpoint(ID_A, 7, 1), agent_bed.b.ip: Endpoint(ID_B, 8, 1)})
    maps.sync_policies({PolicyEntry(ID_A, ID_B, 7000, 6): 4242})
    try:
        result = agent_bed.a.connect(agent_bed.b.ip, 7000, timeout=5)
        assert not result["ok"] and result["errno"] in (errno.EPERM, errno.ECONNREFUSED)
        assert result["elapsed"] < 1.0
        reader.consume()
        dropped = [e for e in seen if e.verdict == "DROPPED" and e.kind == "connect"]
        assert dropped and dropped[-1].dst_port == 7000 and dropped[-1].drop_reason == 181
        assert dropped[-1].src_identity == ID_A and dropped[-1].dst_identity == ID_B
        assert dropped[-1].rule_id == 4242
        # another port is still captured
        client = agent_bed.a.connect(agent_bed.b.ip, 7001, wait=False)
        conn, _ = serve_once(meshed_a)
        finish(client)
        conn.close()
    finally:
        maps.sync_policies({})
        maps.sync_endpoints({})


def test_connect_to_a_vip_fails_only_when_every_backend_denies(agent_bed, datapath, meshed_a):
    _dp, maps = datapath
    from shoal.agent.compiler import Endpoint
    other = "10.99.0.9"   # a second backend with another identity, allowed
    maps.sync_endpoints({agent_bed.a.ip: Endpoint(ID_A, 7, 1), agent_bed.b.ip: Endpoint(ID_B, 8, 1),
                         other: Endpoint(ID_B + 1, 8, 1)})
    maps.sync_policies({PolicyEntry(ID_A, ID_B, 7000, 6): 5})
    try:
        maps.sync_services({(VIP, 7000, 6): ((agent_bed.b.ip, 7000),)})
        denied = agent_bed.a.connect(VIP, 7000, timeout=5)
        assert not denied["ok"] and denied["errno"] == errno.EPERM
        maps.sync_services({(VIP, 7000, 6): ((agent_bed.b.ip, 7000), (other, 7000))})
        client = agent_bed.a.connect(VIP, 7000, wait=False)
        conn, _ = serve_once(meshed_a)    # captured: the proxy picks (and checks) the backend
        finish(client)
        conn.close()
    finally:
        maps.sync_services({})
        maps.sync_policies({})
        maps.sync_endpoints({})


def test_l4_deny_drops_inbound_syn_at_tc(agent_bed, datapath, meshed_b, events):
    _dp, maps = datapath
    reader, seen = events
    from shoal.agent.compiler import Endpoint
    maps.sync_endpoints({agent_bed.a.ip: Endpoint(ID_A, 7, 0), agent_bed.b.ip: Endpoint(ID_B, 8, 1)})
    maps.sync_policies({PolicyEntry(0, ID_B, 7000, 6): 77})   # any source
    try:
        result = agent_bed.a.connect(agent_bed.b.ip, 7000, timeout=0.5)
        assert not result["ok"]
        reader.consume()
        dropped = [e for e in seen if e.verdict == "DROPPED" and e.kind == "tc"]
        assert dropped and dropped[0].src_ip == agent_bed.a.ip and dropped[0].dst_port == 7000
        assert dropped[0].direction == "INGRESS" and dropped[0].tcp_flags & 0x02
        assert maps.counters()["tc_denied"] >= 1
        # allowed port: redirected to the proxy, with a REDIRECTED event
        client = agent_bed.a.connect(agent_bed.b.ip, 7001, wait=False)
        conn, _ = serve_once(meshed_b[PORT_INBOUND_PLAINTEXT])
        finish(client)
        conn.close()
        reader.consume()
        assert any(e.verdict == "REDIRECTED" and e.dst_port == 7001 for e in seen)
    finally:
        maps.sync_policies({})
        maps.sync_endpoints({})


FRAGMENTED_SYN = CHECKSUM_SOURCE + r"""
import socket, struct, sys
src, dst, dport = sys.argv[1], sys.argv[2], int(sys.argv[3])

payload = b"x" * 16
tcp = struct.pack("!HHIIBBHHH", 40999, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp + payload)) + tcp[18:] + payload
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
# the first fragment carries the whole TCP header: it looks like a plain SYN to a parser
for offset, more, chunk in ((0, 1, tcp[:24]), (3, 0, tcp[24:])):   # offsets in 8-byte units
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(chunk), 777, (more << 13) | offset, 64, 6, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    sock.sendto(header + chunk, (dst, 0))
print("sent")
"""


def test_fragmented_tcp_never_reaches_the_app(agent_bed, datapath, meshed_b):
    _dp, maps = datapath
    before = maps.counters()["tc_malformed"]
    proc = agent_bed.a.spawn(sys.executable, "-c", FRAGMENTED_SYN, agent_bed.a.ip, agent_bed.b.ip, "8080")
    out, err = proc.communicate(timeout=20)
    assert "sent" in out, err
    time.sleep(0.3)
    assert maps.counters()["tc_malformed"] >= before + 2
    for port in (8080, PORT_INBOUND_PLAINTEXT):
        meshed_b[port].settimeout(0.2)
        with pytest.raises(TimeoutError):
            meshed_b[port].accept()
        meshed_b[port].settimeout(3)


def test_agent_learns_the_proxy_cgroup_from_its_unix_socket(agent_bed, tmp_path):
    """SO_PEERPIDFD + PIDFD_GET_INFO: the cgroup of whoever listens on the ZDS path, with no
    shared pid namespace needed (as between the agent and proxy containers in Kubernetes)."""
    import socket

    from shoal.agent.cgroupid import cgroup_id, peer_cgroup_id
    path = tmp_path / "zds.sock"
    agent_bed.proxy_cgroup.mkdir(parents=True, exist_ok=True)
    server = agent_bed.a.spawn(sys.executable, "-c", (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.bind(sys.argv[1]); s.listen(1)\n"
        "print('ready', flush=True); time.sleep(30)\n"), str(path), cgroup=agent_bed.proxy_cgroup)
    try:
        assert server.stdout.readline().strip() == "ready"
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.connect(str(path))
            assert peer_cgroup_id(client) == cgroup_id(agent_bed.proxy_cgroup) != cgroup_id(agent_bed.a.cgroup)
    finally:
        server.kill()
        server.wait()


def test_unmeshed_pods_connections_are_reported_once_established(agent_bed, datapath, events):
    """Issue 16: the kernel sees connections between pods outside the mesh; Hubble shows them."""
    _dp, maps = datapath
    reader, seen = events
    from shoal.agent.compiler import Endpoint
    maps.sync_endpoints({agent_bed.a.ip: Endpoint(ID_A, 7, 0), agent_bed.b.ip: Endpoint(ID_B, 8, 0)})
    app = agent_bed.b.listen(8383)
    try:
        client = agent_bed.a.connect(agent_bed.b.ip, 8383, wait=False)
        conn, _ = serve_once(app)
        client_port = conn.getpeername()[1]
        finish(client)
        conn.close()
        reader.consume()
        reported = [e for e in seen if e.kind == "sock"]
        assert len(reported) == 1, seen
        event = reported[0]
        assert (event.verdict, event.direction) == ("FORWARDED", "EGRESS")
        assert (event.src_ip, event.src_port, event.dst_ip, event.dst_port) == (
            agent_bed.a.ip, client_port, agent_bed.b.ip, 8383)
        assert (event.src_identity, event.dst_identity) == (ID_A, ID_B)
        # A socket whose address is no pod's (the node's own daemons) is not reported.
        maps.sync_endpoints({agent_bed.b.ip: Endpoint(ID_B, 8, 0)})
        seen.clear()
        client = agent_bed.a.connect(agent_bed.b.ip, 8383, wait=False)
        conn, _ = serve_once(app)
        finish(client)
        conn.close()
        reader.consume()
        assert [e for e in seen if e.kind == "sock"] == []
    finally:
        app.close()
        maps.sync_endpoints({})


def test_meshed_pods_connections_are_not_reported_twice(agent_bed, datapath, meshed_a, events):
    _dp, maps = datapath
    reader, seen = events
    from shoal.agent.compiler import Endpoint
    maps.sync_endpoints({agent_bed.a.ip: Endpoint(ID_A, 7, 1), agent_bed.b.ip: Endpoint(ID_B, 8, 0)})
    try:
        client = agent_bed.a.connect(agent_bed.b.ip, 8484, wait=False)
        conn, _ = serve_once(meshed_a)        # captured to the proxy stand-in
        finish(client)
        conn.close()
        reader.consume()
        assert [e.kind for e in seen if e.kind in ("connect", "sock")] == ["connect"]
    finally:
        maps.sync_endpoints({})
