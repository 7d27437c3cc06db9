"""The ``shoal`` command line.

Cluster commands (up, down, apply, get, exec, logs, status) live here; each area adds its
own command group from its own module, loaded only when used (see ``LAZY_COMMANDS``).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

from shoal.config import DEFAULT_CLUSTER, ENV_CLUSTER, ClusterLayout

# command name -> "module:attribute", imported on first use so that `shoal get` stays fast.
LAZY_COMMANDS = {
    "debug": "shoal.agent.debug:debug",
    "observe": "shoal.cli.observe.cli:observe",
    "list": "shoal.cli.observe.cli:list_cmd",
    "ui": "shoal.cli.ui.cli:ui",
    "waypoint": "shoal.cli.waypoint:waypoint",
    "install": "shoal.cli.deploy.cli:install",
    "uninstall": "shoal.cli.deploy.cli:uninstall",
}

RESOURCE_KINDS = {
    "pods": "Pod", "pod": "Pod", "po": "Pod",
    "services": "Service", "service": "Service", "svc": "Service",
    "namespaces": "Namespace", "namespace": "Namespace", "ns": "Namespace",
    "policies": "AuthorizationPolicy", "policy": "AuthorizationPolicy",
    "authorizationpolicies": "AuthorizationPolicy", "peerauthentications": "PeerAuthentication",
    "nodes": "Node", "node": "Node",
    "deployments": "Deployment", "deploy": "Deployment",
    "serviceaccounts": "ServiceAccount", "sa": "ServiceAccount",
    "gateways": "Gateway", "httproutes": "HTTPRoute", "grpcroutes": "GRPCRoute", "trafficpolicies": "TrafficPolicy",
}


class ShoalGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                return _unavailable(name, str(e))
        return super().get_command(ctx, name)


def _unavailable(name: str, reason: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   help=f"(not available in this build: {reason})")
    def command() -> None:
        raise click.ClickException(f"`shoal {name}` is not available in this build: {reason}")
    return command


def layout_of(ctx: click.Context) -> ClusterLayout:
    return ctx.find_object(ClusterLayout) or ClusterLayout.from_env()


def _api(ctx: click.Context):
    from shoal.local.apiclient import ApiClient
    return ApiClient(layout_of(ctx).api_socket)


def _fail_on_api_errors(func):
    """Turns API and availability errors into clean CLI errors (exit 1, message on stderr)."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from shoal.local.apiclient import ApiError, ControllerUnavailable
        try:
            return func(*args, **kwargs)
        except ControllerUnavailable as e:
            raise click.ClickException(f"{e}; start a cluster with `shoal up`") from None
        except ApiError as e:
            raise click.ClickException("\n".join(e.errors)) from None
    return wrapper


@click.group(cls=ShoalGroup)
@click.option("--cluster", envvar=ENV_CLUSTER, default=DEFAULT_CLUSTER, show_default=True,
              help=f"Name of the local cluster (env {ENV_CLUSTER}).")
@click.pass_context
def cli(ctx: click.Context, cluster: str) -> None:
    """Shoal: a sidecarless, per-node eBPF service mesh."""
    try:
        ctx.obj = ClusterLayout(name=cluster)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--cluster") from None


# -- cluster lifecycle -----------------------------------------------------------------


@cli.command()
@click.option("--nodes", type=click.IntRange(1, 200), default=2, show_default=True)
@click.option("--demo", is_flag=True, help="Deploy the demo namespaces and show meshed traffic.")
@click.option("--containers", is_flag=True,
              help="Run each node's agent and proxy as podman containers from the images (`make images`), "
                   "with the rendered DaemonSet's privileges.")
@click.option("--proxy-workers", type=click.IntRange(0, 256), default=1, show_default=True,
              help="Worker processes per node proxy (0: one per core). Every node of the local cluster "
                   "shares this machine's cores, so 1 is the default here.")
@click.pass_context
def up(ctx: click.Context, nodes: int, demo: bool, containers: bool, proxy_workers: int) -> None:
    """Build a local cluster from network namespaces, cgroups and eBPF."""
    from shoal.local.cluster import LocalCluster, PreflightError
    from shoal.local.linux import LinuxError
    from shoal.local.podman import PodmanError
    layout = layout_of(ctx)
    cluster = LocalCluster(layout, progress=lambda m: click.echo(f"  {m}"),
                           node_manifests=local_manifests(layout) if containers else None,
                           proxy_workers=proxy_workers)
    click.echo(f"Bringing up cluster {layout.name!r} with {nodes} node(s)")
    try:
        cluster.up(nodes)
        if demo:
            from shoal.local.demo import deploy_demo
            deploy_demo(cluster, echo=click.echo)
    except (PreflightError, LinuxError, PodmanError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"Cluster {layout.name!r} is up. Try: shoal get pods -A")


