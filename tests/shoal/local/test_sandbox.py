"""Pods isolated like containers (issue 11, item 2): mount namespace, unprivileged uid, no capabilities.

The unit tests check how a pod's security settings (``shoal.podspec``, tested in
tests/shoal/test_podspec.py) become a sandbox; the cluster tests attack a running pod of the
session's demo cluster as a compromised application would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shoal.config import ClusterLayout
from shoal.local.sandbox import (
    POD_UID_BASE,
    default_uid,
    hidden_paths,
    mount_script,
    runtime_exposure,
    setpriv_argv,
)
from shoal.podspec import HostMount, PodSecurity
from tests.conftest import eventually, pod_exec, shoal_cli
from tests.shoal.test_podspec import pod

CAP_NET_ADMIN = 1 << 12


def security(p: dict, env=None) -> PodSecurity:
    return PodSecurity.for_container(p, p["spec"]["containers"][0], default_uid("10.244.1.7", "c1"), env)


# -- unit: manifest -> sandbox -------------------------------------------------------------------


def test_default_is_a_pod_uid_with_no_capabilities_and_no_new_privileges():
    sec = security(pod())
    assert sec.uid == sec.gid == default_uid("10.244.1.7", "c1")
    assert sec.uid % 0x10000 == (POD_UID_BASE + 256 + 7) % 0x10000
    assert sec.capabilities == () and sec.no_new_privs and not sec.privileged
    argv = setpriv_argv(sec, ["app"])
    assert "--bounding-set=-all" in argv and "--inh-caps=-all" in argv and "--no-new-privs" in argv
    assert argv[-2:] == ["--", "app"]


def test_every_pod_ip_gets_its_own_uid_and_each_cluster_its_own_block():
    ips = [f"10.244.{n}.{k}" for n in range(1, 4) for k in range(2, 255)]
    assert len({default_uid(ip, "c1") for ip in ips}) == len(ips)
    assert min(default_uid(ip, "c1") for ip in ips) > 65535   # never a system or login user
    assert default_uid("10.244.1.2", "c1") != default_uid("10.244.1.2", "shoal-test-1234")
    assert max(default_uid("10.244.255.255", str(n)) for n in range(2000)) < 2**31 - 1


def test_capabilities_add_gives_exactly_those_capabilities():
    sec = security(pod(securityContext={"capabilities": {"add": ["NET_ADMIN", "cap_net_raw"]}}))
    assert sec.capabilities == ("NET_ADMIN", "NET_RAW")
    argv = setpriv_argv(sec, ["app"])
    assert "--bounding-set=-all,+net_admin,+net_raw" in argv
    assert "--ambient-caps=-all,+net_admin,+net_raw" in argv   # kept across exec by a non-root uid


def test_the_mesh_state_bpffs_and_cgroupfs_are_hidden():
    layout = ClusterLayout(name="c1", run_root=Path("/var/lib/shoal-c"))
    hidden = hidden_paths(layout)
    for path in ("/var/lib/shoal-c", "/sys/fs/bpf", "/sys/fs/cgroup/unified", "/etc/netns", "/root"):
        assert path in hidden
    script = mount_script(PodSecurity(uid=1, gid=1), layout)
    assert "mount --make-rprivate /" in script and "shoal-run /run" in script
    for private in ("/tmp", "/var/tmp", "/dev/shm"):
        assert f"shoal-pod {private}" in script


def test_a_checkout_under_a_covered_folder_is_bound_back_read_only():
    import shoal
    tree = str(Path(shoal.__file__).resolve().parents[1])
    _, mounts = runtime_exposure(covered=[str(Path(tree).parent)])
    assert HostMount(tree, tree, True) in mounts
    _, mounts = runtime_exposure(covered=["/nonexistent-folder"])
    assert all(m.source != tree for m in mounts) or not os.stat(tree).st_mode & 0o001


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a mount namespace")
def test_host_paths_under_tmp_and_the_source_tree_reach_the_pod(tmp_path):
    """Sources under /tmp (a CI checkout, pytest's tmp_path) and targets under the pod's own
    /tmp survive the covering of /tmp, /run and the hidden folders; the mesh state does not."""
    layout = ClusterLayout(name="sandbox-unit", run_root=tmp_path / "run-root")
    (tmp_path / "run-root").mkdir()
    (tmp_path / "run-root" / "secret").write_text("key")
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello").write_text("hi")
    script = mount_script(PodSecurity(uid=0, gid=0, mounts=(HostMount(str(data), "/tmp/seen", True),)), layout)
    probe = ("import pathlib, shoal.local.sandbox as s, sys; "
             "print(pathlib.Path('/tmp/seen/hello').read_text()); "
             f"print(pathlib.Path({str(tmp_path / 'run-root' / 'secret')!r}).exists())")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                          sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["hi", "False"]


# -- cluster: attack a running pod ----------------------------------------------------------------

ATTEMPT = textwrap.dedent("""
    import json, os, socket, sys
    results = {}
    for path in sys.argv[1:]:
        try:
            with open(path, "rb") as f:
                f.read(1)
            results[path] = "read"
        except OSError as err:
            results[path] = type(err).__name__
    try:
        socket.socket().setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539)
        results["so_mark"] = "set"
    except OSError as err:
        results["so_mark"] = type(err).__name__
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    results["uid"] = os.getuid()
    results["cap_eff"] = int(status["CapEff"].strip(), 16)
    results["cap_bnd"] = int(status["CapBnd"].strip(), 16)
    print(json.dumps(results))
