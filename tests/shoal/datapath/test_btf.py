"""The BTF reader that gives the verdict program the running kernel's offsets."""
from __future__ import annotations

import struct

import pytest

from shoal.datapath.btf import VMLINUX, Btf, BtfError


def _blob(types: list[bytes], strings: bytes) -> bytes:
    body = b"".join(types)
    header = struct.pack("<HBBI4I", 0xEB9F, 1, 0, 24, 0, len(body), len(body), len(strings))
    return header + body + strings


def _type(name_off: int, kind: int, vlen: int, size: int, kind_flag: int = 0) -> bytes:
    return struct.pack("<3I", name_off, (kind_flag << 31) | (kind << 24) | vlen, size)


STRINGS = b"\0int\0s\0a\0b\0flags\0"   # offsets: int 1, s 5, a 7, b 9, flags 11


def _sample() -> bytes:
    """int; struct s { int a; union { int pad; int b at +4 }; int flags:3 (a bitfield) }"""
    return _blob([
        _type(1, 1, 0, 4) + struct.pack("<I", 32),                          # 1: int (+ its INT word)
        _type(5, 4, 3, 16, kind_flag=1) + struct.pack("<3I", 7, 1, 0)        # 2: struct s
        + struct.pack("<3I", 0, 3, 64) + struct.pack("<3I", 11, 1, (3 << 24) | 97),
        _type(0, 5, 1, 8) + struct.pack("<3I", 9, 1, 32),                    # 3: anonymous union
    ], STRINGS)


def test_offsets_of_direct_and_anonymous_members():
    btf = Btf(_sample())
    assert btf.member_offset("s", "a") == 0
    assert btf.member_offset("s", "b") == 12     # 8 (the union) + 4 (b in it)


def test_what_it_cannot_answer_is_an_error_not_a_guess():
    btf = Btf(_sample())
    with pytest.raises(BtfError, match="no member"):
        btf.member_offset("s", "missing")
    with pytest.raises(BtfError, match="no struct"):
        btf.member_offset("nothing", "a")
    with pytest.raises(BtfError, match="bitfield"):
        btf.member_offset("s", "flags")
    with pytest.raises(BtfError, match="magic"):
        Btf(b"\0" * 32)
    with pytest.raises(BtfError, match="truncated"):
        Btf(b"\x9f\xeb")


@pytest.mark.skipif(not VMLINUX.exists(), reason="no kernel BTF")
def test_the_running_kernel_has_the_member_the_verdict_reads():
    btf = Btf.of_running_kernel()
    write_seq = btf.member_offset("tcp_sock", "write_seq")
    # tcp_sock begins with inet_connection_sock (which begins with struct sock)
    assert write_seq > btf.member_offset("sock", "sk_rcvbuf")
    assert write_seq % 4 == 0
