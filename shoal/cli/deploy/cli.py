"""``shoal install`` and ``shoal uninstall``: Shoal on a Kubernetes cluster, through kubectl.

``shoal install --render`` prints the manifests (no cluster, no kubectl needed);
without ``--render`` they are applied with server-side apply and, unless
``--no-wait``, the controller and the agents are awaited. ``shoal uninstall`` stops the
agents (which leave their programs pinned), runs the node clean-up DaemonSet on
every node, then deletes everything Shoal installed.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click

from shoal.cli.deploy.kustomize import KustomizeError
from shoal.cli.deploy.render import (
    DEFAULT_FLOWS,
    DEFAULT_HUB,
    DEFAULT_TAG,
    LOG_LEVELS,
    MAX_FLOWS,
    NAMESPACE,
    RenderOptions,
    default_base,
    render,
    render_file,
    to_yaml,
)
from shoal.config import DEFAULT_TRUST_DOMAIN, WAYPOINT_GATEWAY_CLASS

GATEWAY_CRD = "customresourcedefinition.apiextensions.k8s.io/gateways.gateway.networking.k8s.io"
CLEANUP_MANIFEST = "uninstall/node-cleanup.yaml"
FIELD_MANAGER = "shoal"


def gateway_class() -> dict[str, Any]:
    """The GatewayClass for waypoints; applied only when the Gateway API CRDs exist."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GatewayClass",
        "metadata": {"name": WAYPOINT_GATEWAY_CLASS, "labels": {"app.kubernetes.io/part-of": "shoal"}},
        "spec": {"controllerName": "shoal.io/waypoint-controller",
                 "description": "Shoal waypoint proxies (L7), one Deployment per Gateway"},
    }


