"""Hubble's FlowFilter semantics, pure (no I/O): compile once, then call per flow.

- Within one FlowFilter every set field must match (AND); the values listed in one
  field are alternatives (OR).
- A request's whitelist matches when any of its filters matches (OR); an empty
  whitelist matches everything. The blacklist excludes a flow when any filter matches.

Malformed input (bad CIDR, unknown protocol, bad port, bad regex, bad label selector,
bad status code pattern) raises ``FilterError`` (a ValueError) naming the field, so the
server can answer INVALID_ARGUMENT before streaming anything.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from functools import partial

import re2  # type: ignore[import-untyped]  # google-re2 ships no type stubs

from shoal.api.flow import flow_pb2

Predicate = Callable[[flow_pb2.Flow], bool]


class FilterError(ValueError):
    """A FlowFilter (or a request) that cannot be honoured."""


# ---------------------------------------------------------------- small parsers

def parse_ip_matcher(values: Sequence[str], field: str) -> Callable[[str], bool]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError as error:
            raise FilterError(f"{field}: invalid IP or CIDR {value!r}: {error}") from None

    def match(ip: str) -> bool:
        if not ip:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address.version == net.version and address in net for net in networks)

    return match


def parse_ports(values: Sequence[str], field: str) -> frozenset[int]:
    ports = set()
    for value in values:
        try:
            port = int(value, 10)
        except ValueError:
            raise FilterError(f"{field}: invalid port {value!r}") from None
        if not 0 <= port <= 65535:
            raise FilterError(f"{field}: port {value!r} out of range 0-65535")
        ports.add(port)
    return frozenset(ports)


def parse_namespaced(values: Sequence[str], field: str) -> list[tuple[str, str]]:
    """``"ns/prefix"``, ``"ns/"`` (whole namespace) or ``"prefix"`` (any namespace)."""
    parsed = []
    for value in values:
        if value.count("/") > 1 or value in ("", "/"):
            raise FilterError(f"{field}: invalid name {value!r}, want 'name', 'namespace/name' or 'namespace/'")
        namespace, slash, prefix = value.rpartition("/")
        parsed.append((namespace if slash else "", prefix))
    return parsed


STATUS_CODE = re.compile(r"^(\d{1,3})\+$|^(\d{3})$")


def parse_status_codes(values: Sequence[str]) -> Callable[[int], bool]:
    """"404" exact; "4+" any 4xx; "50+" any 50x (Hubble's prefix form)."""
    exact: set[int] = set()
    prefixes: list[str] = []
    for value in values:
        found = STATUS_CODE.match(value)
        if not found or (found.group(2) and not 100 <= int(value) <= 599):
            raise FilterError(f"http_status_code: invalid status code {value!r}, want e.g. '404', '4+', '50+'")
        if found.group(1):
            prefixes.append(found.group(1))
        else:
            exact.add(int(value))

    def match(code: int) -> bool:
        if code == 0:
            return False
        text = str(code)
        return code in exact or any(text.startswith(p) for p in prefixes)

    return match


# A client's regex is compiled by RE2 (Go's regexp syntax, as Hubble's own filters): matching
# is linear in the input, so no pattern can backtrack for seconds (ReDoS). Patterns and the
# automaton's memory are bounded too.
MAX_REGEX_CHARS = 1024
REGEX_MAX_MEM = 1 << 20


def _re2_options():
    options = re2.Options()
    options.max_mem = REGEX_MAX_MEM
    options.log_errors = False
    return options


def compile_regexes(values: Sequence[str], field: str) -> list:
    patterns = []
    for value in values:
        if len(value) > MAX_REGEX_CHARS:
            raise FilterError(f"{field}: regular expression longer than {MAX_REGEX_CHARS} characters")
        try:
            patterns.append(re2.compile(value, _re2_options()))
        except re2.error as error:
            reason = error.args[0].decode(errors="replace") if error.args and isinstance(
                error.args[0], bytes) else str(error)
            raise FilterError(f"{field}: invalid regular expression {value!r} (RE2 syntax): {reason}") from None
    return patterns


# ---------------------------------------------------------------- label selectors

_REQ_SET = re.compile(r"^\s*(!?)([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_REQ_EQ = re.compile(r"^\s*([^\s!=(),]+)\s*(==|=|!=)\s*([^\s!=(),]*)\s*$")
_REQ_EXISTS = re.compile(r"^\s*(!?)([^\s!=(),]+)\s*$")


def _split_requirements(selector: str) -> list[str]:
    """Splits on commas outside parentheses: ``"a in (x,y),b"`` -> two requirements."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _label_lookup(labels: Iterable[str]) -> dict[str, str]:
    """``["k8s:app=web"]`` -> ``{"k8s:app": "web", "app": "web", "any:app": "web"}``."""
    table: dict[str, str] = {}
    for label in labels:
        key, _, value = label.partition("=")
        table[key] = value
        source, colon, bare = key.partition(":")
        if colon:
            table.setdefault(bare, value)
            table.setdefault(f"any:{bare}", value)
    return table


# One requirement of a label selector, over the table of ``_label_lookup``.
def _value_in(key: str, values: frozenset[str], table: dict[str, str]) -> bool:
    return table.get(key) in values


def _value_not_in(key: str, values: frozenset[str], table: dict[str, str]) -> bool:
    return table.get(key) not in values


def _value_is(key: str, value: str, table: dict[str, str]) -> bool:
    return key in table and table[key] == value


def _value_is_not(key: str, value: str, table: dict[str, str]) -> bool:
    return table.get(key) != value


def _has(key: str, table: dict[str, str]) -> bool:
    return key in table


def _lacks(key: str, table: dict[str, str]) -> bool:
    return key not in table


def parse_label_selector(selector: str, field: str) -> Callable[[Sequence[str]], bool]:
    """Kubernetes label selector syntax over Cilium-style ``source:key=value`` labels."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    if not selector.strip():
        raise FilterError(f"{field}: empty label selector")
    for requirement in _split_requirements(selector):
        if (found := _REQ_SET.match(requirement)):
            negate, key, op, raw = found.groups()
            if negate:
                raise FilterError(f"{field}: invalid label selector {selector!r}")
            values = frozenset(v.strip() for v in raw.split(",") if v.strip())
            checks.append(partial(_value_in if op == "in" else _value_not_in, key, values))
        elif (found := _REQ_EQ.match(requirement)):
            key, op, value = found.groups()
            checks.append(partial(_value_is_not if op == "!=" else _value_is, key, value))
        elif (found := _REQ_EXISTS.match(requirement)):
            negate, key = found.groups()
            checks.append(partial(_lacks if negate else _has, key))
        else:
            raise FilterError(f"{field}: invalid label selector {selector!r}")

    def match(labels: Sequence[str]) -> bool:
        table = _label_lookup(labels)
        return all(check(table) for check in checks)

    return match


# ---------------------------------------------------------------- flow accessors

PROTOCOLS = ("tcp", "udp", "icmp", "icmpv4", "icmpv6", "sctp", "http", "dns", "kafka")


def flow_protocols(flow: flow_pb2.Flow) -> set[str]:
    names = set()
    kind = flow.l4.WhichOneof("protocol")
    if kind:
        name = kind.lower()
        names.add(name)
        if name.startswith("icmp"):
            names.add("icmp")
    if flow.HasField("l7"):
        record = flow.l7.WhichOneof("record")
        if record:
            names.add(record)
    return names


def ports(flow: flow_pb2.Flow) -> tuple[int, int]:
    kind = flow.l4.WhichOneof("protocol")
    if kind in ("TCP", "UDP", "SCTP"):
        layer = getattr(flow.l4, kind)
        return layer.source_port, layer.destination_port
    return 0, 0


def _endpoint_matchers(flow_filter: flow_pb2.FlowFilter, side: str) -> list[Predicate]:
    """The source_* (or destination_*) fields of one filter."""
    checks: list[Predicate] = []
    field_prefix = "source" if side == "source" else "destination"
    ips = getattr(flow_filter, f"{field_prefix}_ip")
    if ips:
        match_ip = parse_ip_matcher(ips, f"{field_prefix}_ip")
        ip_attr = "source" if side == "source" else "destination"
        checks.append(lambda f: match_ip(getattr(f.IP, ip_attr)))
    pods = getattr(flow_filter, f"{field_prefix}_pod")
    if pods:
        wanted = parse_namespaced(pods, f"{field_prefix}_pod")

        def match_pod(f, wanted=wanted):
            # "ns/" matches every pod of ns; a bare prefix matches pods of any namespace.
            ep = getattr(f, side)
            return bool(ep.pod_name) and any(
                (not ns or ns == ep.namespace) and ep.pod_name.startswith(prefix) for ns, prefix in wanted)

        checks.append(match_pod)
    services = getattr(flow_filter, f"{field_prefix}_service")
    if services:
        wanted_services = parse_namespaced(services, f"{field_prefix}_service")
        svc_attr = f"{field_prefix}_service"

        def match_service(f, wanted=wanted_services, attr=svc_attr):
            svc = getattr(f, attr)
            return bool(svc.name) and any(
                (not ns or ns == svc.namespace) and svc.name.startswith(prefix) for ns, prefix in wanted)

        checks.append(match_service)
    selectors = getattr(flow_filter, f"{field_prefix}_label")
    if selectors:
        matchers = [parse_label_selector(s, f"{field_prefix}_label") for s in selectors]
        checks.append(lambda f: any(m(getattr(f, side).labels) for m in matchers))
    identities = frozenset(getattr(flow_filter, f"{field_prefix}_identity"))
    if identities:
        checks.append(lambda f: getattr(f, side).identity in identities)
    workloads = [(w.name, w.kind) for w in getattr(flow_filter, f"{field_prefix}_workload")]
    if workloads:
        def match_workload(f, wanted=workloads):
            return any((not name or name == w.name) and (not kind or kind == w.kind)
                       for w in getattr(f, side).workloads for name, kind in wanted)

        checks.append(match_workload)
    port_values = getattr(flow_filter, f"{field_prefix}_port")
    if port_values:
        wanted_ports = parse_ports(port_values, f"{field_prefix}_port")
        index = 0 if side == "source" else 1
        checks.append(lambda f: bool(f.l4.WhichOneof("protocol")) and ports(f)[index] in wanted_ports)
    fqdns = getattr(flow_filter, f"{field_prefix}_fqdn")
    if fqdns:
        names_attr, patterns = f"{field_prefix}_names", list(fqdns)
        checks.append(lambda f: any(
            fnmatch.fnmatchcase(name, pattern) for name in getattr(f, names_attr) for pattern in patterns))
    return checks


def compile_filter(flow_filter: flow_pb2.FlowFilter) -> Predicate:
    """One FlowFilter -> predicate: every set field must match."""
    checks = _endpoint_matchers(flow_filter, "source") + _endpoint_matchers(flow_filter, "destination")

    if flow_filter.uuid:
        uuids = frozenset(flow_filter.uuid)
        checks.append(lambda f: f.uuid in uuids)
    if flow_filter.verdict:
        verdicts = frozenset(flow_filter.verdict)
        for value in verdicts:
            if value not in flow_pb2.Verdict.values():
                raise FilterError(f"verdict: unknown verdict {value}")
        checks.append(lambda f: f.verdict in verdicts)
    if flow_filter.traffic_direction:
        directions = frozenset(flow_filter.traffic_direction)
        checks.append(lambda f: f.traffic_direction in directions)
    if flow_filter.event_type:
        types = [(e.type, e.match_sub_type, e.sub_type) for e in flow_filter.event_type]
        checks.append(lambda f: any(
            f.event_type.type == t and (not by_sub or f.event_type.sub_type == sub)
            for t, by_sub, sub in types))
    if flow_filter.http_status_code:
        match_code = parse_status_codes(flow_filter.http_status_code)
        checks.append(lambda f: f.l7.WhichOneof("record") == "http" and match_code(f.l7.http.code))
    if flow_filter.protocol:
        wanted = set()
        for name in flow_filter.protocol:
            if name.lower() not in PROTOCOLS:
                raise FilterError(f"protocol: unknown protocol {name!r}, want one of {', '.join(PROTOCOLS)}")
            wanted.add(name.lower())
        checks.append(lambda f: bool(flow_protocols(f) & wanted))
    if flow_filter.reply:
        replies = frozenset(flow_filter.reply)
        checks.append(lambda f: f.HasField("is_reply") and f.is_reply.value in replies)
    if flow_filter.dns_query:
        patterns = compile_regexes(flow_filter.dns_query, "dns_query")
        checks.append(lambda f: f.l7.WhichOneof("record") == "dns"
                      and any(p.search(f.l7.dns.query) for p in patterns))
    if flow_filter.http_method:
        methods = frozenset(m.upper() for m in flow_filter.http_method)
        checks.append(lambda f: f.l7.WhichOneof("record") == "http" and f.l7.http.method.upper() in methods)
    if flow_filter.http_path:
        patterns = compile_regexes(flow_filter.http_path, "http_path")
        checks.append(lambda f: f.l7.WhichOneof("record") == "http"
                      and any(p.search(_url_path(f.l7.http.url)) for p in patterns))
    if flow_filter.tcp_flags:
        wanted_flags = [
            {name for name in ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS") if getattr(flags, name)}
            for flags in flow_filter.tcp_flags
        ]
        checks.append(lambda f: f.l4.WhichOneof("protocol") == "TCP" and any(
            all(getattr(f.l4.TCP.flags, name) for name in names) for names in wanted_flags))
    if flow_filter.node_name:
        patterns = list(flow_filter.node_name)
        for pattern in patterns:
            if not pattern or pattern.count("/") > 1:
                raise FilterError(f"node_name: invalid pattern {pattern!r}")
        checks.append(lambda f: any(_match_node(f.node_name, p) for p in patterns))
    if flow_filter.ip_version:
        versions = frozenset(flow_filter.ip_version)
        checks.append(lambda f: f.IP.ipVersion in versions)
    if flow_filter.trace_id:
        trace_ids = frozenset(flow_filter.trace_id)
        checks.append(lambda f: f.trace_context.parent.trace_id in trace_ids)

    def match(flow: flow_pb2.Flow) -> bool:
        return all(check(flow) for check in checks)

    return match


def _url_path(url: str) -> str:
    # "http://host/path?q" -> "/path"; a bare "/path?q" -> "/path".
    if "://" in url:
        url = "/" + url.split("://", 1)[1].partition("/")[2]
    return url.partition("?")[0]


def _match_node(node: str, pattern: str) -> bool:
    # "cluster/node-*" : Shoal's flows carry the bare node name, so only the node part is matched;
    # "cluster/" alone matches every node.
    if "/" in pattern:
        pattern = pattern.split("/", 1)[1] or "*"
    return fnmatch.fnmatchcase(node, pattern)


class FlowMatcher:
    """A request's whitelist minus its blacklist."""

    def __init__(self, whitelist: Sequence[flow_pb2.FlowFilter] = (),
                 blacklist: Sequence[flow_pb2.FlowFilter] = ()) -> None:
        self._allow = [compile_filter(f) for f in whitelist]
        self._deny = [compile_filter(f) for f in blacklist]

    def __call__(self, flow: flow_pb2.Flow) -> bool:
        if self._allow and not any(match(flow) for match in self._allow):
            return False
        return not any(match(flow) for match in self._deny)

    @property
    def matches_everything(self) -> bool:
        return not self._allow and not self._deny
