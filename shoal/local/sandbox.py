"""Pods isolated like containers: a mount namespace of their own, an unprivileged uid, no capabilities.

A local-cluster pod shares the machine's filesystem, so without this a pod process could read
the mesh's secrets (the CA key, the node credentials under the cluster's run directory), open
pinned eBPF objects, move itself between cgroups, or forge the proxy's socket mark. Each pod
process therefore starts as::

    sh (joins the pod's cgroup) -> ip netns exec POD-NETNS (private mount namespace, the pod's
    /etc/hosts, a fresh /sys) -> sh -c MOUNT-SCRIPT -> setpriv (uid, gid, capabilities) -> command

The mount script makes every propagation private, turns the machine's filesystems read-only,
hides ``/run`` (the cluster's state directory, ``/run/netns``), ``/etc/netns`` (other pods'
hosts files), bpffs and cgroupfs under empty read-only tmpfs, and gives the pod its own
``/tmp``, ``/var/tmp`` and ``/dev/shm``. Then ``setpriv`` drops to the pod's uid with exactly
the capabilities its manifest adds (``securityContext.capabilities.add``), none by default,
and sets no_new_privs so a set-uid binary cannot get them back.

A pod gets a uid of its own (derived from its cluster and IP, unique on the machine) unless the manifest
sets ``runAsUser``: two pods never share a uid, so neither can read the other's processes
(``/proc/PID/root``, ``/proc/PID/environ``). Host paths reach a pod only through ``hostPath``
volumes its manifest declares (the waypoint's credential and the CA bundle).

``shoal exec`` enters the same sandbox: the mount namespace of a running pod process and the
uid and capabilities the kubelet recorded for the pod.
"""
from __future__ import annotations

import ipaddress
import os
import shlex
import stat
import sys
import zlib
from pathlib import Path
from typing import Sequence

from shoal.config import ClusterLayout
from shoal.podspec import PRIVATE_TMPFS, HostMount, PodSecurity

# uids given to pods that do not set runAsUser: POD_UID_BASE + a block per cluster + the low 16
# bits of the pod IP (the largest is below 2**31, the kernel's limit).
POD_UID_BASE = 200_000
CLUSTER_UID_BLOCKS = 30_000
STAGE = "/mnt"   # where host paths wait while the folders above them are covered
# Paths a mount script may create a mount point under (they are tmpfs by then).
_CREATABLE_UNDER = ("/run/", "/tmp/")


class SandboxError(Exception):
    """A pod's sandbox cannot be made or entered on this machine (a missing host path, a pod
    that is not running). Problems of the manifest itself are ``shoal.podspec.PodSpecError``."""


def check_host(security: PodSecurity) -> None:
    """Before a start: every hostPath exists, every mount point can be made (the root fs is read-only)."""
    for mount in security.mounts:
        if not os.path.exists(mount.source):
            raise SandboxError(f"hostPath {mount.source} does not exist (yet)")
        if not mount.target.startswith(_CREATABLE_UNDER) and not os.path.exists(mount.target):
            raise SandboxError(f"mountPath {mount.target} does not exist on the machine "
                               f"(the root filesystem is read-only; use a path under /run or /tmp)")


def setpriv_argv(security: PodSecurity, argv: Sequence[str]) -> list[str]:
    """``setpriv`` dropping to the pod's uid/gid with exactly its capabilities, then ``argv``."""
    out = ["setpriv", f"--reuid={security.uid}", f"--regid={security.gid}", "--clear-groups"]
    if security.privileged:   # every capability: nothing to drop
        return [*out, "--", *argv]
    caps = ",".join(["-all", *(f"+{c.lower()}" for c in security.capabilities)])
    out += [f"--inh-caps={caps}", f"--bounding-set={caps}"]
    if security.uid != 0 or security.capabilities:
        out.append(f"--ambient-caps={caps}")   # root keeps its (bounded) caps across exec by itself
    if security.no_new_privs:
        out.append("--no-new-privs")
    return [*out, "--", *argv]


