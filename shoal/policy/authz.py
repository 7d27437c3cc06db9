"""Istio's AuthorizationPolicy order, shared by the node proxy (L4) and the waypoint (L7).

1. If any DENY policy matches, the request is refused.
2. Otherwise, if no ALLOW policy selects the workload, it is allowed.
3. Otherwise it is allowed only when at least one ALLOW policy matches.

A policy matches when any of its rules matches; a rule matches when each of its non-empty
parts (sources, operations, conditions) has a match. What a source, an operation or a
condition means depends on what the evaluator sees (L4 connection, L7 request), so each
evaluator hands in its own part matchers; the order and the rule shape live only here.
An ALLOW with no rules matches nothing, which is Istio's "deny all".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from shoal.xds.model import Authorization, Condition, Operation, Rule, Source


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str | None  # namespace/name of the deciding policy; None when no policy decided
    reason: str


@dataclass(frozen=True)
class PartMatchers:
    """One evaluator's view of a rule's parts; ``deny`` says whether the rule is a DENY's,
    so an attribute the evaluator cannot see can fail closed either way."""
    source: Callable[[Source], bool]
    operation: Callable[[Operation, bool], bool]
    condition: Callable[[Condition, bool], bool]

    def rule_matches(self, rule: Rule, deny: bool) -> bool:
        if rule.sources and not any(self.source(s) for s in rule.sources):
            return False
        if rule.operations and not any(self.operation(o, deny) for o in rule.operations):
            return False
        return all(self.condition(c, deny) for c in rule.conditions)

    def policy_matches(self, policy: Authorization) -> bool:
        deny = policy.action == "DENY"
        return any(self.rule_matches(rule, deny) for rule in policy.rules)


def decide(policies: Iterable[Authorization], parts: PartMatchers) -> Decision:
    """Evaluates the policies that select the destination workload, in Istio's order."""
    allows = []
    for policy in policies:
        if policy.action == "DENY":
            if parts.policy_matches(policy):
                return Decision(False, policy.key, "matched a DENY policy")
        elif policy.action == "ALLOW":
            allows.append(policy)
    if not allows:
        return Decision(True, None, "no ALLOW policy selects the workload")
    for policy in allows:
        if parts.policy_matches(policy):
            return Decision(True, policy.key, "matched an ALLOW policy")
    return Decision(False, None, "no ALLOW policy matched")
