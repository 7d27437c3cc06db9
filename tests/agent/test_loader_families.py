"""One capture path for both families, and UDP, with real sockets in real namespaces.

Pod a (10.99.0.2, fd00:99::2) and pod b (10.99.0.3, fd00:99::3) share a veth. Each attack
of issue 11 in the kernel's area is a test here: an AF_INET6 socket dialling the IPv4-
mapped address (capture, DENY), IPv6 extension headers and fragments toward a meshed
pod, UDP under STRICT and DENY.
"""
from __future__ import annotations

import errno
import socket
import sys
import time

import pytest

from shoal.agent.compiler import Endpoint, PolicyEntry
from shoal.config import PORT_HBONE, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND
from shoal.datapath.origdst import OriginalDestinations
from shoal.datapath.penaltybox import KernelPenaltyBox
from shoal.datapath.structs import DROP_RATE_LIMITED, ENDPOINT_MESHED, ENDPOINT_STRICT
from tests.agent.agentbed import CHECKSUM_SOURCE, ID_A, ID_B, finish, serve_once

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

VIP4, VIP6 = "10.96.8.8", "fd00:96::8"
TCP, UDP = 6, 17


def mapped(ip: str) -> str:
    return f"::ffff:{ip}"


@pytest.fixture
def proxy6_a(agent_bed, meshed_a):
    """The proxy's [::1]:15001 in pod a, beside 127.0.0.1:15001 (native IPv6 capture)."""
    proxy = agent_bed.a.listen(PORT_OUTBOUND, host="::1")
    yield proxy
    proxy.close()


@pytest.fixture
def identities(datapath, agent_bed):
    """a and b known in both families; yields a setter for b's flags."""
    _dp, maps = datapath

    def set_flags(a_flags: int = ENDPOINT_MESHED, b_flags: int = ENDPOINT_MESHED) -> None:
        maps.sync_endpoints({agent_bed.a.ip: Endpoint(ID_A, 7, a_flags), agent_bed.a.ip6: Endpoint(ID_A, 7, a_flags),
                             agent_bed.b.ip: Endpoint(ID_B, 8, b_flags), agent_bed.b.ip6: Endpoint(ID_B, 8, b_flags)})
    set_flags()
    yield set_flags
    maps.sync_policies({})
    maps.sync_endpoints({})


def flows(events, **match):
    reader, seen = events
    reader.consume()
    return [e for e in seen if all(getattr(e, k) == v for k, v in match.items())]


# -- TCP from AF_INET6 sockets: the IPv4-mapped path is the IPv4 path -------------------------

def test_mapped_destination_from_an_inet6_socket_is_captured(agent_bed, datapath, meshed_a, events):
    """Attack (issues 11/12): AF_INET6 dialling ::ffff:<meshed pod IP> went around the mesh."""
    client = agent_bed.a.connect(mapped(agent_bed.b.ip), 8080, family=6, hold=0.5, wait=False)
    conn, data = serve_once(meshed_a)                  # the proxy's 127.0.0.1:15001
    with OriginalDestinations(agent_bed.pin_dir) as dests:
        assert dests.lookup(conn) == (agent_bed.b.ip, 8080)
    result = finish(client)
    conn.close()
    assert data == b"ping" and result["reply"] == "pong"
    assert result["peer"] == [mapped(agent_bed.b.ip), 8080]      # getpeername6
    assert result["local"][0] == mapped("127.0.0.1")
    redirected = flows(events, verdict="REDIRECTED", kind="connect", dst_port=8080)
    assert redirected and redirected[-1].dst_ip == agent_bed.b.ip and redirected[-1].src_ip == agent_bed.a.ip


