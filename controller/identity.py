"""Numeric identities per (namespace, service account), stable across restarts.

The numbers go into eBPF maps and flows on every node, so they must never change meaning:
allocations are appended to a log file (one ``<id> <namespace> <sa>`` line) and fsynced
by ``commit()``, which the model calls before anything using them is pushed; the log is
replayed on start. Identities are never reused. Numbers below
``FIRST_IDENTITY`` are reserved (Cilium keeps 1-255 for well-known identities such as
host and world).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FIRST_IDENTITY = 256
MAX_IDENTITY = 2**32 - 1   # the eBPF maps hold u32


Allocation = tuple[int, str, str]   # (identity, namespace, service account)


class IdentityPending(LookupError):
    """A following allocator (a standby controller) does not know this identity yet: only
    the leader allocates, and its number reaches the standby through the API server."""


class IdentityAllocator:
    def __init__(self, path: Path | str | None, external: bool = False,
                 following: bool = False) -> None:
        """``path``: the local log file. None keeps allocations in memory (tests,
        benchmarks), or, with ``external``, for someone else to persist: ``take_pending()``
        (the Kubernetes mode's ConfigMap), after ``restore()`` of what was saved.

        ``following``: never allocate (a standby replica): ``get`` of an unknown pair raises
        ``IdentityPending`` and remembers the pair in ``withheld`` until ``restore`` brings
        the leader's number; ``lead()`` starts allocating."""
        self._path = Path(path) if path is not None else None
        self._external = external
        self.following = following
        self.withheld: set[tuple[str, str]] = set()
        self._ids: dict[tuple[str, str], int] = {}
        self._next = FIRST_IDENTITY
        self._pending: list[Allocation] = []
        if self._path is not None and self._path.exists():
            self._load()

    def restore(self, allocations: list[Allocation]) -> None:
        """Loads allocations persisted elsewhere (before any ``get``)."""
        for number, namespace, sa in allocations:
            self._ids[(namespace, sa)] = number
            self._next = max(self._next, number + 1)

    def lead(self) -> None:
        """This replica now leads: unknown pairs get new numbers (after the latest
        ``restore``, so none is handed out twice)."""
        self.following = False

    def take_pending(self) -> list[Allocation]:
        """External persistence: the allocations not yet saved (and forgets them)."""
        pending, self._pending = self._pending, []
        return pending

    def _load(self) -> None:
        for lineno, line in enumerate(self._path.read_text().splitlines(), 1):
            parts = line.split()
            if len(parts) != 3 or not parts[0].isdigit():
                # A torn last line (crash mid-write) is the only expected damage.
                log.warning("%s:%d: ignoring malformed identity line %r", self._path, lineno, line)
                continue
            number, namespace, sa = int(parts[0]), parts[1], parts[2]
            self._ids[(namespace, sa)] = number
            self._next = max(self._next, number + 1)

    def get(self, namespace: str, service_account: str) -> int:
        """The identity of (namespace, service account), allocated on first use."""
        key = (namespace, service_account)
        number = self._ids.get(key)
        if number is not None:
            return number
        if self.following:
            self.withheld.add(key)
            raise IdentityPending(f"identity of {namespace}/{service_account} not allocated yet")
        if self._next > MAX_IDENTITY:
            raise RuntimeError("identity space exhausted")
        number = self._next
        self._pending.append((number, namespace, service_account))
        self._ids[key] = number
        self._next = number + 1
        return number

    def commit(self) -> None:
        """Makes the allocations since the last commit durable (one fsync per batch); with
        ``external`` persistence they wait for ``take_pending()``."""
        if self._external:
            return
        if not self._pending or self._path is None:
            self._pending.clear()
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._path, "a") as log_file:
            log_file.write("".join(f"{n} {ns} {sa}\n" for n, ns, sa in self._pending))
            log_file.flush()
            os.fsync(log_file.fileno())
        self._pending.clear()

    def lookup(self, namespace: str, service_account: str) -> int | None:
        return self._ids.get((namespace, service_account))

    def __len__(self) -> int:
        return len(self._ids)
