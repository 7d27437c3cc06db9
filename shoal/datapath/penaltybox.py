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


class PenaltyBoxPublisher:
    """What the node proxy's gatekeeper calls at each boxing: the pinned map opened anew
    each time (boxings are rare; a proxy started before the agent, or an agent that
    replaced the map on upgrade, is then never written to a stale map). Without the map,
    or when the write fails, the source stays boxed in userspace only: said once per kind
    of failure, and tried again at the next boxing. Never raises: a boxing runs in the
    acceptor."""

    def __init__(self, pin_dir: Path | str):
        self._pin_dir = Path(pin_dir)
        self._warned: set[str] = set()

    def box(self, source: str, seconds: float) -> bool:
        """True when the kernel drops ``source``'s SYNs to 15008 for ``seconds``."""
        try:
            with KernelPenaltyBox(self._pin_dir) as box:
                box.box(source, seconds)
        except (OSError, ValueError) as exc:   # no map, a failed write; a source not an address
            kind = f"{type(exc).__name__}{getattr(exc, 'errno', '')}"
            if kind not in self._warned:
                self._warned.add(kind)
                log.warning("penalty box: %s under %s not written (%s): boxed sources are refused at "
                            "accept only", MAP_NAME, self._pin_dir, exc)
            return False
        return True
