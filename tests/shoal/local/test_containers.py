"""Container mode: podman flags come from the rendered manifests, and the built images run.

The translation tests always run (no podman needed). The image tests need `make images`
and skip, saying so, when the images are absent: building them takes minutes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from shoal.cli.deploy.render import RenderOptions, render
from shoal.local.containers import PODMAN_GLOBAL, ContainerRun, ManifestError, container_run, ulimits

REPO = Path(__file__).resolve().parents[3]
# Stand-ins for the projected token, CA ConfigMap and Hubble Secret (never mounted by the
# translation tests; the container tests pass their tmp_path instead).
NODE_VOLUMES = {"shoal-token": "/tmp/token", "shoal-ca": "/tmp/ca", "shoal-hubble-tls": "/tmp/hubble"}


def agent_pod(objects):
    return next(o for o in objects if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]


def test_node_containers_get_exactly_the_manifest_capabilities():
    objects = render()
    for manifest in agent_pod(objects)["containers"]:
        run = container_run(objects, "DaemonSet", "shoal-agent", manifest["name"], "node-1", NODE_VOLUMES)
        sc = manifest["securityContext"]
        assert run.cap_add == tuple(sc["capabilities"]["add"])
        assert run.cap_drop_all and run.read_only and run.no_new_privileges and run.user == "0"
        argv = run.argv("c", "ns:/run/netns/x")
        assert argv[argv.index("--cap-drop") + 1] == "ALL"
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"] == sc["capabilities"]["add"]
        assert "--privileged" not in argv and "--read-only" in argv
        command = manifest["command"] + manifest.get("args", [])   # as the kubelet joins them
        assert argv[-len(command):] == command


def test_mounts_env_and_image_follow_the_render_options():
    objects = render(RenderOptions(hub="registry.example/mesh", image_tag="9.9.9", trust_domain="corp.example"))
    run = container_run(objects, "DaemonSet", "shoal-agent", "agent", "node-7", NODE_VOLUMES)
    assert run.image == "registry.example/mesh/shoal-agent:9.9.9"
    assert run.env["SHOAL_NODE"] == "node-7"                 # fieldRef spec.nodeName
    assert run.env["SHOAL_TRUST_DOMAIN"] == "corp.example"   # configMapKeyRef of the rendered ConfigMap
    mounts = {m.split("destination=")[1].split(",")[0]: m for m in run.mounts}
    assert "source=/sys/fs/bpf," in mounts["/sys/fs/bpf"] and "bind-propagation=rslave" in mounts["/sys/fs/bpf"]
    assert mounts["/host/proc"].endswith("ro=true")
    assert "source=/tmp/token," in mounts["/var/run/secrets/shoal/tokens"]
    assert run.tmpfs == ("/tmp",)                            # emptyDir
    proxy = container_run(objects, "DaemonSet", "shoal-agent", "proxy", "node-7", NODE_VOLUMES)
    assert "/host/proc" not in " ".join(proxy.mounts)        # the proxy never sees the host's /proc


def test_controller_runs_as_its_non_root_user_without_capabilities():
    objects = render()
    run = container_run(objects, "Deployment", "shoal-controller", "controller", "node-1",
                        {"shoal-hubble-tls": "/tmp/hubble", "cacerts": "/tmp/ca"})
    assert run.cap_add == () and run.cap_drop_all and run.user == "1337:1337"
    assert run.command[:3] == ("python", "-m", "shoal.controller")


def test_rendered_for_a_local_cluster_each_node_gets_its_own_folders_and_never_the_root_cgroup():
    objects = render(RenderOptions(local_cluster="c7"))
    agent = container_run(objects, "DaemonSet", "shoal-agent", "agent", "node-2", NODE_VOLUMES)
    mounts = {m.split("destination=")[1].split(",")[0]: m for m in agent.mounts}
    # subPathExpr $(SHOAL_NODE), expanded from the container's own env as the kubelet does.
    assert "source=/run/shoal/c7/node-2," in mounts["/var/run/shoal"]
    assert "source=/sys/fs/cgroup/unified/c7/node-2," in mounts["/host/sys/fs/cgroup"]
    assert "source=/run/netns," in mounts["/host/run/netns"] and "ro=true" in mounts["/host/run/netns"]
    assert agent.env["SHOAL_CLUSTER"] == "c7" and agent.env["SHOAL_NETNS_DIR"] == "/host/run/netns"
    proxy = container_run(objects, "DaemonSet", "shoal-agent", "proxy", "node-2", NODE_VOLUMES)
    assert "SHOAL_NETNS_DIR" not in proxy.env and "/host/run/netns" not in " ".join(proxy.mounts)
    # Everything else is the Kubernetes render's: privileges, command, the other mounts.
    kube = container_run(render(), "DaemonSet", "shoal-agent", "agent", "node-2", NODE_VOLUMES)
    assert (agent.cap_add, agent.read_only, agent.user, agent.command) == (kube.cap_add, kube.read_only, kube.user,
                                                                           kube.command)
    assert set(kube.mounts) - set(agent.mounts) == {m for m in kube.mounts if "/var/run/shoal" in m or "/host/sys" in m}


def test_the_pod_shares_one_pid_namespace_through_its_sandbox():
    run = container_run(render(), "DaemonSet", "shoal-agent", "proxy", "node-1", NODE_VOLUMES)
    assert run.share_process_namespace
    argv = run.argv("c", "ns:/run/netns/x", sandbox="c-sandbox")
    assert argv[argv.index("--pid") + 1] == "container:c-sandbox"
    assert "--pid" not in run.argv("c", "ns:/run/netns/x")     # a probe run alone


def test_a_subpathexpr_that_leaves_its_volume_is_refused():
    objects = render(RenderOptions(local_cluster="c7"))
    ds = next(o for o in objects if o["kind"] == "DaemonSet")
    agent = ds["spec"]["template"]["spec"]["containers"][0]
    next(m for m in agent["volumeMounts"] if m["name"] == "run")["subPathExpr"] = "../$(SHOAL_NODE)"
    with pytest.raises(ManifestError, match="leaves its volume"):
        container_run(objects, "DaemonSet", "shoal-agent", "agent", "node-1", NODE_VOLUMES)


def test_the_proxy_starts_from_the_daemonset_env_without_a_cgroup_mount(tmp_path):
    """The proxy shares the agent's env (SHOAL_CGROUP_ROOT) but mounts no cgroup: its
    config must not look for one (it did, and the proxy container exited at start)."""
    from shoal.agent.ztunnel.config import ProxyConfig
    run = container_run(render(), "DaemonSet", "shoal-agent", "proxy", "node-1", NODE_VOLUMES)
    assert "/host/sys/fs/cgroup" not in " ".join(run.mounts)
    config = ProxyConfig.from_args([], env={**run.env, "SHOAL_CGROUP_ROOT": str(tmp_path / "absent")})
    assert config.layout.zds_socket("node-1") == Path("/var/run/shoal/zds.sock")


def test_a_volume_without_a_local_source_is_refused_by_name():
    with pytest.raises(ManifestError, match="shoal-token"):
        container_run(render(), "DaemonSet", "shoal-agent", "agent", "node-1", {})


def test_a_privileged_manifest_is_refused():
    objects = render()
    agent_pod(objects)["containers"][0]["securityContext"]["privileged"] = True
    with pytest.raises(ManifestError, match="privileged"):
        container_run(objects, "DaemonSet", "shoal-agent", "agent", "node-1", NODE_VOLUMES)


def test_make_images_builds_every_dockerfile_on_the_local_base_without_pulling():
    """The build plumbing, dry: each image from its Dockerfile, BASE local, --pull=never."""
    out = subprocess.run(["bash", str(REPO / "images/build-local.sh"), "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "SHOAL_IMAGE_STATE": "/nonexistent/state",
                              "PYTHON": str(REPO / ".venv/bin/python")})
    assert out.returncode == 0, out.stderr
    builds = [line for line in out.stdout.splitlines() if " bud " in line]
    for name in ("shoal-bcc-base", "shoal-agent", "shoal-controller", "shoal-waypoint"):
        line = next(b for b in builds if f"-t localhost/{name}:" in b)
        assert "--pull=never" in line and "BASE=localhost/shoal-base:bookworm" in line
        assert f"ghcr.io/shoal-mesh/{name}:" in line   # the name the rendered manifests use
    assert "debootstrap --variant=minbase" in out.stdout
    # Each Dockerfile still builds elsewhere: every FROM is an ARG with a public default.
    for dockerfile in (REPO / "images").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        assert re.search(r"^ARG BASE=debian:bookworm-slim$", text, re.M), dockerfile
        assert all(line.split()[1].startswith("${") for line in text.splitlines() if line.startswith("FROM ")), dockerfile


# -- the built images --------------------------------------------------------------------

def image_present(image: str) -> bool:
    if not shutil.which("podman"):
        return False
    return subprocess.run(["podman", *PODMAN_GLOBAL, "image", "exists", image]).returncode == 0


needs_images = pytest.mark.skipif(
    not all(image_present(f"ghcr.io/shoal-mesh/shoal-{n}:0.1.0") for n in ("agent", "controller", "waypoint")),
    reason="images not built: run `make images` (debootstrap + buildah, several minutes)")


def run_once(run: ContainerRun, command: tuple[str, ...], network: str = "none",
             env: dict[str, str] | None = None) -> tuple[dict, str]:
    """Runs ``command`` in ``run``'s container to completion; returns podman inspect and output."""
    name = f"shoal-test-{uuid.uuid4().hex[:10]}"
    argv = run.argv(name, network, extra_env=env, command=command)
    container_id = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    try:
        subprocess.run(["podman", *PODMAN_GLOBAL, "wait", container_id], capture_output=True, timeout=120)
        inspect = json.loads(subprocess.run(["podman", *PODMAN_GLOBAL, "inspect", container_id],
                                            capture_output=True, text=True, check=True).stdout)[0]
        logs = subprocess.run(["podman", *PODMAN_GLOBAL, "logs", container_id], capture_output=True, text=True)
        return inspect, logs.stdout + logs.stderr
    finally:
        subprocess.run(["podman", *PODMAN_GLOBAL, "rm", "--force", container_id], capture_output=True)


