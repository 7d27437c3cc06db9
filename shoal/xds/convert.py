"""Model <-> protobuf for the config stream.

``from_proto`` validates everything the data path will rely on (addresses, enums, ports)
and raises ``ValueError`` naming the resource and field: the client NACKs such a resource
and keeps its last good version.
"""
from __future__ import annotations

import ipaddress
import json
from typing import Any, Callable

from shoal.api import config_pb2 as pb
from shoal.xds import model as m

PROTOCOLS = ("HBONE", "TCP")
MTLS_MODES = ("PERMISSIVE", "STRICT")
ACTIONS = ("ALLOW", "DENY")
PORT_PROTOCOLS = ("TCP", "UDP", "SCTP")


def check_ip(where: str, value: str, allow_empty: bool = False) -> str:
    if allow_empty and not value:
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{where}: invalid IP address {value!r}") from None
    return value


def check_cidr(where: str, value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{where}: invalid IP block {value!r}") from None
    return value


def check_addresses(where: str, primary: str, addresses, primary_field: str) -> tuple[str, ...]:
    """Validates a dual-stack address list (``ips``/``vips``): addresses, at most one per
    family (Kubernetes' rule for podIPs and clusterIPs), holding the primary."""
    addresses = tuple(check_ip(f"{where}[{i}]", a) for i, a in enumerate(addresses))
    families = [m.ip_family(a) for a in addresses]
    for family in m.IP_FAMILIES:
        if families.count(family) > 1:
            raise ValueError(f"{where}: more than one {family} address in {list(addresses)}")
    if addresses and primary and primary not in addresses:
        raise ValueError(f"{where}: does not hold the primary {primary_field} {primary!r}")
    return addresses


def _check_port(where: str, value: int, allow_zero: bool = False) -> int:
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise ValueError(f"{where}: port {value} out of range")
    return value


def _check_choice(where: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def _need(where: str, value: str) -> str:
    if not value:
        raise ValueError(f"{where}: must not be empty")
    return value


# -- model -> proto -------------------------------------------------------------------

def _ref_to_proto(ref: m.WaypointRef | None, out: pb.WaypointRef) -> None:
    if ref is not None:
        out.namespace, out.name = ref.namespace, ref.name


def to_proto(resource: m.Resource, version: str = "") -> pb.Resource:
    """Wraps a model resource into a stream ``Resource`` envelope."""
    kind = m.resource_type(resource)
    out = pb.Resource(type=kind, name=resource.key, version=version)
    if isinstance(resource, m.Workload):
        w = out.workload
        w.uid, w.name, w.namespace = resource.uid, resource.name, resource.namespace
        w.service_account, w.node, w.ip = resource.service_account, resource.node, resource.ip
        w.identity, w.spiffe_id, w.meshed = resource.identity, resource.spiffe_id, resource.meshed
        _ref_to_proto(resource.waypoint, w.waypoint)
        w.protocol = resource.protocol
        w.labels.update(resource.labels)
        w.canonical_service, w.mtls_mode = resource.canonical_service, resource.mtls_mode
        w.ips.extend(resource.ips)
        w.workload_name, w.workload_kind = resource.workload_name, resource.workload_kind
    elif isinstance(resource, m.Service):
        s = out.service
        s.name, s.namespace, s.vip = resource.name, resource.namespace, resource.vip
        s.ports.extend(pb.ServicePort(name=p.name, port=p.port, target_port=p.target_port,
                                      protocol=p.protocol, app_protocol=p.app_protocol) for p in resource.ports)
        s.endpoints.extend(resource.endpoints)
        _ref_to_proto(resource.waypoint, s.waypoint)
        s.vips.extend(resource.vips)
        s.ip_families.extend(resource.ip_families)
        s.ip_family_policy = resource.ip_family_policy
    elif isinstance(resource, m.Authorization):
        a = out.authorization
        a.name, a.namespace, a.action = resource.name, resource.namespace, resource.action
        a.selector.update(resource.selector)
        a.target_refs.extend(pb.TargetRef(group=ref.group, kind=ref.kind, name=ref.name)
                             for ref in resource.target_refs)
        for rule in resource.rules:
            r = a.rules.add()
            for src in rule.sources:
                r.sources.add(principals=src.principals, not_principals=src.not_principals,
                              namespaces=src.namespaces, not_namespaces=src.not_namespaces,
                              ip_blocks=src.ip_blocks, not_ip_blocks=src.not_ip_blocks)
            for op in rule.operations:
                r.operations.add(ports=op.ports, not_ports=op.not_ports, methods=op.methods,
                                 not_methods=op.not_methods, paths=op.paths,
                                 not_paths=op.not_paths, hosts=op.hosts, not_hosts=op.not_hosts)
            for cond in rule.conditions:
                r.conditions.add(key=cond.key, values=cond.values, not_values=cond.not_values)
    elif isinstance(resource, m.Waypoint):
        wp = out.waypoint
        wp.name, wp.namespace, wp.ip = resource.name, resource.namespace, resource.ip
        wp.service_account, wp.spiffe_id, wp.uid = (resource.service_account, resource.spiffe_id,
                                                    resource.uid)
        wp.ips.extend(resource.ips)
    elif isinstance(resource, m.KubeObject):
        o = out.object
        o.kind, o.namespace, o.name, o.json = (resource.kind, resource.namespace, resource.name,
                                               resource.json)
    return out


# -- proto -> model (validating) ----------------------------------------------------------

def _ref_from_proto(msg, field_name: str) -> m.WaypointRef | None:
    if not msg.HasField(field_name):
        return None
    ref = getattr(msg, field_name)
    return m.WaypointRef(namespace=ref.namespace, name=ref.name)


def _workload(w: pb.Workload, where: str) -> m.Workload:
    _need(f"{where}.uid", w.uid)
    _need(f"{where}.namespace", w.namespace)
    return m.Workload(
        uid=w.uid, name=w.name, namespace=w.namespace, service_account=w.service_account,
        node=w.node, ip=check_ip(f"{where}.ip", w.ip, allow_empty=True),
        ips=check_addresses(f"{where}.ips", w.ip, w.ips, "ip"),
        identity=w.identity, spiffe_id=w.spiffe_id, meshed=w.meshed,
        waypoint=_ref_from_proto(w, "waypoint"),
        protocol=_check_choice(f"{where}.protocol", w.protocol, PROTOCOLS),
        labels=m.Labels(w.labels), canonical_service=w.canonical_service,
        mtls_mode=_check_choice(f"{where}.mtls_mode", w.mtls_mode, MTLS_MODES),
        workload_name=w.workload_name, workload_kind=w.workload_kind,
    )


def _service(s: pb.Service, where: str) -> m.Service:
    _need(f"{where}.name", s.name)
    ports = tuple(
        m.ServicePort(name=p.name, port=_check_port(f"{where}.ports[{i}].port", p.port),
                      target_port=_check_port(f"{where}.ports[{i}].target_port", p.target_port,
                                              allow_zero=True),
                      protocol=_check_choice(f"{where}.ports[{i}].protocol", p.protocol,
                                             PORT_PROTOCOLS),
                      app_protocol=p.app_protocol)
        for i, p in enumerate(s.ports))
    vip = check_ip(f"{where}.vip", s.vip, allow_empty=True)
    vips = check_addresses(f"{where}.vips", vip, s.vips, "vip")
    families = tuple(_check_choice(f"{where}.ip_families[{i}]", f, m.IP_FAMILIES)
                     for i, f in enumerate(s.ip_families))
    if len(set(families)) != len(families):
        raise ValueError(f"{where}.ip_families: {list(families)} names a family twice")
    for address in vips:
        if families and m.ip_family(address) not in families:
            raise ValueError(f"{where}.vips: {address} is not of ip_families {list(families)}")
    policy = _check_choice(f"{where}.ip_family_policy", s.ip_family_policy or m.SINGLE_STACK,
                           m.IP_FAMILY_POLICIES)
    return m.Service(name=s.name, namespace=s.namespace, vip=vip, ports=ports,
                     endpoints=tuple(s.endpoints), waypoint=_ref_from_proto(s, "waypoint"),
                     vips=vips, ip_families=families, ip_family_policy=policy)


def _authorization(a: pb.Authorization, where: str) -> m.Authorization:
    rules = []
    for i, r in enumerate(a.rules):
        here = f"{where}.rules[{i}]"
        sources = tuple(
            m.Source(principals=tuple(s.principals), not_principals=tuple(s.not_principals),
                     namespaces=tuple(s.namespaces), not_namespaces=tuple(s.not_namespaces),
                     ip_blocks=tuple(check_cidr(f"{here}.sources[{j}].ip_blocks", b)
                                     for b in s.ip_blocks),
                     not_ip_blocks=tuple(check_cidr(f"{here}.sources[{j}].not_ip_blocks", b)
                                         for b in s.not_ip_blocks))
            for j, s in enumerate(r.sources))
        operations = tuple(
            m.Operation(ports=tuple(_check_port(f"{here}.operations[{j}].ports", p)
                                    for p in o.ports),
                        not_ports=tuple(_check_port(f"{here}.operations[{j}].not_ports", p)
                                        for p in o.not_ports),
                        methods=tuple(o.methods), not_methods=tuple(o.not_methods),
                        paths=tuple(o.paths), not_paths=tuple(o.not_paths),
                        hosts=tuple(o.hosts), not_hosts=tuple(o.not_hosts))
            for j, o in enumerate(r.operations))
        conditions = tuple(
            m.Condition(key=_need(f"{here}.conditions[{j}].key", c.key), values=tuple(c.values),
                        not_values=tuple(c.not_values))
            for j, c in enumerate(r.conditions))
        rules.append(m.Rule(sources=sources, operations=operations, conditions=conditions))
    target_refs = tuple(
        m.TargetRef(kind=_check_choice(f"{where}.target_refs[{i}].kind", ref.kind, m.TARGET_KINDS),
                    name=_need(f"{where}.target_refs[{i}].name", ref.name), group=ref.group)
        for i, ref in enumerate(a.target_refs))
    return m.Authorization(name=_need(f"{where}.name", a.name), namespace=a.namespace,
                           action=_check_choice(f"{where}.action", a.action, ACTIONS),
                           selector=m.Labels(a.selector), rules=tuple(rules), target_refs=target_refs)


def _waypoint(w: pb.Waypoint, where: str) -> m.Waypoint:
    return m.Waypoint(name=_need(f"{where}.name", w.name), namespace=w.namespace,
                      ip=check_ip(f"{where}.ip", w.ip, allow_empty=True),
                      service_account=w.service_account, spiffe_id=w.spiffe_id, uid=w.uid,
                      ips=check_addresses(f"{where}.ips", w.ip, w.ips, "ip"))


def _object(o: pb.KubeObject, where: str) -> m.KubeObject:
    try:
        body = json.loads(o.json)
    except ValueError as err:
        raise ValueError(f"{where}.json: not JSON: {err}") from None
    if not isinstance(body, dict) or body.get("kind") != o.kind:
        raise ValueError(f"{where}.json: expected a {o.kind} object")
    return m.KubeObject(kind=_need(f"{where}.kind", o.kind), namespace=o.namespace,
                        name=_need(f"{where}.name", o.name), json=o.json)


# resource type -> (the body field that carries it, its decoder)
_DECODERS: dict[str, tuple[str, Callable[[Any, str], m.Resource]]] = {
    m.WORKLOAD: ("workload", _workload),
    m.SERVICE: ("service", _service),
    m.AUTHORIZATION: ("authorization", _authorization),
    m.WAYPOINT: ("waypoint", _waypoint),
    m.OBJECT: ("object", _object),
}


def from_proto(resource: pb.Resource) -> m.Resource:
    """Decodes and validates one stream resource; ValueError names the offending field."""
    where = f"{resource.type}/{resource.name}"
    if resource.type not in _DECODERS:
        raise ValueError(f"{where}: unknown resource type {resource.type!r}")
    body_field, decode = _DECODERS[resource.type]
    if resource.WhichOneof("body") != body_field:
        raise ValueError(f"{where}: body is {resource.WhichOneof('body')!r}, expected {body_field}")
    decoded = decode(getattr(resource, body_field), where)
    if decoded.key != resource.name:
        raise ValueError(f"{where}: name does not match body key {decoded.key!r}")
    return decoded
