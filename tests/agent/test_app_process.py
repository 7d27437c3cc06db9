"""The real agent process (`python -m shoal.agent`) on the bed, fed by a stand-in
config server speaking the real ConfigDiscovery protocol, with a stand-in proxy on
the real ZDS socket: enrolment from the stream, SIGKILL + restart with no dropped
connection, policy push to kernel map, NACK of malformed input, uninstall."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from shoal.agent.loader import CGROUP_PROGRAMS, Datapath, FeatureFlags, ProgramLoadError
from shoal.agent.netns import netns_cookie, tc_ingress_programs
from shoal.agent.uninstall import remove_node
from shoal.api import config_pb2 as pb
from shoal.api import config_pb2_grpc as pb_grpc
from shoal.config import PORT_OUTBOUND, ClusterLayout
from shoal.datapath import bpfsys
from shoal.datapath.origdst import OriginalDestinations
from shoal.xds import convert
from shoal.xds import model as m
from shoal.zds import ZdsServer
from tests.agent.agentbed import InPodProxy, finish, serve_once

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

ID_A, ID_B = 4001, 4002
DB_VIP = "10.96.5.5"


class StandInController(pb_grpc.ConfigDiscoveryServicer):
    """Pushes whatever the test publishes; records ACK/NACK replies."""

    def __init__(self):
        self.resources: dict[str, m.Resource] = {}
        self.version = 0
        self.queues: list[asyncio.Queue] = []
        self.replies: list[pb.DeltaRequest] = []

    def _response(self, upserted, removed) -> pb.DeltaResponse:
        self.version += 1
        return pb.DeltaResponse(system_version=str(self.version), nonce=str(self.version),
                                resources=[convert.to_proto(r, str(self.version)) for r in upserted],
                                removed=list(removed))

    def publish(self, upserted=(), removed=()) -> None:
        for resource in upserted:
            self.resources[m.resource_key(resource)] = resource
        for key in removed:
            self.resources.pop(key, None)
        response = self._response(upserted, removed)
        for queue in self.queues:
            queue.put_nowait(response)

    async def StreamConfig(self, request_iterator, context):
        await request_iterator.__anext__()   # hello
        queue: asyncio.Queue = asyncio.Queue()
        self.queues.append(queue)

        async def read_replies():
            async for request in request_iterator:
                self.replies.append(request)
        reader = asyncio.create_task(read_replies())
        try:
            yield self._response(list(self.resources.values()), ())
            while True:
                yield await queue.get()
        finally:
            reader.cancel()
            self.queues.remove(queue)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def workload(bed, name, meshed, identity, ip=None):
    pod = getattr(bed, name)
    return m.Workload(uid=f"t/{name}", name=name, namespace="t", service_account=name, node="node-1",
                      ip=ip or pod.ip, identity=identity, spiffe_id=f"spiffe://cluster.local/ns/t/sa/{name}",
                      meshed=meshed)


async def eventually(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def metrics_text(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            return response.read().decode()
    except OSError:
        return ""


def cgroup_program_ids(cgroup) -> set[int]:
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {i for spec in CGROUP_PROGRAMS for i in bpfsys.prog_query(fd, spec.attach_type)}
    finally:
        os.close(fd)


class AgentProcess:
    def __init__(self, bed, controller_port: int, token_file, extra=()):
        self.metrics_port = free_port()
        self.argv = [sys.executable, "-m", "shoal.agent", "--node", "node-1", "--cluster", bed.tag,
                     "--controller", f"127.0.0.1:{controller_port}", "--token-file", str(token_file),
                     "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                     "--no-hubble", *extra]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def kill(self, sig=signal.SIGKILL) -> str:
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=20)
        return out


def long_lived_proxy(listener: socket.socket, first_answered: threading.Event):
    """The proxy stand-in's side of one captured connection: answer two pings."""
    listener.settimeout(15)
    conn, _ = listener.accept()
    conn.settimeout(20)
    assert conn.recv(64) == b"ping"
    conn.sendall(b"pong")
    first_answered.set()
    second = conn.recv(64)
    conn.sendall(b"pong2" if second == b"ping2" else b"?")
    return conn


