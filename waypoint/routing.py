"""Route selection and request filters: pure functions over the parsed model.

``RouteTable`` answers "which rule and which backend serves this request to this
Service?" following Gateway API precedence; ``plan_request`` applies the rule's
filters and says what the proxy must do (forward, redirect, mirror, and which
response headers to change). No sockets, no clocks.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable, Mapping
from urllib.parse import parse_qsl

from .model import BackendRef, Filter, HTTPRoute, PathMatch, RouteMatch, RouteRule


@dataclass(frozen=True)
class ServiceKey:
    """A backend Service's port; a dict key on every request (clusters, policies).

    ``__eq__`` and ``__hash__`` written out, the dataclass's own (the same hash): mypyc
    compiles them, generated ones stay Python."""

    namespace: str
    name: str
    port: int

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, ServiceKey)
        return (self.namespace, self.name, self.port) == (other.namespace, other.name, other.port)

    def __hash__(self) -> int:
        return hash((self.namespace, self.name, self.port))


@dataclass(frozen=True)
class RouteDecision:
    """The outcome of matching: ``rule is None`` means "no route" (404, flag NR)."""

    route: HTTPRoute | None
    rule: RouteRule | None
    match: RouteMatch | None
    backend: BackendRef | None  # None with a rule: the rule has no backends (500) or only redirects

    @property
    def route_name(self) -> str:
        return f"{self.route.namespace}/{self.route.name}" if self.route else "default"


def split_target(target: str) -> tuple[str, dict[str, str]]:
    """'/p?a=1&b=2' -> ('/p', {'a': '1', 'b': '2'}); the first value of a repeated key wins."""
    path, _, query = target.partition("?")
    params: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        params.setdefault(key, value)
    return path or "/", params


class RouteTable:
    """Every HTTPRoute the waypoint serves, indexed by parent Service.

    Rebuilt wholesale on each config change (routes are few, requests many): the
    per-service candidate list is pre-sorted so a request walks it once.
    """

    def __init__(self, routes: Iterable[HTTPRoute] = (), rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._by_service: dict[tuple[str, str], list[tuple[tuple, HTTPRoute, RouteRule, RouteMatch, int | None]]] = {}
        self._to_itself: dict[ServiceKey, RouteDecision] = {}
        ordered = sorted(routes, key=lambda r: (r.created, r.namespace, r.name))
        for order, route in enumerate(ordered):
            for parent in route.parent_refs:
                if parent.kind != "Service":
                    continue
                for rule_index, rule in enumerate(route.rules):
                    for match in rule.matches:
                        p = match.precedence()
                        # Gateway API: more specific match first, then older route, then rule order.
                        sort_key = (-p[0], -p[1], -p[2], -p[3], -p[4], order, rule_index)
                        self._by_service.setdefault((parent.namespace, parent.name), []).append(
                            (sort_key, route, rule, match, parent.port))
        for candidates in self._by_service.values():
            candidates.sort(key=lambda c: c[0])

    def has_routes(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self._by_service

    def depends_on(self, service: ServiceKey) -> str:
        """What ``select`` reads for this Service, so callers know when a decision can be reused:
        ``"service"`` (no HTTPRoute: the same decision for every request), ``"path"`` (the
        method and path only, and one backend per rule), or ``"request"`` (headers, query
        parameters or a weighted choice among backends: decide each request)."""
        candidates = self._by_service.get((service.namespace, service.name))
        if candidates is None:
            return "service"
        for _, _, rule, match, _ in candidates:
            if match.headers or match.query_params or sum(1 for b in rule.backend_refs if b.weight > 0) > 1:
                return "request"
        return "path"

    def select(self, service: ServiceKey, method: str, target: str, headers: Mapping[str, str]) -> RouteDecision:
        candidates = self._by_service.get((service.namespace, service.name))
        if candidates is None:
            # No HTTPRoute: the Service routes to itself, as without a waypoint (one
            # immutable decision per Service port, kept with this table).
            decision = self._to_itself.get(service)
            if decision is None:
                if len(self._to_itself) >= 4096:
                    self._to_itself.clear()
                decision = self._to_itself[service] = RouteDecision(
                    None, RouteRule((RouteMatch(),)), RouteMatch(), BackendRef(service.name, service.namespace, service.port))
            return decision
        path, query = split_target(target)
        for _, route, rule, match, port in candidates:
            if port is not None and port != service.port:
                continue
            if match.matches(method, path, headers, query):
                return RouteDecision(route, rule, match, self.pick_backend(rule.backend_refs, service))
        return RouteDecision(None, None, None, None)

    def pick_backend(self, backends: tuple[BackendRef, ...], service: ServiceKey) -> BackendRef | None:
        live = [b for b in backends if b.weight > 0]
        if not live:
            return None
        chosen = live[0] if len(live) == 1 else self._rng.choices(live, weights=[b.weight for b in live])[0]
        if chosen.port is None:
            chosen = BackendRef(chosen.name, chosen.namespace, service.port, chosen.weight, chosen.filters)
        return chosen


@dataclass(slots=True, init=False)
class RequestPlan:
    """What the proxy does with one request after filters ran (two per request through the
    pipeline: ``__init__`` written out, the dataclass's own, so that mypyc compiles it)."""

    target: str
    authority: str
    headers: list[tuple[str, str]]
    redirect: tuple[int, str] | None = None  # (status, Location)
    mirrors: list[tuple[BackendRef, float]] = field(default_factory=list)
    response_filters: list[Filter] = field(default_factory=list)

    def __init__(self, target: str, authority: str, headers: list[tuple[str, str]],
                 redirect: tuple[int, str] | None = None, mirrors: list[tuple[BackendRef, float]] | None = None,
                 response_filters: list[Filter] | None = None) -> None:
        self.target = target
        self.authority = authority
        self.headers = headers
        self.redirect = redirect
        self.mirrors = [] if mirrors is None else mirrors
        self.response_filters = [] if response_filters is None else response_filters

    def copy(self) -> "RequestPlan":
        """A plan alike for another request. The lists are shared: after ``plan_request``
        a plan's fields are replaced (``headers``: the upstream's), never changed in place."""
        return RequestPlan(self.target, self.authority, self.headers, self.redirect, self.mirrors,
                           self.response_filters)


def _redirect_location(filter_: Filter, scheme: str, authority: str, target: str, match: PathMatch | None) -> str:
    r = filter_.redirect
    assert r is not None
    path, _, query = target.partition("?")
    host, _, port = authority.rpartition(":") if ":" in authority else (authority, "", "")
    host = r.hostname or host
    new_scheme = r.scheme or scheme
    if r.port is not None:
        port = str(r.port)
    elif r.scheme and r.scheme != scheme:
        port = ""  # a scheme change drops the old port: the new scheme's default applies
    if (new_scheme, port) in (("http", "80"), ("https", "443")):
        port = ""
    if r.path is not None:
        path = r.path.apply(path, match)
    return f"{new_scheme}://{host}{':' + port if port else ''}{path}{'?' + query if query else ''}"


def plan_request(decision: RouteDecision, target: str, authority: str, headers: list[tuple[str, str]],
                 scheme: str = "http") -> RequestPlan:
    """Apply the rule's filters, then the chosen backend's, in order."""
    plan = RequestPlan(target=target, authority=authority, headers=list(headers))
    filters = decision.rule.filters if decision.rule else ()
    if decision.backend is not None and decision.backend.filters:
        filters = (*filters, *decision.backend.filters)
    for f in filters:
        if f.request_headers is not None:
            plan.headers = f.request_headers.apply(plan.headers)
        elif f.response_headers is not None:
            plan.response_filters.append(f)
        elif f.redirect is not None:
            plan.redirect = (f.redirect.status_code,
                             _redirect_location(f, scheme, plan.authority, plan.target, decision.match.path if decision.match else None))
        elif f.rewrite is not None:
            if f.rewrite.hostname:
                port = plan.authority.rpartition(":")[2] if ":" in plan.authority else ""
                plan.authority = f.rewrite.hostname + (f":{port}" if port else "")
            if f.rewrite.path is not None:
                path, sep, query = plan.target.partition("?")
                plan.target = f.rewrite.path.apply(path, decision.match.path if decision.match else None) + sep + query
        elif f.mirror is not None:
            plan.mirrors.append((f.mirror.backend, f.mirror.percent))
    return plan


def apply_response_filters(plan: RequestPlan, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    for f in plan.response_filters:
        assert f.response_headers is not None
        headers = f.response_headers.apply(headers)
    return headers