def local_manifests(layout: ClusterLayout):
    """What ``--containers`` runs: ``shoal install --render --local-cluster NAME [--image-tag TAG]``."""
    from shoal.cli.deploy.render import RenderOptions, render
    return lambda tag: render(RenderOptions(local_cluster=layout.name, **({"image_tag": tag} if tag else {})))


@cli.command("replace-proxy")
@click.option("--node", required=True, help="The node whose proxy container is replaced.")
@click.option("--image-tag", default=None,
              help="Upgrade to this tag of the agent image (it must exist locally); default: a restart.")
@click.pass_context
def replace_proxy(ctx: click.Context, node: str, image_tag: str | None) -> None:
    """--containers clusters: replace a node's proxy container without refusing a connection.

    The new container takes over the listeners (the restart handover) before the old one
    stops accepting; the old one drains its live connections (--drain-grace) and is removed."""
    from shoal.local.cluster import LocalCluster
    from shoal.local.podman import PodmanError
    layout = layout_of(ctx)
    cluster = LocalCluster(layout, progress=lambda m: click.echo(f"  {m}"), node_manifests=local_manifests(layout))
    try:
        container = cluster.replace_proxy(node, image_tag)
    except (PodmanError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"proxy of {node} replaced: container {container[:12]}")


@cli.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Remove the local cluster: processes, namespaces, veths, cgroups, pins."""
    from shoal.local.cluster import LocalCluster
    if os.geteuid() != 0:
        raise click.ClickException("shoal down must run as root")
    removed = LocalCluster(layout_of(ctx)).down()
    click.echo(f"Removed {len(removed)} item(s) of cluster {layout_of(ctx).name!r}" if removed
               else f"Nothing to remove for cluster {layout_of(ctx).name!r}")


# -- objects ---------------------------------------------------------------------------


def _load_documents(files: tuple[str, ...]) -> list[Any]:
    docs: list[Any] = []
    for name in files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text()
            docs.extend(d for d in yaml.safe_load_all(text) if d is not None)
        except OSError as e:
            raise click.BadParameter(f"{name}: {e.strerror}", param_hint="-f") from None
        except UnicodeDecodeError as e:
            raise click.BadParameter(f"{name}: not UTF-8 text: {e}", param_hint="-f") from None
        except yaml.YAMLError as e:
            raise click.BadParameter(f"{name}: not valid YAML: {e}", param_hint="-f") from None
        except RecursionError:
            raise click.BadParameter(f"{name}: nested too deeply to be a Kubernetes object",
                                     param_hint="-f") from None
    for i, doc in enumerate(list(docs)):
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            docs[i:i + 1] = doc["items"]
    if not docs:
        raise click.BadParameter("no objects in the given file(s)", param_hint="-f")
    return docs


def _print_events(events: list[dict[str, str]], verb: str) -> None:
    words = {"ADDED": "created", "MODIFIED": "configured", "DELETED": "deleted"}
    for ev in events:
        ns = f"{ev['namespace']}/" if ev["namespace"] else ""
        click.echo(f"{ev['kind'].lower()}/{ns}{ev['name']} {words.get(ev['type'], verb)}")
    if not events:
        click.echo("unchanged")


@cli.command()
@click.option("-f", "--filename", "files", multiple=True, required=True, help="YAML file, or - for stdin.")
@click.pass_context
@_fail_on_api_errors
def apply(ctx: click.Context, files: tuple[str, ...]) -> None:
    """Create or update objects (all or nothing)."""
    _print_events(_api(ctx).apply(_load_documents(files)), "configured")


@cli.command()
@click.option("-f", "--filename", "files", multiple=True, required=True)
@click.pass_context
@_fail_on_api_errors
def delete(ctx: click.Context, files: tuple[str, ...]) -> None:
    """Delete the objects named in the files."""
    _print_events(_api(ctx).delete(_load_documents(files)), "deleted")


def _columns(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    meta, spec, status = obj["metadata"], obj.get("spec", {}), obj.get("status", {})
    if kind == "Pod":
        return {"namespace": meta["namespace"], "name": meta["name"], "node": spec.get("nodeName", ""),
                "ip": status.get("podIP", ""), "status": status.get("phase", "Pending"),
                "meshed": obj.get("meshed", ""), "restarts": status.get("restartCount", 0)}
    if kind == "Service":
        ports = ",".join(f"{p['port']}/{p.get('protocol', 'TCP')}" for p in spec.get("ports", []))
        return {"namespace": meta["namespace"], "name": meta["name"], "cluster-ip": spec.get("clusterIP", ""),
                "ports": ports}
    if kind == "Namespace":
        labels = ",".join(f"{k}={v}" for k, v in sorted(meta.get("labels", {}).items()))
        return {"name": meta["name"], "labels": labels or "<none>"}
    if kind == "Node":
        return {"name": meta["name"], "pod-cidr": spec.get("podCIDR", ""),
                "ip": next((a["address"] for a in status.get("addresses", [])), "")}
    row = {"namespace": meta.get("namespace", ""), "name": meta["name"]}
    if kind == "AuthorizationPolicy":
        row["action"] = spec.get("action", "ALLOW")
    return row


@cli.command()
@click.argument("resource", type=click.Choice(sorted(RESOURCE_KINDS), case_sensitive=False))
@click.option("-n", "--namespace", default=None, help="Only this namespace.")
@click.option("-A", "--all-namespaces", is_flag=True, help="Every namespace (the default when -n is absent).")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml", "wide"]), default="table")
@click.pass_context
@_fail_on_api_errors
def get(ctx: click.Context, resource: str, namespace: str | None, all_namespaces: bool, output: str) -> None:
    """List pods, services, namespaces, policies, nodes..."""
    kind = RESOURCE_KINDS[resource.lower()]
    api = _api(ctx)
    items = api.list(kind, None if all_namespaces else namespace)
    if kind == "Pod":
        meshed = mesh_membership(api.list("Namespace"))
        for pod in items:
            pod["meshed"] = pod_is_meshed(pod, meshed)
    if output == "json":
        click.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=2))
        return
    if output == "yaml":
        click.echo(yaml.safe_dump_all(items, sort_keys=False))
        return
    rows = [_columns(kind, obj) for obj in items]
    if not rows:
        click.echo("No resources found.")
        return
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(str(r[h])) for r in rows)) for h in headers}
    click.echo("  ".join(h.upper().ljust(widths[h]) for h in headers).rstrip())
    for row in rows:
        click.echo("  ".join(str(row[h]).ljust(widths[h]) for h in headers).rstrip())


def mesh_membership(namespaces: list[dict[str, Any]]) -> set[str]:
    """Names of namespaces that joined the mesh (the label or Istio's alias)."""
    from shoal.config import LABEL_MESH, LABEL_MESH_ISTIO
    joined = set()
    for ns in namespaces:
        labels = ns["metadata"].get("labels", {})
        if labels.get(LABEL_MESH) == "enabled" or labels.get(LABEL_MESH_ISTIO) == "ambient":
            joined.add(ns["metadata"]["name"])
    return joined


def pod_is_meshed(pod: dict[str, Any], meshed_namespaces: set[str]) -> bool:
    from shoal.config import LABEL_MESH
    if pod["metadata"].get("labels", {}).get(LABEL_MESH) == "disabled":
        return False
    return pod["metadata"]["namespace"] in meshed_namespaces


# -- pods and components ---------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec(ctx: click.Context, target: str, command: tuple[str, ...]) -> None:  # noqa: A001 - kubectl's name
    """Run COMMAND inside pod NS/POD: its namespaces, cgroup, uid and capabilities (as kubectl exec)."""
    from shoal.local.sandbox import SandboxError, exec_argv
    layout = layout_of(ctx)
    namespace, _, pod = target.partition("/")
    if not pod:
        raise click.BadParameter("expected NAMESPACE/POD, e.g. demo/client-0", param_hint="TARGET")
    try:
        argv = exec_argv(layout, namespace, pod, list(command))
    except SandboxError as err:
        from shoal.local.nodepods import PodContainers
        found = PodContainers(layout).exec_argv(namespace, pod, list(command))   # --containers: a waypoint
        if found is None:
            raise click.ClickException(str(err)) from None
        argv = found
    sys.exit(subprocess.call(argv))


@cli.command()
@click.argument("component")
@click.option("--node", default=None, help="For agent and proxy: the node (default: all).")
@click.option("-f", "--follow", is_flag=True)
@click.option("--tail", type=int, default=200, show_default=True)
@click.pass_context
def logs(ctx: click.Context, component: str, node: str | None, follow: bool, tail: int) -> None:
    """Show logs of controller, agent, proxy, waypoint-*, or a pod (NS/POD)."""
    layout = layout_of(ctx)
    if "/" in component:
        ns, _, pod = component.partition("/")
        files = sorted((layout.log_dir / "pods").glob(f"{ns}_{pod}_*.log"))
    elif component in ("agent", "proxy"):
        files = sorted(layout.log_dir.glob(f"{component}-{node or '*'}.log"))
    else:
        files = sorted(layout.log_dir.glob(f"{component}.log"))
    if not files:
        raise click.ClickException(f"no logs for {component!r} in {layout.log_dir}")
    # Containers' logs are in the CRI format (podman's k8s-file driver): shown as kubectl shows them.
    from shoal.local.podman import log_messages

    if follow:
        with subprocess.Popen(["tail", "-n", str(tail), "-F", *map(str, files)], stdout=subprocess.PIPE,
                              text=True, errors="replace") as tailing:
            assert tailing.stdout is not None
            try:
                for message in log_messages(tailing.stdout):
                    click.echo(message)
            except KeyboardInterrupt:
                tailing.terminate()
        sys.exit(tailing.returncode or 0)
    for path in files:
        if len(files) > 1:
            click.echo(f"==> {path.name} <==")
        messages = list(log_messages(path.read_text(errors="replace").splitlines()))
        for message in messages[-tail:]:
            click.echo(message)


@cli.command()
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
@_fail_on_api_errors
def status(ctx: click.Context, output: str) -> None:
    """Controller, and per node each component's software version, applied config version
    and health (stale or disconnected ones flagged), waypoints, and flows."""
    layout = layout_of(ctx)
    report: dict[str, Any] = {"controller": _api(ctx).status()}
    try:
        from shoal.cli.observe.client import ObserverUnreachable, status_summary
        report["flows"] = status_summary(layout)
    except ImportError as e:
        report["flows"] = {"error": f"not available in this build: {e}"}
    except ObserverUnreachable as e:
        report["flows"] = {"error": str(e)}
    report["capture"] = capture_audits(layout)
    report["proxy_workers"] = proxy_workers(layout)
    if output == "json":
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(render_status(report))


def describe_component(peer: dict[str, Any] | None, version: str) -> str:
    """One component as ``shoal status`` shows it: software version, applied (ACKed) config
    version and health. Fields an older controller does not send default to "unknown"."""
    if peer is None:
        return "not connected"
    build = peer.get("build_version", "unknown")
    applied = peer.get("version") or "none"
    if peer.get("connected", True) is False:
        return f"{build}, DISCONNECTED (last config v{applied})"
    health = peer.get("health")
    if health == "stale":
        state = f"STALE (no ACK for {peer.get('unanswered_for', 0):.0f}s)"
    elif health == "syncing":
        state = "syncing"
    elif str(applied) != str(version):
        state = "behind"
    else:
        state = "healthy"
    nack = peer.get("last_nack")
    if nack:
        state += f", last NACK: {nack.get('message', nack) if isinstance(nack, dict) else nack}"
    return f"{build}, config v{applied}, {state}"


def capture_audits(layout) -> dict[str, Any]:
    """Each node agent's capture audit record (its last pass and the drift it found), by node."""
    found = {}
    for path in sorted(layout.run_dir.glob(f"*/{layout.capture_audit_state('x').name}")):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            found[path.parent.name] = {"error": f"unreadable {path}: {err}"}
    return found


def proxy_workers(layout) -> dict[str, Any]:
    """Each node proxy's workers (pid, connections, health, RSS) and its RSS in all as its
    supervisor (or a single-process proxy) last wrote them, by node."""
    found = {}
    for path in sorted(layout.run_dir.glob("*/proxy-workers.json")):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            found[path.parent.name] = {"error": f"unreadable {path}: {err}"}
    return found


def render_workers(report: dict[str, Any], now: float) -> list[str]:
    """The lines under a node for its proxy's workers: a summary, then one per worker."""
    if "error" in report:
        return [f"             proxy workers: {report['error']}"]
    workers = report.get("workers", [])
    ready = sum(w.get("health") == "ready" for w in workers)
    restarts, lost = report.get("restarts", 0), report.get("lost_connections", 0)
    line = (f"             proxy workers: {ready}/{report.get('workers_wanted', len(workers))} ready, "
            f"{restarts} restart{'' if restarts == 1 else 's'}, {lost} connections lost")
    if report.get("rss_kib"):
        supervisor = report.get("supervisor_rss_kib")
        line += f", RSS {_mb(report['rss_kib'])} in all" + (
            f" (supervisor {_mb(supervisor)})" if supervisor else " (one process)")
    if now - report.get("time", 0) > 10:
        line += " (STALE: is the node proxy running?)"
    lines = [line]
    for w in workers:
        lines.append(f"               worker {w.get('index')}: pid {w.get('pid')}, {w.get('health')}, "
                     f"{w.get('connections', 0)} connections ({w.get('handled', 0)} handled), "
                     f"{len(w.get('pods', []))} pods" + (f", RSS {_mb(w['rss_kib'])}" if w.get("rss_kib") else ""))
    return lines


def _mb(kib: int) -> str:
    return f"{kib / 1024:.1f} MB"


def render_capture(node: str, audit: dict[str, Any], now: float) -> str:
    if "error" in audit:
        return f"  {node:<10} {audit['error']}"
    age = now - audit.get("time", 0)
    line = f"  {node:<10} {audit.get('pods', 0)} pods audited {age:.1f}s ago"
    if age > 3 * audit.get("interval", 2.0) + 1:
        line += " (STALE: is the agent running?)"
    drift = audit.get("drift") or {}
    if not drift:
        return line + ", no drift"
    line += ", drift: " + ", ".join(f"{kind} {n}" for kind, n in sorted(drift.items()))
    last = (audit.get("recent") or [{}])[-1]
    if last:
        when = time.strftime("%H:%M:%S", time.localtime(last.get("time", 0)))
        line += (f" (last: {last.get('pod') or 'node'} {last.get('kind')} at {when}, "
                 f"{'repaired' if last.get('repaired') else 'NOT repaired'})")
    return line


def render_status(report: dict[str, Any]) -> str:
    """The human view of ``shoal status``: per node, each component's software version,
    applied config version and health; then waypoints and flows."""
    ctl = report["controller"]
    version = ctl.get("version", "?")
    resources = ctl.get("resources", {})
    counts = ", ".join(f"{n} {kind}s" for kind, n in resources.items() if kind != "object")
    build = f"{ctl['build_version']}, " if ctl.get("build_version") else ""
    lines = [f"Controller:  {'ready' if ctl.get('ready') else 'NOT READY'}, {build}config version {version}"
             + (f" ({counts})" if counts else "")]
    by_node: dict[str, dict[str, dict[str, Any]]] = {}
    waypoints = []
    for agent in ctl.get("agents", []):
        if agent.get("component") == "waypoint":   # connects under its own name, not a node's
            waypoints.append(agent)
            continue
        by_node.setdefault(agent.get("node", "?"), {})[agent.get("component", "?")] = agent
    connected = sum(any(p.get("connected", True) for p in comps.values()) for comps in by_node.values())
    lines.append(f"Nodes:       {connected} connected" + (
        f", {len(by_node) - connected} disconnected" if connected < len(by_node) else ""))
    for node in sorted(by_node):
        cells = [f"{component}: {describe_component(by_node[node].get(component), version)}"
                 for component in ("agent", "proxy")]
        hubble = report.get("flows", {}).get("per_node", {}).get(node)
        if hubble is not None:
            health = "healthy" if hubble["state"] == "NODE_CONNECTED" else hubble["state"].removeprefix("NODE_").lower()
            cells.append(f"flows: {health}" + (f" ({hubble['version']})" if hubble.get("version") else ""))
        lines.append(f"  {node:<10} " + "   ".join(cells))
        if node in report.get("proxy_workers", {}):
            lines.extend(render_workers(report["proxy_workers"][node], time.time()))
    if waypoints:
        lines.append("Waypoints:   " + "   ".join(
            f"{w.get('node', '?').removeprefix('waypoint-')}: {describe_component(w, version)}"
            for w in waypoints))
    flows = report.get("flows", {})
    if "error" in flows:
        lines.append(f"Flows:       unavailable ({flows['error']})")
    else:
        f, n = flows["flows"], flows["nodes"]
        share = 100.0 * f["current"] / f["max"] if f.get("max") else 0.0
        unavailable = f", unavailable: {', '.join(n['unavailable'])}" if n.get("unavailable") else ""
        lines.append(f"Flows:       {f['current']}/{f['max']} ({share:.2f}%), {f['rate']} flows/s, "
                     f"{n['connected']} node(s) connected{unavailable}")
    audits = report.get("capture") or {}
    if audits:
        lines.append("Capture:     audited by each node's agent (cgroup programs, tc, sk_lookup, proxy listeners)")
        now = time.time()
        lines.extend(render_capture(node, audits[node], now) for node in sorted(audits))
    return "\n".join(lines)


def main() -> None:
    cli(prog_name="shoal")


if __name__ == "__main__":
    main()