def mount_script(security: PodSecurity, layout: ClusterLayout) -> str:
    """Shell run as root inside the pod's fresh mount namespace, before setpriv.

    Host paths the pod may see are bound aside first (into a staging tmpfs), then every
    folder the pod must not see is covered, the private /tmp, /var/tmp and /dev/shm are
    made, and only then are the staged paths moved to their targets: a source or target
    may lie in a covered folder (a checkout under /tmp or /root, a hostPath under /run)."""
    q = shlex.quote
    hidden_now = hidden_paths(layout)
    masks, runtime = runtime_exposure(covered=[*hidden_now, "/run", *PRIVATE_TMPFS])
    mounts = [*runtime, *security.mounts]
    lines = ["set -e", "mount --make-rprivate /"]
    if not security.privileged:
        # The machine's filesystems read-only: a pod running as uid 0 (without capabilities
        # it still owns root's files) must not change the host. /dev, /proc, /sys stay.
        lines.append('findmnt -rn -o TARGET | while read -r target; do case "$target" in '
                     '/dev|/dev/*|/proc|/proc/*|/sys|/sys/*|/run/*) ;; '
                     '*) mount -o remount,bind,ro "$target" 2>/dev/null || true ;; esac; done')
    # Staged on /mnt, which no pod path needs: /tmp, /run and the hidden folders may hold
    # sources (a checkout under /tmp, a hostPath under /run) and get covered below.
    lines.append(f"mount -t tmpfs -o mode=0700,size=64k shoal-stage {STAGE}")
    for i, mount in enumerate(mounts):
        lines.append(f"if [ -d {q(mount.source)} ]; then mkdir {STAGE}/v{i}; else touch {STAGE}/v{i}; fi")
        lines.append(f"mount --bind {q(mount.source)} {STAGE}/v{i}")
    lines.append("mount -t tmpfs -o mode=0755,nosuid,nodev,size=16m shoal-run /run")
    hidden = list(dict.fromkeys([*hidden_now, *masks]))
    for path in hidden:
        lines.append(f"if [ -d {q(path)} ]; then mount -t tmpfs -o mode=0755,nosuid,nodev,size=1m "
                     f"shoal-hidden {q(path)}; fi")
    for path in PRIVATE_TMPFS:
        lines.append(f"mount -t tmpfs -o mode=1777,nosuid,nodev,size=256m shoal-pod {path}")
    for i, mount in enumerate(mounts):
        target = q(mount.target)
        lines.append(f"mkdir -p \"$(dirname {target})\"")
        lines.append(f"if [ -d {STAGE}/v{i} ]; then mkdir -p {target}; else [ -e {target} ] || touch {target}; fi")
        lines.append(f"mount --move {STAGE}/v{i} {target}")
        if mount.read_only:
            lines.append(f"mount -o remount,bind,ro {target}")
    lines.append(f"umount {STAGE}")
    for path in hidden:   # nothing more is made in them
        lines.append(f"if [ -d {q(path)} ]; then mount -o remount,ro {q(path)}; fi")
    lines.append('exec "$@"')
    return "\n".join(lines)


def default_uid(pod_ip: str, cluster: str = "") -> int:
    """A uid no other pod has: pod IPs are unique in a cluster (10.244.N.K fits 16 bits), and
    each cluster on the machine gets its own block of 65536 (clusters reuse the same pod IPs)."""
    block = zlib.crc32(cluster.encode()) % CLUSTER_UID_BLOCKS
    return POD_UID_BASE + block * 0x10000 + (int(ipaddress.ip_address(pod_ip)) & 0xFFFF)


def hidden_paths(layout: ClusterLayout) -> list[str]:
    """What a pod must not see besides /run: other pods' hosts files, the mesh's state, bpffs,
    cgroupfs, root's home."""
    paths = ["/etc/netns", str(layout.run_root), "/var/lib/shoal", str(layout.bpffs_root),
             str(layout.cgroup_root), "/sys/fs/cgroup", "/root"]
    return [p for p in dict.fromkeys(paths) if p != "/run" and not p.startswith("/run/")]


