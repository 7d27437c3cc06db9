"""Length-prefixed frames read across arbitrary chunks, headers only (sans-I/O).

HTTP/2 frames (9-byte header, 24-bit length) and gRPC messages (5-byte prefix, 32-bit
length) share one shape: a fixed-size header that says how many payload bytes follow.
``FrameScanner.feed`` returns the headers completed by a chunk and skips the payloads
without copying them, so a guard can look at every frame for a few operations each.
"""
from __future__ import annotations

from typing import Callable


class FrameScanner:
    def __init__(self, header_size: int, payload_length: Callable[[bytes], int], skip_first: int = 0) -> None:
        self.header_size = header_size
        self.payload_length = payload_length
        self._skip = skip_first          # bytes to pass before the first header (a preface)
        self._header = b""               # a header split across chunks

    def feed(self, data: bytes) -> list[bytes]:
        headers = []
        view = memoryview(data)
        while len(view):
            if self._skip:
                taken = min(self._skip, len(view))
                self._skip -= taken
                view = view[taken:]
                continue
            need = self.header_size - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) < self.header_size:
                break
            header, self._header = self._header, b""
            self._skip = self.payload_length(header)
            headers.append(header)
        return headers
