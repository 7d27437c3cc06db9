"""`shoal waypoint` against a real controller store and local API; the launcher's Deployments."""
import asyncio
import json
import threading
import time

import pytest
from click.testing import CliRunner

from shoal.cli import waypoint as cli
from shoal.config import ClusterLayout
from shoal.controller.localapi import build_app, serve_unix
from shoal.controller.store import Store
from shoal.local.apiclient import ApiClient
from shoal.local.waypoints import LABEL_GATEWAY_NAME, LocalWaypointLauncher, plan

LAYOUT = ClusterLayout(name="shoal-wp-test")


@pytest.fixture
def api(tmp_path, monkeypatch):
    """The controller's local API on a Unix socket, served from a thread."""
    seed = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": {"shoal.io/mesh": "enabled"}}},
                 {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "demo",
                                                                      "labels": {"shoal.io/use-waypoint": "waypoint"}},
                  "spec": {"selector": {"app": "web"}, "ports": [{"port": 8080}]}}]
    loop = asyncio.new_event_loop()
    path = tmp_path / "controller.sock"
    started = threading.Event()

    def serve():
        # sqlite objects belong to the thread that made them: the store lives in the server thread.
        asyncio.set_event_loop(loop)
        store = Store(tmp_path / "store.db")
        store.apply(seed)
        LocalWaypointLauncher(store, ClusterLayout(name=LAYOUT.name, run_root=tmp_path), python="/usr/bin/python3").attach()
        runner = loop.run_until_complete(serve_unix(build_app(store, lambda: {}), path))
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        store.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    monkeypatch.setattr(cli, "_client", lambda: ApiClient(path))
    yield _Reader(ApiClient(path))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


