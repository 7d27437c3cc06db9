"""Renders Shoal's Kubernetes manifests with install-time options.

The base in ``daemonset/`` is the single source; options are applied to the parsed
objects (never by editing YAML text), including the waypoint template that the
controller instantiates later, which lives as YAML inside a ConfigMap.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from shoal.cli.deploy import kustomize
from shoal.config import DEFAULT_TRUST_DOMAIN, ENV_CLUSTER, ClusterLayout

DEFAULT_HUB = "ghcr.io/shoal-mesh"
DEFAULT_TAG = "0.1.0"
DEFAULT_FLOWS = 4095
MAX_FLOWS = 1 << 20
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

NAMESPACE = "shoal-system"
CONFIG_MAP = "shoal-config"
WAYPOINT_TEMPLATE = "shoal-waypoint-template"
WAYPOINT_TEMPLATE_KEY = "template.yaml"
CONFIG_CHECKSUM_ANNOTATION = "shoal.io/config-checksum"
# Images Shoal builds (images/*.Dockerfile); only these get the hub and tag options.
SHOAL_IMAGES = ("shoal-controller", "shoal-agent", "shoal-waypoint")

CONTROLLER = "shoal-controller"
AGENT = "shoal-agent"
COMPONENT_LABEL = "app.kubernetes.io/component"
FLOWS_VOLUME = "shoal-flows"   # the waypoint's hostPath of its node agent's flows folder
# Where the agent sees the local cluster's named pod namespaces (render for a local cluster only).
LOCAL_NETNS_MOUNT = "/host/run/netns"
CA_MOUNT = "/etc/shoal/cacerts"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HUB = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*$")


def default_base() -> Path:
    """The kustomize base: ``$SHOAL_MANIFESTS`` or ``daemonset/`` beside this package."""
    override = os.environ.get("SHOAL_MANIFESTS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "daemonset"


@dataclass(frozen=True)
class RenderOptions:
    """Install-time choices. Each one is validated here, before anything is rendered."""

    trust_domain: str = DEFAULT_TRUST_DOMAIN
    hub: str = DEFAULT_HUB
    image_tag: str = DEFAULT_TAG
    flows: int = DEFAULT_FLOWS
    log_level: str = "INFO"
    # A Secret in Istio's cacerts layout (ca-cert.pem, ca-key.pem, cert-chain.pem,
    # root-cert.pem). Without one the controller generates a root that lives as long
    # as its pod.
    ca_secret: str | None = None
    # The local cluster this render is for (``shoal up --containers``): the DaemonSet's host
    # paths become that cluster's (see ``_local_node_paths``); None renders for Kubernetes.
    local_cluster: str | None = None

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.match(self.trust_domain) or ".." in self.trust_domain:
            raise ValueError(f"trust domain {self.trust_domain!r}: expected a DNS-like name such as example.org "
                             "(lowercase letters, digits, '.', '-')")
        if not _HUB.match(self.hub):
            raise ValueError(f"hub {self.hub!r}: expected a registry path such as ghcr.io/shoal-mesh")
        if not _TAG.match(self.image_tag):
            raise ValueError(f"image tag {self.image_tag!r}: expected [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
        if isinstance(self.flows, bool) or not isinstance(self.flows, int) or not 1 <= self.flows <= MAX_FLOWS:
            raise ValueError(f"flows {self.flows!r}: expected an integer in [1, {MAX_FLOWS}]")
        if self.ca_secret is not None and not _DNS_SUBDOMAIN.match(self.ca_secret):
            raise ValueError(f"CA secret {self.ca_secret!r}: expected a Secret name (lowercase, digits, '-', '.')")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log level {self.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
        if self.local_cluster is not None:
            ClusterLayout(name=self.local_cluster)   # raises with the naming rule

    def image(self, name: str) -> str:
        return f"{self.hub}/{name}:{self.image_tag}"


def render(options: RenderOptions = RenderOptions(), base: Path | None = None) -> list[dict[str, Any]]:
    """The base's objects with ``options`` applied; the base files are not touched."""
    objects = kustomize.load(base or default_base())
    return [_apply(obj, options) for obj in objects]


def render_yaml(options: RenderOptions = RenderOptions(), base: Path | None = None) -> str:
    return to_yaml(render(options, base))


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded waypoint template, dashboards) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def load_file(base: Path, name: str) -> list[dict[str, Any]]:
    """Objects of a manifest outside the base (e.g. ``uninstall/node-cleanup.yaml``)."""
    return [doc for doc in yaml.safe_load_all((base / name).read_text()) if doc]