@dataclass(frozen=True)
class Kubectl:
    """Runs kubectl, echoing each command to stderr; a failure stops with its stderr."""

    binary: str = "kubectl"
    context: str | None = None

    def command(self, args: Sequence[str]) -> list[str]:
        context = [f"--context={self.context}"] if self.context else []
        return [self.binary, *context, *args]

    def run(self, args: Sequence[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = self.command(args)
        click.echo("+ " + " ".join(cmd), err=True)
        try:
            done = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
        except OSError as err:
            raise click.ClickException(f"cannot run {self.binary}: {err}") from err
        if done.stdout:
            click.echo(done.stdout.rstrip(), err=True)
        if check and done.returncode != 0:
            raise click.ClickException(f"{' '.join(cmd[:4])}... failed (exit {done.returncode}): "
                                       f"{done.stderr.strip()}")
        return done


def _options(trust_domain: str, hub: str, image_tag: str, flows: int, log_level: str,
             ca_secret: str | None = None, local_cluster: str | None = None) -> RenderOptions:
    try:
        return RenderOptions(trust_domain=trust_domain, hub=hub, image_tag=image_tag, flows=flows,
                             log_level=log_level, ca_secret=ca_secret, local_cluster=local_cluster)
    except ValueError as err:
        raise click.UsageError(str(err)) from err


def _render(options: RenderOptions, base: Path | None) -> list[dict[str, Any]]:
    try:
        return render(options, base)
    except KustomizeError as err:
        raise click.ClickException(f"{err} (point --manifests or SHOAL_MANIFESTS at Shoal's daemonset/ folder)") from err


def _kubectl(binary: str, context: str | None) -> Kubectl:
    if shutil.which(binary) is None:
        raise click.ClickException(f"{binary} not found: install kubectl, pass --kubectl PATH, "
                                   "or use --render to print the manifests")
    return Kubectl(binary, context)


def _render_options(func):
    """The options shared by install and uninstall (uninstall needs them for its image)."""
    for option in reversed([
        click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True,
                     help="SPIFFE trust domain of workload identities."),
        click.option("--hub", default=DEFAULT_HUB, show_default=True, help="Registry path of Shoal's images."),
        click.option("--image-tag", default=DEFAULT_TAG, show_default=True, help="Tag of Shoal's images."),
        click.option("--flows", type=click.IntRange(1, MAX_FLOWS), default=DEFAULT_FLOWS, show_default=True,
                     help="Flows kept per node for `shoal observe` (ring buffer size)."),
        click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO", show_default=True),
        click.option("--manifests", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
                     help="The kustomize base (default: the daemonset/ folder of this Shoal)."),
        click.option("--kubectl", "kubectl_bin", default="kubectl", envvar="SHOAL_KUBECTL", show_default=True),
        click.option("--context", default=None, help="kubeconfig context to use."),
        click.option("--timeout", default="300s", show_default=True, help="How long to wait for rollouts."),
    ]):
        func = option(func)
    return func


@click.command("install")
@click.option("--render", "render_only", is_flag=True, help="Print the manifests instead of applying them.")
@_render_options
@click.option("--ca-secret", default=None,
              help="Secret in shoal-system holding the mesh CA (Istio cacerts layout). Without it the "
                   "controller generates a root that lives as long as its pod.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for the controller and every agent to be ready.")
@click.option("--local-cluster", default=None, metavar="NAME",
              help="With --render: the DaemonSet's host paths of local cluster NAME, as `shoal up --containers` "
                   "runs it (per-node run dir and cgroup, named pod namespaces).")
def install(render_only: bool, trust_domain: str, hub: str, image_tag: str, flows: int, log_level: str,
            manifests: Path | None, kubectl_bin: str, context: str | None, timeout: str, ca_secret: str | None,
            wait: bool, local_cluster: str | None) -> None:
    """Install Shoal on the current Kubernetes cluster (or print its manifests)."""
    if local_cluster and not render_only:
        raise click.UsageError("--local-cluster renders for `shoal up --containers`: use it with --render")
    options = _options(trust_domain, hub, image_tag, flows, log_level, ca_secret, local_cluster)
    objects = _render(options, manifests)
    if render_only:
        click.echo(to_yaml(objects), nl=False)
        return
    kubectl = _kubectl(kubectl_bin, context)
    kubectl.run(["apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "--force-conflicts", "-f", "-"],
                stdin=to_yaml(objects))
    if kubectl.run(["get", GATEWAY_CRD, "-o", "name"], check=False).returncode == 0:
        kubectl.run(["apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-"],
                    stdin=to_yaml([gateway_class()]))
    else:
        click.echo("warning: the Gateway API CRDs are not installed: waypoints (L7) are unavailable until "
                   "they are; then run `shoal install` again", err=True)
    if wait:
        for workload in ("deployment/shoal-controller", "daemonset/shoal-agent"):
            kubectl.run(["-n", NAMESPACE, "rollout", "status", workload, f"--timeout={timeout}"])
    click.echo(f"Shoal installed (trust domain {options.trust_domain}, images {options.image('shoal-*')}). "
               "Enrol a namespace: kubectl label namespace NS shoal.io/mesh=enabled", err=True)


@click.command("uninstall")
@_render_options
@click.option("--keep-crds", is_flag=True,
              help="Keep the CRDs, and with them every AuthorizationPolicy/PeerAuthentication/TrafficPolicy.")
def uninstall(trust_domain: str, hub: str, image_tag: str, flows: int, log_level: str, manifests: Path | None,
              kubectl_bin: str, context: str | None, timeout: str, keep_crds: bool) -> None:
    """Remove Shoal from the current cluster, eBPF programs on every node included."""
    options = _options(trust_domain, hub, image_tag, flows, log_level)
    base = manifests or default_base()
    objects = _render(options, base)
    cleanup = render_file(options, base, CLEANUP_MANIFEST)
    kubectl = _kubectl(kubectl_bin, context)
    # 1. Stop the agents. On SIGTERM they leave their programs pinned (upgrade path).
    # Foreground: kubectl returns once the agent pods are gone, not just the DaemonSet.
    kubectl.run(["-n", NAMESPACE, "delete", "daemonset/shoal-agent", "--ignore-not-found", "--cascade=foreground",
                 "--wait=true", f"--timeout={timeout}"])
    # 2. Remove programs, pins and pod tc filters on every node, and wait for all nodes.
    kubectl.run(["apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-"], stdin=to_yaml(cleanup))
    kubectl.run(["-n", NAMESPACE, "rollout", "status", "daemonset/shoal-node-cleanup", f"--timeout={timeout}"])
    # 3. Everything else; the namespace takes the clean-up DaemonSet with it.
    kubectl.run(["delete", "gatewayclass", WAYPOINT_GATEWAY_CLASS, "--ignore-not-found"], check=False)
    doomed = [o for o in objects if not (keep_crds and o["kind"] == "CustomResourceDefinition")]
    kubectl.run(["delete", "--ignore-not-found", "--wait=true", f"--timeout={timeout}", "-f", "-"],
                stdin=to_yaml(cleanup + doomed))
    click.echo("Shoal uninstalled." + (" CRDs kept." if keep_crds else ""), err=True)


@click.group()
def main() -> None:
    """Shoal on Kubernetes (also registered as `shoal install` / `shoal uninstall`)."""


main.add_command(install)
main.add_command(uninstall)

if __name__ == "__main__":
    sys.exit(main())
