"""The same-node app join in the kernel (bpf/sk_msg_join.c): real sockops on the bed's node
cgroup, apps as processes in two pods (their sockets are the node's, sockops sees them),
the proxy's part played by this test: it accepts the captured connection, dials the
server app, joins its two sockets, links the apps, relays handed-back bytes, publishes
what landed and forwards half-closes, as agent/ztunnel/bypass.py does."""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shoal.netns import in_netns
from tests.agent.agentbed import ID_B, agent_bed, datapath, meshed_a  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

APP = Path(__file__).with_name("joinapp.py")
PORT = 9090


@pytest.fixture
def kernel(agent_bed, datapath):
    from shoal.datapath.bypass import KernelBypass
    handle = KernelBypass(agent_bed.pin_dir, app_join=True)
    assert handle.app_join, handle.app_join_error
    yield handle
    handle.disable_app_join()
    handle.close()


@pytest.fixture
def local_server(agent_bed, datapath):
    """Pod b's IP is a meshed pod of this node in the ipcache (the client's sockets to it
    enter app_socks); returns a function setting its flags."""
    from shoal.agent.compiler import Endpoint
    from shoal.datapath.structs import ENDPOINT_LOCAL, ENDPOINT_MESHED
    _dp, maps = datapath

    def place(flags: int = ENDPOINT_LOCAL | ENDPOINT_MESHED) -> None:
        maps.sync_endpoints({agent_bed.b.ip: Endpoint(ID_B, 8, flags), agent_bed.b.ip6: Endpoint(ID_B, 8, flags)})
    place()
    yield place
    maps.sync_endpoints({})


def _app_sockets(pin_dir: Path) -> int:
    from shoal.datapath import bpfsys
    from shoal.datapath.structs import AppKey
    fd = bpfsys.obj_get(pin_dir / "app_socks")
    try:
        return len(bpfsys.map_keys(fd, AppKey))
    finally:
        os.close(fd)


class StandInProxy(threading.Thread):
    """The proxy's part for one joined pair: handed-back bytes relayed once the bytes before
    them are on the other socket, what landed published, EOF forwarded once drained."""

    def __init__(self, kernel, pair):
        super().__init__(daemon=True)
        self.kernel, self.pair = kernel, pair
        self.stop = threading.Event()
        self.eof = {True: False, False: False}
        self.relayed = 0

    def _drain_then(self, toward_server: bool) -> None:
        while not self.kernel.drained(self.pair, toward_server) and not self.stop.is_set():
            time.sleep(0.001)

    def run(self):
        sides = {self.pair.client: True, self.pair.server: False}
        while not self.stop.is_set() and not all(self.eof.values()):
            self.kernel.publish_landed(self.pair)
            readable = select.select([s for s, t in sides.items() if not self.eof[t]], [], [], 0.02)[0]
            for sock in readable:
                toward_server = sides[sock]
                dest = self.pair.server if toward_server else self.pair.client
                try:
                    data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    self.eof[toward_server] = True
                    continue
                if not data:
                    self._drain_then(toward_server)
                    self.kernel.freeze(self.pair, toward_server)
                    dest.shutdown(socket.SHUT_WR)
                    self.eof[toward_server] = True
                    continue
                self._drain_then(toward_server)
                dest.sendall(data)
                self.relayed += len(data)
                self.kernel.relayed(self.pair, toward_server, len(data))


class Bed:
    """Server app in pod b, client app in pod a dialling it (captured), the stand-in proxy."""

    def __init__(self, agent_bed, meshed_a, kernel, client_args=(), server_args=(), server_ip: str = ""):
        self.kernel = kernel
        b = agent_bed.b
        server_ip = server_ip or b.ip
        self.server_app = b.spawn(sys.executable, str(APP), "server", server_ip, str(PORT), *server_args)
        assert self.server_app.stdout.readline().strip() == "ready"
        self.client_app = agent_bed.a.spawn(sys.executable, str(APP), "client", server_ip, str(PORT), *client_args)
        try:
            self._proxy_side(agent_bed, meshed_a, kernel, server_ip)
        except BaseException:   # the apps must go, or the bed's cgroups cannot
            for proc in (self.client_app, self.server_app):
                proc.kill()
                proc.communicate()
            raise

    def _proxy_side(self, agent_bed, meshed_a, kernel, server_ip: str) -> None:
        b = agent_bed.b
        meshed_a.settimeout(10)
        self.proxy_client, _ = meshed_a.accept()
        expected = kernel.expect_server_app(server_ip, PORT, server_ip)

        def dial():
            sock = socket.create_connection((server_ip, PORT), timeout=10)
            return sock
        self.proxy_server = in_netns(b.netns_path, dial)
        kernel.forget_expected(expected)
        self.pair = kernel.join(self.proxy_client, self.proxy_server)
        kernel.link_apps(self.pair)
        self.proxy = StandInProxy(kernel, self.pair)
        self.proxy.start()

    def finish(self, timeout: float = 120) -> tuple[dict, dict]:
        results = []
        for proc in (self.client_app, self.server_app):
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        self.proxy.join(10)
        return results[0], results[1]

    def close(self):
        self.proxy.stop.set()
        if self.proxy_client.fileno() < 0:
            return
        self.proxy.join(5)
        for proc in (self.client_app, self.server_app):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.kernel.release(self.pair)
        self.proxy_client.close()
        self.proxy_server.close()


