"""A Kubernetes node's layout for the agent and the node proxy: from the DaemonSet's env, cgroup v2 found."""
from __future__ import annotations

from pathlib import Path

import pytest

from shoal.kubernetes import KubernetesLayout, KubernetesModeError, cgroup2_root, layout_from_env


def test_cgroup2_root_unified_hybrid_and_missing(tmp_path):
    unified = tmp_path / "unified-host"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("cpu memory\n")
    assert cgroup2_root(unified) == unified
    hybrid = tmp_path / "hybrid-host"
    (hybrid / "unified").mkdir(parents=True)
    (hybrid / "unified" / "cgroup.controllers").write_text("")
    assert cgroup2_root(hybrid) == hybrid / "unified"
    with pytest.raises(KubernetesModeError, match="cgroup v2"):
        cgroup2_root(tmp_path / "v1-only")


def test_layout_from_the_daemonset_env(tmp_path):
    (tmp_path / "cg" / "unified").mkdir(parents=True)
    (tmp_path / "cg" / "unified" / "cgroup.controllers").write_text("")
    layout = KubernetesLayout.from_env({"SHOAL_CGROUP_ROOT": str(tmp_path / "cg"), "SHOAL_RUN_DIR": "/var/run/shoal",
                                        "SHOAL_BPFFS": "/sys/fs/bpf", "SHOAL_HOST_PROC": "/host/proc"})
    assert layout.node_cgroup("node-a") == tmp_path / "cg" / "unified"
    assert layout.zds_socket("node-a") == Path("/var/run/shoal/zds.sock")
    assert layout.flows_socket("node-a") == Path("/var/run/shoal/flows/flows.sock")
    assert layout.bpf_pin_dir("node-a") == Path("/sys/fs/bpf/shoal/node-a")
    assert layout.proc_root == Path("/host/proc")
    assert layout.netns_dir is None          # pods are found through /host/proc


def test_a_daemonset_rendered_for_a_local_cluster_names_its_netns_folder(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("")
    layout = KubernetesLayout.from_env({"SHOAL_CGROUP_ROOT": str(tmp_path), "SHOAL_CLUSTER": "c1",
                                        "SHOAL_NETNS_DIR": "/host/run/netns"})
    assert layout.netns_dir == Path("/host/run/netns")
    assert layout.node_cgroup("node-2") == tmp_path        # the node's own cgroup, mounted as the root
    assert layout.bpf_pin_dir("node-2") == Path("/sys/fs/bpf/c1/node-2")   # where process mode pins
    with pytest.raises(KubernetesModeError):
        layout.pod_cgroup("node-a", "demo", "web-0")


def test_mode_picks_the_layout(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("")
    k8s = layout_from_env({"SHOAL_MODE": "kubernetes", "SHOAL_CGROUP_ROOT": str(tmp_path)})
    assert isinstance(k8s, KubernetesLayout) and k8s.node_cgroup("any-node-name") == tmp_path
    local = layout_from_env({"SHOAL_CLUSTER": "shoal-t1"})
    assert not isinstance(local, KubernetesLayout) and local.name == "shoal-t1"
