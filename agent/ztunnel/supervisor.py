"""The node proxy on every core (issue 13): a supervisor and N worker processes.

Python runs one thread of bytecode per process, so one process carries one core. The
supervisor starts N copies of the single-process proxy as workers and shares the work
out with the kernel's SO_REUSEPORT: every worker opens its own in-pod listeners
(15001/15006/15008) on the same addresses, and the kernel hashes each new connection to
one of them. Each worker holds its own HBONE pool; a connection lives and dies in the
worker that accepted it.

What stays single, in the supervisor (no data path):

- **The config stream and the certificates** (``nodelink.py``): one stream to the
  controller per node, whatever N is, and one CSR per identity the node hosts (asked
  for when the agent hands over a pod of it, renewed at half-life, dropped with the
  node's last pod of it). Each worker gets them over its own end of a socketpair passed
  at exec (``feed.py``): a full config snapshot once the stream is synced (and to a
  restarted worker), every later change as it is applied, every SVID with its key as it
  is issued or rotated. Keys go nowhere else: no file, no path. So the workers import
  neither ``grpc`` nor ``cryptography`` (~25 MB RSS each).

- **ZDS.** The agent connects to the supervisor as to any node proxy (its cgroup is the
  workers' cgroup). Each pod's ``add``/``del``/``snapshot_sent`` goes to every worker over
  its own SEQPACKET socketpair, in the same ZDS protocol (``shoal.zds``), the netns fd
  passed on with SCM_RIGHTS; the agent's ack comes once every worker acked. The
  supervisor keeps a dup of each pod's netns fd, so a restarted worker gets every pod
  replayed without asking the agent.
- **HTTP.** 15000 admin, 15020 metrics and 15021 readiness: each page is every worker's
  page (fetched over a Unix socket in the node directory) merged by ``aggregate.py``, so a
  node proxy exports one set of metrics whatever N is. ``/workers`` lists the workers.
- **Handover.** The markers and the SIGTERM dance of ``handover.py``: the supervisor is
  ``ready`` when every worker serves every pod; when retiring it waits for its
  successor's ``proxy.ready`` before it asks its workers to stop accepting and drain.
- **Crashes.** A worker that exits unasked is started again and gets every pod; its
  connections (the live ones at the last poll, once a second) are counted as lost. The
  other workers' connections are not touched. New connections are never refused
  meanwhile: the dead worker's listeners leave the SO_REUSEPORT groups, the others take
  every new connection (and ``tcp_migrate_req`` moves its queued ones to them).
- ``<node dir>/proxy-workers.json``: each worker's pid, connections and health, for
  ``shoal status``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from shoal.agent.ztunnel import transparent
from shoal.agent.ztunnel.admin import HttpEndpoint, Page, json_page, ready_pages
from shoal.agent.ztunnel.aggregate import merge_certs, merge_connections, merge_expositions
from shoal.agent.ztunnel.config import ProxyConfig
from shoal.agent.ztunnel.feed import ConfigUpdate, FeedMessage, SvidDropped, SvidGrant, SvidPending, encode
from shoal.agent.ztunnel.handover import (
    Markers,
    cancel_all,
    remove_workers_report,
    reported,
    serve_until_signalled,
    worker_entry,
    write_workers_report,
)
from shoal.agent.ztunnel.netns import NetnsHandle
from shoal.agent.ztunnel.nodelink import NodeLink
from shoal.exits import exit_description
from shoal.hbone.identity import IdentityError, Svid
from shoal.memdebug import MemoryReport, rss_kib
from shoal.xds import model as m
from shoal.xds.state import ConfigState
from shoal.zds import PodInfo, ZdsClient, ZdsError, ZdsServer

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0        # worker status (and the connections a crash would lose)
PAGE_TIMEOUT = 5.0         # one worker page
MEMORY_PAGE_TIMEOUT = 60.0  # its /debug/memory walks the heap (and diffs traces when tracing)
WORKER_HELLO_TIMEOUT = 60.0  # a worker's first ack includes its start-up (imports) on a loaded node
RESTART_BACKOFF = (0.2, 5.0)
FEED_BACKLOG = 256 * 1024 * 1024   # unread feed bytes before a worker counts as stuck


class WorkerFeed:
    """The supervisor's end of one worker's feed (``feed.py``): frames written in order,
    buffered by the transport while the worker reads. A worker that stops reading is not
    buffered for without bound: past ``FEED_BACKLOG`` bytes it is stuck, and ``on_stuck``
    (the supervisor kills it; its successor gets a fresh snapshot)."""

    def __init__(self, sock: socket.socket, on_stuck: Callable[[], None]):
        self.sock = sock
        self._on_stuck = on_stuck
        self._writer: asyncio.StreamWriter | None = None
        self.config_fed = False   # its snapshot went: every later change goes too

    async def open(self) -> None:
        _, self._writer = await asyncio.open_unix_connection(sock=self.sock)

    def send(self, message: FeedMessage) -> None:
        if self._writer is None or self._writer.is_closing():
            return
        self._writer.write(encode(message))
        if self._writer.transport.get_write_buffer_size() > FEED_BACKLOG:
            self._writer.close()
            self._on_stuck()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        else:
            self.sock.close()


def grant_of(svid: Svid) -> SvidGrant:
    return SvidGrant(svid.spiffe_id, svid.chain_pem, svid.key_pem, svid.roots_pem, svid.not_before, svid.not_after)


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process
    zds: ZdsClient
    feed: WorkerFeed
    started: float = field(default_factory=time.monotonic)
    attached: bool = False        # hello acked and every pod replayed: live changes reach it
    status: dict = field(default_factory=dict)  # its last /worker page

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe(self) -> dict:
        if self.process.returncode is not None:
            health = "down"
        elif not self.attached:
            health = "starting"
        else:
            health = "ready" if self.status.get("ready") else "not ready"
        return worker_entry(self.index, self.pid, health, self.status, time.monotonic() - self.started)


class SupervisorMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.workers = Gauge("shoal_proxy_workers", "Worker processes serving the node's pods now",
                             registry=registry)
        self.restarts = Counter("shoal_proxy_worker_restarts", "Workers that exited unasked and were started again",
                                registry=registry)
        self.lost = Counter("shoal_proxy_worker_lost_connections",
                            "Connections that were live in a worker when it exited unasked", registry=registry)
        self.rejected = Counter("shoal_proxy_rejected", "Connections, streams or messages refused, by reason",
                                ["listener", "reason"], registry=registry)
        self.worker_connections = Gauge("shoal_proxy_worker_connections", "Live connections per worker",
                                        ["worker"], registry=registry)
        # The same name as a single process's (telemetry.ProxyMetrics): the workers' stay 0.
        self.certs_rotated = Counter("shoal_proxy_certificates_rotated", "SVIDs renewed at half-life",
                                     registry=registry)


async def fetch_page(path: str, page: str, timeout: float = PAGE_TIMEOUT) -> tuple[int, bytes]:
    """GET ``page`` from a worker's Unix socket: (status, body)."""
    async def get() -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(f"GET {page} HTTP/1.0\r\n\r\n".encode())
            return await reader.read()
        finally:
            writer.close()
    raw = await asyncio.wait_for(get(), timeout)
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise OSError(f"bad answer from {path}: {head[:80]!r}") from None
    return status, body