def test_mapped_destination_is_denied_like_ipv4(agent_bed, datapath, meshed_a, identities, events):
    """Attack (issue 11): the kernel DENY did not see AF_INET6 sockets."""
    _dp, maps = datapath
    maps.sync_policies({PolicyEntry(ID_A, ID_B, 7000, TCP): 4243})
    for host, family in ((agent_bed.b.ip, 4), (mapped(agent_bed.b.ip), 6)):
        result = agent_bed.a.connect(host, 7000, family=family, timeout=3)
        assert not result["ok"] and result["errno"] == errno.EPERM, (host, result)
    dropped = flows(events, verdict="DROPPED", kind="connect", dst_port=7000)
    assert len(dropped) == 2 and {e.dst_ip for e in dropped} == {agent_bed.b.ip}
    assert all(e.rule_id == 4243 and e.src_identity == ID_A and e.dst_identity == ID_B for e in dropped)


def test_mapped_cluster_ip_is_balanced_for_unmeshed_pods(agent_bed, datapath):
    """Issue 12: AF_INET6 to ::ffff:<ClusterIP> failed with ENETUNREACH."""
    _dp, maps = datapath
    maps.sync_services({(VIP4, 80, TCP): ((agent_bed.b.ip, 8282),)})
    app = agent_bed.b.listen(8282)
    try:
        client = agent_bed.a.connect(mapped(VIP4), 80, family=6, wait=False)
        conn, data = serve_once(app)
        assert data == b"ping" and conn.getsockname() == (agent_bed.b.ip, 8282)
        assert finish(client)["reply"] == "pong"
        conn.close()
    finally:
        app.close()
        maps.sync_services({})


def test_native_ipv6_is_captured_to_the_proxy_on_ipv6_loopback(agent_bed, datapath, meshed_a, proxy6_a):
    client = agent_bed.a.connect(agent_bed.b.ip6, 8080, wait=False)
    conn, _ = serve_once(proxy6_a)
    with OriginalDestinations(agent_bed.pin_dir) as dests:
        assert dests.lookup(conn) == (agent_bed.b.ip6, 8080)
    result = finish(client)
    conn.close()
    assert result["peer"] == [agent_bed.b.ip6, 8080] and result["local"][0] == "::1"


def test_native_ipv6_cluster_ip_balances_and_denies(agent_bed, datapath, meshed_a, identities):
    _dp, maps = datapath
    maps.sync_services({(VIP6, 80, TCP): ((agent_bed.b.ip6, 8282),)})
    app = agent_bed.b.listen(8282, host="::")
    try:
        client = agent_bed.b.connect(VIP6, 80, wait=False)       # b is not meshed: socket-LB
        conn, _ = serve_once(app)
        assert conn.getsockname()[:2] == (agent_bed.b.ip6, 8282)
        assert finish(client)["reply"] == "pong"
        conn.close()
        maps.sync_policies({PolicyEntry(ID_A, ID_B, 8282, TCP): 1})   # the only backend denies a
        denied = agent_bed.a.connect(VIP6, 80, timeout=3)
        assert not denied["ok"] and denied["errno"] == errno.EPERM
    finally:
        app.close()
        maps.sync_services({})


def test_cluster_ip_without_backends_refuses_at_once(agent_bed, datapath):
    _dp, maps = datapath
    maps.sync_services({(VIP4, 80, TCP): ()})
    try:
        for host, family in ((VIP4, 4), (mapped(VIP4), 6)):
            result = agent_bed.b.connect(host, 80, family=family, timeout=3)
            assert not result["ok"] and result["errno"] == errno.ECONNREFUSED and result["elapsed"] < 1
        assert maps.counters()["no_backend"] >= 2
    finally:
        maps.sync_services({})


JAVA_CLIENT = """
import java.io.*; import java.net.*;
public class Client {
    public static void main(String[] a) throws Exception {
        try (Socket s = new Socket()) {
            s.connect(new InetSocketAddress(InetAddress.getByName(a[0]), Integer.parseInt(a[1])), 3000);
            s.getOutputStream().write("ping".getBytes()); byte[] b = new byte[4]; int n = s.getInputStream().read(b);
            System.out.println(new String(b, 0, n) + " " + s.getRemoteSocketAddress());
        }
    }
}
"""


