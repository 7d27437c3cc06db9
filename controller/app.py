"""Wires the controller: the mesh model and its source (embedded store or Kubernetes), the
config stream + CA (gRPC), admin (metrics/readiness/status), the Hubble relay, and in local
mode the local API for the CLI.

The local cluster's own parts (the embedded kubelet, the waypoint launcher) follow the
store, but the controller never imports them: ``shoal.local.controller`` hands them in as
``store_followers``, with the local nodes' addresses (``node_address``) its relay dials."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any, Awaitable, Callable, Sequence

from shoal.config import PORT_HUBBLE
from shoal.controller.auth import (
    Authenticator,
    NodeCredentialAuthenticator,
    TokenReviewAuthenticator,
    kubernetes_pod_lookup,
    kubernetes_token_reviewer,
)
from shoal.controller.ca import CertificateAuthority
from shoal.controller.config import ControllerConfig
from shoal.controller.controlplane import ControlPlane
from shoal.controller.identity import IdentityAllocator
from shoal.controller.metrics import ControllerMetrics
from shoal.controller.model import MeshModel
from shoal.credentials import NodeCredentials
from shoal.hubbletls import node_server_name

log = logging.getLogger(__name__)

StoreFollower = Callable[[Any], Awaitable[None]]
"""Local mode: called with the embedded ``Store`` once the control plane is up; runs until
cancelled (e.g. the kubelet, the waypoint launcher). Its failure stops the controller."""


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class LeadershipLost(RuntimeError):
    """This replica lost the Lease: it stopped issuing and must exit (to rejoin as standby)."""


class ControllerApp:
    def __init__(self, config: ControllerConfig, store_followers: Sequence[StoreFollower] = (),
                 node_address: Callable[[str], str] | None = None):
        """``node_address``: local mode, a node's address for the relay's mTLS dial to its agent
        (without it, the relay reads the agents' Unix sockets)."""
        self.config = config
        self.store_followers = tuple(store_followers)
        self.node_address = node_address
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = ControllerMetrics.create()
        self._generation_path = config.state_dir / "generation"
        # Kubernetes mode keeps the CA and identities in the API server: built in run().
        self.ca: CertificateAuthority | None = None
        self.model: MeshModel | None = None
        self.kube_state = None
        if config.source == "local":
            self.ca = CertificateAuthority.load_or_create(config.ca_dir, config.trust_domain,
                                                          default_ttl=config.cert_ttl)
            self.model = MeshModel(IdentityAllocator(config.identities_path),
                                   config.trust_domain, generation=self._saved_generation())
        self.store = None
        self.api_client = None
        if config.source == "local":
            from shoal.controller.store import Store
            self.store = Store(config.layout.store_path)
        self.control_plane: ControlPlane | None = None
        self.elector = None   # kubernetes mode with --leader-elect: controller/leader.py
        self.relay = None

    def _saved_generation(self) -> int:
        try:
            return int(self._generation_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            log.warning("ignoring unreadable %s", self._generation_path)
            return 0

    async def _save_generation(self, interval: float = 1.0) -> None:
        """Saves the config version now and then: only for display continuity (nodes resume
        by content hashes), so a crash losing the last second is harmless."""
        saved = None
        while True:
            if self.model.generation != saved:
                saved = self.model.generation
                tmp = self._generation_path.with_suffix(".tmp")
                tmp.write_text(f"{saved}\n")
                tmp.replace(self._generation_path)
            await asyncio.sleep(interval)

    async def _authenticator(self) -> Authenticator:
        if self.config.source == "local":
            return NodeCredentialAuthenticator(
                NodeCredentials.load_or_create(self.config.credential_key))
        return TokenReviewAuthenticator(
            kubernetes_token_reviewer(self.api_client, self.config.token_audiences),
            self.config.agent_service_accounts, kubernetes_pod_lookup(self.api_client),
            self.config.token_audiences)

    def _state_store(self):
        if self.kube_state is None:
            from shoal.controller.kubestate import KubernetesState
            self.kube_state = KubernetesState(self.api_client, namespace=self.config.namespace,
                                              ca_secret=self.config.ca_secret)
        return self.kube_state

    async def _kubernetes_state(self):
        """The leader's: CA from the Secret (created on first start), trust bundle
        published, identities restored from their ConfigMap; returns the identity saver for
        the control plane."""
        config = self.config
        kube_state = self._state_store()
        self.ca = await kube_state.load_ca(config.ca_dir, config.trust_domain,
                                           default_ttl=config.cert_ttl)
        await kube_state.publish_roots(self.ca.roots_pem)
        identities = IdentityAllocator(None, external=True)
        identities.restore(await kube_state.load_identities())
        self.model = MeshModel(identities, config.trust_domain, generation=self._saved_generation())
        log.info("kubernetes state: CA from Secret %s/%s, %d identities restored",
                 config.namespace, config.ca_secret, len(identities))
        return kube_state.save_identities

    async def _standby_state(self) -> None:
        """A standby's state, read only: the CA Secret once the leader has created it, and
        the leader's identity table, which it follows (``_follow_identities``) but never
        writes. Its model withholds a workload until the leader's number for it arrives."""
        config = self.config
        kube_state = self._state_store()
        while True:
            ca = await kube_state.load_ca(config.ca_dir, config.trust_domain, create=False,
                                          default_ttl=config.cert_ttl)
            if ca is not None:
                break
            log.info("standby: waiting for the leader to create Secret %s/%s",
                     config.namespace, config.ca_secret)
            await asyncio.sleep(self.elector.retry_period)
        self.ca = ca
        identities = IdentityAllocator(None, external=True, following=True)
        identities.restore(await kube_state.load_identities())
        self.model = MeshModel(identities, config.trust_domain, generation=self._saved_generation())
        log.info("standby: serving reads with %d identities of the leader", len(identities))

    async def _follow_identities(self) -> None:
        """A standby re-reads the leader's identity table every retry period."""
        from aiohttp import ClientError
        from kubernetes_asyncio.client.exceptions import ApiException
        while True:
            await asyncio.sleep(self.elector.retry_period)
            try:
                allocations = await self.kube_state.load_identities()
            except (ApiException, ClientError, OSError, asyncio.TimeoutError) as err:
                log.warning("standby: identity table not read: %s", err)
                continue
            self.control_plane.learn_identities(allocations)

    async def _take_over(self) -> None:
        """The standby now holds the Lease: it allocates from the latest saved table on
        and publishes what it withheld; the config streams it serves stay connected."""
        kube_state = self.kube_state
        allocations = await kube_state.load_identities()
        change = await self.control_plane.lead(allocations, kube_state.save_identities)
        await kube_state.publish_roots(self.ca.roots_pem)
        log.info("took over as leader %s: %d identities, %d withheld resources published",
                 self.config.identity, len(self.model.identities), len(change.keys))

    def _not_issuing(self) -> str | None:
        """Why this replica may not sign now (see ``CertificateService``), or None."""
        elector = self.elector
        if elector is None:
            return None
        lease = f"Lease {self.config.namespace}/{self.config.lease_name}"
        if not elector.leading:
            return (f"replica {elector.identity} is a standby: certificates are issued only by the "
                    f"leader {elector.holder or '(none yet)'} of {lease}; retry on another replica")
        stale = time.monotonic() - elector.last_renewed
        if stale >= elector.renew_deadline:
            return (f"replica {elector.identity} has not renewed {lease} for {stale:.1f} s: "
                    "it issues nothing until it leads again")
        return None

    def _admin_status(self) -> dict[str, Any]:
        status = self.control_plane.status()
        if self.elector is not None:
            status.update(role="leader" if self.elector.leading else "standby",
                          identity=self.elector.identity, leader=self.elector.holder)
        return status

    async def _kubernetes_client(self):
        from kubernetes_asyncio import client
        from kubernetes_asyncio import config as kube_config
        if self.config.kubeconfig:
            await kube_config.load_kube_config(config_file=self.config.kubeconfig)
        else:
            kube_config.load_incluster_config()
        return client.ApiClient()

    async def _elect(self, stop: asyncio.Event) -> asyncio.Future | None:
        """Competes for the Lease while loading the standby's read-only state; returns the
        acquisition (done: this replica leads and loads the leader's state; pending: it
        stands by, serving reads), or None when told to stop first."""
        from shoal.controller.leader import LeaseElector

        config = self.config
        self.elector = LeaseElector(self.api_client, config.namespace, config.lease_name,
                                    config.identity)
        log.info("candidate %s for Lease %s/%s", config.identity, config.namespace,
                 config.lease_name)
        acquired = asyncio.ensure_future(self.elector.acquire())
        stopped = asyncio.ensure_future(stop.wait())
        reads = asyncio.ensure_future(self._standby_state())
        try:
            await asyncio.wait({acquired, stopped, reads}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if stop.is_set() or not acquired.done():
            reads_done = reads.done()
            if stop.is_set() or not reads_done:
                for task in (acquired, reads):
                    task.cancel()
                await asyncio.gather(acquired, reads, return_exceptions=True)
                return None
            reads.result()   # a corrupt CA Secret stops a standby too
            return acquired
        reads.cancel()
        await asyncio.gather(reads, return_exceptions=True)
        acquired.result()
        return acquired

    def controller_status(self) -> dict[str, Any]:
        """The view behind ``shoal status``: connected agents and each node's config version."""
        status = self.control_plane.status() if self.control_plane else {"ready": False, "agents": []}
        if self.store is not None:
            status["resourceVersion"] = str(self.store.resource_version)
        return status

    async def run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        persist = None
        acquired = None
        if self.config.source == "kubernetes":
            self.api_client = await self._kubernetes_client()
            if self.config.leader_elect:
                acquired = await self._elect(stop)
                if acquired is None:
                    await self.api_client.close()
                    return
            if acquired is None or acquired.done():
                persist = await self._kubernetes_state()
        standing_by = acquired is not None and not acquired.done()
        self.control_plane = ControlPlane(self.model, self.ca, await self._authenticator(),
                                          self.metrics, persist_identities=persist,
                                          not_issuing=self._not_issuing)
        await self.control_plane.start(
            self.config.grpc_address,
            tls_names=self.config.certificate_names() if self.config.tls else None)
        await self.control_plane.start_admin(*_host_port(self.config.admin_address),
                                             status=self._admin_status)
        tasks = [asyncio.create_task(self._save_generation())]
        runner = None
        if self.store is not None:
            from shoal.controller.localapi import build_app, serve_unix
            from shoal.controller.sources.local import LocalSource
            from shoal.controller.store import poll_forever
            tasks.extend(asyncio.create_task(follow(self.store)) for follow in self.store_followers)
            tasks.append(asyncio.create_task(LocalSource(self.store, self.control_plane).run()))
            # The kubelet may be another process (the controller in a container): its writes too.
            tasks.append(asyncio.create_task(poll_forever(self.store)))
            bad_requests = self.metrics.bad_requests
            runner = await serve_unix(
                build_app(self.store, self.controller_status,
                          on_error=lambda reason: bad_requests.labels(f"local-api:{reason}").inc(),
                          protected_host_paths=(self.config.layout.run_root,)),
                self.config.layout.api_socket)
        else:
            from shoal.controller.sources.kubernetes import KubernetesSource
            tasks.append(asyncio.create_task(
                KubernetesSource(self.api_client, self.control_plane).run()))
        await self._start_relay()
        log.info("controller up: config stream + CA on %s, admin on %s, source %s",
                 self.config.grpc_address, self.config.admin_address, self.config.source)
        leadership = None
        if self.elector is not None and not standing_by:
            leadership = asyncio.create_task(self.elector.keep())
            tasks.append(leadership)
        follow = asyncio.create_task(self._follow_identities()) if standing_by else None
        if follow is not None:
            tasks.append(follow)
        done = asyncio.ensure_future(stop.wait())
        while True:
            await asyncio.wait([done, *tasks, *([acquired] if standing_by else [])],
                               return_when=asyncio.FIRST_COMPLETED)
            if not (standing_by and acquired.done() and not done.done()
                    and not any(task.done() for task in tasks)):
                break
            standing_by = False
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
            tasks.remove(follow)
            await self._take_over()
            leadership = asyncio.create_task(self.elector.keep())
            tasks.append(leadership)
        if acquired is not None and not acquired.done():
            acquired.cancel()
            await asyncio.gather(acquired, return_exceptions=True)
        lost = leadership is not None and leadership.done()
        if lost:   # stop issuing first: another replica may lead once the Lease expires
            await self.control_plane.stop(grace=0)
        for task in tasks:
            if task.done() and task.exception() is not None:
                log.error("controller task failed", exc_info=task.exception())
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.relay is not None:
            await self.relay.stop()
        await self.control_plane.stop()
        self._generation_path.write_text(f"{self.model.generation}\n")
        if runner is not None:
            await runner.cleanup()
        if self.elector is not None and not lost:
            await self.elector.release()
        if self.api_client is not None:
            await self.api_client.close()
        if self.store is not None:
            self.store.close()
        if lost:
            raise LeadershipLost(f"lost the Lease {self.config.namespace}/{self.config.lease_name}: "
                                 "stopped issuing; exiting so that this replica restarts as a standby")

    async def _start_relay(self) -> None:
        """The Hubble relay (the observability engineer's) merging every node's flows."""
        if not self.config.relay_address:
            return
        try:
            from shoal.controller.relay import NodeTarget, Relay
        except ImportError as err:
            log.warning("Hubble relay not available: %s", err)
            return
        if self.config.source == "local":
            self.relay = Relay.from_layout(self.config.layout, node_address=self.node_address,
                                           tcp_address=self.config.relay_address,
                                           registry=self.metrics.registry)
        else:
            distributor = self.control_plane.distributor

            def nodes() -> list[NodeTarget]:
                # Nodes are found through their agents' config streams.
                return [NodeTarget(node, f"[{host}]:{PORT_HUBBLE}" if ":" in host
                                   else f"{host}:{PORT_HUBBLE}", node_server_name(node, self.config.layout.name))
                        for node, host in sorted(distributor.agent_hosts().items())]
            # The Hubble CA's certificates, from a Secret mounted at SHOAL_HUBBLE_TLS_DIR.
            from shoal.hubbletls import RELAY_CLIENT, RELAY_SERVER, HubbleCertificates
            certificates = HubbleCertificates(os.environ.get("SHOAL_HUBBLE_TLS_DIR",
                                                             "/var/run/secrets/shoal/hubble-tls"))
            server, client = certificates.files(RELAY_SERVER), certificates.files(RELAY_CLIENT)
            self.relay = Relay(nodes, tcp_address=self.config.relay_address, registry=self.metrics.registry,
                               tls=server if server.exists() else None,
                               client_tls=client if client.exists() else None)
        try:
            await self.relay.start()
        except (OSError, RuntimeError) as err:
            log.error("Hubble relay failed to start: %s", err)
            self.relay = None
