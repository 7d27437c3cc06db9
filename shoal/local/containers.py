"""Podman flags derived from the rendered Kubernetes manifests (``shoal install --render``).

The local cluster's container mode runs the same images with the same privileges as the
DaemonSet and Deployments. Rather than restating capabilities, read-only root, user,
seccomp, hostPath mounts and env here (and letting them drift from daemonset/), every
flag is read from the rendered pod template: change the manifest and this changes too.

What Kubernetes supplies and podman cannot (the projected token, the CA ConfigMap, the
Secret, a pod IP) is provided by the caller as a host directory per volume name; a
volume the caller leaves out is an error naming it, never silently dropped.
"""
from __future__ import annotations

import re
import resource
from dataclasses import dataclass, field
from typing import Any

# runc + cgroupfs: crun refuses this machine's hybrid cgroup layout.
PODMAN_GLOBAL = ("--runtime", "runc", "--cgroup-manager", "cgroupfs")


def ulimits() -> tuple[str, ...]:
    """Explicit --ulimit flags: the caller's hard nofile (runc cannot raise it) and an nproc
    of 4096 (runc's setrlimit is refused the caller's higher value on this machine)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return ("--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096")


class ManifestError(ValueError):
    """The rendered manifest asks for something this translation cannot honour."""


@dataclass(frozen=True)
class ContainerRun:
    """One container of a rendered pod template, as podman flags."""

    name: str
    image: str
    command: tuple[str, ...]
    cap_add: tuple[str, ...]
    cap_drop_all: bool
    read_only: bool
    user: str | None
    no_new_privileges: bool
    env: dict[str, str] = field(default_factory=dict)
    mounts: tuple[str, ...] = ()      # podman --mount values
    tmpfs: tuple[str, ...] = ()       # emptyDir volumes
    # shareProcessNamespace: the pod's containers join one PID namespace (the caller's sandbox).
    share_process_namespace: bool = False
    # hostPath folders of type DirectoryOrCreate (with their subPath): the kubelet makes them
    # before the container starts, podman would refuse a missing bind source.
    create_dirs: tuple[str, ...] = ()

    def argv(self, container_name: str, network: str, cgroup_parent: str | None = None,
             extra_env: dict[str, str] | None = None, command: tuple[str, ...] | None = None,
             labels: dict[str, str] | None = None, hosts: dict[str, str] | None = None,
             sandbox: str | None = None) -> list[str]:
        """``podman run`` argv; ``extra_env`` overrides manifest env; ``hosts`` are the names
        the cluster's DNS would resolve (name -> address), ``labels`` find the container again;
        ``sandbox`` is the container whose PID namespace the pod shares (shareProcessNamespace;
        without one, a container run alone, such as a probe, keeps its own)."""
        argv = ["podman", *PODMAN_GLOBAL, "run", "--detach", "--pull=never", "--name", container_name,
                "--network", network, *ulimits()]
        if self.share_process_namespace and sandbox is not None:
            argv += ["--pid", f"container:{sandbox}"]
        for key, value in sorted((labels or {}).items()):
            argv += ["--label", f"{key}={value}"]
        for name, address in sorted((hosts or {}).items()):
            argv += ["--add-host", f"{name}:{address}"]
        if cgroup_parent:
            argv += ["--cgroup-parent", cgroup_parent]
        if self.cap_drop_all:
            argv += ["--cap-drop", "ALL"]
        for cap in self.cap_add:
            argv += ["--cap-add", cap]
        if self.read_only:
            argv += ["--read-only", "--read-only-tmpfs=false"]
        if self.no_new_privileges:
            argv += ["--security-opt", "no-new-privileges"]
        if self.user is not None:
            argv += ["--user", self.user]
        for mount in self.mounts:
            argv += ["--mount", mount]
        for path in self.tmpfs:
            argv += ["--tmpfs", path]
        for key, value in sorted({**self.env, **(extra_env or {})}.items()):
            argv += ["--env", f"{key}={value}"]
        return [*argv, self.image, *(command if command is not None else self.command)]


def pod_template(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objects:
        if obj.get("kind") == kind and obj.get("metadata", {}).get("name") == name:
            return obj["spec"]["template"]
    raise ManifestError(f"no {kind} {name} in the rendered manifests")


def container_run(objects: list[dict[str, Any]], kind: str, name: str, container: str,
                  node: str, volume_sources: dict[str, str]) -> ContainerRun:
    """The podman view of ``container`` in the pod template of ``kind``/``name``.

    ``volume_sources`` maps each non-hostPath, non-emptyDir volume to a host directory.
    ``node`` stands in for spec.nodeName; the pod is named after the container.
    """
    template = pod_template(objects, kind, name)
    owner = next(o for o in objects if o.get("kind") == kind and o["metadata"]["name"] == name)
    fields = {"spec.nodeName": node, "metadata.namespace": owner["metadata"].get("namespace", "default"),
              "metadata.name": f"{name}-{node}"}
    return pod_container_run(template["spec"], container, f"{kind} {name}", fields, volume_sources,
                             config_maps(objects))


def config_maps(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The rendered ConfigMaps' data by name (what ``configMapKeyRef`` env entries read)."""
    return {o["metadata"]["name"]: o.get("data", {}) for o in objects if o.get("kind") == "ConfigMap"}


