"""Capture audit: every few seconds, check that each enrolled pod is still captured, and put back
what is missing.

The top complaint of ambient-mesh users is traffic silently not captured after a node reboot,
a CNI restart or a hand-made change. Enrolment sets capture up once; this re-checks it:

- the node's cgroup programs (connect4, sockops, ...) are attached to the node cgroup, and
  are ours (a program id check, so a replaced program counts too);
- per enrolled pod, in one trip into its namespace: the namespace is still the one enrolled
  (its cookie; a pod recreated under the same path is a new namespace), our tc filter is on
  eth0's ingress (by program id), the proxy's in-pod listeners (15001, 15006, 15008) are
  open; and the pod's sk_lookup link is still pinned.

Drift is repaired (re-attach, re-add to the proxy, re-enrol a replaced namespace) and reported:
``shoal_capture_drift_total{kind}`` / ``shoal_capture_drift_repaired_total{kind}``, an AUDIT
flow from the pod, a warning in the log, and the node's audit record that ``shoal status``
shows. While something is missing, capture fails closed where the kernel can: without the tc
filter, the pod's sk_lookup program still hands plaintext SYNs to the proxy's 15006 listener
(or drops them), so inbound traffic never reaches the app around the proxy.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from pyroute2 import DiagSocket, IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shoal.agent.enrolment import EnrolledPod, Enroller
from shoal.agent.netns import TC_FILTER_NAME, NetnsError, in_netns, socket_netns_cookie, tc_ingress_filters
from shoal.config import PORT_HBONE, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND

log = logging.getLogger(__name__)

PROXY_PORTS = (PORT_OUTBOUND, PORT_INBOUND_PLAINTEXT, PORT_HBONE)
TCP_LISTEN = 10            # the kernel's TCP_LISTEN state
RECENT_DRIFT = 10


@dataclass(frozen=True)
class Drift:
    kind: str          # cgroup_program | tc_filter | sk_lookup | proxy_listener | netns_replaced
    pod: str           # namespace/name, "" for the node's cgroup programs
    detail: str
    repaired: bool
    time: float


def listening_ports() -> set[int]:
    """TCP ports listened on in the calling thread's network namespace (v4 and v6).

    sock_diag asks only the listening hash: ~1 ms, where reading /proc/net/tcp walks the
    machine's whole established table (25-90 ms per pod measured here).
    """
    ports = set()
    with DiagSocket() as diag:
        diag.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            ports.update(msg["idiag_sport"] for msg in diag.get_sock_stats(family=family, states=1 << TCP_LISTEN))
    return ports


def inspect_pod(pod: EnrolledPod, tc_program_id: int, link_pin: Path) -> list[tuple[str, str]]:
    """What is missing from one pod's capture: [(kind, detail)]. Blocking: run it off the loop."""
    if not Path(pod.netns_path).exists():
        return [("netns_replaced", f"{pod.netns_path} is gone")]

    def probe() -> tuple[int, set[int], list[tuple[str, int]]]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            cookie = socket_netns_cookie(sock)
        with IPRoute() as ipr:
            filters = tc_ingress_filters(ipr, "eth0", pod.netns_path)
        return cookie, listening_ports(), filters
    try:
        cookie, ports, filters = in_netns(pod.netns_path, probe)
    except FileNotFoundError:
        return [("netns_replaced", f"{pod.netns_path} is gone")]
    except (OSError, NetnsError, NetlinkError) as err:
        # Not evidence of drift (a busy netlink socket, no file descriptor left...): acting on
        # it would unenrol a healthy pod. The next pass looks again.
        raise AuditError(f"{pod.namespace}/{pod.name}: {err}") from err
    if cookie != pod.cookie:
        return [("netns_replaced", f"{pod.netns_path} is another namespace now (cookie {cookie}, enrolled {pod.cookie})")]
    found = []
    if not any(name == TC_FILTER_NAME and prog in (tc_program_id, 0) for name, prog in filters):
        found.append(("tc_filter", f"eth0 ingress has {[n for n, _ in filters] or 'no bpf filter'}"))
    if not link_pin.exists():
        found.append(("sk_lookup", f"link {link_pin.name} is not pinned"))
    missing = [port for port in PROXY_PORTS if port not in ports]
    if missing:
        found.append(("proxy_listener", f"no proxy listener on {', '.join(map(str, missing))}"))
    return found


class AuditError(RuntimeError):
    """A pod could not be looked at this pass; says nothing about its capture."""


