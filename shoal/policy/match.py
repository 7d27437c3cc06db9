"""Istio AuthorizationPolicy matching primitives, shared by the node proxy (L4) and the
waypoint (L7) evaluators: string patterns, IP blocks, positive/negative field pairs.
Pure functions, no I/O.
"""
from __future__ import annotations

import ipaddress
from typing import Callable, Iterable


def principal_form(spiffe_id: str) -> str:
    """Istio writes principals without the scheme: compare 'td/ns/x/sa/y' forms."""
    return spiffe_id.removeprefix("spiffe://")


def match_string(pattern: str, value: str | None) -> bool:
    """Istio string match: exact, 'prefix*', '*suffix' or '*'. Nothing matches None."""
    if value is None:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def any_string(patterns: Iterable[str], value: str | None) -> bool:
    return any(match_string(p, value) for p in patterns)


def in_blocks(blocks: Iterable[str], ip: str | None) -> bool:
    """Whether ``ip`` is in any CIDR (or address) of ``blocks``; a bad IP or block never matches."""
    try:
        address = ipaddress.ip_address(ip) if ip else None
    except ValueError:
        return False
    if address is None:
        return False
    for block in blocks:
        try:
            if address in ipaddress.ip_network(block, strict=False):
                return True
        except ValueError:
            continue  # the controller validates blocks; a bad one matches nothing
    return False


def field_matches(values: tuple, not_values: tuple, matcher: Callable[[tuple], bool]) -> bool:
    """A positive list (if any) must match, a negative list (if any) must not."""
    if values and not matcher(values):
        return False
    return not (not_values and matcher(not_values))