class Supervisor:
    """Starts the workers, relays ZDS to each, merges their pages, restarts the dead."""

    def __init__(self, config: ProxyConfig, argv: Sequence[str]):
        self.config = config
        self.argv = list(argv)   # a worker runs with the supervisor's own flags, plus --worker
        self.registry = CollectorRegistry()
        self.metrics = SupervisorMetrics(self.registry)
        self.workers: dict[int, Worker] = {}
        self.pods: dict[str, tuple[PodInfo, int]] = {}   # uid -> (pod, our dup of its netns fd)
        self.snapshot_done = asyncio.Event()
        self.restarts = 0           # workers that exited unasked
        self.lost_connections = 0   # their live connections
        self.retiring = asyncio.Event()
        self.markers = Markers(config.node_dir)
        self.home = NetnsHandle.current()
        self.zds = ZdsServer(config.zds_path, self, on_error=lambda reason: log.warning("zds: %s", reason))
        self.state = ConfigState()   # written by the config stream only; fed to every worker
        self.config_synced = asyncio.Event()
        self.link = NodeLink(config, self.state, on_error=lambda reason: self.metrics.rejected.labels(
                                 "identity", "svid").inc(),
                             on_issued=lambda svid: self._broadcast(grant_of(svid)),
                             on_dropped=lambda spiffe: self._broadcast(SvidDropped(spiffe)))
        self.state.subscribe(self._config_changed)
        self._relay = asyncio.Lock()   # one pod change at a time, and none during a worker's replay
        self._endpoints: list[HttpEndpoint] = []
        self._tasks: list[asyncio.Task] = []

    @property
    def ready(self) -> bool:
        """Every worker serves every pod: what a predecessor waits for (``proxy.ready``)."""
        return (self.snapshot_done.is_set() and not self.retiring.is_set()
                and len(self.workers) == self.config.workers
                and all(w.attached and w.status.get("ready") for w in self.workers.values()))

    @property
    def serving(self) -> bool:
        """Readiness (15021): some worker serves every pod. While a crashed worker restarts
        the others carry every new connection, so the node proxy stays ready."""
        return (self.snapshot_done.is_set() and not self.retiring.is_set()
                and any(w.attached and w.process.returncode is None and w.status.get("ready")
                        for w in self.workers.values()))

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        Path(self.config.node_dir).mkdir(parents=True, exist_ok=True)
        predecessor = self.markers.read("proxy.pid")
        await self.zds.start()
        self.markers.write("proxy.pid")
        self._tasks += [reported(task, "supervisor: node link") for task in
                        self.link.start(self.config_synced, self.metrics.certs_rotated.inc)]
        self._tasks.append(reported(asyncio.ensure_future(self._feed_snapshots()), "supervisor: config feed"))
        await asyncio.gather(*(self._start_worker(i) for i in range(self.config.workers)))
        self._tasks.append(reported(asyncio.ensure_future(self._poll()), "supervisor: worker polling"))
        self._tasks.append(reported(asyncio.ensure_future(self._announce_ready()), "supervisor: readiness"))
        await self._start_http()
        self.markers.retire_predecessor(predecessor)
        log.info("supervisor: %d workers: %s", self.config.workers,
                 ", ".join(str(w.pid) for w in self.workers.values()))

    async def _start_worker(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        feed_ours, feed_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fds = (theirs.fileno(), feed_theirs.fileno())
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "shoal.agent.ztunnel", *self.argv, "--worker", f"{index}:{fds[0]}:{fds[1]}",
                pass_fds=fds, stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            ours.close()
            feed_ours.close()
            raise
        finally:
            theirs.close()
            feed_theirs.close()
        feed = WorkerFeed(feed_ours, on_stuck=lambda: self._stuck(index, process))
        try:
            await feed.open()
        except BaseException:
            # Not left running unsupervised (its restart is tried again by _watch).
            ours.close()
            feed.close()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        worker = Worker(index, process, ZdsClient(f"worker {index}", timeout=WORKER_HELLO_TIMEOUT), feed)
        # What it needs before its pods: the node's SVIDs and, once synced, the config; from
        # here on (no await in between) every change reaches it as it reaches the others.
        self.workers[index] = worker
        for spiffe in self.link.identities.in_use():
            svid = self.link.identities.current(spiffe)
            feed.send(grant_of(svid) if svid is not None else SvidPending(spiffe))
        if self.config_synced.is_set():
            self._feed_snapshot(feed)
        self._tasks.append(reported(asyncio.ensure_future(self._watch(worker)), f"supervisor: worker {index}'s watch"))
        try:
            await worker.zds.attach(ours)
            async with self._relay:
                for pod, fd in list(self.pods.values()):
                    await worker.zds.add(pod, fd)
                if self.snapshot_done.is_set():
                    await worker.zds.snapshot_sent()
                worker.attached = True
        except ZdsError as exc:
            log.error("supervisor: worker %d (pid %d) did not take the pods: %s", index, worker.pid, exc)
            with contextlib.suppress(ProcessLookupError):
                process.kill()   # _watch starts another
            return
        self.metrics.workers.set(sum(w.attached for w in self.workers.values()))
        log.info("supervisor: worker %d (pid %d) serves %d pods", index, worker.pid, len(self.pods))

    async def _watch(self, worker: Worker) -> None:
        """Every end of a worker leaves a line: how it ended (exit code, or the signal that
        killed it: SIGKILL is the OOM killer's) and what the supervisor does next."""
        code = await worker.process.wait()
        await worker.zds.close()
        worker.feed.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.worker_admin_path(worker.pid))   # a killed worker could not
        self.metrics.workers.set(sum(w.attached and w.process.returncode is None for w in self.workers.values()))
        if self.retiring.is_set():
            log.info("supervisor: worker %d (pid %d) %s; retiring, not restarted", worker.index, worker.pid,
                     exit_description(code))
            return
        lost = int(worker.status.get("connections", 0))
        self.restarts += 1
        self.lost_connections += lost
        self.metrics.restarts.inc()
        self.metrics.lost.inc(lost)
        uptime = time.monotonic() - worker.started
        backoff = RESTART_BACKOFF[0] if uptime > 10 else RESTART_BACKOFF[1]
        log.error("supervisor: worker %d (pid %d) %s after %.0f s; its %d live connections are lost; "
                  "restarting it in %.1f s", worker.index, worker.pid, exit_description(code), uptime, lost, backoff)
        while True:
            await asyncio.sleep(backoff)
            if self.retiring.is_set():
                return
            try:
                await self._start_worker(worker.index)
                return
            except OSError as exc:   # out of fds or memory for a process: try again, never give up silently
                backoff = RESTART_BACKOFF[1]
                log.error("supervisor: worker %d could not be started again (%s: %s); retrying in %.1f s",
                          worker.index, type(exc).__name__, exc, backoff)

    async def _poll(self) -> None:
        while True:
            await asyncio.gather(*(self._poll_one(w) for w in list(self.workers.values())))
            write_workers_report(self.config.workers_status_path, self.describe())
            await asyncio.sleep(POLL_INTERVAL)

    async def _poll_one(self, worker: Worker) -> None:
        if worker.process.returncode is not None:
            return
        try:
            status, body = await fetch_page(self.config.worker_admin_path(worker.pid), "/worker")
            if status == 200:
                worker.status = json.loads(body)
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            log.debug("supervisor: worker %d status: %s", worker.index, exc)
        self.metrics.worker_connections.labels(str(worker.index)).set(worker.status.get("connections", 0))

    def describe(self) -> dict:
        workers = [w.describe() for _, w in sorted(self.workers.items())]
        own = rss_kib()
        return {"proxy": os.getpid(), "time": time.time(), "workers_wanted": self.config.workers,
                "restarts": self.restarts, "lost_connections": self.lost_connections,
                "supervisor_rss_kib": own,
                "rss_kib": own + sum(w["rss_kib"] for w in workers if w["health"] != "down"),
                "workers": workers}

    async def _announce_ready(self) -> None:
        while not self.ready:
            await asyncio.sleep(0.1)
        self.markers.write("proxy.ready")
        log.info("supervisor: every worker serves every pod")

    async def retire(self) -> None:
        """Handover/shutdown: let the successor take over, then let each worker drain."""
        if self.retiring.is_set():
            return
        self.retiring.set()
        successor = not self.zds.owns_path()
        await self.zds.close()   # the agent reconnects to the successor and replays
        if successor:
            await self.markers.wait_for_successor(self.config.handover_wait)
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)   # each stops accepting and drains
        waits = [w.process.wait() for w in self.workers.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.config.drain_grace + 30)
        except asyncio.TimeoutError:
            for worker in self.workers.values():
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
        await self.stop()

    async def stop(self) -> None:
        self.retiring.set()
        await cancel_all(self._tasks)
        await self.zds.close()
        for worker in self.workers.values():
            await worker.zds.close()
            worker.feed.close()
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
        for endpoint in self._endpoints:
            await endpoint.close()
        self._endpoints.clear()
        for pod, fd in self.pods.values():
            os.close(fd)
            self._release(pod)
        self.pods.clear()
        await self.link.close()
        self.markers.remove_own()
        remove_workers_report(self.config.workers_status_path)

    # -- ZDS: the agent's changes, to every worker ---------------------------------------------
    def _attached(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.attached and w.process.returncode is None]

    async def add_pod(self, pod: PodInfo, netns_fd: int) -> None:
        async with self._relay:
            acquired = False
            try:
                current = self.pods.get(pod.uid)
                if current is None or current[0] != pod or os.fstat(current[1]).st_ino != os.fstat(netns_fd).st_ino:
                    problem = transparent.prepare_pod_netns(NetnsHandle(netns_fd, self.home.fd), pod)
                    if problem is not None:
                        raise ZdsError(problem)
                # Its identity first: the workers get the SVID (or word that the CA is being
                # retried) before the pod, whose enrolment waits for it.
                spiffe = await self._acquire(pod)
                acquired = True
                workers = self._attached()
                results = await asyncio.gather(*(w.zds.add(pod, netns_fd) for w in workers), return_exceptions=True)
                failed = [(w, r) for w, r in zip(workers, results, strict=True)
                          if isinstance(r, BaseException) and w.zds.connected]
                if failed:
                    # All or nothing: a pod served by some workers only would look enrolled
                    # while part of its connections went to a worker without its identity.
                    # (A worker that died meanwhile is not a refusal: its successor gets the replay.)
                    for worker, result in zip(workers, results, strict=True):
                        if not isinstance(result, BaseException):
                            with contextlib.suppress(ZdsError):
                                await worker.zds.remove(pod.uid)
                    worker, error = failed[0]
                    raise ZdsError(f"worker {worker.index}: {error}")
                previous = self.pods.pop(pod.uid, None)
                if previous is not None:
                    os.close(previous[1])
                    self._release(previous[0])   # the new entry holds its own
                self.pods[pod.uid] = (pod, os.dup(netns_fd))
                acquired = False
                log.debug("supervisor: %s/%s served as %s", pod.namespace, pod.name, spiffe)
            finally:
                if acquired:
                    self._release(pod)
                os.close(netns_fd)

    async def _acquire(self, pod: PodInfo) -> str:
        try:
            spiffe = await self.link.identities.acquire(pod.namespace, pod.service_account)
        except IdentityError as exc:
            raise ZdsError(str(exc)) from exc
        if self.link.identities.current(spiffe) is None:   # the CA is being retried
            self._broadcast(SvidPending(spiffe))
        return spiffe

    def _release(self, pod: PodInfo) -> None:
        self.link.identities.release(pod.namespace, pod.service_account)

    async def remove_pod(self, uid: str) -> None:
        async with self._relay:
            entry = self.pods.pop(uid, None)
            if entry is None:
                raise ZdsError(f"unknown pod {uid}")
            workers = self._attached()
            results = await asyncio.gather(*(w.zds.remove(uid) for w in workers), return_exceptions=True)
            netns = NetnsHandle(entry[1], self.home.fd)
            transparent.remove(netns, entry[0].ips)
            netns.close()
            self._release(entry[0])   # the node's last pod of it: the workers drop the key
            errors = [f"worker {w.index}: {r}" for w, r in zip(workers, results, strict=True)
                      if isinstance(r, BaseException) and w.zds.connected]
            if errors:
                raise ZdsError("; ".join(errors))

    async def snapshot_complete(self) -> None:
        async with self._relay:
            await asyncio.gather(*(w.zds.snapshot_sent() for w in self._attached()))
            self.snapshot_done.set()
        log.info("supervisor: agent snapshot complete: %d pods", len(self.pods))

    # -- the feed: config and certificates, to every worker ----------------------------------
    def _stuck(self, index: int, process: asyncio.subprocess.Process) -> None:
        log.error("supervisor: worker %d (pid %d) reads nothing of its feed (%d bytes unread): killing it",
                  index, process.pid, FEED_BACKLOG)
        self.metrics.rejected.labels("feed", "worker_stuck").inc()
        with contextlib.suppress(ProcessLookupError):
            process.kill()   # _watch starts another, which gets a fresh snapshot

    def _broadcast(self, message: FeedMessage) -> None:
        for worker in self.workers.values():
            if worker.process.returncode is None:
                worker.feed.send(message)

    def _feed_snapshot(self, feed: WorkerFeed) -> None:
        feed.send(ConfigUpdate(m.ConfigDelta(version=self.state.version, upserted=tuple(self.state.resources())),
                               snapshot=True))
        feed.config_fed = True

    async def _feed_snapshots(self) -> None:
        """Once the config stream is synced, every worker started before gets its snapshot
        (later ones get theirs when they start); from then on, every change."""
        await self.config_synced.wait()
        for worker in self.workers.values():
            if not worker.feed.config_fed:
                self._feed_snapshot(worker.feed)
        log.info("supervisor: config version %s fed to %d workers", self.state.version, len(self.workers))

    def _config_changed(self, delta: m.ConfigDelta) -> None:
        message = ConfigUpdate(m.ConfigDelta(version=delta.version, upserted=delta.upserted, removed=delta.removed))
        for worker in self.workers.values():
            if worker.feed.config_fed and worker.process.returncode is None:
                worker.feed.send(message)

    # -- HTTP: one node proxy's pages -----------------------------------------------------------
    async def _worker_pages(self, page: str, timeout: float = PAGE_TIMEOUT) -> dict[int, bytes]:
        async def one(worker: Worker) -> tuple[int, bytes | None]:
            try:
                status, body = await fetch_page(self.config.worker_admin_path(worker.pid), page, timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                log.warning("supervisor: worker %d %s: %s", worker.index, page, exc)
                return worker.index, None
            return worker.index, body if status == 200 else None
        pages = await asyncio.gather(*(one(w) for w in self._attached()))
        return {index: body for index, body in pages if body is not None}

    async def _json_pages(self, page: str, timeout: float = PAGE_TIMEOUT) -> dict[int, dict]:
        return {i: json.loads(body) for i, body in (await self._worker_pages(page, timeout)).items()}

    async def _start_http(self) -> None:
        async def metrics():
            texts = [body.decode() for body in (await self._worker_pages("/metrics")).values()]
            texts.append(generate_latest(self.registry).decode())
            return 200, "text/plain; version=0.0.4; charset=utf-8", merge_expositions(texts)

        async def config_dump():
            dumps = await self._json_pages("/config_dump")
            first = dumps[min(dumps)] if dumps else {}
            return json_page({**first, "workers": self.describe()["workers"]})

        async def certs():
            return json_page({**merge_certs(await self._json_pages("/certs")),
                              "rotations": self.link.identities.rotations})

        async def connections():
            return json_page(merge_connections(await self._json_pages("/connections")))

        async def workers():
            return json_page(self.describe())

        own_memory = MemoryReport(lambda: {"workers": len(self.workers), "pods": len(self.pods)})

        def memory(objects: bool) -> Page:   # each worker's own page (its data path), and ours
            async def page() -> tuple[int, str, bytes]:
                path = "/debug/memory/objects" if objects else "/debug/memory"
                return json_page({"supervisor": own_memory.page(objects),
                                  "workers": await self._json_pages(path, MEMORY_PAGE_TIMEOUT)})
            return page

        home = self.config.http_address
        for pages, host, port in (
                ({"/config_dump": config_dump, "/certs": certs, "/connections": connections, "/workers": workers,
                  "/debug/memory": memory(objects=False), "/debug/memory/objects": memory(objects=True)},
                 self.config.admin_address, self.config.admin_port),
                ({"/metrics": metrics, "/stats/prometheus": metrics}, home, self.config.metrics_port),
                (ready_pages(lambda: self.serving), home, self.config.ready_port)):
            endpoint = HttpEndpoint(pages, on_bad_request=lambda: self.metrics.rejected.labels("http", "bad_request").inc())
            await endpoint.start(host, port)
            self._endpoints.append(endpoint)


async def main(config: ProxyConfig, argv: Sequence[str], install_signals: bool = True) -> None:
    """Run the supervisor of ``config.workers`` workers, each started with ``argv``. Only
    this module and light ones are imported here: the data path lives in the workers."""
    log.info("supervisor of %d workers of the node proxy for %s starting (pid %d)",
             config.workers, config.node, os.getpid())
    await serve_until_signalled(Supervisor(config, argv), install_signals)