def inspect_or_skip(pod: EnrolledPod, tc_program_id: int, link_pin: Path) -> list[tuple[str, str]]:
    try:
        return inspect_pod(pod, tc_program_id, link_pin)
    except AuditError as err:
        log.warning("capture audit skipped %s this pass: %s", f"{pod.namespace}/{pod.name}", err)
        return []


class CaptureAudit:
    def __init__(self, enroller: Enroller, datapath, cgroup: Path, state_file: Path, interval: float = 3.0,
                 metrics=None, on_drift: Callable[[Drift, list[str]], None] | None = None,
                 on_reenrol: Callable[[], None] | None = None):
        """``on_drift(drift, pod_ips)`` publishes a flow; ``on_reenrol`` wakes the enrolment loop."""
        self.enroller = enroller
        self.datapath = datapath
        self.cgroup = Path(cgroup)
        self.state_file = Path(state_file)
        self.interval = interval
        self.metrics = metrics
        self.on_drift = on_drift
        self.on_reenrol = on_reenrol
        self.totals: Counter[str] = Counter()
        self.recent: deque[Drift] = deque(maxlen=RECENT_DRIFT)
        self.passes = 0

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            try:
                await self.check_once()
            except (OSError, RuntimeError) as err:   # BpfError, NetnsError: try again next period
                log.warning("capture audit pass failed: %s", err)
            if self.metrics is not None:
                self.metrics.capture_audit_seconds.set(time.perf_counter() - started)
            await asyncio.sleep(self.interval)

    async def check_once(self) -> list[Drift]:
        found: list[Drift] = []
        missing = await asyncio.to_thread(self.datapath.missing_cgroup_programs, self.cgroup)
        if missing:
            repaired = True
            try:
                await asyncio.to_thread(self.datapath.attach_cgroup, self.cgroup)
            except OSError as err:
                log.error("re-attaching %s to %s: %s", missing, self.cgroup, err)
                repaired = False
            found.append(self._report("cgroup_program", "", f"{', '.join(missing)} not attached to {self.cgroup}",
                                      repaired, [p.ip for p in self.enroller.enrolled.values()]))
        tc_id = self.datapath.program_id("tc_ingress")
        pods = list(self.enroller.enrolled.values())
        # A first look at every pod without the enroller's lock (enrolment goes on meanwhile);
        # a pod with drift is looked at again under the lock before anything is repaired.
        inspected = await asyncio.to_thread(lambda: [(pod, inspect_or_skip(pod, tc_id, self._link_pin(pod))) for pod in pods])
        for pod, drift in inspected:
            if not drift:
                continue
            try:
                drift, repaired = await self.enroller.repair(pod, lambda p: inspect_or_skip(p, tc_id, self._link_pin(p)))
            except (OSError, RuntimeError) as err:   # NetnsError, ProxyLinkError
                log.error("repairing capture of %s/%s: %s", pod.namespace, pod.name, err)
                repaired = False
            if any(kind == "netns_replaced" for kind, _ in drift) and repaired and self.on_reenrol is not None:
                self.on_reenrol()
            for kind, detail in drift:
                found.append(self._report(kind, f"{pod.namespace}/{pod.name}", detail, repaired, [pod.ip]))
        self.passes += 1
        self._write_state(len(pods))
        return found

    def _link_pin(self, pod: EnrolledPod) -> Path:
        return self.enroller.programs.link_pin(pod.cookie)

    def _report(self, kind: str, pod: str, detail: str, repaired: bool, pod_ips: list[str]) -> Drift:
        drift = Drift(kind, pod, detail, repaired, time.time())
        log.warning("capture drift%s: %s: %s (%s)", f" in {pod}" if pod else "", kind, detail,
                    "repaired" if repaired else "NOT repaired")
        self.totals[kind] += 1
        self.recent.append(drift)
        if self.metrics is not None:
            self.metrics.capture_drift.labels(kind).inc()
            if repaired:
                self.metrics.capture_repaired.labels(kind).inc()
        if self.on_drift is not None:
            self.on_drift(drift, pod_ips)
        return drift

    def _write_state(self, pods: int) -> None:
        record = {"time": time.time(), "interval": self.interval, "pods": pods, "passes": self.passes,
                  "drift": dict(self.totals), "recent": [asdict(d) for d in self.recent]}
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        staged = self.state_file.with_suffix(".tmp")
        staged.write_text(json.dumps(record))
        os.replace(staged, self.state_file)
