"""The waypoint launcher in ``--containers`` mode: each waypoint's Deployment is the rendered
waypoint template, filled in for its Gateway, and the podman flags the kubelet derives from
that Deployment's pod are exactly the template's securityContext, capabilities, mounts, env
and command. Pure: no podman, no cluster (the cluster test runs it,
tests/shoal/local/test_containers_cluster.py)."""
from __future__ import annotations

import stat

import pytest
import yaml

from shoal.cli.deploy.render import RenderOptions, render
from shoal.config import ClusterLayout
from shoal.controller.manifests import ManifestError, validate_all
from shoal.controller.store import Store
from shoal.local.containers import pod_container_run
from shoal.local.waypoints import (
    LABEL_MANAGED_BY,
    LocalWaypointLauncher,
    ca_volume_dir,
    container_deployment_for,
    plan,
    volume_dir,
)

GATEWAY = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
           "metadata": {"name": "waypoint", "namespace": "demo", "uid": "0b1c-22"},
           "spec": {"gatewayClassName": "shoal-waypoint",
                    "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}


def rendered_template(layout: ClusterLayout, tag: str = "0.1.0-srcabc") -> str:
    objects = render(RenderOptions(local_cluster=layout.name, image_tag=tag))
    return next(o for o in objects if o["kind"] == "ConfigMap"
                and o["metadata"]["name"] == "shoal-waypoint-template")["data"]["template.yaml"]


def template_pod(template: str) -> dict:
    deployment = next(d for d in yaml.safe_load_all(template) if d and d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]


def test_the_deployment_is_the_rendered_template_with_only_the_projected_volumes_local(tmp_path):
    layout = ClusterLayout(name="wpt-1", run_root=tmp_path)
    template = rendered_template(layout)
    deployment = container_deployment_for(GATEWAY, layout, template)
    spec, original = deployment["spec"]["template"]["spec"], template_pod(template)
    assert deployment["metadata"]["labels"][LABEL_MANAGED_BY] == "waypoint-launcher"
    # Containers (image, command, env, securityContext, mounts, probes) and the pod's
    # securityContext are the template's, byte for byte, once its ${...} are filled in.
    assert spec["containers"] == [{**c, "env": [
        {**e, "value": e["value"].replace("${GATEWAY_NAME}", "waypoint").replace("${GATEWAY_NAMESPACE}", "demo")}
        if "value" in e else e for e in c["env"]]} for c in original["containers"]]
    assert spec["securityContext"] == original["securityContext"]
    assert spec["containers"][0]["image"].endswith("/shoal-waypoint:0.1.0-srcabc")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["shoal-token"] == {"name": "shoal-token", "hostPath": {"path": str(volume_dir(layout, "demo", "waypoint"))}}
    assert volumes["shoal-ca"] == {"name": "shoal-ca", "hostPath": {"path": str(ca_volume_dir(layout))}}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    # The local store accepts it as it is.
    validate_all([deployment])


def test_the_kubelets_podman_flags_are_the_templates_privileges(tmp_path):
    layout = ClusterLayout(name="wpt-2", run_root=tmp_path)
    spec = container_deployment_for(GATEWAY, layout, rendered_template(layout))["spec"]["template"]["spec"]
    run = pod_container_run(spec, "waypoint", "Pod demo/waypoint-0",
                            {"spec.nodeName": "node-1", "status.podIP": "10.244.1.9"}, {})
    sc = spec["containers"][0]["securityContext"]
    assert run.cap_drop_all and run.cap_add == () and sc["capabilities"] == {"drop": ["ALL"]}
    assert run.read_only and run.no_new_privileges and run.user == "1337:1337"
    assert run.command == ("python", "-m", "shoal.waypoint")
    assert run.env["SHOAL_NODE"] == "node-1" and run.env["SHOAL_POD_IP"] == "10.244.1.9"
    assert run.env["SHOAL_WAYPOINT_NAME"] == "waypoint" and run.env["SHOAL_WAYPOINT_NAMESPACE"] == "demo"
    assert run.env["SHOAL_CONTROLLER"] == "shoal-controller-replicas.shoal-system.svc:15012"
    assert run.tmpfs == ("/tmp",)
    # The flows folder is the one of the pod's node's agent (the render's cluster's run dir),
    # read-only: the waypoint can send to the socket, never replace it.
    flows = ClusterLayout(name=layout.name).flows_dir("node-1")
    assert run.env["SHOAL_FLOWS_SOCKET"] == "/var/run/shoal/flows/flows.sock"
    assert sorted(run.mounts) == sorted([
        f"type=bind,source={volume_dir(layout, 'demo', 'waypoint')},destination=/var/run/secrets/shoal/tokens,ro=true",
        f"type=bind,source={ca_volume_dir(layout)},destination=/var/run/secrets/shoal/ca,ro=true",
        f"type=bind,source={flows},destination=/var/run/shoal/flows,ro=true"])
    # DirectoryOrCreate: made before the start (a waypoint may come up before its node's agent).
    assert run.create_dirs == (str(flows),)


def test_the_launcher_stages_the_token_for_the_pods_user_only(tmp_path, monkeypatch):
    layout = ClusterLayout(name="wpt-3", run_root=tmp_path)
    layout.run_dir.mkdir(parents=True)
    chowned = {}
    monkeypatch.setattr("os.chown", lambda path, uid, gid: chowned.__setitem__(str(path), (uid, gid)))
    store = Store(layout.store_path)
    store.apply([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}, "spec": {"podCIDR": "10.244.1.0/24"}},
                 {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}, GATEWAY])
    launcher = LocalWaypointLauncher(store, layout, template=rendered_template(layout))
    launcher.reconcile()
    assert [p["spec"]["containers"][0]["image"] for p in store.list("Pod")] == [
        template_pod(launcher.template)["containers"][0]["image"]]
    token = volume_dir(layout, "demo", "waypoint") / "shoal-token"
    assert token.read_text().startswith("v1.waypoint-demo-waypoint.")
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert chowned == {str(token): (1337, 1337), str(token.parent): (1337, 1337)}
    # Reconciling again changes nothing: one launcher, one stable Deployment.
    to_apply, to_delete = plan(store.list("Gateway"), store.list("Deployment"), layout, template=launcher.template)
    assert (to_apply, to_delete) == ([], [])


