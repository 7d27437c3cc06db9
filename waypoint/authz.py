"""L7 authorization: Istio AuthorizationPolicy semantics over one HTTP request.

The policies come from the config stream (``shoal.xds.model.Authorization``). The
waypoint evaluates those that select the destination workload (or the whole
namespace, or the mesh root namespace) with the request's L7 attributes:
DENY first, then allowed if there is no ALLOW policy or any ALLOW matches.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from shoal.xds.model import Authorization, Condition, Operation, Rule, Source

SUPPORTED_CONDITION_KEYS = ("source.ip", "remote.ip", "source.namespace", "source.principal",
                            "destination.ip", "destination.port")
HEADER_KEY_PREFIX = "request.headers["


@dataclass(frozen=True)
class RequestAttributes:
    """What a policy can look at; principal is a SPIFFE id or '' when unauthenticated."""

    source_principal: str
    source_namespace: str
    source_ip: str
    destination_ip: str
    destination_port: int
    method: str
    path: str          # without the query string
    host: str
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    policy: str  # "ns/name" of the deciding policy, "" for default allow / allow-list miss
    reason: str


def _principal(value: str) -> str:
    """Istio writes principals without the scheme: compare 'td/ns/x/sa/y' forms."""
    return value[len("spiffe://"):] if value.startswith("spiffe://") else value


def match_string(pattern: str, value: str) -> bool:
    """Istio string match: exact, 'prefix*', '*suffix' or '*'."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _any(patterns: Iterable[str], value: str) -> bool:
    return any(match_string(p, value) for p in patterns)


def _in_blocks(blocks: Iterable[str], ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    for block in blocks:
        try:
            if address in ipaddress.ip_network(block, strict=False):
                return True
        except ValueError:
            continue  # validated by the controller; a bad block simply never matches
    return False


def _field(values: tuple, not_values: tuple, test) -> bool:
    """One positive/negative field pair: positive must match (if set), negative must not."""
    if values and not test(values):
        return False
    return not (not_values and test(not_values))


def _source_matches(s: Source, req: RequestAttributes) -> bool:
    principal = _principal(req.source_principal)
    return (_field(s.principals, s.not_principals,
                   lambda ps: bool(principal) and _any((_principal(p) for p in ps), principal))
            and _field(s.namespaces, s.not_namespaces,
                       lambda ns: bool(req.source_namespace) and _any(ns, req.source_namespace))
            and _field(s.ip_blocks, s.not_ip_blocks, lambda bs: _in_blocks(bs, req.source_ip)))


def _host_matches(patterns: Iterable[str], host: str) -> bool:
    bare = host.rsplit(":", 1)[0] if ":" in host and not host.endswith("]") else host
    host, bare = host.lower(), bare.lower()
    return any(match_string(p.lower(), host) or match_string(p.lower(), bare) for p in patterns)


def _operation_matches(o: Operation, req: RequestAttributes) -> bool:
    return (_field(o.ports, o.not_ports, lambda ps: req.destination_port in ps)
            and _field(o.methods, o.not_methods, lambda ms: _any(ms, req.method))
            and _field(o.paths, o.not_paths, lambda ps: _any(ps, req.path))
            and _field(o.hosts, o.not_hosts, lambda hs: _host_matches(hs, req.host)))


def condition_value(key: str, req: RequestAttributes) -> str | None:
    """The request's value for a ``when`` key; raises ValueError for keys the waypoint cannot see."""
    if key.startswith(HEADER_KEY_PREFIX) and key.endswith("]"):
        return req.headers.get(key[len(HEADER_KEY_PREFIX):-1].lower())
    if key in ("source.ip", "remote.ip"):
        return req.source_ip
    if key == "source.namespace":
        return req.source_namespace
    if key == "source.principal":
        return _principal(req.source_principal)
    if key == "destination.ip":
        return req.destination_ip
    if key == "destination.port":
        return str(req.destination_port)
    raise ValueError(f"unsupported condition key {key!r}")


def _condition_matches(c: Condition, req: RequestAttributes, action: str) -> bool:
    try:
        actual = condition_value(c.key, req)
    except ValueError:
        # Fail closed: an unknown key makes a DENY match and an ALLOW not match.
        return action == "DENY"
    if c.key in ("source.ip", "remote.ip", "destination.ip"):
        test = lambda vs: actual is not None and _in_blocks(vs, actual)  # noqa: E731
    elif c.key == "source.principal":
        test = lambda vs: actual is not None and _any((_principal(v) for v in vs), actual)  # noqa: E731
    else:
        test = lambda vs: actual is not None and _any(vs, actual)  # noqa: E731
    return _field(c.values, c.not_values, test)


def rule_matches(rule: Rule, req: RequestAttributes, action: str) -> bool:
    """All of from/to/when must hold; within from or to, any entry may match."""
    if rule.sources and not any(_source_matches(s, req) for s in rule.sources):
        return False
    if rule.operations and not any(_operation_matches(o, req) for o in rule.operations):
        return False
    return all(_condition_matches(c, req, action) for c in rule.conditions)


def evaluate(policies: Iterable[Authorization], req: RequestAttributes) -> Verdict:
    allow_policies = []
    for policy in policies:
        if policy.action == "DENY":
            if any(rule_matches(r, req, "DENY") for r in policy.rules):
                return Verdict(False, policy.key, "denied by DENY policy")
        elif policy.action == "ALLOW":
            allow_policies.append(policy)
    if not allow_policies:
        return Verdict(True, "", "no ALLOW policy")
    for policy in allow_policies:
        if any(rule_matches(r, req, "ALLOW") for r in policy.rules):
            return Verdict(True, policy.key, "allowed by ALLOW policy")
    return Verdict(False, "", "no ALLOW policy matched")
