"""Kubernetes mode for the agent: where things are on a real node.

In a local cluster the agent knows every name (``ClusterLayout``). On a Kubernetes
node it has to find them:

- each pod's network namespace, from the pod's cgroup through the host's ``/proc``
  (mounted read-only at ``/host/proc``): a process whose cgroup path names the pod
  UID lives in the pod's sandbox, so its ``ns/net`` is the pod's namespace;
- the node's cgroup v2 root (the host's ``/sys/fs/cgroup``, or its ``unified``
  folder on hybrid hosts), where the cgroup programs attach for every pod;
- the projected ServiceAccount token the controller authenticates (TokenReview).

Everything here is a pure function of a directory tree or a text, so tests run it
on a fake ``/proc``. ``python -m shoal.agent.k8s cleanup`` is the node clean-up
that ``shoal uninstall`` runs on every node (the agent itself leaves its pinned
programs in place on SIGTERM, so that an upgrade is hitless).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from shoal.kubernetes import KubernetesLayout, KubernetesModeError
from shoal.runtime import setup_logging

log = logging.getLogger("shoal.agent.k8s")

# Both cgroup drivers: cgroupfs ".../pod<uid>/<ctr>" and systemd
# ".../kubepods-burstable-pod<uid with _>.slice/cri-containerd-<ctr>.scope".
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?(?:/|$)")
_JWT_PART = re.compile(r"^[A-Za-z0-9_-]+$")


class PodNotRunning(KubernetesModeError):
    """No process of the pod is running yet (sandbox not started, or gone)."""


class HostNetworkPod(KubernetesModeError):
    """The pod shares the node's network namespace: there is nothing to capture."""


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str


def parse_mountinfo(text: str) -> list[Mount]:
    """``/proc/<pid>/mountinfo`` lines: fields 5 (mount point) and the two after " - "."""
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 2:
            continue
        mounts.append(Mount(_unescape(fields[4]), rest[0], rest[1]))
    return mounts


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def is_bpffs(mountinfo_text: str, path: str = "/sys/fs/bpf") -> bool:
    """True when ``path`` is a bpf filesystem mount (the last mount there wins)."""
    target = path.rstrip("/") or "/"
    found = [m for m in parse_mountinfo(mountinfo_text) if m.mount_point == target]
    return bool(found) and found[-1].fstype == "bpf"


# -- pods ------------------------------------------------------------------------------


def pod_uid_from_cgroup(cgroup_path: str) -> str | None:
    """The pod UID in a kubelet cgroup path (either driver), with dashes; else None."""
    match = _POD_UID.search(cgroup_path)
    return match.group(1).replace("_", "-") if match else None


def process_cgroup(cgroup_file_text: str) -> str | None:
    """The cgroup path of a process: a line naming a pod (v2 or v1), else the v2 line (``0::``)."""
    lines = [line.split(":", 2) for line in cgroup_file_text.splitlines() if line.count(":") >= 2]
    # On hybrid hosts the v2 line can be just "/" while a v1 line names the pod.
    for _hierarchy, _controllers, path in lines:
        if pod_uid_from_cgroup(path):
            return path
    for hierarchy, _controllers, path in lines:
        if hierarchy == "0":
            return path
    return None


def pods_by_uid(proc_root: Path) -> dict[str, list[int]]:
    """Every pod UID with a running process under ``proc_root``, with its PIDs (sorted)."""
    pods: dict[str, list[int]] = {}
    for entry in _pids(proc_root):
        try:
            text = (proc_root / str(entry) / "cgroup").read_text()
        except OSError:
            continue  # the process exited while we looked: not an error
        path = process_cgroup(text)
        uid = pod_uid_from_cgroup(path) if path else None
        if uid:
            pods.setdefault(uid, []).append(entry)
    return {uid: sorted(pids) for uid, pids in pods.items()}


def _pids(proc_root: Path) -> Iterable[int]:
    try:
        names = os.listdir(proc_root)
    except OSError as err:
        raise KubernetesModeError(f"cannot list {proc_root}: {err} (is the host /proc mounted?)") from err
    return (int(name) for name in names if name.isdigit())


def pod_netns_path(proc_root: Path, pod_uid: str, pods: Mapping[str, list[int]] | None = None) -> Path:
    """``<proc>/<pid>/ns/net`` of the pod's oldest process (the sandbox's pause process).

    Raises ``PodNotRunning`` if no process of the pod runs yet, and ``HostNetworkPod``
    if the pod uses the node's namespace. Opening the returned path needs
    CAP_SYS_PTRACE when the pod's processes run as another user or with other
    capabilities (the kernel's ptrace access check on ``/proc/<pid>/ns``).
    """
    pods = pods_by_uid(proc_root) if pods is None else pods
    pids = pods.get(pod_uid.lower())
    if not pids:
        raise PodNotRunning(f"pod {pod_uid}: no process found under {proc_root} (not started yet?)")
    host = _netns_id(proc_root / "1" / "ns" / "net")
    for pid in pids:
        path = proc_root / str(pid) / "ns" / "net"
        ident = _netns_id(path)
        if ident is None:
            continue  # exited meanwhile: try the next process of the pod
        if host is not None and ident == host:
            raise HostNetworkPod(f"pod {pod_uid} uses the node's network namespace (hostNetwork)")
        return path
    raise PodNotRunning(f"pod {pod_uid}: its processes exited while being looked up")


