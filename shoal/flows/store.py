"""The per-node flow store: a fixed-size ring indexed by sequence number.

Producers (the kernel ring-buffer reader, the proxy/waypoint socket) append; readers
hold a sequence number, never a lock. A reader whose position was overwritten has lost
those entries (Hubble's HUBBLE_RING_BUFFER loss) and learns it from ``oldest``.

Kernel events are kept raw and turned into Hubble flows only when read: appending must
cost next to nothing at hundreds of thousands of events per second.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from shoal.api.flow import flow_pb2

# (wall-clock ns, payload): payload is a raw kernel event, a flow_pb2.Flow or a flow_pb2.LostEvent.
Entry = tuple[int, Any]


class FlowStore:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._slots: list[Entry | None] = [None] * capacity
        self._head = 0                      # sequence number of the next append
        self._waiters: list[asyncio.Future] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake_pending = False
        # Two producers (the ring-buffer reader's thread, the loop's socket reader) share
        # the head; an uncontended lock costs far less than a lost or torn append.
        self._append_lock = threading.Lock()
        self.lost_by_source: dict[int, int] = {}

    # -- producers
    def append(self, ts_ns: int, payload: Any) -> None:
        """Stores one entry; safe from any thread (the kernel reader calls it from its own)."""
        with self._append_lock:
            head = self._head
            self._slots[head % self.capacity] = (ts_ns, payload)
            self._head = head + 1
        if self._waiters:
            self._wake()

    def extend(self, entries: list[Entry]) -> None:
        """Stores a batch under one lock acquisition (the kernel reader's path)."""
        capacity, slots = self.capacity, self._slots
        with self._append_lock:
            head = self._head
            for entry in entries:
                slots[head % capacity] = entry
                head += 1
            self._head = head
        if self._waiters:
            self._wake()

    def record_lost(self, ts_ns: int, source: flow_pb2.LostEventSource, count: int) -> None:
        """Counts ``count`` events lost at ``source`` and stores a lost-events record."""
        if count <= 0:
            return
        self.lost_by_source[source] = self.lost_by_source.get(source, 0) + count
        self.append(ts_ns, flow_pb2.LostEvent(source=source, num_events_lost=count))

    # -- readers
    @property
    def head(self) -> int:
        return self._head

    @property
    def oldest(self) -> int:
        return max(0, self._head - self.capacity)

    def __len__(self) -> int:
        return min(self._head, self.capacity)

    def get(self, seq: int) -> Entry | None:
        """The entry at ``seq``, or None when it was overwritten (or not written yet)."""
        if seq >= self._head:
            return None
        entry = self._slots[seq % self.capacity]
        # Re-check after the read: a producer on another thread may have lapped us.
        if seq < self._head - self.capacity:
            return None
        return entry

    def range(self, start: int, stop: int) -> Iterator[tuple[int, Entry | None]]:
        for seq in range(start, stop):
            yield seq, self.get(seq)

    async def wait_beyond(self, seq: int) -> None:
        """Returns once an entry with sequence number >= ``seq`` exists."""
        while self._head <= seq:
            future = self._attach_loop().create_future()
            self._waiters.append(future)
            if self._head > seq:           # appended between the check and the registration
                self._release()
            await future

    # -- waking followers
    def _attach_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the followers wait on: the first one to wait fixes it."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        return self._loop

    def _wake(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self._release()
        elif not self._wake_pending and self._loop is not None:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        self._wake_pending = False
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)


@dataclass(frozen=True)
class RingSource:
    """A ring the Observer streams from, and how one of its entries becomes a response."""

    store: FlowStore
    respond: Callable                       # (seq, entry, query) -> response or None
    lost_notice: Callable[[int], object] | None
    what: str
