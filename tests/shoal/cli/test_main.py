"""Pure parts of the CLI: the status view, mesh membership, document loading."""
import click
import pytest

from shoal.cli.main import _load_documents, mesh_membership, pod_is_meshed, render_status


def test_status_shows_each_components_build_config_version_and_health():
    def peer(node, component, version="7", **extra):
        return {"node": node, "component": component, "version": version, "build_version": "0.1.0",
                "connected": True, "health": "healthy", **extra}
    report = {
        "controller": {"ready": True, "version": "7", "build_version": "0.1.0",
                       "resources": {"workload": 5, "service": 2},
                       "agents": [peer("node-1", "agent"), peer("node-1", "proxy"),
                                  peer("node-2", "agent", "6", health="stale", unanswered_for=42.3,
                                       last_nack={"message": "bad"}),
                                  peer("node-3", "agent", "5", connected=False, health="disconnected"),
                                  peer("node-3", "proxy", "7", health="syncing"),
                                  # an older controller: no build version, no health
                                  {"node": "node-4", "component": "agent", "version": "6"},
                                  peer("waypoint-demo.waypoint", "waypoint")]},
        "flows": {"flows": {"current": 10, "max": 100, "rate": 2.5}, "nodes": {"connected": 1, "unavailable": ["node-2"]},
                  "per_node": {"node-1": {"state": "NODE_CONNECTED", "version": "shoal-0.1.0"}}},
    }
    text = render_status(report).splitlines()
    assert text[0] == "Controller:  ready, 0.1.0, config version 7 (5 workloads, 2 services)"
    assert text[1] == "Nodes:       4 connected"
    assert ("  node-1     agent: 0.1.0, config v7, healthy   proxy: 0.1.0, config v7, healthy"
            "   flows: healthy (shoal-0.1.0)") in text
    assert "  node-2     agent: 0.1.0, config v6, STALE (no ACK for 42s), last NACK: bad   proxy: not connected" in text
    assert "  node-3     agent: 0.1.0, DISCONNECTED (last config v5)   proxy: 0.1.0, config v7, syncing" in text
    assert "  node-4     agent: unknown, config v6, behind   proxy: not connected" in text
    assert "Waypoints:   demo.waypoint: 0.1.0, config v7, healthy" in text
    assert text[-1] == "Flows:       10/100 (10.00%), 2.5 flows/s, 1 node(s) connected, unavailable: node-2"


def test_status_counts_a_node_with_nothing_connected_as_disconnected():
    gone = {"node": "node-1", "component": "agent", "version": "3", "build_version": "0.1.0", "connected": False}
    text = render_status({"controller": {"ready": True, "version": "3", "agents": [gone]},
                          "flows": {"error": "relay down"}}).splitlines()
    assert text[1] == "Nodes:       0 connected, 1 disconnected"
    assert "agent: 0.1.0, DISCONNECTED (last config v3)" in text[2]


def test_status_without_relay_says_why():
    text = render_status({"controller": {"ready": False, "agents": []}, "flows": {"error": "relay down"}})
    assert "NOT READY" in text and text.endswith("Flows:       unavailable (relay down)")


def test_mesh_membership_honours_label_alias_and_pod_opt_out():
    namespaces = [{"metadata": {"name": "a", "labels": {"shoal.io/mesh": "enabled"}}},
                  {"metadata": {"name": "b", "labels": {"istio.io/dataplane-mode": "ambient"}}},
                  {"metadata": {"name": "c", "labels": {"shoal.io/mesh": "disabled"}}}]
    joined = mesh_membership(namespaces)
    assert joined == {"a", "b"}
    assert pod_is_meshed({"metadata": {"namespace": "a"}}, joined)
    assert not pod_is_meshed({"metadata": {"namespace": "a", "labels": {"shoal.io/mesh": "disabled"}}}, joined)
    assert not pod_is_meshed({"metadata": {"namespace": "c"}}, joined)