@pytest.mark.parametrize("client", ["java", "node"])
def test_real_clients_with_default_settings_are_captured(agent_bed, datapath, meshed_a, client, tmp_path):
    """The JVM dials IPv4 from AF_INET6 sockets by default; Node.js given a mapped address does too."""
    if client == "java":
        source = tmp_path / "Client.java"
        source.write_text(JAVA_CLIENT)
        argv = ["java", str(source), agent_bed.b.ip, "8080"]
    else:
        script = ("const s = require('net').connect({host: process.argv[1], port: 8080}, () => s.write('ping'));"
                  "s.on('data', d => { console.log(d.toString() + ' ' + s.remoteAddress + ' ' + s.remoteFamily);"
                  " s.destroy(); });")
        argv = ["node", "-e", script, mapped(agent_bed.b.ip)]
    proc = agent_bed.a.spawn(*argv)
    meshed_a.settimeout(30)                            # a cold JVM compiles the client first
    conn, data = serve_once(meshed_a)
    with OriginalDestinations(agent_bed.pin_dir) as dests:
        assert dests.lookup(conn) == (agent_bed.b.ip, 8080)
    out, err = proc.communicate(timeout=60)
    conn.close()
    assert proc.returncode == 0, err
    assert data == b"ping" and out.startswith("pong") and agent_bed.b.ip in out


# -- tc ingress, IPv6 --------------------------------------------------------------------------

@pytest.fixture
def meshed_b6(agent_bed, meshed_b):
    """b's IPv6 listeners beside the IPv4 ones: the proxy's [::]:15006/15008 and the app's [::]:8080."""
    listeners = {port: agent_bed.b.listen(port, host="::") for port in (PORT_INBOUND_PLAINTEXT, PORT_HBONE, 8080)}
    yield listeners
    for sock in listeners.values():
        sock.close()


def assert_nothing_accepted(sock: socket.socket) -> None:
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.accept()
    sock.settimeout(3)


@pytest.mark.parametrize("dport,expected", [(8080, PORT_INBOUND_PLAINTEXT), (PORT_HBONE, PORT_HBONE)])
def test_inbound_ipv6_tcp_is_steered_to_the_proxy(agent_bed, datapath, meshed_b6, dport, expected):
    client = agent_bed.a.connect(agent_bed.b.ip6, dport, wait=False)
    conn, _ = serve_once(meshed_b6[expected])
    assert conn.getsockname()[:2] == (agent_bed.b.ip6, dport)
    assert finish(client)["reply"] == "pong"
    conn.close()
    assert_nothing_accepted(meshed_b6[8080])


@pytest.mark.parametrize("family", [4, 6])
def test_a_source_the_proxy_boxed_has_its_syns_to_15008_dropped_in_the_kernel(
        agent_bed, datapath, meshed_b, meshed_b6, events, family):
    """Attack (issue 18's handshake flood): a boxed source refused at accept still cost an
    accept and a reset per reconnect, thousands a second. Boxed in the kernel map, its SYNs
    to 15008 never reach the proxy (dropped, counted, reported); its connections to other
    ports, and to 15008 once the box expires, are served as before."""
    _dp, maps = datapath
    listeners, host = (meshed_b, agent_bed.b.ip) if family == 4 else (meshed_b6, agent_bed.b.ip6)
    source = agent_bed.a.ip if family == 4 else agent_bed.a.ip6
    with KernelPenaltyBox(agent_bed.pin_dir) as box:
        box.box(source, seconds=3.0)
        before = maps.counters()["tc_hbone_boxed"]
        boxed = agent_bed.a.connect(host, PORT_HBONE, timeout=1.5)
        assert not boxed["ok"] and "timed out" in boxed["error"], boxed    # dropped: no RST, no accept
        assert maps.counters()["tc_hbone_boxed"] > before                # the SYN and its retransmit
        assert_nothing_accepted(listeners[PORT_HBONE])
        dropped = flows(events, verdict="DROPPED", kind="tc", dst_port=PORT_HBONE)
        assert dropped and dropped[-1].drop_reason == DROP_RATE_LIMITED and dropped[-1].src_ip == source

        other_port = agent_bed.a.connect(host, 8080, wait=False)          # the box covers 15008 only
        conn, _ = serve_once(listeners[PORT_INBOUND_PLAINTEXT])
        assert finish(other_port)["reply"] == "pong"
        conn.close()

        box.box(source, seconds=0.0)                                      # expired
        served = agent_bed.a.connect(host, PORT_HBONE, wait=False)
        conn, _ = serve_once(listeners[PORT_HBONE])
        assert finish(served)["reply"] == "pong"
        conn.close()


