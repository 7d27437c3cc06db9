"""``shoal waypoint apply|list|delete``: the shortcut for waypoint Gateways.

Talks to the controller's local API (``ClusterLayout.api_socket``). ``apply`` creates
``Gateway`` ``waypoint`` (``gatewayClassName: shoal-waypoint``) in a namespace and, with
``--enroll-namespace``, labels the namespace ``shoal.io/use-waypoint=<name>``.
"""
from __future__ import annotations

import json
import re
import sys
import time

import click

from shoal.config import LABEL_USE_WAYPOINT, LABEL_USE_WAYPOINT_ISTIO, PORT_HBONE, WAYPOINT_GATEWAY_CLASS, ClusterLayout
from shoal.local.waypoints import LABEL_GATEWAY_NAME

NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def gateway(name: str, namespace: str, service_account: str | None = None) -> dict:
    meta = {"name": name, "namespace": namespace}
    if service_account:
        meta["annotations"] = {"shoal.io/service-account": service_account}
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta,
            "spec": {"gatewayClassName": WAYPOINT_GATEWAY_CLASS,
                     "listeners": [{"name": "mesh", "port": PORT_HBONE, "protocol": "HBONE"}]}}


def _client():
    from shoal.local.apiclient import ApiClient

    # `shoal --cluster NAME waypoint ...` puts the layout in the click context.
    context = click.get_current_context(silent=True)
    layout = context.find_object(ClusterLayout) if context is not None else None
    return ApiClient((layout or ClusterLayout.from_env()).api_socket)


def _check_name(value: str, what: str) -> str:
    if not NAME.match(value):
        raise click.BadParameter(f"{value!r} is not a valid {what} (lower-case DNS label)")
    return value


def _call(fn, *args):
    from shoal.local.apiclient import ApiError, ControllerUnavailable

    try:
        return fn(*args)
    except ControllerUnavailable as err:
        raise click.ClickException(str(err)) from None
    except ApiError as err:
        raise click.ClickException("; ".join(err.errors)) from None


@click.group("waypoint")
def waypoint() -> None:
    """Manage waypoints (L7 proxies) of the mesh."""


@waypoint.command("apply")
@click.option("-n", "--namespace", required=True, help="namespace of the waypoint")
@click.option("--name", default="waypoint", show_default=True, help="Gateway name")
@click.option("--service-account", default=None, help="identity of the waypoint (default: its name)")
@click.option("--enroll-namespace", is_flag=True, help=f"label the namespace {LABEL_USE_WAYPOINT}=<name>")
@click.option("--wait", "wait_seconds", type=float, default=0, metavar="SECONDS",
              help="wait until the waypoint is ready (Gateway Programmed), at most SECONDS")
def apply_cmd(namespace: str, name: str, service_account: str | None, enroll_namespace: bool,
              wait_seconds: float) -> None:
    """Create (or update) a waypoint in NAMESPACE.

    Traffic moves to the waypoint only once it is ready (until then it keeps its L4 path):
    --wait returns when that happened."""
    _check_name(namespace, "namespace")
    _check_name(name, "waypoint name")
    objects = [gateway(name, namespace, service_account)]
    if enroll_namespace:
        found = [ns for ns in _call(_client().list, "Namespace") if ns["metadata"]["name"] == namespace]
        if not found:
            raise click.ClickException(f"namespace {namespace!r} not found")
        ns = {k: v for k, v in found[0].items() if k != "status"}
        ns["metadata"] = {k: v for k, v in ns["metadata"].items() if k in ("name", "labels", "annotations")}
        ns["metadata"].setdefault("labels", {})[LABEL_USE_WAYPOINT] = name
        objects.append(ns)
    _call(_client().apply, objects)
    click.echo(f"waypoint {namespace}/{name} applied" + (f"; namespace {namespace} enrolled" if enroll_namespace else ""))
    if wait_seconds > 0:
        deadline = time.monotonic() + wait_seconds
        while not programmed(_gateway_of(namespace, name)):
            if time.monotonic() > deadline:
                raise click.ClickException(f"waypoint {namespace}/{name} not ready after {wait_seconds:g} s")
            time.sleep(0.25)
        click.echo(f"waypoint {namespace}/{name} ready: traffic goes through it")


