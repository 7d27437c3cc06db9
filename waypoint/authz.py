"""L7 authorization: Istio AuthorizationPolicy semantics over one HTTP request.

The policies come from the config stream (``shoal.xds.model.Authorization``). The
waypoint evaluates those that select the destination workload (or the whole
namespace, or the mesh root namespace) with the request's L7 attributes. The order
(DENY first, then allowed if there is no ALLOW policy or any ALLOW matches) and the rule
shape are ``shoal.policy.authz``'s, shared with the node proxy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from shoal.policy.authz import Decision, PartMatchers, decide
from shoal.policy.match import any_string, field_matches, in_blocks, match_string, principal_form
from shoal.xds.model import Authorization, Condition, Operation, Source

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


def _source_matches(s: Source, req: RequestAttributes) -> bool:
    principal = principal_form(req.source_principal)
    return (field_matches(s.principals, s.not_principals,
                   lambda ps: bool(principal) and any_string((principal_form(p) for p in ps), principal))
            and field_matches(s.namespaces, s.not_namespaces,
                       lambda ns: bool(req.source_namespace) and any_string(ns, req.source_namespace))
            and field_matches(s.ip_blocks, s.not_ip_blocks, lambda bs: in_blocks(bs, req.source_ip)))


def _host_matches(patterns: Iterable[str], host: str) -> bool:
    bare = host.rsplit(":", 1)[0] if ":" in host and not host.endswith("]") else host
    host, bare = host.lower(), bare.lower()
    return any(match_string(p.lower(), host) or match_string(p.lower(), bare) for p in patterns)


def _operation_matches(o: Operation, req: RequestAttributes) -> bool:
    return (field_matches(o.ports, o.not_ports, lambda ps: req.destination_port in ps)
            and field_matches(o.methods, o.not_methods, lambda ms: any_string(ms, req.method))
            and field_matches(o.paths, o.not_paths, lambda ps: any_string(ps, req.path))
            and field_matches(o.hosts, o.not_hosts, lambda hs: _host_matches(hs, req.host)))


def condition_value(key: str, req: RequestAttributes) -> str | None:
    """The request's value for a ``when`` key; raises ValueError for keys the waypoint cannot see."""
    if key.startswith(HEADER_KEY_PREFIX) and key.endswith("]"):
        return req.headers.get(key[len(HEADER_KEY_PREFIX):-1].lower())
    if key in ("source.ip", "remote.ip"):
        return req.source_ip
    if key == "source.namespace":
        return req.source_namespace
    if key == "source.principal":
        return principal_form(req.source_principal)
    if key == "destination.ip":
        return req.destination_ip
    if key == "destination.port":
        return str(req.destination_port)
    raise ValueError(f"unsupported condition key {key!r}")


def _condition_matches(c: Condition, req: RequestAttributes, deny: bool) -> bool:
    try:
        actual = condition_value(c.key, req)
    except ValueError:
        # Fail closed: an unknown key makes a DENY match and an ALLOW not match.
        return deny
    if c.key in ("source.ip", "remote.ip", "destination.ip"):
        test = lambda vs: actual is not None and in_blocks(vs, actual)  # noqa: E731
    elif c.key == "source.principal":
        test = lambda vs: actual is not None and any_string((principal_form(v) for v in vs), actual)  # noqa: E731
    else:
        test = lambda vs: actual is not None and any_string(vs, actual)  # noqa: E731
    return field_matches(c.values, c.not_values, test)


def _parts(req: RequestAttributes) -> PartMatchers:
    return PartMatchers(source=lambda s: _source_matches(s, req),
                        operation=lambda o, deny: _operation_matches(o, req),
                        condition=lambda c, deny: _condition_matches(c, req, deny))


def evaluate(policies: Iterable[Authorization], req: RequestAttributes) -> Decision:
    return decide(policies, _parts(req))
