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
import json
import os
import re
import shlex
import stat
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from shoal.config import ClusterLayout

# uids given to pods that do not set runAsUser: POD_UID_BASE + a block per cluster + the low 16
# bits of the pod IP (the largest is below 2**31, the kernel's limit).
POD_UID_BASE = 200_000
CLUSTER_UID_BLOCKS = 30_000
# Linux capabilities as Kubernetes spells them (securityContext.capabilities.add: [NET_ADMIN]).
CAPABILITIES = frozenset({
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE",
    "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
})
MAX_ID = 2**31 - 2
# Writable and private to each pod (containers get the same from their own root filesystem).
PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm")
STAGE = "/mnt"   # where host paths wait while the folders above them are covered
# Paths a mount script may create a mount point under (they are tmpfs by then).
_CREATABLE_UNDER = ("/run/", "/tmp/")
_VOLUME_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SandboxError(ValueError):
    """A pod's securityContext or volumes cannot be honoured; the message names the field."""


@dataclass(frozen=True)
class HostMount:
    """A hostPath volume mounted into the pod at the same or another path."""
    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class PodSecurity:
    """Who a pod's process runs as: uid/gid, the capabilities it keeps, and host mounts."""
    uid: int
    gid: int
    capabilities: tuple[str, ...] = ()
    no_new_privs: bool = True
    privileged: bool = False
    mounts: tuple[HostMount, ...] = field(default=())

    # -- from a manifest ---------------------------------------------------------------

    @classmethod
    def for_container(cls, pod: dict[str, Any], container: dict[str, Any], default_uid: int,
                      env: dict[str, str] | None = None) -> "PodSecurity":
        """Container securityContext over the pod's, as Kubernetes merges them."""
        spec = pod.get("spec") or {}
        pod_ctx = _mapping(spec.get("securityContext"), "spec.securityContext")
        ctx = _mapping(container.get("securityContext"), "securityContext")
        merged = {**{k: pod_ctx[k] for k in ("runAsUser", "runAsGroup") if k in pod_ctx}, **ctx}
        privileged = merged.get("privileged", False) is True
        uid = _id(merged.get("runAsUser", 0 if privileged else default_uid), "runAsUser")
        gid = _id(merged.get("runAsGroup", uid), "runAsGroup")
        caps = _mapping(merged.get("capabilities"), "securityContext.capabilities")
        added = caps.get("add", []) or []
        if not isinstance(added, list) or not all(isinstance(c, str) for c in added):
            raise SandboxError("securityContext.capabilities.add: expected a list of capability names")
        names = sorted({c.upper().removeprefix("CAP_") for c in added})
        unknown = [n for n in names if n not in CAPABILITIES]
        if unknown:
            raise SandboxError(f"securityContext.capabilities.add: unknown capabilities {', '.join(unknown)}")
        escalation = merged.get("allowPrivilegeEscalation", False)
        if not isinstance(escalation, bool) or not isinstance(merged.get("privileged", False), bool):
            raise SandboxError("securityContext.allowPrivilegeEscalation/privileged: expected true or false")
        return cls(uid=uid, gid=gid, capabilities=tuple(sorted(CAPABILITIES)) if privileged else tuple(names),
                   no_new_privs=not (escalation or privileged), privileged=privileged,
                   mounts=host_mounts(spec, container, env or {}))

    def check_host(self) -> None:
        """Before a start: every hostPath exists, every mount point can be made (the root fs is read-only)."""
        for mount in self.mounts:
            if not os.path.exists(mount.source):
                raise SandboxError(f"hostPath {mount.source} does not exist (yet)")
            if not mount.target.startswith(_CREATABLE_UNDER) and not os.path.exists(mount.target):
                raise SandboxError(f"mountPath {mount.target} does not exist on the machine "
                                   f"(the root filesystem is read-only; use a path under /run or /tmp)")

    # -- the argv that applies it --------------------------------------------------------

    def setpriv_argv(self, argv: Sequence[str]) -> list[str]:
        out = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        if self.privileged:   # every capability: nothing to drop
            return [*out, "--", *argv]
        caps = ",".join(["-all", *(f"+{c.lower()}" for c in self.capabilities)])
        out += [f"--inh-caps={caps}", f"--bounding-set={caps}"]
        if self.uid != 0 or self.capabilities:
            out.append(f"--ambient-caps={caps}")   # root keeps its (bounded) caps across exec by itself
        if self.no_new_privs:
            out.append("--no-new-privs")
        return [*out, "--", *argv]

    def mount_script(self, layout: ClusterLayout) -> str:
        """Shell run as root inside the pod's fresh mount namespace, before setpriv.

        Host paths the pod may see are bound aside first (into a staging tmpfs), then every
        folder the pod must not see is covered, the private /tmp, /var/tmp and /dev/shm are
        made, and only then are the staged paths moved to their targets: a source or target
        may lie in a covered folder (a checkout under /tmp or /root, a hostPath under /run)."""
        q = shlex.quote
        hidden_now = hidden_paths(layout)
        masks, runtime = runtime_exposure(covered=[*hidden_now, "/run", *PRIVATE_TMPFS])
        mounts = [*runtime, *self.mounts]
        lines = ["set -e", "mount --make-rprivate /"]
        if not self.privileged:
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

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PodSecurity":
        raw = json.loads(text)
        raw["capabilities"] = tuple(raw.get("capabilities", ()))
        raw["mounts"] = tuple(HostMount(**m) for m in raw.get("mounts", ()))
        return cls(**raw)


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


