"""The waypoint template, instantiated for a Gateway as the controller will."""
from __future__ import annotations

import copy

import kubernetes_validate
import pytest
from kubernetes_validate.utils import latest_version

from shoal.waypointtemplate import WaypointTemplateError, instantiate, template_values
from tests.shoal.cli.deploy.deploybed import SAMPLE_GATEWAY, base, rendered, waypoint_objects  # noqa: F401  (fixtures)


def test_template_yields_a_valid_deployment_service_and_account(rendered):
    objects = waypoint_objects(rendered)
    assert [o["kind"] for o in objects] == ["ServiceAccount", "Deployment", "Service"]
    for obj in objects:
        kubernetes_validate.validate(obj, latest_version(), strict=True)
        assert obj["metadata"]["namespace"] == "demo" and obj["metadata"]["name"] == "waypoint"
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["kind"] == "Gateway" and owner["uid"] == SAMPLE_GATEWAY["metadata"]["uid"]
    assert "${" not in str(objects)
    deployment = objects[1]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SHOAL_WAYPOINT_NAME"] == "waypoint" and env["SHOAL_WAYPOINT_NAMESPACE"] == "demo"
    # The identity the waypoint claims is the ServiceAccount its pod runs as.
    config = pytest.importorskip("shoal.waypoint.config").WaypointConfig.from_args([], env={
        k: v for k, v in env.items() if v is not None})
    pod = deployment["spec"]["template"]["spec"]
    assert config.spiffe_id == f"spiffe://cluster.local/ns/demo/sa/{pod['serviceAccountName']}"


@pytest.mark.parametrize("change", [
    lambda g: g["spec"].update(gatewayClassName="istio-waypoint"),
    lambda g: g["metadata"].update(name="Not_A_Label"),
    lambda g: g["metadata"].update(name="x" * 64),
    lambda g: g["metadata"].pop("uid"),
    lambda g: g["metadata"].update(namespace="demo\nkind: ClusterRole"),
    lambda g: g.update(kind="HTTPRoute"),
])
def test_gateways_that_cannot_be_waypoints_are_refused(rendered, change):
    gateway = copy.deepcopy(SAMPLE_GATEWAY)
    change(gateway)
    with pytest.raises(WaypointTemplateError):
        waypoint_objects(rendered, gateway)


def test_values_are_substituted_into_strings_only():
    """A name cannot add structure: substitution happens after parsing."""
    template = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ${GATEWAY_NAME}\ndata:\n  k: '${GATEWAY_NAME}-x'\n"
    (obj,) = instantiate(template, SAMPLE_GATEWAY)
    assert obj["data"] == {"k": "waypoint-x"} and obj["metadata"]["name"] == "waypoint"
    with pytest.raises(WaypointTemplateError, match="unknown variable"):
        instantiate("a: ${NOPE}\n", SAMPLE_GATEWAY)
    assert template_values(SAMPLE_GATEWAY)["GATEWAY_NAMESPACE"] == "demo"
