"""Shared helpers and fixtures of the Kubernetes deployment tests: the base, its renderings, kubectl."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from shoal.cli.deploy import RenderOptions, render
from shoal.cli.deploy.render import WAYPOINT_TEMPLATE, WAYPOINT_TEMPLATE_KEY, default_base, render_file
from shoal.waypointtemplate import instantiate

REPO = Path(__file__).resolve().parents[4]
SAMPLE_GATEWAY = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"name": "waypoint", "namespace": "demo", "uid": "0f6a1d2c-3b4e-4f50-8a9b-0c1d2e3f4a5b"},
    "spec": {"gatewayClassName": "shoal-waypoint",
             "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
}


@pytest.fixture(scope="session")
def base() -> Path:
    return default_base()


@pytest.fixture(scope="session")
def rendered(base) -> list[dict[str, Any]]:
    """The base with default options."""
    return render(RenderOptions(), base)


def waypoint_objects(objects: list[dict[str, Any]], gateway=SAMPLE_GATEWAY) -> list[dict[str, Any]]:
    template = find(objects, "ConfigMap", WAYPOINT_TEMPLATE)["data"][WAYPOINT_TEMPLATE_KEY]
    return instantiate(template, gateway)


@pytest.fixture(scope="session")
def everything(rendered, base) -> list[dict[str, Any]]:
    """Every object Shoal can create: the base, a waypoint instance, the node clean-up."""
    return rendered + waypoint_objects(rendered) + render_file(RenderOptions(), base, "uninstall/node-cleanup.yaml")


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (Debian package `kubectl` from the google-cloud-sdk repository)")
    return path


def find(objects, kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def workloads(objects) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job")]


def containers(objects):
    for obj in workloads(objects):
        spec = pod_spec(obj)
        for c in (spec.get("initContainers") or []) + spec["containers"]:
            yield obj, c
