"""Repeat HTTP/2 abusers on 15008 wait before they are served again (issue 18). Pure: the
caller gives the time.

A connection cut off for abuse (GOAWAY ENHANCE_YOUR_CALM: a PING, SETTINGS or Rapid Reset
flood, an oversized header block) costs its peer nothing: it reconnects at once, and each
new connection costs us a TLS handshake and a fresh per-connection budget, which it spends
again. py-spy under the h2flood scenario put the TLS handshake at 10-15 % of the flooded
proxy and the reconnecting abuser's frames at most of the rest. So the abuser's source
address is refused at accept, before any TLS, for a while that doubles with each repeat
(``first`` up to ``longest``); a source that behaves for ``forgive_after`` starts over.

Keyed by source IP, the only name known at accept: on 15008 that is the client pod's own
address (its node proxy dials from inside the pod), so one abusive pod never costs another
pod a refusal. The table is bounded (``capacity``, oldest forgotten first).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Record:
    strikes: int
    last_abuse: float
    until: float


class PenaltyBox:
    """Sources recently cut off for abuse, and until when their new connections are refused."""

    def __init__(self, first: float = 2.0, longest: float = 60.0, forgive_after: float = 600.0,
                 capacity: int = 4096):
        self.first, self.longest, self.forgive_after, self.capacity = first, longest, forgive_after, capacity
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def punish(self, source: str, now: float) -> float:
        """``source`` was cut off for abuse at ``now``: how long its new connections are refused."""
        record = self._records.pop(source, None)
        if record is None or now - record.last_abuse > self.forgive_after:
            record = _Record(0, now, now)
        record.strikes += 1
        record.last_abuse = now
        penalty = min(self.longest, self.first * 2 ** (record.strikes - 1))
        record.until = max(record.until, now + penalty)
        self._records[source] = record   # the most recent abuser last: the oldest go first
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)
        return penalty

    def refuses(self, source: str, now: float) -> bool:
        """Whether a new connection from ``source`` is refused at ``now``."""
        record = self._records.get(source)
        return record is not None and now < record.until

    def __len__(self) -> int:
        return len(self._records)
