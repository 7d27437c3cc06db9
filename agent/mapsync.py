"""Typed access to the node's pinned maps, and diff-based sync to desired contents.

Every sync reads what the kernel holds and writes only the difference, so the same
code serves a fresh start, an update, and a restarted agent adopting pinned state.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Mapping

from shoal.agent import bpfsys
from shoal.agent.compiler import Endpoint, PolicyEntry
from shoal.agent.structs import (
    COST_BUCKETS, COST_PROGRAMS, MAPS, Counter, OrigDstKey, EndpointInfo, PodInfo, PolicyKey, PolicyValue, SvcKey, SvcValue,
    be16_to_port, be32_to_ip, ip_to_be32, port_to_be16,
)

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
    def set_pod(self, cookie: int, identity: int, ip: str, ns_id: int, flags: int = 0) -> None:
        value = PodInfo(identity=identity, ip=ip_to_be32(ip), flags=flags, ns_id=ns_id)
        bpfsys.map_update(self.fds["enrolled_pods"], U64(cookie), value)

    def remove_pod(self, cookie: int) -> bool:
        return bpfsys.map_delete(self.fds["enrolled_pods"], U64(cookie))

    def pods(self) -> dict[int, dict]:
        out = {}
        fd = self.fds["enrolled_pods"]
        for key in bpfsys.map_keys(fd, U64):
            value = PodInfo()
            if bpfsys.map_lookup(fd, key, value):
                out[key.value] = {"identity": value.identity, "ip": be32_to_ip(value.ip),
                                  "ns_id": value.ns_id, "flags": value.flags}
        return out

    # -- ipcache
    def endpoints(self) -> dict[str, Endpoint]:
        out = {}
        fd = self.fds["ipcache"]
        for key in bpfsys.map_keys(fd, U32):
            value = EndpointInfo()
            if bpfsys.map_lookup(fd, key, value):
                out[be32_to_ip(key.value)] = Endpoint(value.identity, value.ns_id, value.flags)
        return out

    def sync_endpoints(self, desired: Mapping[str, Endpoint]) -> int:
        fd = self.fds["ipcache"]
        current = self.endpoints()
        changes = 0
        for ip, endpoint in desired.items():
            if current.get(ip) != endpoint:
                bpfsys.map_update(fd, U32(ip_to_be32(ip)),
                                  EndpointInfo(identity=endpoint.identity, ns_id=endpoint.ns_id, flags=endpoint.flags))
                changes += 1
        for ip in current.keys() - desired.keys():
            bpfsys.map_delete(fd, U32(ip_to_be32(ip)))
            changes += 1
        return changes

    # -- services
    def services(self) -> dict[tuple[str, int], tuple[tuple[str, int], ...]]:
        fd = self.fds["services"]
        slots: dict[tuple[str, int], dict[int, tuple[str, int]]] = {}
        counts: dict[tuple[str, int], int] = {}
        for key in bpfsys.map_keys(fd, SvcKey):
            value = SvcValue()
            if not bpfsys.map_lookup(fd, key, value):
                continue
            service = (be32_to_ip(key.vip), be16_to_port(key.port))
            if key.slot == 0:
                counts[service] = value.count
            else:
                slots.setdefault(service, {})[key.slot] = (be32_to_ip(value.backend_ip), be16_to_port(value.backend_port))
        out = {}
        for service in counts.keys() | slots.keys():
            backends = slots.get(service, {})
            out[service] = tuple(backends[slot] for slot in sorted(backends) if slot <= counts.get(service, 0))
        return out

    def _service_slots(self) -> set[tuple[int, int, int]]:
        return {(k.vip, k.port, k.slot) for k in bpfsys.map_keys(self.fds["services"], SvcKey)}

    def sync_services(self, desired: Mapping[tuple[str, int], tuple[tuple[str, int], ...]]) -> int:
        """Backends first, then the count; on shrink the count first, then the slots,
        so connect4 never picks a slot that is not there."""
        fd = self.fds["services"]
        current = self.services()
        present = self._service_slots()
        changes = 0
        for (vip, port), backends in desired.items():
            if current.get((vip, port)) == tuple(backends) and (ip_to_be32(vip), port_to_be16(port), 0) in present:
                continue
            vip32, port16 = ip_to_be32(vip), port_to_be16(port)
            old_count = len(current.get((vip, port), ()))
            if len(backends) < old_count:
                bpfsys.map_update(fd, SvcKey(vip=vip32, port=port16, slot=0), SvcValue(count=len(backends)))
            for slot, (ip, target) in enumerate(backends, start=1):
                bpfsys.map_update(fd, SvcKey(vip=vip32, port=port16, slot=slot),
                                  SvcValue(backend_ip=ip_to_be32(ip), backend_port=port_to_be16(target)))
            bpfsys.map_update(fd, SvcKey(vip=vip32, port=port16, slot=0), SvcValue(count=len(backends)))
            for slot in range(len(backends) + 1, old_count + 1):
                bpfsys.map_delete(fd, SvcKey(vip=vip32, port=port16, slot=slot))
            changes += 1
        wanted = {(ip_to_be32(vip), port_to_be16(port)) for vip, port in desired}
        for vip32, port16, slot in sorted(present, key=lambda s: s[2]):
            if (vip32, port16) not in wanted:
                bpfsys.map_delete(fd, SvcKey(vip=vip32, port=port16, slot=slot))
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
        """... and as getpeername4 sees them (by socket cookie)."""
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
