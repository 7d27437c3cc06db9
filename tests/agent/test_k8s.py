"""shoal.agent.k8s: pod netns discovery, cgroup2 root, bpffs check, projected token."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from shoal.agent.k8s import (
    HostNetworkPod,
    KubernetesPodNetns,
    PodNotRunning,
    ServiceAccountToken,
    TokenError,
    is_bpffs,
    parse_mountinfo,
    pod_netns_path,
    pod_uid_from_cgroup,
    pods_by_uid,
    process_cgroup,
    token_claims,
    token_expires_in,
)
from shoal.kubernetes import KubernetesModeError, cgroup2_root

UID_SYSTEMD = "1f2e3d4c-5b6a-4798-8a7b-6c5d4e3f2a1b"



UID_CGROUPFS = "aa11bb22-cc33-4d44-8e55-ff6677889900"



UID_HOSTNET = "0badc0de-0000-4000-8000-000000000001"



def _process(proc: Path, pid: int, cgroup: str | None, netns: Path | None) -> None:
    d = proc / str(pid)
    (d / "ns").mkdir(parents=True)
    if cgroup is not None:
        (d / "cgroup").write_text(cgroup)
    if netns is not None:
        os.link(netns, d / "ns" / "net")   # same inode = same namespace, as in the real /proc



@pytest.fixture
def fake_proc(tmp_path) -> Path:
    """A /proc with: the host, a systemd-driver pod (pause + app), a cgroupfs pod on a
    hybrid host, a hostNetwork pod, a node daemon, and a process exiting mid-scan."""
    proc = tmp_path / "proc"
    namespaces = tmp_path / "nsfs"
    namespaces.mkdir()
    host, pod_a, pod_b = (namespaces / n for n in ("host", "pod-a", "pod-b"))
    for ns in (host, pod_a, pod_b):
        ns.write_text(ns.name)
    _process(proc, 1, "0::/init.scope\n", host)
    systemd = ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
               f"{UID_SYSTEMD.replace('-', '_')}.slice/cri-containerd-4f1e.scope\n")
    _process(proc, 4100, systemd, pod_a)          # the app, started after the sandbox
    _process(proc, 4000, systemd, pod_a)          # pause
    hybrid = (f"12:memory:/kubepods/besteffort/pod{UID_CGROUPFS}/9c0d\n"
              f"1:name=systemd:/kubepods/besteffort/pod{UID_CGROUPFS}/9c0d\n0::/\n")
    _process(proc, 5000, hybrid, pod_b)
    _process(proc, 6000, f"0::/kubepods/pod{UID_HOSTNET}/77aa\n", host)
    _process(proc, 700, "0::/system.slice/containerd.service\n", host)
    _process(proc, 800, None, None)               # exited: no cgroup file any more
    (proc / "self").mkdir()                       # not a pid
    return proc



def test_pod_uid_from_both_cgroup_drivers():
    assert pod_uid_from_cgroup(f"/kubepods/burstable/pod{UID_CGROUPFS}/abc") == UID_CGROUPFS
    assert pod_uid_from_cgroup("/kubepods.slice/kubepods-pod"
                               f"{UID_SYSTEMD.replace('-', '_')}.slice/cri-containerd-1.scope") == UID_SYSTEMD
    assert pod_uid_from_cgroup("/system.slice/kubelet.service") is None
    assert pod_uid_from_cgroup("/kubepods/podnot-a-uid/x") is None



def test_process_cgroup_prefers_the_line_naming_a_pod():
    assert process_cgroup("0::/a/b\n") == "/a/b"
    assert process_cgroup(f"3:cpu:/kubepods/pod{UID_CGROUPFS}/c\n0::/\n") == f"/kubepods/pod{UID_CGROUPFS}/c"
    assert process_cgroup("garbage\n") is None



def test_pods_are_found_with_their_sandbox_first(fake_proc):
    pods = pods_by_uid(fake_proc)
    assert pods == {UID_SYSTEMD: [4000, 4100], UID_CGROUPFS: [5000], UID_HOSTNET: [6000]}
    assert pod_netns_path(fake_proc, UID_SYSTEMD) == fake_proc / "4000" / "ns" / "net"
    assert pod_netns_path(fake_proc, UID_CGROUPFS.upper(), pods) == fake_proc / "5000" / "ns" / "net"



def test_resolver_scans_once_per_pass_and_rescans_for_new_pods(fake_proc, monkeypatch):
    import shoal.agent.k8s as k8s
    scans = []
    real = k8s.pods_by_uid
    monkeypatch.setattr(k8s, "pods_by_uid", lambda root: scans.append(root) or real(root))
    now = [100.0]
    resolver = KubernetesPodNetns(fake_proc, max_age=1.0, clock=lambda: now[0])
    pod = lambda uid: type("W", (), {"uid": uid})()  # noqa: E731
    assert resolver.netns_path(pod(UID_SYSTEMD)) == fake_proc / "4000" / "ns" / "net"
    assert resolver.netns_path(pod(UID_CGROUPFS)) == fake_proc / "5000" / "ns" / "net"
    assert len(scans) == 1
    now[0] += 2
    resolver.netns_path(pod(UID_SYSTEMD))
    assert len(scans) == 2, "a stale scan is redone"
    with pytest.raises(PodNotRunning):
        resolver.netns_path(pod(str(uuid.uuid4())))
    assert len(scans) == 3, "an unknown pod triggers a fresh scan (it may have just started)"



def test_host_network_and_missing_pods_are_told_apart(fake_proc):
    with pytest.raises(HostNetworkPod):
        pod_netns_path(fake_proc, UID_HOSTNET)
    with pytest.raises(PodNotRunning):
        pod_netns_path(fake_proc, str(uuid.uuid4()))
    with pytest.raises(KubernetesModeError, match="host /proc"):
        pods_by_uid(fake_proc / "missing")



MOUNTINFO = """\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
33 30 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
40 22 0:35 / /sys/fs/bpf rw,relatime - bpf bpf rw,mode=700
41 1 0:36 / /mnt/with\\040space rw - tmpfs tmpfs rw
"""



def test_mountinfo_parsing_and_bpffs_check():
    mounts = parse_mountinfo(MOUNTINFO + "short line\n")
    assert [m.mount_point for m in mounts][-1] == "/mnt/with space"
    assert is_bpffs(MOUNTINFO, "/sys/fs/bpf") and is_bpffs(MOUNTINFO, "/sys/fs/bpf/")
    assert not is_bpffs(MOUNTINFO, "/sys/fs/cgroup/unified")
    assert not is_bpffs(MOUNTINFO.replace(" - bpf bpf", " - tmpfs tmpfs"), "/sys/fs/bpf")



def _jwt(claims: dict) -> str:
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    return ".".join([enc(b'{"alg":"RS256"}'), enc(json.dumps(claims).encode()), enc(b"signature")])



def test_projected_token_is_read_checked_and_reread_on_rotation(tmp_path):
    path = tmp_path / "shoal-token"
    first = _jwt({"aud": ["shoal"], "exp": time.time() + 3600, "sub": "system:serviceaccount:shoal-system:shoal-agent"})
    path.write_text(first + "\n")
    token = ServiceAccountToken(path)
    assert token.read() == first
    assert token_claims(first)["sub"].endswith(":shoal-agent")
    assert 3500 < token_expires_in(first) <= 3600
    # The kubelet swaps in a new token: the next read sees it.
    second = _jwt({"aud": ["shoal"], "exp": time.time() + 7200})
    tmp = tmp_path / "new"
    tmp.write_text(second)
    os.replace(tmp, path)
    assert token.read() == second
    assert token_expires_in(_jwt({"aud": "shoal"})) is None



@pytest.mark.parametrize("text", ["", "not-a-jwt", "a.b", "a.b.c.d", "a.!!!.c",
                                  "eyJh.bm90IGpzb24.c2ln", "eyJh.WzFd.c2ln"])
def test_malformed_tokens_are_refused(tmp_path, text):
    path = tmp_path / "token"
    path.write_text(text)
    with pytest.raises(TokenError):
        ServiceAccountToken(path).read()



def test_missing_token_names_the_file(tmp_path):
    with pytest.raises(TokenError, match="no-token"):
        ServiceAccountToken(tmp_path / "no-token").read()



CGROUP2 = Path("/sys/fs/cgroup/unified")



@pytest.mark.root
def test_real_process_in_a_pod_cgroup_is_found_in_its_netns():
    """A real process, in a real netns and a kubelet-shaped cgroup, through the real /proc."""
    if not (CGROUP2 / "cgroup.procs").exists():
        pytest.skip("no cgroup v2 at /sys/fs/cgroup/unified")
    name = f"shoal-t{os.getpid()}-k8s"
    uid = str(uuid.uuid4())
    top = CGROUP2 / name
    pod_cgroup = top / "kubepods" / f"pod{uid}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    sleeper = None
    try:
        pod_cgroup.mkdir(parents=True)
        sleeper = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "30"])
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{sleeper.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "sleep never entered its netns"
            time.sleep(0.01)
        (pod_cgroup / "cgroup.procs").write_text(str(sleeper.pid))
        assert pods_by_uid(Path("/proc"))[uid] == [sleeper.pid]
        path = pod_netns_path(Path("/proc"), uid)
        assert os.stat(path).st_ino == os.stat(f"/run/netns/{name}").st_ino
        assert cgroup2_root(Path("/sys/fs/cgroup")) == CGROUP2
        assert is_bpffs(Path("/proc/self/mountinfo").read_text(), "/sys/fs/bpf")
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        for d in (pod_cgroup, pod_cgroup.parent, top):
            if d.exists():
                d.rmdir()
        subprocess.run(["ip", "netns", "del", name], check=False)



def test_cleanup_entry_point_removes_state_and_reports_done(tmp_path):
    """`python -m shoal.agent.k8s cleanup`, as the clean-up DaemonSet runs it (empty bpffs here)."""
    import sys
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "cgroup.controllers").write_text("")
    run_dir, bpffs = tmp_path / "run", tmp_path / "bpffs"
    run_dir.mkdir()
    bpffs.mkdir()
    state = run_dir / "agent-enrolled.json"
    state.write_text(json.dumps({"pods": [{"netns_path": str(tmp_path / "gone" / "ns" / "net")}]}))
    env = dict(os.environ, SHOAL_NODE="worker-a", SHOAL_RUN_DIR=str(run_dir), SHOAL_BPFFS=str(bpffs),
               SHOAL_CGROUP_ROOT=str(tmp_path / "cg"), SHOAL_HOST_PROC=str(tmp_path / "proc"))
    done = tmp_path / "done"
    result = subprocess.run([sys.executable, "-m", "shoal.agent.k8s", "cleanup", "--done-file", str(done)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert done.read_text() == "done\n" and not state.exists()
    assert "removed enrolment state" in result.stderr
    missing = subprocess.run([sys.executable, "-m", "shoal.agent.k8s", "cleanup"],
                             env={k: v for k, v in env.items() if k != "SHOAL_NODE"},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "SHOAL_NODE" in missing.stderr
