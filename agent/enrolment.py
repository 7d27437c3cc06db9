"""Enrolment of this node's meshed pods: netns cookie map, tc inside the pod, ZDS add.

Order matters. On enrol the proxy opens its in-pod listeners first (ZDS add acks
after that), then tc steers inbound to them, and only then the cookie goes into the
map so outbound connects are captured. Unenrol runs the same steps backwards. A pod
is only enrolled while the proxy is reachable; once enrolled, a proxy crash leaves
it captured (fail closed) and the proxy gets it back on reconnect (replay).

The enrolled set is written to a small JSON file next to the node's sockets, so a
restarted agent knows which namespaces carry its tc filter and adopts them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

from shoal.agent.compiler import namespace_id, validate_workload
from shoal.agent.mapsync import DatapathMaps
from shoal.agent.netns import (
    NetnsError,
    attach_sk_lookup,
    attach_tc_ingress,
    detach_sk_lookup,
    detach_tc_ingress,
    netns_cookie,
)
from shoal.config import ClusterLayout
from shoal.xds import model as m

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnrolledPod:
    uid: str
    namespace: str
    name: str
    ip: str
    service_account: str
    identity: int
    netns_path: str
    cookie: int
    ips: tuple[str, ...] = ()   # every address, IPv4 first ("ip" is the primary)

    def __post_init__(self) -> None:
        # JSON state gives a list (or nothing, from before dual-stack).
        object.__setattr__(self, "ips", tuple(self.ips) or (self.ip,))

    def same_pod(self, workload: m.Workload, netns_path: str) -> bool:
        return (self.ips, self.identity, self.service_account, self.netns_path) == (
            workload.ips, workload.identity, workload.service_account, netns_path)


@dataclass(frozen=True)
class PodPrograms:
    """What goes into each meshed pod's namespace: tc on eth0, and an sk_lookup link."""
    tc_fd: int
    sk_lookup_fd: int
    links_dir: Path

    def link_pin(self, cookie: int) -> Path:
        return self.links_dir / f"sk_lookup_{cookie}"

    def attach(self, netns_path: str, cookie: int) -> None:
        attach_sk_lookup(netns_path, self.sk_lookup_fd, self.link_pin(cookie))   # before tc hands it work
        attach_tc_ingress(netns_path, self.tc_fd)

    def detach(self, netns_path: str, cookie: int) -> None:
        detach_tc_ingress(netns_path)
        detach_sk_lookup(self.link_pin(cookie))


class PodNetnsResolver(Protocol):
    def netns_path(self, workload: m.Workload) -> Path: ...


@dataclass(frozen=True)
class LocalPodNetns:
    """The local cluster names every pod's namespace after its cluster, namespace and name."""
    layout: ClusterLayout
    netns_dir: Path = Path("/run/netns")

    def netns_path(self, workload: m.Workload) -> Path:
        return self.netns_dir / self.layout.pod_netns(workload.namespace, workload.name)


class ProxyLink(Protocol):
    """The node proxy side of enrolment (agent/zdslink.py over contract B)."""
    @property
    def connected(self) -> bool: ...
    async def add(self, pod: EnrolledPod) -> None: ...
    async def remove(self, uid: str) -> None: ...


