"""``python -m shoal.local.controller``: the controller of a local cluster.

The same ``ControllerApp`` as ``python -m shoal.controller``, assembled with the local
cluster's own parts that follow the embedded store: the kubelet (Pods become namespaces
and processes) and the waypoint launcher (one Deployment per waypoint Gateway), and the
nodes' addresses the relay dials. They are handed in, so the controller never imports
``shoal.local``.
"""
from __future__ import annotations

import sys

from shoal.controller.__main__ import main as run_controller
from shoal.controller.app import ControllerApp, StoreFollower
from shoal.controller.config import ControllerConfig
from shoal.local import network
from shoal.local.kubelet import LocalKubelet
from shoal.local.waypoints import LocalWaypointLauncher


def store_followers(config: ControllerConfig) -> list[StoreFollower]:
    """The kubelet (unless ``--no-kubelet``) and the waypoint launcher, for ``config``'s cluster."""
    followers: list[StoreFollower] = []
    if config.run_kubelet:
        followers.append(lambda store: LocalKubelet(config.layout, store).run())
    followers.append(lambda store: LocalWaypointLauncher(store, config.layout).run())
    return followers


def assemble(config: ControllerConfig) -> ControllerApp:
    return ControllerApp(config, store_followers(config), node_address=network.node_ip)


def main(argv: list[str] | None = None) -> int:
    """Started as ``python -m shoal.controller`` is, with the local cluster's parts."""
    return run_controller(argv, assemble)


if __name__ == "__main__":
    sys.exit(main())
