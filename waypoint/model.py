"""The waypoint's view of its L7 configuration: HTTPRoute and TrafficPolicy.

Both are parsed from plain Kubernetes-shaped dicts (what ``kubectl get -o json``
prints), so they can come from the config stream, from a YAML file or from a
test. Parsing validates everything up front and raises ``ValueError`` with a
message naming the offending field: the config client turns that into a NACK
and the waypoint keeps the last good configuration.

HTTPRoute follows Gateway API v1 (GAMMA: the parentRef is a Service).
TrafficPolicy (``networking.shoal.io/v1``) carries what HTTPRoute v1 lacks:
retries, fault injection, circuit breaking, outlier detection and local rate
limiting. See ``waypoint/README.md`` for the full schema.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

HTTPROUTE_API_VERSIONS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
GRPCROUTE_API_VERSIONS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1alpha2")
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")
TRAFFIC_POLICY_API_VERSION = "networking.shoal.io/v1"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
MAX_REGEX_LENGTH = 1024


def parse_duration(value: Any, where: str) -> float:
    """Gateway API / Go style durations ("100ms", "1s", "1m30s", "0.5s") -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{where}: duration must not be negative")
        return float(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a duration like '100ms' or '1s', got {value!r}")
    pos, total = 0, 0.0
    for part in _DURATION_PART.finditer(value):
        if part.start() != pos:
            break
        total += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        pos = part.end()
    if pos != len(value):
        raise ValueError(f"{where}: bad duration {value!r} (use e.g. '250ms', '1s', '1m30s')")
    return total


def _require_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _require_list(value: Any, where: str) -> Sequence[Any]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _int_in(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{where}: expected an integer in [{low}, {high}], got {value!r}")
    return value


def _percent(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ValueError(f"{where}: expected a percentage in [0, 100], got {value!r}")
    return float(value)


def _compile(pattern: Any, where: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(f"{where}: expected a regular expression of at most {MAX_REGEX_LENGTH} chars")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{where}: bad regular expression {pattern!r}: {err}") from None


def _header_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HEADER_NAME.match(value):
        raise ValueError(f"{where}: bad header name {value!r}")
    return value.lower()


def _header_value(value: Any, where: str) -> str:
    if not isinstance(value, str) or "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"{where}: header value must be a string without CR, LF or NUL")
    return value


# ---------------------------------------------------------------- matches


@dataclass(frozen=True)
class PathMatch:
    type: str  # Exact | PathPrefix | RegularExpression
    value: str
    regex: re.Pattern[str] | None = field(default=None, compare=False)

    def matches(self, path: str) -> bool:
        if self.type == "Exact":
            return path == self.value
        if self.type == "PathPrefix":
            # Gateway API: prefix matches whole path segments ("/foo" matches "/foo/bar", not "/foobar").
            prefix = self.value.rstrip("/")
            return prefix == "" or path == prefix or path.startswith(prefix + "/")
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None


@dataclass(frozen=True)
class ValueMatch:
    """A header or query-parameter match (Exact or RegularExpression)."""

    name: str
    value: str
    type: str = "Exact"
    regex: re.Pattern[str] | None = field(default=None, compare=False)

    def matches(self, actual: str | None) -> bool:
        if actual is None:
            return False
        if self.type == "Exact":
            return actual == self.value
        assert self.regex is not None
        return self.regex.fullmatch(actual) is not None


@dataclass(frozen=True)
class RouteMatch:
    path: PathMatch = PathMatch("PathPrefix", "/")
    headers: tuple[ValueMatch, ...] = ()
    query_params: tuple[ValueMatch, ...] = ()
    method: str | None = None

    def matches(self, method: str, path: str, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        if self.method is not None and method != self.method:
            return False
        if not self.path.matches(path):
            return False
        if not all(h.matches(headers.get(h.name)) for h in self.headers):
            return False
        return all(q.matches(query.get(q.name)) for q in self.query_params)

    def precedence(self) -> tuple[int, int, int, int, int]:
        """Higher sorts first: Gateway API's tie-breaking order for matches."""
        exact = 1 if self.path.type == "Exact" else 0
        prefix_len = len(self.path.value) if self.path.type != "RegularExpression" else 0
        return (exact, prefix_len, 1 if self.method else 0, len(self.headers), len(self.query_params))


# ---------------------------------------------------------------- filters


@dataclass(frozen=True)
class HeaderModifier:
    """RequestHeaderModifier / ResponseHeaderModifier: set, add, remove (names lower-cased)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        drop = set(self.remove) | {name for name, _ in self.set}
        out = [(n, v) for n, v in headers if n not in drop]
        out.extend(self.set)
        out.extend(self.add)
        return out


@dataclass(frozen=True)
class PathModifier:
    type: str  # ReplaceFullPath | ReplacePrefixMatch
    value: str

    def apply(self, path: str, matched: PathMatch | None) -> str:
        if self.type == "ReplaceFullPath":
            return self.value
        # ReplacePrefixMatch only makes sense after a PathPrefix match (validated at parse time).
        prefix = matched.value.rstrip("/") if matched is not None else ""
        rest = path[len(prefix):]
        replacement = self.value.rstrip("/")
        if not rest:
            return replacement or "/"
        return (replacement + rest) if rest.startswith("/") else f"{replacement}/{rest}"


@dataclass(frozen=True)
class RequestRedirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True)
class URLRewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True)
class BackendRef:
    name: str
    namespace: str
    port: int | None
    weight: int = 1
    filters: tuple["Filter", ...] = ()


@dataclass(frozen=True)
class RequestMirror:
    backend: BackendRef
    percent: float = 100.0


@dataclass(frozen=True)
class Filter:
    """One entry of a rule's (or a backendRef's) filter list, in order."""

    type: str
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    redirect: RequestRedirect | None = None
    rewrite: URLRewrite | None = None
    mirror: RequestMirror | None = None


@dataclass(frozen=True)
class Timeouts:
    request: float | None = None          # whole request, retries included
    backend_request: float | None = None  # one upstream attempt


@dataclass(frozen=True)
class RouteRule:
    matches: tuple[RouteMatch, ...]
    filters: tuple[Filter, ...] = ()
    backend_refs: tuple[BackendRef, ...] = ()
    timeouts: Timeouts = Timeouts()
    name: str | None = None


@dataclass(frozen=True)
class ParentRef:
    kind: str
    name: str
    namespace: str
    port: int | None = None


@dataclass(frozen=True)
class HTTPRoute:
    name: str
    namespace: str
    parent_refs: tuple[ParentRef, ...]
    hostnames: tuple[str, ...] = ()
    rules: tuple[RouteRule, ...] = ()
    created: str = ""  # metadata.creationTimestamp: older routes win ties
    kind: str = "HTTPRoute"   # or "GRPCRoute", translated to the same rules (see parse_grpcroute)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


# ---------------------------------------------------------------- HTTPRoute parsing


def _parse_value_matches(raw: Any, where: str, header: bool) -> tuple[ValueMatch, ...]:
    out = []
    seen = set()
    for i, item in enumerate(_require_list(raw, where)):
        item = _require_mapping(item, f"{where}[{i}]")
        kind = item.get("type", "Exact")
        raw_name = item.get("name")
        if header:
            name = _header_name(raw_name, f"{where}[{i}].name")
        elif isinstance(raw_name, str) and raw_name:
            name = raw_name
        else:
            raise ValueError(f"{where}[{i}].name: expected a query parameter name")
        if name in seen:
            raise ValueError(f"{where}[{i}].name: duplicate match on {name!r}")
        seen.add(name)
        value = item.get("value")
        if not isinstance(value, str):
            raise ValueError(f"{where}[{i}].value: expected a string")
        if kind == "Exact":
            out.append(ValueMatch(name, value))
        elif kind == "RegularExpression":
            out.append(ValueMatch(name, value, kind, _compile(value, f"{where}[{i}].value")))
        else:
            raise ValueError(f"{where}[{i}].type: unsupported {kind!r} (Exact, RegularExpression)")
    return tuple(out)


def _parse_match(raw: Any, where: str) -> RouteMatch:
    raw = _require_mapping(raw, where)
    path_raw = _require_mapping(raw.get("path"), f"{where}.path")
    kind = path_raw.get("type", "PathPrefix")
    value = path_raw.get("value", "/")
    if not isinstance(value, str):
        raise ValueError(f"{where}.path.value: expected a string")
    if kind in ("Exact", "PathPrefix"):
        if not value.startswith("/"):
            raise ValueError(f"{where}.path.value: must start with '/'")
        path = PathMatch(kind, value)
    elif kind == "RegularExpression":
        path = PathMatch(kind, value, _compile(value, f"{where}.path.value"))
    else:
        raise ValueError(f"{where}.path.type: unsupported {kind!r} (Exact, PathPrefix, RegularExpression)")
    method = raw.get("method")
    if method is not None and (not isinstance(method, str) or not method.isalpha() or not method.isupper()):
        raise ValueError(f"{where}.method: expected an upper-case HTTP method, got {method!r}")
    return RouteMatch(
        path=path,
        headers=_parse_value_matches(raw.get("headers"), f"{where}.headers", header=True),
        query_params=_parse_value_matches(raw.get("queryParams"), f"{where}.queryParams", header=False),
        method=method,
    )


def _parse_header_modifier(raw: Any, where: str) -> HeaderModifier:
    raw = _require_mapping(raw, where)

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for i, item in enumerate(_require_list(raw.get(key), f"{where}.{key}")):
            item = _require_mapping(item, f"{where}.{key}[{i}]")
            out.append((_header_name(item.get("name"), f"{where}.{key}[{i}].name"),
                        _header_value(item.get("value"), f"{where}.{key}[{i}].value")))
        return tuple(out)

    remove = tuple(_header_name(n, f"{where}.remove[{i}]")
                   for i, n in enumerate(_require_list(raw.get("remove"), f"{where}.remove")))
    return HeaderModifier(set=pairs("set"), add=pairs("add"), remove=remove)


def _parse_path_modifier(raw: Any, where: str) -> PathModifier | None:
    if raw is None:
        return None
    raw = _require_mapping(raw, where)
    kind = raw.get("type")
    if kind == "ReplaceFullPath":
        value = raw.get("replaceFullPath")
    elif kind == "ReplacePrefixMatch":
        value = raw.get("replacePrefixMatch")
    else:
        raise ValueError(f"{where}.type: expected ReplaceFullPath or ReplacePrefixMatch, got {kind!r}")
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{where}: the replacement path must start with '/'")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{where}: the replacement path may not hold whitespace or control characters")
    return PathModifier(kind, value)


def _parse_backend_ref(raw: Any, where: str, namespace: str, with_filters: bool = True) -> BackendRef:
    raw = _require_mapping(raw, where)
    kind = raw.get("kind", "Service")
    if kind != "Service" or raw.get("group", "") not in ("", "core"):
        raise ValueError(f"{where}: only Service backends are supported, got {kind!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: required")
    port = raw.get("port")
    if port is not None:
        port = _int_in(port, f"{where}.port", 1, 65535)
    weight = _int_in(raw.get("weight", 1), f"{where}.weight", 0, 1_000_000)
    filters = _parse_filters(raw.get("filters"), f"{where}.filters", namespace) if with_filters else ()
    return BackendRef(name, raw.get("namespace", namespace), port, weight, filters)


def _parse_filters(raw: Any, where: str, namespace: str) -> tuple[Filter, ...]:
    out = []
    for i, item in enumerate(_require_list(raw, where)):
        at = f"{where}[{i}]"
        item = _require_mapping(item, at)
        kind = item.get("type")
        if kind == "RequestHeaderModifier":
            out.append(Filter(kind, request_headers=_parse_header_modifier(item.get("requestHeaderModifier"), f"{at}.requestHeaderModifier")))
        elif kind == "ResponseHeaderModifier":
            out.append(Filter(kind, response_headers=_parse_header_modifier(item.get("responseHeaderModifier"), f"{at}.responseHeaderModifier")))
        elif kind == "RequestRedirect":
            r = _require_mapping(item.get("requestRedirect"), f"{at}.requestRedirect")
            scheme = r.get("scheme")
            if scheme not in (None, "http", "https"):
                raise ValueError(f"{at}.requestRedirect.scheme: http or https, got {scheme!r}")
            port = r.get("port")
            out.append(Filter(kind, redirect=RequestRedirect(
                scheme=scheme,
                hostname=r.get("hostname"),
                path=_parse_path_modifier(r.get("path"), f"{at}.requestRedirect.path"),
                port=None if port is None else _int_in(port, f"{at}.requestRedirect.port", 1, 65535),
                status_code=_int_in(r.get("statusCode", 302), f"{at}.requestRedirect.statusCode", 301, 308),
            )))
        elif kind == "URLRewrite":
            r = _require_mapping(item.get("urlRewrite"), f"{at}.urlRewrite")
            out.append(Filter(kind, rewrite=URLRewrite(
                hostname=r.get("hostname"), path=_parse_path_modifier(r.get("path"), f"{at}.urlRewrite.path"))))
        elif kind == "RequestMirror":
            r = _require_mapping(item.get("requestMirror"), f"{at}.requestMirror")
            backend = _parse_backend_ref(r.get("backendRef"), f"{at}.requestMirror.backendRef", namespace, with_filters=False)
            percent = r.get("percent", 100)
            out.append(Filter(kind, mirror=RequestMirror(backend, _percent(percent, f"{at}.requestMirror.percent"))))
        else:
            raise ValueError(f"{at}.type: unsupported filter {kind!r}")
    kinds = [f.type for f in out]
    if "RequestRedirect" in kinds and "URLRewrite" in kinds:
        raise ValueError(f"{where}: RequestRedirect and URLRewrite cannot be combined")
    return tuple(out)


@dataclass(frozen=True)
class _RouteHead:
    name: str
    namespace: str
    spec: Mapping[str, Any]
    parents: tuple[ParentRef, ...]
    hostnames: tuple[str, ...]
    created: str


def _parse_route_head(obj: Mapping[str, Any], kind: str, versions: tuple[str, ...]) -> _RouteHead:
    """What HTTPRoute and GRPCRoute share: kind, apiVersion, metadata, parentRefs, hostnames."""
    obj = _require_mapping(obj, kind)
    if obj.get("kind", kind) != kind:
        raise ValueError(f"kind: expected {kind}, got {obj.get('kind')!r}")
    api = obj.get("apiVersion", versions[0])
    if api not in versions:
        raise ValueError(f"apiVersion: expected one of {versions}, got {api!r}")
    meta = _require_mapping(obj.get("metadata"), "metadata")
    name, namespace = meta.get("name"), meta.get("namespace", "default")
    if not isinstance(name, str) or not name:
        raise ValueError("metadata.name: required")
    spec = _require_mapping(obj.get("spec"), "spec")
    parents = []
    for i, p in enumerate(_require_list(spec.get("parentRefs"), "spec.parentRefs")):
        p = _require_mapping(p, f"spec.parentRefs[{i}]")
        parent_kind = p.get("kind", "Gateway")
        if parent_kind not in ("Service", "Gateway"):
            raise ValueError(f"spec.parentRefs[{i}].kind: Service or Gateway, got {parent_kind!r}")
        if not isinstance(p.get("name"), str):
            raise ValueError(f"spec.parentRefs[{i}].name: required")
        port = p.get("port")
        parents.append(ParentRef(parent_kind, p["name"], p.get("namespace", namespace),
                                 None if port is None else _int_in(port, f"spec.parentRefs[{i}].port", 1, 65535)))
    if not parents:
        raise ValueError("spec.parentRefs: at least one parent (a Service, GAMMA style) is required")
    hostnames = tuple(h.lower() for h in _require_list(spec.get("hostnames"), "spec.hostnames"))
    return _RouteHead(name, namespace, spec, tuple(parents), hostnames, str(meta.get("creationTimestamp", "")))


def parse_httproute(obj: Mapping[str, Any]) -> HTTPRoute:
    """Validate and convert one Gateway API HTTPRoute object."""
    head = _parse_route_head(obj, "HTTPRoute", HTTPROUTE_API_VERSIONS)
    name, namespace, spec = head.name, head.namespace, head.spec
    rules = []
    for i, r in enumerate(_require_list(spec.get("rules"), "spec.rules")):
        at = f"spec.rules[{i}]"
        r = _require_mapping(r, at)
        matches = tuple(_parse_match(m, f"{at}.matches[{j}]")
                        for j, m in enumerate(_require_list(r.get("matches"), f"{at}.matches"))) or (RouteMatch(),)
        filters = _parse_filters(r.get("filters"), f"{at}.filters", namespace)
        for f in filters:
            for modifier in (f.redirect and f.redirect.path, f.rewrite and f.rewrite.path):
                if modifier and modifier.type == "ReplacePrefixMatch" and any(m.path.type != "PathPrefix" for m in matches):
                    raise ValueError(f"{at}.filters: ReplacePrefixMatch needs PathPrefix matches")
        backends = tuple(_parse_backend_ref(b, f"{at}.backendRefs[{j}]", namespace)
                         for j, b in enumerate(_require_list(r.get("backendRefs"), f"{at}.backendRefs")))
        t = _require_mapping(r.get("timeouts"), f"{at}.timeouts")
        timeouts = Timeouts(
            request=parse_duration(t["request"], f"{at}.timeouts.request") if "request" in t else None,
            backend_request=parse_duration(t["backendRequest"], f"{at}.timeouts.backendRequest") if "backendRequest" in t else None,
        )
        # A zero duration means "no timeout" in Gateway API.
        timeouts = Timeouts(timeouts.request or None, timeouts.backend_request or None)
        if timeouts.request and timeouts.backend_request and timeouts.backend_request > timeouts.request:
            raise ValueError(f"{at}.timeouts: backendRequest must not exceed request")
        rules.append(RouteRule(matches, filters, backends, timeouts, r.get("name")))
    if not rules:
        rules.append(RouteRule((RouteMatch(),)))
    return HTTPRoute(name, namespace, head.parents, head.hostnames, tuple(rules), head.created)


# ---------------------------------------------------------------- GRPCRoute

GRPC_FILTERS = frozenset({"RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror"})
_GRPC_SERVICE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _grpc_method_path(raw: Any, where: str) -> PathMatch:
    """A GRPCMethodMatch as the match on the request path ``/<service>/<method>``."""
    raw = _require_mapping(raw, where)
    kind = raw.get("type", "Exact")
    service, method = raw.get("service"), raw.get("method")
    for key, value in (("service", service), ("method", method)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{where}.{key}: expected a non-empty string")
    if service is None and method is None:
        raise ValueError(f"{where}: one of service and method is required")
    if kind == "Exact":
        for key, value, grammar in (("service", service, _GRPC_SERVICE), ("method", method, _GRPC_METHOD)):
            if value is not None and not grammar.match(value):
                raise ValueError(f"{where}.{key}: not a gRPC {key} name: {value!r}")
        if service is not None and method is not None:
            return PathMatch("Exact", f"/{service}/{method}")
        if service is not None:
            return PathMatch("PathPrefix", f"/{service}")   # whole segments: /svc/<any method>
        pattern = f"/[^/]+/{re.escape(method)}"
        return PathMatch("RegularExpression", pattern, _compile(pattern, f"{where}.method"))
    if kind == "RegularExpression":
        for key, value in (("service", service), ("method", method)):
            if value is not None:
                _compile(value, f"{where}.{key}")
        pattern = f"/(?:{service or '[^/]+'})/(?:{method or '[^/]+'})"
        return PathMatch("RegularExpression", pattern, _compile(pattern, where))
    raise ValueError(f"{where}.type: unsupported {kind!r} (Exact, RegularExpression)")


def parse_grpcroute(obj: Mapping[str, Any]) -> HTTPRoute:
    """Validate one Gateway API GRPCRoute and translate it into route rules: a method match
    is a match on the path ``/<service>/<method>`` (gRPC's), headers match as headers."""
    head = _parse_route_head(obj, "GRPCRoute", GRPCROUTE_API_VERSIONS)
    namespace, spec = head.namespace, head.spec
    rules = []
    for i, r in enumerate(_require_list(spec.get("rules"), "spec.rules")):
        at = f"spec.rules[{i}]"
        r = _require_mapping(r, at)
        matches = []
        for j, m in enumerate(_require_list(r.get("matches"), f"{at}.matches")):
            m = _require_mapping(m, f"{at}.matches[{j}]")
            path = _grpc_method_path(m["method"], f"{at}.matches[{j}].method") if m.get("method") is not None \
                else PathMatch("PathPrefix", "/")
            matches.append(RouteMatch(path=path, headers=_parse_value_matches(
                m.get("headers"), f"{at}.matches[{j}].headers", header=True)))
        filters = _parse_filters(r.get("filters"), f"{at}.filters", namespace)
        backends = tuple(_parse_backend_ref(b, f"{at}.backendRefs[{j}]", namespace)
                         for j, b in enumerate(_require_list(r.get("backendRefs"), f"{at}.backendRefs")))
        for where, chain in [(f"{at}.filters", filters)] + [
                (f"{at}.backendRefs[{j}].filters", b.filters) for j, b in enumerate(backends)]:
            unsupported = sorted({f.type for f in chain} - GRPC_FILTERS)
            if unsupported:
                raise ValueError(f"{where}: {unsupported} not allowed in a GRPCRoute (allowed: {sorted(GRPC_FILTERS)})")
        rules.append(RouteRule(tuple(matches) or (RouteMatch(),), filters, backends, Timeouts(), r.get("name")))
    if not rules:
        rules.append(RouteRule((RouteMatch(),)))
    return HTTPRoute(head.name, namespace, head.parents, head.hostnames, tuple(rules), head.created, kind="GRPCRoute")


def parse_route(obj: Mapping[str, Any]) -> HTTPRoute:
    """An HTTPRoute or a GRPCRoute, by its kind."""
    kind = obj.get("kind", "HTTPRoute") if isinstance(obj, Mapping) else "HTTPRoute"
    return parse_grpcroute(obj) if kind == "GRPCRoute" else parse_httproute(obj)


# ---------------------------------------------------------------- TrafficPolicy


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 1                      # total tries, the first one included
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = frozenset({"5xx", "reset", "connect-failure"})
    backoff_base: float = 0.025
    backoff_max: float = 0.25

    RETRY_ON = frozenset({"5xx", "gateway-error", "reset", "connect-failure", "retriable-status-codes",
                          # gRPC (a trailers-only answer's grpc-status), as Istio's retryOn
                          "cancelled", "deadline-exceeded", "resource-exhausted", "unavailable", "internal"})


@dataclass(frozen=True)
class FaultPolicy:
    delay: float | None = None
    delay_percent: float = 0.0
    abort_status: int | None = None
    abort_percent: float = 0.0


@dataclass(frozen=True)
class ConnectionPoolPolicy:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024


@dataclass(frozen=True)
class OutlierPolicy:
    consecutive_5xx: int = 5
    base_ejection_time: float = 30.0
    max_ejection_percent: float = 50.0


@dataclass(frozen=True)
class RateLimitPolicy:
    max_tokens: int
    tokens_per_fill: int
    fill_interval: float


@dataclass(frozen=True)
class TrafficPolicy:
    """networking.shoal.io/v1 TrafficPolicy, attached to Services by targetRefs."""

    name: str
    namespace: str
    targets: tuple[str, ...]  # Service names in the policy's namespace
    retries: RetryPolicy | None = None
    faults: FaultPolicy | None = None
    connection_pool: ConnectionPoolPolicy | None = None
    outlier_detection: OutlierPolicy | None = None
    rate_limit: RateLimitPolicy | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def parse_traffic_policy(obj: Mapping[str, Any]) -> TrafficPolicy:
    obj = _require_mapping(obj, "TrafficPolicy")
    if obj.get("kind", "TrafficPolicy") != "TrafficPolicy":
        raise ValueError(f"kind: expected TrafficPolicy, got {obj.get('kind')!r}")
    if obj.get("apiVersion", TRAFFIC_POLICY_API_VERSION) != TRAFFIC_POLICY_API_VERSION:
        raise ValueError(f"apiVersion: expected {TRAFFIC_POLICY_API_VERSION}")
    meta = _require_mapping(obj.get("metadata"), "metadata")
    name, namespace = meta.get("name"), meta.get("namespace", "default")
    if not isinstance(name, str) or not name:
        raise ValueError("metadata.name: required")
    spec = _require_mapping(obj.get("spec"), "spec")
    targets = []
    for i, t in enumerate(_require_list(spec.get("targetRefs"), "spec.targetRefs")):
        t = _require_mapping(t, f"spec.targetRefs[{i}]")
        if t.get("kind", "Service") != "Service" or not isinstance(t.get("name"), str):
            raise ValueError(f"spec.targetRefs[{i}]: expected {{kind: Service, name: ...}}")
        targets.append(t["name"])
    if not targets:
        raise ValueError("spec.targetRefs: at least one Service is required")

    retries = None
    if "retries" in spec:
        r = _require_mapping(spec["retries"], "spec.retries")
        retry_on = frozenset(_require_list(r.get("retryOn", ["5xx", "reset", "connect-failure"]), "spec.retries.retryOn"))
        unknown = retry_on - RetryPolicy.RETRY_ON
        if unknown:
            raise ValueError(f"spec.retries.retryOn: unknown {sorted(unknown)} (known: {sorted(RetryPolicy.RETRY_ON)})")
        backoff = _require_mapping(r.get("backoff"), "spec.retries.backoff")
        retries = RetryPolicy(
            attempts=_int_in(r.get("attempts", 1), "spec.retries.attempts", 1, 20),
            per_try_timeout=parse_duration(r["perTryTimeout"], "spec.retries.perTryTimeout") if "perTryTimeout" in r else None,
            retry_on=retry_on,
            backoff_base=parse_duration(backoff.get("baseInterval", "25ms"), "spec.retries.backoff.baseInterval"),
            backoff_max=parse_duration(backoff.get("maxInterval", "250ms"), "spec.retries.backoff.maxInterval"),
        )
    faults = None
    if "faults" in spec:
        f = _require_mapping(spec["faults"], "spec.faults")
        delay = _require_mapping(f.get("delay"), "spec.faults.delay")
        abort = _require_mapping(f.get("abort"), "spec.faults.abort")
        faults = FaultPolicy(
            delay=parse_duration(delay["fixedDelay"], "spec.faults.delay.fixedDelay") if "fixedDelay" in delay else None,
            delay_percent=_percent(delay.get("percentage", 100 if delay else 0), "spec.faults.delay.percentage"),
            abort_status=_int_in(abort["httpStatus"], "spec.faults.abort.httpStatus", 200, 599) if "httpStatus" in abort else None,
            abort_percent=_percent(abort.get("percentage", 100 if abort else 0), "spec.faults.abort.percentage"),
        )
    pool = None
    if "connectionPool" in spec:
        c = _require_mapping(spec["connectionPool"], "spec.connectionPool")
        pool = ConnectionPoolPolicy(
            max_connections=_int_in(c.get("maxConnections", 1024), "spec.connectionPool.maxConnections", 1, 1 << 20),
            max_pending_requests=_int_in(c.get("maxPendingRequests", 1024), "spec.connectionPool.maxPendingRequests", 0, 1 << 20),
            max_requests=_int_in(c.get("maxRequests", 1024), "spec.connectionPool.maxRequests", 1, 1 << 20),
        )
    outlier = None
    if "outlierDetection" in spec:
        o = _require_mapping(spec["outlierDetection"], "spec.outlierDetection")
        outlier = OutlierPolicy(
            consecutive_5xx=_int_in(o.get("consecutive5xxErrors", 5), "spec.outlierDetection.consecutive5xxErrors", 1, 1000),
            base_ejection_time=parse_duration(o.get("baseEjectionTime", "30s"), "spec.outlierDetection.baseEjectionTime"),
            max_ejection_percent=_percent(o.get("maxEjectionPercent", 50), "spec.outlierDetection.maxEjectionPercent"),
        )
    rate = None
    if "rateLimit" in spec:
        rl = _require_mapping(spec["rateLimit"], "spec.rateLimit")
        max_tokens = _int_in(rl.get("maxTokens"), "spec.rateLimit.maxTokens", 1, 1 << 30)
        rate = RateLimitPolicy(
            max_tokens=max_tokens,
            tokens_per_fill=_int_in(rl.get("tokensPerFill", max_tokens), "spec.rateLimit.tokensPerFill", 1, 1 << 30),
            fill_interval=parse_duration(rl.get("fillInterval", "1s"), "spec.rateLimit.fillInterval"),
        )
        if rate.fill_interval <= 0:
            raise ValueError("spec.rateLimit.fillInterval: must be positive")
    return TrafficPolicy(name, namespace, tuple(targets), retries, faults, pool, outlier, rate)


# ---------------------------------------------------------------- HTTPRoute status

CONTROLLER_NAME = "shoal.io/waypoint"


def httproute_status(obj: Mapping[str, Any], service_exists: Callable[[str, str], bool],
                     previous: Mapping[str, Any] | None = None, now: str = "") -> dict[str, Any]:
    """Gateway API ``status`` for an HTTPRoute or a GRPCRoute: per parent, ``Accepted`` (the route parses)
    and ``ResolvedRefs`` (False, reason ``BackendNotFound``, naming the missing Services;
    the waypoint answers 500 to the requests such a rule matches). A condition keeps its
    ``lastTransitionTime`` while its status and reason stay the same."""
    meta = obj.get("metadata") or {}
    generation = meta.get("generation", 1)
    try:
        route = parse_route(obj)
        accepted = ("True", "Accepted", "the route is valid")
        refs = [b for rule in route.rules for b in rule.backend_refs] + \
               [f.mirror.backend for rule in route.rules for f in rule.filters if f.mirror is not None]
        missing = sorted({f"{b.namespace}/{b.name}" for b in refs if not service_exists(b.namespace, b.name)})
        resolved = ("False", "BackendNotFound", f"no Service {', '.join(missing)}") if missing \
            else ("True", "ResolvedRefs", "every backend Service exists")
        parents = [{"group": "", "kind": p.kind, "name": p.name, "namespace": p.namespace,
                    **({"port": p.port} if p.port is not None else {})} for p in route.parent_refs]
    except ValueError as err:
        accepted = ("False", "Invalid", str(err))
        resolved = ("False", "Invalid", "the route is not valid")
        parents = [p for p in ((obj.get("spec") or {}).get("parentRefs") or []) if isinstance(p, dict)] or [{}]
    old_conditions = {}
    for parent in (previous or {}).get("parents") or []:
        for c in parent.get("conditions") or []:
            old_conditions[(json_key(parent.get("parentRef")), c.get("type"))] = c

    def condition(parent: dict, kind: str, value: tuple[str, str, str]) -> dict[str, Any]:
        status, reason, message = value
        old = old_conditions.get((json_key(parent), kind)) or {}
        same = old.get("status") == status and old.get("reason") == reason
        return {"type": kind, "status": status, "reason": reason, "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": old.get("lastTransitionTime", now) if same else now}

    return {"parents": [{"parentRef": parent, "controllerName": CONTROLLER_NAME,
                         "conditions": [condition(parent, "Accepted", accepted),
                                        condition(parent, "ResolvedRefs", resolved)]}
                        for parent in parents]}


def json_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