async def test_agent_process_lifecycle(agent_bed, tmp_path):
    bed = agent_bed
    layout = ClusterLayout(name=bed.tag)
    controller = StandInController()
    server = grpc.aio.server()
    pb_grpc.add_ConfigDiscoveryServicer_to_server(controller, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    token = tmp_path / "token"
    token.write_text("test-token\n")
    handler = InPodProxy()
    zds = ZdsServer(layout.zds_socket("node-1"), handler)
    await zds.start()
    db = bed.b.listen(7000)
    agent = AgentProcess(bed, port, token)
    service = m.Service(name="db", namespace="t", vip=DB_VIP, ports=(m.ServicePort("tcp", 7000, 7000),),
                        endpoints=("t/b",))
    controller.publish([workload(bed, "a", True, ID_A), workload(bed, "b", False, ID_B), service])
    try:
        agent.start()
        from shoal.agent.mapsync import DatapathMaps
        await eventually(lambda: (bed.pin_dir / "prog_connect4").exists(), timeout=60, what="programs pinned")
        cookie = await asyncio.to_thread(netns_cookie, bed.a.netns_path)
        maps = await eventually(lambda: DatapathMaps(bed.pin_dir), what="maps")
        await eventually(lambda: cookie in maps.pods(), what="pod a enrolled from the stream")
        assert ("add", "t/a") in handler.events
        assert maps.services() == {(DB_VIP, 7000, 6): ((bed.b.ip, 7000),)}

        # a long-lived captured connection to the db VIP, held across SIGKILL + restart
        proxy_listener = handler.listeners["t/a"][PORT_OUTBOUND]
        session = bed.a.connect(DB_VIP, 7000, hold=4.0, again=True, timeout=20, wait=False)
        first_answered = threading.Event()
        proxy_task = asyncio.create_task(asyncio.to_thread(long_lived_proxy, proxy_listener, first_answered))
        assert await asyncio.to_thread(first_answered.wait, 15)
        proxy_listener.settimeout(3)
        print("first agent output:\n" + agent.kill(signal.SIGKILL)[-3000:])
        # while no agent runs, capture still works: the kernel state is pinned
        probe = bed.a.connect(bed.b.ip, 7100, wait=False)
        conn, _ = await asyncio.to_thread(serve_once, proxy_listener)
        with OriginalDestinations(bed.pin_dir) as dests:
            assert dests.lookup(conn) == (bed.b.ip, 7100)
        conn.close()
        await asyncio.to_thread(finish, probe)
        before = cgroup_program_ids(bed.node_cgroup)
        agent.start()
        await eventually(lambda: "shoal_agent_enrolled_pods 1.0" in metrics_text(agent.metrics_port),
                         timeout=60, what="restarted agent adopting pod a")
        assert cgroup_program_ids(bed.node_cgroup) != before   # atomically replaced by the new agent's programs
        result = await asyncio.to_thread(finish, session, 30)
        assert result["reply"] == "pong" and result["again"] == "pong2", result
        (await proxy_task).close()
        assert ("del", "t/a") not in handler.events          # adoption, not re-enrolment
        assert await asyncio.to_thread(tc_ingress_programs, bed.a.netns_path) == ["shoal_tc_ingress"]
        # the agent reports the in-kernel capture cost, including runs made while it was down
        text = metrics_text(agent.metrics_port)
        assert 'shoal_agent_capture_cost_nanoseconds{program="connect",stat="p50"}' in text
        assert 'shoal_agent_bpf_events_total{event="connect_redirected"}' in text

        # a DENY pushed on the stream reaches the kernel map and fails connect() at once
        policy = m.Authorization(name="no-a-db", namespace="t", action="DENY", selector=m.Labels({}),
                                 rules=(m.Rule(sources=(m.Source(principals=("cluster.local/ns/t/sa/a",)),),
                                               operations=(m.Operation(ports=(7000,)),)),))
        pushed = time.monotonic()
        controller.publish([policy])
        await eventually(lambda: maps.policies(), what="deny in the kernel map")
        print(f"policy push -> kernel map observed after {(time.monotonic() - pushed) * 1000:.1f} ms")
        result = bed.a.connect(DB_VIP, 7000, timeout=5)
        assert not result["ok"] and result["errno"] == 1 and result["elapsed"] < 1.0

        # malformed input is NACKed; the rest keeps working
        controller.publish([workload(bed, "b", False, ID_B, ip="10.99.0.300")])
        await eventually(lambda: any(r.HasField("error_detail") for r in controller.replies), what="NACK")
        assert maps.endpoints()[bed.b.ip].identity == ID_B
        assert "shoal_agent_config_rejected_total" in metrics_text(agent.metrics_port)

        # unlabel: unenrolled live
        controller.publish([workload(bed, "a", False, ID_A)])
        await eventually(lambda: cookie not in maps.pods(), what="pod a unenrolled")
        await eventually(lambda: not tc_ingress_programs(bed.a.netns_path), what="tc detached")

        # SIGTERM leaves the data path in place; uninstall removes it
        agent.kill(signal.SIGTERM)
        assert cgroup_program_ids(bed.node_cgroup)
        maps.close()
        removed = await asyncio.to_thread(remove_node, layout, "node-1")
        assert any("pins" in item for item in removed)
        assert not bed.pin_dir.exists() and not cgroup_program_ids(bed.node_cgroup)
    finally:
        if agent.proc is not None and agent.proc.returncode is None:
            print("agent output:\n" + agent.kill(signal.SIGKILL)[-3000:])
        db.close()
        for listeners in handler.listeners.values():
            for sock in listeners.values():
                sock.close()
        await zds.close()
        await server.stop(0)


def test_a_program_that_fails_to_verify_stops_the_agent_attaching_nothing(agent_bed, tmp_path):
    from shoal import bpf
    broken = tmp_path / "bpf"
    shutil.copytree(bpf.SOURCE_DIR, broken, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    source = (broken / "tc_ingress.c").read_text()
    bounds_check = "if ((void *)(ip6 + 1) > data_end)\n            return TC_ACT_OK;"   # the IPv6 header's
    assert bounds_check in source
    (broken / "tc_ingress.c").write_text(source.replace(bounds_check, ""))
    agent_bed.node_cgroup.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "shoal.agent", "--node", "node-1", "--cluster", agent_bed.tag,
                           "--bpf-source-dir", str(broken), "--no-hubble", "--token-file", "/nonexistent"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "'tc_ingress'" in proc.stderr and "invalid access to packet" in proc.stderr, proc.stderr[-2000:]
    assert not cgroup_program_ids(agent_bed.node_cgroup)
    assert not (agent_bed.pin_dir / "prog_connect4").exists()
    with pytest.raises(ProgramLoadError) as raised:
        Datapath(agent_bed.pin_dir.parent / "verify", FeatureFlags(15001, 15006, 15008), broken).load()
    assert raised.value.program == "tc_ingress"
