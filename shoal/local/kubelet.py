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
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.config import ClusterLayout
from shoal.controller.store import Store, WatchEvent
from shoal.local.linux import Cgroup, LinuxError, Netns
from shoal.local.topology import Topology

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 10.0
# No DNS server in the local cluster: Service names come from the hosts file, and a lookup
# that misses fails at once instead of waiting on the machine's resolver.
RESOLV_CONF = "# names of the local cluster come from /etc/hosts\nnameserver 127.0.0.53\noptions timeout:1 attempts:1\n"


@dataclass
class _PodRuntime:
    restarts: int = 0
    next_start: float = 0.0
    ips: tuple[str, ...] = ()          # IPv4 first (the primary), then IPv6
    procs: list[subprocess.Popen] = field(default_factory=list)
    ready: bool | None = None          # last probe result written to the Pod's status
    next_probe: float = 0.0


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

    def __init__(self, layout: ClusterLayout, store: Store, interval: float = 1.0):
        self.layout = layout
        self.store = store
        self.topology = Topology(layout)
        self.interval = interval
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
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
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
            except LinuxError as e:
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
            runtime.ips = self.layout.pod_ips(node, self._pod_ip(pod))
            netns = self.topology.attach_pod(node, *key, runtime.ips)
            # Before the first start: `ip netns exec` bind-mounts these files only if they exist.
            netns.write_etc("hosts", hosts_file(*key, runtime.ips, self.store.list("Service")))
            netns.write_etc("resolv.conf", RESOLV_CONF)
        cgroup = Cgroup(self.layout.pod_cgroup(node, *key)).create()
        runtime.procs = [p for p in runtime.procs if p.poll() is None]
        if cgroup.pids():
            status = {**_addresses_status(runtime.ips, self.layout.node_ips(node)),
                      "phase": "Running", "restartCount": runtime.restarts}
            self.store.update_status("Pod", *key, status)
            return
        now = time.monotonic()
        if now < runtime.next_start:
            return
        if pod.get("status", {}).get("phase") == "Running":
            runtime.restarts += 1
            log.warning("pod %s/%s exited; restarting (restart %d)", *key, runtime.restarts)
        runtime.next_start = now + min(RESTART_BACKOFF_MAX, 0.5 * 2 ** min(runtime.restarts, 5))
        self._start(pod, runtime, cgroup)
        # A (re)started container is not ready until its probe says so.
        runtime.ready = http_probe_of(pod) is None
        runtime.next_probe = now
        self.store.update_status("Pod", *key, {
            **_addresses_status(runtime.ips, self.layout.node_ips(node)), "phase": "Running",
            "restartCount": runtime.restarts, "startTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "conditions": ready_condition(runtime.ready)})

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
        netns = Netns(self.layout.pod_netns(meta["namespace"], meta["name"]))
        log_dir = self.layout.log_dir / "pods"
        log_dir.mkdir(parents=True, exist_ok=True)
        for container in spec["containers"]:
            argv = list(container["command"]) + list(container.get("args", []))
            env = self._pod_env(pod, runtime.ips, container)
            name = container.get("name", "main")
            log_path = log_dir / f"{meta['namespace']}_{meta['name']}_{name}.log"
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(cgroup.join_argv(netns.exec_argv(argv)), stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True, cwd="/")
            runtime.procs.append(proc)
            log.info("started pod %s/%s container %s (pid %d): %s", meta["namespace"], meta["name"],
                     name, proc.pid, " ".join(argv))

    def _pod_env(self, pod: dict[str, Any], ips: tuple[str, ...], container: dict[str, Any]) -> dict[str, str]:
        meta, spec = pod["metadata"], pod["spec"]
        venv_bin = str(Path(sys.executable).parent)
        env = {
            "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
            "POD_NAME": meta["name"], "POD_NAMESPACE": meta["namespace"], "POD_IP": ips[0], "POD_IPS": ",".join(ips),
            "NODE_NAME": spec["nodeName"], "SERVICE_ACCOUNT": spec.get("serviceAccountName", "default"),
        }
        for item in container.get("env", []) or []:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                env[item["name"]] = str(item.get("value", ""))
        return env

    def _stop_pod(self, key: tuple[str, str]) -> None:
        runtime = self._pods.pop(key)
        for cgroup_dir in self.layout.cgroup.glob(f"*/pods/{key[0]}.{key[1]}"):
            cgroup = Cgroup(cgroup_dir)
            cgroup.kill_all()
            cgroup.remove()
        for proc in runtime.procs:
            proc.wait(timeout=5)
        self.topology.detach_pod(*key)
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
