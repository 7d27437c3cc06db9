"""GetFlows request semantics, shared by the agent's observer and the relay (no I/O)."""
from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.field_mask_pb2 import FieldMask

from shoal.api.flow import flow_pb2
from shoal.api.observer import observer_pb2
from shoal.flows.filters import FilterError, FlowMatcher

# ``--all`` in the hubble CLI asks for this many: effectively "everything stored".
NUMBER_ALL = 2**64 - 1
# gRPC health names: Hubble's clients ask for "hubble.server.Observer" (pkg/hubble/api/v1's
# ObserverServiceName); "" is the server as a whole, "observer.Observer" the gRPC service.
HEALTH_SERVICES = ("", "observer.Observer", "hubble.server.Observer")
# One request's filters are compiled for every stored flow it scans: bounded.
MAX_FILTERS = 64
MAX_FILTER_VALUES = 1024
MAX_FIELD_MASK_PATHS = 64
# A GetFlowsRequest is filters, never data: anything larger is refused by gRPC itself.
MAX_REQUEST_BYTES = 256 * 1024


@dataclass(frozen=True)
class FlowQuery:
    number: int            # 0 = no limit
    first: bool
    follow: bool
    since_ns: int | None
    until_ns: int | None
    matcher: FlowMatcher
    field_mask: FieldMask | None = None

    @classmethod
    def from_request(cls, request: observer_pb2.GetFlowsRequest) -> "FlowQuery":
        """Validates ``request``; raises FilterError (a ValueError) with a clear message."""
        has_since = request.HasField("since")
        has_until = request.HasField("until")
        if request.first and request.follow:
            raise FilterError("first cannot be combined with follow")
        since_ns = _timestamp_ns(request.since, "since") if has_since else None
        until_ns = _timestamp_ns(request.until, "until") if has_until else None
        if since_ns is not None and until_ns is not None and since_ns > until_ns:
            raise FilterError("since is after until")
        _check_size(request)
        matcher = FlowMatcher(request.whitelist, request.blacklist)
        number = 0 if request.number == NUMBER_ALL else request.number
        return cls(number, request.first, request.follow, since_ns, until_ns, matcher,
                   _field_mask(request))

    def shape(self, flow: flow_pb2.Flow) -> flow_pb2.Flow:
        """The flow as the client asked to see it (only the field mask's paths, if any)."""
        if self.field_mask is None:
            return flow
        shaped = flow_pb2.Flow()
        self.field_mask.MergeMessage(flow, shaped)
        return shaped

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


def as_flows_request(request: observer_pb2.GetAgentEventsRequest) -> observer_pb2.GetFlowsRequest:
    """GetAgentEvents selects like GetFlows (number, first, follow, since, until), no filters."""
    flows = observer_pb2.GetFlowsRequest(number=request.number, first=request.first, follow=request.follow)
    for name in ("since", "until"):
        if request.HasField(name):
            getattr(flows, name).CopyFrom(getattr(request, name))
    return flows


def _check_size(request: observer_pb2.GetFlowsRequest) -> None:
    for name in ("whitelist", "blacklist"):
        filters = getattr(request, name)
        if len(filters) > MAX_FILTERS:
            raise FilterError(f"{name}: {len(filters)} filters, at most {MAX_FILTERS}")
    values = 0
    for flow_filter in (*request.whitelist, *request.blacklist):
        for _, value in flow_filter.ListFields():
            values += len(value) if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else 1
    if values > MAX_FILTER_VALUES:
        raise FilterError(f"filters hold {values} values, at most {MAX_FILTER_VALUES}")


def _field_mask(request: observer_pb2.GetFlowsRequest) -> FieldMask | None:
    """Hubble's experimental field mask: paths of Flow fields to keep; unknown paths refused."""
    if not request.HasField("experimental") or not request.experimental.field_mask.paths:
        return None
    mask = request.experimental.field_mask
    if len(mask.paths) > MAX_FIELD_MASK_PATHS:
        raise FilterError(f"field_mask: {len(mask.paths)} paths, at most {MAX_FIELD_MASK_PATHS}")
    for path in mask.paths:
        # types-protobuf types DESCRIPTOR as upb's Descriptor or the pure-Python one, and this
        # argument as the latter only: both are accepted at run time.
        if not FieldMask(paths=[path]).IsValidForDescriptor(flow_pb2.Flow.DESCRIPTOR):  # type: ignore[arg-type]
            raise FilterError(f"field_mask: unknown path {path!r} (want Flow fields, e.g. 'time', "
                              "'source.pod_name', 'verdict')")
    canonical = FieldMask()
    canonical.CanonicalFormFromMask(mask)
    return canonical


def _timestamp_ns(timestamp, name: str) -> int:
    if not 0 <= timestamp.nanos < 1_000_000_000 or timestamp.seconds < 0 or timestamp.seconds > 253402300799:
        raise FilterError(f"{name}: invalid timestamp {timestamp.seconds}s {timestamp.nanos}ns")
    return timestamp.seconds * 1_000_000_000 + timestamp.nanos