class _Reader:
    """get/list through the API (the store itself stays in its thread)."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    def list(self, kind, namespace=None):
        return self.client.list(kind, namespace)

    def get(self, kind, namespace, name):
        return next((o for o in self.client.list(kind, namespace or None) if o["metadata"]["name"] == name), None)


def test_apply_list_delete(api):
    runner = CliRunner()
    result = runner.invoke(cli.waypoint, ["apply", "-n", "demo", "--enroll-namespace"])
    assert result.exit_code == 0, result.output
    gw = api.get("Gateway", "demo", "waypoint")
    assert gw["spec"]["gatewayClassName"] == "shoal-waypoint"
    assert api.get("Namespace", "", "demo")["metadata"]["labels"]["shoal.io/use-waypoint"] == "waypoint"
    assert api.get("Namespace", "", "demo")["metadata"]["labels"]["shoal.io/mesh"] == "enabled"  # kept
    # The launcher turned the Gateway into a Deployment and the store into a Pod.
    for _ in range(50):
        if api.get("Deployment", "demo", "waypoint"):
            break
        time.sleep(0.05)
    dep = api.get("Deployment", "demo", "waypoint")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][1:] == ["-m", "shoal.waypoint"]
    assert container["args"][:4] == ["--name", "waypoint", "--namespace", "demo"]
    pods = [p for p in api.list("Pod", "demo") if p["metadata"]["labels"].get(LABEL_GATEWAY_NAME) == "waypoint"]
    assert len(pods) == 1 and pods[0]["metadata"]["labels"]["shoal.io/mesh"] == "disabled"

    result = runner.invoke(cli.waypoint, ["list", "-n", "demo"])
    assert result.exit_code == 0 and "waypoint" in result.output and "namespace, svc/web" in result.output

    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}

    result = runner.invoke(cli.waypoint, ["delete", "-n", "demo"])
    assert result.exit_code == 0, result.output
    # What --enroll-namespace added is gone; the user's own labels stay; a Service still
    # labelled to use the waypoint is named.
    labels = api.get("Namespace", "", "demo")["metadata"]["labels"]
    assert "shoal.io/use-waypoint" not in labels and labels["shoal.io/mesh"] == "enabled"
    assert "label removed" in result.output and "still labelled to use it" in result.output
    assert "web" in result.output
    # The waypoint outlives its Gateway for the drain period: routes move away first.
    assert api.get("Deployment", "demo", "waypoint") is not None
    for _ in range(100):
        if not api.get("Deployment", "demo", "waypoint"):
            break
        time.sleep(0.05)
    assert api.get("Deployment", "demo", "waypoint") is None
    assert not [p for p in api.list("Pod", "demo") if p["metadata"]["labels"].get(LABEL_GATEWAY_NAME)]


def waypoint_pods(api) -> list[str]:
    return [p["metadata"]["name"] for p in api.list("Pod", "demo") if p["metadata"]["labels"].get(LABEL_GATEWAY_NAME)]


def applied_with_its_pod(runner, api) -> None:
    assert runner.invoke(cli.waypoint, ["apply", "-n", "demo"]).exit_code == 0
    for _ in range(100):
        if waypoint_pods(api):
            return
        time.sleep(0.05)
    raise AssertionError("the launcher made no waypoint pod")


def test_delete_wait_returns_once_the_waypoint_pod_is_gone(api):
    """Without --wait the pod outlives the command by the drain period (2 s here), which
    once leaked demo/waypoint-0 into the next cluster test; with it, nothing is left."""
    runner = CliRunner()
    applied_with_its_pod(runner, api)
    result = runner.invoke(cli.waypoint, ["delete", "-n", "demo", "--wait", "30"])
    assert result.exit_code == 0, result.output
    assert "its pods are gone" in result.output and waypoint_pods(api) == []


def test_delete_wait_names_the_pod_still_draining_when_it_times_out(api):
    runner = CliRunner()
    applied_with_its_pod(runner, api)
    result = runner.invoke(cli.waypoint, ["delete", "-n", "demo", "--wait", "0.5"])
    assert result.exit_code != 0 and "waypoint-0 still there after 0.5 s" in result.output
    assert api.get("Gateway", "demo", "waypoint") is None   # deleted all the same


def test_apply_wait_fails_while_the_waypoint_is_not_ready(api):
    """No kubelet here: the pod never gets Ready, so --wait times out and says so."""
    runner = CliRunner()
    result = runner.invoke(cli.waypoint, ["apply", "-n", "demo", "--wait", "0.5"])
    assert result.exit_code != 0 and "not ready after 0.5 s" in result.output
    listed = runner.invoke(cli.waypoint, ["list", "-n", "demo", "-o", "json"])
    assert json.loads(listed.output)[0]["ready"] is False


def test_bad_arguments_are_refused(api):
    runner = CliRunner()
    assert runner.invoke(cli.waypoint, ["apply", "-n", "Not_A_Namespace"]).exit_code != 0
    assert runner.invoke(cli.waypoint, ["apply"]).exit_code != 0
    result = runner.invoke(cli.waypoint, ["delete", "ghost", "-n", "demo"])
    assert result.exit_code != 0 and "not found" in result.output


def test_plan_ignores_other_gateway_classes_and_user_deployments():
    gateways = [{"metadata": {"name": "waypoint", "namespace": "demo"}, "spec": {"gatewayClassName": "shoal-waypoint"}},
                {"metadata": {"name": "edge", "namespace": "demo"}, "spec": {"gatewayClassName": "nginx"}}]
    user = {"metadata": {"name": "web", "namespace": "demo", "labels": {}}, "spec": {}}
    to_apply, to_delete = plan(gateways, [user], LAYOUT)
    assert [d["metadata"]["name"] for d in to_apply] == ["waypoint"] and to_delete == []
    to_apply, to_delete = plan([], [user] + to_apply, LAYOUT)
    assert to_apply == [] and [d["metadata"]["name"] for d in to_delete] == ["waypoint"]


def gateway_store(tmp_path) -> Store:
    """A store with a node, namespace demo and a waypoint Gateway in it."""
    store = Store(tmp_path / "store.db")
    store.apply([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}},
                 {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}},
                 {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                  "metadata": {"name": "waypoint", "namespace": "demo"},
                  "spec": {"gatewayClassName": "shoal-waypoint"}}])
    return store


def test_deployment_removed_only_after_the_drain_period(tmp_path):
    now = [100.0]
    store = gateway_store(tmp_path)
    try:
        launcher = LocalWaypointLauncher(store, ClusterLayout(name=LAYOUT.name, run_root=tmp_path),
                                         drain_seconds=2.0, clock=lambda: now[0])
        launcher.reconcile()
        assert store.get("Deployment", "demo", "waypoint") is not None
        store.delete([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                       "metadata": {"name": "waypoint", "namespace": "demo"}}])
        launcher.reconcile()
        now[0] += 1.9
        launcher.reconcile()
        assert store.get("Deployment", "demo", "waypoint") is not None
        now[0] += 0.2
        launcher.reconcile()
        assert store.get("Deployment", "demo", "waypoint") is None
    finally:
        store.close()


def test_route_status_says_which_backend_is_missing(tmp_path):
    """Gateway API route status: ResolvedRefs False / BackendNotFound names the missing
    Service (the waypoint answers 500 to what the rule matches), and flips back once it exists."""
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "split", "namespace": "demo"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 8080}],
                      "rules": [{"backendRefs": [{"name": "web-v1", "port": 8080, "weight": 90},
                                                 {"name": "web-v2", "port": 8080, "weight": 10}]}]}}
    service = lambda name: {"apiVersion": "v1", "kind": "Service",  # noqa: E731
                            "metadata": {"name": name, "namespace": "demo"},
                            "spec": {"selector": {"app": name}, "ports": [{"port": 8080}]}}
    store = Store(tmp_path / "store.db")
    try:
        store.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}},
                     service("web"), service("web-v1"), route])
        launcher = LocalWaypointLauncher(store, ClusterLayout(name=LAYOUT.name, run_root=tmp_path))
        launcher.reconcile()

        def conditions():
            parents = store.get("HTTPRoute", "demo", "split")["status"]["parents"]
            assert parents[0]["parentRef"]["name"] == "web" and parents[0]["controllerName"] == "shoal.io/waypoint"
            return {c["type"]: (c["status"], c["reason"], c["message"]) for c in parents[0]["conditions"]}

        assert conditions()["Accepted"][:2] == ("True", "Accepted")
        assert conditions()["ResolvedRefs"] == ("False", "BackendNotFound", "no Service demo/web-v2")
        store.apply([service("web-v2")])
        launcher.reconcile()
        assert conditions()["ResolvedRefs"][:2] == ("True", "ResolvedRefs")
        broken = {**route, "spec": {**route["spec"], "rules": [{"timeouts": {"request": "soon"}}]}}
        store.apply([broken])
        launcher.reconcile()
        assert conditions()["Accepted"][:2] == ("False", "Invalid")
    finally:
        store.close()


def test_gateway_is_programmed_once_its_waypoint_pod_is_ready(tmp_path):
    store = gateway_store(tmp_path)
    try:
        launcher = LocalWaypointLauncher(store, ClusterLayout(name=LAYOUT.name, run_root=tmp_path))
        launcher.reconcile()

        def programmed():
            conditions = store.get("Gateway", "demo", "waypoint")["status"]["conditions"]
            return next((c["status"], c["reason"]) for c in conditions if c["type"] == "Programmed")

        assert programmed() == ("False", "Pending")
        store.update_status("Pod", "demo", "waypoint-0", {"phase": "Running", "podIP": "10.244.1.9",
                                                           "conditions": [{"type": "Ready", "status": "True"}]})
        launcher.reconcile()
        assert programmed() == ("True", "Programmed")
    finally:
        store.close()


class _StatusSequence:
    """The controller's /status as the settle loop polls it."""

    def __init__(self, *answers: dict) -> None:
        self.answers = list(answers)

    def status(self) -> dict:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def _status(version: int, applied: int | None, acked: int, in_flight: int = 0) -> dict:
    status = {"version": str(version), "agents": [
        {"node": "node-1", "component": "proxy", "version": str(acked), "in_flight": in_flight}]}
    if applied is not None:
        status["applied_revision"] = applied
    return status


