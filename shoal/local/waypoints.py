"""Runs waypoints on demand: one Deployment per waypoint Gateway.

A Gateway with ``gatewayClassName: shoal-waypoint`` asks for a waypoint in its
namespace. In the local cluster the controller's store has a Deployment controller,
a scheduler and a kubelet that runs pods as processes in their own network namespace
and cgroup; the launcher only has to keep one Deployment per such Gateway, whose pod
runs ``python -m shoal.waypoint``. (In Kubernetes the same Deployment comes from the
waypoint template in ``daemonset/``.)

``desired_deployments`` is pure (Gateways in, Deployments out); ``LocalWaypointLauncher``
applies the difference to the store whenever a Gateway changes.

With ``shoal up --containers`` the Deployment is instead the rendered waypoint template
(``shoal install --render``'s ConfigMap ``shoal-waypoint-template``, filled in as the
controller fills it on Kubernetes): its image, user, capabilities, read-only root, env and
mounts unchanged; only the two volumes the kubelet would project (the ServiceAccount token and
the CA ConfigMap) become host folders, staged here. The kubelet runs that pod as a podman
container (``nodepods.PodContainers``).

Changes lose no request: the pod's readiness probe (``/healthz/ready``: listening, SVID
and first config in hand) is what the controller waits for before it routes to the
waypoint; when a Gateway goes, the controller moves the routes away at once and the
Deployment is removed only ``drain_seconds`` later, so connections that were already on
their way finish (the waypoint drains again on SIGTERM).
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from shoal.config import ENV_CLUSTER, LABEL_MESH, PORT_HBONE, WAYPOINT_GATEWAY_CLASS, ClusterLayout
from shoal.local import network

PORT_READY = 15021

log = logging.getLogger(__name__)

Obj = dict[str, Any]
LABEL_GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"   # the controller finds waypoint pods by it
LABEL_MANAGED_BY = "shoal.io/managed-by"
MANAGER = "waypoint-launcher"
ANNOTATION_SERVICE_ACCOUNT = "shoal.io/service-account"
# Where a waypoint pod sees its node's flows folder (a hostPath volume: pods do not see the
# run dir), as the waypoint template mounts /var/run/shoal/flows on Kubernetes. Under /run:
# the sandbox's root filesystem is read-only, /run is its tmpfs.
POD_FLOWS_DIR = "/run/shoal-node/flows"


def is_waypoint(gateway: Obj) -> bool:
    return (gateway.get("spec") or {}).get("gatewayClassName") == WAYPOINT_GATEWAY_CLASS


def service_account_of(gateway: Obj) -> str:
    meta = gateway.get("metadata") or {}
    return (meta.get("annotations") or {}).get(ANNOTATION_SERVICE_ACCOUNT) or meta["name"]


def deployment_for(gateway: Obj, layout: ClusterLayout, python: str = sys.executable,
                   extra_env: Iterable[tuple[str, str]] = ()) -> Obj:
    """The Deployment running one waypoint for ``gateway`` (one replica)."""
    meta = gateway["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    sa = service_account_of(gateway)
    labels = {LABEL_GATEWAY_NAME: name, LABEL_MANAGED_BY: MANAGER, "app": name,
              # The waypoint terminates HBONE itself: the node proxy must not capture it.
              LABEL_MESH: "disabled"}
    env = [{"name": ENV_CLUSTER, "value": layout.name},
           {"name": "SHOAL_CONTROLLER", "value": network.CONTROLLER_ADDRESS},
           {"name": "SHOAL_TOKEN_FILE", "value": str(layout.waypoint_credential_path(namespace, name))},
           {"name": "SHOAL_CA_BUNDLE", "value": str(layout.ca_bundle_path)},
           {"name": "SHOAL_FLOWS_SOCKET", "value": f"{POD_FLOWS_DIR}/{layout.flows_socket('node').name}"},
           *({"name": k, "value": v} for k, v in extra_env)]
    # Pods are sandboxed (shoal/local/sandbox.py): the waypoint gets exactly the three host files it
    # needs, read-only, and runs as uid 0 without capabilities to read its root-only credential.
    credential = str(layout.waypoint_credential_path(namespace, name))
    volumes = [{"name": "credential", "hostPath": {"path": credential}},
               {"name": "ca-bundle", "hostPath": {"path": str(layout.ca_bundle_path)}},
               {"name": "node-run", "hostPath": {"path": str(layout.run_dir)}}]
    mounts = [{"name": "credential", "mountPath": credential, "readOnly": True},
              {"name": "ca-bundle", "mountPath": str(layout.ca_bundle_path), "readOnly": True},
              {"name": "node-run", "mountPath": POD_FLOWS_DIR, "readOnly": True,
               "subPathExpr": f"$(NODE_NAME)/{layout.flows_dir('node').relative_to(layout.node_dir('node'))}"}]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_GATEWAY_NAME: name, LABEL_MANAGED_BY: MANAGER}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {LABEL_GATEWAY_NAME: name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": sa,
                    "volumes": volumes,
                    "containers": [{
                        "name": "waypoint",
                        "command": [python, "-m", "shoal.waypoint"],
                        "args": ["--name", name, "--namespace", namespace, "--service-account", sa],
                        "env": env,
                        "volumeMounts": mounts,
                        "securityContext": {"runAsUser": 0},
                        "ports": [{"name": "hbone", "containerPort": PORT_HBONE}],
                        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": PORT_READY},
                                           "periodSeconds": 1, "timeoutSeconds": 1},
                    }],
                },
            },
        },
    }


def template_path(layout: ClusterLayout) -> Path:
    """Where ``shoal up --containers`` leaves the rendered waypoint template for the launcher."""
    return layout.run_dir / "waypoint-template.yaml"


def volume_dir(layout: ClusterLayout, namespace: str, name: str) -> Path:
    """The folder standing in for one waypoint's projected token volume (``shoal-token``)."""
    return layout.run_dir / "volumes" / "waypoints" / f"{namespace}.{name}"