@pytest.fixture
def bed(agent_bed, meshed_a, kernel, local_server):
    made = []

    def make(client_args=(), server_args=(), server_ip: str = "", proxy_listener=None):
        made.append(Bed(agent_bed, proxy_listener or meshed_a, kernel, client_args, server_args, server_ip))
        return made[-1]
    yield make
    for one in made:
        one.close()


def _assert_exchanged(client: dict, server: dict, up: int, down: int) -> None:
    assert not client["error"] and not server["error"], (client, server)
    assert (client["sent"], server["received"], server["sent"], client["received"]) == (up, up, down, down)
    assert client["sent_sha"] == server["received_sha"]
    assert server["sent_sha"] == client["received_sha"]


def test_both_directions_switch_to_direct_sends_with_identical_bytes_and_exact_counts(bed):
    """The client greets before the server exists on the proxy's path (the verdict carries
    it), then both stream 256 MiB at once: each direction switches to direct sends at its
    first send that finds the proxy's path empty, with no byte lost or reordered."""
    from shoal.datapath.structs import DIRECT_ON
    size = 256 << 20
    one = bed(client_args=("--greet", "4096", "--pause", "0.3", "--send", str(size)),
              server_args=("--wait-greeting", "4096", "--greet", "512", "--pause", "0.3", "--send", str(size)))
    client, server = one.finish()
    print("recv EAGAIN seen by the apps:", client.get("recv_eagain", 0), server.get("recv_eagain", 0))
    _assert_exchanged(client, server, 4096 + size, 512 + size)
    up_direct, down_direct = one.kernel.direct(one.pair)
    assert (up_direct.state, down_direct.state) == (DIRECT_ON, DIRECT_ON)
    assert up_direct.bytes >= size and down_direct.bytes >= size   # the bulk went direct
    assert one.kernel.carried(one.pair) == (4096 + size, 512 + size)


def test_a_socket_outside_a_pair_never_enters_the_map(bed, agent_bed, local_server, kernel):
    """Sockops puts the client app's socket into app_socks only toward a meshed pod of this
    node, and the server app's only when the proxy announced the connection."""
    from shoal.datapath.structs import ENDPOINT_MESHED
    before = _app_sockets(agent_bed.pin_dir)
    local_server(ENDPOINT_MESHED)   # a meshed pod of another node
    one = bed(client_args=("--pause", "0.5", "--send", "1000"), server_args=("--pause", "0.5", "--send", "1000"))
    time.sleep(0.2)
    # the server app's socket (announced) is in; the client app's (not local) is not
    assert _app_sockets(agent_bed.pin_dir) == before + 1
    client, server = one.finish()
    _assert_exchanged(client, server, 1000, 1000)
    up_direct, _down = one.kernel.direct(one.pair)
    assert up_direct.sends == 0


def test_revoking_a_switched_pair_mid_stream_resets_both_apps(bed):
    """A policy change: the proxy unlinks the apps (their next sends take its path) and
    resets its two sockets; both apps see the connection reset, neither gets a byte after."""
    one = bed(client_args=("--pause", "0.3", "--send", str(1 << 30)),
              server_args=("--pause", "0.3", "--send", str(1 << 30)))
    deadline = time.monotonic() + 30
    while not all(d.sends for d in one.kernel.direct(one.pair)):
        assert time.monotonic() < deadline, "no direction switched"
        time.sleep(0.05)
    one.proxy.stop.set()
    one.proxy.join(5)
    one.kernel.unlink_apps(one.pair)
    for sock in (one.proxy_client, one.proxy_server):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        sock.close()
    client, server = one.finish(timeout=30)
    for result in (client, server):
        assert result["error"], result   # reset: a send or a read failed
        assert result["sent"] < 1 << 30 and result["received"] < 1 << 30