@pytest.mark.parametrize("family", [4, 6])
def test_syn_reusing_a_time_wait_tuple_goes_to_the_proxy(agent_bed, datapath, meshed_b, meshed_b6, family):
    """The proxy closes first (TIME_WAIT on its side, local port 8080). A new SYN with the
    same 4-tuple: the stack's TIME_WAIT path would pick the app's listener on 8080; the
    sk_lookup program linked in the pod makes it pick the proxy's, in both families."""
    listeners, host = (meshed_b, agent_bed.b.ip) if family == 4 else (meshed_b6, agent_bed.b.ip6)
    sport = 40123 + family
    for attempt in range(3):
        client = agent_bed.a.connect(host, 8080, sport=sport, hold=0.3, timeout=0.9, wait=False)
        conn, _ = listeners[PORT_INBOUND_PLAINTEXT].accept()
        assert conn.getsockname()[:2] == (host, 8080)
        conn.recv(64)
        conn.sendall(b"pong")
        conn.close()                      # active close: the proxy side keeps TIME_WAIT
        result = finish(client)
        assert result["ok"] and result["elapsed"] < 0.9, (attempt, result)   # no SYN retransmit
    assert_nothing_accepted(listeners[8080])


EXTHDR_CLIENT = r"""
import json, socket, sys
host, port, option = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sock = socket.socket(socket.AF_INET6)
sock.settimeout(2)
# an empty options header: next header + length 0 + PadN of 4 bytes = 8 octets
header = bytes([0, 0, 1, 4, 0, 0, 0, 0])
sock.setsockopt(socket.IPPROTO_IPV6, {"hop": socket.IPV6_HOPOPTS, "dst": socket.IPV6_DSTOPTS}[option], header)
try:
    sock.connect((host, port))
    sock.sendall(b"ping")
    print(json.dumps({"ok": True, "reply": sock.recv(16).decode()}))
except OSError as err:
    print(json.dumps({"ok": False, "error": str(err)}))
"""


@pytest.mark.parametrize("option", ["hop", "dst"])
def test_ipv6_extension_headers_do_not_bypass_the_proxy(agent_bed, datapath, meshed_b6, option):
    """Attack (issue 11): a hop-by-hop or destination-options header reached the app in plaintext."""
    proc = agent_bed.a.spawn(sys.executable, "-c", EXTHDR_CLIENT, agent_bed.b.ip6, "8080", option)
    conn, _ = serve_once(meshed_b6[PORT_INBOUND_PLAINTEXT])
    assert conn.getsockname()[:2] == (agent_bed.b.ip6, 8080)
    out = finish(proc)
    conn.close()
    assert out["ok"] and out["reply"] == "pong"
    assert_nothing_accepted(meshed_b6[8080])


