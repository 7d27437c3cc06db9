"""A pod's security settings as Kubernetes defines them: who its processes run as and which
host paths they see, read from a Pod manifest.

Shared because two processes judge the same fields: the controller refuses a bad
``securityContext`` or ``hostPath`` volume at apply time (``validate_pod_spec``), and the
local cluster's kubelet turns a good one into a sandbox (``shoal/local/sandbox.py``). The
parsing is pure: no paths are looked at here.
"""
from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any

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
MAX_ID = 2**31 - 2
# Writable and private to each pod: a container's own root filesystem has them, and the local
# sandbox makes them tmpfs. An emptyDir volume may only be mounted on one of them.
PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm")
_VOLUME_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class PodSpecError(ValueError):
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

    @classmethod
    def for_container(cls, pod: dict[str, Any], container: dict[str, Any], default_uid: int,
                      env: dict[str, str] | None = None) -> "PodSecurity":
        """Container securityContext over the pod's, as Kubernetes merges them."""
        spec = pod.get("spec") or {}
        pod_ctx = _mapping(spec.get("securityContext"), "spec.securityContext")
        ctx = _mapping(container.get("securityContext"), "securityContext")
        merged: dict[str, Any] = {**{k: pod_ctx[k] for k in ("runAsUser", "runAsGroup") if k in pod_ctx}, **ctx}
        privileged = merged.get("privileged", False) is True
        uid = _id(merged.get("runAsUser", 0 if privileged else default_uid), "runAsUser")
        gid = _id(merged.get("runAsGroup", uid), "runAsGroup")
        caps = _mapping(merged.get("capabilities"), "securityContext.capabilities")
        added = caps.get("add", []) or []
        if not isinstance(added, list) or not all(isinstance(c, str) for c in added):
            raise PodSpecError("securityContext.capabilities.add: expected a list of capability names")
        names = sorted({c.upper().removeprefix("CAP_") for c in added})
        unknown = [n for n in names if n not in CAPABILITIES]
        if unknown:
            raise PodSpecError(f"securityContext.capabilities.add: unknown capabilities {', '.join(unknown)}")
        escalation = merged.get("allowPrivilegeEscalation", False)
        if not isinstance(escalation, bool) or not isinstance(merged.get("privileged", False), bool):
            raise PodSpecError("securityContext.allowPrivilegeEscalation/privileged: expected true or false")
        return cls(uid=uid, gid=gid, capabilities=tuple(sorted(CAPABILITIES)) if privileged else tuple(names),
                   no_new_privs=not (escalation or privileged), privileged=privileged,
                   mounts=host_mounts(spec, container, env or {}))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PodSecurity":
        raw = json.loads(text)
        raw["capabilities"] = tuple(raw.get("capabilities", ()))
        raw["mounts"] = tuple(HostMount(**m) for m in raw.get("mounts", ()))
        return cls(**raw)


def host_mounts(spec: dict[str, Any], container: dict[str, Any], env: dict[str, str]) -> tuple[HostMount, ...]:
    """hostPath volumes named by the container's volumeMounts (subPathExpr expands $(VAR) from env)."""
    volumes: dict[str, str | None] = {}    # name -> host path (None: an emptyDir)
    for i, volume in enumerate(_list(spec.get("volumes"), "spec.volumes")):
        where = f"spec.volumes[{i}]"
        volume = _mapping(volume, where)
        if not isinstance(volume.get("name"), str) or not _VOLUME_NAME.match(volume["name"]):
            raise PodSpecError(f"{where}.name: expected a DNS label")
        if "emptyDir" in volume and "hostPath" not in volume:
            _mapping(volume["emptyDir"], f"{where}.emptyDir")
            volumes[volume["name"]] = None
            continue
        host = _mapping(volume.get("hostPath"), f"{where}.hostPath")
        path = host.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise PodSpecError(f"{where}.hostPath.path: expected an absolute path "
                               "(only hostPath and emptyDir volumes exist here)")
        volumes[volume["name"]] = path
    mounts = []
    for i, vm in enumerate(_list(container.get("volumeMounts"), "volumeMounts")):
        where = f"volumeMounts[{i}]"
        vm = _mapping(vm, where)
        if vm.get("name") not in volumes:
            raise PodSpecError(f"{where}.name: no volume named {vm.get('name')!r} in spec.volumes")
        target = vm.get("mountPath")
        if not isinstance(target, str) or not target.startswith("/") or ".." in target.split("/"):
            raise PodSpecError(f"{where}.mountPath: expected an absolute path without '..'")
        source = volumes[vm["name"]]
        if source is None:   # an emptyDir: the pod's own private tmpfs is already there
            if target.rstrip("/") not in PRIVATE_TMPFS:
                raise PodSpecError(f"{where}.mountPath: an emptyDir can only be mounted on "
                                   f"{', '.join(PRIVATE_TMPFS)} here")
            continue
        sub = vm.get("subPathExpr") or vm.get("subPath") or ""
        if sub:
            # Checked as written (apply time, no env yet) and as expanded (the kubelet's env).
            for expanded in (_expand(str(sub), {}), _expand(str(sub), env) if env else ""):
                if expanded.startswith("/") or ".." in expanded.split("/"):
                    raise PodSpecError(f"{where}.subPath: expected a relative path without '..'")
            source = posixpath.join(source, _expand(str(sub), env))
        read_only = vm.get("readOnly", False)
        if not isinstance(read_only, bool):
            raise PodSpecError(f"{where}.readOnly: expected true or false")
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
            PodSecurity.for_container({"spec": spec}, container, default_uid=0)
        except PodSpecError as err:
            problems.append(f"containers[{i}]: {err}")
    return problems


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PodSpecError(f"{where}: expected a mapping")
    return value


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PodSpecError(f"{where}: expected a list")
    return value


def _id(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ID:
        raise PodSpecError(f"securityContext.{where}: expected an integer 0-{MAX_ID}, got {value!r}")
    return value
