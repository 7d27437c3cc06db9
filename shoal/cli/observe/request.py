"""Hubble's ``observe`` flags -> GetFlowsRequest, without I/O.

Hubble's rules: ``--from-X`` constrains the source, ``--to-X`` the destination, and the
undirected ``--X`` matches either side: the request then carries two whitelist filters
(X as source, X as destination) that share every other flag. Flags after ``--not`` go to
the blacklist instead. ``--namespace`` qualifies ``--pod``/``--service`` values that have
no namespace of their own, and alone means "any pod in that namespace".
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field

from shoal.api.flow import flow_pb2
from shoal.api.observer import observer_pb2
from shoal.flows.filters import FilterError, FlowMatcher
from shoal.flows.query import NUMBER_ALL

DEFAULT_LAST = 20

# --type names -> Cilium monitor message types; sub types by name where Hubble has them.
EVENT_TYPES = {"drop": 1, "debug": 2, "capture": 3, "trace": 4, "policy-verdict": 5,
               "trace-sock": 7, "l7": 129, "agent": 130}
TRACE_SUBTYPES = {"to-endpoint": 0, "to-proxy": 1, "to-host": 2, "to-stack": 3, "to-overlay": 4,
                  "from-endpoint": 5, "from-proxy": 6, "from-host": 7, "from-stack": 8,
                  "from-overlay": 9, "from-network": 10, "to-network": 11}

# Filter flags: name -> FlowFilter field stem (source_<stem> / destination_<stem>).
ENDPOINT_FLAGS = {"pod": "pod", "ip": "ip", "label": "label", "port": "port", "service": "service",
                  "identity": "identity", "fqdn": "fqdn", "workload": "workload"}
PLAIN_FLAGS = ("verdict", "protocol", "type", "http_status", "http_method", "http_path", "node_name",
               "traffic_direction", "tcp_flags", "ip_version", "uuid", "trace_id")


@dataclass
class FilterFlags:
    """One polarity (whitelist or --not blacklist) of the filter flags, as typed."""

    namespace: list[str] = field(default_factory=list)
    from_namespace: list[str] = field(default_factory=list)
    to_namespace: list[str] = field(default_factory=list)
    both: dict[str, list[str]] = field(default_factory=dict)       # --pod x
    source: dict[str, list[str]] = field(default_factory=dict)     # --from-pod x
    destination: dict[str, list[str]] = field(default_factory=dict)  # --to-pod x
    plain: dict[str, list[str]] = field(default_factory=dict)      # --verdict DROPPED

    def add(self, flag: str, value: str) -> None:
        """``flag`` as on the command line without dashes: "from-pod", "namespace", "verdict"..."""
        name = flag.replace("-", "_")
        if name in ("namespace", "from_namespace", "to_namespace"):
            getattr(self, name).append(value)
            return
        for prefix, target in (("from_", self.source), ("to_", self.destination)):
            if name.startswith(prefix) and name[len(prefix):] in ENDPOINT_FLAGS:
                target.setdefault(name[len(prefix):], []).append(value)
                return
        if name in ENDPOINT_FLAGS:
            self.both.setdefault(name, []).append(value)
        elif name in PLAIN_FLAGS:
            self.plain.setdefault(name, []).append(value)
        else:
            raise FilterError(f"unknown filter flag --{flag}")

    def empty(self) -> bool:
        return not (self.namespace or self.from_namespace or self.to_namespace or self.both
                    or self.source or self.destination or self.plain)

    def to_filters(self) -> list[flow_pb2.FlowFilter]:
        if self.empty():
            return []
        base = flow_pb2.FlowFilter()
        _apply_plain(base, self.plain)
        namespace_used = False
        for side, values, side_namespaces in (("source", self.source, self.from_namespace),
                                              ("destination", self.destination, self.to_namespace)):
            named = any(stem in values for stem in ("pod", "service"))
            if named and not side_namespaces and self.namespace:
                side_namespaces, namespace_used = self.namespace, True
            _apply_endpoint(base, side, values, side_namespaces)
        undirected = dict(self.both)
        namespace_alone = bool(self.namespace) and not namespace_used
        if not undirected and not namespace_alone:
            return [base]
        named = any(stem in undirected for stem in ("pod", "service"))
        namespaces = self.namespace if (named or namespace_alone) else []
        filters = []
        for side in ("source", "destination"):
            one = flow_pb2.FlowFilter()
            one.CopyFrom(base)
            _apply_endpoint(one, side, undirected, namespaces)
            filters.append(one)
        return filters


def _qualify(names: list[str], namespaces: list[str]) -> list[str]:
    """Pod/service names without a namespace get each ``--namespace``; none: any namespace."""
    if not namespaces:
        return names
    out = []
    for name in names:
        if "/" in name:
            out.append(name)
        else:
            out.extend(f"{ns}/{name}" for ns in namespaces)
    return out


def _apply_endpoint(target: flow_pb2.FlowFilter, side: str, values: dict[str, list[str]],
                    namespaces: list[str]) -> None:
    for stem, raw in values.items():
        field_name = f"{side}_{stem}"
        if stem in ("pod", "service"):
            getattr(target, field_name).extend(_qualify(raw, namespaces))
        elif stem == "identity":
            try:
                getattr(target, field_name).extend(int(v) for v in raw)
            except ValueError:
                raise FilterError(f"--identity: not a number: {raw}") from None
        elif stem == "workload":
            for value in raw:
                kind, _, name = value.rpartition("/")
                getattr(target, field_name).add(name=name, kind=kind)
        else:
            getattr(target, field_name).extend(raw)
    if namespaces and not any(stem in values for stem in ("pod", "service")):
        getattr(target, f"{side}_pod").extend(f"{ns}/" for ns in namespaces)


def _apply_plain(target: flow_pb2.FlowFilter, plain: dict[str, list[str]]) -> None:
    for name, values in plain.items():
        for value in values:
            if name == "verdict":
                try:
                    target.verdict.append(flow_pb2.Verdict.Value(value.upper()))
                except ValueError:
                    names = ", ".join(n for n in flow_pb2.Verdict.keys() if n != "VERDICT_UNKNOWN")
                    raise FilterError(f"--verdict: unknown verdict {value!r}, want one of {names}") from None
            elif name == "type":
                target.event_type.append(parse_event_type(value))
            elif name == "http_status":
                target.http_status_code.append(value)
            elif name == "traffic_direction":
                try:
                    target.traffic_direction.append(flow_pb2.TrafficDirection.Value(value.upper()))
                except ValueError:
                    raise FilterError(f"--traffic-direction: want ingress or egress, got {value!r}") from None
            elif name == "tcp_flags":
                flags = flow_pb2.TCPFlags()
                for flag in value.split(","):
                    if flag.upper() not in flow_pb2.TCPFlags.DESCRIPTOR.fields_by_name:
                        raise FilterError(f"--tcp-flags: unknown flag {flag!r}")
                    setattr(flags, flag.upper(), True)
                target.tcp_flags.append(flags)
            elif name == "ip_version":
                versions = {"v4": flow_pb2.IPv4, "ipv4": flow_pb2.IPv4, "4": flow_pb2.IPv4,
                            "v6": flow_pb2.IPv6, "ipv6": flow_pb2.IPv6, "6": flow_pb2.IPv6}
                if value.lower() not in versions:
                    raise FilterError(f"--ip-version: want v4 or v6, got {value!r}")
                target.ip_version.append(versions[value.lower()])
            else:
                getattr(target, name).append(value)


def parse_event_type(value: str) -> flow_pb2.EventTypeFilter:
    name, _, sub = value.partition(":")
    if name not in EVENT_TYPES:
        raise FilterError(f"--type: unknown event type {name!r}, want one of {', '.join(EVENT_TYPES)}")
    event = flow_pb2.EventTypeFilter(type=EVENT_TYPES[name])
    if sub:
        if sub.isdigit():
            event.sub_type = int(sub)
        elif name == "trace" and sub in TRACE_SUBTYPES:
            event.sub_type = TRACE_SUBTYPES[sub]
        elif name == "drop" and sub.upper() in flow_pb2.DropReason.keys():
            event.sub_type = flow_pb2.DropReason.Value(sub.upper())
        else:
            raise FilterError(f"--type: unknown sub type {sub!r} for {name!r}")
        event.match_sub_type = True
    return event


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """Hubble's --since/--until: a duration ago ("5m", "1h30m") or an RFC 3339 time."""
    now = now or dt.datetime.now(dt.timezone.utc)
    text = value.strip()
    if text and _DURATION.sub("", text) == "" and _DURATION.match(text):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION.findall(text))
        return now - dt.timedelta(seconds=seconds)
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise FilterError(f"invalid time {value!r}: want a duration like 5m or 1h30m, "
                          "or an RFC 3339 time like 2024-01-02T15:04:05Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


@dataclass
class Selection:
    last: int | None = None
    first: int | None = None
    all: bool = False
    follow: bool = False
    since: str | None = None
    until: str | None = None


def build_request(selection: Selection, allow: FilterFlags, deny: FilterFlags,
                  now: dt.datetime | None = None) -> observer_pb2.GetFlowsRequest:
    """Validates the flag combination the way Hubble does; raises FilterError."""
    request = observer_pb2.GetFlowsRequest()
    chosen = [name for name, on in (("--last", selection.last is not None), ("--first", selection.first is not None),
                                    ("--all", selection.all)) if on]
    if len(chosen) > 1:
        raise FilterError(f"{' and '.join(chosen)} cannot be combined")
    if selection.first is not None and selection.follow:
        raise FilterError("--first cannot be combined with --follow")
    for name, value in (("--last", selection.last), ("--first", selection.first)):
        if value is not None and value < 1:
            raise FilterError(f"{name} must be at least 1")
    if selection.all:
        request.number = NUMBER_ALL
    elif selection.first is not None:
        request.number, request.first = selection.first, True
    elif selection.last is not None:
        request.number = selection.last
    elif not selection.follow and not selection.since and not selection.until:
        request.number = DEFAULT_LAST
    request.follow = selection.follow
    if selection.since:
        request.since.FromDatetime(parse_time(selection.since, now))
    if selection.until:
        request.until.FromDatetime(parse_time(selection.until, now))
    if selection.since and selection.until and request.since.ToNanoseconds() > request.until.ToNanoseconds():
        raise FilterError("--since is after --until")
    request.whitelist.extend(allow.to_filters())
    request.blacklist.extend(deny.to_filters())
    FlowMatcher(request.whitelist, request.blacklist)   # same validation as the server, before any I/O
    return request