def test_documents_load_lists_and_refuse_empty(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("kind: List\nitems: [{kind: Namespace, metadata: {name: a}}]\n---\nkind: Namespace\nmetadata: {name: b}\n")
    assert [d["metadata"]["name"] for d in _load_documents((str(f),))] == ["a", "b"]
    f.write_text("# nothing\n")
    with pytest.raises(click.BadParameter, match="no objects"):
        _load_documents((str(f),))
    with pytest.raises(click.BadParameter, match="No such file"):
        _load_documents((str(tmp_path / "missing.yaml"),))


def test_every_shoal_command_the_makefile_runs_exists():
    import re
    from pathlib import Path

    from shoal.cli.main import cli
    makefile = (Path(__file__).resolve().parents[3] / "Makefile").read_text()
    used = set(re.findall(r"\$\(SHOAL\) ([a-z-]+)", makefile))
    assert {"up", "down"} <= used
    ctx = click.Context(cli)
    missing = {name for name in used if cli.get_command(ctx, name) is None}
    assert not missing, f"the Makefile runs shoal commands that do not exist: {missing}"


def test_documents_refuse_non_utf8_and_deep_nesting_with_a_clear_error(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"kind: Pod\nname: \xff\xfe\n")
    with pytest.raises(click.BadParameter, match="not UTF-8"):
        _load_documents((str(binary),))
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 20000 + "]" * 20000)
    with pytest.raises(click.BadParameter, match="nested too deeply"):
        _load_documents((str(deep),))


def test_status_lists_each_proxy_worker_and_flags_a_stale_report():
    import time

    peer = {"node": "node-1", "component": "proxy", "version": "7", "build_version": "0.1.0", "health": "healthy"}
    workers = {"proxy": 10, "time": time.time(), "workers_wanted": 2, "restarts": 1, "lost_connections": 3,
               "workers": [{"index": 0, "pid": 11, "health": "ready", "connections": 5, "handled": 40,
                            "pods": ["demo/a", "demo/b"]},
                           {"index": 1, "pid": 12, "health": "starting", "connections": 0, "handled": 0, "pods": []}]}
    text = render_status({"controller": {"ready": True, "version": "7", "agents": [peer]},
                          "flows": {"error": "x"}, "proxy_workers": {"node-1": workers}}).splitlines()
    assert "             proxy workers: 1/2 ready, 1 restart, 3 connections lost" in text
    assert "               worker 0: pid 11, ready, 5 connections (40 handled), 2 pods" in text
    assert "               worker 1: pid 12, starting, 0 connections (0 handled), 0 pods" in text
    stale = render_status({"controller": {"ready": True, "version": "7", "agents": [peer]}, "flows": {"error": "x"},
                           "proxy_workers": {"node-1": {**workers, "time": time.time() - 60}}})
    assert "(STALE: is the node proxy running?)" in stale

    # RSS per worker and for the node proxy in all (its supervisor named beside it).
    measured = {**workers, "rss_kib": 3 * 40960, "supervisor_rss_kib": 61440,
                "workers": [{**w, "rss_kib": 30720} for w in workers["workers"]]}
    text = render_status({"controller": {"ready": True, "version": "7", "agents": [peer]},
                          "flows": {"error": "x"}, "proxy_workers": {"node-1": measured}}).splitlines()
    assert ("             proxy workers: 1/2 ready, 1 restart, 3 connections lost, "
            "RSS 120.0 MB in all (supervisor 60.0 MB)") in text
    assert "               worker 0: pid 11, ready, 5 connections (40 handled), 2 pods, RSS 30.0 MB" in text


def test_logs_show_a_containers_messages_without_the_cri_prefix_as_kubectl_does(tmp_path):
    """podman's k8s-file driver writes "<time> <stream> <P|F> <message>": `shoal logs` shows
    the message, a split line (P, then F) joined; a host process's log is shown as it is."""
    from click.testing import CliRunner

    from shoal.cli.main import logs
    from shoal.config import ClusterLayout

    layout = ClusterLayout(name="logs-test", run_root=tmp_path)
    (layout.log_dir / "pods").mkdir(parents=True)
    (layout.log_dir / "pods" / "demo_waypoint-0_waypoint.log").write_text(
        "2026-12-02T15:01:02.123456789+00:00 stdout F first\n"
        "2026-12-02T15:01:02.2Z stderr P a long \n"
        "2026-12-02T15:01:02.3Z stderr F line, joined\n"
        "2026-12-02T15:01:03Z stdout F {\"response_code\": 403}\n")
    (layout.log_dir / "controller.log").write_text("2026-12-02 15:01:02 INFO stdout F as a process wrote it\n")
    shown = CliRunner().invoke(logs, ["demo/waypoint-0"], obj=layout)
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines() == ["first", "a long line, joined", '{"response_code": 403}']
    assert CliRunner().invoke(logs, ["demo/waypoint-0", "--tail", "1"], obj=layout).output == '{"response_code": 403}\n'
    assert CliRunner().invoke(logs, ["controller"], obj=layout).output == "2026-12-02 15:01:02 INFO stdout F as a process wrote it\n"
