"""The kustomize base: it renders, validates offline, and is as careful as the code."""
from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from shoal import config as shoal_config
from shoal.cli.deploy import kustomize
from shoal.cli.deploy.render import CONFIG_MAP, SHOAL_IMAGES
from tests.shoal.cli.deploy.deploybed import REPO, containers, find, pod_spec, workloads

K8S_VERSION = latest_version()
KEY = lambda o: (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])  # noqa: E731


def test_kubectl_kustomize_renders_and_matches_the_python_loader(kubectl, base):
    done = subprocess.run([kubectl, "kustomize", str(base)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    by_kubectl = sorted((o for o in yaml.safe_load_all(done.stdout) if o), key=KEY)
    by_python = sorted(kustomize.load(base), key=KEY)
    assert [KEY(o) for o in by_kubectl] == [KEY(o) for o in by_python]
    assert by_kubectl == by_python


def test_base_holds_every_part_the_issue_names(rendered):
    kinds = {o["kind"] for o in rendered}
    assert {"Namespace", "DaemonSet", "Deployment", "Service", "PodDisruptionBudget", "ClusterRole",
            "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount", "CustomResourceDefinition",
            "ConfigMap"} <= kinds
    find(rendered, "Namespace", "shoal-system")
    find(rendered, "CustomResourceDefinition", "authorizationpolicies.security.shoal.io")
    dashboards = find(rendered, "ConfigMap", "shoal-grafana-dashboards")
    assert dashboards["data"] and dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    for name, text in dashboards["data"].items():
        assert json.loads(text)["panels"], f"{name} is not a Grafana dashboard"
    for obj in rendered:
        if obj["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "shoal-system", KEY(obj)


def test_every_object_validates_offline_against_current_kubernetes(everything):
    for obj in everything:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_offline_validation_catches_a_typo(rendered):
    """The check above can fail: a misspelt field in the DaemonSet is refused."""
    broken = copy.deepcopy(find(rendered, "DaemonSet", "shoal-agent"))
    pod_spec(broken)["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# -- the agent pod ----------------------------------------------------------------------


def agent_pod(rendered):
    return pod_spec(find(rendered, "DaemonSet", "shoal-agent"))


def test_agent_is_not_privileged_and_every_capability_is_explained(everything, rendered):
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    explained = set(re.findall(r"^\| `([A-Z_]+)` \|", docs, re.M))
    allowed = {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"}
    for obj, c in containers(everything):
        sc = c.get("securityContext") or {}
        assert not sc.get("privileged"), f"{obj['metadata']['name']}/{c['name']} is privileged"
        caps = sc.get("capabilities") or {}
        assert caps.get("drop") == ["ALL"], f"{c['name']} must drop ALL capabilities"
        added = set(caps.get("add") or [])
        assert added <= allowed, f"{c['name']} asks for {added - allowed}"
        assert added <= explained, f"capabilities {added - explained} are not explained in docs/kubernetes.md"
    names = {c["name"]: set(c["securityContext"]["capabilities"]["add"]) for c in agent_pod(rendered)["containers"]}
    assert names["agent"] == allowed
    # No NET_RAW: a socket's first SO_BINDTODEVICE needs none (tests/shoal/local/test_containers.py).
    assert names["proxy"] == {"BPF", "NET_ADMIN", "SYS_ADMIN"}, "the proxy needs no PERFMON, NET_RAW or SYS_PTRACE"


def test_bidirectional_mounts_only_where_kubernetes_allows_them(everything):
    """The API server refuses Bidirectional propagation outside privileged containers."""
    for _obj, c in containers(everything):
        for mount in c.get("volumeMounts") or []:
            if mount.get("mountPropagation") == "Bidirectional":
                assert (c.get("securityContext") or {}).get("privileged"), f"{c['name']}: {mount['name']}"


def test_agent_mounts_what_the_data_path_needs(rendered):
    spec = agent_pod(rendered)
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert set(host_paths.values()) == {"/sys/fs/bpf", "/sys/fs/cgroup", "/proc", "/lib/modules", "/usr/src",
                                        "/var/run/shoal"}
    agent = next(c for c in spec["containers"] if c["name"] == "agent")
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert mounts["bpffs"]["mountPath"] == "/sys/fs/bpf" and mounts["bpffs"]["mountPropagation"] == "HostToContainer"
    for name in ("cgroup", "host-proc", "lib-modules", "usr-src"):
        assert mounts[name]["readOnly"] is True, name
    env = {e["name"]: e for e in agent["env"]}
    # The agent finds the host paths through env (shoal.kubernetes.KubernetesLayout.from_env).
    assert env["SHOAL_HOST_PROC"]["value"] == mounts["host-proc"]["mountPath"]
    assert env["SHOAL_CGROUP_ROOT"]["value"] == mounts["cgroup"]["mountPath"]
    assert env["SHOAL_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    token = next(v for v in spec["volumes"] if v["name"] == "shoal-token")["projected"]["sources"][0]
    # The token must be one the controller accepts: its audience among those it reviews
    # with, and its ServiceAccount among the agents it lets in.
    from shoal.controller.config import ControllerConfig
    controller = pod_spec(find(rendered, "Deployment", "shoal-controller"))["containers"][0]
    accepted = ControllerConfig.from_args(controller["args"])
    audience = token["serviceAccountToken"].get("audience")
    assert (audience in accepted.token_audiences) if audience else not accepted.token_audiences
    ds = find(rendered, "DaemonSet", "shoal-agent")
    assert f"{ds['metadata']['namespace']}/{spec['serviceAccountName']}" in accepted.agent_service_accounts
    assert env["SHOAL_TOKEN_FILE"]["value"].endswith("/" + token["serviceAccountToken"]["path"])
    assert spec["automountServiceAccountToken"] is False


def test_agent_rolls_one_node_at_a_time_and_runs_everywhere(rendered):
    ds = find(rendered, "DaemonSet", "shoal-agent")
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    assert {"operator": "Exists"} in pod_spec(ds)["tolerations"]
    for c in pod_spec(ds)["containers"]:
        assert c["readinessProbe"] and c["livenessProbe"], c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]


def test_every_workload_has_probes_and_resources(everything):
    for obj, c in containers(everything):
        assert "readinessProbe" in c, f"{obj['metadata']['name']}/{c['name']}"
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], c["name"]


# -- ports ------------------------------------------------------------------------------


def resolved_env(container, rendered) -> dict[str, str]:
    config = find(rendered, "ConfigMap", CONFIG_MAP)["data"]
    env = {}
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == CONFIG_MAP and ref["key"] in config, e
            env[e["name"]] = config[ref["key"]]
        else:
            env[e["name"]] = "node-1"
    return env


def ports_opened_by(container, rendered) -> set[int]:
    """What the process in ``container`` listens on, from its own config's defaults."""
    module = container["command"][2]
    # Ports do not depend on the node's host paths, which Kubernetes mode checks on parse.
    env = {k: v for k, v in resolved_env(container, rendered).items() if k != "SHOAL_MODE"}
    if module == "shoal.controller":
        from shoal.controller.config import ControllerConfig
        cfg = ControllerConfig.from_args(container.get("args") or [])
        return {int(cfg.grpc_address.rsplit(":", 1)[1]), shoal_config.PORT_CONTROLLER_METRICS,
                shoal_config.PORT_HUBBLE_RELAY}
    if module == "shoal.agent.ztunnel":
        ProxyConfig = pytest.importorskip("shoal.agent.ztunnel.config", reason="node proxy config not landed").ProxyConfig
        cfg = ProxyConfig.from_args(container.get("args") or [], env=env)
        return {cfg.metrics_port, cfg.ready_port}   # admin (15000) is loopback only
    if module == "shoal.agent":
        from shoal.agent.config import AgentConfig
        from shoal.agent.hubble.config import HubbleConfig
        hubble = HubbleConfig(node_name=env["SHOAL_NODE"])
        return {int(hubble.tcp_address.rsplit(":", 1)[1]), AgentConfig.__dataclass_fields__["metrics_port"].default}
    if module == "shoal.waypoint":
        WaypointConfig = pytest.importorskip("shoal.waypoint.config", reason="waypoint config not landed").WaypointConfig
        cfg = WaypointConfig.from_args(container.get("args") or [], env=env)
        return {cfg.hbone_address[1], cfg.metrics_port, cfg.ready_port}
    if module == "shoal.agent.k8s":
        return set()
    raise AssertionError(f"unknown component {module}")


def test_probe_and_container_ports_are_ones_the_process_opens(everything, rendered):
    for obj, c in containers(everything):
        opened = ports_opened_by(c, rendered)
        named = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
        assert set(named.values()) <= opened, f"{c['name']} declares {set(named.values()) - opened}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            handler = c.get(probe) or {}
            for kind in ("httpGet", "grpc", "tcpSocket"):
                if kind in handler:
                    port = handler[kind]["port"]
                    port = named[port] if isinstance(port, str) else port
                    assert port in opened, f"{obj['metadata']['name']}/{c['name']} {probe} probes {port}"


def test_service_ports_reach_ports_the_process_opens(everything, rendered):
    for svc in (o for o in everything if o["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        backends = [o for o in workloads(everything)
                    if selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
                    and o["metadata"].get("namespace") == svc["metadata"].get("namespace")]
        assert backends, f"Service {svc['metadata']['name']} selects nothing"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in backends:
                for c in pod_spec(workload)["containers"]:
                    named = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
                    number = named.get(target) if isinstance(target, str) else target
                    if number is not None:
                        assert number in ports_opened_by(c, rendered)
                        break
                else:
                    raise AssertionError(f"{svc['metadata']['name']}:{target} reaches no container port")


def test_controller_service_exposes_config_relay_and_metrics(rendered):
    svc = find(rendered, "Service", "shoal-controller")
    assert {p["port"] for p in svc["spec"]["ports"]} == {
        shoal_config.PORT_CONTROLLER_GRPC, shoal_config.PORT_HUBBLE_RELAY, shoal_config.PORT_CONTROLLER_METRICS}
    find(rendered, "PodDisruptionBudget", "shoal-controller")


# -- images -----------------------------------------------------------------------------


def dockerfile_titles() -> dict[str, str]:
    titles = {}
    for path in (REPO / "images").glob("*.Dockerfile"):
        match = re.search(r'org\.opencontainers\.image\.title="([^"]+)"', path.read_text())
        assert match, f"{path.name} has no image title label"
        titles[match.group(1)] = path.name
    return titles


def test_every_container_image_is_built_by_a_dockerfile(everything):
    titles = dockerfile_titles()
    for _obj, c in containers(everything):
        name = c["image"].rsplit("/", 1)[-1].split(":")[0]
        assert name in SHOAL_IMAGES and name in titles, f"{c['image']} is built by no Dockerfile"


def test_every_container_command_is_a_runnable_module(everything):
    missing = []
    for _obj, c in containers(everything):
        assert c["command"][:2] == ["python", "-m"], c["name"]
        module = c["command"][2]
        spec = importlib.util.find_spec(module)
        if spec is None or (spec.submodule_search_locations and importlib.util.find_spec(module + ".__main__") is None):
            missing.append(module)
    if missing:
        pytest.skip(f"entry points not landed yet (other areas): {sorted(set(missing))}")


# -- RBAC -------------------------------------------------------------------------------


def test_rbac_is_least_privilege(rendered):
    bindings = [o for o in rendered if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    bound = {s["name"] for b in bindings for s in b["subjects"]}
    assert bound == {"shoal-controller"}, "only the controller talks to the API server"
    for role in (o for o in rendered if o["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            if role["kind"] == "ClusterRole":
                assert "secrets" not in rule["resources"], "secrets only inside shoal-system"
    cluster = find(rendered, "ClusterRole", "shoal-controller")
    write = {r for rule in cluster["rules"] for r in rule["resources"]
             if set(rule["verbs"]) & {"create", "update", "patch", "delete"}}
    assert write <= {"gateways/status", "httproutes/status", "grpcroutes/status", "tokenreviews",
                     "deployments", "services", "serviceaccounts", "configmaps", "events"}


CORE_RESOURCES = {"Namespace": ("", "namespaces"), "Pod": ("", "pods"), "Service": ("", "services"),
                  "ServiceAccount": ("", "serviceaccounts"), "Node": ("", "nodes"),
                  "EndpointSlice": ("discovery.k8s.io", "endpointslices"),
                  "Gateway": ("gateway.networking.k8s.io", "gateways"),
                  "HTTPRoute": ("gateway.networking.k8s.io", "httproutes"),
                  "GRPCRoute": ("gateway.networking.k8s.io", "grpcroutes")}


def test_controller_may_list_and_watch_every_kind_it_watches(rendered):
    from shoal.controller.model import WATCHED_KINDS
    resources = dict(CORE_RESOURCES)
    for crd in (o for o in rendered if o["kind"] == "CustomResourceDefinition"):
        resources[crd["spec"]["names"]["kind"]] = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
    rules = find(rendered, "ClusterRole", "shoal-controller")["rules"]
    for kind in WATCHED_KINDS:
        group, plural = resources[kind]
        granted = {v for r in rules if group in r["apiGroups"] and plural in r["resources"] for v in r["verbs"]}
        assert {"list", "watch"} <= granted, f"the controller watches {kind} but may not list/watch {plural}"
    watched = {resources[kind][1] for kind in WATCHED_KINDS}
    # Beyond what it watches, it reads only the waypoint instances and root-cert ConfigMaps it owns.
    read = {res for r in rules if {"list", "watch"} & set(r["verbs"]) for res in r["resources"]}
    assert read - watched <= {"deployments", "configmaps"}, f"needless read access: {read - watched}"
    token_review = [r for r in rules if "tokenreviews" in r["resources"]]
    assert token_review and token_review[0]["verbs"] == ["create"]


def test_agent_and_proxy_configs_accept_the_daemonset_env(rendered, monkeypatch, tmp_path):
    """With the DaemonSet's env on a node named like a cloud VM, both sides meet at /var/run/shoal."""
    from shoal.agent.config import AgentConfig
    from shoal.agent.ztunnel.config import ProxyConfig
    (tmp_path / "cgroup.controllers").write_text("")
    pods = {c["name"]: c for c in agent_pod(rendered)["containers"]}
    run_dir = next(m["mountPath"] for m in pods["agent"]["volumeMounts"] if m["name"] == "run")
    env = resolved_env(pods["agent"], rendered) | {"SHOAL_NODE": "ip-10-0-1-17.ec2.internal",
                                                   "SHOAL_CGROUP_ROOT": str(tmp_path)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    agent = AgentConfig.from_args([])
    proxy = ProxyConfig.from_args([], env=env)
    assert str(agent.zds_socket) == proxy.zds_path == f"{run_dir}/zds.sock"


def test_controller_runs_two_replicas_electing_a_leader_on_a_lease(rendered):
    from shoal.controller.config import ControllerConfig
    deployment = find(rendered, "Deployment", "shoal-controller")
    assert deployment["spec"]["replicas"] == 2
    container = pod_spec(deployment)["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    config = ControllerConfig.from_args(container["args"])
    assert config.leader_elect and config.lease_name == "shoal-controller"
    role = find(rendered, "Role", "shoal-controller")
    assert any("leases" in r["resources"] and {"get", "create", "update"} <= set(r["verbs"])
               for r in role["rules"])
    cluster_role = find(rendered, "ClusterRole", "shoal-controller")
    assert any("pods" in r["resources"] and "get" in r["verbs"] for r in cluster_role["rules"])


def host_path_of(spec, container, path: str) -> str:
    """Where ``path`` inside ``container`` of pod ``spec`` lies on the node (its hostPath mounts)."""
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for mount in sorted(container.get("volumeMounts") or [], key=lambda m: -len(m["mountPath"])):
        inside = mount["mountPath"].rstrip("/")
        if (path == inside or path.startswith(inside + "/")) and "hostPath" in volumes[mount["name"]]:
            return volumes[mount["name"]]["hostPath"]["path"].rstrip("/") + path[len(inside):]
    raise AssertionError(f"{path} is on no hostPath volume of {container['name']}")


def test_a_waypoint_reports_l7_flows_to_its_own_nodes_agent(rendered, monkeypatch, tmp_path):
    """The waypoint template's pod and the agent DaemonSet meet at one socket on the node, as
    Cilium's Envoy and agent do: the waypoint's flows socket (its env, through its hostPath
    mount) is the agent's (its layout, through its run mount). The waypoint sees only that
    folder, read-only (not the agent's ZDS socket or its state), and nothing else of the host."""
    from shoal.kubernetes import layout_from_env
    from shoal.waypoint.config import WaypointConfig
    from tests.shoal.cli.deploy.deploybed import waypoint_objects

    (tmp_path / "cgroup.controllers").write_text("")
    agent_spec = agent_pod(rendered)
    agent = next(c for c in agent_spec["containers"] if c["name"] == "agent")
    layout = layout_from_env(resolved_env(agent, rendered) | {"SHOAL_CGROUP_ROOT": str(tmp_path)})
    agent_socket = host_path_of(agent_spec, agent, str(layout.flows_socket("node-1")))

    waypoint_spec = pod_spec(next(o for o in waypoint_objects(rendered) if o["kind"] == "Deployment"))
    waypoint = waypoint_spec["containers"][0]
    config = WaypointConfig.from_args([], env=resolved_env(waypoint, rendered))
    assert config.emit_flows and host_path_of(waypoint_spec, waypoint, config.flows_path) == agent_socket

    host_mounts = [(m, next(v for v in waypoint_spec["volumes"] if v["name"] == m["name"]))
                   for m in waypoint["volumeMounts"]]
    host_mounts = [(m, v) for m, v in host_mounts if "hostPath" in v]
    assert [(v["hostPath"]["path"], m.get("readOnly")) for m, v in host_mounts] == [
        (str(layout.flows_dir("node-1")), True)]
    assert agent_socket.startswith(str(layout.flows_dir("node-1")) + "/")
    zds = host_path_of(agent_spec, agent, str(layout.zds_socket("node-1")))
    assert not zds.startswith(str(layout.flows_dir("node-1")) + "/")
