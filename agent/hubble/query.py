"""GetFlows request semantics, shared by the agent's observer and the relay (no I/O)."""
from __future__ import annotations

from dataclasses import dataclass

from shoal.agent.hubble.filters import FilterError, FlowMatcher
from shoal.api.observer import observer_pb2

# ``--all`` in the hubble CLI asks for this many: effectively "everything stored".
NUMBER_ALL = 2**64 - 1


@dataclass(frozen=True)
class FlowQuery:
    number: int            # 0 = no limit
    first: bool
    follow: bool
    since_ns: int | None
    until_ns: int | None
    matcher: FlowMatcher

    @classmethod
    def from_request(cls, request: observer_pb2.GetFlowsRequest) -> "FlowQuery":
        """Validates ``request``; raises FilterError (a ValueError) with a clear message."""
        has_since = request.HasField("since")
        has_until = request.HasField("until")
        if request.number and (has_since or has_until) and request.number != NUMBER_ALL:
            raise FilterError("number cannot be combined with since/until")
        if request.first and request.follow:
            raise FilterError("first cannot be combined with follow")
        since_ns = _timestamp_ns(request.since, "since") if has_since else None
        until_ns = _timestamp_ns(request.until, "until") if has_until else None
        if since_ns is not None and until_ns is not None and since_ns > until_ns:
            raise FilterError("since is after until")
        matcher = FlowMatcher(request.whitelist, request.blacklist)
        number = 0 if request.number == NUMBER_ALL else request.number
        return cls(number, request.first, request.follow, since_ns, until_ns, matcher)

    @property
    def history_limit(self) -> int | None:
        """How many stored flows to return before following (None = all that match)."""
        if self.number:
            return self.number
        if self.follow and self.since_ns is None:
            return 0              # plain follow: only what comes next
        return None

    def in_time(self, ts_ns: int) -> bool:
        return (self.since_ns is None or ts_ns >= self.since_ns) and (
            self.until_ns is None or ts_ns <= self.until_ns)

    def past_until(self, ts_ns: int) -> bool:
        return self.until_ns is not None and ts_ns > self.until_ns


def _timestamp_ns(timestamp, name: str) -> int:
    if not 0 <= timestamp.nanos < 1_000_000_000 or timestamp.seconds < 0 or timestamp.seconds > 253402300799:
        raise FilterError(f"{name}: invalid timestamp {timestamp.seconds}s {timestamp.nanos}ns")
    return timestamp.seconds * 1_000_000_000 + timestamp.nanos
