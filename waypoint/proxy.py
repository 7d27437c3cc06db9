"""The request pipeline: authorization, rate limit, routing, filters, resilience, upstream.

``WaypointProxy.handle(request, body, sink)`` is called once per downstream request by
the HTTP/1.1 and HTTP/2 servers. Decisions come from the pure modules (``routing``,
``authz``, ``resilience``); this module sequences them, owns the timers and the
upstream I/O, and fills the telemetry record.

Which TrafficPolicy applies where (documented in waypoint/README.md):
- request-level features (rateLimit, faults, retries) come from the policy that
  targets the Service the client called (the HTTPRoute's parent);
- connection-level features (connectionPool, outlierDetection) come from the policy
  targeting the backend Service, or else the called Service's.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Protocol, Sequence

from shoal.telemetry_labels import PeerLabels, ServiceLabels, principal
from shoal.xds.model import Authorization

from . import authz, grpc
from .downstream import BodyIterator
from .h1 import encode_request_head
from .http import Body, BodyError, Limits, PeerInfo, ProxyRequest, ResponseSink, strip_hop_by_hop
from .model import ConnectionPoolPolicy, HTTPRoute, TrafficPolicy
from .resilience import (
    CONNECT_FAILURE,
    RESET,
    TIMEOUT,
    CircuitBreaker,
    OutlierDetector,
    PercentSampler,
    TokenBucket,
    backoff_delay,
    is_retriable,
)
from .routing import RequestPlan, RouteTable, ServiceKey, apply_response_filters, plan_request
from .telemetry import RandomHex, RequestRecord, RequestTelemetry, TraceContext
from .upstream import ClusterPool, Connector, Endpoint, PoolOverflow, UpstreamError, send_request
from .upstream_h2 import H2ClusterPool, send_request_h2

log = logging.getLogger(__name__)

DEFAULT_POOL = ConnectionPoolPolicy()
# The (frozen) verdict without any policy: allowed. No policy, so no matcher is ever read.
UNRESTRICTED = authz.decide((), None)   # type: ignore[arg-type]


@dataclass(frozen=True)
class ServiceInfo:
    key: ServiceKey
    fqdn: str
    vip: str = ""


@dataclass(frozen=True)
class WorkloadInfo:
    name: str
    namespace: str
    app: str
    principal: str = ""
    labels: PeerLabels | None = None    # Istio's labels of this workload (shoal.telemetry_labels)

    def peer_labels(self) -> PeerLabels:
        return self.labels or PeerLabels(workload=self.name, namespace=self.namespace, principal=principal(self.principal),
                                         app=self.app, canonical_service=self.app)


class Resolver(Protocol):
    """The cluster as the proxy needs it (ConfigState in the mesh, a table in tests)."""

    def service_for(self, peer: PeerInfo, authority: str) -> ServiceInfo | None: ...

    def endpoints(self, namespace: str, name: str, port: int) -> list[Endpoint] | None: ...

    def policies_for(self, service: ServiceKey) -> Iterable[Authorization]: ...

    def speaks_http2(self, namespace: str, name: str, port: int) -> bool: ...

    def workload_by_ip(self, ip: str) -> WorkloadInfo | None: ...

    # Grows with every change of the answers above: what was remembered before is stale.
    generation: int


class L7Config:
    """Routes and TrafficPolicies currently in force (swapped whole on each update)."""

    def __init__(self, routes: Iterable[HTTPRoute] = (), policies: Iterable[TrafficPolicy] = (),
                 rng: random.Random | None = None) -> None:
        routes = list(routes)
        self.route_keys = sorted(r.key for r in routes)
        self.routes = RouteTable(routes, rng)
        self.policies: dict[tuple[str, str], TrafficPolicy] = {}
        for policy in sorted(policies, key=lambda p: p.key):
            for target in policy.targets:
                self.policies.setdefault((policy.namespace, target), policy)

    def policy_for(self, namespace: str, name: str) -> TrafficPolicy | None:
        return self.policies.get((namespace, name))


class _Cluster:
    """Runtime state of one backend Service: pool, circuit breaker, outlier detector."""

    def __init__(self, name: str, policy: TrafficPolicy | None, connector: Connector, clock: Callable[[], float],
                 http2: bool = False) -> None:
        self.name = name  # "namespace/service"
        self.policy = policy
        pool_policy = (policy.connection_pool if policy else None) or DEFAULT_POOL
        # The upstream protocol is the backend port's (upstream_h2.speaks_h2c): both pools
        # and both send functions share one interface.
        self.pool: ClusterPool | H2ClusterPool = \
            H2ClusterPool(connector, pool_policy) if http2 else ClusterPool(connector, pool_policy)
        self.send = send_request_h2 if http2 else send_request
        self.http2 = http2
        self.breaker = CircuitBreaker(pool_policy)
        self.outliers = OutlierDetector(policy.outlier_detection, clock) if policy and policy.outlier_detection else None
        self.turn = 0   # round robin

    def pick(self, endpoints: list[Endpoint], tried: Collection[Endpoint], advance: bool = True) -> Endpoint | None:
        """Round robin over the endpoints not ejected and not tried yet; ``advance=False``
        only looks (the fast path advances the turn once it has a connection)."""
        outliers = self.outliers
        candidates = [e for e in endpoints if not outliers.is_ejected(e.address)] if outliers else endpoints
        if not candidates:
            candidates = endpoints  # everything ejected: panic mode, use them all
        fresh = [e for e in candidates if e not in tried] or candidates if tried else candidates
        if not fresh:
            return None
        turn = self.turn
        if advance:
            self.turn = turn + 1
        return fresh[turn % len(fresh)]


class _RequestPolicy:
    """Runtime state of request-level features for one called Service."""

    def __init__(self, policy: TrafficPolicy | None, clock: Callable[[], float]) -> None:
        self.policy = policy
        self.retries = policy.retries if policy else None
        self.faults = policy.faults if policy else None
        self.bucket = TokenBucket(policy.rate_limit, clock) if policy and policy.rate_limit else None
        self.delay_sampler = PercentSampler(self.faults.delay_percent) if self.faults and self.faults.delay else None
        self.abort_sampler = PercentSampler(self.faults.abort_percent) if self.faults and self.faults.abort_status else None


class Routed:
    """``WaypointProxy.route``'s answer: a local reply (status, text[, headers]), or where to send
    the request. Never changed once made (the same one answers requests alike: ``_Planned``);
    ``with_plan`` makes one with another plan."""

    __slots__ = ("reply", "service", "rule", "plan", "endpoints", "cluster", "request_policy", "planned", "plain")

    def __init__(self, reply: tuple | None = None, service: ServiceKey | None = None, rule=None,
                 plan: RequestPlan | None = None, endpoints: list[Endpoint] | None = None,
                 cluster: "_Cluster | None" = None, request_policy: "_RequestPolicy | None" = None,
                 planned: "_Planned | None" = None) -> None:
        self.reply = reply
        self.service = service
        self.rule = rule
        self.plan = plan
        self.endpoints = endpoints
        self.cluster = cluster
        self.request_policy = request_policy
        self.planned = planned      # the remembered plan ``plan`` copies, if any (``upstream_head``)
        self.plain: bool | None = None   # the fast path's verdict on it, found once (fastpath._plain)

    def with_plan(self, plan: RequestPlan) -> "Routed":
        """The same decision with another plan (its own upstream headers: the pipeline's retry)."""
        return Routed(self.reply, self.service, self.rule, plan, self.endpoints, self.cluster, self.request_policy,
                      self.planned)


# Request headers the waypoint writes itself on the way upstream (the client's are dropped).
_SET_UPSTREAM = frozenset({"host", "traceparent", "content-length", "x-forwarded-proto", "x-request-id", "expect"})
MEMO_LIMIT = 256   # remembered decisions per connection (distinct authorities, methods, paths)


class ConnectionMemo:
    """What the requests of one downstream connection share, remembered while the
    configuration stays the same (``WaypointProxy.route``): the peer's workload, and per
    authority and method the Service, its policies and, when its routes read only the
    method and path, the route decision with its endpoints. The peer never changes on a
    connection; the generation says when the routes or the cluster did."""

    __slots__ = ("generation", "source", "source_found", "targets")

    def __init__(self) -> None:
        self.generation = -1
        self.source: WorkloadInfo | None = None
        self.source_found = False     # whether ``source`` was looked up (None: no known workload)
        self.targets: dict[tuple[str, str], _Target] = {}

    def refresh(self, generation: int) -> None:
        if generation != self.generation:
            self.generation = generation
            self.source, self.source_found = None, False
            self.targets.clear()


class _Target:
    """The Service a request's authority names, and what follows from it alone."""

    __slots__ = ("service", "labels", "requested_address", "policies", "request_policy", "depends_on", "choices")

    def __init__(self, service: ServiceInfo | None, labels: ServiceLabels | None = None, requested_address: str = "",
                 policies=(), request_policy: "_RequestPolicy | None" = None, depends_on: str = "request") -> None:
        self.service = service
        self.labels = labels
        self.requested_address = requested_address
        self.policies = policies
        self.request_policy = request_policy
        self.depends_on = depends_on          # RouteTable.depends_on: when a route decision can be reused
        self.choices: dict[str | None, _Choice] = {}


class _Planned:
    """A remembered decision's plan for one request (``ProxyRequest``, which a connection
    hands out again for the same head): the plan is a pure function of the decision and the
    request, and so is the upstream head up to the per-request ids (encoded at first use),
    and so is ``route``'s answer when it sends the request upstream (made at the second use:
    ``Routed`` and its plan are shared by the requests alike and never changed in place)."""

    __slots__ = ("request", "plan", "upstream_prefix", "routed")

    def __init__(self, request: ProxyRequest, plan: RequestPlan) -> None:
        self.request = request
        self.plan = plan
        self.upstream_prefix: bytes | None = None
        self.routed: Routed | None = None


class _Choice:
    """A route decision and where it leads (endpoints, cluster), or why it leads nowhere."""

    __slots__ = ("decision", "route_name", "endpoints", "cluster", "failure", "planned")

    def __init__(self, decision, endpoints: list[Endpoint] | None = None, cluster: "_Cluster | None" = None,
                 failure: tuple[str, int, str] | None = None) -> None:
        self.decision = decision
        self.route_name = decision.route_name
        self.endpoints = endpoints
        self.cluster = cluster
        self.failure = failure                # (response flag, status, text)
        self.planned: _Planned | None = None  # the plan of the last request (a remembered choice's)


class _Attempt:
    """The outcome of one try: a response head, or a failure outcome."""

    def __init__(self, outcome: int | str, response=None, endpoint: Endpoint | None = None, flag: str = "") -> None:
        self.outcome = outcome
        self.response = response
        self.endpoint = endpoint
        self.flag = flag
        self.stale = False  # failed on a reused keep-alive connection before any answer
        self.grpc_status: int | None = None   # grpc-status of a trailers-only answer


FAILURE_ANSWERS: dict[int | str, tuple[int, str, str]] = {
    CONNECT_FAILURE: (503, "UF", "upstream connect error or disconnect/reset before headers. reset reason: connection failure"),
    RESET: (503, "UC", "upstream connect error or disconnect/reset before headers. reset reason: connection termination"),
    TIMEOUT: (504, "UT", "upstream request timeout"),
    "protocol-error": (502, "UPE", "upstream protocol error"),
}


class WaypointProxy:
    def __init__(self, resolver: Resolver, connector: Connector, telemetry: RequestTelemetry, limits: Limits = Limits(),
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 mirror_connector: Connector | None = None, fast_path: bool = True) -> None:
        self.resolver = resolver
        self.fast_path = fast_path   # plain HTTP/1.1 requests served from callbacks (waypoint.fastpath)
        self.fast_served = 0         # requests the fast path forwarded (tests, profiles)
        self.generation = 0          # counts update()s (ConnectionMemo)
        self.connector = connector
        self.telemetry = telemetry
        self.limits = limits
        self.clock = clock
        self.rng = rng or random.Random()
        self.ids = RandomHex()       # request, trace and span ids (made here: after any fork)
        self.config = L7Config(rng=self.rng)
        self._clusters: dict[tuple[str, str, bool], _Cluster] = {}   # (namespace, name, HTTP/2)
        self._request_policies: dict[tuple[str, str], _RequestPolicy] = {}
        self._service_labels: dict[str, ServiceLabels] = {}   # by FQDN (_labels_of)
        self._background: set[asyncio.Task] = set()

    # -- configuration ---------------------------------------------------------------------

    def update(self, routes: Iterable[HTTPRoute], policies: Iterable[TrafficPolicy]) -> None:
        """Swap in new routes and policies; runtime state survives where its policy did not change."""
        self.config = L7Config(routes, policies, self.rng)
        self.generation += 1
        for key, cluster in list(self._clusters.items()):
            if self._cluster_policy(key[0], key[1]) != cluster.policy:
                cluster.pool.close()
                del self._clusters[key]
        for called, state in list(self._request_policies.items()):
            if self.config.policy_for(*called) != state.policy:
                del self._request_policies[called]

    def _cluster_policy(self, namespace: str, name: str) -> TrafficPolicy | None:
        return self.config.policy_for(namespace, name)

    def _cluster(self, namespace: str, name: str, called: ServiceKey, port: int) -> _Cluster:
        http2 = self.resolver.speaks_http2(namespace, name, port)
        key = (namespace, name, http2)
        cluster = self._clusters.get(key)
        if cluster is None:
            policy = self.config.policy_for(namespace, name) or self.config.policy_for(called.namespace, called.name)
            cluster = self._clusters[key] = _Cluster(f"{namespace}/{name}", policy, self.connector, self.clock, http2)
        return cluster

    def _request_policy(self, service: ServiceKey) -> _RequestPolicy:
        key = (service.namespace, service.name)
        state = self._request_policies.get(key)
        if state is None:
            state = self._request_policies[key] = _RequestPolicy(self.config.policy_for(*key), self.clock)
        return state

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for cluster in self._clusters.values():
            cluster.pool.close()

    # -- one request -------------------------------------------------------------------------

    def new_record(self, req: ProxyRequest, memo: ConnectionMemo | None = None) -> RequestRecord:
        """The telemetry record of one request, as it starts (``memo``: the connection's, see ``route``)."""
        header_map, peer = req.header_map, req.peer
        # Positional: RequestRecord's field order (start ... source_principal).
        ids = self.ids
        rec = RequestRecord(self.clock(), req.method, req.path, req.authority, req.protocol,
                            header_map.get("user-agent", ""), header_map.get("x-request-id") or ids.take(32),
                            peer.source_ip, peer.source_port, peer.source_principal)
        rec.mtls = peer.mtls
        rec.trace = TraceContext.from_header(header_map.get("traceparent"), ids)
        if req.protocol == "HTTP/2":
            rec.grpc = grpc.is_grpc(header_map.get("content-type", ""))
        if memo is None:
            source = self.resolver.workload_by_ip(req.peer.source_ip)
        else:
            generation = self.generation + self.resolver.generation
            if generation != memo.generation:
                memo.refresh(generation)
            if not memo.source_found:
                memo.source, memo.source_found = self.resolver.workload_by_ip(req.peer.source_ip), True
            source = memo.source
        if source is not None:
            rec.source = source.peer_labels()
        return rec

    async def handle(self, req: ProxyRequest, body: Body, sink: ResponseSink, handoff=None) -> None:
        """One request; ``handoff`` carries what the fast path already decided (``downstream.Handoff``)."""
        rec = handoff.record if handoff is not None else self.new_record(req)
        try:
            await self._handle(req, body, sink, rec, handoff)
        except BodyError as err:
            rec.flags.add("DPE" if err.status in (400, 413) else "DC")
            self.telemetry.metrics.rejected.labels(reason="bad_body", status=str(err.status)).inc()
            log.info("request body from %s:%d rejected: %s", req.peer.source_ip, req.peer.source_port, err.reason)
            if not sink.started:
                await self._local_reply(sink, rec, err.status, err.reason, grpc_status=err.grpc_status)
            else:
                raise
        except asyncio.CancelledError:
            rec.flags.add("DC")
            raise
        finally:
            if not rec.status:
                rec.status = 0  # downstream went away before any response
            self.telemetry.record(rec)

    async def _local_reply(self, sink: ResponseSink, rec: RequestRecord, status: int, text: str,
                           extra: Sequence[tuple[str, str]] = (), grpc_status: int | None = None) -> None:
        if rec.grpc:
            # gRPC clients read grpc-status: trailers-only, HTTP 200 (as Envoy's local replies).
            code = grpc_status if grpc_status is not None else grpc.status_for_http(status)
            rec.status, rec.grpc_status, rec.response_bytes = 200, str(code), 0
            await sink.start(200, grpc.trailers_only(code, text), 0)
            await sink.end()
            return
        payload = (text + "\n").encode()
        rec.status = status
        rec.response_bytes = len(payload)
        await sink.start(status, [("content-type", "text/plain"), ("content-length", str(len(payload))), *extra],
                         len(payload))
        await sink.send(payload)
        await sink.end()

    def route(self, req: ProxyRequest, rec: RequestRecord, memo: ConnectionMemo | None = None) -> "Routed":
        """Everything decided before the upstream: service, L7 authorization, rate limit, route,
        filters, endpoints (synchronous: the fast path and the pipeline share it).

        ``memo``: the connection's ``ConnectionMemo``. What depends only on the connection,
        the authority and the method (and the path, when the routes read nothing else) is
        then looked up once per configuration instead of once per request; authorization
        with policies, the rate limit, weighted choices and filters still run per request."""
        if memo is None:
            target = self._target(req, remembered=False)
        else:
            generation = self.generation + self.resolver.generation
            if generation != memo.generation:
                memo.refresh(generation)
            key = (req.authority, req.method)
            known = memo.targets.get(key)
            if known is None:
                if len(memo.targets) >= MEMO_LIMIT:
                    memo.targets.clear()
                known = memo.targets[key] = self._target(req)
            target = known
        service, labels = target.service, target.labels
        if service is None:
            rec.flags.add("NR")
            return Routed(reply=(404, f"no service for {req.authority}"))
        assert labels is not None    # a target with a Service has its labels (_target)
        rec.service = labels
        if target.requested_address:
            rec.requested_address = target.requested_address

        policies = target.policies
        if not policies:
            verdict = UNRESTRICTED   # the request's attributes are only built for policies to read
        else:
            verdict = authz.evaluate(policies, authz.RequestAttributes(
                source_principal=req.peer.source_principal, source_namespace=rec.source_namespace if source_known(rec) else _ns_of(req.peer.source_principal),
                source_ip=req.peer.source_ip, destination_ip=req.peer.destination_ip or service.vip,
                destination_port=service.key.port, method=req.method, path=req.path, host=req.authority,
                headers=req.header_map))
        rec.authz_policy = verdict.policy or ""
        self.telemetry.count_authz(verdict.allowed, verdict.policy)
        if not verdict.allowed:
            rec.flags.add("RBAC")
            log.info("L7 deny %s %s from %s to %s: %s (%s)", req.method, req.path, req.peer.source_principal or req.peer.source_ip,
                     service.fqdn, verdict.reason, verdict.policy or "-")
            return Routed(reply=(403, "RBAC: access denied"))

        request_policy = target.request_policy
        assert request_policy is not None
        if request_policy.bucket is not None and not request_policy.bucket.take():
            rec.flags.add("RL")
            return Routed(reply=(429, "local_rate_limited"))

        depends_on = target.depends_on
        if depends_on == "request":
            choice = self._choose(service.key, req)
        else:
            choices = target.choices
            path = req.path if depends_on == "path" else None
            remembered = choices.get(path)
            if remembered is None:
                if len(choices) >= MEMO_LIMIT:
                    choices.clear()
                remembered = choices[path] = self._choose(service.key, req)
            choice = remembered
        rec.route = choice.route_name
        decision = choice.decision
        if decision.rule is None:
            rec.flags.add("NR")
            return Routed(reply=(404, "no matching route"))
        planned = choice.planned
        if planned is not None and planned.request is req:
            if planned.routed is not None:
                return planned.routed       # the same request again: the same answer (nothing changes it)
            plan = planned.plan             # shared: whoever sets a plan's headers copies it first
        else:
            plan = plan_request(decision, req.target, req.authority, strip_hop_by_hop(req.headers), req.scheme)
            # Only a remembered choice sees the request again (a per-request one is new each time).
            planned = choice.planned = _Planned(req, plan.copy()) if depends_on != "request" else None
        if plan.redirect is not None:
            status, location = plan.redirect
            return Routed(reply=(status, f"redirecting to {location}", [("location", location)]))
        if choice.failure is not None:
            flag, status, text = choice.failure
            rec.flags.add(flag)
            return Routed(reply=(status, text))
        routed = Routed(None, service.key, decision.rule, plan, choice.endpoints, choice.cluster, request_policy, planned)
        if planned is not None and planned.plan is plan:
            planned.routed = routed
        return routed

    def _target(self, req: ProxyRequest, remembered: bool = True) -> _Target:
        """What the request's connection, authority and method decide (``route``'s first part)."""
        service = self.resolver.service_for(req.peer, req.authority)
        if service is None:
            return _Target(None)
        vip = req.peer.destination_ip or service.vip
        return _Target(service, self._labels_of(service), f"{vip}:{service.key.port}" if vip else "",
                       self.resolver.policies_for(service.key),
                       self._request_policy(service.key),
                       self.config.routes.depends_on(service.key) if remembered else "request")

    def _labels_of(self, service: ServiceInfo) -> ServiceLabels:
        """One ServiceLabels object per Service for every request and connection: telemetry
        finds a request's series by the identity of its label objects (RequestTelemetry._series)."""
        labels = self._service_labels.get(service.fqdn)
        if labels is None:
            if len(self._service_labels) >= MEMO_LIMIT * 16:
                self._service_labels.clear()
            labels = self._service_labels[service.fqdn] = ServiceLabels(service.fqdn, service.key.name,
                                                                        service.key.namespace)
        return labels

    def _choose(self, service: ServiceKey, req: ProxyRequest) -> _Choice:
        """The route decision for the request and its backend's endpoints and cluster."""
        decision = self.config.routes.select(service, req.method, req.target, req.header_map)
        backend = decision.backend
        if decision.rule is None:
            return _Choice(decision)
        if backend is None:
            return _Choice(decision, failure=("NC", 500, "route has no usable backend"))
        port = backend.port or service.port
        endpoints = self.resolver.endpoints(backend.namespace, backend.name, port)
        if endpoints is None:
            return _Choice(decision, failure=("NC", 500, f"unknown backend service {backend.namespace}/{backend.name}"))
        if not endpoints:
            return _Choice(decision, failure=("UH", 503, "no healthy upstream"))
        return _Choice(decision, endpoints, self._cluster(backend.namespace, backend.name, service, port))

    async def _handle(self, req: ProxyRequest, body: Body, sink: ResponseSink, rec: RequestRecord, handoff) -> None:
        routed: Routed = handoff.routed if handoff is not None and handoff.routed is not None else self.route(req, rec)
        if routed.reply is not None:
            return await self._local_reply(sink, rec, *routed.reply)
        cluster, plan, rule, service = routed.cluster, routed.plan, routed.rule, routed.service
        endpoints, request_policy = routed.endpoints, routed.request_policy
        # A decision without a reply says where the request goes, all of it (route).
        assert cluster is not None and plan is not None and service is not None
        assert endpoints is not None and request_policy is not None
        if not cluster.breaker.try_acquire():
            rec.flags.add("UO")
            return await self._local_reply(sink, rec, 503, "upstream overflow (max requests)")
        try:
            if handoff is None or handoff.attempt is None:
                # A copy: the plan of a remembered decision is shared by the requests alike (route).
                plan = plan.copy()
                plan.headers = self._upstream_headers(plan, req, rec)   # the fast path's attempt set them already
            timeout = rule.timeouts.request
            try:
                async with _deadline(timeout):
                    attempt, body_source = await self._attempts(req, body, plan, cluster, endpoints,
                                                                request_policy, rule.timeouts.backend_request,
                                                                rec, handoff.attempt if handoff is not None else None)
            except TimeoutError:
                rec.flags.add("UT")
                return await self._local_reply(sink, rec, 504, "upstream request timeout")
            rec.request_bytes = body_source.bytes
            if plan.mirrors and body_source.replayable:
                self._mirror(plan, req, body_source.buffer, service)
            await self._respond(attempt, plan, req, sink, rec, cluster, service)
        finally:
            cluster.breaker.release()

    def _upstream_headers(self, plan: RequestPlan, req: ProxyRequest, rec: RequestRecord) -> list[tuple[str, str]]:
        headers = [(n, v) for n, v in plan.headers if n not in _SET_UPSTREAM]
        headers.insert(0, ("host", plan.authority))
        if req.content_length is not None:
            headers.append(("content-length", str(req.content_length)))
        headers.append(("x-forwarded-proto", req.scheme))
        headers.append(("x-request-id", rec.request_id))
        assert rec.trace is not None
        headers.append(("traceparent", rec.trace.traceparent))
        if req.upgrade:
            headers += [("connection", "upgrade"), ("upgrade", req.upgrade)]
        return headers

    def upstream_head(self, routed: Routed, req: ProxyRequest, rec: RequestRecord) -> bytes:
        """The HTTP/1.1 head ``_upstream_headers`` makes, encoded (ValueError: it would split).
        Only ``x-request-id`` and ``traceparent`` differ between requests alike, and they come
        last: the part before them is encoded once per remembered plan (``_Planned``)."""
        plan, planned = routed.plan, routed.planned
        assert plan is not None and rec.trace is not None
        if planned is None or req.upgrade:
            return encode_request_head(req.method, plan.target, self._upstream_headers(plan, req, rec))
        prefix = planned.upstream_prefix
        if prefix is None:
            fixed = self._upstream_headers(plan, req, rec)[:-2]       # all but x-request-id, traceparent
            prefix = planned.upstream_prefix = encode_request_head(req.method, plan.target, fixed)[:-2]  # no blank line
        ids = f"x-request-id: {rec.request_id}\r\ntraceparent: {rec.trace.traceparent}\r\n\r\n"
        if ids.count("\r") != 3 or ids.count("\n") != 3:
            raise ValueError(f"x-request-id {rec.request_id!r} would split the message")
        return prefix + ids.encode("latin-1")

    async def _attempts(self, req: ProxyRequest, body: Body, plan: RequestPlan, cluster: _Cluster,
                        endpoints: list[Endpoint], rp: _RequestPolicy, backend_timeout: float | None,
                        rec: RequestRecord, first: _Attempt | None = None) -> tuple[_Attempt, "_BodySource"]:
        """Up to ``attempts`` tries, each under the per-try timeout; returns the one that stands.

        ``first``: the outcome of a first try the fast path made (it stands for try 1)."""
        retries = rp.retries
        attempts = retries.attempts if retries else 1
        per_try = backend_timeout
        if retries and retries.per_try_timeout:
            per_try = min(per_try, retries.per_try_timeout) if per_try else retries.per_try_timeout
        # Small bodies of known length are read whole: they can be replayed (retries, mirrors)
        # and go upstream with the head in one write. Larger or chunked bodies stream.
        source = _BodySource(req, body, self.limits.retry_buffer_bytes)
        await source.prepare()
        tried: set[Endpoint] = set()
        attempt = _Attempt(CONNECT_FAILURE)
        for number in range(1, attempts + 1):
            rec.attempts = number
            endpoint = first.endpoint if first is not None and number == 1 else cluster.pick(endpoints, tried)
            assert endpoint is not None
            tried.add(endpoint)
            rec.upstream_host = endpoint.address
            try:
                async with _deadline(per_try):
                    attempt = await self._try_once(req, source, plan, cluster, endpoint, rp, rec,
                                                   first if number == 1 else None)
            except TimeoutError:
                attempt = _Attempt(TIMEOUT, endpoint=endpoint)
            if attempt.flag != "FI" and cluster.outliers is not None:
                if cluster.outliers.record(endpoint.address, attempt.outcome, len(endpoints)):
                    self.telemetry.metrics.ejections.labels(destination_service=cluster.name).inc()
            last = number == attempts
            retriable = retries is not None and is_retriable(retries, attempt.outcome, attempt.grpc_status)
            if last or retries is None or not retriable or not source.replayable:
                if number > 1 and retriable:
                    rec.flags.add("URX")
                return attempt, source
            self.telemetry.metrics.retries.labels(destination_service=rec.destination_service,
                                                  outcome=str(attempt.outcome)).inc()
            if attempt.response is not None:
                attempt.response.body.abandon()
            await asyncio.sleep(backoff_delay(retries, number, self.rng))
        return attempt, source  # pragma: no cover - the loop always returns

    async def _try_once(self, req: ProxyRequest, source: "_BodySource", plan: RequestPlan, cluster: _Cluster,
                        endpoint: Endpoint, rp: _RequestPolicy, rec: RequestRecord, tried: _Attempt | None = None) -> _Attempt:
        if tried is not None:
            # The fast path's exchange on a pooled connection failed before any answer (it
            # has no faults to inject): as below, a stale connection gets one fresh retry.
            if tried.stale and source.replayable:
                return await self._exchange(req, source, plan, cluster, endpoint, fresh=True)
            return tried
        faults = rp.faults
        if faults is not None:
            # A sampler is made only for a delay or an abort status that is set (_RequestPolicy).
            if faults.delay and rp.delay_sampler is not None and rp.delay_sampler.sample():
                rec.flags.add("DI")
                await asyncio.sleep(faults.delay)
            if faults.abort_status and rp.abort_sampler is not None and rp.abort_sampler.sample():
                rec.flags.add("FI")
                return _Attempt(faults.abort_status, endpoint=endpoint, flag="FI")
        attempt = await self._exchange(req, source, plan, cluster, endpoint, fresh=bool(req.upgrade))
        if attempt.stale and source.replayable:
            # A pooled keep-alive connection the server had already closed: try a fresh one, once.
            attempt = await self._exchange(req, source, plan, cluster, endpoint, fresh=True)
        return attempt

    async def _exchange(self, req: ProxyRequest, source: "_BodySource", plan: RequestPlan, cluster: _Cluster,
                        endpoint: Endpoint, fresh: bool) -> _Attempt:
        """One request/response-head exchange on a pooled (or fresh) upstream connection."""
        try:
            conn = await cluster.pool.acquire(endpoint, fresh=fresh)
        except PoolOverflow:
            return _Attempt(503, endpoint=endpoint, flag="UO")
        except UpstreamError as err:
            log.debug("connect to %s failed: %s", endpoint.address, err)
            return _Attempt(err.outcome, endpoint=endpoint)
        try:
            response = await cluster.send(cluster.pool, conn, req.method, plan.target, plan.headers,  # type: ignore[arg-type]
                                          source.body(), req.content_length is None and source.may_have_body)
        except UpstreamError as err:
            cluster.pool.discard(conn)   # type: ignore[arg-type]  # conn is this pool's (acquire above)
            attempt = _Attempt(err.outcome, endpoint=endpoint)
            attempt.stale = conn.reused and err.outcome == RESET
            return attempt
        except BaseException:
            cluster.pool.discard(conn)  # type: ignore[arg-type]  # a broken downstream body or a cancel: the exchange is half-sent
            raise
        attempt = _Attempt(response.status, response, endpoint)
        if cluster.http2:
            attempt.grpc_status = grpc.status_of(response.headers)   # a trailers-only gRPC answer
        return attempt

    async def _respond(self, attempt: _Attempt, plan: RequestPlan, req: ProxyRequest, sink: ResponseSink,
                       rec: RequestRecord, cluster: _Cluster, service: ServiceKey) -> None:
        if attempt.endpoint is not None:
            rec.destination = attempt.endpoint.peer_labels()
        if attempt.flag == "FI":
            return await self._local_reply(sink, rec, int(attempt.outcome), "fault filter abort")
        if attempt.flag == "UO":
            rec.flags.add("UO")
            return await self._local_reply(sink, rec, 503, "upstream overflow (max pending)")
        response = attempt.response
        if response is None:
            status, flag, text = FAILURE_ANSWERS.get(attempt.outcome, (503, "UF", str(attempt.outcome)))
            rec.flags.add(flag)
            return await self._local_reply(sink, rec, status, text)
        rec.status = response.status
        headers = apply_response_filters(plan, strip_hop_by_hop(response.headers))
        if response.upgraded:
            upgrade = getattr(sink, "upgrade", None)
            if upgrade is None:
                response.connection.close()
                cluster.pool.discard(response.connection)
                rec.status = 502
                return await self._local_reply(sink, rec, 502, "upgrade not possible on this protocol")
            try:
                await upgrade(headers + [("connection", "upgrade"), ("upgrade", req.upgrade or "")], response.connection.stream,
                              response.leftover)
            finally:
                cluster.pool.discard(response.connection)
            return
        await sink.start(response.status, headers, response.content_length)
        try:
            async for chunk in response.body:
                rec.response_bytes += len(chunk)
                await sink.send(chunk)
        except UpstreamError:
            rec.flags.add("UC")
            raise
        finally:
            response.body.abandon()
        trailers = getattr(response, "trailers", None)   # HTTP/2 upstreams (grpc-status...)
        if rec.grpc:
            code = grpc.status_of(trailers or response.headers)
            rec.grpc_status = "" if code is None else str(code)
        send_trailers = getattr(sink, "end_with_trailers", None)
        if trailers and send_trailers is not None:
            await send_trailers(trailers)
        else:
            await sink.end()

    def _mirror(self, plan: RequestPlan, req: ProxyRequest, body: bytes, service: ServiceKey) -> None:
        for backend, percent in plan.mirrors:
            if percent < 100 and self.rng.uniform(0, 100) >= percent:
                continue
            task = asyncio.get_running_loop().create_task(self._send_mirror(backend, plan, req, body, service))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_mirror(self, backend, plan: RequestPlan, req: ProxyRequest, body: bytes, service: ServiceKey) -> None:
        """Fire and forget: the answer is read and dropped; failures are only logged."""
        endpoints = self.resolver.endpoints(backend.namespace, backend.name, backend.port or service.port) or []
        if not endpoints:
            return
        cluster = self._cluster(backend.namespace, backend.name, service, backend.port or service.port)
        endpoint = cluster.pick(endpoints, set())
        assert endpoint is not None     # endpoints is not empty, nothing was tried
        host, _, port = plan.authority.partition(":")
        headers = [(n, v) for n, v in plan.headers if n != "host"]
        headers.insert(0, ("host", f"{host}-shadow" + (f":{port}" if port else "")))
        try:
            conn = await cluster.pool.acquire(endpoint)
            response = await cluster.send(cluster.pool, conn, req.method, plan.target, headers, body, False)  # type: ignore[arg-type]
            async for _ in response.body:
                pass
        except (UpstreamError, PoolOverflow) as err:
            log.debug("mirror to %s failed: %s", backend.name, err)


def _deadline(seconds: float | None):
    """asyncio.timeout, or nothing at all when there is no timeout (the common case is cheaper)."""
    return asyncio.timeout(seconds) if seconds else contextlib.nullcontext()


def source_known(rec: RequestRecord) -> bool:
    return rec.source_namespace != "unknown"


def _ns_of(principal: str) -> str:
    """'spiffe://td/ns/X/sa/Y' -> 'X' (the source namespace when the IP is unknown)."""
    parts = principal.split("/")
    return parts[parts.index("ns") + 1] if "ns" in parts and parts.index("ns") + 1 < len(parts) else ""


class _BodySource:
    """The downstream request body, buffered for replay when small enough, else streamed once."""

    def __init__(self, req: ProxyRequest, body: Body, buffer_limit: int) -> None:
        self._req = req
        self._body = body
        self.buffer_limit = buffer_limit
        self.buffer = b""
        self.replayable = False
        self.consumed = False
        self.bytes = 0
        self.may_have_body = req.content_length != 0

    async def prepare(self) -> None:
        length = self._req.content_length
        if length == 0:
            self.replayable = True
        elif length is not None and length <= self.buffer_limit:
            chunks = []
            async for chunk in self._body:
                chunks.append(chunk)
            self.buffer = b"".join(chunks)
            self.bytes = len(self.buffer)
            self.replayable = True

    def body(self) -> Body | bytes:
        if self.replayable:
            return self.buffer
        if self.consumed:
            raise BodyError(500, "request body already streamed")
        self.consumed = True
        return _CountingBody(self, self._body)

    def streamed_whole(self, kept: list[bytes]) -> None:
        """A small body of unknown length (chunked, HTTP/2, every gRPC call) streamed whole:
        it can be replayed now, so a failed attempt can still be retried."""
        self.buffer = b"".join(kept)
        self.replayable = True


class _CountingBody(BodyIterator):
    """The downstream body streamed once, its bytes counted on ``source`` and kept while they
    fit its replay buffer."""

    def __init__(self, source: _BodySource, body: Body) -> None:
        super().__init__()
        self.source = source
        self.chunks = aiter(body)
        self.kept: list[bytes] | None = []

    async def next_chunk(self) -> bytes | None:
        source, kept = self.source, self.kept
        try:
            chunk = await anext(self.chunks)
        except StopAsyncIteration:
            if kept is not None:
                source.streamed_whole(kept)
            return None
        source.bytes += len(chunk)
        if kept is not None:
            kept.append(chunk)
            if source.bytes > source.buffer_limit:
                self.kept = None
        return chunk