def _gateway_of(namespace: str, name: str) -> dict | None:
    return next((g for g in _call(_client().list, "Gateway", namespace) if g["metadata"]["name"] == name), None)


def programmed(gateway: dict | None) -> bool:
    """The Gateway's Programmed condition (the launcher sets it once the waypoint is ready)."""
    return any(c.get("type") == "Programmed" and c.get("status") == "True"
               for c in ((gateway or {}).get("status") or {}).get("conditions") or [])


@waypoint.command("list")
@click.option("-n", "--namespace", default=None, help="only this namespace")
@click.option("-A", "--all-namespaces", is_flag=True, help="every namespace (the default without -n)")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def list_cmd(namespace: str | None, all_namespaces: bool, output: str) -> None:
    """List waypoints and who uses them."""
    client = _client()
    ns_filter = None if all_namespaces else namespace
    gateways = [g for g in _call(client.list, "Gateway", ns_filter)
                if (g.get("spec") or {}).get("gatewayClassName") == WAYPOINT_GATEWAY_CLASS]
    namespaces = _call(client.list, "Namespace")
    services = _call(client.list, "Service", ns_filter)
    pods = _call(client.list, "Pod", ns_filter)
    rows = []
    for g in gateways:
        name, ns = g["metadata"]["name"], g["metadata"]["namespace"]

        def uses(obj: dict, name: str = name) -> bool:
            return _uses(obj, name)

        pod = next((p for p in pods if p["metadata"]["namespace"] == ns
                    and (p["metadata"].get("labels") or {}).get(LABEL_GATEWAY_NAME) == name), None)
        rows.append({
            "namespace": ns, "name": name,
            "address": ((pod or {}).get("status") or {}).get("podIP", ""),
            "status": ((pod or {}).get("status") or {}).get("phase", "Pending"),
            "ready": programmed(g),
            "enrolled_namespace": any(n["metadata"]["name"] == ns and uses(n) for n in namespaces),
            "services": sorted(s["metadata"]["name"] for s in services if s["metadata"]["namespace"] == ns and uses(s)),
        })
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no waypoints", err=True)
        return
    header = f"{'NAMESPACE':<16}{'NAME':<20}{'ADDRESS':<16}{'STATUS':<10}{'READY':<7}USED BY"
    click.echo(header)
    for r in rows:
        used = (["namespace"] if r["enrolled_namespace"] else []) + [f"svc/{s}" for s in r["services"]]
        ready = "yes" if r["ready"] else "no"
        click.echo(f"{r['namespace']:<16}{r['name']:<20}{r['address'] or '-':<16}{r['status']:<10}{ready:<7}"
                   f"{', '.join(used) or '-'}")


@waypoint.command("delete")
@click.argument("name", default="waypoint")
@click.option("-n", "--namespace", required=True)
@click.option("--settle-timeout", default=15.0, show_default=True,
              help="seconds to wait for every node to take the namespace off the waypoint")
@click.option("--wait", "wait_seconds", type=float, default=0, metavar="SECONDS",
              help="also wait until the waypoint's pods are gone (they drain first), at most SECONDS")