RAW_IPV6_SYN = CHECKSUM_SOURCE + r"""
import socket, struct, sys
src, dst, dport, chain = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
tcp = struct.pack("!HHIIBBHHH", 40777, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
tcp = tcp[:16] + struct.pack("!H", checksum(s + d + struct.pack("!I3xB", len(tcp), 6) + tcp)) + tcp[18:]
headers = chain.split(",")                    # e.g. "dst,dst,dst,dst,dst" or "frag"
numbers = {"dst": 60, "hop": 0, "frag": 44}
payload, next_header = tcp, 6
for name in reversed(headers):
    if name == "frag":                        # an atomic fragment: offset 0, M=0
        payload = struct.pack("!BBHI", next_header, 0, 0, 4242) + payload
    else:
        payload = bytes([next_header, 0, 1, 4, 0, 0, 0, 0]) + payload
    next_header = numbers[name]
ip6 = struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64) + s + d
sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
sock.sendto(ip6 + payload, (dst, 0))
print("sent")
"""


@pytest.mark.parametrize("chain,reason", [("frag", 157), ("dst,dst,dst,dst,dst", 156)])
def test_ipv6_fragments_and_long_header_chains_are_dropped_and_reported(agent_bed, datapath, meshed_b6, events,
                                                                         chain, reason):
    _dp, maps = datapath
    before = maps.counters()["tc_malformed"]
    proc = agent_bed.a.spawn(sys.executable, "-c", RAW_IPV6_SYN, agent_bed.a.ip6, agent_bed.b.ip6, "8080", chain)
    out, err = proc.communicate(timeout=20)
    assert "sent" in out, err
    time.sleep(0.3)
    assert maps.counters()["tc_malformed"] > before
    dropped = flows(events, verdict="DROPPED", kind="tc", drop_reason=reason)
    assert dropped and dropped[-1].src_ip == agent_bed.a.ip6 and dropped[-1].dst_ip == agent_bed.b.ip6
    for port in (8080, PORT_INBOUND_PLAINTEXT):
        assert_nothing_accepted(meshed_b6[port])


def test_inbound_ipv6_deny_drops_the_syn(agent_bed, datapath, meshed_b6, identities, events):
    _dp, maps = datapath
    maps.sync_policies({PolicyEntry(0, ID_B, 7000, TCP): 78})
    result = agent_bed.a.connect(agent_bed.b.ip6, 7000, timeout=0.5)
    assert not result["ok"]
    dropped = flows(events, verdict="DROPPED", kind="tc", dst_port=7000)
    assert dropped and dropped[0].src_ip == agent_bed.a.ip6 and dropped[0].rule_id == 78


# -- UDP ---------------------------------------------------------------------------------------

UDP_ECHO = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
if ":" in host:
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
sock.bind((host, port))
print("ready", flush=True)
while True:
    data, peer = sock.recvfrom(64)
    sock.sendto(b"pong:" + data, peer)
