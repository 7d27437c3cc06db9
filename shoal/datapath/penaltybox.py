"""15008's penalty box in the kernel: the node proxy's boxed sources, dropped at tc.

The proxy boxes a source that abused 15008 (``shoal.hbone.penalty``: failed handshakes,
HTTP/2 floods) and refuses its new connections at accept. Refused there, a reconnect loop
still costs an accept and a reset per attempt, and the node a TCP handshake: thousands a
second, on the cores the other pods share. So the proxy also writes the box here, and
``bpf/tc_ingress.c`` drops the source's SYNs to 15008 in the pod's namespace until the box
expires; the sender's SYN retransmit backoff slows it down as well.

    box = KernelPenaltyBox(layout.bpf_pin_dir(node))   # OSError: no such map (agent not up)
    box.box("10.0.0.7", seconds=4.0)

The map's value is CLOCK_MONOTONIC in ns, the clock of ``bpf_ktime_get_ns()``. No bcc:
one bpf(2) update per boxing.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from shoal.datapath import bpfsys
from shoal.datapath.structs import U64, Addr

MAP_NAME = "hbone_boxed"

log = logging.getLogger(__name__)


class KernelPenaltyBox:
    """The pinned ``hbone_boxed`` map the agent created."""

    def __init__(self, pin_dir: Path | str):
        self._fd = bpfsys.obj_get(Path(pin_dir) / MAP_NAME)

    def box(self, source: str, seconds: float) -> None:
        """Drop ``source``'s SYNs to 15008 for ``seconds`` from now (a later box of the same
        source replaces the expiry: the caller passes its whole remaining wait)."""
        until = time.monotonic_ns() + int(seconds * 1e9)
        bpfsys.map_update(self._fd, Addr.of(source), U64(until))

    def until(self, source: str) -> int | None:
        """The expiry written for ``source`` (CLOCK_MONOTONIC ns), or None."""
        value = U64()
        return value.value if bpfsys.map_lookup(self._fd, Addr.of(source), value) else None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "KernelPenaltyBox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LazyKernelPenaltyBox:
    """A ``KernelPenaltyBox`` opened on the first boxing (the proxy may start before the
    agent pins the map). Without the map the source stays boxed in userspace only: said
    once, and tried again at the next boxing."""

    def __init__(self, pin_dir: Path | str):
        self._pin_dir = Path(pin_dir)
        self._box: KernelPenaltyBox | None = None
        self._warned = False

    def box(self, source: str, seconds: float) -> bool:
        """True when the kernel drops ``source``'s SYNs to 15008 for ``seconds``."""
        if self._box is None:
            try:
                self._box = KernelPenaltyBox(self._pin_dir)
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("penalty box: no %s map under %s (%s): boxed sources are refused at "
                                "accept only", MAP_NAME, self._pin_dir, exc)
                return False
        self._box.box(source, seconds)
        return True

    def close(self) -> None:
        if self._box is not None:
            self._box.close()
            self._box = None
