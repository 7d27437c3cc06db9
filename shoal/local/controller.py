"""``python -m shoal.local.controller``: the controller of a local cluster.

The same ``ControllerApp`` as ``python -m shoal.controller``, assembled with the local
cluster's own parts that follow the embedded store: the kubelet (Pods become namespaces
and processes) and the waypoint launcher (one Deployment per waypoint Gateway), and the
nodes' addresses the relay dials. They are handed in, so the controller never imports
``shoal.local``.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from shoal.config import ClusterLayout, cluster_name
from shoal.controller.__main__ import main as run_controller
from shoal.controller.app import ControllerApp, StoreFollower
from shoal.controller.config import ControllerConfig
from shoal.controller.store import Store, poll_forever
from shoal.local import network
from shoal.local.kubelet import LocalKubelet
from shoal.local.nodepods import PodContainers
from shoal.local.waypoints import LocalWaypointLauncher, template_path
from shoal.runtime import run_daemon


def store_followers(config: ControllerConfig) -> list[StoreFollower]:
    """The kubelet and the waypoint launcher, for ``config``'s cluster. With ``--no-kubelet``
    neither: both run beside the controller (``node-side``), and two launchers would fight
    over each waypoint's Deployment (each rewriting it with its own view of the pod)."""
    if not config.run_kubelet:
        return []
    return [lambda store: LocalKubelet(config.layout, store).run(),
            lambda store: LocalWaypointLauncher(store, config.layout).run()]


def assemble(config: ControllerConfig) -> ControllerApp:
    return ControllerApp(config, store_followers(config), node_address=network.node_ip)


def main(argv: list[str] | None = None) -> int:
    """Started as ``python -m shoal.controller`` is, with the local cluster's parts."""
    return run_controller(argv, assemble)


def node_main() -> int:
    """``python -m shoal.local.controller node-side --cluster NAME``: the kubelet and the waypoint
    launcher on their own, on the host, beside a controller that runs in a container (as
    root: they make namespaces, cgroups and pod processes, which the controller may not)."""
    parser = argparse.ArgumentParser(prog="python -m shoal.local.controller node-side")
    parser.add_argument("--cluster", default=cluster_name())
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--containers", action="store_true",
                        help="run waypoints from the rendered template as podman containers")
    args = parser.parse_args(sys.argv[2:])
    layout = ClusterLayout(name=args.cluster)

    async def run() -> None:
        store = Store(layout.store_path)
        if args.containers:
            kubelet = LocalKubelet(layout, store, containers=PodContainers(layout))
            launcher = LocalWaypointLauncher(store, layout, template=template_path(layout).read_text())
        else:
            kubelet, launcher = LocalKubelet(layout, store), LocalWaypointLauncher(store, layout)
        await asyncio.gather(kubelet.run(), launcher.run(), poll_forever(store))
    return run_daemon(run, args.log_level)


if __name__ == "__main__":
    sys.exit(node_main() if sys.argv[1:2] == ["node-side"] else main())