def test_a_broken_template_is_refused_with_its_reason(tmp_path):
    layout = ClusterLayout(name="wpt-4", run_root=tmp_path)
    with pytest.raises(ManifestError, match="demo/waypoint"):
        container_deployment_for(GATEWAY, layout, "kind: Deployment\nmetadata: {name: ${NOPE}}\n")
    with pytest.raises(ManifestError, match="it makes no Deployment"):
        container_deployment_for(GATEWAY, layout, "kind: Service\nmetadata: {name: x}\n")


def test_no_waypoint_the_mesh_deploys_has_a_plaintext_door(tmp_path):
    """A waypoint pod is not captured (it terminates HBONE itself), so a plain HTTP port of
    it would be a way around the mesh's mTLS for any pod: neither the local cluster's pod
    process nor the rendered template (Kubernetes, ``--containers``) asks for one."""
    from shoal.local.waypoints import deployment_for
    from shoal.waypoint.config import WaypointConfig

    layout = ClusterLayout(name="t", run_root=tmp_path)
    for deployment in (deployment_for(GATEWAY, layout), container_deployment_for(GATEWAY, layout, rendered_template(layout))):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["command"][-2:] == ["-m", "shoal.waypoint"]
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        config = WaypointConfig.from_args(container.get("args", []), env=env)
        assert config.plaintext_address is None
        assert not any("plaintext" in part for part in (*container["command"], *container.get("args", []), *env))
