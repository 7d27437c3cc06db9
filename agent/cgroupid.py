"""The node proxy's cgroup id: what exempts its sockets from capture, socket-LB and DENY.

A socket mark cannot do it: any process with CAP_NET_ADMIN sets SO_MARK 0x539 on its own
sockets. The cgroup a process runs in is placed by the node (the local cluster puts the
proxy in ``<cluster>/<node>/system/proxy``, the kubelet puts the proxy container in its
own cgroup), and a pod process cannot move itself out of its pod's cgroup: its cgroup
namespace and the read-only cgroupfs of its container hide every other cgroup.

The agent learns the id from the proxy's end of the ZDS socket, the same way in both
modes: ``SO_PEERPIDFD`` gives a pidfd of the listening proxy (no shared pid namespace
needed), and ``PIDFD_GET_INFO`` (Linux 6.13+) gives that process's cgroup v2 id. The
programs compare it with ``bpf_get_current_cgroup_id()`` of the task calling
connect()/sendmsg().
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import socket
from pathlib import Path

SO_PEERPIDFD = 77
PIDFD_INFO_CGROUPID = 1 << 2


class PidfdInfo(ctypes.Structure):
    """struct pidfd_info (include/uapi/linux/pidfd.h), the fields up to the cgroup id."""
    _fields_ = [("mask", ctypes.c_uint64), ("cgroupid", ctypes.c_uint64), ("pid", ctypes.c_uint32),
                ("tgid", ctypes.c_uint32), ("ppid", ctypes.c_uint32), ("ruid", ctypes.c_uint32),
                ("rgid", ctypes.c_uint32), ("euid", ctypes.c_uint32), ("egid", ctypes.c_uint32),
                ("suid", ctypes.c_uint32), ("sgid", ctypes.c_uint32), ("fsuid", ctypes.c_uint32),
                ("fsgid", ctypes.c_uint32), ("exit_code", ctypes.c_int32)]


# _IOWR(0xFF, 11, struct pidfd_info)
PIDFD_GET_INFO = (3 << 30) | (ctypes.sizeof(PidfdInfo) << 16) | (0xFF << 8) | 11


def cgroup_id(path: Path | str) -> int:
    """A cgroup v2 folder's id (what bpf_get_current_cgroup_id() returns for its tasks)."""
    return os.stat(path).st_ino


def pidfd_cgroup_id(pidfd: int) -> int:
    info = PidfdInfo(mask=PIDFD_INFO_CGROUPID)
    fcntl.ioctl(pidfd, PIDFD_GET_INFO, info)
    if not info.mask & PIDFD_INFO_CGROUPID or not info.cgroupid:
        raise OSError("PIDFD_GET_INFO gave no cgroup id (the kernel needs cgroup v2 and Linux 6.13+)")
    return info.cgroupid


def peer_cgroup_id(sock: socket.socket) -> int:
    """The cgroup id of the process at the other end of a connected Unix socket."""
    pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    try:
        return pidfd_cgroup_id(pidfd)
    finally:
        os.close(pidfd)
