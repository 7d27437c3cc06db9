"""The C structs of bpf/lib and their ctypes mirrors have one layout."""
from __future__ import annotations

import ctypes

import pytest

from shoal.datapath.structs import C_MIRRORS


@pytest.mark.root
def test_c_structs_match_the_ctypes_mirrors():
    """Compile (not load) a unit with static asserts on every struct's size and field offsets."""
    from bcc import BPF

    from shoal import bpf
    asserts = [f"_Static_assert(sizeof(struct {name}) == {ctypes.sizeof(mirror)}, \"{name}\");"
               for name, mirror in C_MIRRORS.items()]
    # ... and every field at the same offset (struct shoal_addr's bytes are named w in C, b here)
    asserts += [f"_Static_assert(__builtin_offsetof(struct {name}, {field}) == {getattr(mirror, field).offset}, "
                f"\"{name}.{field}\");"
                for name, mirror in C_MIRRORS.items() if name != "shoal_addr" for field, *_ in mirror._fields_]
    asserts = "\n".join(asserts)
    text = f'#include "lib/shoal.h"\n{asserts}\nint noop(void *ctx) {{ return 0; }}\n'
    BPF(text=text.encode(), cflags=[f"-I{bpf.SOURCE_DIR}", '-DSHOAL_PIN_DIR="/nonexistent"']).cleanup()