def render_file(options: RenderOptions, base: Path, name: str) -> list[dict[str, Any]]:
    return [_apply(obj, options) for obj in load_file(base, name)]


# -- transforms ------------------------------------------------------------------------


def _apply(obj: dict[str, Any], options: RenderOptions) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    if _is(obj, "ConfigMap", CONFIG_MAP):
        obj["data"].update(trustDomain=options.trust_domain, flowBufferSize=str(options.flows),
                           logLevel=options.log_level)
    if _is(obj, "ConfigMap", WAYPOINT_TEMPLATE):
        docs = [d for d in yaml.safe_load_all(obj["data"][WAYPOINT_TEMPLATE_KEY]) if d]
        obj["data"][WAYPOINT_TEMPLATE_KEY] = to_yaml([_apply(d, options) for d in docs])
    if _is(obj, "Deployment", CONTROLLER) and options.ca_secret:
        _mount_ca_secret(obj, options.ca_secret)
    if _is(obj, "DaemonSet", AGENT) and options.local_cluster:
        _local_node_paths(obj, ClusterLayout(name=options.local_cluster))
    if _is(obj, "Deployment", CONTROLLER) and options.local_cluster:
        _local_controller(obj, ClusterLayout(name=options.local_cluster))
    if _is_waypoint(obj) and options.local_cluster:
        _local_waypoint_paths(obj, ClusterLayout(name=options.local_cluster))
    obj = _map_strings(obj, lambda s: _replace_trust_domain(s, options.trust_domain))
    for container in _containers(obj):
        container["image"] = _retag(container["image"], options)
    template = _pod_template(obj)
    if template is not None and _reads_config(template):
        annotations = template.setdefault("metadata", {}).setdefault("annotations", {})
        annotations[CONFIG_CHECKSUM_ANNOTATION] = _config_checksum(options)
    return obj


def _mount_ca_secret(deployment: dict[str, Any], secret: str) -> None:
    """The controller reads its CA from the Secret (--ca-dir, Istio's cacerts layout)."""
    spec = deployment["spec"]["template"]["spec"]
    spec.setdefault("volumes", []).append({"name": "cacerts", "secret": {"secretName": secret}})
    for container in spec["containers"]:
        if container["name"] == "controller":
            container.setdefault("volumeMounts", []).append(
                {"name": "cacerts", "mountPath": CA_MOUNT, "readOnly": True})
            container.setdefault("env", []).append({"name": "SHOAL_CA_DIR", "value": CA_MOUNT})


