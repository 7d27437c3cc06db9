"""Validation of Kubernetes-shaped manifests before they reach the store.

Every error names the object and the field, e.g.
``Pod demo/web-0: spec.containers[0].command: expected a list of strings``.
Validation is pure: dicts in, a list of errors out.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from shoal.podspec import validate_pod_spec
from shoal.xds import model as m

# kind -> (apiVersions accepted, namespaced)
KINDS: dict[str, tuple[frozenset[str], bool]] = {
    "Namespace": (frozenset({"v1"}), False),
    "Node": (frozenset({"v1"}), False),
    "Pod": (frozenset({"v1"}), True),
    "Service": (frozenset({"v1"}), True),
    "ServiceAccount": (frozenset({"v1"}), True),
    "Deployment": (frozenset({"apps/v1"}), True),
    "AuthorizationPolicy": (frozenset({"security.shoal.io/v1", "security.istio.io/v1",
                                       "security.istio.io/v1beta1"}), True),
    "PeerAuthentication": (frozenset({"security.shoal.io/v1", "security.istio.io/v1",
                                      "security.istio.io/v1beta1"}), True),
    "TrafficPolicy": (frozenset({"networking.shoal.io/v1"}), True),
    "Gateway": (frozenset({"gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"}), True),
    "HTTPRoute": (frozenset({"gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"}), True),
    "GRPCRoute": (frozenset({"gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1alpha2"}), True),
}

# RFC 1123 label (names of namespaces, pods, services...).
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


class ManifestError(ValueError):
    """One or more manifests are invalid; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass
