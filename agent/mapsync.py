"""Typed access to the node's pinned maps, and diff-based sync to desired contents.

Every sync reads what the kernel holds and writes only the difference, so the same
code serves a fresh start, an update, and a restarted agent adopting pinned state.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
from pathlib import Path
from typing import Mapping

from shoal.agent.compiler import Endpoint, PolicyEntry
from shoal.datapath import bpfsys
from shoal.datapath.structs import (
    CONFIG_PROXY_CGROUP,
    CONFIG_PROXY_CGROUP_PREVIOUS,
    COST_BUCKETS,
    COST_PROGRAMS,
    MAPS,
    Addr,
    Counter,
    EndpointInfo,
    OrigDstKey,
    PodValue,
    PolicyKey,
    PolicyValue,
    SvcKey,
    SvcValue,
    be16_to_port,
    port_to_be16,
)

# services: (vip, port, IP protocol number) -> backends ((ip, target port), ...)
ServiceKey = tuple[str, int, int]
Backends = tuple[tuple[str, int], ...]

U32 = ctypes.c_uint32
U64 = ctypes.c_uint64


class DatapathMaps:
    """Opens the pinned maps by path (no bcc): used by the agent, the CLI and tests."""

    def __init__(self, pin_dir: Path | str):
        self.pin_dir = Path(pin_dir)
        self.fds = {spec.name: bpfsys.obj_get(self.pin_dir / spec.name) for spec in MAPS}
        self._cpus = bpfsys.possible_cpus()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    # -- enrolled pods (netns cookie -> pod)
    def set_pod(self, cookie: int, identity: int, ip: str, ns_id: int, flags: int = 0, ip6: str | None = None) -> None:
        """`ip` of either family; `ip6` the pod's IPv6 when it has both (flow events use
        the address of the destination's family)."""
        ip4 = ip if ipaddress.ip_address(ip).version == 4 else None
        ip6 = ip6 or (ip if ip4 is None else None)
        value = PodValue(identity=identity, flags=flags, ns_id=ns_id, ip4=Addr.of(ip4), ip6=Addr.of(ip6))
        bpfsys.map_update(self.fds["enrolled_pods"], U64(cookie), value)

    def remove_pod(self, cookie: int) -> bool:
        return bpfsys.map_delete(self.fds["enrolled_pods"], U64(cookie))

    def pods(self) -> dict[int, dict]:
        out = {}
        fd = self.fds["enrolled_pods"]
        for key in bpfsys.map_keys(fd, U64):
            value = PodValue()
            if bpfsys.map_lookup(fd, key, value):
                out[key.value] = {"identity": value.identity, "ip": value.ip4.text() or value.ip6.text(),
                                  "ip6": value.ip6.text(), "ns_id": value.ns_id, "flags": value.flags}
        return out

    # -- config: the node proxy's cgroup (its sockets are never captured)
    def set_proxy_cgroup(self, cgroup_id: int) -> None:
        """The proxy's cgroup; the one it replaces stays exempt too (a proxy restarted into a
        new cgroup, as a Kubernetes container is, while the old one drains)."""
        current = self.proxy_cgroup()
        if current == cgroup_id:
            return
        if current:
            bpfsys.map_update(self.fds["config"], U32(CONFIG_PROXY_CGROUP_PREVIOUS), U64(current))
        bpfsys.map_update(self.fds["config"], U32(CONFIG_PROXY_CGROUP), U64(cgroup_id))

    def proxy_cgroup(self) -> int:
        value = U64()
        bpfsys.map_lookup(self.fds["config"], U32(CONFIG_PROXY_CGROUP), value)
        return value.value

    # -- ipcache (addresses of both families)
    def endpoints(self) -> dict[str, Endpoint]:
        out = {}
        fd = self.fds["ipcache"]
        for key in bpfsys.map_keys(fd, Addr):
            value = EndpointInfo()
            if bpfsys.map_lookup(fd, key, value):
                out[key.text()] = Endpoint(value.identity, value.ns_id, value.flags)
        return out

    def sync_endpoints(self, desired: Mapping[str, Endpoint]) -> int:
        fd = self.fds["ipcache"]
        current = self.endpoints()
        changes = 0
        for ip, endpoint in desired.items():
            if current.get(ip) != endpoint:
                bpfsys.map_update(fd, Addr.of(ip),
                                  EndpointInfo(identity=endpoint.identity, ns_id=endpoint.ns_id, flags=endpoint.flags))
                changes += 1
        for ip in current.keys() - desired.keys():
            bpfsys.map_delete(fd, Addr.of(ip))
            changes += 1
        return changes

    # -- services
    def services(self) -> dict[ServiceKey, Backends]:
        fd = self.fds["services"]
        slots: dict[ServiceKey, dict[int, tuple[str, int]]] = {}
        counts: dict[ServiceKey, int] = {}
        for key in bpfsys.map_keys(fd, SvcKey):
            value = SvcValue()
            if not bpfsys.map_lookup(fd, key, value):
                continue
            service = (key.vip.text(), be16_to_port(key.port), key.proto)
            if key.slot == 0:
                counts[service] = value.count
            else:
                slots.setdefault(service, {})[key.slot] = (value.backend.text(), be16_to_port(value.backend_port))
        out = {}
        for service in counts.keys() | slots.keys():
            backends = slots.get(service, {})
            out[service] = tuple(backends[slot] for slot in sorted(backends) if slot <= counts.get(service, 0))
        return out

    def sync_services(self, desired: Mapping[ServiceKey, Backends]) -> int:
        """Backends first, then the count; on shrink the count first, then the slots,
        so connect never picks a slot that is not there."""
        fd = self.fds["services"]
        current = self.services()
        present = {(k.vip.text(), be16_to_port(k.port), k.proto, k.slot)
                   for k in bpfsys.map_keys(fd, SvcKey)}

        def key(service: ServiceKey, slot: int) -> SvcKey:
            vip, port, proto = service
            return SvcKey(vip=Addr.of(vip), port=port_to_be16(port), proto=proto, slot=slot)

        changes = 0
        for service, backends in desired.items():
            if current.get(service) == tuple(backends) and (*service, 0) in present:
                continue
            old_count = len(current.get(service, ()))
            if len(backends) < old_count:
                bpfsys.map_update(fd, key(service, 0), SvcValue(count=len(backends)))
            for slot, (ip, target) in enumerate(backends, start=1):
                bpfsys.map_update(fd, key(service, slot), SvcValue(backend=Addr.of(ip), backend_port=port_to_be16(target)))
            bpfsys.map_update(fd, key(service, 0), SvcValue(count=len(backends)))
            for slot in range(len(backends) + 1, old_count + 1):
                bpfsys.map_delete(fd, key(service, slot))
            changes += 1
        for vip, port, proto, slot in sorted(present, key=lambda s: s[3]):
            if (vip, port, proto) not in desired:
                bpfsys.map_delete(fd, key((vip, port, proto), slot))
                changes += slot == 0
        return changes

    # -- L4 deny policy
    def policies(self) -> dict[PolicyEntry, int]:
        fd = self.fds["policy_deny"]
        out = {}
        for key in bpfsys.map_keys(fd, PolicyKey):
            value = PolicyValue()
            if bpfsys.map_lookup(fd, key, value):
                out[PolicyEntry(key.src_identity, key.dst_identity, key.dport, key.proto)] = value.rule_id
        return out

    def sync_policies(self, desired: Mapping[PolicyEntry, int]) -> int:
        fd = self.fds["policy_deny"]
        current = self.policies()
        changes = 0
        for entry, rule in desired.items():
            if current.get(entry) != rule:
                bpfsys.map_update(fd, _policy_key(entry), PolicyValue(rule_id=rule))
                changes += 1
        for entry in current.keys() - desired.keys():
            bpfsys.map_delete(fd, _policy_key(entry))
            changes += 1
        return changes

    # -- counters (per-CPU, summed)
    def counters(self) -> dict[str, int]:
        fd = self.fds["counters"]
        out = {}
        for counter in Counter:
            values = (ctypes.c_uint64 * self._cpus)()
            bpfsys.map_lookup(fd, U32(counter.value), values)
            out[counter.name.lower()] = sum(values)
        return out

    def cost_histograms(self) -> dict[str, list[int]]:
        """Per program: runs per log2(ns) bucket (bucket b holds [2^b, 2^(b+1)) ns)."""
        fd = self.fds["cost_hist"]
        out = {}
        for index, program in enumerate(COST_PROGRAMS):
            buckets = []
            for bucket in range(COST_BUCKETS):
                values = (ctypes.c_uint64 * self._cpus)()
                bpfsys.map_lookup(fd, U32(index * COST_BUCKETS + bucket), values)
                buckets.append(sum(values))
            out[program] = buckets
        return out

    def origdst_entries(self) -> int:
        """Live captured connections as the proxy's lookup sees them (by 4-tuple)."""
        return len(bpfsys.map_keys(self.fds["origdst"], OrigDstKey))

    def origdst_cookie_entries(self) -> int:
        """... and as getpeername sees them (by socket cookie)."""
        return len(bpfsys.map_keys(self.fds["origdst_by_cookie"], U64))


def _policy_key(entry: PolicyEntry) -> PolicyKey:
    return PolicyKey(src_identity=entry.src_identity, dst_identity=entry.dst_identity,
                     dport=entry.dport, proto=entry.proto)



def cost_bucket_bounds(index: int) -> tuple[int, int]:
    """[low, high) ns of one cost_hist bucket (the kernel's log2 x 4 sub-buckets)."""
    if index < 8:
        return index, index + 1
    log2, sub = divmod(index, 4)
    step = 1 << (log2 - 2)
    return (4 + sub) * step, (5 + sub) * step


def histogram_quantile(buckets: list[int], quantile: float) -> float | None:
    """A quantile of a cost histogram, interpolated inside its bucket; None when empty."""
    total = sum(buckets)
    if not total:
        return None
    rank = quantile * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            low, high = cost_bucket_bounds(index)
            return low + (high - low) * (rank - seen) / count
        seen += count
    return float(cost_bucket_bounds(len(buckets) - 1)[1])