"""


@pytest.fixture
def udp_echo(agent_bed):
    """UDP echo servers in pod b on 5353, both families."""
    procs = [agent_bed.b.spawn(sys.executable, "-c", UDP_ECHO, host, "5353") for host in ("0.0.0.0", "::")]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    yield
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("mode", ["connect", "sendto"])
@pytest.mark.parametrize("vip,family", [(VIP4, 4), (mapped(VIP4), 6), (VIP6, 6)])
def test_udp_cluster_ip_is_balanced_and_replies_come_from_the_vip(agent_bed, datapath, udp_echo, mode, vip, family):
    _dp, maps = datapath
    maps.sync_services({(VIP4, 53, UDP): ((agent_bed.b.ip, 5353),), (VIP6, 53, UDP): ((agent_bed.b.ip6, 5353),)})
    try:
        result = agent_bed.a.connect(vip, 53, family=family, udp=mode, timeout=3)
        assert result["ok"], result
        assert result["reply"] == "pong:ping" and result["source"] == [vip, 53]     # recvmsg restored the VIP
        if mode == "connect":
            assert result["peer"] == [vip, 53]                                       # and getpeername
        assert maps.counters()["udp_revnat"] >= 1
    finally:
        maps.sync_services({})


@pytest.mark.parametrize("mode", ["connect", "sendto"])
def test_udp_to_a_cluster_ip_without_backends_is_refused(agent_bed, datapath, mode):
    _dp, maps = datapath
    maps.sync_services({(VIP4, 53, UDP): ()})
    try:
        result = agent_bed.a.connect(VIP4, 53, udp=mode, timeout=2)
        assert not result["ok"] and result["errno"] == errno.ECONNREFUSED and result["elapsed"] < 1
    finally:
        maps.sync_services({})


@pytest.mark.parametrize("mode", ["connect", "sendto"])
@pytest.mark.parametrize("host_of", [lambda b: b.ip, lambda b: mapped(b.ip), lambda b: b.ip6])
def test_udp_from_a_meshed_pod_is_denied_at_the_socket(agent_bed, datapath, meshed_a, identities, udp_echo, events,
                                                       mode, host_of):
    _dp, maps = datapath
    maps.sync_policies({PolicyEntry(ID_A, ID_B, 5353, UDP): 55})
    host = host_of(agent_bed.b)
    result = agent_bed.a.connect(host, 5353, family=6 if ":" in host else 4, udp=mode, timeout=2)
    assert not result["ok"] and result["errno"] == errno.EPERM, result
    assert maps.counters()["udp_denied"] >= 1
    dropped = flows(events, verdict="DROPPED", protocol="UDP", dst_port=5353)
    assert dropped and dropped[-1].rule_id == 55 and dropped[-1].src_identity == ID_A


@pytest.mark.parametrize("family", [4, 6])
def test_udp_into_a_meshed_pod_obeys_deny_and_strict_at_tc(agent_bed, datapath, meshed_b, identities, udp_echo,
                                                           events, family):
    """Attack (issue 11): UDP reached meshed pods under STRICT, and an L4 DENY did not stop it."""
    _dp, maps = datapath
    host = agent_bed.b.ip if family == 4 else agent_bed.b.ip6
    # PERMISSIVE, no rule: UDP passes (not tunnelled)
    assert agent_bed.a.connect(host, 5353, udp="sendto", timeout=2)["ok"]
    # DENY from any source
    maps.sync_policies({PolicyEntry(0, ID_B, 5353, UDP): 56})
    assert not agent_bed.a.connect(host, 5353, udp="sendto", timeout=1)["ok"]
    assert flows(events, verdict="DROPPED", kind="tc", protocol="UDP", drop_reason=181)
    maps.sync_policies({})
    # STRICT: plaintext UDP from outside the mesh is dropped, from a meshed source it passes
    identities(a_flags=0, b_flags=ENDPOINT_MESHED | ENDPOINT_STRICT)
    before = maps.counters()["tc_udp_strict"]
    assert not agent_bed.a.connect(host, 5353, udp="sendto", timeout=1)["ok"]
    assert maps.counters()["tc_udp_strict"] > before
    strict = flows(events, verdict="DROPPED", kind="tc", protocol="UDP", drop_reason=189)
    assert strict and strict[-1].dst_port == 5353
    identities(a_flags=ENDPOINT_MESHED, b_flags=ENDPOINT_MESHED | ENDPOINT_STRICT)
    assert agent_bed.a.connect(host, 5353, udp="sendto", timeout=2)["ok"]


def test_strict_pod_still_gets_replies_on_its_connected_udp_sockets(agent_bed, datapath, meshed_b, identities):
    """A STRICT pod's resolver (a connected socket) asking an unmeshed server gets its answer."""
    identities(a_flags=0, b_flags=ENDPOINT_MESHED | ENDPOINT_STRICT)
    server = agent_bed.a.spawn(sys.executable, "-c", UDP_ECHO, "0.0.0.0", "5454")
    try:
        assert server.stdout.readline().strip() == "ready"
        assert agent_bed.b.connect(agent_bed.a.ip, 5454, udp="connect", timeout=2)["reply"] == "pong:ping"
        # unconnected: the reply is indistinguishable from unsolicited plaintext, dropped
        assert not agent_bed.b.connect(agent_bed.a.ip, 5454, udp="sendto", timeout=1)["ok"]
    finally:
        server.kill()
        server.wait()
