"""Thin, explicit wrappers over the Linux parts a local cluster is made of.

Every network command names its namespace (``ip -n NS ...``): nothing here can touch the
machine's root network namespace by accident. Cgroups are only created below the cluster's
own cgroup.
"""
from __future__ import annotations

import errno
import logging
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")


class LinuxError(RuntimeError):
    """A command that builds the cluster failed; the message says which and why."""


def run(argv: Sequence[str], check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise LinuxError(f"`{shlex.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


class Netns:
    """A named network namespace (``/run/netns/NAME``), driven with ``ip -n``."""

    def __init__(self, name: str):
        if not name or "/" in name:
            raise ValueError(f"bad netns name {name!r}")
        self.name = name

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def exists(self) -> bool:
        return self.path.exists()

    def create(self) -> "Netns":
        if not self.exists():
            run(["ip", "netns", "add", self.name])
        self.ip("link", "set", "lo", "up")
        return self

    def delete(self) -> None:
        if self.exists():
            run(["ip", "netns", "delete", self.name], check=False)
        etc = ETC_NETNS / self.name
        if etc.is_dir():
            for f in etc.iterdir():
                f.unlink()
            etc.rmdir()

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, settings: dict[str, str]) -> None:
        """Sets per-namespace sysctls (``net.ipv4.x``) inside this namespace (never the root one)."""
        run(["ip", "netns", "exec", self.name, "sysctl", "-qw", *(f"{k}={v}" for k, v in settings.items())])

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """For pods: ``ip netns exec`` also bind-mounts /etc/netns/NAME/* (the hosts file) over /etc.

        It does so in a private mount namespace with /sys remounted, which hides bpffs and
        cgroupfs: fine for a pod, wrong for the cluster's own daemons (see ``enter_argv``).
        """
        return ["ip", "netns", "exec", self.name, *argv]

    def enter_argv(self, argv: Sequence[str]) -> list[str]:
        """For daemons: enter only the network namespace, keep the machine's mounts.

        The agent needs /sys/fs/bpf and the cgroup tree, and the controller's kubelet makes
        pod namespaces whose bind mounts must be visible machine-wide.
        """
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def has_link(self, name: str) -> bool:
        return self.ip("link", "show", name, check=False).returncode == 0

    def write_etc(self, filename: str, text: str) -> None:
        """Writes /etc/netns/NAME/FILE in place, so that existing bind mounts see the change."""
        folder = ETC_NETNS / self.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / filename
        with open(path, "a+") as f:
            f.seek(0)
            if f.read() == text:
                return
            f.seek(0)
            f.truncate()
            f.write(text)

    @staticmethod
    def list(prefix: str) -> list["Netns"]:
        if not NETNS_DIR.is_dir():
            return []
        return [Netns(p.name) for p in sorted(NETNS_DIR.iterdir()) if p.name.startswith(prefix)]


class Cgroup:
    """A cgroup v2 folder below the cluster's own cgroup."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def create(self) -> "Cgroup":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def exists(self) -> bool:
        return self.path.is_dir()

    def pids(self, recursive: bool = True) -> list[int]:
        found: list[int] = []
        folders: Iterable[Path] = self.path.rglob("cgroup.procs") if recursive else [self.path / "cgroup.procs"]
        for procs in folders:
            try:
                found.extend(int(line) for line in procs.read_text().split())
            except FileNotFoundError:  # removed while we walked
                continue
        return found

    def join_argv(self, argv: Sequence[str]) -> list[str]:
        """Wraps a command so that it moves itself into this cgroup before it execs.

        A shell wrapper instead of preexec_fn: the controller that spawns pods is
        multi-threaded (gRPC), and preexec_fn is not safe there.
        """
        return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *argv]

    def kill_all(self, grace: float = 3.0) -> None:
        """SIGTERM every process in the subtree, then SIGKILL what is left after ``grace``."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.pids():
                time.sleep(0.05)

    def remove(self) -> None:
        """Removes the subtree, deepest first (cgroups only go away once empty)."""
        if not self.exists():
            return
        for folder in sorted((p for p in self.path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _rmdir(folder)
        _rmdir(self.path)


def _rmdir(path: Path) -> None:
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.05)
    raise LinuxError(f"cgroup {path} stays busy")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
