"""L4 AuthorizationPolicy evaluation with Istio's semantics, pure.

The order (DENY, then ALLOW) and the rule shape are ``shoal.policy.authz``'s, shared with
the waypoint; this module says what a source, an operation and a condition mean for one
connection. Within a part every non-empty field must match (and no ``not_`` field may).

The node proxy only sees L4. HTTP-only fields (methods, paths, hosts, request.*
conditions) follow Istio's rule for TCP: an ALLOW rule using them never matches (fail
closed), a DENY rule ignores them (so it denies more, never less).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from shoal.policy.authz import Decision, PartMatchers, decide
from shoal.policy.match import any_string, field_matches, in_blocks, principal_form
from shoal.xds.model import Authorization, Condition, Operation, Source

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


def _parts(conn: ConnectionInfo) -> PartMatchers:
    return PartMatchers(source=lambda s: _source_matches(s, conn),
                        operation=lambda o, deny: _operation_matches(o, conn, deny),
                        condition=lambda c, deny: _condition_matches(c, conn, deny))


def policy_matches(policy: Authorization, conn: ConnectionInfo) -> bool:
    return _parts(conn).policy_matches(policy)


def authorize(policies: Iterable[Authorization], conn: ConnectionInfo) -> Decision:
    """Evaluate the policies that select the destination workload."""
    return decide(policies, _parts(conn))
