"""The local cluster's kubelet and CNI: turns Pod objects into running pods.

For each Pod scheduled on one of the cluster's nodes it makes the pod's network namespace
(veth into the node, an IP from the node's pod CIDR), a cgroup of its own below the node's
cgroup, the hosts file that resolves Service names, and it runs the pod's command there,
restarting it when it exits. A container's ``readinessProbe.httpGet`` is probed from here
(the control netns routes to every pod) and sets the pod's ``Ready`` condition; a pod
without a probe is Ready once running. State lives in the pod's cgroup and netns, not in this
process: a restarted controller adopts running pods instead of restarting them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.config import ClusterLayout
from shoal.controller.model import pod_meshed
from shoal.controller.store import Store, WatchEvent
from shoal.local import network
from shoal.local.linux import Cgroup, LinuxError, Netns
from shoal.local.nodepods import PodContainers
from shoal.local.podman import PodmanError
from shoal.local.sandbox import SandboxError, check_host, default_uid, pod_argv, security_record
from shoal.local.topology import Topology
from shoal.netns import NetnsError, netns_cookie
from shoal.podspec import PodSecurity, PodSpecError

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 10.0
# How long a meshed pod waits for its node's agent to confirm capture before the pod says so
# (it keeps waiting: it is never started unmeshed).
CAPTURE_TIMEOUT = 30.0
# No DNS server in the local cluster: Service names come from the hosts file, and a lookup
# that misses fails at once instead of waiting on the machine's resolver.
RESOLV_CONF = "# names of the local cluster come from /etc/hosts\nnameserver 127.0.0.53\noptions timeout:1 attempts:1\n"


@dataclass
class _PodRuntime:
    restarts: int = 0
    next_start: float = 0.0
    ips: tuple[str, ...] = ()          # IPv4 first (the primary), then IPv6
    netns_cookie: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)
    ready: bool | None = None          # last probe result written to the Pod's status
    next_probe: float = 0.0
    # A meshed pod not started yet: its Pod object, and since when it waits for capture.
    awaiting_capture: dict[str, Any] | None = None
    waiting_since: float = 0.0
    timed_out: bool = False


def ready_condition(ready: bool) -> list[dict[str, str]]:
    return [{"type": "Ready", "status": "True" if ready else "False"}]


def http_probe_of(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The first container's ``readinessProbe`` with an ``httpGet`` (others are not run)."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        probe = container.get("readinessProbe") or {}
        if isinstance(probe.get("httpGet"), dict):
            return probe
    return None


async def probe_http(ip: str, probe: dict[str, Any]) -> bool:
    """One HTTP GET as the kubelet does it: success is a 2xx/3xx answer within the timeout."""
    get = probe["httpGet"]
    timeout = float(probe.get("timeoutSeconds", 1))
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, int(get.get("port", 80))), timeout)
        writer.write(f"GET {get.get('path', '/')} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        status_line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, asyncio.TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()
    parts = status_line.split()
    return len(parts) >= 2 and parts[1][:1] in (b"2", b"3")


def hosts_file(pod_namespace: str, pod_name: str, pod_ips: tuple[str, ...],
               services: list[dict[str, Any]]) -> str:
    """/etc/hosts for one pod: itself, then every Service by its cluster DNS names, one line
    per ClusterIP (``spec.clusterIPs``), so a dual-stack Service resolves to both families
    (glibc returns every matching line; ``curl -4``/``-6`` pick one)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{ip}\t{pod_name}" for ip in pod_ips]
    for svc in services:
        spec = svc["spec"]
        addresses = [a for a in spec.get("clusterIPs") or [spec.get("clusterIP")] if a and a != "None"]
        name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
        names = [f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        if ns == pod_namespace:
            names.insert(0, name)
        lines += [f"{ip}\t{' '.join(names)}" for ip in addresses]
    return "\n".join(lines) + "\n"


def _addresses_status(pod_ips: tuple[str, ...], node_ips: tuple[str, ...]) -> dict[str, Any]:
    """The address part of a Pod's status, as a dual-stack kubelet reports it."""
    return {"podIP": pod_ips[0], "podIPs": [{"ip": ip} for ip in pod_ips],
            "hostIP": node_ips[0], "hostIPs": [{"ip": ip} for ip in node_ips]}


class LocalKubelet:
    """Reconciles the store's Pods with namespaces, cgroups and processes on this machine."""

    def __init__(self, layout: ClusterLayout, store: Store, interval: float = 1.0,
                 capture_timeout: float = CAPTURE_TIMEOUT, capture_poll: float = 0.05,
                 containers: PodContainers | None = None):
        """``containers``: the runtime for pods whose containers name an image (``--containers``);
        without one every pod runs as sandboxed processes."""
        self.layout = layout
        self.containers = containers
        self.store = store
        self.topology = Topology(layout)
        self.interval = interval
        self.capture_timeout = capture_timeout
        self.capture_poll = capture_poll
        self._captured: dict[str, tuple[float, frozenset[tuple[str, str, int]]]] = {}   # node -> (mtime, pods)
        self._pods: dict[tuple[str, str], _PodRuntime] = {}
        self._wake = asyncio.Event()
        self._hosts_dirty = True
        store.watch(self._on_events)

    def _on_events(self, events: list[WatchEvent]) -> None:
        if any(e.object["kind"] in ("Pod", "Service") for e in events):
            self._hosts_dirty = self._hosts_dirty or any(e.object["kind"] == "Service" for e in events)
            self._wake.set()

    async def run(self) -> None:
        prober = asyncio.ensure_future(self._probe_forever())
        try:
            await self._reconcile_forever()
        finally:
            prober.cancel()

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                self.reconcile()
            except LinuxError as e:
                log.error("kubelet: %s", e)
            # While meshed pods wait for capture, look for the agent's confirmation often
            # (a file read per node); a full pass runs on changes and every interval.
            deadline = time.monotonic() + self.interval
            while not self._wake.is_set() and time.monotonic() < deadline:
                if not self.start_captured():
                    try:
                        await asyncio.wait_for(self._wake.wait(), deadline - time.monotonic())
                    except asyncio.TimeoutError:
                        pass
                    break
                await asyncio.sleep(self.capture_poll)
            self._wake.clear()

    async def _probe_forever(self, tick: float = 0.2) -> None:
        while True:
            await self.probe_due()
            await asyncio.sleep(tick)

    async def probe_due(self) -> None:
        """Runs the readiness probes that are due; writes a Ready condition when it changes."""
        now = time.monotonic()
        due = []
        for pod in self.store.list("Pod"):
            key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
            runtime = self._pods.get(key)
            probe = http_probe_of(pod)
            running = (pod.get("status") or {}).get("phase") == "Running"
            if runtime is None or probe is None or not running or now < runtime.next_probe:
                continue
            runtime.next_probe = now + float(probe.get("periodSeconds", 10))
            due.append((key, runtime, probe))
        results = await asyncio.gather(*(probe_http(runtime.ips[0], probe) for _, runtime, probe in due))
        for (key, runtime, _), ready in zip(due, results):
            if ready != runtime.ready and self._pods.get(key) is runtime:
                runtime.ready = ready
                log.info("pod %s/%s: %s", *key, "ready" if ready else "not ready")
                self.store.update_status("Pod", *key, {"conditions": ready_condition(ready)})

    # -- reconcile ---------------------------------------------------------------------

    def reconcile(self) -> None:
        nodes = {n["metadata"]["name"] for n in self.store.list("Node")}
        pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p
                for p in self.store.list("Pod") if p["spec"].get("nodeName") in nodes}
        for key in list(self._pods):
            if key not in pods:
                self._stop_pod(key)
        for key, pod in pods.items():
            try:
                self._ensure_pod(pod)
            except (LinuxError, SandboxError, PodSpecError) as e:
                log.error("pod %s/%s: %s", *key, e)
                self.store.update_status("Pod", *key, {"phase": "Failed", "message": str(e)})
        # Pods deleted while we were not running: their namespaces are still around.
        for netns in Netns.list(self.layout.netns_prefix):
            parts = netns.name.split(".", 2)
            if len(parts) == 3 and (parts[1], parts[2]) not in pods:
                log.info("removing orphan pod namespace %s", netns.name)
                netns.delete()
        if self._hosts_dirty:
            self._write_hosts(pods.values())
            self._hosts_dirty = False

    def _ensure_pod(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        key = (meta["namespace"], meta["name"])
        node = spec["nodeName"]
        runtime = self._pods.get(key)
        if runtime is None:
            runtime = self._pods[key] = _PodRuntime(restarts=pod.get("status", {}).get("restartCount", 0))
            runtime.ips = network.pod_ips(node, self._pod_ip(pod))
            netns = self.topology.attach_pod(node, *key, runtime.ips)
            # Before the first start: `ip netns exec` bind-mounts these files only if they exist.
            netns.write_etc("hosts", hosts_file(*key, runtime.ips, self.store.list("Service")))
            netns.write_etc("resolv.conf", RESOLV_CONF)
        if not runtime.netns_cookie:
            try:
                runtime.netns_cookie = netns_cookie(Netns(self.layout.pod_netns(*key)).path)
            except (NetnsError, OSError) as err:
                raise LinuxError(f"the pod's network namespace: {err}") from err
        cgroup = Cgroup(self.layout.pod_cgroup(node, *key)).create()
        runtime.procs = [p for p in runtime.procs if p.poll() is None]
        if cgroup.pids():
            runtime.awaiting_capture = None
            status = {**_addresses_status(runtime.ips, network.node_ips(node)),
                      "phase": "Running", "restartCount": runtime.restarts}
            self.store.update_status("Pod", *key, status)
            return
        now = time.monotonic()
        if now < runtime.next_start:
            return
        namespace = self.store.get("Namespace", "", meta["namespace"])
        if pod_meshed(pod, namespace) and not self._capture_confirmed(node, key, runtime):
            self._await_capture(pod, runtime, now)
            return
        runtime.awaiting_capture = None
        if pod.get("status", {}).get("phase") == "Running":
            runtime.restarts += 1
            log.warning("pod %s/%s exited; restarting (restart %d)", *key, runtime.restarts)
        runtime.next_start = now + min(RESTART_BACKOFF_MAX, 0.5 * 2 ** min(runtime.restarts, 5))
        self._start(pod, runtime, cgroup)
        # A (re)started container is not ready until its probe says so.
        runtime.ready = http_probe_of(pod) is None
        runtime.next_probe = now
        self.store.update_status("Pod", *key, {
            **_addresses_status(runtime.ips, network.node_ips(node)), "phase": "Running",
            "restartCount": runtime.restarts, "startTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reason": "", "message": "", "conditions": ready_condition(runtime.ready)})

    # -- enrolment before the first packet ---------------------------------------------------

    def _await_capture(self, pod: dict[str, Any], runtime: _PodRuntime, now: float) -> None:
        """A meshed pod's processes wait until its node's agent has captured the namespace (as
        istio-cni holds sandbox creation): its IP is published, so the agent enrols it, and the
        processes start once the agent's record holds this namespace's cookie. Never unmeshed."""
        meta, node = pod["metadata"], pod["spec"]["nodeName"]
        key = (meta["namespace"], meta["name"])
        if runtime.awaiting_capture is None:
            runtime.awaiting_capture, runtime.waiting_since, runtime.timed_out = pod, now, False
            self.store.update_status("Pod", *key, {
                **_addresses_status(runtime.ips, network.node_ips(node)), "phase": "Pending",
                "reason": "WaitingForMeshCapture",
                "message": f"waiting for {node}'s agent to capture the pod's traffic before starting it"})
        runtime.awaiting_capture = pod
        if not runtime.timed_out and now - runtime.waiting_since > self.capture_timeout:
            runtime.timed_out = True
            message = (f"{node}'s agent did not confirm capture within {self.capture_timeout:.0f}s "
                       f"(is it running? see `shoal logs agent --node {node}`); the pod is not started "
                       f"unmeshed and keeps waiting")
            log.error("pod %s/%s: %s", *key, message)
            self.store.update_status("Pod", *key, {"phase": "Pending", "reason": "MeshCaptureTimeout",
                                                   "message": message})

    def _capture_confirmed(self, node: str, key: tuple[str, str], runtime: _PodRuntime) -> bool:
        path = self.layout.enrolment_state(node)
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        cached = self._captured.get(node)
        if cached is None or cached[0] != mtime:
            try:
                raw = json.loads(path.read_text())
                pods = frozenset((p["namespace"], p["name"], p["cookie"]) for p in raw.get("pods", []))
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("unreadable capture record %s: %s", path, err)
                return False
            cached = self._captured[node] = (mtime, pods)
        return (*key, runtime.netns_cookie) in cached[1]

    def start_captured(self) -> bool:
        """Starts the waiting pods whose capture is now confirmed; True while some still wait."""
        waiting = False
        for key, runtime in list(self._pods.items()):
            pod = runtime.awaiting_capture
            if pod is None:
                continue
            if not self._capture_confirmed(pod["spec"]["nodeName"], key, runtime):
                self._await_capture(pod, runtime, time.monotonic())
                waiting = True
                continue
            try:
                self._ensure_pod(pod)
            except (LinuxError, SandboxError, PodSpecError) as e:
                log.error("pod %s/%s: %s", *key, e)
                self.store.update_status("Pod", *key, {"phase": "Failed", "message": str(e)})
                runtime.awaiting_capture = None
            waiting = waiting or runtime.awaiting_capture is not None
        return waiting

    def _pod_ip(self, pod: dict[str, Any]) -> str:
        """The pod's IPv4 address (its IPv6 one is derived from it): the one it already has
        (adoption after a restart), else the lowest free one."""
        node = pod["spec"]["nodeName"]
        current = pod.get("status", {}).get("podIP")
        if current:
            return current
        used = {p.get("status", {}).get("podIP") for p in self.store.list("Pod")}
        used |= {r.ips[0] for r in self._pods.values() if r.ips}
        for ip in self.topology.pod_ip_range(node):
            if ip not in used:
                return ip
        raise LinuxError(f"node {node}: pod CIDR exhausted")

    def _start(self, pod: dict[str, Any], runtime: _PodRuntime, cgroup: Cgroup) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        if self.containers is not None and self.containers.wants(pod):
            try:
                ids = self.containers.start(pod, runtime.ips, cgroup.path)
            except PodmanError as err:
                raise LinuxError(str(err)) from err
            log.info("started pod %s/%s as container(s) %s", meta["namespace"], meta["name"],
                     ", ".join(i[:12] for i in ids))
            return
        netns_name = self.layout.pod_netns(meta["namespace"], meta["name"])
        log_dir = self.layout.log_dir / "pods"
        log_dir.mkdir(parents=True, exist_ok=True)
        for index, container in enumerate(spec["containers"]):
            argv = list(container["command"]) + list(container.get("args", []))
            env = self._pod_env(pod, runtime.ips, container)
            security = PodSecurity.for_container(pod, container, default_uid(runtime.ips[0], self.layout.name), env)
            check_host(security)
            if security.uid != 0:
                env.setdefault("HOME", "/tmp")   # /root is not theirs
            env.setdefault("HOME", "/root")
            if index == 0:   # `shoal exec` enters the first container, as kubectl does
                record = security_record(self.layout, meta["namespace"], meta["name"])
                record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                staged = record.with_suffix(".tmp")
                staged.write_text(security.to_json())
                os.replace(staged, record)   # `shoal exec` never reads half a record
            name = container.get("name", "main")
            log_path = log_dir / f"{meta['namespace']}_{meta['name']}_{name}.log"
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(cgroup.join_argv(pod_argv(self.layout, netns_name, security, argv)),
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True, cwd="/")
            runtime.procs.append(proc)
            log.info("started pod %s/%s container %s (pid %d, uid %d, capabilities %s): %s", meta["namespace"],
                     meta["name"], name, proc.pid, security.uid, ",".join(security.capabilities) or "none",
                     " ".join(argv))

    def _pod_env(self, pod: dict[str, Any], ips: tuple[str, ...], container: dict[str, Any]) -> dict[str, str]:
        meta, spec = pod["metadata"], pod["spec"]
        venv_bin = str(Path(sys.executable).parent)
        env = {
            "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
            "POD_NAME": meta["name"], "POD_NAMESPACE": meta["namespace"], "POD_IP": ips[0], "POD_IPS": ",".join(ips),
            "NODE_NAME": spec["nodeName"], "SERVICE_ACCOUNT": spec.get("serviceAccountName", "default"),
        }
        for item in container.get("env", []) or []:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                env[item["name"]] = str(item.get("value", ""))
        return env

    def _stop_pod(self, key: tuple[str, str]) -> None:
        runtime = self._pods.pop(key)
        if self.containers is not None:   # also the containers of a pod adopted after a restart
            try:
                self.containers.stop(*key)
            except PodmanError as err:
                log.error("pod %s/%s: %s", *key, err)
        for cgroup_dir in self.layout.cgroup.glob(f"*/pods/{key[0]}.{key[1]}"):
            cgroup = Cgroup(cgroup_dir)
            cgroup.kill_all()
            cgroup.remove()
        for proc in runtime.procs:
            proc.wait(timeout=5)
        self.topology.detach_pod(*key)
        security_record(self.layout, *key).unlink(missing_ok=True)
        log.info("stopped pod %s/%s", *key)

    def _write_hosts(self, pods) -> None:
        services = self.store.list("Service")
        for pod in pods:
            meta = pod["metadata"]
            runtime = self._pods.get((meta["namespace"], meta["name"]))
            if runtime is None:
                continue
            Netns(self.layout.pod_netns(meta["namespace"], meta["name"])).write_etc(
                "hosts", hosts_file(meta["namespace"], meta["name"], runtime.ips, services))
