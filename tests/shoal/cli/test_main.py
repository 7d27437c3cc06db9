"""Pure parts of the CLI: the status view, mesh membership, document loading."""
import click
import pytest

from shoal.cli.main import _load_documents, mesh_membership, pod_is_meshed, render_status


def test_status_marks_nodes_behind_and_missing_components():
    report = {
        "controller": {"ready": True, "version": "7", "resources": {"workload": 5, "service": 2},
                       "agents": [{"node": "node-1", "component": "agent", "version": "7"},
                                  {"node": "node-1", "component": "proxy", "version": "7"},
                                  {"node": "node-2", "component": "agent", "version": "6", "last_nack": "bad"}]},
        "flows": {"flows": {"current": 10, "max": 100, "rate": 2.5}, "nodes": {"connected": 1, "unavailable": ["node-2"]}},
    }
    text = render_status(report).splitlines()
    assert text[0] == "Controller:  ready, config version 7 (5 workloads, 2 services)"
    assert "  node-1     agent: v7 in sync   proxy: v7 in sync" in text
    assert "  node-2     agent: v6 behind (at 6), last NACK: bad   proxy: not connected" in text
    assert text[-1] == "Flows:       10/100 (10.00%), 2.5 flows/s, 1 node(s) connected, unavailable: node-2"


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