""")


def attempt(layout: ClusterLayout, target: str, *paths: str) -> dict:
    out = pod_exec(layout, target, "python3", "-c", ATTEMPT, *paths).stdout
    return json.loads(out.strip().splitlines()[-1])


def pod_pids(layout: ClusterLayout, namespace: str, name: str) -> list[int]:
    cgroup = next(layout.cgroup.glob(f"*/pods/{namespace}.{name}"))
    return [int(pid) for path in cgroup.rglob("cgroup.procs") for pid in path.read_text().split()]


@pytest.mark.cluster
def test_a_pod_cannot_read_the_mesh_secrets_pins_or_another_pods_files(demo_cluster):
    layout = demo_cluster.layout
    secrets = [layout.ca_dir / "ca-key.pem", layout.credential_key_path, layout.node_credential_path("node-1"),
               *sorted(p for p in layout.bpf_pin_dir("node-1").iterdir() if p.is_file())[:3]]
    for secret in secrets:   # they are there, for root on the machine
        assert secret.exists(), secret
    # db-0 leaves a world-readable file in its /tmp; web-0 looks for it directly and through /proc.
    pod_exec(layout, "demo/db-0", "sh", "-c", "echo private > /tmp/db-secret && chmod 644 /tmp/db-secret")
    db_pid = next(pid for pid in pod_pids(layout, "demo", "db-0")
                  if os.stat(f"/proc/{pid}").st_uid != 0)
    agent_pid = int((layout.run_dir / "agent-node-1.pid").read_text())
    paths = [*map(str, secrets), "/tmp/db-secret", f"/proc/{db_pid}/root/tmp/db-secret",
             f"/proc/{db_pid}/environ", f"/proc/{agent_pid}/environ", "/run/netns/" + layout.pod_netns("demo", "db-0")]
    seen = attempt(layout, "demo/web-0", *paths)
    for path in paths:
        assert seen[path] != "read", f"a pod read {path}"
    assert seen[str(layout.ca_dir / "ca-key.pem")] == "FileNotFoundError"   # hidden, not just denied
    assert seen["/tmp/db-secret"] == "FileNotFoundError"                    # each pod its own /tmp
    assert seen[f"/proc/{db_pid}/root/tmp/db-secret"] == "PermissionError"  # another uid
    assert pod_exec(layout, "demo/db-0", "cat", "/tmp/db-secret").stdout == "private\n"


@pytest.mark.cluster
def test_a_pod_runs_as_its_own_uid_without_capabilities_and_cannot_set_the_proxy_mark(demo_cluster):
    layout = demo_cluster.layout
    seen = attempt(layout, "demo/web-0")
    assert seen["uid"] >= POD_UID_BASE and seen["cap_eff"] == 0 and seen["cap_bnd"] == 0
    assert seen["so_mark"] == "PermissionError"
    other = attempt(layout, "demo/db-0")
    assert other["uid"] != seen["uid"]
    # The pod's own processes, not only what `shoal exec` starts.
    for pid in pod_pids(layout, "demo", "web-0"):
        status = Path(f"/proc/{pid}/status").read_text()
        if "\nUid:\t0" not in status:
            assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status


NET_ADMIN_POD = """
apiVersion: v1
kind: Pod
metadata: {name: netadmin-0, namespace: legacy}
spec:
  securityContext: {runAsUser: 4321}
  containers:
    - name: main
      command: [sleep, "600"]
      securityContext: {capabilities: {add: [NET_ADMIN]}}