def delete_cmd(name: str, namespace: str, settle_timeout: float, wait_seconds: float) -> None:
    """Delete waypoint NAME (default "waypoint") from NAMESPACE.

    Undoes ``apply --enroll-namespace`` first: the namespace's use-waypoint label is removed,
    and the Gateway is deleted only once every connected node has that config, so new
    connections take the L4 path before the waypoint goes (none is refused as "waypoint
    unknown" in between). Its Deployment and pod go after it, as a Gateway's dependents do
    in Kubernetes (background cascade): the pod drains for a few seconds first. --wait
    returns only once no pod of the waypoint is left (kubectl's foreground cascade)."""
    client = _client()
    enrolled = [ns for ns in _call(client.list, "Namespace")
                if ns["metadata"]["name"] == namespace and _uses(ns, name)]
    if enrolled:
        version = _call(client.status).get("version")
        events = _call(client.apply, [_without_waypoint_labels(enrolled[0], name)])
        click.echo(f"namespace {namespace}: {LABEL_USE_WAYPOINT} label removed")
        written = max((int(e.get("resourceVersion") or 0) for e in events), default=None)
        if version is not None and events and not _nodes_caught_up(client, int(version), written, settle_timeout):
            click.echo(f"warning: not every node confirmed the change within {settle_timeout:g}s; "
                       "deleting the waypoint anyway", err=True)
    labelled = sorted(s["metadata"]["name"] for s in _call(client.list, "Service", namespace)
                      if _uses(s, name))
    _call(client.delete, [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                           "metadata": {"name": name, "namespace": namespace}}])
    click.echo(f"waypoint {namespace}/{name} deleted")
    if wait_seconds > 0:
        deadline = time.monotonic() + wait_seconds
        while left := _pods_of(client, namespace, name):
            if time.monotonic() > deadline:
                raise click.ClickException(f"waypoint {namespace}/{name}: pod(s) {', '.join(left)} "
                                           f"still there after {wait_seconds:g} s")
            time.sleep(0.2)
        click.echo(f"waypoint {namespace}/{name}: its pods are gone")
    if labelled:
        click.echo(f"warning: services still labelled to use it (their traffic is refused until "
                   f"the label goes): {', '.join(labelled)}", err=True)


def _pods_of(client, namespace: str, name: str) -> list[str]:
    """The waypoint's pods (the Gateway's label on them, as the controller finds them)."""
    return sorted(p["metadata"]["name"] for p in _call(client.list, "Pod", namespace)
                  if (p["metadata"].get("labels") or {}).get(LABEL_GATEWAY_NAME) == name)


def _uses(obj: dict, name: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return labels.get(LABEL_USE_WAYPOINT, labels.get(LABEL_USE_WAYPOINT_ISTIO)) == name


def _without_waypoint_labels(namespace_obj: dict, name: str) -> dict:
    """The Namespace as the user would re-apply it, minus the labels naming waypoint ``name``."""
    meta = {k: v for k, v in namespace_obj["metadata"].items() if k in ("name", "labels", "annotations")}
    meta["labels"] = {k: v for k, v in (meta.get("labels") or {}).items()
                      if not (k in (LABEL_USE_WAYPOINT, LABEL_USE_WAYPOINT_ISTIO) and v == name)}
    return {**{k: v for k, v in namespace_obj.items() if k != "status"}, "metadata": meta}


def _nodes_caught_up(client, version_before: int, written: int | None, timeout: float) -> bool:
    """True once the model took our write (revision ``written``) and every connected node
    component has ACKed the current version (nothing in flight).

    A write that changes no node's config (a waypoint not yet bound: nothing used it) moves
    no version, so "the version moved past ``version_before``" would wait the whole
    timeout; the controller's ``applied_revision`` says the write was taken either way.
    (A controller without it: the version must move.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _call(client.status)
        current = int(status["version"])
        applied = status.get("applied_revision")
        taken = (applied is not None and written is not None and int(applied) >= written) \
            if applied is not None else current > version_before
        agents = [a for a in status.get("agents") or [] if a.get("connected", True)]
        if taken and all(int(a["version"] or 0) >= current and not a["in_flight"] for a in agents):
            return True
        time.sleep(0.1)
    return False


if __name__ == "__main__":  # pragma: no cover
    waypoint(sys.argv[1:])