class KubernetesPodNetns:
    """The agent's pod netns resolver on a Kubernetes node (``PodNetnsResolver`` protocol).

    ``Workload.uid`` is the pod's ``metadata.uid``. One ``/proc`` scan serves every pod
    looked up within ``max_age`` seconds, so a reconcile pass costs one scan, not one
    per pod. Raises ``PodNotRunning`` / ``HostNetworkPod`` (both RuntimeError).
    """

    def __init__(self, proc_root: Path = Path("/proc"), max_age: float = 1.0,
                 clock=time.monotonic):
        self.proc_root = Path(proc_root)
        self.max_age = max_age
        self._clock = clock
        self._scan: tuple[float, dict[str, list[int]]] | None = None

    def netns_path(self, workload: Any) -> Path:
        now = self._clock()
        if self._scan is None or now - self._scan[0] > self.max_age or workload.uid.lower() not in self._scan[1]:
            self._scan = (now, pods_by_uid(self.proc_root))
        return pod_netns_path(self.proc_root, workload.uid, self._scan[1])


def _netns_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# -- ServiceAccount token --------------------------------------------------------------


class TokenError(KubernetesModeError):
    """The projected token is missing or is not a JWT."""


@dataclass
class ServiceAccountToken:
    """The projected ServiceAccount token, re-read whenever the kubelet rotates it.

    The kubelet swaps the file atomically (a ``..data`` symlink), so checking the
    target's modification time and size on each use is enough to see a new token.
    """

    path: Path
    _cached: tuple[tuple[int, int, int], str] | None = field(default=None, repr=False)

    def read(self) -> str:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._cached and self._cached[0] == stamp:
                return self._cached[1]
            token = self.path.read_text().strip()
        except OSError as err:
            raise TokenError(f"ServiceAccount token {self.path}: {err}") from err
        token_claims(token)  # refuse anything that is not a JWT before sending it anywhere
        self._cached = (stamp, token)
        return token


def token_claims(token: str) -> dict[str, Any]:
    """The JWT's payload, decoded but NOT verified (the controller's TokenReview verifies)."""
    parts = token.split(".")
    if len(parts) != 3 or not all(_JWT_PART.match(p) for p in parts):
        raise TokenError("not a JWT (expected three base64url parts)")
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError) as err:
        raise TokenError(f"JWT payload is not base64url JSON: {err}") from err
    if not isinstance(claims, dict):
        raise TokenError("JWT payload is not a JSON object")
    return claims


def token_expires_in(token: str, now: float | None = None) -> float | None:
    """Seconds until the token's ``exp``, or None when it has none."""
    exp = token_claims(token).get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        return None
    return exp - (time.time() if now is None else now)


# -- node clean-up (shoal uninstall) ---------------------------------------------------


def cleanup_node(layout: KubernetesLayout, node: str) -> list[str]:
    """Removes Shoal's programs, pins and pod tc filters from this node.

    Delegates to the agent's own uninstall (``shoal.agent.uninstall.remove_node``),
    which knows what it attached; with a ``KubernetesLayout`` it works on the host's
    cgroup root and bpffs.
    """
    try:
        from shoal.agent.uninstall import remove_node
    except ImportError as err:
        raise KubernetesModeError(f"this agent build has no uninstall: {err}") from err
    try:
        return remove_node(layout, node)
    except OSError as err:
        raise KubernetesModeError(f"removing the data path: {err}") from err


# TEST-NET-1 (RFC 5737): never routed. A captured connect() to it ends at the proxy's in-pod
# outbound listener; an uncaptured one would go nowhere (and the probe never waits for it).
CAPTURE_PROBE = ("192.0.2.1", 9)


def outbound_captured(probe: tuple[str, int] = CAPTURE_PROBE) -> bool:
    """Is this network namespace's outbound traffic captured right now?

    connect4 rewrites a meshed pod's connect() to 127.0.0.1:15001, so the socket's own address
    becomes 127.0.0.1 before any packet leaves; getsockname (which getpeername4 does not hide)
    shows it. The enrolment order (listeners, then tc, then the cookie map) makes this the last
    step: captured outbound means inbound steering and the proxy's listeners are there too.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        sock.connect_ex(probe)
        return sock.getsockname()[0] == "127.0.0.1"


def wait_captured(timeout: float, interval: float = 0.1, probe: tuple[str, int] = CAPTURE_PROBE) -> float:
    """Blocks until outbound_captured(); returns the seconds waited. Raises TimeoutError."""
    started = time.monotonic()
    while not outbound_captured(probe):
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"this pod's traffic was not captured within {timeout:.0f}s: is the namespace "
                               f"labelled shoal.io/mesh=enabled, and is the node's shoal-agent running?")
        time.sleep(interval)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.agent.k8s")
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait-captured", help="init container: exit 0 once this pod's traffic is captured")
    wait.add_argument("--timeout", type=float, default=60.0)
    clean = sub.add_parser("cleanup", help="remove Shoal's eBPF programs and pins from this node")
    clean.add_argument("--node", default=os.environ.get("SHOAL_NODE"))
    clean.add_argument("--done-file", type=Path, default=Path("/tmp/shoal-cleanup-done"),
                       help="written when done (the clean-up DaemonSet's readiness probe)")
    clean.add_argument("--stay", action="store_true", help="keep running when done (DaemonSet)")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    if args.command == "wait-captured":
        try:
            waited = wait_captured(args.timeout)
        except TimeoutError as err:
            log.error("%s", err)
            return 1
        log.info("traffic captured by the mesh (waited %.2fs)", waited)
        return 0
    if not args.node:
        parser.error("--node or SHOAL_NODE is required")
    try:
        layout = KubernetesLayout.from_env()
        removed = cleanup_node(layout, args.node)
    except KubernetesModeError as err:
        log.error("clean-up of node %s failed: %s", args.node, err)
        return 1
    for item in removed:
        log.info("removed %s", item)
    log.info("node %s: Shoal's programs and pins removed (%d items)", args.node, len(removed))
    args.done_file.write_text("done\n")
    while args.stay:
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
