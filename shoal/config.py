"""Constants shared by every component: ports, labels, and where a cluster's runtime state lives.

Each component owns one frozen config dataclass (``shoal.agent.config``,
``shoal.controller.config``...) built from flags and environment in one place;
this module only holds what they all agree on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

# Node proxy (in-pod listeners and per-node endpoints), as ztunnel.
PORT_OUTBOUND = 15001
PORT_INBOUND_PLAINTEXT = 15006
PORT_HBONE = 15008
PORT_PROXY_ADMIN = 15000
PORT_PROXY_METRICS = 15020
PORT_PROXY_READY = 15021
# Controller: config stream + CA (istiod's 15012), metrics, readiness.
PORT_CONTROLLER_GRPC = 15012
PORT_CONTROLLER_METRICS = 15014
# Agent metrics; flows (Hubble Observer) per node and the cluster relay.
PORT_AGENT_METRICS = 9962
PORT_HUBBLE = 4244
PORT_HUBBLE_RELAY = 4245

# Socket mark carried by the node proxy's own sockets: capture skips them.
PROXY_MARK = 0x539

DEFAULT_TRUST_DOMAIN = "cluster.local"

LABEL_MESH = "shoal.io/mesh"                     # namespace: enabled; pod: disabled
LABEL_MESH_ISTIO = "istio.io/dataplane-mode"     # namespace alias: ambient
LABEL_USE_WAYPOINT = "shoal.io/use-waypoint"
LABEL_USE_WAYPOINT_ISTIO = "istio.io/use-waypoint"
WAYPOINT_GATEWAY_CLASS = "shoal-waypoint"


# The one environment variable that names the cluster every process belongs to.
ENV_CLUSTER = "SHOAL_CLUSTER"
DEFAULT_CLUSTER = "shoal"


def cluster_name(environ: Mapping[str, str] = os.environ) -> str:
    """The cluster this process belongs to: ``$SHOAL_CLUSTER``, else "shoal"."""
    return environ.get(ENV_CLUSTER, DEFAULT_CLUSTER)


def spiffe_id(namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


# Where a local cluster's controller listens (shoal/local/network.py puts it there): the
# controller a node agent started without --controller dials, and a name on the controller's
# certificate. The rest of the local cluster's address plan is shoal/local/network.py's.
LOCAL_CONTROLLER_IP = "172.18.0.1"
LOCAL_CONTROLLER_ADDRESS = f"{LOCAL_CONTROLLER_IP}:{PORT_CONTROLLER_GRPC}"


@dataclass(frozen=True)
class ClusterLayout:
    """Where a cluster's runtime state lives on this machine: state directories, sockets,
    credentials, network namespace names, cgroups and bpffs pins, as every daemon finds them.

    Every name is prefixed with the cluster name, so several clusters (a demo and a
    test run) can live side by side without touching the root network namespace. The
    local cluster's addresses (fabric, node and pod CIDRs) are in shoal/local/network.py.
    """

    name: str = DEFAULT_CLUSTER
    run_root: Path = Path("/run/shoal")
    cgroup_root: Path = Path("/sys/fs/cgroup/unified")
    bpffs_root: Path = Path("/sys/fs/bpf")

    def __post_init__(self) -> None:
        if not self.name or not all(c.isdigit() or "a" <= c <= "z" or c == "-" for c in self.name):
            raise ValueError(f"cluster name {self.name!r}: use lowercase letters, digits and '-'")

    @classmethod
    def from_env(cls) -> "ClusterLayout":
        return cls(name=cluster_name())

    # -- directories
    @property
    def run_dir(self) -> Path:
        return self.run_root / self.name

    def node_dir(self, node: str) -> Path:
        return self.run_dir / node

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def store_path(self) -> Path:
        return self.run_dir / "store.db"

    @property
    def ca_dir(self) -> Path:
        return self.run_dir / "ca"

    @property
    def credential_key_path(self) -> Path:
        """The key of the per-node credentials (shoal/credentials.py): the controller's."""
        return self.run_dir / "credential-key"

    def node_credential_path(self, node: str) -> Path:
        """``node``'s own credential, in its state directory only."""
        return self.node_dir(node) / "credential"

    def waypoint_credential_path(self, namespace: str, name: str) -> Path:
        """A local waypoint's own credential (caller ``waypoint-<namespace>-<name>``)."""
        return self.run_dir / "waypoints" / f"{namespace}.{name}" / "credential"

    @property
    def ca_bundle_path(self) -> Path:
        """The workload CA's root: node components verify the controller's TLS with it."""
        return self.ca_dir / "root-cert.pem"

    # -- Unix sockets
    @property
    def api_socket(self) -> Path:
        """The controller's local API (apply/get/delete/status) for the CLI."""
        return self.run_dir / "controller.sock"

    @property
    def relay_socket(self) -> Path:
        """The controller's Hubble relay, for the CLI and the hubble CLI."""
        return self.run_dir / "relay.sock"

    def zds_socket(self, node: str) -> Path:
        """Agent -> node proxy: pod netns handover (SCM_RIGHTS)."""
        return self.node_dir(node) / "zds.sock"

    def flows_dir(self, node: str) -> Path:
        """The folder of the flows socket alone: what a waypoint pod mounts (hostPath) to
        report L7 flows to its node's agent, as Cilium's Envoy mounts its access-log socket
        folder. A folder, not the socket file: a bind-mounted socket would keep pointing at
        the old one after the agent restarts and binds a new one."""
        return self.node_dir(node) / "flows"

    def flows_socket(self, node: str) -> Path:
        """Node proxy and waypoints -> agent: L4/L7 flow events."""
        return self.flows_dir(node) / "flows.sock"

    @property
    def hubble_tls_dir(self) -> Path:
        """The Hubble CA and the flow APIs' certificates (``shoal.hubbletls``)."""
        return self.run_dir / "hubble-tls"

    def enrolment_state(self, node: str) -> Path:
        """The agent's record of the pods it captures (written once a pod's capture is complete);
        the local kubelet starts a meshed pod's processes only once its netns cookie is in it."""
        return self.node_dir(node) / "agent-enrolled.json"

    def capture_audit_state(self, node: str) -> Path:
        """The agent's capture audit: last pass, drift counts and the latest drift (`shoal status`)."""
        return self.node_dir(node) / "capture-audit.json"

    def hubble_socket(self, node: str) -> Path:
        """The agent's Hubble Observer API (also on TCP 4244 in the node netns)."""
        return self.node_dir(node) / "hubble.sock"

    # -- network namespaces (names under /run/netns)
    # Dots separate the parts: cluster names and Kubernetes namespace names have none, so
    # "<cluster>.<node>" and "<cluster>.<namespace>.<pod>" never collide, and one cluster's
    # prefix never matches another's ("shoal." vs "shoal-t1.").
    @property
    def netns_prefix(self) -> str:
        return f"{self.name}."

    @property
    def control_netns(self) -> str:
        return f"{self.name}.control"

    def node_netns(self, node: str) -> str:
        return f"{self.name}.{node}"

    def pod_netns(self, namespace: str, pod: str) -> str:
        return f"{self.name}.{namespace}.{pod}"

    # -- cgroups (v2)
    @property
    def cgroup(self) -> Path:
        return self.cgroup_root / self.name

    def node_cgroup(self, node: str) -> Path:
        """Every process of a node (agent, proxy, pods) lives below this: the node's 'root'."""
        return self.cgroup / node

    def pod_cgroup(self, node: str, namespace: str, pod: str) -> Path:
        return self.node_cgroup(node) / "pods" / f"{namespace}.{pod}"

    def system_cgroup(self, node: str, component: str) -> Path:
        return self.node_cgroup(node) / "system" / component

    # -- bpffs
    def bpf_pin_dir(self, node: str) -> Path:
        return self.bpffs_root / self.name / node

    # -- names
    @staticmethod
    def node_index(node: str) -> int:
        """The N of a local cluster's node ``node-N`` (its addresses are derived from it:
        shoal/local/network.py); a ValueError or IndexError for any other name."""
        return int(node.rsplit("-", 1)[1])