def _local_node_paths(daemonset: dict[str, Any], layout: ClusterLayout) -> None:
    """The DaemonSet for one local cluster, whose nodes share this machine.

    A Kubernetes node owns its machine's /var/run/shoal and cgroup root. Local nodes get
    their own folders instead, through ``subPathExpr: $(SHOAL_NODE)`` as a DaemonSet would
    on shared storage: the run volume is the cluster's run dir (``<run>/<node>``: sockets,
    enrolment state), the cgroup volume the cluster's cgroup (``<cluster>/<node>`` is the
    node's root: the machine's root cgroup is never attached to). The pod namespaces are
    named (``ip netns``), not kubelet sandboxes found through /proc, so the agent also
    mounts the netns folder read-only and is told so by SHOAL_NETNS_DIR. SHOAL_CLUSTER
    names the cluster: pins land in ``/sys/fs/bpf/<cluster>/<node>`` as in process mode.
    """
    spec = daemonset["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    volumes["run"]["hostPath"]["path"] = str(layout.run_dir)
    volumes["cgroup"]["hostPath"]["path"] = str(layout.cgroup)
    spec["volumes"].append({"name": "netns", "hostPath": {"path": "/run/netns", "type": "Directory"}})
    for container in spec["containers"]:
        for mount in container.get("volumeMounts", []):
            if mount["name"] in ("run", "cgroup"):
                mount["subPathExpr"] = "$(SHOAL_NODE)"
        # The YAML anchor shares one env list between the containers: give each its own.
        container["env"] = [dict(entry) for entry in container.get("env", [])]
        for entry in container["env"]:
            if entry["name"] == ENV_CLUSTER:
                entry["value"] = layout.name
        if container["name"] == "agent":
            container["volumeMounts"].append({"name": "netns", "mountPath": LOCAL_NETNS_MOUNT, "readOnly": True,
                                              "mountPropagation": "HostToContainer"})
            container["env"].append({"name": "SHOAL_NETNS_DIR", "value": LOCAL_NETNS_MOUNT})


def _is_waypoint(obj: dict[str, Any]) -> bool:
    """The waypoint template's Deployment (its name is still the ``${GATEWAY_NAME}`` placeholder)."""
    labels = obj.get("metadata", {}).get("labels") or {}
    return obj.get("kind") == "Deployment" and labels.get(COMPONENT_LABEL) == "waypoint"


def _local_waypoint_paths(deployment: dict[str, Any], layout: ClusterLayout) -> None:
    """The waypoint template for one local cluster: its node's flows folder is
    ``<run dir>/<node>/flows`` (the agent's ``run`` volume, ``subPathExpr: $(SHOAL_NODE)``,
    as in ``_local_node_paths``) rather than a Kubernetes node's ``/var/run/shoal/flows``."""
    spec = deployment["spec"]["template"]["spec"]
    under_node = layout.flows_dir("node").relative_to(layout.node_dir("node"))
    for volume in spec.get("volumes", []):
        if volume["name"] == FLOWS_VOLUME:
            volume["hostPath"]["path"] = str(layout.run_dir)
    for container in spec["containers"]:
        for mount in container.get("volumeMounts", []):
            if mount["name"] == FLOWS_VOLUME:
                mount["subPathExpr"] = f"$(SHOAL_NODE)/{under_node}"


def _local_controller(deployment: dict[str, Any], layout: ClusterLayout) -> None:
    """The controller Deployment for one local cluster: its source is the embedded store.

    The entry point is the local cluster's (``shoal.local.controller``: the same app, plus
    the node addresses its relay dials), with ``--source=local --cluster NAME --no-kubelet``:
    the kubelet makes namespaces and processes, so it runs on the host, beside it. The state
    volume is the cluster's run dir instead of an emptyDir (the CA and the identities are
    kept there, as the API server keeps them on Kubernetes), and the run dir is also mounted
    where the store, the credential key and the CLI's socket are. User, capabilities and
    read-only root are the Deployment's.
    """
    spec = deployment["spec"]["template"]["spec"]
    for volume in spec["volumes"]:
        if volume["name"] == "state":
            volume.pop("emptyDir", None)
            volume["hostPath"] = {"path": str(layout.run_dir), "type": "Directory"}
    spec["volumes"].append({"name": "local-run", "hostPath": {"path": str(layout.run_dir), "type": "Directory"}})
    for container in spec["containers"]:
        if container["name"] != "controller":
            continue
        container["command"] = ["python", "-m", "shoal.local.controller"]
        container["args"] = [("--source=local" if arg == "--source=kubernetes" else arg)
                             for arg in container.get("args", [])] + [f"--cluster={layout.name}", "--no-kubelet"]
        container["volumeMounts"].append({"name": "local-run", "mountPath": str(layout.run_dir)})


def _is(obj: dict[str, Any], kind: str, name: str) -> bool:
    return obj.get("kind") == kind and obj.get("metadata", {}).get("name") == name


def _replace_trust_domain(value: str, trust_domain: str) -> str:
    """The trust domain as a whole value, in a SPIFFE ID, or in an Istio principal."""
    default = DEFAULT_TRUST_DOMAIN
    if value == default:
        return trust_domain
    return (value.replace(f"spiffe://{default}/", f"spiffe://{trust_domain}/")
                 .replace(f"{default}/ns/", f"{trust_domain}/ns/"))


def _map_strings(node: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(node, str):
        return fn(node)
    if isinstance(node, dict):
        return {key: _map_strings(value, fn) for key, value in node.items()}
    if isinstance(node, list):
        return [_map_strings(item, fn) for item in node]
    return node


def _pod_template(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
        return obj["spec"]["template"]
    return None


def _containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    template = _pod_template(obj)
    if template is None:
        return
    spec = template["spec"]
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def _retag(image: str, options: RenderOptions) -> str:
    repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    name = repository.rsplit("/", 1)[-1]
    return options.image(name) if name in SHOAL_IMAGES else image


def _reads_config(template: dict[str, Any]) -> bool:
    return CONFIG_MAP in json.dumps(template["spec"])


def _config_checksum(options: RenderOptions) -> str:
    payload = json.dumps([options.trust_domain, options.flows, options.log_level]).encode()
    return hashlib.sha256(payload).hexdigest()[:16]
