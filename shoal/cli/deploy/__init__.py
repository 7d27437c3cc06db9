"""Shoal on Kubernetes: render the ``daemonset/`` base with options, install, uninstall.

``render(RenderOptions(...))`` returns the manifests as objects; ``shoal install`` and
``shoal uninstall`` (``shoal.cli.deploy.cli``) apply or remove them with kubectl;
``waypoint.instantiate`` fills the waypoint template for one Gateway.
"""
from shoal.cli.deploy.render import RenderOptions, render, render_yaml

__all__ = ["RenderOptions", "render", "render_yaml"]