def ca_volume_dir(layout: ClusterLayout) -> Path:
    """The folder standing in for the ``shoal-ca-root`` ConfigMap (the root only; nodepods stages it)."""
    return layout.run_dir / "volumes" / "ca"


def container_deployment_for(gateway: Obj, layout: ClusterLayout, template: str) -> Obj:
    """The rendered template's Deployment for ``gateway``, with the kubelet's two projected
    volumes as host folders: nothing else of it changes (ManifestError if it cannot)."""
    from shoal.controller.manifests import ManifestError
    from shoal.waypointtemplate import WaypointTemplateError, instantiate

    meta = gateway["metadata"]
    try:
        deployment = next(d for d in instantiate(template, gateway) if d.get("kind") == "Deployment")
    except (WaypointTemplateError, StopIteration) as err:
        raise ManifestError([f"waypoint template for {meta['namespace']}/{meta['name']}: {str(err) or 'it makes no Deployment'}"]) from None
    deployment["metadata"].pop("ownerReferences", None)   # the launcher removes it with its Gateway
    deployment["metadata"].setdefault("labels", {})[LABEL_MANAGED_BY] = MANAGER
    local = {"shoal-token": str(volume_dir(layout, meta["namespace"], meta["name"])),
             "shoal-ca": str(ca_volume_dir(layout))}
    spec = deployment["spec"]["template"]["spec"]
    for i, volume in enumerate(spec.get("volumes", [])):
        if volume["name"] in local:
            spec["volumes"][i] = {"name": volume["name"], "hostPath": {"path": local[volume["name"]]}}
    return deployment


