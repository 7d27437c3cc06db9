"""A batch reader of the kernel's flow ring buffer (BPF_MAP_TYPE_RINGBUF), by mmap.

libbcc's consumer calls back into Python once per record through ctypes, and decoding
each record into a dataclass on the spot costs more again: together they top out near
100,000 records/s here. This reader maps the ring like libbpf does, walks the records in
Python, and hands *raw* record bytes to ``on_records(list_of_bytes)`` in batches; the
flow store keeps them raw and decodes only what a client reads.

Ring layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (ours to write),
page 1 the producer position; the data area follows, mapped twice so a record that
wraps around is still contiguous. Each record starts with an 8-byte header: u32 length
(bit 31 busy, bit 30 discarded) and u32 page offset; records are 8-byte aligned.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import select
import struct
import threading
from typing import Callable

log = logging.getLogger(__name__)

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_BYTES = 8
_U32 = struct.Struct("<I")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


class RingReader:
    def __init__(self, map_fd: int, data_bytes: int, on_records: Callable[[list[bytes]], None],
                 poll_ms: int = 10, max_batch: int = 4096) -> None:
        if data_bytes <= 0 or data_bytes & (data_bytes - 1):
            raise ValueError(f"ring buffer size must be a power of two, got {data_bytes}")
        self._fd = os.dup(map_fd)       # our own reference: the map outlives whoever opened it
        self._size = data_bytes
        self._mask = data_bytes - 1
        self._on_records = on_records
        self._poll_ms = poll_ms
        self._max_batch = max_batch
        page = mmap.PAGESIZE
        # Positions are read and written with single aligned 8-byte accesses (ctypes
        # c_uint64): struct.pack_into writes byte by byte, and a torn consumer position
        # makes the kernel see a ring that is suddenly full and refuse records.
        self._consumer = mmap.mmap(self._fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._consumer_pos = ctypes.c_uint64.from_buffer(self._consumer)
        # The producer page and the data area are read-only for us: mapped with libc's mmap
        # so that we have their address for ctypes loads.
        self._producer_len = page + 2 * data_bytes
        address = _libc.mmap(None, self._producer_len, mmap.PROT_READ, mmap.MAP_SHARED, self._fd, page)
        if address in (None, _MAP_FAILED):
            errno = ctypes.get_errno()
            raise OSError(errno, f"mmap of the flow ring failed: {os.strerror(errno)}")
        self._producer_address = address
        self._producer_pos = ctypes.c_uint64.from_address(address)
        self._producer = (ctypes.c_char * self._producer_len).from_address(address)
        self._data_offset = page
        self._epoll = select.epoll()
        self._epoll.register(self._fd, select.EPOLLIN)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shoal-flow-ring", daemon=True)
        self.delivered = 0
        self.discarded = 0

    def consume(self) -> int:
        """Hands every complete record now in the ring to ``on_records``; returns how many."""
        data, data_offset, mask = memoryview(self._producer), self._data_offset, self._mask
        consumer_pos = self._consumer_pos.value
        total = 0
        while True:
            producer_pos = self._producer_pos.value
            if consumer_pos >= producer_pos:
                break
            batch = []
            while consumer_pos < producer_pos and len(batch) < self._max_batch:
                offset = data_offset + (consumer_pos & mask)
                length = _U32.unpack_from(data, offset)[0]
                if length & BUSY_BIT:
                    producer_pos = consumer_pos     # a producer is still writing this one
                    break
                size = length & ~(BUSY_BIT | DISCARD_BIT)
                if length & DISCARD_BIT:
                    self.discarded += 1
                else:
                    batch.append(bytes(data[offset + HEADER_BYTES: offset + HEADER_BYTES + size]))
                consumer_pos += (size + HEADER_BYTES + 7) & ~7
            # Give the space back before handing records on: the kernel can write again.
            self._consumer_pos.value = consumer_pos
            if batch:
                self.delivered += len(batch)
                total += len(batch)
                self._on_records(batch)
            if consumer_pos >= producer_pos and len(batch) < self._max_batch:
                break
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self._epoll.poll(self._poll_ms / 1000)
            try:
                self.consume()
            except (ValueError, struct.error) as error:   # a torn read of the ring: log, go on
                log.error("flow ring read failed: %s", error)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._epoll.close()
        del self._consumer_pos        # the ctypes view pins the mmap's buffer
        self._consumer.close()
        del self._producer, self._producer_pos
        _libc.munmap(ctypes.c_void_p(self._producer_address), self._producer_len)
        os.close(self._fd)