def host_mounts(spec: dict[str, Any], container: dict[str, Any], env: dict[str, str]) -> tuple[HostMount, ...]:
    """hostPath volumes named by the container's volumeMounts (subPathExpr expands $(VAR) from env)."""
    volumes = {}
    for i, volume in enumerate(_list(spec.get("volumes"), "spec.volumes")):
        where = f"spec.volumes[{i}]"
        volume = _mapping(volume, where)
        host = _mapping(volume.get("hostPath"), f"{where}.hostPath")
        path = host.get("path")
        if not isinstance(volume.get("name"), str) or not _VOLUME_NAME.match(volume["name"]):
            raise SandboxError(f"{where}.name: expected a DNS label")
        if not isinstance(path, str) or not path.startswith("/"):
            raise SandboxError(f"{where}.hostPath.path: expected an absolute path (only hostPath volumes exist here)")
        volumes[volume["name"]] = path
    mounts = []
    for i, vm in enumerate(_list(container.get("volumeMounts"), "volumeMounts")):
        where = f"volumeMounts[{i}]"
        vm = _mapping(vm, where)
        if vm.get("name") not in volumes:
            raise SandboxError(f"{where}.name: no volume named {vm.get('name')!r} in spec.volumes")
        target = vm.get("mountPath")
        if not isinstance(target, str) or not target.startswith("/") or ".." in target.split("/"):
            raise SandboxError(f"{where}.mountPath: expected an absolute path without '..'")
        source = volumes[vm["name"]]
        sub = vm.get("subPathExpr") or vm.get("subPath") or ""
        if sub:
            # Checked as written (apply time, no env yet) and as expanded (the kubelet's env).
            for expanded in (_expand(str(sub), {}), _expand(str(sub), env) if env else ""):
                if expanded.startswith("/") or ".." in expanded.split("/"):
                    raise SandboxError(f"{where}.subPath: expected a relative path without '..'")
            source = os.path.join(source, _expand(str(sub), env))
        read_only = vm.get("readOnly", False)
        if not isinstance(read_only, bool):
            raise SandboxError(f"{where}.readOnly: expected true or false")
        mounts.append(HostMount(source, target, read_only))
    return tuple(mounts)


def _expand(text: str, env: dict[str, str]) -> str:
    """$(VAR) as Kubernetes expands it in subPathExpr; an unknown VAR stays a plain name."""
    return re.sub(r"\$\((\w+)\)", lambda match: env.get(match.group(1), match.group(1)), text)


def validate_pod_spec(spec: dict[str, Any]) -> list[str]:
    """Problems with a pod spec's securityContext and volumes, for the apply-time check."""
    problems = []
    containers = spec.get("containers")
    for i, container in enumerate(containers if isinstance(containers, list) else []):
        if not isinstance(container, dict):
            continue
        try:
            PodSecurity.for_container({"spec": spec}, container, POD_UID_BASE)
        except SandboxError as err:
            problems.append(f"containers[{i}]: {err}")
    return problems


def pod_argv(layout: ClusterLayout, netns_name: str, security: PodSecurity, argv: Sequence[str]) -> list[str]:
    """`ip netns exec` (the pod's hosts file, a private mount namespace), the mount script, setpriv."""
    return ["ip", "netns", "exec", netns_name, "/bin/sh", "-c", security.mount_script(layout), "shoal-pod",
            *security.setpriv_argv(argv)]


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
                                         *security.setpriv_argv(["env", "-i", *filter(None, environ), *argv])])
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


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SandboxError(f"{where}: expected a mapping")
    return value


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SandboxError(f"{where}: expected a list")
    return value


def _id(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ID:
        raise SandboxError(f"securityContext.{where}: expected an integer 0-{MAX_ID}, got {value!r}")
    return value
