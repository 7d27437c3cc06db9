"""The HBONE driver's read buffer, sized to what its connection carries.

TLS decrypts straight into it (``asyncio.BufferedProtocol``) and the fast path hands DATA
payloads out as views of it, so a whole frame must fit: a bulk connection needs room for
a partial 1 MiB frame and a whole one after it (``LARGE``, 2.25 MiB). A node proxy holds
one buffer per HBONE connection (10,000 tunnels are 100 connections on each side), and
most connections carry small requests or nothing at all: a 2.25 MiB buffer each cost
225 MB at 10,000 tunnels. So a buffer starts at ``SMALL`` and grows only when a read or
a frame needs the room (the TLS layer's size hint is what it is about to decrypt), and
shrinks back after a run of small reads or when its connection has no stream left.

Sans-I/O: the driver asks for ``room`` to read into, says how much was ``filled``, hands
the bytes to the parser, then says how many were ``used``; ``lent`` marks a buffer a
socket still holds a view of, which is never written over again. A parser that stopped at
its per-turn budget is handed the ``unparsed`` rest on a later turn, with no read between.
"""
from __future__ import annotations

from shoal.hbone.framing import MAX_FRAME

FRAME_HEADER = 9
SMALL = 64 * 1024
MEDIUM = 4 * SMALL
LARGE = 2 * MAX_FRAME + 256 * 1024
SIZES = (SMALL, MEDIUM, LARGE)
MAX_MIN_FREE = 256 * 1024        # a bulk read is never offered less (uvloop reads 256 KiB of TLS at a time)
SHRINK_AFTER_SMALL_READS = 64    # consecutive reads leaving at most SMALL // 4 unparsed bytes


def size_for(need: int) -> int:
    """The smallest buffer size that holds ``need`` bytes (LARGE at most)."""
    return next((size for size in SIZES if size >= need), LARGE)


class SessionReadBuffer:
    """One connection's read buffer: ``data[start:end]`` is received, not yet parsed
    (at most one partial frame once the parser has run)."""

    __slots__ = ("data", "start", "end", "lent", "_small_reads")

    def __init__(self) -> None:
        self.data = bytearray(SMALL)
        self.start = self.end = 0
        self.lent = False          # a socket queued a view of ``data``: never write it again
        self._small_reads = 0

    def room(self, sizehint: int) -> memoryview:
        """Where the next read goes: never a sliver, and at least ``sizehint`` bytes (the
        TLS layer's estimate of what it is about to decrypt) while the buffer may still
        grow. A LARGE buffer is only compacted when less than MAX_MIN_FREE is left: a
        compaction copies the held partial frame (up to 1 MiB) twice."""
        free = len(self.data) - self.end
        min_free = min(MAX_MIN_FREE, len(self.data) // 4)
        if free < min_free or (free < sizehint and len(self.data) < LARGE):
            self._make_room(max(sizehint, min_free))
        return memoryview(self.data)[self.end:]

    def filled(self, nbytes: int) -> memoryview:
        """``nbytes`` were read into the room: every unparsed byte, as a view."""
        self.end += nbytes
        if self.end <= SMALL // 4:   # small reads of a large frame add up: not "small"
            self._small_reads += 1
        else:
            self._small_reads = 0
        return memoryview(self.data)[self.start:self.end]

    def unparsed(self) -> memoryview:
        """The bytes received and not parsed yet (whole frames the parser left for a
        later turn, and at most one partial frame)."""
        return memoryview(self.data)[self.start:self.end]

    def used(self, nbytes: int) -> None:
        """The parser took ``nbytes``; once everything is parsed and nothing was lent, the
        next read starts at the beginning again (and a buffer that has only seen small
        reads for a while goes back to SMALL)."""
        self.start += nbytes
        if self.start == self.end and not self.lent:
            self.start = self.end = 0
            if self._small_reads >= SHRINK_AFTER_SMALL_READS and len(self.data) > SMALL:
                self.shrink()

    def shrink(self) -> None:
        """Back to SMALL when nothing is held (the connection went quiet)."""
        if self.start == self.end and len(self.data) > SMALL:
            self.data, self.lent = bytearray(SMALL), False
            self.start = self.end = 0
            self._small_reads = 0

    def _held_frame_size(self) -> int:
        """The full size of the partial frame held at ``start`` (0 before its header is in)."""
        if self.end - self.start < FRAME_HEADER:
            return 0
        return int.from_bytes(self.data[self.start:self.start + 3], "big") + FRAME_HEADER

    def _make_room(self, wanted: int) -> None:
        held = bytes(self.data[self.start:self.end])   # at most one partial frame
        need = min(max(self._held_frame_size(), len(held) + wanted), LARGE)
        size = size_for(max(need, len(held)))
        if self._small_reads < SHRINK_AFTER_SMALL_READS:
            size = max(size, len(self.data))           # a busy connection keeps what it grew to
        if self.lent or size != len(self.data):
            self.data, self.lent = bytearray(size), False
        self.data[:len(held)] = held
        self.start, self.end = 0, len(held)