class Enroller:
    def __init__(self, node: str, maps: DatapathMaps, programs: PodPrograms, resolver: PodNetnsResolver,
                 state_file: Path, proxy: ProxyLink | None):
        self.node = node
        self.maps = maps
        self.programs = programs
        self.resolver = resolver
        self.state_file = Path(state_file)
        self.proxy = proxy
        self.enrolled: dict[str, EnrolledPod] = self._load()
        self.failures: dict[str, str] = {}   # uid -> last error, retried on the next pass
        self._lock = asyncio.Lock()

    # -- persistence
    def _load(self) -> dict[str, EnrolledPod]:
        try:
            raw = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable enrolment state %s: %s", self.state_file, err)
            return {}
        pods = {}
        for item in raw.get("pods", []):
            try:
                pod = EnrolledPod(**item)
            except TypeError as err:
                log.warning("ignoring malformed enrolment record %r: %s", item, err)
                continue
            pods[pod.uid] = pod
        return pods

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pods": [asdict(p) for p in self.enrolled.values()]}, indent=1))
        os.replace(tmp, self.state_file)

    # -- reconciliation
    def desired(self, workloads: Iterable[m.Workload]) -> dict[str, m.Workload]:
        return {w.uid: w for w in workloads if w.node == self.node and w.meshed}

    async def reconcile(self, workloads: Iterable[m.Workload]) -> None:
        async with self._lock:
            desired = self.desired(workloads)
            for uid in list(self.enrolled):
                workload = desired.get(uid)
                if workload is not None:
                    try:
                        current_path = str(self.resolver.netns_path(workload))
                    except (OSError, RuntimeError) as err:   # the pod's sandbox is gone
                        log.info("pod %s/%s has no namespace any more: %s", workload.namespace, workload.name, err)
                        workload = None
                if workload is None or not self.enrolled[uid].same_pod(workload, current_path):
                    await self._unenrol(uid)
            for uid, workload in desired.items():
                if uid in self.enrolled:
                    continue
                try:
                    await self._enrol(workload)
                    self.failures.pop(uid, None)
                except (NetnsError, OSError, ValueError, RuntimeError) as err:  # incl. EnrolmentDeferred, ProxyLinkError
                    if self.failures.get(uid) != str(err):
                        log.warning("enrol %s/%s deferred: %s", workload.namespace, workload.name, err)
                    self.failures[uid] = str(err)
            for uid in list(self.failures):
                if uid not in desired:
                    del self.failures[uid]

    async def _enrol(self, workload: m.Workload) -> None:
        validate_workload(workload)
        if self.proxy is None or not self.proxy.connected:
            raise EnrolmentDeferred("node proxy not connected")
        path = str(self.resolver.netns_path(workload))   # RuntimeError/OSError: not running yet
        # pyroute2 runs its own event loop: netns work goes to a thread (and keeps ours free)
        cookie = await asyncio.to_thread(netns_cookie, path)
        pod = EnrolledPod(workload.uid, workload.namespace, workload.name, workload.ip,
                          workload.service_account, workload.identity, path, cookie, workload.ips)
        await self.proxy.add(pod)                      # listeners open in the pod first
        await asyncio.to_thread(self.programs.attach, path, cookie)          # then inbound steering
        self.maps.set_pod(cookie, workload.identity, workload.ip, namespace_id(workload.namespace),
                          ip6=workload.address("IPv6") or None)
        self.enrolled[pod.uid] = pod
        self._save()
        log.info("enrolled %s/%s (%s, netns cookie %d)", pod.namespace, pod.name, pod.ip, cookie)

    async def _unenrol(self, uid: str) -> None:
        pod = self.enrolled[uid]
        self.maps.remove_pod(pod.cookie)               # outbound capture stops first
        try:
            await asyncio.to_thread(self.programs.detach, pod.netns_path, pod.cookie)
        except (NetnsError, OSError) as err:
            log.warning("tc/sk_lookup detach in %s: %s", pod.netns_path, err)
        if self.proxy is not None and self.proxy.connected:
            try:
                await self.proxy.remove(uid)
            except RuntimeError as err:  # ProxyLinkError: a reconnecting proxy gets the snapshot anyway
                log.warning("proxy did not ack removal of %s: %s", uid, err)
        del self.enrolled[uid]
        self._save()
        log.info("unenrolled %s/%s", pod.namespace, pod.name)

    async def repair(self, pod: EnrolledPod, inspect: Callable[[EnrolledPod], list[tuple[str, str]]]
                     ) -> tuple[list[tuple[str, str]], bool]:
        """Puts back what the capture audit finds missing in ``pod``: (drift, repaired). repaired
        is False when it could not (the proxy is away: inbound stays fail-closed until it returns).

        ``inspect`` runs again under the lock, so a replay or an unenrol that ran since the
        audit's look is not undone. A namespace replaced under the same path is unenrolled: the
        next pass enrols the new one. Lost listeners need the proxy to forget the pod first (a
        repeated add is a no-op there).
        """
        async with self._lock:
            if self.enrolled.get(pod.uid) != pod:
                return [], True
            drift = await asyncio.to_thread(inspect, pod)
            kinds = {kind for kind, _ in drift}
            if not drift:
                return [], True
            return drift, await self._repair(pod, kinds)

    async def _repair(self, pod: EnrolledPod, kinds: set[str]) -> bool:
            if "netns_replaced" in kinds:
                await self._unenrol(pod.uid)
                return True
            if "proxy_listener" in kinds:
                if self.proxy is None or not self.proxy.connected:
                    return False
                await self.proxy.remove(pod.uid)
                await self.proxy.add(pod)
            await asyncio.to_thread(self.programs.attach, pod.netns_path, pod.cookie)
            return True

    async def replay(self, proxy) -> None:
        """Hand every enrolled pod to a (re)connected proxy, before its snapshot_sent."""
        async with self._lock:
            for pod in list(self.enrolled.values()):
                try:
                    await proxy.add(pod)
                except (OSError, RuntimeError) as err:
                    log.warning("replay of %s/%s to the proxy failed: %s", pod.namespace, pod.name, err)

    async def remove_all(self) -> None:
        async with self._lock:
            for uid in list(self.enrolled):
                await self._unenrol(uid)


class EnrolmentDeferred(RuntimeError):
    """Not an error: the pod is enrolled on a later pass (proxy or namespace not there yet)."""