def pod_container_run(spec: dict[str, Any], container: str, where: str, fields: dict[str, str],
                      volume_sources: dict[str, str],
                      maps: dict[str, dict[str, str]] | None = None) -> ContainerRun:
    """The podman view of ``container`` in pod ``spec`` (a template's or a running Pod's).

    ``fields`` are the pod fields its env may read (``spec.nodeName``, ``status.podIP``...).
    """
    found = [c for c in spec["containers"] if c["name"] == container]
    if not found:
        raise ManifestError(f"{where} has no container {container!r}")
    c = found[0]
    where = f"{where}/{container}"
    pod_sc = spec.get("securityContext", {})
    sc = {**pod_sc, **c.get("securityContext", {})}
    if sc.get("privileged"):
        raise ManifestError(f"{where} asks for privileged mode")
    caps = sc.get("capabilities", {})
    drops = caps.get("drop", [])
    if drops not in ([], ["ALL"]):
        raise ManifestError(f"{where}: only drop [ALL] is supported, got {drops}")
    user = None
    if "runAsUser" in sc:
        user = str(sc["runAsUser"]) + (f":{sc['runAsGroup']}" if "runAsGroup" in sc else "")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    env = _env(maps or {}, c.get("env", []), fields)
    mounts, tmpfs, create_dirs = [], [], []
    for vm in c.get("volumeMounts", []):
        volume = volumes[vm["name"]]
        target, read_only = vm["mountPath"], vm.get("readOnly", False)
        if "emptyDir" in volume:
            tmpfs.append(target)
            continue
        if "hostPath" in volume:
            source = volume["hostPath"]["path"]
        elif vm["name"] in volume_sources:
            source = volume_sources[vm["name"]]
        else:
            raise ManifestError(f"{where}: volume {vm['name']!r} needs a local source")
        if "subPathExpr" in vm:
            source = f"{source.rstrip('/')}/{_expand(vm['subPathExpr'], env, where)}"
        elif "subPath" in vm:
            source = f"{source.rstrip('/')}/{vm['subPath']}"
        if (volume.get("hostPath") or {}).get("type") == "DirectoryOrCreate":
            create_dirs.append(source)
        mount = f"type=bind,source={source},destination={target}"
        if read_only:
            mount += ",ro=true"
        # HostToContainer = rslave: host mounts (the bpffs) propagate in, never out.
        if vm.get("mountPropagation") == "HostToContainer":
            mount += ",bind-propagation=rslave"
        mounts.append(mount)
    return ContainerRun(
        name=container, image=c["image"], command=tuple(c.get("command", ())) + tuple(c.get("args", ())),
        cap_add=tuple(caps.get("add", [])), cap_drop_all=drops == ["ALL"],
        read_only=bool(sc.get("readOnlyRootFilesystem")), user=user,
        no_new_privileges=sc.get("allowPrivilegeEscalation") is False,
        env=env, mounts=tuple(mounts), tmpfs=tuple(tmpfs), create_dirs=tuple(create_dirs),
        share_process_namespace=bool(spec.get("shareProcessNamespace")))


def _expand(expression: str, env: dict[str, str], where: str) -> str:
    """A ``subPathExpr``: ``$(VAR)`` from the container's env, as the kubelet expands it."""
    def value(match: re.Match[str]) -> str:
        if match.group(1) not in env:
            raise ManifestError(f"{where}: subPathExpr {expression!r} names {match.group(1)}, which is not in its env")
        return env[match.group(1)]
    expanded = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, expression)
    if expanded.startswith("/") or ".." in expanded.split("/"):
        raise ManifestError(f"{where}: subPathExpr {expression!r} leaves its volume ({expanded!r})")
    return expanded


def _env(maps: dict[str, dict[str, str]], entries: list[dict[str, Any]], fields: dict[str, str]) -> dict[str, str]:
    """Resolves literal values, the pod fields in ``fields`` and keys of the rendered ConfigMaps."""
    env = {}
    for entry in entries:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
            continue
        source = entry.get("valueFrom", {})
        if source.get("fieldRef", {}).get("fieldPath") in fields:
            env[entry["name"]] = fields[source["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            try:
                env[entry["name"]] = maps[ref["name"]][ref["key"]]
            except KeyError:
                raise ManifestError(f"env {entry['name']}: ConfigMap {ref['name']} has no key {ref['key']}") from None
        else:
            raise ManifestError(f"env {entry['name']}: unsupported source {sorted(source)}")
    return env
