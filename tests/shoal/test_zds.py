"""Contract B: the pod handover protocol, pure codec and a real SEQPACKET socket pair."""
from __future__ import annotations

import asyncio
import os

import pytest

from shoal.zds import (
    PROTOCOL_VERSION,
    Ack,
    AddPod,
    DelPod,
    Hello,
    PodInfo,
    SnapshotSent,
    ZdsClient,
    ZdsError,
    ZdsServer,
    decode,
    encode,
)

POD = PodInfo(uid="u1", namespace="demo", name="web-0", ip="10.244.1.5", service_account="web")
DUAL = PodInfo("u2", "demo", "web-1", "10.244.1.6", "web", ("10.244.1.6", "fd00:10:244:1::6"))


@pytest.mark.parametrize("message", [Hello(1), AddPod(POD), AddPod(DUAL), DelPod("u1"), SnapshotSent(), Ack(None), Ack("boom")])
def test_roundtrip(message):
    assert decode(encode(message)) == message


def test_wire_format_matches_contract():
    assert decode(b'{"type":"add","uid":"u","namespace":"n","name":"p","ip":"fd00::1","service_account":"sa"}') \
        == AddPod(PodInfo("u", "n", "p", "fd00::1", "sa"))   # an older agent: ips == (ip,)
    assert decode(encode(AddPod(DUAL))).pod.ips == ("10.244.1.6", "fd00:10:244:1::6")
    assert encode(Ack(None)) == b'{"type":"ack","error":null}'


@pytest.mark.parametrize("raw", [
    b"\xff\xfe", b"[]", b'{"type":"nope"}', b'{"type":"hello","version":"1"}',
    b'{"type":"add","uid":"u","namespace":"n","name":"p","ip":"not-an-ip","service_account":"sa"}',
    b'{"type":"add","uid":"","namespace":"n","name":"p","ip":"10.0.0.1","service_account":"sa"}',
    b'{"type":"del"}', b'{"type":"ack","error":3}',
    # dual-stack: the list must hold ip, be addresses, one per family
    b'{"type":"add","uid":"u","namespace":"n","name":"p","ip":"10.0.0.1","service_account":"sa","ips":["fd00::1"]}',
    b'{"type":"add","uid":"u","namespace":"n","name":"p","ip":"10.0.0.1","service_account":"sa","ips":["10.0.0.1",7]}',
    b'{"type":"add","uid":"u","namespace":"n","name":"p","ip":"10.0.0.1","service_account":"sa",'
    b'"ips":["10.0.0.1","10.0.0.2"]}',
    b'{"type":"add","uid":"u","namespace":"n","name":"p","ip":"10.0.0.1","service_account":"sa","ips":"10.0.0.1"}',
])
def test_rejects_malformed(raw):
    with pytest.raises(ZdsError):
        decode(raw)


class RecordingHandler:
    def __init__(self):
        self.pods: dict[str, PodInfo] = {}
        self.inodes: dict[str, int] = {}
        self.snapshots = 0

    async def add_pod(self, pod, netns_fd):
        try:
            if pod.name == "bad":
                raise ValueError("cannot open listeners")
            self.pods[pod.uid] = pod
            self.inodes[pod.uid] = os.fstat(netns_fd).st_ino
        finally:
            os.close(netns_fd)

    async def remove_pod(self, uid):
        if self.pods.pop(uid, None) is None:
            raise ValueError(f"unknown pod {uid}")

    async def snapshot_complete(self):
        self.snapshots += 1


async def test_client_server_add_del_snapshot(tmp_path):
    handler, errors = RecordingHandler(), []
    server = ZdsServer(tmp_path / "zds.sock", handler, on_error=errors.append)
    await server.start()
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        async with ZdsClient(tmp_path / "zds.sock") as client:
            await client.add(POD, fd)
            assert handler.pods == {"u1": POD}
            assert handler.inodes["u1"] == os.fstat(fd).st_ino  # the very namespace crossed over
            with pytest.raises(ZdsError, match="cannot open listeners"):
                await client.add(PodInfo("u2", "demo", "bad", "10.244.1.6", "web"), fd)
            with pytest.raises(ZdsError, match="unknown pod"):
                await client.remove("zzz")
            await client.snapshot_sent()
            await client.remove("u1")  # the link survived the errors
            assert handler.pods == {} and handler.snapshots == 1
        assert len(errors) == 2
    finally:
        os.close(fd)
        await server.close()
    assert not (tmp_path / "zds.sock").exists()


async def test_client_sees_proxy_go_away_and_reconnects_to_successor(tmp_path):
    path = tmp_path / "zds.sock"
    first, second = RecordingHandler(), RecordingHandler()
    old = ZdsServer(path, first)
    await old.start()
    client = ZdsClient(path, timeout=2)
    await client.connect()
    new = ZdsServer(path, second)
    await new.start()  # a restarted proxy takes the path over
    await old.close()  # must not unlink the successor's path
    await asyncio.wait_for(client.wait_closed(), 2)
    with pytest.raises(ZdsError):
        await client.snapshot_sent()
    await client.connect()
    await client.snapshot_sent()
    assert second.snapshots == 1 and first.snapshots == 0
    await client.close()
    await new.close()


async def test_server_rejects_messages_before_hello_and_stray_fds(tmp_path):
    import socket

    from shoal.zds import recv_message, send_message

    handler = RecordingHandler()
    server = ZdsServer(tmp_path / "zds.sock", handler)
    await server.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, str(tmp_path / "zds.sock"))
    await send_message(sock, SnapshotSent())
    (ack, _) = await recv_message(sock)
    assert ack.error == "hello first"
    sock.send(b"garbage")
    (ack, _) = await recv_message(sock)
    assert "malformed" in ack.error
    await send_message(sock, Hello(2))
    (ack, _) = await recv_message(sock)
    assert "unsupported version" in ack.error
    await send_message(sock, Hello(PROTOCOL_VERSION))
    await recv_message(sock)
    await send_message(sock, AddPod(POD))   # no SCM_RIGHTS fd: refused, not handed on as None
    (ack, _) = await recv_message(sock)
    assert "without a network namespace fd" in ack.error and handler.pods == {}
    sock.close()
    await server.close()
    assert handler.snapshots == 0


async def test_protocol_over_a_socketpair_as_the_supervisor_speaks_to_a_worker():
    """The supervisor hands pods to each worker over a SEQPACKET socketpair, fd included."""
    import socket

    handler = RecordingHandler()
    server = ZdsServer("/nonexistent/never-bound.sock", handler)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    served = server.serve_connection(theirs)
    client = ZdsClient("worker 0", timeout=2)
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        await client.attach(ours)
        await client.add(POD, fd)
        await client.snapshot_sent()
        assert handler.pods == {"u1": POD} and handler.inodes["u1"] == os.fstat(fd).st_ino
        assert handler.snapshots == 1
    finally:
        os.close(fd)
        await client.close()
    await asyncio.wait_for(served, 2)   # the worker's side ends with the supervisor's
    await server.close()
