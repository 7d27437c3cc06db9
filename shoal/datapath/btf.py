"""Member offsets of kernel structs, read from the running kernel's BTF.

The bcc compile uses whatever kernel headers the node has, which need not match the
running kernel (this machine: 6.1 headers, a 6.18 kernel), so a program that reads a
kernel struct through a BTF pointer (``bpf_skc_to_tcp_sock``) gets its offsets from
here, as ``-D`` flags: the verifier checks every such read against the same BTF, so a
wrong offset is refused at load time, never read silently.

Only what that needs is parsed: the type section's records (to walk them) and the
members of structs and unions, anonymous ones followed.
"""
from __future__ import annotations

import struct
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
MAGIC = 0xEB9F
KIND_STRUCT, KIND_UNION = 4, 5
# bytes that follow the 12-byte btf_type record, by kind: fixed, and per vlen entry
_TRAILER = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0),
            15: (0, 12), 17: (4, 0), 19: (0, 12)}


class BtfError(ValueError):
    """Not BTF, or the struct/member asked for is not in it."""


class Btf:
    def __init__(self, blob: bytes):
        if len(blob) < 24:
            raise BtfError("truncated BTF header")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob)
        if magic != MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<4I", blob, 8)
        self._strings = blob[hdr_len + str_off:hdr_len + str_off + str_len]
        self._types: list[tuple[str, int, int, list[tuple[str, int, int]]]] = [("", 0, 0, [])]  # id 0: void
        data, pos, end = blob, hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, size_or_type = struct.unpack_from("<3I", data, pos)
            kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            pos += 12
            members = []
            if kind in (KIND_STRUCT, KIND_UNION):
                for index in range(vlen):
                    m_name, m_type, m_offset = struct.unpack_from("<3I", data, pos + 12 * index)
                    bits = m_offset & 0xFFFFFF if kind_flag else m_offset
                    members.append((self._name(m_name), m_type, bits))
            fixed, each = _TRAILER.get(kind, (0, 0))
            pos += fixed + each * vlen
            self._types.append((self._name(name_off), kind, size_or_type, members))

    @classmethod
    def of_running_kernel(cls) -> "Btf":
        try:
            return cls(VMLINUX.read_bytes())
        except OSError as exc:
            raise BtfError(f"no kernel BTF at {VMLINUX}: {exc}") from exc

    def _name(self, offset: int) -> str:
        end = self._strings.find(b"\0", offset)
        return self._strings[offset:end if end >= 0 else None].decode()

    def member_offset(self, struct_name: str, member: str) -> int:
        """Byte offset of ``member`` in ``struct struct_name`` (members of anonymous
        structs/unions count as the struct's own, as in C)."""
        for name, kind, _size, members in self._types:
            if kind == KIND_STRUCT and name == struct_name:
                found = self._find(members, member)
                if found is None:
                    raise BtfError(f"struct {struct_name} has no member {member}")
                if found % 8:
                    raise BtfError(f"struct {struct_name}.{member} is a bitfield")
                return found // 8
        raise BtfError(f"no struct {struct_name} in BTF")

    def _find(self, members, member: str) -> int | None:
        for name, type_id, bits in members:
            if name == member:
                return bits
            if not name:
                _n, kind, _s, inner = self._resolve(type_id)
                if kind in (KIND_STRUCT, KIND_UNION):
                    nested = self._find(inner, member)
                    if nested is not None:
                        return bits + nested
        return None

    def _resolve(self, type_id: int):
        return self._types[type_id] if 0 <= type_id < len(self._types) else ("", 0, 0, [])
