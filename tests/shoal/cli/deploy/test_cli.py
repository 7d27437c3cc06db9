"""`shoal install` / `shoal uninstall`: rendering with options, and the kubectl they run."""
from __future__ import annotations

import json
import stat
import sys

import pytest
import yaml
from click.testing import CliRunner

from shoal.cli.deploy import RenderOptions, render
from shoal.cli.deploy.cli import install, uninstall
from shoal.cli.deploy.render import CONFIG_CHECKSUM_ANNOTATION, WAYPOINT_TEMPLATE, WAYPOINT_TEMPLATE_KEY
from shoal.config import DEFAULT_TRUST_DOMAIN
from tests.shoal.cli.deploy.deploybed import containers, find, waypoint_objects


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def run(command, *args, env=None):
    result = CliRunner().invoke(command, list(args), env=env, catch_exceptions=False)
    return result


def test_render_prints_the_manifests(rendered):
    result = run(install, "--render")
    assert result.exit_code == 0, result.output
    printed = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert printed == rendered


def test_trust_domain_changes_everywhere_it_appears(rendered):
    result = run(install, "--render", "--trust-domain", "example.org")
    assert result.exit_code == 0, result.output
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    everywhere = objects + waypoint_objects(objects)
    assert not [s for s in strings(everywhere) if DEFAULT_TRUST_DOMAIN in s]
    assert find(objects, "ConfigMap", "shoal-config")["data"]["trustDomain"] == "example.org"
    waypoint = next(o for o in waypoint_objects(objects) if o["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in waypoint["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SHOAL_TRUST_DOMAIN"] == "example.org"
    # Same number of places as the default has: nothing was missed, nothing invented.
    default_places = [s for s in strings(rendered + waypoint_objects(rendered)) if DEFAULT_TRUST_DOMAIN in s]
    new_places = [s for s in strings(everywhere) if "example.org" in s]
    assert len(new_places) == len(default_places) >= 2


def test_the_base_never_uses_the_cluster_dns_domain(rendered):
    """So replacing cluster.local can only ever hit the trust domain."""
    assert not [s for s in strings(rendered + waypoint_objects(rendered)) if "svc.cluster.local" in s]


def test_image_tag_hub_flows_and_log_level(rendered):
    options = RenderOptions(hub="registry.example.org/mesh", image_tag="1.2.3-rc1", flows=16383, log_level="DEBUG")
    objects = render(options)
    images = {c["image"] for _, c in containers(objects + waypoint_objects(objects))}
    assert images == {"registry.example.org/mesh/shoal-agent:1.2.3-rc1",
                      "registry.example.org/mesh/shoal-controller:1.2.3-rc1",
                      "registry.example.org/mesh/shoal-waypoint:1.2.3-rc1"}
    assert find(objects, "ConfigMap", "shoal-config")["data"] == {
        "trustDomain": "cluster.local", "flowBufferSize": "16383", "logLevel": "DEBUG"}
    # Changed config rolls the pods that read it.
    for name, kind in (("shoal-agent", "DaemonSet"), ("shoal-controller", "Deployment")):
        before = find(rendered, kind, name)["spec"]["template"]["metadata"]["annotations"]
        after = find(objects, kind, name)["spec"]["template"]["metadata"]["annotations"]
        assert before[CONFIG_CHECKSUM_ANNOTATION] != after[CONFIG_CHECKSUM_ANNOTATION]
    # The template stays a template: still YAML, still with its placeholders.
    assert "${GATEWAY_NAME}" in find(objects, "ConfigMap", WAYPOINT_TEMPLATE)["data"][WAYPOINT_TEMPLATE_KEY]


@pytest.mark.parametrize("args,message", [
    (["--trust-domain", "Example_Org"], "trust domain"),
    (["--trust-domain", "a..b"], "trust domain"),
    (["--image-tag", "1.0 ; rm -rf /"], "image tag"),
    (["--hub", "HTTPS://x"], "hub"),
    (["--flows", "0"], "--flows"),
    (["--flows", "many"], "--flows"),
    (["--log-level", "chatty"], "--log-level"),
])
def test_bad_options_are_refused_with_a_clear_error(args, message):
    result = run(install, "--render", *args)
    assert result.exit_code == 2
    assert message in result.output and "apiVersion" not in result.output


# -- against a fake kubectl ---------------------------------------------------------------

FAKE_KUBECTL = """#!{python}
import json, os, sys
stdin = sys.stdin.read() if "-f" in sys.argv and "-" in sys.argv else None
with open(os.environ["FAKE_KUBECTL_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "stdin": stdin}}) + "\\n")
fail = os.environ.get("FAKE_KUBECTL_FAIL", "")
if fail and fail in " ".join(sys.argv[1:]):
    sys.stderr.write("error: the server said no\\n")
    sys.exit(1)
"""


@pytest.fixture
def fake_kubectl(tmp_path, monkeypatch):
    path = tmp_path / "kubectl"
    path.write_text(FAKE_KUBECTL.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_KUBECTL_LOG", str(log))

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return str(path), calls


def test_install_applies_then_waits(fake_kubectl, rendered):
    kubectl, calls = fake_kubectl
    result = run(install, "--kubectl", kubectl, "--context", "prod", "--trust-domain", "example.org")
    assert result.exit_code == 0, result.output
    argvs = [c["argv"] for c in calls()]
    assert all(a[0] == "--context=prod" for a in argvs)
    apply = calls()[0]
    assert apply["argv"][1:4] == ["apply", "--server-side", "--field-manager=shoal"]
    applied = [o for o in yaml.safe_load_all(apply["stdin"]) if o]
    assert len(applied) == len(rendered)
    assert find(applied, "ConfigMap", "shoal-config")["data"]["trustDomain"] == "example.org"
    # Gateway API present (the fake answers yes): the GatewayClass follows.
    gateway_class = [o for c in calls() if c["stdin"] for o in yaml.safe_load_all(c["stdin"]) if o
                     and o["kind"] == "GatewayClass"]
    assert gateway_class and gateway_class[0]["metadata"]["name"] == "shoal-waypoint"
    assert argvs[-2][-3:-1] == ["status", "deployment/shoal-controller"]
    assert argvs[-1][-3:-1] == ["status", "daemonset/shoal-agent"]


def test_install_without_gateway_api_warns_and_skips_the_gateway_class(fake_kubectl, monkeypatch):
    kubectl, calls = fake_kubectl
    monkeypatch.setenv("FAKE_KUBECTL_FAIL", "gateways.gateway.networking.k8s.io")
    result = run(install, "--kubectl", kubectl, "--no-wait")
    assert result.exit_code == 0, result.output
    assert "Gateway API CRDs are not installed" in result.output
    assert not any("rollout" in c["argv"] for c in calls())
    assert not any(c["stdin"] and "GatewayClass" in c["stdin"] for c in calls())


def test_install_stops_with_kubectls_error(fake_kubectl, monkeypatch):
    kubectl, calls = fake_kubectl
    monkeypatch.setenv("FAKE_KUBECTL_FAIL", "apply")
    result = run(install, "--kubectl", kubectl)
    assert result.exit_code == 1
    assert "the server said no" in result.output
    assert len(calls()) == 1, "nothing runs after a failed apply"


def test_install_without_kubectl_says_what_to_do(tmp_path):
    result = run(install, "--kubectl", str(tmp_path / "no-such-kubectl"))
    assert result.exit_code == 1 and "--render" in result.output


def test_uninstall_stops_agents_cleans_nodes_then_deletes(fake_kubectl, rendered):
    kubectl, calls = fake_kubectl
    result = run(uninstall, "--kubectl", kubectl, "--image-tag", "9.9.9")
    assert result.exit_code == 0, result.output
    argvs = [c["argv"] for c in calls()]
    assert argvs[0][:3] == ["-n", "shoal-system", "delete"] and "daemonset/shoal-agent" in argvs[0]
    cleanup = [o for o in yaml.safe_load_all(calls()[1]["stdin"]) if o]
    assert [o["metadata"]["name"] for o in cleanup] == ["shoal-node-cleanup"]
    (container,) = cleanup[0]["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith("/shoal-agent:9.9.9")
    assert container["command"][-3:] == ["shoal.agent.k8s", "cleanup", "--stay"]
    assert "daemonset/shoal-node-cleanup" in argvs[2] and "status" in argvs[2]
    deleted = [o for o in yaml.safe_load_all(calls()[-1]["stdin"]) if o]
    assert calls()[-1]["argv"][0] == "delete"
    assert {o["kind"] for o in deleted} >= {"Namespace", "CustomResourceDefinition", "ClusterRole", "DaemonSet"}


def test_uninstall_can_keep_the_crds(fake_kubectl):
    kubectl, calls = fake_kubectl
    assert run(uninstall, "--kubectl", kubectl, "--keep-crds").exit_code == 0
    deleted = [o for o in yaml.safe_load_all(calls()[-1]["stdin"]) if o]
    assert deleted and not [o for o in deleted if o["kind"] == "CustomResourceDefinition"]


def test_uninstall_does_not_delete_anything_if_node_cleanup_fails(fake_kubectl, monkeypatch):
    kubectl, calls = fake_kubectl
    monkeypatch.setenv("FAKE_KUBECTL_FAIL", "shoal-node-cleanup --timeout")
    result = run(uninstall, "--kubectl", kubectl)
    assert result.exit_code == 1
    assert not any(c["argv"][0] == "delete" for c in calls())


def test_ca_secret_is_mounted_where_the_controller_reads_its_ca(monkeypatch):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    from shoal.controller.config import ControllerConfig
    result = run(install, "--render", "--ca-secret", "shoal-cacerts")
    assert result.exit_code == 0, result.output
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    deployment = find(objects, "Deployment", "shoal-controller")
    kubernetes_validate.validate(deployment, latest_version(), strict=True)
    spec = deployment["spec"]["template"]["spec"]
    assert {"name": "cacerts", "secret": {"secretName": "shoal-cacerts"}} in spec["volumes"]
    container = spec["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = ControllerConfig.from_args(container["args"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "cacerts")
    assert str(config.ca_dir) == mount["mountPath"] and mount["readOnly"]
    assert run(install, "--render", "--ca-secret", "Bad Secret").exit_code == 2
    default = find(render(RenderOptions()), "Deployment", "shoal-controller")
    assert "cacerts" not in str(default), "no CA secret unless asked for"


def test_every_install_command_in_the_docs_works():
    """The docs' `shoal install ...` lines, run with --render: no option there is made up."""
    import re
    import shlex

    from tests.shoal.cli.deploy.deploybed import REPO
    text = (REPO / "docs" / "kubernetes.md").read_text()
    lines = [line.split("#")[0].split(">")[0].strip()
             for block in re.findall(r"```sh\n(.*?)```", text, re.S) for line in block.splitlines()]
    commands = [shlex.split(line)[2:] for line in lines if line.startswith("shoal install")]
    assert len(commands) >= 4
    for args in commands:
        result = run(install, *args, *([] if "--render" in args else ["--render"]))
        assert result.exit_code == 0, (args, result.output)
    uninstall_lines = [shlex.split(line)[2:] for line in lines if line.startswith("shoal uninstall")]
    assert uninstall_lines
    for args in uninstall_lines:
        assert run(uninstall, *args, "--help").exit_code == 0, args


def test_missing_manifests_say_where_to_point(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOAL_MANIFESTS", str(tmp_path))
    result = run(install, "--render")
    assert result.exit_code == 1 and "SHOAL_MANIFESTS" in result.output and "kustomization.yaml" in result.output


async def test_install_again_with_a_new_tag_rolls_the_controller_and_the_daemonset(kubectl, tmp_path):
    """`shoal install` run by the real kubectl (server-side apply) against the fake API
    server: again unchanged, nothing moves (no object's generation or resourceVersion, so
    no rollout); again with --image-tag, exactly the Deployment's and the DaemonSet's pod
    templates get the new images, and their generations move by one (the rollout)."""
    import asyncio

    from tests.controller.fake_apiserver import FakeApiServer

    server = await FakeApiServer().start()
    kubeconfig = server.kubeconfig(tmp_path / "kubeconfig", user="admin")

    async def install_with(*args):
        # In a thread: kubectl talks to the fake API server, served by this test's loop.
        result = await asyncio.to_thread(run, install, "--kubectl", kubectl, "--no-wait", *args,
                                         env={"KUBECONFIG": str(kubeconfig)})
        assert result.exit_code == 0, result.output
        return {key: (entry["object"]["metadata"]["generation"], entry["object"]["metadata"]["resourceVersion"])
                for key, entry in server.applied.items()}

    def images(kind, name):
        template = server.applied[(kind, "shoal-system", name)]["object"]["spec"]["template"]["spec"]
        return {c["image"] for c in template["containers"]}

    try:
        first = await install_with()
        assert {("Deployment", "shoal-system", "shoal-controller"), ("DaemonSet", "shoal-system", "shoal-agent"),
                ("Namespace", "", "shoal-system")} <= set(first)
        assert all(content_type == "application/apply-patch+yaml" and "fieldManager=shoal" in path
                   for path, content_type in server.patches)
        assert images("DaemonSet", "shoal-agent") == {"ghcr.io/shoal-mesh/shoal-agent:0.1.0"}
        assert await install_with() == first                      # idempotent: nothing rolls
        upgraded = await install_with("--image-tag", "0.2.0")
        assert images("Deployment", "shoal-controller") == {"ghcr.io/shoal-mesh/shoal-controller:0.2.0"}
        assert images("DaemonSet", "shoal-agent") == {"ghcr.io/shoal-mesh/shoal-agent:0.2.0"}
        moved = {key for key in first if upgraded[key] != first[key]}
        # The waypoint template ConfigMap names the waypoint image too: it changes, rolls nothing.
        assert moved == {("Deployment", "shoal-system", "shoal-controller"), ("DaemonSet", "shoal-system", "shoal-agent"),
                         ("ConfigMap", "shoal-system", "shoal-waypoint-template")}, moved
        for key in moved - {("ConfigMap", "shoal-system", "shoal-waypoint-template")}:
            assert upgraded[key][0] == first[key][0] + 1, key
        assert await install_with("--image-tag", "0.2.0") == upgraded
    finally:
        await server.stop()
