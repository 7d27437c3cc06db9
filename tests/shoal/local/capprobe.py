"""Runs inside the agent image: tries the one operation each capability is documented for.

Prints one JSON object {capability: "ok" | "<errno name>: <detail>"}. Kept free of bcc so
it needs no compile: raw bpf(2) and setsockopt/setns calls, the kernel's own checks.
"""
import ctypes
import errno
import json
import os
import socket
import struct

libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF = 321                     # x86_64
BPF_MAP_CREATE, BPF_PROG_LOAD = 0, 5
BPF_MAP_TYPE_ARRAY, BPF_PROG_TYPE_SOCKET_FILTER = 2, 1
HELPER_PROBE_READ_KERNEL = 113
CLONE_NEWNET = 0x40000000


def bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    fd = libc.syscall(SYS_BPF, cmd, buf, 128)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def check_bpf() -> None:
    """CAP_BPF: create a map (unprivileged bpf() is disabled on this kernel)."""
    os.close(bpf(BPF_MAP_CREATE, struct.pack("<IIII", BPF_MAP_TYPE_ARRAY, 4, 8, 1)))


def check_perfmon() -> None:
    """CAP_PERFMON: a program calling bpf_probe_read_kernel (what bcc emits for struct reads)."""
    program = b"".join([
        insn(0xBF, 1, 10),                         # r1 = r10
        insn(0x07, 1, imm=-8),                     # r1 += -8
        insn(0xB7, 2, imm=8),                      # r2 = 8
        insn(0xB7, 3, imm=0),                      # r3 = 0 (NULL: the helper fails at run time, loads fine)
        insn(0x85, imm=HELPER_PROBE_READ_KERNEL),  # call bpf_probe_read_kernel
        insn(0xB7, 0, imm=0),                      # r0 = 0
        insn(0x95),                                # exit
    ])
    code = ctypes.create_string_buffer(program)
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = struct.pack("<IIQQ", BPF_PROG_TYPE_SOCKET_FILTER, len(program) // 8,
                       ctypes.addressof(code), ctypes.addressof(license_))
    os.close(bpf(BPF_PROG_LOAD, attr))


def check_net_admin() -> None:
    """CAP_NET_ADMIN: a policy-routing rule (the proxy's delivery rules; the agent's tc/cgroup
    attach is netlink/bpf admin of the same kind). SO_MARK alone would not show it: the
    kernel also accepts CAP_NET_RAW for that. Done in the probe's own network namespace."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    with IPRoute() as ipr:
        try:
            ipr.rule("add", table=100, priority=1000, fwmark=0x539)
        except NetlinkError as e:
            raise OSError(e.code, os.strerror(e.code)) from None


def check_net_raw() -> None:
    """CAP_NET_RAW: SO_BINDTODEVICE lo (the proxy's inbound delivery socket)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")


def check_sys_admin() -> None:
    """CAP_SYS_ADMIN: setns() into a network namespace (here: our own)."""
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def check_sys_ptrace() -> None:
    """CAP_SYS_PTRACE: open another process's ns/net through the host's /proc. The target
    (SHOAL_PROBE_PID, the test runner) holds capabilities this container lacks, so the
    kernel's ptrace access check needs the capability."""
    os.close(os.open(f"/host/proc/{os.environ['SHOAL_PROBE_PID']}/ns/net", os.O_RDONLY))


CHECKS = {"BPF": check_bpf, "PERFMON": check_perfmon, "NET_ADMIN": check_net_admin,
          "NET_RAW": check_net_raw, "SYS_ADMIN": check_sys_admin, "SYS_PTRACE": check_sys_ptrace}

if __name__ == "__main__":
    results = {}
    for cap, check in CHECKS.items():
        try:
            check()
            results[cap] = "ok"
        except OSError as e:
            results[cap] = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
    print(json.dumps(results))
