"""Agent test bed: two pod namespaces on a veth pair, a node cgroup, a bpffs pin dir.

Everything is named shoal-t<pid>-... and removed by the fixtures even when tests fail.
The programs are compiled once per module (bcc costs CPU on this machine).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal.config import PORT_HBONE, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND, ClusterLayout

HERE = Path(__file__).resolve().parent
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
BPFFS_ROOT = Path("/sys/fs/bpf")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@dataclass
class Pod:
    name: str
    netns: str
    ip: str
    cgroup: Path
    ip6: str = ""

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    def listen(self, port: int, host: str = "0.0.0.0", udp: bool = False) -> socket.socket:
        """A listener (or a bound UDP socket) created inside the pod's namespace (as the
        node proxy does). An IPv6 host gets a V6ONLY socket: the IPv4 one is separate."""
        from shoal.agent.netns import in_netns

        def make() -> socket.socket:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            if not udp:
                sock.listen(64)
            sock.settimeout(3)
            return sock
        return in_netns(self.netns_path, make)

    def spawn(self, *argv: str, cgroup: Path | None = None) -> subprocess.Popen:
        """A process in the pod: its netns and its cgroup (below the node's), or `cgroup`
        (the node proxy's, say: it works inside pod namespaces from its own cgroup)."""
        # A shell joins the cgroup and execs: no preexec_fn (Python in a child forked from a
        # process running gRPC threads can deadlock).
        script = 'echo $$ > "$0" && exec ip netns exec "$@"'
        procs = (cgroup or self.cgroup) / "cgroup.procs"
        return subprocess.Popen(["sh", "-c", script, str(procs), self.netns, *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def connect(self, host: str, port: int, *, sport: int = 0, mark: int = 0, timeout: float = 2.0,
                hold: float = 0.0, again: bool = False, wait: bool = True, family: int = 0,
                udp: str | None = None, cgroup: Path | None = None):
        """podclient.py in this pod: family=6 dials from an AF_INET6 socket (HOST may be
        ::ffff:a.b.c.d); udp='connect'/'sendto' sends one datagram and waits for the reply."""
        argv = [sys.executable, str(HERE / "podclient.py"), host, str(port), "--timeout", str(timeout),
                "--hold", str(hold)]
        if family:
            argv += ["--family", str(family)]
        if udp:
            argv += ["--udp", udp]
        if sport:
            argv += ["--sport", str(sport)]
        if mark:
            argv += ["--mark", str(mark)]
        if again:
            argv.append("--again")
        proc = self.spawn(*argv, cgroup=cgroup)
        if not wait:
            return proc
        return finish(proc)


def finish(proc: subprocess.Popen, timeout: float = 15) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def serve_once(listener: socket.socket, reply: bytes = b"pong") -> tuple[socket.socket, bytes]:
    conn, _ = listener.accept()
    conn.settimeout(3)
    data = conn.recv(64)
    conn.sendall(reply)
    return conn, data


class InPodProxy:
    """The proxy's half of contract B: listeners opened inside the pod's namespace."""

    def __init__(self):
        self.listeners: dict[str, dict[int, socket.socket]] = {}
        self.events: list[tuple[str, str]] = []

    async def add_pod(self, pod, netns_fd: int) -> None:
        from shoal.netns import setns
        if pod.uid in self.listeners:      # a replayed pod: keep its listeners, as the proxy does
            os.close(netns_fd)
            self.events.append(("add", pod.uid))
            return
        opened = {}

        def make() -> None:
            setns(netns_fd)
            for host, port in (("127.0.0.1", PORT_OUTBOUND), ("0.0.0.0", PORT_INBOUND_PLAINTEXT),
                               ("0.0.0.0", PORT_HBONE)):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(16)
                sock.settimeout(3)
                opened[port] = sock
        errors = []

        def guarded() -> None:
            try:
                make()
            except OSError as err:
                errors.append(err)
        thread = threading.Thread(target=guarded)
        thread.start()
        thread.join()
        os.close(netns_fd)
        if errors:
            raise errors[0]
        for old in self.listeners.pop(pod.uid, {}).values():
            old.close()
        self.listeners[pod.uid] = opened
        self.events.append(("add", pod.uid))

    async def remove_pod(self, uid: str) -> None:
        for sock in self.listeners.pop(uid, {}).values():
            sock.close()
        self.events.append(("del", uid))

    def crash(self) -> None:
        """A dying proxy's sockets close with it."""
        for listeners in self.listeners.values():
            for sock in listeners.values():
                sock.close()
        self.listeners.clear()

    async def snapshot_complete(self) -> None:
        self.events.append(("snapshot", ""))


@dataclass
class Bed:
    tag: str
    pin_dir: Path
    node_cgroup: Path
    a: Pod
    b: Pod

    @property
    def proxy_cgroup(self) -> Path:
        """Where the local cluster runs the node proxy (below the node's cgroup, so the
        programs do run for its sockets: only its cgroup id exempts them)."""
        return ClusterLayout(name=self.tag).system_cgroup("node-1", "proxy")


@pytest.fixture(scope="module")
def agent_bed(request):
    """Pods a (10.99.0.2, fd00:99::2) and b (10.99.0.3, fd00:99::3) joined by a veth pair,
    plus node cgroup and pin dir."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, cgroups and eBPF")
    tag = f"shoal-t{os.getpid()}-{zlib.crc32(request.module.__name__.encode()) % 10000}"
    node_cgroup = ClusterLayout(name=tag).node_cgroup("node-1")
    pin_dir = ClusterLayout(name=tag).bpf_pin_dir("node-1")
    # named as the local cluster names them, so a real agent process finds them
    layout = ClusterLayout(name=tag)
    pods = [Pod(name, layout.pod_netns("t", name), ip, layout.pod_cgroup("node-1", "t", name), ip6)
            for name, ip, ip6 in (("a", "10.99.0.2", "fd00:99::2"), ("b", "10.99.0.3", "fd00:99::3"))]
    try:
        for pod in pods:
            _sh("ip", "netns", "add", pod.netns)
            _sh("ip", "-n", pod.netns, "link", "set", "lo", "up")
            pod.cgroup.mkdir(parents=True)
        _sh("ip", "-n", pods[0].netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", pods[1].netns)
        for pod in pods:
            _sh("ip", "-n", pod.netns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
            _sh("ip", "-n", pod.netns, "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad")
            _sh("ip", "-n", pod.netns, "link", "set", "eth0", "up")
        yield Bed(tag, pin_dir, node_cgroup, *pods)
    finally:
        cleanup_bed(tag, pods, node_cgroup, pin_dir)


def cleanup_bed(tag: str, pods: list[Pod], node_cgroup: Path, pin_dir: Path) -> None:
    from shoal.agent.loader import detach_cgroup
    if pin_dir.exists():
        detach_cgroup(pin_dir, node_cgroup)
    for pod in pods:
        subprocess.run(["ip", "netns", "del", pod.netns], capture_output=True)
    shutil.rmtree(ClusterLayout(name=tag).run_dir, ignore_errors=True)
    if (BPFFS_ROOT / tag).exists():
        shutil.rmtree(BPFFS_ROOT / tag, ignore_errors=True)
    # cgroups: children first; a cgroup with live processes cannot go (our clients have exited)
    for path in sorted((CGROUP_ROOT / tag).glob("**/"), key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()
        except OSError:
            pass


@pytest.fixture(scope="module")
def datapath(agent_bed):
    """The real programs, loaded, pinned and attached to the bed's node cgroup."""
    from shoal.agent.cgroupid import cgroup_id
    from shoal.agent.loader import Datapath, FeatureFlags
    from shoal.agent.mapsync import DatapathMaps
    from shoal.config import PORT_HBONE, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND
    dp = Datapath(agent_bed.pin_dir, FeatureFlags(PORT_OUTBOUND, PORT_INBOUND_PLAINTEXT, PORT_HBONE))
    dp.start(agent_bed.node_cgroup)
    maps = DatapathMaps(agent_bed.pin_dir)
    agent_bed.proxy_cgroup.mkdir(parents=True, exist_ok=True)
    maps.set_proxy_cgroup(cgroup_id(agent_bed.proxy_cgroup))
    try:
        yield dp, maps
    finally:
        maps.close()
        dp.close()


ID_A, ID_B = 1001, 1002

# For the raw-packet scripts the tests run in a pod: the Internet checksum (RFC 1071).
CHECKSUM_SOURCE = r"""
def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
"""


def _imports():
    """The agent's modules, imported when a fixture runs (collection needs no bcc)."""
    from shoal.agent.netns import netns_cookie
    from shoal.agent.ringbuf import RingReader
    from shoal.datapath.structs import RINGBUF_BYTES
    from shoal.flows.kernel import decode
    return decode, netns_cookie, RingReader, RINGBUF_BYTES


@pytest.fixture
def events(datapath):
    decode, _netns_cookie, RingReader, RINGBUF_BYTES = _imports()
    _dp, maps = datapath
    seen = []
    reader = RingReader(maps.fds["flow_events"], RINGBUF_BYTES, lambda batch: seen.extend(map(decode, batch)))
    reader.consume()
    seen.clear()
    yield reader, seen
    reader.stop()


@pytest.fixture
def meshed_a(agent_bed, datapath):
    """Pod a enrolled: its netns cookie in the map, a proxy stand-in on 127.0.0.1:15001."""
    netns_cookie = _imports()[1]
    _dp, maps = datapath
    cookie = netns_cookie(agent_bed.a.netns_path)
    maps.set_pod(cookie, ID_A, agent_bed.a.ip, ns_id=7, ip6=agent_bed.a.ip6)
    proxy = agent_bed.a.listen(PORT_OUTBOUND, host="127.0.0.1")
    yield proxy
    proxy.close()
    maps.remove_pod(cookie)


@pytest.fixture
def meshed_b(agent_bed, datapath):
    """Pod b enrolled for inbound: tc steering, proxy stand-ins on 15006 and 15008, an app on 8080."""
    netns_cookie = _imports()[1]
    dp, _maps = datapath
    programs = pod_programs(dp, agent_bed)
    cookie = netns_cookie(agent_bed.b.netns_path)
    programs.attach(agent_bed.b.netns_path, cookie)
    listeners = {port: agent_bed.b.listen(port) for port in (PORT_INBOUND_PLAINTEXT, PORT_HBONE, 8080)}
    yield listeners
    for sock in listeners.values():
        sock.close()
    programs.detach(agent_bed.b.netns_path, cookie)


def pod_programs(dp, bed: Bed):
    """tc + sk_lookup for a bed pod, as the enroller attaches them."""
    from shoal.agent.enrolment import PodPrograms
    return PodPrograms(dp.tc_program_fd(), dp.sk_lookup_program_fd(), bed.pin_dir / "links")
