"""The few bpf(2) commands the agent, the proxy and the debug CLI need, over ctypes.

bcc is only used to compile and load programs; everything that touches pinned
objects afterwards goes through here, so readers (the proxy's original-destination
lookup, `shoal debug bpf`) need neither bcc nor a compiler.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_SYS_BPF = 321  # x86_64

# bpf_cmd
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
OBJ_PIN, OBJ_GET, PROG_ATTACH, PROG_DETACH = 6, 7, 8, 9
PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, PROG_QUERY = 13, 15, 16
LINK_CREATE, LINK_UPDATE = 28, 29

# bpf_map_type
MAP_TYPE_HASH, MAP_TYPE_ARRAY, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_LRU_HASH = 1, 2, 6, 9
MAP_TYPE_SOCKHASH, MAP_TYPE_RINGBUF = 18, 27
PROG_TYPE_SK_LOOKUP = 30
ATTACH_SK_LOOKUP = 36
# bpf_attach_type
ATTACH_CGROUP_SOCK_OPS, ATTACH_CGROUP_INET4_CONNECT, ATTACH_CGROUP_INET6_CONNECT = 3, 10, 11
ATTACH_CGROUP_UDP4_SENDMSG, ATTACH_CGROUP_UDP6_SENDMSG, ATTACH_CGROUP_UDP4_RECVMSG, ATTACH_CGROUP_UDP6_RECVMSG = 14, 15, 19, 20
ATTACH_CGROUP_INET4_GETPEERNAME, ATTACH_CGROUP_INET6_GETPEERNAME = 29, 30
ATTACH_SK_SKB_STREAM_VERDICT = 5
ATTACH_SK_MSG_VERDICT = 7
BPF_ANY = 0


class BpfError(OSError):
    """A bpf(2) command failed; errno tells why."""


_ATTR_SIZE = 144  # larger than every command's attr we use; the kernel wants the tail zeroed


def _call(cmd: int, attr: ctypes.Structure) -> int:
    buf = (ctypes.c_ubyte * _ATTR_SIZE)()
    ctypes.memmove(buf, ctypes.addressof(attr), ctypes.sizeof(attr))
    ret = _libc.syscall(_SYS_BPF, cmd, buf, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    ctypes.memmove(ctypes.addressof(attr), buf, ctypes.sizeof(attr))
    return ret


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16)]


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _AttachAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32)]


class _QueryAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32)]


class _GetByIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (the fields we show)."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_ubyte * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * 16)]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _call(OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)))
    return info


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str) -> int:
    attr = _MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size,
                          max_entries=max_entries, map_name=name[:15].encode())
    return _call(MAP_CREATE, attr)


def obj_pin(fd: int, path: Path | str) -> None:
    raw = ctypes.create_string_buffer(os.fsencode(str(path)))
    _call(OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(raw), bpf_fd=fd))


def obj_get(path: Path | str) -> int:
    raw = ctypes.create_string_buffer(os.fsencode(str(path)))
    return _call(OBJ_GET, _ObjAttr(pathname=ctypes.addressof(raw)))


def map_lookup(fd: int, key: ctypes.Array | ctypes.Structure | ctypes._SimpleCData, value) -> bool:
    """Fill `value` from the entry at `key`; False when absent."""
    attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    try:
        _call(MAP_LOOKUP_ELEM, attr)
    except BpfError as err:
        if err.errno == errno.ENOENT:
            return False
        raise
    return True


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    _call(MAP_UPDATE_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(key),
                                     value=ctypes.addressof(value), flags=flags))


def map_delete(fd: int, key) -> bool:
    try:
        _call(MAP_DELETE_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(key)))
    except BpfError as err:
        if err.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_type: type) -> list:
    """Every key of a hash map (a snapshot: entries may come and go meanwhile)."""
    keys: list = []
    current = None
    while True:
        following = key_type()
        attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(current) if current is not None else 0,
                         value=ctypes.addressof(following))
        try:
            _call(MAP_GET_NEXT_KEY, attr)
        except BpfError as err:
            if err.errno == errno.ENOENT:
                return keys
            raise
        keys.append(following)
        current = following


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    _call(PROG_ATTACH, _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd,
                                   attach_type=attach_type, attach_flags=flags))


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _call(PROG_DETACH, _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type))


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("new_prog_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _call(LINK_CREATE, _LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type))


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Swap the program behind a link atomically (adoption by a new agent)."""
    _call(LINK_UPDATE, _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd))


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Program ids attached to a cgroup for one attach type."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _QueryAttr(target_fd=target_fd, attach_type=attach_type,
                      prog_ids=ctypes.addressof(ids), prog_cnt=64)
    _call(PROG_QUERY, attr)
    return list(ids[: attr.prog_cnt])


def prog_fd_by_id(prog_id: int) -> int:
    return _call(PROG_GET_FD_BY_ID, _GetByIdAttr(id=prog_id))


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    _call(OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)))
    return info


def possible_cpus() -> int:
    """Per-CPU maps hold one slot per possible CPU, not per online CPU."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    total = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        total += int(high or low) - int(low) + 1
    return total