def runtime_exposure(covered: list[str]) -> tuple[list[str], list[HostMount]]:
    """The Python that runs pods, its venv and Shoal's source tree, bound back read-only where
    the pod would not see them: under a folder closed to other users (pyenv or a clone under
    /root; that folder becomes an empty tmpfs in the pod), or under a folder the sandbox
    covers anyway (``covered``: a checkout under /tmp, as CI may make). Returns (folders to
    cover, mounts)."""
    import shoal
    paths = [os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix),
             str(Path(shoal.__file__).resolve().parents[1])]
    masks: list[str] = []
    mounts: list[HostMount] = []
    for path in dict.fromkeys(paths):
        closed = _closed_ancestor(path)
        if closed is not None:
            masks.append(closed)
        if closed is not None or any(_is_under(path, folder) for folder in covered):
            mounts.append(HostMount(path, path, True))
    return masks, mounts


def _is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _closed_ancestor(path: str) -> str | None:
    """The top-most folder above ``path`` that other users may not enter, if any."""
    parts = Path(path).parts
    for depth in range(2, len(parts)):
        folder = os.path.join(*parts[:depth])
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    return None


def pod_argv(layout: ClusterLayout, netns_name: str, security: PodSecurity, argv: Sequence[str]) -> list[str]:
    """`ip netns exec` (the pod's hosts file, a private mount namespace), the mount script, setpriv."""
    return ["ip", "netns", "exec", netns_name, "/bin/sh", "-c", mount_script(security, layout), "shoal-pod",
            *setpriv_argv(security, argv)]


def security_record(layout: ClusterLayout, namespace: str, pod: str) -> Path:
    """Where the kubelet records a running pod's PodSecurity for `shoal exec` (root only)."""
    return layout.run_dir / "pods" / f"{namespace}.{pod}.json"


def exec_argv(layout: ClusterLayout, namespace: str, pod: str, argv: Sequence[str]) -> list[str]:
    """`shoal exec`: the pod's cgroup, the namespaces, uid, capabilities and environment of a
    running pod process.

    Only a process past setpriv is entered (its uid is the pod's): one still running the mount
    script is in a half-built namespace.
    """
    from shoal.local.linux import Cgroup
    cgroups = list(layout.cgroup.glob(f"*/pods/{namespace}.{pod}"))
    try:
        security = PodSecurity.from_json(security_record(layout, namespace, pod).read_text())
    except FileNotFoundError:
        security = None
    if not cgroups or security is None:
        raise SandboxError(f"pod {namespace}/{pod} is not running in cluster {layout.name!r}")
    cgroup = Cgroup(cgroups[0])
    own_mnt = os.stat("/proc/self/ns/mnt").st_ino
    for pid in cgroup.pids():
        try:
            if (os.stat(f"/proc/{pid}/ns/mnt").st_ino != own_mnt
                    and os.stat(f"/proc/{pid}").st_uid == security.uid and _past_setpriv(pid, security)):
                # The pod's own environment (PATH, POD_NAME...), as kubectl exec gives the container's.
                environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                return cgroup.join_argv(["nsenter", f"--target={pid}", "--mount", "--net", "--",
                                         *setpriv_argv(security, ["env", "-i", *filter(None, environ), *argv])])
        except FileNotFoundError:   # exited while we looked
            continue
    raise SandboxError(f"pod {namespace}/{pod} has no running process to enter")


def _past_setpriv(pid: int, security: PodSecurity) -> bool:
    """A uid-0 pod's mount script also runs as uid 0, but still with every capability in its bounding set."""
    if security.uid != 0 or security.privileged:
        return True
    return _bounding_set(str(pid)) != _bounding_set("self")


def _bounding_set(pid: str) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next((line.split()[1] for line in status.splitlines() if line.startswith("CapBnd:")), "")
