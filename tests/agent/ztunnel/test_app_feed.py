"""A real worker process of a supervised node proxy, fed by this test as its supervisor would
(``feed.py`` over the inherited socketpair, ZDS over the other): config snapshots and
deltas land in its state, SVIDs (and their rotation and removal) in its certificates; it
refuses a pod whose identity it was not handed; a frame it cannot trust stops it; and it
has neither grpc nor cryptography in its memory."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys

import pytest

from shoal.agent.ztunnel import feed
from shoal.agent.ztunnel.config import ProxyConfig
from shoal.agent.ztunnel.supervisor import fetch_page
from shoal.config import ClusterLayout
from shoal.hbone.issuer import make_csr, svid_from_signed
from shoal.xds import model as m
from shoal.zds import PodInfo, ZdsClient, ZdsError

pytestmark = pytest.mark.timeout(120)

WEB = "spiffe://cluster.local/ns/demo/sa/web"
WORKLOAD = m.Workload(uid="u-web", name="web-0", namespace="demo", service_account="web", node="node-1",
                      ip="10.244.1.5", identity=7, spiffe_id=WEB, meshed=True)
SERVICE = m.Service(name="web", namespace="demo", vip="10.96.0.10", ports=(m.ServicePort("http", 80, 8080),),
                    endpoints=("u-web",))
OTHER = m.Service(name="db", namespace="demo", vip="10.96.0.11")


class FedWorker:
    def __init__(self, process, zds: ZdsClient, feed_sock: socket.socket, config: ProxyConfig):
        self.process, self.zds, self.feed_sock, self.config = process, zds, feed_sock, config

    def send(self, *messages: feed.FeedMessage) -> None:
        self.feed_sock.sendall(b"".join(feed.encode(message) for message in messages))

    async def page(self, path: str) -> dict:
        status, body = await fetch_page(self.config.worker_admin_path(self.process.pid), path)
        assert status == 200, body
        return json.loads(body)

    async def until(self, path: str, check, timeout: float = 20.0) -> dict:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                page = await self.page(path)
                if check(page):
                    return page
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{path} never became what was expected; last: {page if 'page' in dir() else None}")
            await asyncio.sleep(0.1)

    def mapped_files(self) -> str:
        with open(f"/proc/{self.process.pid}/maps") as maps:
            return maps.read()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))


@pytest.fixture
async def worker():
    name = f"shoal-test-feed-{os.getpid()}"
    layout = ClusterLayout(name=name)
    zds_ours, zds_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    feed_ours, feed_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = ["--node", "node-1", "--cluster", name, "--workers", "2", "--no-same-node-bypass", "--drain-grace", "1"]
    fds = (zds_theirs.fileno(), feed_theirs.fileno())
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.agent.ztunnel", *argv, "--worker", f"0:{fds[0]}:{fds[1]}", pass_fds=fds,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    zds_theirs.close()
    feed_theirs.close()
    zds = ZdsClient("worker 0", timeout=60)
    try:
        await zds.attach(zds_ours)
        yield FedWorker(process, zds, feed_ours, ProxyConfig.from_args(argv))
    finally:
        await zds.close()
        feed_ours.close()
        if process.returncode is None:
            process.kill()
        await process.communicate()
        shutil.rmtree(layout.run_dir, ignore_errors=True)


async def grant(ca, spiffe: str = WEB) -> feed.SvidGrant:
    key_pem, csr_pem = make_csr(spiffe)
    chain_pem, roots_pem = await ca.sign(csr_pem)
    svid = svid_from_signed(spiffe, chain_pem, key_pem, roots_pem)
    return feed.SvidGrant(spiffe, chain_pem, key_pem, roots_pem, svid.not_before, svid.not_after)


def keys(dump: dict) -> set[str]:
    return {f"{w['namespace']}/{w['name']}" for w in dump.get("workloads", [])} | \
           {f"svc:{s['namespace']}/{s['name']}" for s in dump.get("services", [])}


async def test_config_and_certificates_reach_a_worker_that_imports_neither_grpc_nor_cryptography(worker, ca):
    assert not (await worker.page("/worker"))["ready"]
    first = await grant(ca)
    worker.send(first, feed.ConfigUpdate(m.ConfigDelta(version="5", upserted=(WORKLOAD, SERVICE)), snapshot=True))
    await worker.zds.snapshot_sent()
    await worker.until("/worker", lambda page: page["ready"])   # the snapshot is what makes it ready
    certs = await worker.page("/certs")
    assert [c["identity"] for c in certs["certificates"]] == [WEB] and certs["rotations"] == 0
    tables = (await worker.page("/debug/memory"))["structures"]
    assert tables["svids"] == 1 and tables["svids_announced"] == 1
    dump = await worker.page("/config_dump")
    assert dump["config_version"] == "5" and keys(dump) == {"demo/web-0", "svc:demo/web"}
    # The install compiles the data path (setup.py); SHOAL_COMPILE=0 installs it interpreted.
    assert dump["data_path"] == ("interpreted" if os.environ.get("SHOAL_COMPILE") == "0" else "compiled")

    # A delta, then a snapshot that no longer holds what the worker has: it goes.
    worker.send(feed.ConfigUpdate(m.ConfigDelta(version="6", upserted=(OTHER,), removed=("service/demo/web",))))
    await worker.until("/config_dump", lambda d: d["config_version"] == "6" and keys(d) == {"demo/web-0", "svc:demo/db"})
    worker.send(feed.ConfigUpdate(m.ConfigDelta(version="7", upserted=(SERVICE,)), snapshot=True))
    await worker.until("/config_dump", lambda d: d["config_version"] == "7" and keys(d) == {"svc:demo/web"})

    # Rotation replaces the SVID; the last pod of the identity leaving drops it.
    second = await grant(ca)
    worker.send(second)
    rotated = await worker.until("/certs", lambda c: c["rotations"] == 1)
    assert len(rotated["certificates"]) == 1
    worker.send(feed.SvidDropped(WEB))
    await worker.until("/certs", lambda c: c["certificates"] == [])

    maps = worker.mapped_files()
    assert "cygrpc" not in maps and "/grpc/" not in maps, "the worker loaded grpc"
    assert "/cryptography/" not in maps, "the worker loaded cryptography"
    print(f"worker idle RSS: {worker.rss_mb():.1f} MB")


async def test_a_pod_whose_identity_the_supervisor_did_not_hand_over_is_refused(worker):
    worker.send(feed.ConfigUpdate(m.ConfigDelta(version="1"), snapshot=True))
    pod = PodInfo(uid="u-db", namespace="demo", name="db-0", ip="10.244.1.9", service_account="db")
    netns = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        with pytest.raises(ZdsError, match="holds no such identity"):
            await worker.zds.add(pod, netns)
    finally:
        os.close(netns)
    assert (await worker.page("/worker"))["pods"] == []


async def test_a_frame_it_cannot_trust_stops_the_worker(worker, ca):
    worker.send(await grant(ca))
    await worker.until("/certs", lambda c: len(c["certificates"]) == 1)
    worker.feed_sock.sendall(feed.HEADER.pack(feed.FEED_VERSION + 1, feed.Kind.SVID, 2) + b"{}")
    await asyncio.wait_for(worker.process.wait(), 30)
    _, err = await worker.process.communicate()
    assert b"feed version 2" in err and b"this worker stops" in err


async def test_a_message_it_cannot_apply_stops_the_worker_with_a_line(monkeypatch, caplog):
    """No fd left for an SVID's key, say: the worker stops (its supervisor starts a fresh
    one with a full snapshot) instead of serving on behind the node's config, unseen."""
    import logging
    import signal

    from shoal.agent.ztunnel.app import FeedReader
    from shoal.hbone.identity import HeldIdentities
    from shoal.xds.state import ConfigState

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    errors: list[str] = []
    reader = FeedReader(theirs, ConfigState(), HeldIdentities("cluster.local"), asyncio.Event(), errors.append)

    def apply(message):
        raise OSError(24, "Too many open files")

    signalled: list[tuple[int, int]] = []
    monkeypatch.setattr(reader, "apply", apply)
    monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append((pid, sig)))
    ours.sendall(feed.encode(feed.SvidPending(WEB)))
    with caplog.at_level(logging.ERROR, logger="shoal.agent.ztunnel.app"):
        await asyncio.wait_for(reader.run(), 10)
    ours.close()
    theirs.close()
    assert errors == ["apply"] and signalled == [(os.getpid(), signal.SIGTERM)]
    assert "Too many open files" in caplog.text and "this worker stops" in caplog.text