def test_settle_ends_once_the_write_is_taken_even_if_no_version_moved():
    """A label removal that changes no node's config (the waypoint was not bound yet) moves
    no version: the settle used to wait its whole timeout for one."""
    client = _StatusSequence(_status(34, applied=40, acked=34))
    started = time.monotonic()
    assert cli._nodes_caught_up(client, 34, 40, timeout=5)
    assert time.monotonic() - started < 1


def test_settle_waits_for_the_write_then_for_every_node():
    client = _StatusSequence(_status(34, applied=39, acked=34),      # the model has not taken it yet
                             _status(35, applied=40, acked=34, in_flight=1),   # taken, pushed
                             _status(35, applied=40, acked=35))       # ACKed
    assert cli._nodes_caught_up(client, 34, 40, timeout=5)
    assert client.answers == [_status(35, applied=40, acked=35)]
    assert not cli._nodes_caught_up(_StatusSequence(_status(34, applied=39, acked=34)), 34, 40, timeout=0.3)


def test_settle_with_a_controller_that_has_no_applied_revision_waits_for_the_version():
    assert not cli._nodes_caught_up(_StatusSequence(_status(34, None, 34)), 34, 40, timeout=0.3)
    assert cli._nodes_caught_up(_StatusSequence(_status(35, None, 35)), 34, 40, timeout=5)
