"""L4 AuthorizationPolicy evaluation with Istio's semantics, pure.

1. If any DENY policy matches the connection, it is refused.
2. Otherwise, if no ALLOW policy selects the workload, it is allowed.
3. Otherwise it is allowed only when at least one ALLOW policy matches.

A policy matches when any of its rules matches; a rule matches when each of its
non-empty parts (sources, operations, conditions) has a match; within a part every
non-empty field must match (and no ``not_`` field may). An ALLOW with no rules matches
nothing, which is Istio's "deny all".

The node proxy only sees L4. HTTP-only fields (methods, paths, hosts, request.*
conditions) follow Istio's rule for TCP: an ALLOW rule using them never matches (fail
closed), a DENY rule ignores them (so it denies more, never less).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from shoal.policy.match import any_string, field_matches, in_blocks, principal_form
from shoal.xds.model import Authorization, Condition, Operation, Rule, Source

_L4_CONDITION_KEYS = {"source.ip", "source.namespace", "source.principal", "destination.ip",
                      "destination.port", "remote.ip"}


@dataclass(frozen=True)
class ConnectionInfo:
    """What the proxy knows about one inbound connection."""
    src_ip: str
    dst_ip: str
    dst_port: int
    src_identity: str | None = None  # spiffe://td/ns/x/sa/y when mutual TLS, else None

    @property
    def principal(self) -> str | None:
        """Istio's principal form: the SPIFFE ID without the scheme."""
        return principal_form(self.src_identity) if self.src_identity else None

    @property
    def namespace(self) -> str | None:
        parts = (self.principal or "").split("/")
        return parts[2] if len(parts) >= 5 and parts[1] == "ns" else None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str | None  # namespace/name of the deciding policy, if any
    reason: str


def _source_matches(src: Source, conn: ConnectionInfo) -> bool:
    return (field_matches(src.principals, src.not_principals, lambda p: any_string(p, conn.principal))
            and field_matches(src.namespaces, src.not_namespaces, lambda n: any_string(n, conn.namespace))
            and field_matches(src.ip_blocks, src.not_ip_blocks, lambda b: in_blocks(b, conn.src_ip)))


def _has_http_fields(op: Operation) -> bool:
    return bool(op.methods or op.not_methods or op.paths or op.not_paths or op.hosts or op.not_hosts)


def _operation_matches(op: Operation, conn: ConnectionInfo, deny: bool) -> bool:
    if _has_http_fields(op) and not deny:
        return False
    return field_matches(op.ports, op.not_ports, lambda ports: conn.dst_port in {int(p) for p in ports})


def _condition_matches(cond: Condition, conn: ConnectionInfo, deny: bool) -> bool:
    if cond.key not in _L4_CONDITION_KEYS:
        return deny  # HTTP-only attribute: see the module docstring
    if cond.key in ("source.ip", "remote.ip"):
        matcher = lambda blocks: in_blocks(blocks, conn.src_ip)
    elif cond.key == "destination.ip":
        matcher = lambda blocks: in_blocks(blocks, conn.dst_ip)
    elif cond.key == "destination.port":
        matcher = lambda ports: str(conn.dst_port) in ports
    else:
        value = conn.namespace if cond.key == "source.namespace" else conn.principal
        matcher = lambda patterns: any_string(patterns, value)
    return field_matches(cond.values, cond.not_values, matcher)


def _rule_matches(rule: Rule, conn: ConnectionInfo, deny: bool) -> bool:
    if rule.sources and not any(_source_matches(s, conn) for s in rule.sources):
        return False
    if rule.operations and not any(_operation_matches(o, conn, deny) for o in rule.operations):
        return False
    return all(_condition_matches(c, conn, deny) for c in rule.conditions)


def policy_matches(policy: Authorization, conn: ConnectionInfo) -> bool:
    deny = policy.action == "DENY"
    return any(_rule_matches(rule, conn, deny) for rule in policy.rules)


def authorize(policies: Iterable[Authorization], conn: ConnectionInfo) -> Decision:
    """Evaluate the policies that select the destination workload."""
    allows = []
    for policy in policies:
        if policy.action == "DENY":
            if policy_matches(policy, conn):
                return Decision(False, policy.key, "matched a DENY policy")
        elif policy.action == "ALLOW":
            allows.append(policy)
    if not allows:
        return Decision(True, None, "no ALLOW policy selects the workload")
    for policy in allows:
        if policy_matches(policy, conn):
            return Decision(True, policy.key, "matched an ALLOW policy")
    return Decision(False, None, "no ALLOW policy matched")