def desired_deployments(gateways: Iterable[Obj], layout: ClusterLayout, python: str = sys.executable,
                        template: str | None = None) -> dict[tuple[str, str], Obj]:
    """One Deployment per waypoint Gateway: a pod process, or with ``template`` (the rendered
    waypoint template, ``--containers``) the template's container."""
    return {(g["metadata"]["namespace"], g["metadata"]["name"]):
            container_deployment_for(g, layout, template) if template is not None else deployment_for(g, layout, python)
            for g in gateways if is_waypoint(g)}


def _managed(deployment: Obj) -> bool:
    return ((deployment.get("metadata") or {}).get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGER


def plan(gateways: Iterable[Obj], deployments: Iterable[Obj], layout: ClusterLayout,
         python: str = sys.executable, template: str | None = None) -> tuple[list[Obj], list[Obj]]:
    """(Deployments to apply, Deployments to delete) to match the waypoint Gateways."""
    desired = desired_deployments(gateways, layout, python, template)
    current = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in deployments if _managed(d)}
    to_apply = [d for key, d in desired.items()
                if key not in current or current[key].get("spec") != d["spec"]]
    to_delete = [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": k[1], "namespace": k[0]}}
                 for k in current if k not in desired]
    return to_apply, to_delete


class LocalWaypointLauncher:
    """Keeps the local store's waypoint Deployments in step with its Gateways.

    Wiring (``shoal.local.controller`` hands ``run`` to the controller as a store follower)::

        launcher = LocalWaypointLauncher(store, layout)
        launcher.attach()       # reconciles now and after every Gateway/Deployment change
    """

    def __init__(self, store, layout: ClusterLayout, python: str = sys.executable,
                 on_error: Callable[[str], None] = lambda reason: None, drain_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, template: str | None = None) -> None:
        """``template``: the rendered waypoint template (``--containers``), else pod processes."""
        self.store = store
        self.template = template
        self.layout = layout
        self.python = python
        self.on_error = on_error
        self.drain_seconds = drain_seconds
        self._clock = clock
        self._gone_since: dict[tuple[str, str], float] = {}   # Deployments whose Gateway went
        self._scheduled = False

    def attach(self) -> None:
        self.store.watch(self._on_events)
        self.reconcile()

    def _issue_credentials(self, deployments: list[Obj]) -> None:
        """Each waypoint gets its own credential, naming it ``waypoint-<ns>-<name>``: with
        it the controller gives the waypoint its config and its Gateway's identity only."""
        from shoal.credentials import NodeCredentials

        credentials = NodeCredentials.load_or_create(self.layout.credential_key_path)
        for deployment in deployments:
            namespace, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
            if self.template is None:
                credentials.issue_file(f"waypoint-{namespace}-{name}",
                                       self.layout.waypoint_credential_path(namespace, name))
                continue
            # The projected token's place, owned by the pod's user as the kubelet makes it.
            security = deployment["spec"]["template"]["spec"].get("securityContext") or {}
            folder = volume_dir(self.layout, namespace, name)
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            token = credentials.issue_file(f"waypoint-{namespace}-{name}", folder / "shoal-token")
            for path in (folder, token):
                os.chown(path, security.get("runAsUser", 0), security.get("runAsGroup", 0))

    async def run(self) -> None:
        """Attaches, then follows the store (through its watch) until cancelled."""
        self.attach()
        await asyncio.Event().wait()

    def _on_events(self, events) -> None:
        if not any(ev.object.get("kind") in ("Gateway", "Deployment", "HTTPRoute", "GRPCRoute", "Service", "Pod")
                   for ev in events):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.reconcile()
            return
        # Not from inside the store's commit: on the next loop turn, once.
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._reconcile_scheduled)

    def _reconcile_scheduled(self) -> None:
        self._scheduled = False
        self.reconcile()

    def reconcile(self) -> None:
        from shoal.controller.manifests import ManifestError

        self.update_route_status()
        self.update_gateway_status()
        try:
            to_apply, to_delete = plan(self.store.list("Gateway"), self.store.list("Deployment"), self.layout,
                                       self.python, self.template)
        except ManifestError as err:
            self.on_error("waypoint_template")
            log.error("waypoints not reconciled: %s", err)
            return
        if to_apply:
            self._issue_credentials(to_apply)
        for deployment in to_apply:
            try:
                self.store.apply([deployment])
                log.info("waypoint %s/%s: deployment applied", deployment["metadata"]["namespace"],
                         deployment["metadata"]["name"])
            except ManifestError as err:
                self.on_error("waypoint_deployment")
                log.warning("waypoint deployment %s refused: %s", deployment["metadata"]["name"], err)
        for deployment in self._drained(to_delete):
            try:
                self.store.delete([deployment])
                log.info("waypoint %s/%s: deployment removed", deployment["metadata"]["namespace"],
                         deployment["metadata"]["name"])
            except ManifestError as err:
                self.on_error("waypoint_deployment")
                log.warning("waypoint deployment %s not removed: %s", deployment["metadata"]["name"], err)

    def update_route_status(self) -> None:
        """Writes each HTTPRoute's and GRPCRoute's status (Accepted, ResolvedRefs), as Gateway
        API's route controller does; unchanged statuses are not rewritten."""
        from shoal.waypoint.model import ROUTE_KINDS, httproute_status

        services = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in self.store.list("Service")}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for kind in ROUTE_KINDS:
            for route in self.store.list(kind):
                meta = route["metadata"]
                previous = route.get("status") or {}
                status = httproute_status(route, lambda ns, name: (ns, name) in services, previous, now)
                if status["parents"] != previous.get("parents"):
                    self.store.update_status(kind, meta["namespace"], meta["name"], status)

    def update_gateway_status(self) -> None:
        """Each waypoint Gateway's ``Programmed`` condition: True once a waypoint pod is Ready
        (what the controller waits for before it routes to the waypoint)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pods = self.store.list("Pod")
        for gateway in self.store.list("Gateway"):
            if not is_waypoint(gateway):
                continue
            meta = gateway["metadata"]
            ready = any(p["metadata"]["namespace"] == meta["namespace"]
                        and (p["metadata"].get("labels") or {}).get(LABEL_GATEWAY_NAME) == meta["name"]
                        and any(c.get("type") == "Ready" and c.get("status") == "True"
                                for c in (p.get("status") or {}).get("conditions") or [])
                        for p in pods)
            wanted = {"Accepted": ("True", "Accepted", "a waypoint of class shoal-waypoint"),
                      "Programmed": ("True", "Programmed", "the waypoint is ready") if ready
                      else ("False", "Pending", "waiting for the waypoint pod to be ready")}
            old = {c.get("type"): c for c in (gateway.get("status") or {}).get("conditions") or []}
            if all((old.get(k) or {}).get("status") == v[0] and (old.get(k) or {}).get("reason") == v[1]
                   for k, v in wanted.items()):
                continue
            conditions = [{"type": k, "status": v[0], "reason": v[1], "message": v[2],
                           "observedGeneration": meta.get("generation", 1), "lastTransitionTime": now}
                          for k, v in wanted.items()]
            self.store.update_status("Gateway", meta["namespace"], meta["name"], {"conditions": conditions})

    def _drained(self, to_delete: list[Obj]) -> list[Obj]:
        """The Deployments whose Gateway has been gone for ``drain_seconds``; a later
        reconcile is scheduled for the others."""
        now = self._clock()
        keys = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in to_delete}
        self._gone_since = {key: self._gone_since.get(key, now) for key in keys}
        ready = [d for key, d in keys.items() if now - self._gone_since[key] >= self.drain_seconds]
        waiting = [self._gone_since[key] + self.drain_seconds - now for key in keys
                   if now - self._gone_since[key] < self.drain_seconds]
        if waiting:
            try:
                asyncio.get_running_loop().call_later(min(waiting), self.reconcile)
            except RuntimeError:
                pass   # no loop (tests calling reconcile directly): the next call finishes it
        return ready