def _sysctl_max(netns_path: str, name: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", os.path.basename(netns_path), "cat", f"/proc/sys/net/ipv4/{name}"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def test_a_server_that_stops_reading_holds_back_a_switched_sender_within_the_socket_buffers(bed, agent_bed):
    """Direct sends go into the proxy's socket's send buffer: when the server app stops
    reading, the client's sends wait there, as on any socket. What the client got onto
    the path stays within the server side's buffers (the proxy socket's send buffer, the
    server app's receive buffer), and stops growing."""
    held_after = 1 << 20
    size = 512 << 20
    one = bed(client_args=("--pause", "0.3", "--send", str(size)),
              server_args=("--pause", "1", "--stop-reading-after", str(held_after), "--hold", "10"))
    deadline = time.monotonic() + 25
    first, second = -1, one.kernel.carried(one.pair)[0]
    while second != first:   # until the sender is held (two readings 0.5 s apart agree)
        assert time.monotonic() < deadline, "the sender kept going while nobody read"
        time.sleep(0.5)
        first, second = second, one.kernel.carried(one.pair)[0]
    up_direct, _down = one.kernel.direct(one.pair)
    assert up_direct.sends, "the client's sends were not switched"
    assert second > held_after
    bound = _sysctl_max(agent_bed.b.netns_path, "tcp_wmem") + _sysctl_max(agent_bed.b.netns_path, "tcp_rmem")
    assert second - held_after <= bound, (second, bound)
    client, server = one.finish()
    _assert_exchanged(client, server, size, 0)


def test_a_server_that_speaks_first_switches_too(bed):
    """The server app greets before the client sends anything (the verdict carries the
    greeting, which the client reads before it streams); then both directions switch."""
    from shoal.datapath.structs import DIRECT_ON
    size = 64 << 20
    one = bed(client_args=("--wait-greeting", "8192", "--pause", "0.3", "--send", str(size)),
              server_args=("--greet", "8192", "--pause", "0.3", "--send", str(size)))
    client, server = one.finish()
    _assert_exchanged(client, server, size, 8192 + size)
    assert [d.state for d in one.kernel.direct(one.pair)] == [DIRECT_ON, DIRECT_ON]
    assert one.kernel.carried(one.pair) == (size, 8192 + size)


def test_a_non_blocking_sender_is_never_switched(bed):
    """A non-blocking app's send redirected into a full proxy socket would fail with EAGAIN
    while its own socket polls writable (nothing would wake an edge-triggered app): its
    sends always take the proxy's path, byte-exact."""
    from shoal.datapath.structs import DIRECT_OFF
    size = 64 << 20
    one = bed(client_args=("--pause", "0.3", "--nonblocking", "--send", str(size)),
              server_args=("--pause", "0.3", "--send", "1000"))
    client, server = one.finish()
    _assert_exchanged(client, server, size, 1000)
    up, _down = one.kernel.direct(one.pair)
    assert (up.state, up.sends) == (DIRECT_OFF, 0)
    assert one.kernel.carried(one.pair) == (size, 1000)


@pytest.mark.parametrize("side", ["client", "server"])
def test_an_app_reset_after_the_switch_reaches_the_proxys_socket(bed, side):
    """A switched app that resets its connection: its RST still travels its own TCP
    connection to the proxy's socket, where the proxy sees it and resets the other app
    (agent/ztunnel/bypass.py, as without the app join)."""
    reset = ("--pause", "0.3", "--send", str(64 << 20), "--reset-after", str(16 << 20))
    quiet = ("--pause", "0.3", "--send", "0")
    one = bed(client_args=reset if side == "client" else quiet, server_args=reset if side == "server" else quiet)
    proc = one.client_app if side == "client" else one.server_app
    proc.wait(timeout=60)
    sock = one.proxy_client if side == "client" else one.proxy_server
    deadline = time.monotonic() + 10
    while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != 7:   # TCP_CLOSE
        assert time.monotonic() < deadline, "the proxy's socket did not see the reset"
        time.sleep(0.02)
    direction = one.kernel.direct(one.pair)[0 if side == "client" else 1]
    assert direction.sends, "the resetting app was not switched"


def test_ipv6_takes_the_same_path(bed, agent_bed):
    """An IPv6 destination: captured to [::1]:15001, the same keys (IPv6 as is, IPv4 as
    mapped), the same switch."""
    from shoal.datapath.structs import DIRECT_ON
    listener = agent_bed.a.listen(15001, host="::1")
    try:
        size = 32 << 20
        one = bed(client_args=("--greet", "100", "--pause", "0.3", "--send", str(size)),
                  server_args=("--pause", "0.3", "--send", str(size)), server_ip=agent_bed.b.ip6,
                  proxy_listener=listener)
        client, server = one.finish()
        _assert_exchanged(client, server, 100 + size, size)
        assert [d.state for d in one.kernel.direct(one.pair)] == [DIRECT_ON, DIRECT_ON]
        assert one.kernel.carried(one.pair) == (100 + size, size)
    finally:
        listener.close()


def test_a_client_that_connects_non_blocking_never_enters_the_map(bed, agent_bed):
    """It would never be switched, so sockops leaves it out: it pays nothing for the app
    join (its sends keep tcp_sendmsg, its reads tcp_recvmsg)."""
    before = _app_sockets(agent_bed.pin_dir)
    one = bed(client_args=("--nonblocking-connect", "--pause", "0.5", "--send", str(8 << 20)),
              server_args=("--pause", "0.5", "--send", "1000"))
    assert _app_sockets(agent_bed.pin_dir) == before + 1   # the server app's (announced) only
    client, server = one.finish()
    _assert_exchanged(client, server, 8 << 20, 1000)
    assert one.kernel.direct(one.pair)[0].sends == 0