"""


@pytest.mark.cluster
def test_a_pod_whose_manifest_adds_net_admin_gets_exactly_that(demo_cluster):
    layout = demo_cluster.layout
    try:
        shoal_cli(layout, "apply", "-f", "-", input=NET_ADMIN_POD)

        def started():
            proc = pod_exec(layout, "legacy/netadmin-0", "true", check=False)
            return proc.returncode == 0
        eventually(started, "legacy/netadmin-0 running")
        seen = attempt(layout, "legacy/netadmin-0", str(layout.node_credential_path("node-1")))
        assert seen["uid"] == 4321
        assert seen["cap_eff"] == CAP_NET_ADMIN and seen["cap_bnd"] == CAP_NET_ADMIN
        assert seen["so_mark"] == "set"
        assert seen[str(layout.node_credential_path("node-1"))] == "FileNotFoundError"
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=NET_ADMIN_POD, check=False)


FORGED_FLOW = textwrap.dedent("""
    import socket, sys
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.sendto(b"F", sys.argv[1])
        print("sent")
    except OSError as err:
        print(type(err).__name__)
""")

FLOWS_POD = """
apiVersion: v1
kind: Pod
metadata: {{name: flows-forger, namespace: legacy}}
spec:
  volumes: [{{name: flows, hostPath: {{path: {path}}}}}]
  containers:
    - name: main
      command: [sleep, "600"]
      volumeMounts: [{{name: flows, mountPath: /tmp/flows}}]
"""


@pytest.mark.cluster
def test_a_pod_can_neither_reach_its_nodes_flows_socket_nor_mount_its_folder(demo_cluster):
    """The agent trusts the L7 flows on its flows socket because only waypoints reach it
    (agent/README.md, "Who may write flows"). A pod's sandbox hides it, and a pod that asks
    for the folder as a hostPath volume is refused at apply."""
    layout = demo_cluster.layout
    socket_path = layout.flows_socket("node-1")
    assert socket_path.exists()
    sent = pod_exec(layout, "demo/web-0", sys.executable, "-c", FORGED_FLOW, str(socket_path)).stdout.strip()
    assert sent == "FileNotFoundError", sent
    refused = shoal_cli(layout, "apply", "-f", "-", input=FLOWS_POD.format(path=layout.flows_dir("node-1")),
                        check=False)
    assert refused.returncode != 0 and "reaches the mesh's state" in refused.stderr + refused.stdout, refused
    pods = json.loads(shoal_cli(layout, "get", "pods", "-n", "legacy", "-o", "json").stdout)["items"]
    assert "flows-forger" not in {p["metadata"]["name"] for p in pods}
