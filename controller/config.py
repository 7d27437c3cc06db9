"""The controller's configuration: one frozen dataclass, read from flags and environment here."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from shoal.config import (
    DEFAULT_TRUST_DOMAIN,
    LOCAL_CONTROLLER_IP,
    PORT_CONTROLLER_GRPC,
    PORT_CONTROLLER_METRICS,
    PORT_HUBBLE_RELAY,
    ClusterLayout,
    cluster_name,
)


@dataclass(frozen=True)
class ControllerConfig:
    layout: ClusterLayout
    source: str = "local"                      # local | kubernetes
    grpc_address: str = f"0.0.0.0:{PORT_CONTROLLER_GRPC}"
    admin_address: str = f"0.0.0.0:{PORT_CONTROLLER_METRICS}"   # /metrics /ready /status
    relay_address: str = f"0.0.0.0:{PORT_HUBBLE_RELAY}"         # "" disables the relay
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cert_ttl: dt.timedelta = dt.timedelta(hours=24)
    state_dir_override: Path | None = None     # identities (and the CA unless --ca-dir)
    ca_dir_override: Path | None = None        # Istio "cacerts" layout; a mounted Secret in k8s
    credential_key_override: Path | None = None   # local mode: key of the per-node credentials
    kubeconfig: str | None = None              # kubernetes mode; None: in-cluster config
    agent_service_accounts: tuple[str, ...] = field(
        default=("shoal-system/shoal-agent",))  # kubernetes mode: who may connect
    token_audiences: tuple[str, ...] = ("shoal",)   # kubernetes mode: the tokens' audience
    namespace: str = "shoal-system"            # kubernetes mode: where its own state lives
    ca_secret: str = "shoal-ca"                # kubernetes mode: the CA Secret (cacerts keys)
    tls: bool = False                          # serve the config stream + CA over TLS
    tls_names: tuple[str, ...] = ()            # extra DNS names / IPs for its certificate
    leader_elect: bool = True                  # kubernetes mode: Lease election among replicas
    lease_name: str = "shoal-controller"
    identity: str = ""                         # kubernetes mode: this replica (POD_NAME)
    run_kubelet: bool = True                   # local mode: run pods for the store's Pods
    log_level: str = "INFO"

    @property
    def state_dir(self) -> Path:
        return self.state_dir_override or self.layout.run_dir

    @property
    def ca_dir(self) -> Path:
        return self.ca_dir_override or (self.state_dir / "ca" if self.state_dir_override
                                        else self.layout.ca_dir)

    @property
    def identities_path(self) -> Path:
        return self.state_dir / "identities"

    @property
    def credential_key(self) -> Path:
        return self.credential_key_override or self.layout.credential_key_path

    def certificate_names(self) -> list[str]:
        """Names the controller's TLS certificate carries: its listen host, loopback, the
        local cluster's address and the in-cluster Service names, plus --tls-name."""
        host = self.grpc_address.rpartition(":")[0].strip("[]")
        names = ["localhost", "127.0.0.1", LOCAL_CONTROLLER_IP,
                 "shoal-controller", "shoal-controller.shoal-system",
                 "shoal-controller.shoal-system.svc",
                 f"shoal-controller.shoal-system.svc.{self.trust_domain}",
                 # the headless Service nodes balance over (every replica, round-robin)
                 "shoal-controller-replicas.shoal-system.svc",
                 f"shoal-controller-replicas.shoal-system.svc.{self.trust_domain}"]
        if host and host not in ("0.0.0.0", "::"):
            names.insert(0, host)
        names += list(self.tls_names)
        return list(dict.fromkeys(names))

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> "ControllerConfig":
        """Built once, here, from flags and the environment (flags win)."""
        env = os.environ if env is None else env
        parser = argparse.ArgumentParser(prog="python -m shoal.controller", description="Shoal controller")
        parser.add_argument("--cluster", default=cluster_name(env))
        parser.add_argument("--source", choices=("local", "kubernetes"), default=env.get("SHOAL_SOURCE", "local"))
        parser.add_argument("--grpc-address", default=env.get("SHOAL_GRPC_ADDRESS",
                                                          f"0.0.0.0:{PORT_CONTROLLER_GRPC}"))
        parser.add_argument("--admin-address", default=env.get("SHOAL_ADMIN_ADDRESS",
                                                           f"0.0.0.0:{PORT_CONTROLLER_METRICS}"),
                            help="/metrics, /ready and /status over HTTP")
        parser.add_argument("--relay-address", default=env.get("SHOAL_RELAY_ADDRESS",
                                                           f"0.0.0.0:{PORT_HUBBLE_RELAY}"),
                            help="Hubble relay TCP address ('' to disable)")
        parser.add_argument("--trust-domain", default=env.get("SHOAL_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN))
        parser.add_argument("--cert-ttl", type=_duration, default=_duration(env.get("SHOAL_CERT_TTL", "24h")),
                            help="workload certificate lifetime (default 24h)")
        parser.add_argument("--state-dir", type=Path, default=env.get("SHOAL_STATE_DIR"),
                            help="identities and CA (default: the cluster's run dir)")
        parser.add_argument("--ca-dir", type=Path, default=env.get("SHOAL_CA_DIR"),
                            help="CA files in Istio's cacerts layout (ca-cert.pem, ca-key.pem, "
                                 "cert-chain.pem, root-cert.pem); generated when empty")
        parser.add_argument("--credential-key", type=Path, default=env.get("SHOAL_CREDENTIAL_KEY"),
                            help="local mode: the key that signs per-node credentials (created "
                                 "when missing; shoal up issues each node its own credential)")
        parser.add_argument("--token-audience", action="append", dest="token_audiences",
                            help="kubernetes mode: audience the nodes' ServiceAccount tokens must "
                                 "carry (repeatable; default shoal)")
        parser.add_argument("--kubeconfig", default=env.get("KUBECONFIG"),
                            help="kubernetes mode: kubeconfig (default: in-cluster)")
        parser.add_argument("--agent-service-account", action="append", dest="agent_accounts",
                            help="kubernetes mode: <namespace>/<name> allowed to connect as a node "
                                 "(repeatable; default shoal-system/shoal-agent)")
        parser.add_argument("--tls", action=argparse.BooleanOptionalAction,
                            default=env.get("SHOAL_CONTROLLER_TLS", "") in ("1", "true", "yes"),
                            help="serve the config stream and CA over TLS (certificate from the "
                                 "workload CA; nodes verify it with root-cert.pem = SHOAL_CA_BUNDLE)")
        parser.add_argument("--tls-name", action="append", dest="tls_names", default=[],
                            help="extra DNS name or IP for the controller's certificate (repeatable)")
        parser.add_argument("--namespace", default=env.get("SHOAL_NAMESPACE", "shoal-system"),
                            help="kubernetes mode: namespace of the CA Secret and the identity "
                                 "and trust-bundle ConfigMaps")
        parser.add_argument("--ca-secret", default=env.get("SHOAL_CA_SECRET", "shoal-ca"),
                            help="kubernetes mode: the CA Secret (ca-cert.pem, ca-key.pem, "
                                 "cert-chain.pem, root-cert.pem); created with a new root if absent")
        parser.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                            help="kubernetes mode: run as one of several replicas; the holder of "
                                 "the coordination.k8s.io Lease leads, the others stand by")
        parser.add_argument("--lease-name", default=env.get("SHOAL_LEASE_NAME", "shoal-controller"))
        parser.add_argument("--identity", default=env.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
                            help="kubernetes mode: this replica's name in the Lease (default $POD_NAME)")
        parser.add_argument("--no-kubelet", action="store_true", help="do not run the local cluster's pods")
        parser.add_argument("--log-level", default=env.get("SHOAL_LOG_LEVEL", "INFO"))
        args = parser.parse_args(argv)
        return cls(
            layout=ClusterLayout(name=args.cluster), source=args.source,
            grpc_address=args.grpc_address, admin_address=args.admin_address,
            relay_address=args.relay_address, trust_domain=args.trust_domain, cert_ttl=args.cert_ttl,
            state_dir_override=args.state_dir, ca_dir_override=args.ca_dir,
            credential_key_override=args.credential_key, kubeconfig=args.kubeconfig,
            agent_service_accounts=tuple(args.agent_accounts or ("shoal-system/shoal-agent",)),
            token_audiences=tuple(args.token_audiences or ("shoal",)),
            tls=args.tls, tls_names=tuple(args.tls_names), namespace=args.namespace,
            ca_secret=args.ca_secret, leader_elect=args.leader_elect, lease_name=args.lease_name,
            identity=args.identity,
            run_kubelet=args.source == "local" and not args.no_kubelet, log_level=args.log_level)

def _duration(text: str) -> dt.timedelta:
    """``24h``, ``90m``, ``3600s`` or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 24h, 90m, 3600)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return dt.timedelta(seconds=value)