class _Checker:
    """Collects errors for one object, prefixed with its kind and name."""

    subject: str
    errors: list[str]

    def fail(self, field: str, message: str) -> None:
        self.errors.append(f"{self.subject}: {field}: {message}")

    def typed(self, value: Any, field: str, kind: type | tuple[type, ...], what: str) -> bool:
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return True
        self.fail(field, f"expected {what}, got {type(value).__name__}")
        return False

    def mappings(self, value: Any, field: str, what: str = "a list of mappings"):
        """Yields (index, item) for each mapping of a list field (absent = empty); reports
        a non-list and each non-mapping item instead of letting ``.get`` fail on them."""
        if value is None:
            return
        if not self.typed(value, field, list, what):
            return
        for i, item in enumerate(value):
            if self.typed(item, f"{field}[{i}]", dict, "a mapping"):
                yield i, item

    def mapping(self, value: Any, field: str) -> dict[str, Any]:
        """The mapping at ``field`` (absent = empty); reports anything else and returns {}."""
        if value is None:
            return {}
        return value if self.typed(value, field, dict, "a mapping") else {}

    def string_list(self, value: Any, field: str) -> None:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(field, "expected a list of strings")

    def port(self, value: Any, field: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            self.fail(field, f"expected a port number 1-65535, got {value!r}")

    def labels(self, value: Any, field: str) -> None:
        if not self.typed(value, field, dict, "a map of strings"):
            return
        for key, val in value.items():
            if not isinstance(key, str) or len(key) > 317 or not _LABEL_KEY.match(key):
                self.fail(f"{field}[{key!r}]", "invalid label key")
            elif not isinstance(val, str) or len(val) > 63 or not _LABEL_VALUE.match(val):
                self.fail(f"{field}[{key!r}]", f"invalid label value {val!r}")

    def name(self, value: Any, field: str, pattern: re.Pattern[str] = _DNS_LABEL, limit: int = 63) -> None:
        if not isinstance(value, str) or not value or len(value) > limit or not pattern.match(value):
            self.fail(field, f"invalid name {value!r} (lowercase RFC 1123, at most {limit} characters)")


def object_key(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    parts = (obj.get("kind", ""), meta.get("namespace", "") or "", meta.get("name", ""))
    return tuple(p if isinstance(p, str) else repr(p) for p in parts)


def describe(obj: dict[str, Any]) -> str:
    kind, namespace, name = object_key(obj)
    return f"{kind or '<no kind>'} {namespace + '/' if namespace else ''}{name or '<no name>'}"


def normalize(obj: dict[str, Any]) -> dict[str, Any]:
    """Fills defaults the API server would: the namespace of namespaced kinds."""
    kind = obj.get("kind")
    meta = obj.setdefault("metadata", {})
    if kind in KINDS and KINDS[kind][1] and not meta.get("namespace"):
        meta["namespace"] = "default"
    return obj


def validate(obj: Any, index: int = 0) -> list[str]:
    """Returns every problem with one manifest (empty when it is valid)."""
    if not isinstance(obj, dict):
        return [f"document {index + 1}: expected a mapping (a Kubernetes object), got {type(obj).__name__}"]
    check = _Checker(describe(obj) if obj.get("kind") else f"document {index + 1}", [])
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        check.fail("kind", f"unknown kind {kind!r}; known: {', '.join(sorted(KINDS))}")
        return check.errors
    versions, namespaced = KINDS[kind]
    if not isinstance(obj.get("apiVersion"), str) or obj["apiVersion"] not in versions:
        check.fail("apiVersion", f"{obj.get('apiVersion')!r} is not one of {', '.join(sorted(versions))}")
    meta = obj.get("metadata")
    if not check.typed(meta, "metadata", dict, "a mapping"):
        return check.errors
    check.name(meta.get("name"), "metadata.name", _DNS_SUBDOMAIN, 253)
    if namespaced:
        check.name(meta.get("namespace", "default"), "metadata.namespace")
    for field in ("labels", "annotations"):
        if field in meta:
            if field == "labels":
                check.labels(meta[field], f"metadata.{field}")
            else:
                check.typed(meta[field], f"metadata.{field}", dict, "a map of strings")
    spec_check = _SPEC_CHECKS.get(kind)
    if spec_check:
        spec = obj.get("spec", {})
        if check.typed(spec, "spec", dict, "a mapping"):
            spec_check(check, spec)
    return check.errors


def validate_all(objs: Iterable[Any]) -> list[dict[str, Any]]:
    """Validates a multi-document apply as a whole; raises ManifestError listing every problem."""
    objs = list(objs)
    errors: list[str] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, obj in enumerate(objs):
        problems = validate(obj, i)
        errors.extend(problems)
        if not problems:
            key = object_key(normalize(obj))
            if key in seen:
                errors.append(f"{describe(obj)}: appears twice (documents {seen[key] + 1} and {i + 1})")
            seen[key] = i
    if errors:
        raise ManifestError(errors)
    return objs


# -- per-kind spec checks ---------------------------------------------------------------


def _containers(check: _Checker, containers: Any, field: str) -> None:
    if not isinstance(containers, list) or not containers:
        check.fail(field, "expected a non-empty list of containers")
        return
    for i, container in enumerate(containers):
        where = f"{field}[{i}]"
        if not check.typed(container, where, dict, "a mapping"):
            continue
        check.name(container.get("name", "main"), f"{where}.name")
        if "command" not in container:
            check.fail(f"{where}.command", "required: the local cluster runs this command in the pod")
        else:
            check.string_list(container["command"], f"{where}.command")
        if "args" in container:
            check.string_list(container["args"], f"{where}.args")
        for j, port in check.mappings(container.get("ports"), f"{where}.ports", "a list of ports"):
            check.port(port.get("containerPort"), f"{where}.ports[{j}].containerPort")


def _pod_spec(check: _Checker, spec: dict[str, Any], field: str = "spec") -> None:
    _containers(check, spec.get("containers"), f"{field}.containers")
    for problem in validate_pod_spec(spec):
        check.fail(field, problem)
    if "serviceAccountName" in spec:
        check.name(spec["serviceAccountName"], f"{field}.serviceAccountName")
    if "nodeName" in spec:
        check.name(spec["nodeName"], f"{field}.nodeName")


def _deployment(check: _Checker, spec: dict[str, Any]) -> None:
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 1000:
        check.fail("spec.replicas", f"expected an integer 0-1000, got {replicas!r}")
    template = spec.get("template")
    if check.typed(template, "spec.template", dict, "a pod template"):
        labels = check.mapping(template.get("metadata"), "spec.template.metadata").get("labels", {})
        check.labels(labels, "spec.template.metadata.labels")
        tspec = template.get("spec")
        if check.typed(tspec, "spec.template.spec", dict, "a pod spec"):
            _pod_spec(check, tspec, "spec.template.spec")


def _service(check: _Checker, spec: dict[str, Any]) -> None:
    if "selector" in spec:
        check.labels(spec["selector"], "spec.selector")
    ports = spec.get("ports")
    if not isinstance(ports, list) or not ports:
        check.fail("spec.ports", "expected a non-empty list of ports")
        return
    for i, port in enumerate(ports):
        if not check.typed(port, f"spec.ports[{i}]", dict, "a mapping"):
            continue
        check.port(port.get("port"), f"spec.ports[{i}].port")
        target = port.get("targetPort")
        if target is not None and not isinstance(target, str):
            check.port(target, f"spec.ports[{i}].targetPort")
        if port.get("protocol", "TCP") not in ("TCP", "UDP", "SCTP"):
            check.fail(f"spec.ports[{i}].protocol", f"expected TCP, UDP or SCTP, got {port.get('protocol')!r}")
        if "appProtocol" in port:
            check.typed(port["appProtocol"], f"spec.ports[{i}].appProtocol", str, "a string (http2, grpc...)")
    _service_ip_families(check, spec)


def _service_ip_families(check: _Checker, spec: dict[str, Any]) -> None:
    """Kubernetes' dual-stack Service fields, checked as the API server does: known
    families, each at most once, at most one ClusterIP per family, every ClusterIP of a
    family the Service asks for, and a policy that allows as many families as it lists."""
    families = spec.get("ipFamilies", [])
    if check.typed(families, "spec.ipFamilies", list, "a list of IP families"):
        for i, family in enumerate(families):
            if family not in m.IP_FAMILIES:
                check.fail(f"spec.ipFamilies[{i}]", f"unknown IP family {family!r}; expected IPv4 or IPv6")
        if len(set(map(str, families))) != len(families):
            check.fail("spec.ipFamilies", f"{families} lists a family twice")
    else:
        families = []
    policy = spec.get("ipFamilyPolicy", m.SINGLE_STACK)
    if policy not in m.IP_FAMILY_POLICIES:
        check.fail("spec.ipFamilyPolicy", f"expected {', '.join(m.IP_FAMILY_POLICIES)}, got {policy!r}")
    elif policy == m.SINGLE_STACK and len(families) > 1:
        check.fail("spec.ipFamilies", "SingleStack allows one IP family")
    primary = spec.get("clusterIP")
    listed = spec.get("clusterIPs")
    addresses = [] if primary in (None, "", "None") else [("spec.clusterIP", primary)]
    if listed is not None and check.typed(listed, "spec.clusterIPs", list, "a list of IP addresses"):
        if listed and primary not in (None, "") and listed[0] != primary:
            check.fail("spec.clusterIPs", f"the first entry must equal spec.clusterIP {primary!r}")
        addresses += [(f"spec.clusterIPs[{i}]", a) for i, a in enumerate(listed) if a != "None"]
        if len(listed) > 2:
            check.fail("spec.clusterIPs", "at most one address per IP family (two)")
    seen: dict[str, str] = {}
    for field, address in addresses:
        try:
            family = m.ip_family(address)
        except (TypeError, ValueError):
            check.fail(field, f"not an IP address: {address!r}")
            continue
        if families and family not in families:
            check.fail(field, f"{address} is an {family} address; spec.ipFamilies is {families}")
        if seen.get(family, address) != address:
            check.fail(field, f"a second {family} ClusterIP ({address}, already {seen[family]})")
        seen[family] = address


def _authorization_policy(check: _Checker, spec: dict[str, Any]) -> None:
    action = spec.get("action", "ALLOW")
    if action not in ("ALLOW", "DENY"):
        check.fail("spec.action", f"expected ALLOW or DENY, got {action!r}")
    selector = spec.get("selector")
    if selector is not None and check.typed(selector, "spec.selector", dict, "a mapping"):
        check.labels(selector.get("matchLabels", {}), "spec.selector.matchLabels")
    refs = spec.get("targetRefs")
    if refs and selector:
        check.fail("spec.targetRefs", "cannot be combined with spec.selector")
    for i, ref in check.mappings(refs, "spec.targetRefs", "a list of references"):
        if ref.get("kind") not in ("Gateway", "Service"):
            check.fail(f"spec.targetRefs[{i}].kind", f"expected Gateway or Service, got {ref.get('kind')!r}")
        check.name(ref.get("name"), f"spec.targetRefs[{i}].name")
    rules = spec.get("rules", [])
    for i, rule in check.mappings(rules, "spec.rules", "a list of rules"):
        where = f"spec.rules[{i}]"
        for j, source in check.mappings(rule.get("from"), f"{where}.from"):
            src = check.mapping(source.get("source"), f"{where}.from[{j}].source")
            for field in ("principals", "notPrincipals", "namespaces", "notNamespaces"):
                if field in src:
                    check.string_list(src[field], f"{where}.from[{j}].source.{field}")
            for field in ("ipBlocks", "notIpBlocks"):
                if field not in src:
                    continue
                check.string_list(src[field], f"{where}.from[{j}].source.{field}")
                for k, block in enumerate(src[field] if isinstance(src[field], list) else []):
                    if not isinstance(block, str):
                        continue   # string_list reported it
                    try:
                        ipaddress.ip_network(block, strict=False)
                    except (TypeError, ValueError):
                        check.fail(f"{where}.from[{j}].source.{field}[{k}]", f"not a CIDR or IP: {block!r}")
        for j, target in check.mappings(rule.get("to"), f"{where}.to"):
            op = check.mapping(target.get("operation"), f"{where}.to[{j}].operation")
            for field in ("ports", "notPorts"):
                if field not in op:
                    continue
                check.string_list(op[field], f"{where}.to[{j}].operation.{field}")
                for k, port in enumerate(op[field] if isinstance(op[field], list) else []):
                    if not (isinstance(port, str) and port.isdigit() and 1 <= int(port) <= 65535):
                        check.fail(f"{where}.to[{j}].operation.{field}[{k}]",
                                   f"expected a port number as a string, got {port!r}")
            for field in ("methods", "notMethods", "paths", "notPaths", "hosts", "notHosts"):
                if field in op:
                    check.string_list(op[field], f"{where}.to[{j}].operation.{field}")
        for j, cond in check.mappings(rule.get("when"), f"{where}.when"):
            if not isinstance(cond.get("key"), str):
                check.fail(f"{where}.when[{j}].key", "required string")


def _peer_authentication(check: _Checker, spec: dict[str, Any]) -> None:
    mode = check.mapping(spec.get("mtls"), "spec.mtls").get("mode", "PERMISSIVE")
    if mode not in ("STRICT", "PERMISSIVE", "UNSET"):
        check.fail("spec.mtls.mode", f"expected STRICT, PERMISSIVE or UNSET, got {mode!r}")


def _gateway(check: _Checker, spec: dict[str, Any]) -> None:
    if not isinstance(spec.get("gatewayClassName"), str):
        check.fail("spec.gatewayClassName", "required string")


_SPEC_CHECKS: dict[str, Callable[[_Checker, dict[str, Any]], None]] = {
    "Pod": _pod_spec,
    "Deployment": _deployment,
    "Service": _service,
    "AuthorizationPolicy": _authorization_policy,
    "PeerAuthentication": _peer_authentication,
    "Gateway": _gateway,
}