@needs_images
@pytest.mark.parametrize("container", ["agent", "proxy"])
def test_node_container_runs_with_the_manifest_capabilities(container, tmp_path):
    objects = render()
    run = container_run(objects, "DaemonSet", "shoal-agent", container, "node-1",
                        {k: str(tmp_path) for k in NODE_VOLUMES})
    probe = ("python", "-c", "import bcc, shoal.agent, shoal.agent.ztunnel; "
             "print(open('/proc/self/status').read()); open('/probe', 'w')")
    inspect, output = run_once(run, probe)
    assert sorted(c.removeprefix("CAP_") for c in inspect["EffectiveCaps"]) == sorted(run.cap_add)
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    assert "Read-only file system" in output                 # the probe's write to / failed
    # The kernel's view agrees: exactly the manifest's capabilities are effective, none ambient.
    eff = int(re.search(r"CapEff:\s*([0-9a-f]+)", output).group(1), 16)
    assert bin(eff).count("1") == len(run.cap_add)


@needs_images
@pytest.mark.parametrize("image,user", [("controller", "1337"), ("waypoint", "1337")])
def test_control_images_carry_no_compiler_and_run_unprivileged(image, user):
    argv = ["podman", *PODMAN_GLOBAL, "run", "--rm", "--pull=never", "--network", "none", *ulimits(),
            f"ghcr.io/shoal-mesh/shoal-{image}:0.1.0", "python", "-c",
            "import os, shutil, shoal; print(os.getuid(), [c for c in ('cc', 'gcc', 'clang', 'ld') if shutil.which(c)])"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == user and "[]" in out.stdout


CAPPROBE = (Path(__file__).parent / "capprobe.py").read_text()
# Each capability's documented operation (docs/kubernetes.md, "Capabilities") and the error
# the kernel gives without it: EPERM from bpf()/setsockopt()/setns(), EACCES from the ptrace
# check on /proc/<pid>/ns, EINVAL/EPERM/EACCES from the verifier for probe_read_kernel.
EXPECTED_FAILURE = {"BPF": ("EPERM",), "PERFMON": ("EINVAL", "EPERM", "EACCES"), "NET_ADMIN": ("EPERM",),
                    "SYS_ADMIN": ("EPERM",), "SYS_PTRACE": ("EACCES", "EPERM")}


def probe_caps(run: ContainerRun) -> dict[str, str]:
    inspect, output = run_once(run, ("python", "-c", CAPPROBE), env={"SHOAL_PROBE_PID": str(os.getpid())})
    assert inspect["State"]["ExitCode"] == 0, output
    return json.loads(output.strip().splitlines()[-1])


# The kernel's bpf_capable() and perfmon_capable() also accept CAP_SYS_ADMIN, which the agent
# holds for setns(): BPF and PERFMON alone are then redundant. They stay in the manifest so
# the intent survives if SYS_ADMIN is ever replaced; the test shows each one is what the
# operation needs once SYS_ADMIN is gone too.
SUBSUMED_BY_SYS_ADMIN = {"BPF", "PERFMON"}


@needs_images
@pytest.mark.parametrize("container", ["agent", "proxy"])
def test_every_node_capability_is_needed_and_its_absence_fails_as_documented(container, tmp_path):
    objects = render()
    run = container_run(objects, "DaemonSet", "shoal-agent", container, "node-1",
                        {k: str(tmp_path) for k in NODE_VOLUMES})
    granted = probe_caps(run)
    assert {cap: granted[cap] for cap in run.cap_add} == {cap: "ok" for cap in run.cap_add}
    for cap in run.cap_add:
        removed = {cap, "SYS_ADMIN"} if cap in SUBSUMED_BY_SYS_ADMIN else {cap}
        result = probe_caps(replace(run, cap_add=tuple(c for c in run.cap_add if c not in removed)))
        assert result[cap].split(":")[0] in EXPECTED_FAILURE[cap], (cap, result)
        # The checks that depend on no other capability still pass: the failure is this one's.
        assert all(result[other] == "ok" for other in ("NET_ADMIN", "SYS_PTRACE")
                   if other in run.cap_add and other not in removed), result


@needs_images
@pytest.mark.parametrize("cap", sorted(SUBSUMED_BY_SYS_ADMIN))
def test_sys_admin_alone_grants_what_bpf_and_perfmon_grant(cap, tmp_path):
    run = container_run(render(), "DaemonSet", "shoal-agent", "agent", "node-1",
                        {k: str(tmp_path) for k in NODE_VOLUMES})
    result = probe_caps(replace(run, cap_add=tuple(c for c in run.cap_add if c != cap)))
    assert result[cap] == "ok", result


@needs_images
def test_the_proxy_binds_its_delivery_socket_to_lo_without_net_raw(tmp_path):
    """NET_RAW was removed from the proxy: since Linux 5.7 a socket's first SO_BINDTODEVICE
    needs no capability (only re-binding a bound socket does), which is all delivery does
    (agent/ztunnel/inbound.py); SO_MARK and IP_TRANSPARENT accept NET_ADMIN. The meshed
    traffic of the container cluster test is the end-to-end proof."""
    run = container_run(render(), "DaemonSet", "shoal-agent", "proxy", "node-1",
                        {k: str(tmp_path) for k in NODE_VOLUMES})
    assert "NET_RAW" not in run.cap_add
    result = probe_caps(run)
    assert result["NET_RAW"] == "ok", result   # the probe's SO_BINDTODEVICE lo


@needs_images
def test_bcc_compiles_in_the_agent_container_against_the_hosts_mounted_headers(tmp_path):
    """The agent image ships no kernel headers: the manifest's /lib/modules and /usr/src
    mounts must be enough for bcc's embedded clang (kernel struct access included)."""
    run = container_run(render(), "DaemonSet", "shoal-agent", "agent", "node-1",
                        {k: str(tmp_path) for k in NODE_VOLUMES})
    source = ("import bcc; bcc.BPF(text='#include <net/sock.h>\\n"
              "int f(struct sock *sk) { return sk->__sk_common.skc_family; }'); print('compiled')")
    inspect, output = run_once(run, ("python", "-c", source))
    assert inspect["State"]["ExitCode"] == 0 and "compiled" in output, output


def test_a_restart_test_reaches_the_container_that_runs_each_component(tmp_path):
    """``LocalCluster.crash``/``recover`` act on the container of a --containers cluster (the
    names nodepods gives them), on the process otherwise."""
    from shoal.config import ClusterLayout
    from shoal.local.cluster import LocalCluster
    from shoal.local.nodepods import NodeContainers

    layout = ClusterLayout(name="ctr-names", run_root=tmp_path)
    manifests = lambda tag: render(RenderOptions(local_cluster=layout.name))   # noqa: E731
    in_containers, processes = LocalCluster(layout, node_manifests=manifests), LocalCluster(layout)
    pods = NodeContainers(layout, manifests)
    components = {c.name: c for c in in_containers.node_components("node-2")}
    assert in_containers.container_of(components["agent-node-2"]) == pods.container_name("node-2", "agent")
    assert in_containers.container_of(components["proxy-node-2"]) == pods.container_name("node-2", "proxy")
    assert in_containers.container_of(in_containers.controller_component()) == pods.container_name("control", "controller")
    assert processes.container_of(components["agent-node-2"]) is None
